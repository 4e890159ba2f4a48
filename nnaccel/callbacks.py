"""Callbacks for ``Trainer.fit``: early stopping, checkpoints, CSV log, plots.

Stopping on a NaN loss is built into the Trainer (it must act before the update).
"""

import contextlib
import csv
import io
import itertools
import math
import os
import sys
from pathlib import Path

from .checkpoint import atomic_write, check_writable
from .errors import ConfigError, OutputError, check_flag, check_int, check_range


class Callback:
    """Hooks called by ``Trainer.fit``; override the ones you need."""

    def on_train_begin(self, trainer):
        pass

    def on_batch_end(self, trainer, step, loss):
        """After every step, with the loss as a device array (reading it synchronises a GPU); in a
        distributed fit on every rank, with that rank's loss (NaN where a short last batch left it no rows)."""

    def on_epoch_end(self, trainer, logs):
        pass

    def on_train_end(self, trainer):
        pass


class _Monitor:
    """Tracks the best value of a logged metric (lower is better for losses)."""

    def __init__(self, monitor, mode, min_delta):
        if mode not in ("auto", "min", "max"):
            raise ConfigError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        if not isinstance(monitor, str):
            raise ConfigError(f"monitor must name a logged metric such as 'val_loss', got {monitor!r}")
        self.monitor = monitor
        self.sign = -1.0 if mode == "max" or (mode == "auto" and "acc" in monitor) else 1.0
        self.min_delta = abs(check_range(min_delta, "min_delta"))  # Keras takes a negative one as its size
        self.best = math.inf

    def watching(self):
        """Whether it reads ``monitor`` from the logs at all."""
        return True

    def improved(self, logs):
        if self.monitor not in logs:
            raise ConfigError(f"cannot monitor {self.monitor!r}: the logs have {', '.join(logs)} "
                              f"(val_* metrics need validation_data)")
        value = self.sign * logs[self.monitor]
        if value < self.best - self.min_delta:
            self.best = value
            return True
        return False


def check_monitors(callbacks, logged, unvalidated):
    """A ConfigError before training, not after its first epoch, for a callback watching a metric that the
    fit's epochs do not log (``logged``): a val_* one that they would log with validation data (``unvalidated``,
    given a fit without), or a misspelt one. Only a callback of one's own with an ``on_epoch_end`` may add a
    metric to the logs, as in Keras: the callbacks after it are not refused a metric not in ``logged``."""
    only_logged = True
    for callback in callbacks:
        only_logged = only_logged and getattr(type(callback).on_epoch_end, "__module__", None) == __name__
        if not isinstance(callback, _Monitor) or not callback.watching() or callback.monitor in logged:
            continue
        name, monitor = type(callback).__name__, callback.monitor
        if monitor in unvalidated:
            raise ConfigError(f"{name} monitors {monitor!r}, but fit has no validation_data: give "
                              f"validation_data=(x, y), or monitor {monitor[len('val_'):]!r}")
        if only_logged:
            with_validation = f" (and {', '.join(unvalidated)} with validation_data)" if unvalidated else ""
            raise ConfigError(f"{name} monitors {monitor!r}, which this fit does not log: its epochs log "
                              f"{', '.join(logged)}{with_validation}")


