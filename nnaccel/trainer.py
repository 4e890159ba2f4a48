"""The training loop: mini-batches, epochs, metrics, callbacks, checkpoints.

The whole training set goes to the device once; each epoch gathers it in a
seeded shuffled order there and slices batches from it. Loss and accuracy
are summed on the device and read only when reported; on a GPU the only
other read inside an epoch is the divergence check every 100 steps.

With a ``communicator`` (see ``nnaccel.distributed``) the same loop is data
parallel: every rank takes its part of each global batch of
``batch_size * ranks`` samples, and one all-reduce per step over the flat
gradient buffer gives every rank the gradient of the whole global batch.
"""

import contextlib
import math
import sys
import time

import numpy

from . import checkpoint, losses, optimizers
from .callbacks import Callback, CSVLogger, EarlyStopping, ModelCheckpoint, PlotCurves, check_monitors
from .backend import PRECISIONS, array_device
from .errors import (CheckpointError, ConfigError, NnaccelError, ShapeError, check_array, check_flag, check_int,
                     check_number, check_seed, described)
from .layers import BatchNorm, RandomLayer, check_saveable_layers
from .model import Sequential, check_float_range

# Callbacks that write files: in a distributed run only rank 0 runs them (as does any callback
# with a true ``rank_zero_only`` attribute); the others run on every rank.
RANK_ZERO_CALLBACKS = (ModelCheckpoint, CSVLogger, PlotCurves)

EVALUATED = ("loss", "accuracy")  # evaluate's metrics, an epoch's val_* with validation_data
EPOCH_LOGS = ("epoch", *EVALUATED, "lr", "samples_per_s", "time_s")  # an epoch's logs, before its val_*


