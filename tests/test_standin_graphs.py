"""CUDA graph capture and replay in the CuPy stand-in, with CuPy's API and CUDA's rules: captured work runs only
when the graph is launched, replays do what eager runs do bit for bit, what CUDA refuses while capturing raises
and invalidates the capture, and a replay into memory freed since the capture is caught instead of corrupting."""

import gc

import numpy
import pytest

pytestmark = pytest.mark.usefixtures("emulated")

AFFINE = r"""
extern "C" __global__ void affine(float* y, const float* x, double scale, double shift, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x)
    y[i] = (float)(scale * x[i] + shift);
}
"""


@pytest.fixture
def cp():
    import cupy

    yield cupy
    stream = cupy._core.capturing_stream()  # a failed test must not leave this thread capturing
    if stream is not None:
        try:
            stream.end_capture()
        except RuntimeError:
            pass


@pytest.fixture
def affine(cp):
    return cp.RawModule(code=AFFINE).get_function("affine")


class Arena:
    """An allocator handing out pieces of one allocation made before the capture (what nnaccel keeps a graph's
    temporaries in)."""

    def __init__(self, cp, nbytes=1 << 20):
        self.base, self.used, self.nbytes = cp.cuda.alloc(nbytes), 0, nbytes

    def malloc(self, size):
        pointer = self.base + self.used
        self.used += -(-size // 256) * 256
        assert self.used <= self.nbytes, "arena exhausted"
        return pointer

    def holds(self, array):
        return self.base.ptr <= array.data.ptr < self.base.ptr + self.nbytes


def model(cp, seed=0):
    rng = numpy.random.default_rng(seed)
    host = {"x": rng.standard_normal((16, 8)), "w": rng.standard_normal((8, 4)) * 0.3,
            "b": rng.standard_normal(4) * 0.1, "target": rng.standard_normal((16, 4))}
    state = {name: cp.asarray(value.astype(numpy.float32)) for name, value in host.items()}
    state["loss"] = cp.zeros((), numpy.float32)
    state["scaled"] = cp.empty((16, 4), numpy.float32)
    return state


def training_step(cp, affine, s, lr=0.05):
    """Forward, loss, backward and an SGD update, like one of nnaccel's steps: matmul, bias add, ReLU (maximum),
    a reduction into a 0-d array, in-place updates, a gather and a RawKernel launch with scalar arguments."""
    h = s["x"] @ s["w"]
    h += s["b"]
    y = cp.maximum(h, 0)
    error = y - s["target"]
    cp.sum(error * error, out=s["loss"])
    s["loss"] *= 1.0 / error.size
    dh = error * (h > 0)
    s["w"] -= lr * (s["x"].T @ dh)
    s["b"] -= lr * dh.sum(axis=0)
    first_rows = y[cp.arange(4)]
    affine((2,), (32,), (s["scaled"], y, 0.5, float(lr), y.size))
    return first_rows


def snapshot(state):
    return {name: array.get().tobytes() for name, array in state.items()}


def test_replays_match_eager_runs_bit_for_bit(cp, affine):
    eager, graphed = model(cp), model(cp)
    steps = 3
    for _ in range(steps):
        eager_rows = training_step(cp, affine, eager)
    arena = Arena(cp)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream, cp.cuda.using_allocator(arena.malloc):
        stream.begin_capture()
        assert stream.is_capturing()
        graphed_rows = training_step(cp, affine, graphed)
        graph = stream.end_capture()
    assert isinstance(graph, cp.cuda.Graph) and cp.cuda.graph.Graph is cp.cuda.Graph
    assert not stream.is_capturing() and arena.holds(graphed_rows)
    graph.upload()
    for _ in range(steps):
        graph.launch(stream=stream)
    stream.synchronize()
    assert snapshot(graphed) == snapshot(eager)
    assert graphed_rows.get().tobytes() == eager_rows.get().tobytes()
    graph.launch()  # one more replay is one more step
    training_step(cp, affine, eager)
    assert snapshot(graphed) == snapshot(eager)


def test_nothing_runs_during_capture_until_launch(cp, affine):
    state, reference = model(cp), model(cp)
    before = snapshot(state)
    arena = Arena(cp)
    arena_before = cp.ndarray((arena.nbytes,), numpy.uint8, memptr=arena.base).get()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream, cp.cuda.using_allocator(arena.malloc):
        stream.begin_capture()
        rows = training_step(cp, affine, state)
        z = cp.zeros(4, numpy.float32)
        z[1:3] = state["b"][:2]
        graph = stream.end_capture()
    assert snapshot(state) == before  # the weights, the loss, the kernel's output: untouched
    assert (cp.ndarray((arena.nbytes,), numpy.uint8, memptr=arena.base).get() == arena_before).all()
    graph.launch()
    expected = training_step(cp, affine, reference)
    assert snapshot(state) == snapshot(reference) != before
    assert rows.get().tobytes() == expected.get().tobytes()
    assert z.get().tolist() == [0.0, *state["b"].get()[:2].tolist(), 0.0]  # the bias as the step left it


REFUSED = {
    "synchronizing the device": lambda cp, x: cp.cuda.Device().synchronize(),
    "synchronizing the device (runtime)": lambda cp, x: cp.cuda.runtime.deviceSynchronize(),
    "synchronizing a stream": lambda cp, x: cp.cuda.get_current_stream().synchronize(),
    "copying device memory to the host": lambda cp, x: x.get(),
    "copying device memory to the host (asnumpy)": lambda cp, x: cp.asnumpy(x),
    "copying host memory to the device": lambda cp, x: x.set(numpy.zeros(4, numpy.float32)),
    "copying host memory to the device (asarray)": lambda cp, x: cp.asarray(numpy.zeros(4)),
    "reading a device value on the host": lambda cp, x: x[0].item(),
    "reading a device value on the host (float)": lambda cp, x: float(x.sum()),
    "reading a device value on the host (bool)": lambda cp, x: bool(x[0] > 0),
    "reading a device value on the host (int)": lambda cp, x: int(x[0]),
    "copying device memory to the host (tolist)": lambda cp, x: x.tolist(),
    "reading a device value on the host (nonzero)": lambda cp, x: cp.nonzero(x),
    "reading a device value on the host (mask)": lambda cp, x: x[x > 0],
    "reading a device value on the host (mask assignment)": lambda cp, x: x.__setitem__(x > 0, 0),
    "copying host memory to the device (host index)": lambda cp, x: x[[0, 2]],
    "copying device memory to the host (repr)": lambda cp, x: repr(x),
    "allocating from the memory pool": lambda cp, x: x + 1,  # no arena: its result comes from the pool
}


@pytest.mark.parametrize("attempt", list(REFUSED), ids=list(REFUSED))
def test_each_refused_call_raises_and_invalidates_the_capture(cp, attempt):
    from cupy.cuda.runtime import CUDARuntimeError

    x = cp.arange(4, dtype=numpy.float32)
    arena = Arena(cp)
    stream = cp.cuda.Stream(non_blocking=True)
    pool = attempt == "allocating from the memory pool"
    with stream, cp.cuda.using_allocator(cp.get_default_memory_pool().malloc if pool else arena.malloc):
        stream.begin_capture()
        with pytest.raises(CUDARuntimeError, match="cudaErrorStreamCaptureUnsupported") as refused:
            REFUSED[attempt](cp, x)
        assert attempt.split(" (")[0] in str(refused.value) and refused.value.status == 900
        with pytest.raises(RuntimeError, match="an error has invalidated the capture"):
            stream.is_capturing()
        with pytest.raises(CUDARuntimeError, match="cudaErrorStreamCaptureInvalidated"):
            x * 2  # further work on the invalidated capture
        with pytest.raises(CUDARuntimeError, match="cudaErrorStreamCaptureInvalidated") as ended:
            stream.end_capture()
        assert ended.value.status == 901 and attempt.split(" (")[0] in str(ended.value)
        assert not stream.is_capturing() and cp._core.capturing_stream() is None
    # the caller falls back to eager execution: everything works again
    assert (x + 1).get().tolist() == [1, 2, 3, 4] and float(x.sum()) == 6.0
    cp.cuda.Device().synchronize()


def test_pool_allocation_is_refused_during_capture_but_an_arena_allocator_works(cp):
    from cupy.cuda.runtime import CUDARuntimeError

    pool = cp.get_default_memory_pool()
    x = cp.arange(6, dtype=numpy.float32)
    arena = Arena(cp)
    gc.collect()  # earlier tests' arrays go back to the pool now, not during the capture
    used = pool.used_bytes()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        assert cp.cuda.get_allocator() == pool.malloc
        with pytest.raises(CUDARuntimeError, match="allocating from the memory pool"):
            cp.empty(6, numpy.float32)
        with pytest.raises(CUDARuntimeError, match="cudaErrorStreamCaptureInvalidated"):
            stream.end_capture()
        stream.begin_capture()
        with cp.cuda.using_allocator(arena.malloc):
            assert cp.cuda.get_allocator() == arena.malloc
            scratch = cp.empty((2, 3), numpy.float32)
            doubled = x.reshape(2, 3) * 2  # a view (no memory), then a new array (from the arena)
            doubled += 1
            total = doubled.sum()
            zeros = cp.zeros(3, numpy.float32)
            scratch[...] = doubled
        assert pool.used_bytes() == used
        graph = stream.end_capture()
    assert all(arena.holds(a) for a in (scratch, doubled, total, zeros))
    graph.launch()
    assert doubled.get().tolist() == [[1, 3, 5], [7, 9, 11]] and float(total) == 36.0
    assert scratch.get().tolist() == doubled.get().tolist() and zeros.get().tolist() == [0, 0, 0]


def test_replay_into_memory_freed_since_capture_is_caught(cp):
    from cupy.cuda.runtime import CUDARuntimeError

    total = cp.zeros(5, numpy.float32)
    temporary = cp.ones(5, numpy.float32)  # from the pool, before the capture
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        total += temporary
        graph = stream.end_capture()
    graph.launch()
    assert total.get().tolist() == [1] * 5
    del temporary  # its memory goes back to the pool, while the graph still writes through it
    gc.collect()
    reused = cp.full(5, 7, numpy.float32)  # the pool hands the same block on
    with pytest.raises(CUDARuntimeError, match=r"freed since the capture: the 20-byte allocation at 0x[0-9a-f]+ "
                                               r"holding a float32 array of shape \(5,\).*numpy.add"):
        graph.launch()
    assert total.get().tolist() == [1] * 5 and reused.get().tolist() == [7] * 5  # nothing of it ran


def test_capture_on_the_default_stream_is_refused(cp):
    for stream in (cp.cuda.Stream.null, cp.cuda.Stream(null=True)):
        with pytest.raises(RuntimeError, match=r"cannot capture on the default \(legacy\) stream"):
            stream.begin_capture()
        assert not stream.is_capturing() and cp._core.capturing_stream() is None


def test_nested_capture_is_refused(cp):
    from cupy.cuda.runtime import CUDARuntimeError

    x = cp.zeros(3, numpy.float32)
    outer, inner = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    with outer:
        outer.begin_capture()
        with pytest.raises(CUDARuntimeError, match="already capturing"):
            outer.begin_capture()
        with pytest.raises(CUDARuntimeError, match="nested capture"):
            inner.begin_capture()
        x += 1  # the outer capture goes on, unharmed
        graph = outer.end_capture()
    with pytest.raises(CUDARuntimeError, match="is not capturing"):
        outer.end_capture()
    graph.launch()
    graph.launch()
    assert x.get().tolist() == [2, 2, 2]


def test_scalar_kernel_arguments_are_baked_at_capture_time(cp, affine):
    x = cp.arange(40, dtype=numpy.float32)
    y = cp.zeros(40, numpy.float32)
    settings = {"scale": 3.0, "shift": 1.0}
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        affine((2,), (16,), (y, x, settings["scale"], settings["shift"], x.size))
        graph = stream.end_capture()
    assert y.get().tolist() == [0] * 40  # not run yet
    settings["scale"], settings["shift"] = -1.0, 100.0  # the host's values change; the graph's do not
    graph.launch()
    numpy.testing.assert_array_equal(y.get(), numpy.arange(40, dtype=numpy.float32) * 3 + 1)
    with stream:  # a launch CUDA would refuse fails at capture, not at replay, and ends the capture's use
        stream.begin_capture()
        with pytest.raises(cp.cuda.driver.CUDADriverError, match="argument 2 .*double scale"):
            affine((1,), (32,), (y, x, numpy.float32(1), 0.0, x.size))
        with pytest.raises(RuntimeError, match="cudaErrorStreamCaptureInvalidated.*affine"):
            stream.end_capture()


def test_work_outside_the_capturing_stream(cp):
    """Work issued to the default stream while a blocking stream captures is CUDA's implicit-synchronisation
    error; with a non-blocking capturing stream it simply runs (and is not in the graph)."""
    from cupy.cuda.runtime import CUDARuntimeError

    x = cp.zeros(2, numpy.float32)
    blocking = cp.cuda.Stream()
    blocking.begin_capture()  # forgot `with blocking:`
    with pytest.raises(CUDARuntimeError, match="cudaErrorStreamCaptureImplicit"):
        x += 1
    with pytest.raises(CUDARuntimeError, match="cudaErrorStreamCaptureInvalidated"):
        blocking.end_capture()
    quiet = cp.cuda.Stream(non_blocking=True)
    quiet.begin_capture()
    x += 1  # on the default stream: runs now
    graph = quiet.end_capture()
    graph.launch()
    assert x.get().tolist() == [1, 1]


def test_cupys_allocator_api(cp):
    pool = cp.get_default_memory_pool()
    assert cp.cuda.get_allocator() == pool.malloc
    memory = cp.cuda.alloc(64)
    assert isinstance(memory, cp.cuda.MemoryPointer) and memory.ptr == memory.mem.ptr
    assert (memory + 16).ptr == memory.ptr + 16 and (16 + memory).mem is memory.mem
    whole = cp.ndarray((16,), numpy.float32, memptr=memory)
    part = cp.ndarray((2, 2), numpy.float32, memptr=memory + 16)
    whole.fill(0)
    part += 5
    assert whole.get().tolist() == [0] * 4 + [5] * 4 + [0] * 8 and part.data.ptr == memory.ptr + 16
    with pytest.raises(ValueError, match="does not fit"):
        cp.ndarray((16,), numpy.float32, memptr=memory + 4)
    sizes = []

    def counting(size):
        sizes.append(size)
        return pool.malloc(size)

    with cp.cuda.using_allocator(counting):
        assert cp.cuda.get_allocator() is counting
        cp.empty(10, numpy.float64)
        with pytest.raises(ValueError, match="inside `using_allocator`"):
            cp.cuda.set_allocator(None)
    assert sizes == [80] and cp.cuda.get_allocator() == pool.malloc
    cp.cuda.set_allocator(None)  # the raw allocator: no pool
    try:
        used = pool.used_bytes()
        raw = cp.ones(8, numpy.float32)
        assert isinstance(raw.data.mem, cp.cuda.Memory) and pool.used_bytes() == used
    finally:
        cp.cuda.set_allocator(pool.malloc)


def test_a_captured_gemm_into_memory_freed_since_is_caught(cp):
    """cuBLAS's gemmEx takes raw pointers: the capture finds the allocations they lie in."""
    from cupy.cuda.runtime import CUDARuntimeError

    from nnaccel.backend import cuda_kernels

    a, b = (cp.asarray(numpy.full(shape, 0x3F80, numpy.uint16)) for shape in ((2, 3), (3, 4)))  # bfloat16 ones
    out = cp.zeros((2, 4), numpy.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        cuda_kernels.gemm_bf16(a, b, out)
        graph = stream.end_capture()
    assert out.get().tolist() == [[0] * 4] * 2  # recorded, not run
    graph.launch()
    assert out.get().tolist() == [[3] * 4] * 2
    del b  # cuBLAS's A: a row-major product is the column-major one of the swapped operands
    gc.collect()
    with pytest.raises(CUDARuntimeError, match=r"freed since the capture: the 24-byte allocation at 0x[0-9a-f]+ "
                                               r"\(gemmEx's A\).*cublasGemmEx"):
        graph.launch()