class EarlyStopping(Callback, _Monitor):
    """Stop when ``monitor`` has not improved for ``patience`` epochs (0, Keras's default, stops at the first
    epoch that does not improve, as 1 does).

    With ``restore_best_weights`` (the default here, unlike Keras) the model
    ends with the weights of its best epoch, whether it stopped early or ran
    all its epochs; not after an interruption (its checkpoint must match the
    optimizer state) nor an error (TrainingDiverged keeps the weights it names).

    A checkpoint keeps what it needs to go on (``state``): the first fit
    after ``Trainer.restore`` counts its patience and its best epoch on from
    the saved run's, as an uninterrupted run would; so does the next fit
    after one stopped by ``request_stop``. Any other next fit starts afresh,
    as Keras's does (a second phase of training, on other data or rates).
    """

    def __init__(self, monitor="val_loss", patience=5, min_delta=0.0, mode="auto", restore_best_weights=True):
        _Monitor.__init__(self, monitor, mode, min_delta)
        self.patience = check_int(patience, "patience", minimum=0)  # 0 stops where 1 does, as in Keras
        self.restore_best_weights = check_flag(restore_best_weights, "restore_best_weights")

    def on_train_begin(self, trainer):
        self.best, self.wait, self.best_weights, self.best_epoch = math.inf, 0, None, None
        self.since = trainer.epoch  # it watches the epochs after this one
        saved = trainer._saved_early_stopping(self)
        if saved is not None:
            self._resume(trainer, *saved)

    def on_epoch_end(self, trainer, logs):
        if self._count(logs):
            if self.restore_best_weights:
                self.best_weights = (trainer.model.flat_params.copy(), trainer.model.flat_buffers.copy())
        elif self.wait >= self.patience:
            trainer.stop_training = True
            _say(trainer, f"early stopping after epoch {logs['epoch']}: {self._why_stopped()}")

    def _why_stopped(self):
        since = (f" since epoch {self.best_epoch}" if self.best_epoch is not None else
                 f": no epoch had a finite {self.monitor}")
        return (f"{self.monitor} has not improved for {self.wait} epoch{'s' * (self.wait != 1)}{since} "
                f"(patience {self.patience})")

    def _count(self, logs):
        """Whether ``logs``' epoch is the best yet; if not, one more epoch of waiting."""
        if self.improved(logs):
            self.wait, self.best_epoch = 0, logs["epoch"]
            return True
        self.wait += 1
        return False

    def state(self):
        """``(state, best_weights)`` for a checkpoint: the epoch it began watching after (its best
        and its wait follow from the trainer's history, which holds every epoch it saw) and the best
        weights with the epoch they are from (None when it keeps none)."""
        kept = self.best_weights is not None
        return ({"monitor": self.monitor, "sign": self.sign, "since": self.since,
                 "weights_epoch": self.best_epoch if kept else None}, self.best_weights)

    def _resume(self, trainer, state, weights):
        """Go on from a restored checkpoint's ``state``: count the epochs it watched again from the
        history, and take the best weights from the checkpoint, or from the model when its last epoch
        is the best (a checkpoint written before this callback saw that epoch holds older ones)."""
        since, values = state["since"], trainer.history.get(self.monitor, [])
        watched = trainer.epoch - since
        if not 0 <= watched <= len(values) or any(math.isnan(v) for v in values[len(values) - watched:]):
            _say(trainer, f"warning: the checkpoint's history lacks {self.monitor!r} for the epochs after {since}; "
                          f"EarlyStopping counts its patience from epoch {trainer.epoch + 1}")
            return
        self.since = since
        for epoch, value in zip(range(since + 1, trainer.epoch + 1), values[len(values) - watched:]):
            self._count({"epoch": epoch, self.monitor: value})
        if self.wait and self.wait >= self.patience and trainer._resume_point is None:  # it had stopped the run
            trainer.stop_training = True
            _say(trainer, f"early stopping: {self._why_stopped()}; the resumed run stops before training")
        if not self.restore_best_weights or self.best_epoch is None:
            return
        ops = trainer.model.backend
        if weights is not None and state["weights_epoch"] == self.best_epoch:
            self.best_weights = tuple(ops.asarray(w.astype(trainer.model.dtype, copy=False)) for w in weights)
        elif self.best_epoch == trainer.epoch and trainer._resume_point is None:
            self.best_weights = (trainer.model.flat_params.copy(), trainer.model.flat_buffers.copy())
        else:
            _say(trainer, f"warning: the checkpoint holds no weights of the best epoch ({self.best_epoch}); "
                          f"EarlyStopping can end the run only with a later epoch's")

    def on_train_end(self, trainer):
        if (self.best_weights is not None and self.best_epoch != trainer.epoch and trainer._fit_finished
                and not trainer.interrupted):
            trainer.put_back_weights(*self.best_weights)
            _say(trainer, f"early stopping: the model has the weights of epoch {self.best_epoch}, the best "
                          f"{self.monitor}")


def _say(trainer, message):
    if not trainer.quiet:
        print(message, file=sys.stderr, flush=True)