class Trainer:
    """Trains a Sequential model with a loss and an optimizer.

    ``fit(..., epochs=N)`` trains N more epochs; the epoch count, the
    shuffle RNG, the optimizer state and the schedule position carry over
    between calls and through checkpoints.

    With ``communicator`` (``nnaccel.distributed.communicator_for(model)``)
    training is data parallel over its ranks: ``batch_size`` is per rank,
    every rank passes the whole training set to ``fit``, and only rank 0
    prints and writes checkpoints and logs.

    On CUDA each step is replayed from a CUDA graph (``cuda_graphs=True``,
    the default; see ``nnaccel.graphs``), distributed runs included; False
    runs every step eagerly. On the CPU the option changes nothing.

    ``precision`` says how a GPU computes the float32 weighted sums of
    training and evaluation: "fp32" (default), "tf32" (cuBLAS rounds the
    inputs to TensorFloat-32 for the tensor cores) or "bf16" (to bfloat16,
    and the Dense and Conv2D layers store their activations and gradients
    in bfloat16); products accumulate in float32, and the weights, the
    optimizer and the loss stay float32. The CPU computes fp32 and says so.
    """

    def __init__(self, model, loss=None, optimizer=None, batch_size=32, seed=0, schedule=None,
                 callbacks=(), quiet=False, communicator=None, cuda_graphs=True, precision="fp32"):
        if not isinstance(model, Sequential):
            raise ConfigError(f"Trainer trains an nnaccel Sequential model, got a {type(model).__name__}")
        batch_size = check_int(batch_size, "batch_size")
        self.model = model
        self.loss = losses.get(loss)
        self.optimizer = optimizers.get(optimizer)
        self.batch_size = int(batch_size)
        self.seed = check_seed(seed)
        self.rng = numpy.random.default_rng(self.seed)
        if schedule is not None and (isinstance(schedule, type) or not callable(getattr(schedule, "lr_at", None))):
            raise ConfigError(f"schedule must be a schedule such as nn.StepLR(10) or nn.CosineAnnealing(20) (an "
                              f"object with lr_at), got {described(schedule)}")
        self.schedule = schedule
        self.callbacks = _callback_list(callbacks, "Trainer callbacks")
        self.quiet = check_flag(quiet, "quiet")
        self.epoch = 0
        self.history = {}
        self.stop_training = self.interrupted = self._stop_requested = False
        self.nan_check_every = None  # steps between finiteness checks; None: 1 on CPU, 100 on GPU
        self._resume_point = None
        self._train_step = None  # the step unit train_step reuses (its sums are never read)
        self._checked_batch = None  # (x, y, backend, loss): the batch arrays train_step last checked
        self._samples = None  # the training samples of the last fit: a resumed epoch must step over as many
        self._fit_finished = False  # whether the last fit ran to its end (all epochs or an early stop), not an error
        self._in_batch_hooks = False  # while on_batch_end runs, mid-epoch: no checkpoint can resume there
        self._fit_callbacks = None  # the callbacks of the last fit: its EarlyStopping states go into checkpoints
        self._restored_early_stopping = []  # (state, weights) of each a restored checkpoint holds, until a fit
        self._last_weights = None  # the last epoch's (params, buffers) while the model holds an earlier epoch's
        # the command line's plan of the run ({"epochs", "validation_split", "data"}), kept in checkpoints
        self.plan = None
        self.communicator = communicator
        self.cuda_graphs = check_flag(cuda_graphs, "cuda_graphs")
        if (precision.lower() if isinstance(precision, str) else precision) not in PRECISIONS:  # "TF32" as the CLI
            raise ConfigError(f"precision {precision!r} is not one of {', '.join(map(repr, PRECISIONS))}")
        self.precision = precision = precision.lower()
        if communicator is not None:
            self.quiet = self.quiet or communicator.rank != 0
        note = model.backend.precision_note(precision)
        if note and not self.quiet:
            print(note, file=sys.stderr, flush=True)

    @property
    def rank(self):
        """This process's rank in a distributed run (0 otherwise)."""
        return 0 if self.communicator is None else self.communicator.rank

    @property
    def world_size(self):
        return 1 if self.communicator is None else self.communicator.size

    # ----- data --------------------------------------------------------------------
    def prepare(self, x, y, what="x"):
        """Validate a data set once and move it to the model's device.

        Integer and float16 inputs are converted to the model's float type
        when that is exact (always for 8- and 16-bit pixel types; wider
        integers beyond 2**24 for float32 are refused); float64 inputs are
        rounded to float32 like Keras does. NaN or inf in the inputs or
        float targets, finite values beyond float32's range (1e39, which
        would be inf), labels out of range, and lengths that disagree are
        refused here, so the training loop itself needs no checks.
        """
        with self.model.backend.activate():  # cuda:1 checks and converts on GPU 1
            return self._prepare(x, y, what)

    def _prepare(self, x, y, what):
        model, ops = self.model, self.model.backend
        label_what = what[:-1] + "y" if what.endswith("x") else f"{what} labels"  # "validation x": "validation y"
        x, y = (check_array(a, name) if array_device(a) is None else a  # lists; arrays stay
                for a, name in ((x, what), (y, label_what)))
        x = ops.asarray(x, what=what)
        y = ops.asarray(y, what=label_what)
        if x.ndim > 2 and tuple(x.shape[1:]) == model.input_shape:
            x = x.reshape(x.shape[0], -1)  # kept flat on the device; the model views batches as images
        if x.ndim != 2 or x.shape[1] != model.in_features:
            images = f" or (samples, {', '.join(map(str, model.input_shape))})" if len(model.input_shape) > 1 else ""
            raise ShapeError(f"{what} has shape {tuple(x.shape)} but the first layer expects "
                             f"(samples, {model.in_features}){images}")
        if x.shape[0] == 0:
            raise ShapeError(f"{what} is empty: no samples to train or evaluate on")
        if y.ndim == 0 or y.shape[0] != x.shape[0]:
            raise ShapeError(f"{label_what} has {y.shape[0] if y.ndim else 'no'} entries but {what} has "
                             f"{x.shape[0]} samples")
        if x.dtype.kind not in "fiu":
            raise ShapeError(f"{what} has dtype {x.dtype}; expected a float array")
        x = model.to_model_dtype(x, what)  # refuses finite values beyond the model dtype's range
        if not bool(ops.xp.isfinite(x).all()):
            raise ShapeError(f"{what} contains NaN or inf values")
        with numpy.errstate(over="ignore"):  # float64 targets beyond float32's range are refused below
            targets = self.loss.prepare_targets(ops, y, model.out_features, model.dtype, label_what)
        self.loss.check_values(y, model.out_features, label_what)
        if targets.dtype.kind == "f" and not bool(ops.xp.isfinite(targets).all()):
            if y.dtype.kind == "f":
                check_float_range(ops.xp, y, targets, label_what)
            raise ShapeError(f"{label_what} contains NaN or inf values")
        return x, targets

    # ----- training ------------------------------------------------------------------
    def train_step(self, x, y):
        """One forward, backward and update on a prepared batch (device arrays, as ``prepare`` gives
        them), in training mode whatever the model's mode; ``(loss, correct)`` on the device.

        A batch's shapes, dtypes and device are checked the first time its arrays come (the same arrays
        refilled in place keep them, so a loop over one batch, as the bench's timed steps, skips that);
        its labels every call: converted as the loss takes them and, on the CPU, their range (on a GPU
        that would synchronise every step; ``prepare`` checks a data set's once). A distributed trainer
        refuses it: its step is not all-reduced (``fit`` is).
        """
        if self.world_size > 1:  # its update would be this rank's alone: the ranks' weights would drift apart
            raise ConfigError(f"train_step trains this process alone, but the trainer is distributed over "
                              f"{self.world_size} ranks: its gradient would not be all-reduced and the ranks' "
                              f"weights would drift apart; train data parallel with fit, or step a Trainer made "
                              f"without communicator")
        self.optimizer._bind(self.model)  # before the step: another model's state is refused
        model, ops, checked = self.model, self.model.backend, self._checked_batch
        if checked is None or not (checked[0] is x and checked[1] is y and checked[2] is ops
                                   and checked[3] is self.loss):
            self._check_batch(x, y)
            self._checked_batch = (x, y, ops, self.loss)
        with ops.activate():  # cuda:1 steps on GPU 1
            targets = self.loss.prepare_targets(ops, y, model.out_features, model.dtype, "y")
            if ops.name == "cpu":
                self.loss.check_values(y, model.out_features, "y")
            self._take_last_weights()
            if self._train_step is None or self._train_step.ops is not ops:  # built anew after model.to
                self._train_step = _Step(self, _ONE_PROCESS)
            was_training = model.training
            model.train()  # Dropout drops and BatchNorm learns, as in fit; the model's mode comes back after
            try:
                with ops.matmul_precision(self.precision):
                    return self._train_step(x, targets)
            finally:
                model.train(was_training)

    def _check_batch(self, x, y):
        """A clear error unless ``x, y`` are a batch of device arrays whose shapes fit the model."""
        model, ops = self.model, self.model.backend
        for name, array in (("x", x), ("y", y)):
            if array_device(array) is None:
                raise ShapeError(f"train_step takes a batch of device arrays (Trainer.prepare(x, y) gives them), "
                                 f"got {name} as a {type(array).__name__}")
        model.check_input(x, "x")
        ops.check(y, "y")
        if y.ndim == 0 or y.shape[0] != x.shape[0]:
            raise ShapeError(f"y has shape {tuple(y.shape)} but x has {x.shape[0]} samples")
        if not x.shape[0]:  # a mean loss over no samples has no gradient to step with
            raise ShapeError(f"train_step got an empty batch: x has shape {tuple(x.shape)}; a step needs at least "
                             f"one sample")

    def _loss_step(self, x, y):
        model, loss = self.model, self.loss
        out = model._forward(x)
        return loss._forward(model.backend, out, y), loss.count_correct(model.backend, out, y)

    def request_stop(self):
        """Stop after the current step and remember where, so training can resume there (Ctrl-C,
        SIGTERM). A request made before ``fit`` starts stops it before its first step."""
        self.stop_training = self.interrupted = self._stop_requested = True

    def _working(self):
        """Work on the model's device (``cuda:N`` computes on GPU N) in the trainer's precision,
        without NumPy's overflow warnings (a non-finite loss is reported by the divergence guard)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.model.backend.activate())
        stack.enter_context(numpy.errstate(over="ignore", invalid="ignore"))
        stack.enter_context(self.model.backend.matmul_precision(self.precision))
        return stack

    def fit(self, x, y, epochs=1, validation_data=None, callbacks=(), shuffle=True):
        """Train ``epochs`` more epochs; returns the history (a dict of per-epoch lists, of every fit so
        far: NaN for the epochs of a fit without validation_data in ``val_*``).

        A run stopped by ``request_stop`` mid-epoch returns early; its
        checkpoint resumes at the same step. A non-finite loss raises
        TrainingDiverged: on the CPU before that step's update; on a GPU,
        which checks every 100 steps, after returning the weights and the
        optimizer state to the last check that passed.
        """
        with self._working():
            try:
                return self._fit(x, y, epochs, validation_data, callbacks, shuffle)
            except MemoryError as error:  # moving the data over or any step: say how much the device holds
                raise OutOfMemory(self.model.backend.memory_report(error, self.batch_size)) from None

    def _fit(self, x, y, epochs, validation_data, callbacks, shuffle):
        epochs = check_int(epochs, "epochs")  # zero is nonsense, as a batch size of zero is
        shuffle = check_flag(shuffle, "shuffle")
        if not self.model.num_parameters():  # as PyTorch's optimizers refuse an empty parameter list
            raise ConfigError(f"the model has no parameters to train ({', '.join(map(repr, self.model.layers))}): "
                              f"fit needs a layer with weights (Dense, Maxout, Conv2D, BatchNorm)")
        self.optimizer._bind(self.model)  # before any step: another model's state is refused
        callbacks = self.callbacks + _callback_list(callbacks, "fit callbacks")
        for index, callback in enumerate(callbacks):
            if any(callback is other for other in callbacks[:index]):
                raise ConfigError(f"the callback {type(callback).__name__} is given twice (to Trainer and to fit, or "
                                  f"twice in a list): its hooks would run twice each step and epoch")
        if validation_data is not None and not (isinstance(validation_data, (tuple, list))
                                                and len(validation_data) == 2):
            raise ConfigError(f"validation_data must be a pair (x, y), got {described(validation_data)}")
        x, y = self.prepare(x, y, "x")
        point, batch = self._resume_point or {}, self.batch_size * self.world_size
        stopped = f"this run stopped in the middle of epoch {self.epoch + 1} (after step {point.get('step')})"
        if point and self._samples not in (None, x.shape[0]):
            raise ConfigError(f"{stopped} of an epoch over {self._samples} samples, but fit got {x.shape[0]}: resume "
                              f"it on the same training data")
        per_step = point.get("batch_size", batch)  # a point from older checkpoints has none
        if per_step != batch:
            raise ConfigError(f"{stopped} of a run with {per_step} samples per step, but this fit takes {batch} "
                              f"({self.batch_size} x {self.world_size} process(es)): resume it with {per_step} "
                              f"samples per step")
        self._samples = x.shape[0]
        if validation_data is not None:
            validation_data = self.prepare(*validation_data, what="validation x")
        validated = tuple(f"val_{name}" for name in EVALUATED)
        if validation_data is None:
            check_monitors(callbacks, EPOCH_LOGS, validated)
        else:
            check_monitors(callbacks, EPOCH_LOGS + validated, ())
        savers = [callback for callback in callbacks if isinstance(callback, ModelCheckpoint)]
        if savers:
            # a run it cannot save (an optimizer, schedule or loss of one's own, a file that cannot be written)
            # is refused now, not after an epoch
            optimizers.saved_config(self.optimizer)
            self.state()
            check_saveable_layers(self.model.layers)
            if self.rank == 0:  # the rank that writes
                for saver in savers:
                    saver.check_path(self.epoch + 1)
        self._fit_finished = False
        resumes = self.interrupted and self._fit_callbacks is not None  # the last fit was stopped: go on with it
        self.stop_training = self.interrupted = self._stop_requested
        last_epoch = self.epoch + epochs
        comm = self.communicator or _ONE_PROCESS
        self._take_last_weights()  # after the refusals above: a fit refused there leaves the model as it was
        if self.communicator is not None:
            callbacks = self._start_distributed(x, callbacks, last_epoch, validation_data, shuffle)
        self._check_batchnorm_steps(x.shape[0], comm.size)
        if resumes:  # as from its checkpoint: its EarlyStopping state goes on (a next fit starts afresh, as in Keras)
            self._restored_early_stopping = self._early_stopping_states()
        for callback in callbacks:
            callback.on_train_begin(self)  # a resumed EarlyStopping whose patience is spent stops the run
        self._fit_callbacks, self._restored_early_stopping = callbacks, []
        # (stop, interrupted) as the ranks agree: a rank's own flags, set by a signal at any
        # moment, would have one rank leave the loop while the others train on.
        agreed = tuple(comm.any_flags(self.stop_training or self.interrupted, self.interrupted))
        step, graphed = self._steps(comm)  # here: the ``finally`` below gives the random layers their ops back
        try:
            while self.epoch < last_epoch and not agreed[0]:
                logs = self._train_epoch(x, y, shuffle, last_epoch, callbacks, comm, step, graphed)
                if logs is None:  # interrupted mid-epoch
                    agreed = (True, True)
                    break
                if self.communicator is not None and self.model.flat_buffers.size:  # as DDP's broadcast_buffers
                    self.communicator.broadcast_(self.model.flat_buffers)  # every rank: rank 0's BatchNorm estimates
                if validation_data is not None:
                    evaluate = self._evaluate if self.communicator is None else self._evaluate_distributed
                    logs.update({f"val_{k}": v for k, v in evaluate(*validation_data).items()})
                if self.communicator is not None:  # every rank decides (early stopping...) on rank 0's numbers
                    logs = self.communicator.broadcast_object(logs)
                self._record(logs)
                if not self.quiet:
                    print(_epoch_line(logs, last_epoch), file=sys.stderr, flush=True)
                for callback in callbacks:
                    callback.on_epoch_end(self, logs)
                agreed = tuple(comm.any_flags(self.stop_training or self.interrupted, self.interrupted))
            self.stop_training, self.interrupted = agreed
            self._fit_finished = True
        finally:
            step.finish()
            self._stop_requested = False
            self.model.eval()
            for callback in callbacks:
                callback.on_train_end(self)
        return self.history

    def _record(self, logs):
        """An epoch's ``logs`` into the history, whose lists stay one value per epoch: NaN for a metric the
        epoch lacks (validation in only some fits), as CSVLogger leaves its cell empty."""
        earlier = len(self.history.get("epoch", []))
        for key, values in self.history.items():
            if key not in logs:
                values.append(math.nan)
        for key, value in logs.items():
            self.history.setdefault(key, [math.nan] * earlier).append(value)

    def _check_batchnorm_steps(self, n, size):
        """A ShapeError before training where a step of ``n`` samples over ``size`` ranks would give a
        BatchNorm of features one value per channel, which it cannot train on (mid-epoch, otherwise)."""
        model = self.model
        layers = [layer for layer, shape in zip(model.layers, model.shapes)
                  if isinstance(layer, BatchNorm) and math.prod(shape[1:]) == 1]
        batch = self.batch_size * size
        last = n - (-(-n // batch) - 1) * batch  # the rows of the last global batch
        if layers and min(self.batch_size, last // size or 1) == 1:
            where = "every step" if self.batch_size == 1 else f"the last step of each epoch over {n} samples"
            raise ShapeError(f"{layers[0]!r} needs more than one value per channel to train, but batch size "
                             f"{self.batch_size}{f' x {size} ranks' if size > 1 else ''} gives it 1 sample"
                             f"{' on a rank' if size > 1 and self.batch_size > 1 else ''} in {where}: choose "
                             f"another batch size")

    def _start_epoch(self):
        """This epoch's resume point (a fresh one unless resuming): restores its RNG state, sets the lr."""
        point = self._resume_point or {"step": 0, "rng": self.rng.bit_generator.state,
                                       "loss_sum": 0.0, "correct_sum": 0.0}
        self._resume_point = None
        self.rng.bit_generator.state = point["rng"]
        if self.schedule is not None:  # a schedule of one's own may give a NumPy scalar, NaN or a negative rate
            base = self.optimizer.base_lr
            self.optimizer.lr = check_number(self.schedule.lr_at(self.epoch, base),
                                             f"{type(self.schedule).__name__}.lr_at({self.epoch}, {base!r}), the "
                                             f"learning rate of epoch {self.epoch + 1},", allow_zero=True)
        return point

    # ----- data-parallel training ---------------------------------------------------
    def _start_distributed(self, x, callbacks, last_epoch, validation_data, shuffle):
        """Check the ranks agree (ranks that run other epochs or validate otherwise would wait on each
        other's collectives for ever), give them rank 0's weights and random state, keep file writers on
        rank 0 only."""
        comm, model, optimizer = self.communicator, self.model, self.optimizer
        comm.check_model(model)
        mine = {"samples": int(x.shape[0]), "epoch": self.epoch, "last_epoch": last_epoch,
                "validation_samples": None if validation_data is None else int(validation_data[0].shape[0]),
                "shuffle": bool(shuffle), "batch_size": self.batch_size,
                "seed": self.seed, "parameters": model.num_parameters(), "optimizer_steps": optimizer.steps,
                "resume_step": (self._resume_point or {}).get("step"),
                # the same architecture, loss and update everywhere: another optimizer broadcasts other state
                # buffers (a hang), other rates or activations drift the weights apart
                "layers": model.config()["layers"], "loss": self.loss.name, "optimizer": optimizer.config(),
                "schedule": optimizers.schedule_config(self.schedule), "precision": self.precision}
        everyone = comm.allgather_object(mine)
        for rank, theirs in enumerate(everyone):
            differ = [f"{key} {theirs[key]} (rank 0: {everyone[0][key]})" for key in mine
                      if theirs[key] != everyone[0][key]]
            if differ:  # every rank sees the same list and raises the same error
                error = ConfigError(f"rank {rank} does not train the same run as rank 0: {', '.join(differ)}; "
                                    f"every rank must pass the whole training set and the same settings")
                error.all_ranks = True
                raise error
        comm.broadcast_(model.flat_params)
        # and rank 0's Dropout and RandomShift draws (a model seeded per rank would drop otherwise than one process)
        model.set_rng_state(*comm.broadcast_object((model.seed, model.rng_state())))
        if model.flat_buffers.size:
            comm.broadcast_(model.flat_buffers)
        if optimizer.state_names:
            for buf in optimizer._state_for(model).values():
                comm.broadcast_(buf)
        if comm.rank != 0:
            callbacks = [c for c in callbacks
                         if not isinstance(c, RANK_ZERO_CALLBACKS) and not getattr(c, "rank_zero_only", False)]
        return callbacks

    def _steps(self, comm):
        """The step unit of this fit, and on CUDA (``cuda_graphs``) the same step replayed from CUDA
        graphs, or None where it runs eagerly (the CPU)."""
        from . import graphs

        step = _Step(self, comm)
        if not (self.cuda_graphs and self.model.backend.name.startswith("cuda")):
            return step, None
        return step, graphs.GraphedStep(step)

    def _train_epoch(self, x, y, shuffle, last_epoch, callbacks, comm, step_of_training, graphed):
        """One epoch (or its rest, after an interruption) of ``step_of_training`` (or its replays
        from CUDA graphs, ``graphed``) over the global batches; None if interrupted again.

        Every rank draws the same permutation (same seed, same RNG state) and
        cuts it into global batches of ``batch_size * size`` rows; rank r
        takes part r of each (``numpy.array_split`` parts, so a short last
        batch still splits). Steps count global batches, so a resume point
        means the same in any world size that keeps the global batch. In one
        process (size 1) the part is the whole batch.
        """
        model, ops, n = self.model, self.model.backend, x.shape[0]
        size, rank, batch = comm.size, comm.rank, self.batch_size * comm.size
        point = self._start_epoch()
        steps = -(-n // batch)
        rows = numpy.minimum(batch, n - numpy.arange(steps) * batch)  # global rows per step
        base, extra = numpy.divmod(rows, size)
        counts = base + (rank < extra)  # this rank's rows per step
        firsts = rank * base + numpy.minimum(rank, extra)  # where they start in the global batch
        index = None  # without a shuffle, one process steps on views of the data set
        if shuffle or size > 1:  # this rank's rows of every global batch, in order, gathered step by step
            order = self.rng.permutation(n) if shuffle else numpy.arange(n)
            if size > 1:
                within, step_of = numpy.arange(n) % batch, numpy.arange(n) // batch
                order = order[(within >= firsts[step_of]) & (within < firsts[step_of] + counts[step_of])]
            index = ops.asarray(order)
        ends = numpy.concatenate([[0], numpy.cumsum(counts)]).tolist()
        rows, firsts = rows.tolist(), firsts.tolist()
        model.train()
        # The sums of a resumed epoch are global: rank 0 carries them, the others start from 0.
        step_of_training.loss_sum.fill(point["loss_sum"] if rank == 0 else 0.0)
        step_of_training.correct_sum.fill(point["correct_sum"] if rank == 0 else 0.0)
        guard = _DivergenceGuard(self, self.nan_check_every or (1 if ops.name == "cpu" else 100))
        progress = _Progress(self.epoch + 1, last_epoch, n, quiet=self.quiet)
        batch_hooks = [c for c in callbacks if type(c).on_batch_end is not Callback.on_batch_end]
        start = time.perf_counter()
        run = graphed or step_of_training
        step = point["step"] - 1  # a run interrupted after its last step resumes with no step to do
        for step in range(point["step"], steps):
            lo, hi = ends[step], ends[step + 1]
            if index is None:
                xs, ys = x[lo:hi], y[lo:hi]
            else:  # into the step's input buffers: no copy of the whole set per epoch, no page faults
                xs, ys = run.inputs(x, y, hi - lo, rows[step], firsts[step])
                ops.take_rows(x, index[lo:hi], xs)
                ops.take_rows(y, index[lo:hi], ys)
            value, _ = run(xs, ys, rows[step], firsts[step], guard, step)
            if batch_hooks:  # on every rank after every step, so that ranks' hooks count the same steps
                self._batch_end(batch_hooks, step, value, graphed)
            stop, interrupted = comm.any_flags(self.stop_training, self.interrupted)
            if interrupted:  # Ctrl-C reaches the ranks at different steps: they stop at the same one
                self.stop_training = self.interrupted = True
                loss_total, correct_total = comm.allreduce_scalars(step_of_training.sums())
                self._resume_point = {"step": step + 1, "rng": point["rng"], "batch_size": batch,
                                      "loss_sum": loss_total, "correct_sum": correct_total}
                return None
            if stop:
                self.stop_training = True
                break
            if progress.enabled:  # rank 0's running mean stands for the global one
                done, scale = min(n, (step + 1) * batch), min(n, (step + 1) * batch) / max(hi, 1)
                progress.update(done, scale, *step_of_training.sums())
        loss_total, correct_total = comm.allreduce_scalars(step_of_training.sums())
        guard.check_total(steps, loss_total)
        ops.synchronize()
        elapsed = time.perf_counter() - start
        seen = min(n, (step + 1) * batch)
        self.epoch += 1
        return dict(zip(EPOCH_LOGS, (self.epoch, loss_total / seen, correct_total / seen, self.optimizer.lr,
                                     (seen - min(n, point["step"] * batch)) / elapsed, elapsed), strict=True))

    def _batch_end(self, hooks, step, value, graphed):
        """The ``on_batch_end`` of ``hooks`` after ``step``, given its loss ``value`` (NaN where this rank had
        no rows of a short last batch; a copy of a replay's, which the next replay overwrites)."""
        model = self.model
        if value is None:
            value = model.backend.xp.full((), numpy.nan, model.dtype)
        elif graphed:
            value = value.copy()
        self._in_batch_hooks = True
        try:
            for callback in hooks:
                callback.on_batch_end(self, step, value)
        finally:
            self._in_batch_hooks = False
        model.train()  # a hook may have put it in eval mode (to predict): the steps train, as replayed ones do

    def _evaluate_distributed(self, x, y, batch_size=None):
        """``_evaluate`` with each rank taking a part of the data set and the sums all-reduced."""
        comm, n = self.communicator, x.shape[0]
        lo, hi = n * comm.rank // comm.size, n * (comm.rank + 1) // comm.size
        part = self._evaluate(x[lo:hi], y[lo:hi], batch_size) if hi > lo else {"loss": 0.0, "accuracy": 0.0}
        loss_total, correct_total = comm.allreduce_scalars([part["loss"] * (hi - lo), part["accuracy"] * (hi - lo)])
        return {"loss": loss_total / n, "accuracy": correct_total / n}

    def evaluate(self, x, y, batch_size=None):
        """Mean loss and accuracy over a data set, in eval mode: ``{"loss", "accuracy"}``, ``batch_size``
        samples at a time (by default ``model.inference_batch``, at least the training batch)."""
        with self._working():
            return self._evaluate(*self.prepare(x, y, "x"), batch_size)

    def _evaluate(self, x, y, batch_size=None):
        model, loss = self.model, self.loss
        ops = model.backend
        batch = model.inference_batch(self.batch_size) if batch_size is None \
            else check_int(batch_size, "evaluate batch_size")
        was_training = model.training
        model.eval()
        loss_sum = ops.zeros((), numpy.float64)
        correct_sum = ops.zeros((), numpy.float64)
        try:
            for begin in range(0, x.shape[0], batch):
                xb, yb = x[begin:begin + batch], y[begin:begin + batch]
                out = model._forward(xb)
                loss_sum += loss._forward(ops, out, yb) * xb.shape[0]
                correct_sum += loss.count_correct(ops, out, yb)
        finally:
            model.train(was_training)
        n = x.shape[0]
        return dict(zip(EVALUATED, (float(loss_sum) / n, float(correct_sum) / n), strict=True))

    # ----- checkpoints ---------------------------------------------------------------
    def put_back_weights(self, params, buffers):
        """Put an earlier epoch's weights (EarlyStopping's best) in the model, keeping the last epoch's:
        the next ``fit``, here or from a checkpoint, goes on from those, as an uninterrupted run would."""
        model = self.model
        if self._last_weights is None:
            self._last_weights = (model.flat_params.copy(), model.flat_buffers.copy())
        model.flat_params[...], model.flat_buffers[...] = params, buffers

    def _take_last_weights(self):
        """Before training on: the last epoch's weights back in the model, as its optimizer state is theirs."""
        if self._last_weights is not None:
            self.model.flat_params[...], self.model.flat_buffers[...] = self._last_weights
            self._last_weights = None

    def _early_stopping_states(self):
        """``(state, best_weights)`` of each EarlyStopping of the last fit, or of a restored checkpoint
        while no fit has run since."""
        if self._fit_callbacks is None:
            return self._restored_early_stopping
        return [c.state() for c in self._fit_callbacks if isinstance(c, EarlyStopping)]

    def _saved_early_stopping(self, callback):
        """The restored ``(state, best_weights)`` that ``callback`` goes on from (the first with its
        monitor and mode, taken once), or None."""
        for index, (state, _) in enumerate(self._restored_early_stopping):
            if (state["monitor"], state["sign"]) == (callback.monitor, callback.sign):
                return self._restored_early_stopping.pop(index)
        return None

    def state(self):
        """What, besides weights and optimizer buffers, a resumed run needs.

        ``batch_size`` is the global batch, the rows of one optimizer step:
        ``batch_size * world_size`` of a distributed run. A run resumed with
        the same global batch continues the same trajectory in any number of
        processes (one process, or ``world_size`` ranks of batch_size each).
        ``samples`` is the size of the last fit's training set, which a run
        resumed mid-epoch must step over again; ``early_stopping`` the state
        of each EarlyStopping (its best weights go in as arrays); ``plan`` what
        ``nnaccel train`` planned (total epochs, validation split, data), which a
        resume and ``nnaccel evaluate`` default to.
        """
        return {"epoch": self.epoch, "seed": self.seed, "batch_size": self.batch_size * self.world_size,
                "world_size": self.world_size, "samples": self._samples,
                "rng": self.rng.bit_generator.state, "history": self.history,
                "loss": losses.saved_name(self.loss), "resume_point": self._resume_point,
                "schedule": optimizers.schedule_config(self.schedule, saving=True),
                "early_stopping": [state for state, _ in self._early_stopping_states()], "plan": self.plan,
                "last_weights": self._last_weights is not None}

    def save_checkpoint(self, path):
        """Write a resumable checkpoint (atomically) to ``path`` (in a distributed run: rank 0 only)."""
        if self._in_batch_hooks:
            raise ConfigError("save_checkpoint cannot write a checkpoint from on_batch_end, in the middle of an "
                              "epoch: it would resume at the epoch's start with these weights; call "
                              "trainer.request_stop() there and save after fit returns (it resumes at that step), "
                              "or save from on_epoch_end")
        if self.rank != 0:
            return
        weights = {f"early_stopping/{index}/{part}": array
                   for index, (_, best) in enumerate(self._early_stopping_states()) if best is not None
                   for part, array in zip(("params", "buffers"), best)}
        if self._last_weights is not None:
            weights.update(zip(("last/params", "last/buffers"), self._last_weights))
        checkpoint.save(path, self.model, self.optimizer, self.state(), weights)

    def load_checkpoint(self, path):
        """Restore weights, optimizer, RNG, epoch and history from ``path``: the saved run goes on, with
        its model seed (Dropout's draws), optimizer settings, schedule and loss in place of this trainer's (as PyTorch's
        ``load_state_dict`` replaces an optimizer's settings; a warning names those that differed).
        Change them after loading to train on differently."""
        return self.restore(*checkpoint.read(path), path)

    def restore(self, meta, arrays, path):
        """``load_checkpoint`` from a checkpoint already ``checkpoint.read``; one refused leaves this
        trainer as it was."""
        checkpoint.check_model(self.model, meta, arrays, path)
        state = meta.get("trainer")
        if state is None:
            raise CheckpointError(f"{path} holds no trainer state; it cannot resume training")
        checkpoint.check_optimizer(self.optimizer, meta, path)
        resume_point = state.get("resume_point")
        saved_batch, batch = int(state.get("batch_size", self.batch_size)), self.batch_size * self.world_size
        if resume_point is not None and saved_batch != batch:
            raise CheckpointError(
                f"{path} stopped in the middle of epoch {int(state['epoch']) + 1} (step {resume_point['step']}) of "
                f"a run with {saved_batch} samples per step, but this run takes {batch} "
                f"({self.batch_size} x {self.world_size} process(es)); resume it with {saved_batch} samples per "
                f"step (batch_size x processes)")
        here = {"optimizer": self.optimizer.config(), "loss": self.loss.name,
                "schedule": optimizers.schedule_config(self.schedule), "model seed": self.model.seed}
        checkpoint.restore_model(self.model, meta, arrays, path)  # checked again (microseconds), then copied
        checkpoint.restore_optimizer(self.optimizer, meta, arrays, path)
        saved = {"optimizer": meta["optimizer"]["config"], "loss": state["loss"], "schedule": state.get("schedule"),
                 "model seed": self.model.seed}  # restore_model set the checkpoint's (Dropout's draws)
        differing = [name for name in saved if here[name] != saved[name]]
        if "schedule" in differing:
            self.schedule = optimizers.schedule_from(saved["schedule"])
        if "loss" in differing:
            self.loss = losses.get(saved["loss"])
        if differing and not self.quiet:
            print(f"warning: {path} goes on as saved, in place of this trainer's "
                  f"{'; '.join(f'{name} {here[name]} (now {saved[name]})' for name in differing)}",
                  file=sys.stderr, flush=True)
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])
        self.rng.bit_generator.state = state["rng"]
        self.history = {k: list(v) for k, v in state["history"].items()}
        self._resume_point = resume_point
        self._samples = state.get("samples")
        self.plan = state.get("plan")
        self._fit_callbacks = None
        dtype = self.model.dtype
        self._last_weights = (tuple(self.model.backend.asarray(arrays[f"last/{part}"].astype(dtype, copy=False))
                                    for part in ("params", "buffers")) if state.get("last_weights") else None)
        self._restored_early_stopping = [
            (kept, None if kept["weights_epoch"] is None else
             tuple(arrays[f"early_stopping/{index}/{part}"] for part in ("params", "buffers")))
            for index, kept in enumerate(state.get("early_stopping", []))]
        return self


