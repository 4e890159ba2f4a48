"""Training steps replayed from CUDA graphs: one launch per step instead of dozens.

A step of a small network is a few dozen kernel launches, each costing the
host more time than the GPU spends on it. ``GraphedStep`` captures the whole
step (forward, loss, backward, the optimizer update and the metric sums)
into a CUDA graph once per batch shape and settings (the learning rate, the
optimizer's, the loss's and the layers' options, the optimizer and the loss
themselves and the optimizer's state buffers: a callback may change any), and
then replays it: the batch is copied into the graph's input buffers, one
launch runs the step, and nothing crosses to the host.

The first step of each batch shape and settings runs eagerly, on the
graph's input buffers, and records the sizes of the memory it allocates; the
capture then draws the same sizes from one arena set aside before it (CUDA
refuses memory-pool allocation while capturing). Replays do what an eager
step does, kernel for kernel on the same memory, so the weights after N
steps are the same, bit for bit where the kernels are deterministic.

If a capture fails (an operation CUDA does not allow while capturing),
the warning says which and the run goes on with eager steps.

A number that changes every step cannot be baked into a graph. Dropout and
RandomShift draw from a counter the host advances: a graph draws with a copy
of it on the device, set before each replay (one small launch per layer), so
the graph computes their keys there; eager steps draw with the host's. Adam's bias correction
depends on the step count, so with Adam the graph holds the step up to the
update and the update (one kernel) runs after each replay.

A distributed step's graph holds its gradient all-reduce (NCCL, which may be
captured since NCCL 2.9), and a graph is per (this rank's rows, the global
rows, where they start, settings). Every rank steps the same way at
each step, so that their collectives pair up and their divergence checks
agree: a new shape comes to all of them at the same step (its first step
runs, and all-reduces, eagerly; the capture only records), a step that
leaves a rank without rows (a short last batch) runs eagerly on all, a
capture that fails on one rank turns graphs off on all, and the check at a
replayed step sums the ranks' running losses.
"""

import contextlib
import sys

import numpy

from .layers import LAYERS, RandomLayer
from .losses import LOSSES
from .optimizers import OPTIMIZERS


def _frozen(value):
    """``value`` (configs: dicts, lists, numbers, strings) as nested tuples, to compare and hash."""
    if isinstance(value, dict):
        return tuple((key, _frozen(item)) for key, item in value.items())
    if isinstance(value, list):
        return tuple(map(_frozen, value))
    return value


# nnaccel's own optimizers, losses and layers, whose configs name every option they compute with
_NAMED_IN_CONFIG = frozenset([*OPTIMIZERS.values(), *LOSSES.values(), *LAYERS.values()])


def _plain_attributes(obj, but=None):
    """For an optimizer, loss or layer of one's own, whose config need not name its options, its attributes
    of plain values (numbers, strings, flags; its kernels may take them as numbers) but the one named ``but``
    (an optimizer's step count, which the graphs of an update that takes it do not hold); () for nnaccel's."""
    if type(obj) in _NAMED_IN_CONFIG:
        return ()
    return [(name, value) for name, value in vars(obj).items()
            if name != but and isinstance(value, (bool, int, float, str, numpy.number))]


def _layer_settings(layer):
    """``layer``'s options as a graph may hold them: its config (a layer of one's own need not have one) and
    its ``_plain_attributes``."""
    if type(layer) in _NAMED_IN_CONFIG:
        return layer.config()
    try:
        config = layer.config()
    except NotImplementedError:
        config = None
    return [config, _plain_attributes(layer)]


