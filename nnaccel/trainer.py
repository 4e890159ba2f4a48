"""The training loop: mini-batches, epochs, metrics, callbacks, checkpoints.

The whole training set goes to the device once; each epoch gathers it in a
seeded shuffled order there and slices batches from it. Loss and accuracy
are summed on the device and read only when reported, so a GPU is never
made to wait on the host inside an epoch.
"""

import math
import sys
import time

import numpy

from . import checkpoint, losses, optimizers
from .callbacks import Callback
from .backend import array_device
from .errors import CheckpointError, ConfigError, NnaccelError, ShapeError


class Trainer:
    """Trains a Sequential model with a loss and an optimizer.

    ``fit(..., epochs=N)`` trains N more epochs; the epoch count, the
    shuffle RNG, the optimizer state and the schedule position carry over
    between calls and through checkpoints.
    """

    def __init__(self, model, loss=None, optimizer=None, batch_size=32, seed=0, schedule=None,
                 callbacks=(), quiet=False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, numpy.integer)) or batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = model
        self.loss = losses.get(loss)
        self.optimizer = optimizers.get(optimizer)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rng = numpy.random.default_rng(self.seed)
        self.schedule = schedule
        self.callbacks = list(callbacks)
        self.quiet = quiet
        self.epoch = 0
        self.history = {}
        self.stop_training = self.interrupted = False
        self.nan_check_every = None  # steps between finiteness checks; None: 1 on CPU, 100 on GPU
        self._resume_point = None

    # ----- data --------------------------------------------------------------------
    def prepare(self, x, y, what="x"):
        """Validate a data set once and move it to the model's device.

        Integer and float16 inputs are converted to the model's float type
        (exactly, for the usual 8- and 16-bit pixel types); float64 inputs
        are rounded to float32 like Keras does. NaN or inf in the inputs,
        labels out of range, and lengths that disagree are refused here, so
        the training loop itself needs no checks.
        """
        model, ops = self.model, self.model.backend
        label_what = "y" if what == "x" else f"{what} labels"
        if array_device(x) is None or array_device(y) is None:
            x, y = numpy.asarray(x), numpy.asarray(y)
        x = ops.asarray(x, what=what)
        y = ops.asarray(y, what=label_what)
        if x.ndim != 2 or x.shape[1] != model.in_features:
            raise ShapeError(f"{what} has shape {tuple(x.shape)} but the first layer expects "
                             f"(samples, {model.in_features})")
        if x.shape[0] == 0:
            raise ShapeError(f"{what} is empty: no samples to train or evaluate on")
        if y.shape[0] != x.shape[0]:
            raise ShapeError(f"{label_what} has {y.shape[0]} entries but {what} has {x.shape[0]} samples")
        if x.dtype.kind not in "fiub":
            raise ShapeError(f"{what} has dtype {x.dtype}; expected a float array")
        if x.dtype != model.dtype:
            x = x.astype(model.dtype)
        if not bool(ops.xp.isfinite(x).all()):
            raise ShapeError(f"{what} contains NaN or inf values")
        if self.loss.integer_targets:
            losses.check_labels(ops.to_host(y), model.out_features, label_what)
        elif y.dtype.kind == "f" and not bool(ops.xp.isfinite(y).all()):
            raise ShapeError(f"{label_what} contains NaN or inf values")
        if y.dtype.kind == "f" and y.dtype != model.dtype:
            y = y.astype(model.dtype)
        return x, y

    # ----- training ------------------------------------------------------------------
    def train_step(self, x, y):
        """One forward, backward and update on a prepared batch; ``(loss, correct)`` on the device."""
        value, correct = self._loss_step(x, y)
        self._update_step()
        return value, correct

    def _loss_step(self, x, y):
        model, loss = self.model, self.loss
        out = model._forward(x)
        value = loss._forward(model.backend, out, loss.prepare(model.backend, out, y))
        return value, loss.count_correct(out, y)

    def _update_step(self):
        self.model._backward(self.loss._grad)
        self.optimizer.step(self.model)

    def request_stop(self):
        """Stop after the current step and remember where, so training can resume there (Ctrl-C)."""
        self.stop_training = True
        self.interrupted = True

    def fit(self, x, y, epochs=1, validation_data=None, callbacks=(), shuffle=True):
        """Train ``epochs`` more epochs; returns the history (a dict of per-epoch lists).

        A run stopped by ``request_stop`` mid-epoch returns early; its
        checkpoint resumes at the same step. A non-finite loss raises
        TrainingDiverged before its update reaches the weights.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, (int, numpy.integer)) or epochs < 0:
            raise ConfigError(f"epochs must be a non-negative integer, got {epochs!r}")
        x, y = self.prepare(x, y, "x")
        if validation_data is not None:
            validation_data = self.prepare(*validation_data, what="validation x")
        callbacks = self.callbacks + list(callbacks)
        self.stop_training = self.interrupted = False
        last_epoch = self.epoch + epochs
        for callback in callbacks:
            callback.on_train_begin(self)
        try:
            while self.epoch < last_epoch and not self.stop_training:
                logs = self._train_epoch(x, y, shuffle, last_epoch, callbacks)
                if logs is None:  # interrupted mid-epoch
                    break
                if validation_data is not None:
                    logs.update({f"val_{k}": v for k, v in self._evaluate(*validation_data).items()})
                for key, value in logs.items():
                    self.history.setdefault(key, []).append(value)
                if not self.quiet:
                    print(_epoch_line(logs, last_epoch), file=sys.stderr, flush=True)
                for callback in callbacks:
                    callback.on_epoch_end(self, logs)
        except MemoryError as error:
            raise OutOfMemory(self.model.backend.memory_report(error, self.batch_size)) from None
        finally:
            self.model.eval()
            for callback in callbacks:
                callback.on_train_end(self)
        return self.history

    def _train_epoch(self, x, y, shuffle, last_epoch, callbacks):
        """One epoch (or its rest, after an interruption); None if interrupted again."""
        model, ops, n, batch = self.model, self.model.backend, x.shape[0], self.batch_size
        point = self._resume_point or {"step": 0, "rng": self.rng.bit_generator.state,
                                       "loss_sum": 0.0, "correct_sum": 0.0}
        self._resume_point = None
        self.rng.bit_generator.state = point["rng"]
        if self.schedule is not None:
            self.optimizer.lr = self.schedule.lr_at(self.epoch, self.optimizer.base_lr)
        if shuffle:
            order = ops.asarray(self.rng.permutation(n))
            x, y = x[order], y[order]
        model.train()
        loss_sum = ops.asarray(numpy.float64(point["loss_sum"]))
        correct_sum = ops.asarray(numpy.float64(point["correct_sum"]))
        guard = _DivergenceGuard(self, self.nan_check_every or (1 if ops.name == "cpu" else 100))
        progress = _Progress(self.epoch + 1, last_epoch, n, quiet=self.quiet)
        batch_hooks = [c for c in callbacks if type(c).on_batch_end is not Callback.on_batch_end]
        start = time.perf_counter()
        steps = -(-n // batch)
        for step in range(point["step"], steps):
            xb, yb = x[step * batch:(step + 1) * batch], y[step * batch:(step + 1) * batch]
            value, correct = self._loss_step(xb, yb)
            guard.before_update(step, value, loss_sum)
            self._update_step()
            loss_sum += value * xb.shape[0]
            correct_sum += correct
            for callback in batch_hooks:
                callback.on_batch_end(self, step, value)
            if self.interrupted:
                self._resume_point = {"step": step + 1, "rng": point["rng"],
                                      "loss_sum": float(loss_sum), "correct_sum": float(correct_sum)}
                return None
            if self.stop_training:
                break
            progress.update(min(n, (step + 1) * batch), loss_sum, correct_sum)
        guard.before_update(steps, None, loss_sum)
        ops.synchronize()
        elapsed = time.perf_counter() - start
        seen = min(n, (step + 1) * batch)
        self.epoch += 1
        return {"epoch": self.epoch, "loss": float(loss_sum) / seen, "accuracy": float(correct_sum) / seen,
                "lr": self.optimizer.lr, "samples_per_s": (seen - point["step"] * batch) / elapsed,
                "time_s": elapsed}

    def evaluate(self, x, y, batch_size=None):
        """Mean loss and accuracy over a data set, in eval mode: ``{"loss", "accuracy"}``."""
        return self._evaluate(*self.prepare(x, y, "x"), batch_size)

    def _evaluate(self, x, y, batch_size=None):
        model, loss = self.model, self.loss
        ops = model.backend
        batch = batch_size or max(self.batch_size, 1024)
        was_training = model.training
        model.eval()
        loss_sum = ops.zeros((), numpy.float64)
        correct_sum = ops.zeros((), numpy.float64)
        try:
            for begin in range(0, x.shape[0], batch):
                xb, yb = x[begin:begin + batch], y[begin:begin + batch]
                out = model._forward(xb)
                loss_sum += loss._forward(ops, out, loss.prepare(ops, out, yb)) * xb.shape[0]
                correct_sum += loss.count_correct(out, yb)
        finally:
            model.train(was_training)
        n = x.shape[0]
        return {"loss": float(loss_sum) / n, "accuracy": float(correct_sum) / n}

    # ----- checkpoints ---------------------------------------------------------------
    def state(self):
        """What, besides weights and optimizer buffers, a resumed run needs."""
        return {"epoch": self.epoch, "seed": self.seed, "batch_size": self.batch_size,
                "rng": self.rng.bit_generator.state, "history": self.history,
                "loss": self.loss.name, "resume_point": self._resume_point}

    def save_checkpoint(self, path):
        """Write a resumable checkpoint (atomically) to ``path``."""
        checkpoint.save(path, self.model, self.optimizer, self.state())

    def load_checkpoint(self, path):
        """Restore weights, optimizer, RNG, epoch and history from ``path``."""
        meta, arrays = checkpoint.read(path)
        checkpoint.restore_model(self.model, meta, arrays, path)
        checkpoint.restore_optimizer(self.optimizer, meta, arrays, path)
        state = meta.get("trainer")
        if state is None:
            raise CheckpointError(f"{path} holds no trainer state; it cannot resume training")
        self.epoch = int(state["epoch"])
        self.rng.bit_generator.state = state["rng"]
        self.history = {k: list(v) for k, v in state["history"].items()}
        self._resume_point = state.get("resume_point")
        return self


class TrainingDiverged(NnaccelError):
    """The loss became NaN or inf; the update of that step was not applied."""

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

    def before_update(self, step, value, loss_sum):
        if self.every == 1:
            if value is not None and not math.isfinite(float(value)):
                self._fail(step, float(value), step)
            return
        if self.snapshot is not None and step % self.every and value is not None:
            return
        total = float(loss_sum if value is None else loss_sum + value)
        if math.isfinite(total):
            self._take_snapshot(step)
            return
        self._restore()
        self._fail(step, total, self.checked_step)

    def _take_snapshot(self, step):
        model, optimizer = self.trainer.model, self.trainer.optimizer
        self.snapshot = (model.flat_params.copy(), {k: v.copy() for k, v in optimizer.state.items()},
                         optimizer.steps)
        self.checked_step = step

    def _restore(self):
        if self.snapshot is None:
            return
        params, state, steps = self.snapshot
        self.trainer.model.flat_params[...] = params
        for name, buf in state.items():
            self.trainer.optimizer.state[name][...] = buf
        self.trainer.optimizer.steps = steps

    def _fail(self, step, value, good_step):
        epoch = self.trainer.epoch + 1
        kept = (f"the weights from before that step" if good_step == step else
                f"the weights from before step {good_step + 1}, the last check" if good_step is not None else
                "the weights from the start of the epoch")
        raise TrainingDiverged(f"loss became {value} at epoch {epoch}, step {step + 1}; training stopped "
                               f"and kept {kept} (try a lower learning rate)", epoch, step + 1)


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
        self.enabled = not quiet and sys.stderr.isatty()
        self.epoch, self.last_epoch, self.total, self.width = epoch, last_epoch, total, width
        self.start = self.shown = time.perf_counter()

    def update(self, done, loss_sum, correct_sum):
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
                f"loss {float(loss_sum) / done:.4f}  accuracy {float(correct_sum) / done:.4f}  "
                f"{rate:,.0f} samples/s")
        end = "\r\033[K" if done >= self.total else ""
        print(line + end, end="", file=sys.stderr, flush=True)