class _OneProcess:
    """The communicator of a run in one process: a world of one, every collective the identity."""

    size, rank = 1, 0

    def allreduce_sum_(self, array):
        return array

    def any_flags(self, *flags):
        return [bool(flag) for flag in flags]

    def allreduce_scalars(self, values):
        return [float(value) for value in values]


_ONE_PROCESS = _OneProcess()


class _Step:
    """One training step, the unit every loop runs: forward and loss on this process's part of
    the global batch, backward, the divergence flag, the gradient all-reduce, the optimizer update
    and the device-side metric sums (``loss_sum``, ``correct_sum``; read only when reported).

    A part smaller than the global batch scales its gradient (a mean over the part) by its share,
    so the all-reduced sum is the global batch's mean; a rank whose part of a short last batch is
    empty adds zeros. Random layers draw for the global batch and keep their rows.
    """

    def __init__(self, trainer, comm):
        self.trainer, self.comm = trainer, comm
        self.ops = ops = trainer.model.backend  # the device its sums live on
        self.loss_sum, self.correct_sum = ops.zeros((), numpy.float64), ops.zeros((), numpy.float64)
        self.masks = _GlobalDropoutMasks(trainer.model) if comm.size > 1 else None
        self._inputs = {}

    def inputs(self, x, y, part, rows, first):
        """Buffers to gather the next call's part of ``part`` rows of ``x`` and ``y`` into (``rows`` and
        ``first`` as the call takes them): the leading rows of buffers of the largest part yet."""
        ops = self.trainer.model.backend
        return tuple(ops.leading_rows(self._inputs, name, (part,) + data.shape[1:], data.dtype)
                     for name, data in (("x", x), ("y", y)))

    def __call__(self, x, y, rows=None, first=0, guard=None, step=None, update=True):
        """The step on ``x, y`` (``rows`` in the global batch, this part starting at ``first``);
        the loss as a device scalar (None for an empty part). ``guard`` checks it at ``step``.
        ``update=False`` leaves the optimizer's update to the caller (after a graph's replay)."""
        trainer, model = self.trainer, self.trainer.model
        grads, part = model.flat_grads, x.shape[0]
        rows = part if rows is None else rows
        check = guard is not None and guard.due(step)
        value = correct = None
        if part:
            if self.masks is not None:
                self.masks.select(rows, first)
            if check:
                guard.before_forward()
            value, correct = trainer._loss_step(x, y)
            model._backward(trainer.loss._grad)
            if part != rows:
                grads *= part / rows
            if check:
                guard.flag_if_diverged(value, self.loss_sum, grads)
        else:
            grads.fill(0)
            self.masks.skip()
        self.comm.allreduce_sum_(grads)
        if check:
            guard.after_allreduce(step, grads)
        if update:
            trainer.optimizer.step(model)
        if part:
            self.loss_sum += value * part
            self.correct_sum += correct
        return value, correct

    def sums(self):
        return [self.loss_sum, self.correct_sum]

    def finish(self):
        """Give the random layers their own draws back."""
        if self.masks is not None:
            self.masks.restore()