class ModelCheckpoint(Callback, _Monitor):
    """Write a resumable checkpoint after every epoch, or only when ``monitor`` improves.

    ``path`` may contain ``{epoch}`` to keep one file per epoch (``{{`` and ``}}`` for braces).
    ``save_best_only`` compares with every epoch of the run, those in a restored checkpoint's history
    too, so a resumed run never writes a worse epoch over the best one's file.
    """

    def __init__(self, path, monitor="val_loss", save_best_only=False, mode="auto"):
        _Monitor.__init__(self, monitor, mode, 0.0)
        self.path = str(path)
        try:
            self.path.format(epoch=1)
        except (IndexError, KeyError, ValueError, TypeError, AttributeError) as error:  # {}, {a}, {epoch[0]}...
            raise ConfigError(f"ModelCheckpoint path {self.path!r} is not a template of {{epoch}} only "
                              f"({type(error).__name__}: {error}); write {{{{ and }}}} for braces") from None
        self.save_best_only = check_flag(save_best_only, "save_best_only")

    def watching(self):
        return self.save_best_only

    def check_path(self, epoch):
        """An OutputError, before training, where the file of ``epoch`` could not be written: its folder is
        missing or read-only, or the path names a folder or a device."""
        check_writable(self.path.format(epoch=epoch), "ModelCheckpoint path")

    def on_train_begin(self, trainer):
        self.best = min((self.sign * value for value in trainer.history.get(self.monitor, [])
                         if not math.isnan(value)), default=math.inf)

    def on_epoch_end(self, trainer, logs):
        if not self.save_best_only or self.improved(logs):
            trainer.save_checkpoint(self.path.format(epoch=logs["epoch"]))


class CSVLogger(Callback):
    """Append one row of metrics per epoch to a CSV file.

    With ``append`` an existing file keeps its columns; a metric it lacks (``val_loss`` in a
    later fit with validation data) widens the header, the file rewritten atomically with
    empty cells in the rows before. Without, a file there is replaced (as Keras's is) when the
    first epoch ends: a fit that ends before (stopped, or an error) leaves it as it was.
    """

    def __init__(self, path, append=False):
        self.path = Path(path)
        self.append = check_flag(append, "append")
        self._replacing = False

    def on_train_begin(self, trainer):
        self._replacing = not self.append
        if self.append:
            self._rows()  # a file it could not append to is refused before the first epoch

    def on_epoch_end(self, trainer, logs):
        header, *rows = [[]] if self._replacing else self._rows() or [[]]
        added = [key for key in logs if key not in header]
        try:
            if self._replacing or (header and added):
                self._rewrite(header + added, rows, logs)
                self._replacing = False
                return
            text = io.StringIO(newline="")
            writer = csv.writer(text)
            if not header:
                writer.writerow(list(logs))
            writer.writerow([logs.get(column, "") for column in header or logs])
            self._append(text.getvalue().encode("utf-8"))
        except OSError as error:
            raise OutputError(f"cannot write the CSV log {self.path}: {error.strerror or error}") from None

    def _append(self, data):
        """``data`` at the end of the file, or none of it when a write fails (a full disk): a row cut short
        would be read back, and appended to, as a row of the log."""
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            if start and os.pread(fd, 1, start - 1) != b"\n":  # a last line without its end (an editor's)
                data = b"\r\n" + data
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except OSError:
                with contextlib.suppress(OSError):  # the write's error is the one to report
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)

    def _rows(self):
        """The rows of the file there, its header first, or [] when there is none (a log is small). A
        spreadsheet's byte-order mark is not part of the first column's name, nor blank lines before the
        header a log without one."""
        try:
            with open(self.path, newline="", encoding="utf-8-sig") as handle:
                rows = list(csv.reader(handle))
            return list(itertools.dropwhile(lambda row: not row, rows))
        except FileNotFoundError:
            return []
        except OSError as error:
            raise OutputError(f"cannot read the CSV log {self.path}: {error.strerror or error}") from None
        except (UnicodeDecodeError, csv.Error) as error:
            raise OutputError(f"the CSV log {self.path} is not a UTF-8 CSV file to append to "
                              f"({type(error).__name__}: {error}); give another file or remove it") from None

    def _rewrite(self, columns, rows, logs):
        """The file under the wider header ``columns``, its ``rows`` given empty cells in the new ones,
        then ``logs``: written atomically, so a failure leaves the old file."""
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(columns)
        writer.writerows(row + [""] * (len(columns) - len(row)) for row in rows)
        writer.writerow([logs.get(column, "") for column in columns])
        atomic_write(self.path, lambda handle: handle.write(text.getvalue().encode("utf-8")))


class PlotCurves(Callback):
    """Draw loss and accuracy per epoch (training and validation) to a PNG."""

    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer):
        from .plotting import plot_history

        plot_history(trainer.history, self.path)
