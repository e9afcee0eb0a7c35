"""Callbacks for ``Sequential.fit`` (Keras-style hooks).

A callback sees the model (``self.model``) and per-epoch ``logs`` ({"loss": ...,
"accuracy": ..., "val_loss": ...}). Setting ``self.model.stop_training = True`` ends
training after the current epoch; ``self.model.stop_reason`` says why.
"""
import csv
import math
import os

import numpy as np

from ._validation import check_bool, check_float, check_int


class Callback:
    """Base class: override any of the hooks."""

    model = None

    def set_model(self, model):
        self.model = model

    def on_train_begin(self, logs=None):
        pass

    def on_epoch_begin(self, epoch, logs=None):
        pass

    def on_batch_end(self, batch, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_train_end(self, logs=None):
        pass


def _monitored(logs, monitor, who):
    if monitor not in logs:
        raise ValueError(f"{who} monitors {monitor!r}, which is not among the logged values "
                         f"{sorted(logs)}; pass validation data for 'val_*' or change monitor")
    return logs[monitor]


class _Monitor(Callback):
    """Shared 'is this epoch better than the best so far' logic."""

    def __init__(self, monitor, mode, min_delta):
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be a str, got {type(monitor).__name__}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        self.monitor = monitor
        if mode == "auto":
            mode = "max" if any(s in monitor for s in ("accuracy", "r2")) else "min"
        self.mode = mode
        self.min_delta = check_float(min_delta, "min_delta", low=0.0)
        self.best = None

    def _is_improvement(self, value):
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


class EarlyStopping(_Monitor):
    """Stop after ``patience`` consecutive epochs in which ``monitor`` did not improve by
    ``min_delta`` (Keras semantics; patience 0 stops at the first such epoch);
    optionally put back the weights of the best epoch."""

    def __init__(self, monitor="val_loss", patience=0, min_delta=0.0, mode="auto",
                 restore_best_weights=False):
        super().__init__(monitor, mode, min_delta)
        self.patience = check_int(patience, "patience", low=0)
        self.restore_best_weights = check_bool(restore_best_weights, "restore_best_weights")

    def on_train_begin(self, logs=None):
        self.best, self.wait, self.best_epoch, self.best_weights = None, 0, None, None
        self.stopped_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        value = _monitored(logs, self.monitor, "EarlyStopping")
        if self._is_improvement(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_weights = self.model.params.copy()
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            self.model.stop_training = True
            self.model.stop_reason = (f"early stopping: {self.monitor} did not improve for "
                                      f"{self.wait} epochs (best {self.best:.6g} at epoch "
                                      f"{self.best_epoch + 1})")

    def on_train_end(self, logs=None):
        if self.restore_best_weights and self.best_weights is not None:
            self.model.params[...] = self.best_weights


class ModelCheckpoint(_Monitor):
    """Save the model after each epoch (``path`` may contain ``{epoch}``), or only when
    ``monitor`` improves with ``save_best_only``."""

    def __init__(self, path, monitor="val_loss", save_best_only=False, mode="auto"):
        super().__init__(monitor, mode, 0.0)
        self.path = os.fspath(path)
        self.save_best_only = check_bool(save_best_only, "save_best_only")

    def on_train_begin(self, logs=None):
        self.best = None

    def on_epoch_end(self, epoch, logs=None):
        if self.save_best_only:
            value = _monitored(logs, self.monitor, "ModelCheckpoint")
            if not self._is_improvement(value):
                return
            self.best = value
        self.model.save(self.path.format(epoch=epoch + 1, **logs))


class TerminateOnNaN(Callback):
    """Stop training cleanly (no exception) when the loss becomes NaN or infinite.

    fit checks every batch; with this callback present it stops instead of raising,
    leaving the last finite weights in the model.
    """

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.model.stop_training = True


class ReduceLROnPlateau(_Monitor):
    """Multiply the learning rate by ``factor`` after ``patience`` consecutive epochs
    without improvement (Keras semantics), then wait ``cooldown`` epochs before
    counting again; never below ``min_lr``."""

    def __init__(self, monitor="val_loss", factor=0.1, patience=10, min_delta=1e-4,
                 cooldown=0, min_lr=0.0, mode="auto"):
        super().__init__(monitor, mode, min_delta)
        self.factor = check_float(factor, "factor", low=0.0, high=1.0, low_open=True,
                                  high_open=True)
        self.patience = check_int(patience, "patience", low=0)
        self.cooldown = check_int(cooldown, "cooldown", low=0)
        self.min_lr = check_float(min_lr, "min_lr", low=0.0)

    def on_train_begin(self, logs=None):
        self.best, self.wait, self.cooldown_left = None, 0, 0

    def on_epoch_end(self, epoch, logs=None):
        value = _monitored(logs, self.monitor, "ReduceLROnPlateau")
        optimizer = self.model.optimizer
        logs["lr"] = optimizer.current_lr()
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.wait = 0
        if self._is_improvement(value):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience and self.cooldown_left == 0:
            lr = optimizer.current_lr()
            new_lr = max(lr * self.factor, self.min_lr)
            if lr > 0 and new_lr < lr:
                optimizer.lr_scale *= new_lr / lr
            self.cooldown_left, self.wait = self.cooldown, 0


class CSVLogger(Callback):
    """Append one row of logs per epoch to a CSV file (header written once)."""

    def __init__(self, path, separator=",", append=False):
        self.path = os.fspath(path)
        self.separator = separator
        self.append = check_bool(append, "append")

    def on_train_begin(self, logs=None):
        self._keys = None
        if not self.append and os.path.exists(self.path):
            os.remove(self.path)

    def on_epoch_end(self, epoch, logs=None):
        if self._keys is None:
            self._keys = ["epoch"] + sorted(logs)
        new_file = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f, delimiter=self.separator)
            if new_file:
                writer.writerow(self._keys)
            row = {"epoch": epoch + 1, **logs}
            writer.writerow([np.format_float_positional(row[k]) if isinstance(row.get(k), float)
                             else row.get(k, "") for k in self._keys])
