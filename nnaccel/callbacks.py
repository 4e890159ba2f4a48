"""Callbacks for ``Trainer.fit``: early stopping, checkpoints, CSV log, plots.

Stopping on a NaN loss is built into the Trainer (it must act before the update).
"""

import csv
import io
import math
from pathlib import Path

from .checkpoint import atomic_write
from .errors import ConfigError, OutputError, check_int, check_number


class Callback:
    """Hooks called by ``Trainer.fit``; override the ones you need."""

    def on_train_begin(self, trainer):
        pass

    def on_batch_end(self, trainer, step, loss):
        """After every step, with the loss as a device array (reading it synchronises a GPU)."""

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
        # Keras takes a negative min_delta as its size
        self.min_delta = check_number(abs(min_delta) if isinstance(min_delta, (int, float)) else min_delta,
                                      "min_delta", allow_zero=True)
        self.best = math.inf

    def improved(self, logs):
        if self.monitor not in logs:
            raise ConfigError(f"cannot monitor {self.monitor!r}: the logs have {', '.join(logs)} "
                              f"(val_* metrics need validation_data)")
        value = self.sign * logs[self.monitor]
        if value < self.best - self.min_delta:
            self.best = value
            return True
        return False


class EarlyStopping(Callback, _Monitor):
    """Stop when ``monitor`` has not improved for ``patience`` epochs.

    With ``restore_best_weights`` (the default here, unlike Keras) the model
    ends with the weights of its best epoch, whether it stopped early or ran
    all its epochs; not after an interruption (its checkpoint must match the
    optimizer state) nor an error (TrainingDiverged keeps the weights it names).
    """

    def __init__(self, monitor="val_loss", patience=5, min_delta=0.0, mode="auto", restore_best_weights=True):
        _Monitor.__init__(self, monitor, mode, min_delta)
        self.patience = check_int(patience, "patience")
        self.restore_best_weights = restore_best_weights

    def on_train_begin(self, trainer):
        self.best, self.wait, self.best_weights, self.best_epoch = math.inf, 0, None, None

    def on_epoch_end(self, trainer, logs):
        if self.improved(logs):
            self.wait, self.best_epoch = 0, logs["epoch"]
            if self.restore_best_weights:
                self.best_weights = (trainer.model.flat_params.copy(), trainer.model.flat_buffers.copy())
            return
        self.wait += 1
        if self.wait >= self.patience:
            trainer.stop_training = True

    def on_train_end(self, trainer):
        if (self.best_weights is not None and self.best_epoch != trainer.epoch and trainer._fit_finished
                and not trainer.interrupted):
            trainer.model.flat_params[...], trainer.model.flat_buffers[...] = self.best_weights


class ModelCheckpoint(Callback, _Monitor):
    """Write a resumable checkpoint after every epoch, or only when ``monitor`` improves.

    ``path`` may contain ``{epoch}`` to keep one file per epoch (``{{`` and ``}}`` for braces).
    """

    def __init__(self, path, monitor="val_loss", save_best_only=False, mode="auto"):
        _Monitor.__init__(self, monitor, mode, 0.0)
        self.path = str(path)
        try:
            self.path.format(epoch=1)
        except (IndexError, KeyError, ValueError, TypeError, AttributeError) as error:  # {}, {a}, {epoch[0]}...
            raise ConfigError(f"ModelCheckpoint path {self.path!r} is not a template of {{epoch}} only "
                              f"({type(error).__name__}: {error}); write {{{{ and }}}} for braces") from None
        self.save_best_only = save_best_only

    def on_epoch_end(self, trainer, logs):
        if not self.save_best_only or self.improved(logs):
            trainer.save_checkpoint(self.path.format(epoch=logs["epoch"]))


class CSVLogger(Callback):
    """Append one row of metrics per epoch to a CSV file.

    With ``append`` an existing file keeps its columns; a metric it lacks (``val_loss`` in a
    later fit with validation data) widens the header, the file rewritten atomically with
    empty cells in the rows before.
    """

    def __init__(self, path, append=False):
        self.path = Path(path)
        self.append = append

    def on_train_begin(self, trainer):
        if not self.append and self.path.exists():
            self.path.unlink()

    def on_epoch_end(self, trainer, logs):
        columns = self._columns()
        added = [key for key in logs if key not in columns]
        try:
            if columns and added:
                self._rewrite(columns + added, logs)
                return
            with open(self.path, "a", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                if not columns:
                    writer.writerow(list(logs))
                writer.writerow([logs.get(column, "") for column in columns or logs])
        except OSError as error:
            raise OutputError(f"cannot write the CSV log {self.path}: {error.strerror or error}") from None

    def _columns(self):
        """The header of the file there, or [] when there is none."""
        try:
            with open(self.path, newline="", encoding="utf-8") as handle:
                return next(csv.reader(handle), [])
        except FileNotFoundError:
            return []
        except OSError as error:
            raise OutputError(f"cannot read the CSV log {self.path}: {error.strerror or error}") from None

    def _rewrite(self, columns, logs):
        """The file under the wider header ``columns``, its rows given empty cells in the new ones, then
        ``logs``: written atomically, so a failure leaves the old file."""
        with open(self.path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))[1:]
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