class TrainingDiverged(NnaccelError):
    """The loss became NaN or inf; the weights are from before it (see ``Trainer.fit``)."""

    def __init__(self, message, epoch, step):
        super().__init__(message)
        self.epoch, self.step = epoch, step


class OutOfMemory(NnaccelError):
    """An allocation failed during training; the message says how much the device holds."""


class _DivergenceGuard:
    """Stops training at the first non-finite loss, before it reaches the weights.

    With ``every == 1`` (the CPU default) each step's loss is checked before
    its update, which costs nothing on the host. On a GPU checking each step
    would synchronise it every step, so the running loss is checked every
    ``every`` steps and the weights and optimizer state are snapshotted
    (device to device) at each check that passes, to return to on failure.
    """

    def __init__(self, trainer, every):
        self.trainer, self.every = trainer, every
        self.snapshot, self.checked_step = None, None
        self.buffers_before = None  # the buffers from before a checked step's forward, while there is no snapshot
        self.local_value = math.nan  # this rank's non-finite loss, which the error names (NaN: another rank's)

    # Every rank must get the same answer: a rank that finds its loss non-finite writes NaN into
    # its gradient buffer, so after the all-reduce every rank reads NaN in the first element and
    # fails at the same step (in one process the all-reduce is the identity).
    def due(self, step):
        """Whether ``step`` is checked (every step on the CPU; each ``every``-th on a GPU)."""
        return self.every == 1 or self.snapshot is None or not step % self.every

    def before_forward(self):
        """Without a snapshot to return to (always with ``every == 1``), keep the buffers the forward pass
        moves (BatchNorm's running statistics): a failing step is then undone whole."""
        buffers = self.trainer.model.flat_buffers
        if self.snapshot is None and buffers.size:
            if self.buffers_before is None:
                self.buffers_before = buffers.copy()
            else:
                self.buffers_before[...] = buffers

    def flag_if_diverged(self, value, loss_sum, grads):
        total = float(value) if self.every == 1 else float(loss_sum + value)
        if not math.isfinite(total):
            self.local_value = total
            grads[:1] = math.nan

    def after_allreduce(self, step, grads):
        if math.isfinite(float(grads[0])):
            if self.every != 1:
                self.take_snapshot(step)
            return
        self._restore()
        self._fail(step, self.local_value, step if self.every == 1 else self.checked_step,
                   all_ranks=True)

    def after_replay(self, step, loss_sum, comm):
        """A step replayed from a CUDA graph has made its update: at the steps due, a finite running
        loss (summed over the ranks of ``comm``, so that they agree) is the new snapshot (the weights
        from before the next step), a non-finite one returns to the last and fails."""
        if not self.due(step):
            return
        total = comm.allreduce_scalars([loss_sum])[0]
        if math.isfinite(total):
            self.take_snapshot(step + 1)
            return
        self._restore()
        self._fail(step, total, self.checked_step, all_ranks=comm.size > 1)

    def check_total(self, step, total):
        """End of a distributed epoch: ``total`` is the all-reduced loss sum, the same on every rank."""
        if self.every != 1 and not math.isfinite(total):
            self._restore()
            self._fail(step, total, self.checked_step, all_ranks=True)

    def arrays(self):
        """The device arrays the guard keeps: its snapshot, the buffers from before a step (None: not yet)."""
        params, buffers, state, _ = self.snapshot or (None, None, {}, None)
        return [params, buffers, *state.values(), self.buffers_before]

    def take_snapshot(self, step):
        model, optimizer = self.trainer.model, self.trainer.optimizer
        self.snapshot = (model.flat_params.copy(), model.flat_buffers.copy(),
                         {k: v.copy() for k, v in optimizer.state.items()},
                         optimizer.steps)
        self.checked_step = step

    def _restore(self):
        if self.snapshot is None:  # the step failed before its update: only its forward moved the buffers
            if self.buffers_before is not None:
                self.trainer.model.flat_buffers[...] = self.buffers_before
            return
        params, buffers, state, steps = self.snapshot
        self.trainer.model.flat_params[...] = params
        self.trainer.model.flat_buffers[...] = buffers
        for name, buf in state.items():
            self.trainer.optimizer.state[name][...] = buf
        self.trainer.optimizer.steps = steps

    def _fail(self, step, value, good_step, all_ranks=False):
        epoch = self.trainer.epoch + 1
        kept = ("the weights from before that step" if good_step == step else
                f"the weights from before step {good_step + 1}, the last check" if good_step is not None else
                "the weights from the start of the epoch")
        error = TrainingDiverged(f"loss became {value} at epoch {epoch}, step {step + 1}; training stopped "
                                 f"and kept {kept} (try a lower learning rate)", epoch, step + 1)
        error.all_ranks = all_ranks  # a distributed run: every rank raises it at the same step
        raise error