class GraphedStep:
    """``step`` (a ``trainer._Step``) replayed from a CUDA graph per batch shape and settings."""

    def __init__(self, step):
        self.step = step
        self.graphs = {}  # (rows, global rows, first, settings) -> (graph, x buffer, y buffer, the work arrays it uses)
        self.failed = None  # why a capture failed: the steps then run eagerly
        self.key = None  # the graph key ``inputs`` made for the step about to run (settings take time to read)
        self.settings = self.frozen_settings = None  # the last step's settings, as read and as hashed
        model = step.trainer.model
        self.random_layers = [layer for layer in model.layers if isinstance(layer, RandomLayer)]
        # Their device counters, which the graphs draw with; set before each replay.
        self.counters = [model.backend.zeros((), numpy.uint64) for _ in self.random_layers]

    @property
    def eager_update(self):
        """Whether the optimizer's update runs after the replay: one with numbers of its own each step (Adam's
        bias correction); read from the trainer's optimizer of the moment (a callback may replace it)."""
        return self.step.trainer.optimizer.per_step_scalars

    def __call__(self, x, y, rows, first, guard, index):
        """One step on ``x, y`` (step ``index`` of the epoch; ``rows`` and ``first`` as ``_Step`` takes
        them, the whole batch in one process); ``(loss, correct)`` as device arrays that the next step
        overwrites."""
        trainer, key = self.step.trainer, self.key
        self.key = None  # taken: the next step's ``inputs`` makes the next
        if self.failed is not None:
            return self.step(x, y, rows, first, guard=guard, step=index)
        if rows < self.step.comm.size:  # a rank has no rows: every rank steps eagerly
            return self.step(x, y, rows, first, guard=guard, step=index)
        if key is None or key[:3] != (x.shape[0], rows, first):  # not the one ``inputs`` made for this step
            key = self._key(x.shape[0], rows, first)
        if key not in self.graphs:
            return self._run_and_capture(key, x, y, guard, index)
        graph, x_in, y_in, _ = self.graphs[key]
        if x is not x_in:  # (gathered into them by the epoch loop: ``inputs``)
            x_in[...] = x
            y_in[...] = y
        if guard.snapshot is None:  # a replay updates before its check: the weights before it are the ones to return to
            guard.take_snapshot(index)
        self._set_counters()
        graph.replay()
        for layer in self.random_layers:  # the host's part of their draws
            if layer.draws:
                layer.counter += 1
        if self.eager_update:
            trainer.optimizer.step(trainer.model)
        else:
            trainer.optimizer.steps += 1  # the host's part of the step: the graph does the device's
        guard.after_replay(index, self.step.loss_sum, self.step.comm)
        return graph.outputs

    def inputs(self, x, y, part, rows, first):
        """``_Step.inputs``; once the step of this shape has a graph, the graph's own input buffers, so
        that a gathered batch lands where the replay reads it."""
        if self.failed is None:
            self.key = self._key(part, rows, first)  # the step's, which ``__call__`` takes
            if self.key in self.graphs:
                return self.graphs[self.key][1:3]
        return self.step.inputs(x, y, part, rows, first)

    def _key(self, part, rows, first):
        """A step's graph: per (this rank's rows, the global rows, where they start, settings). The
        settings are what a graph holds, which a callback may change between steps (a warm-up, a
        one-cycle momentum, another optimizer or loss, a momentum reset): as numbers, the learning rate
        and every option of the optimizer, the loss and the layers (SGD's momentum and weight decay,
        Dropout's rate and seed, BatchNorm's momentum; of one's own, also ``_plain_attributes``); as
        memory, the optimizer and loss objects and the optimizer's state buffers, by identity (each graph
        keeps those alive: ``_run_and_capture``). Not the optimizer where its update runs after the
        replay (Adam's): only that it does."""
        trainer, optimizer, loss = self.step.trainer, self.step.trainer.optimizer, self.step.trainer.loss
        update = ((True,) if self.eager_update else
                  (id(optimizer), optimizer.lr, optimizer.config(), *_plain_attributes(optimizer, but="steps"),
                   *map(id, optimizer.state.values())))
        settings = [*update, id(loss), loss.config(), _plain_attributes(loss),
                    *map(_layer_settings, trainer.model.layers), *(layer.seed for layer in self.random_layers)]
        if settings != self.settings:  # freezing them (to hash) takes 3-5 times as long as reading them
            self.settings, self.frozen_settings = settings, _frozen(settings)
        return part, rows, first, self.frozen_settings

    def _set_counters(self):
        """The device counters the graphs draw with, set to the random layers' own."""
        for layer, counter in zip(self.random_layers, self.counters):
            counter.fill(layer.counter)

    @contextlib.contextmanager
    def _drawing_on_device(self):
        """Within, the random layers draw with the device counters, set to theirs: the capture, and the eager
        step before it, which must allocate as the capture does. Outside, a step draws with the host counters
        (a ``train_step`` a callback takes too, or another trainer's on the model)."""
        self._set_counters()
        for layer, counter in zip(self.random_layers, self.counters):
            layer.device_counter = counter
        try:
            yield
        finally:
            for layer in self.random_layers:
                layer.device_counter = None

    def _run_and_capture(self, key, x, y, guard, index):
        trainer, backend = self.step.trainer, self.step.trainer.model.backend
        _, rows, first, _ = key
        x_in, y_in = x.copy(), y.copy()
        with self._drawing_on_device():  # the eager step allocates as the capture does
            with backend.recording_allocations() as allocations:
                result = self.step(x_in, y_in, rows, first, guard=guard, step=index)
            key = self._key(*key[:3])  # the optimizer's state the eager step made (or moved) is the one captured
            # The capture allocates again only what the eager step let go: not the work arrays, the optimizer's
            # state or the guard's snapshot that step made (a graph's arena would hold them twice).
            sizes = allocations.temporary_sizes([*trainer.model.work_arrays(), trainer.loss._grad,
                                                 *trainer.optimizer.state.values(), *guard.arrays()])
            steps, counters = trainer.optimizer.steps, [layer.counter for layer in self.random_layers]
            failed = None
            try:
                graph = backend.capture(lambda: self.step(x_in, y_in, rows, first, update=not self.eager_update),
                                        sizes)  # records the step, runs none of it
            except Exception as error:  # CUDA refused an operation of the step while capturing
                failed = f"{type(error).__name__}: {error}"
            finally:
                trainer.optimizer.steps = steps
                for layer, counter in zip(self.random_layers, counters):
                    layer.counter = counter
        if self.step.comm.any_flags(failed is not None)[0]:
            self.failed = failed or "it failed on another rank"
            if not trainer.quiet:
                print(f"warning: CUDA graphs off: capturing the step failed ({self.failed}); the steps run "
                      f"eagerly", file=sys.stderr, flush=True)
            return result
        # Graphs of earlier settings (the schedule moved on) are not replayed again.
        self.graphs = {k: v for k, v in self.graphs.items() if k[-1] == key[-1]}
        # The layers and the loss replace a work array when a larger batch comes (evaluation, a
        # new shape); the graph still writes into the old one, so it keeps the old one alive. It keeps
        # the optimizer, the loss and the optimizer's state too: no other object takes the ids in its key.
        optimizer, loss = trainer.optimizer, trainer.loss
        self.graphs[key] = (graph, x_in, y_in, [*trainer.model.work_arrays(), loss._grad, loss, optimizer,
                                                *optimizer.state.values()])
        return result
