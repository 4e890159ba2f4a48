"""The stand-in's ``cupy.cuda.graph``: a captured CUDA graph, replayed on the same memory."""

from .. import _core
from . import runtime


class Graph:
    """The work one stream capture recorded (CuPy's ``cupy.cuda.Graph``): made by ``Stream.end_capture()``.

    ``launch()`` runs the recorded operations in order on the memory they were captured with, as a CUDA graph
    does, so that N launches do what N eager runs of the captured code would. A graph does not keep its memory
    alive: a launch that would touch an allocation freed since the capture (returned to the pool, where a GPU
    would hand it to someone else) raises instead, naming it.
    """

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("currently this class cannot be initiated by the user and must be created via "
                                  "stream capture")

    @classmethod
    def _from_capture(cls, capture):
        graph = cls.__new__(cls)
        graph._operations, graph._stream = list(capture.operations), repr(capture.stream)
        return graph

    def _check_alive(self):
        for number, operation in enumerate(self._operations):
            for memory, what in operation.touches:
                if memory() is None:
                    raise runtime.CUDARuntimeError(
                        f"cudaErrorIllegalAddress: launching the graph captured on {self._stream} would touch device "
                        f"memory freed since the capture: {what}, used by captured operation {number} "
                        f"({operation.label}); on a GPU the replay would silently read or write memory the pool may "
                        f"have handed on. Keep every array a graph uses alive while the graph is launched")

    def _run(self):
        self._check_alive()
        for operation in self._operations:
            operation.run()

    def launch(self, stream=None):
        """Run the graph on ``stream`` (default: the current stream); into a capture on that stream, recorded."""
        capture = _core.recording(stream)
        if capture is None:
            self._run()
        else:
            touches = [touch for operation in self._operations for touch in operation.touches]
            capture.add(f"the graph captured on {self._stream}", self._run, touches=touches)

    def upload(self, stream=None):
        """Make the graph ready to launch (nothing to do in the emulator)."""

    def __repr__(self):
        return f"<Graph of {len(self._operations)} operations captured on {self._stream} (emulated)>"