class _GlobalDropoutMasks:
    """Gives each rank's random layers (Dropout, RandomShift) their rows of the global batch's draws.

    Their draws are a pure function of (seed, counter, element index): a
    rank draws for the whole global batch and keeps its own rows, so a
    distributed run drops and shifts exactly what one process on the global
    batch would (and the ranks' draws differ). It costs the draws of the
    global batch on every rank, which is small next to the weighted sums.
    """

    def __init__(self, model):
        self.layers = [layer for layer in model.layers if isinstance(layer, RandomLayer)]
        self.originals = [layer.ops for layer in self.layers]
        self.rows = self.first = 0
        for layer, ops in zip(self.layers, self.originals):
            layer.ops = _RowsOfMask(ops, self)

    def select(self, rows, first):
        self.rows, self.first = rows, first

    def skip(self):
        """A rank with no rows this step still advances the counters, as the others draw."""
        for layer in self.layers:
            if layer.draws:
                layer.counter += 1

    def restore(self):
        for layer, ops in zip(self.layers, self.originals):
            layer.ops = ops


class _RowsOfMask:
    """A backend whose random draws (``dropout_mask``, ``random_shifts``) are this rank's rows of the
    global batch's."""

    def __init__(self, ops, masks):
        self._ops, self._masks = ops, masks

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def dropout_mask(self, shape, rate, seed, counter, dtype):
        masks = self._masks
        full = self._ops.dropout_mask((masks.rows,) + tuple(shape[1:]), rate, seed, counter, dtype)
        return full[masks.first:masks.first + shape[0]]

    def random_shifts(self, batch, max_shift, seed, counter):
        masks = self._masks
        return self._ops.random_shifts(masks.rows, max_shift, seed, counter)[masks.first:masks.first + batch]


def _callback_list(callbacks, what):
    """``callbacks`` as a list of Callback objects (one Callback alone is a list of one), or a ConfigError
    naming the entry that is not one."""
    if isinstance(callbacks, Callback):
        return [callbacks]
    if isinstance(callbacks, (str, bytes)) or not hasattr(callbacks, "__iter__"):
        raise ConfigError(f"{what} must be a list of callbacks, got {described(callbacks)}")
    callbacks = list(callbacks)
    for index, callback in enumerate(callbacks):
        if not isinstance(callback, Callback):
            raise ConfigError(f"{what}[{index}] is {described(callback)}, not an nnaccel Callback "
                              f"(a subclass of nn.Callback)")
    return callbacks


def _epoch_line(logs, last_epoch):
    parts = [f"epoch {logs['epoch']}/{last_epoch}"]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        if key in logs:
            parts.append(f"{key} {logs[key]:.4f}")
    parts.append(f"{logs['samples_per_s']:,.0f} samples/s")
    return "  ".join(parts)


class _Progress:
    """A one-line progress bar on a terminal, refreshed at most 4 times a second.

    Reading the running sums synchronises a GPU, so it happens only on refresh.
    """

    def __init__(self, epoch, last_epoch, total, quiet=False, width=24):
        self.enabled = not quiet and sys.stderr is not None and sys.stderr.isatty()  # (None: closed)
        self.epoch, self.last_epoch, self.total, self.width = epoch, last_epoch, total, width
        self.start = self.shown = time.perf_counter()

    def update(self, done, scale, loss_sum, correct_sum):
        """Show ``done`` samples of the epoch, with the running sums (device scalars) times ``scale``."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.shown < 0.25 and done < self.total:
            return
        self.shown = now
        filled = self.width * done // self.total
        bar = "=" * filled + ">" * (filled < self.width) + " " * (self.width - filled - 1)
        rate = done / max(now - self.start, 1e-9)
        line = (f"\repoch {self.epoch}/{self.last_epoch} [{bar}] {done}/{self.total}  "
                f"loss {float(loss_sum) * scale / done:.4f}  accuracy {float(correct_sum) * scale / done:.4f}  "
                f"{rate:,.0f} samples/s")
        end = "\r\033[K" if done >= self.total else ""
        print(line + end, end="", file=sys.stderr, flush=True)

