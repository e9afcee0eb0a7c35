"""Callbacks for ``Sequential.fit`` (Keras-style hooks).

A callback sees the model (``self.model``) and per-epoch ``logs`` ({"loss": ...,
"accuracy": ..., "val_loss": ...}). Setting ``self.model.stop_training = True`` ends
training after the current epoch; ``self.model.stop_reason`` says why.

Before the first epoch fit calls ``check_training`` on each callback, so a callback
that cannot work in that run (a monitored value that will not be logged, a path
template naming one) fails at once rather than after an epoch of training.
"""
import csv
import math
import os
import string

import numpy as np

from ._validation import check_bool, check_float, check_int


class Callback:
    """Base class: override any of the hooks; the base hooks do nothing.

    ``fit`` calls, in order: ``set_model``, ``check_training``, ``on_train_begin``,
    then per epoch ``on_epoch_begin``, ``on_batch_end`` after each batch (once per
    iteration for a full-batch solver) and ``on_epoch_end``, and finally
    ``on_train_end``. A callback that
    writes values into the epoch logs (in ``on_epoch_end``) names them in
    ``adds_logs``, so the callbacks after it may monitor them.

    Examples
    --------
    >>> import fastnn as fn
    >>> class StopAtLoss(fn.callbacks.Callback):
    ...     def on_epoch_end(self, epoch, logs=None):
    ...         if logs["loss"] < 0.1:
    ...             self.model.stop_training = True
    """

    model = None
    #: Keys this callback writes into the epoch logs.
    adds_logs = ()

    def set_model(self, model):
        """Give the callback the model being trained (``self.model``); fit calls it first."""
        self.model = model

    def check_training(self, log_keys, solver):
        """Raise ValueError or TypeError if this callback cannot work in the coming fit.

        Called by fit once, before the first epoch.

        Parameters
        ----------
        log_keys : tuple of str
            The keys the epoch logs hold when this callback's ``on_epoch_end`` runs:
            "loss", the metric names, ``"val_"`` + each of those with validation data,
            then the ``adds_logs`` of the callbacks before this one.
        solver : bool
            True when a full-batch solver trains (an epoch is one solver iteration).

        Notes
        -----
        The base accepts every setting.
        """

    def on_train_begin(self, logs=None):
        """Called once when ``fit`` starts, before the first epoch.

        Parameters
        ----------
        logs : dict
            Empty.
        """

    def on_epoch_begin(self, epoch, logs=None):
        """Called at the start of every epoch (solvers: every iteration).

        Parameters
        ----------
        epoch : int
            The epoch index, from 0.
        logs : dict
            Empty.
        """

    def on_batch_end(self, batch, logs=None):
        """Called after every mini-batch step; for a full-batch solver once per
        iteration, with batch 0.

        A callback that overrides this hook keeps fit off the fused epoch kernel (the
        epoch then runs step by step in Python).

        Parameters
        ----------
        batch : int
            The batch index within the epoch, from 0.
        logs : dict
            ``{"loss": float}``, the batch's loss.
        """

    def on_epoch_end(self, epoch, logs=None):
        """Called at the end of every epoch (solvers: every iteration).

        Setting ``self.model.stop_training = True`` here ends training after this
        epoch.

        Parameters
        ----------
        epoch : int
            The epoch index, from 0.
        logs : dict
            The epoch's values: "loss", each metric, ``"val_*"`` with validation data,
            and what earlier callbacks added (``adds_logs``). A callback may add keys.
        """

    def on_train_end(self, logs=None):
        """Called once when ``fit`` ends (after the last epoch or a stop).

        Parameters
        ----------
        logs : dict
            Empty.
        """


def check_callbacks(callbacks):
    """fit's ``callbacks`` argument (None, one Callback, or an iterable of them) as a
    list of Callbacks.

    Raises
    ------
    TypeError
        Not a Callback or an iterable of Callback instances (a class must be called).
    """
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback):
        return [callbacks]
    try:
        callbacks = list(callbacks)
    except TypeError:
        raise TypeError(f"callbacks must be a fastnn.callbacks.Callback or a list of them, "
                        f"got {type(callbacks).__name__}") from None
    for i, cb in enumerate(callbacks):
        if isinstance(cb, type) and issubclass(cb, Callback):
            raise TypeError(f"callbacks[{i}] is the class {cb.__name__}; pass an instance, "
                            f"{cb.__name__}(...)")
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks[{i}] must be a fastnn.callbacks.Callback, "
                            f"got {type(cb).__name__}")
    return callbacks


def acts_per_batch(callbacks):
    """True when a callback overrides ``on_batch_end`` (fit then calls it after every
    step), TerminateOnNaN aside: fit checks every batch's loss itself."""
    return any(not isinstance(cb, TerminateOnNaN)
               and type(cb).on_batch_end is not Callback.on_batch_end for cb in callbacks)


def check_training_setup(callbacks, log_keys, solver):
    """Call ``check_training`` on each callback in order.

    Each sees ``log_keys`` (the keys fit logs) plus the ``adds_logs`` of the callbacks
    before it.
    """
    log_keys = tuple(log_keys)
    for cb in callbacks:
        cb.check_training(log_keys, solver)
        log_keys += tuple(key for key in cb.adds_logs if key not in log_keys)


def _check_path(path):
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"path must be a str or path-like, got {type(path).__name__}")
    return os.fspath(path)


def _missing_log_message(who, key, log_keys):
    hint = ("pass validation_data or validation_split to log 'val_*' values"
            if key.startswith("val_") else "pick one of them")
    return f"{who} {key!r}, which is not among the logged values {sorted(log_keys)}; {hint}"


def _monitored(logs, monitor, who):
    if monitor not in logs:
        raise ValueError(_missing_log_message(f"{who} monitors", monitor, logs))
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

    def _check_monitor(self, log_keys):
        if self.monitor not in log_keys:
            raise ValueError(_missing_log_message(f"{type(self).__name__} monitors",
                                                  self.monitor, log_keys))

    def _is_improvement(self, value):
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


class EarlyStopping(_Monitor):
    """Stop training when a monitored value stops improving (Keras semantics).

    Stops after ``patience`` consecutive epochs in which ``monitor`` did not improve by
    more than ``min_delta`` (patience 0 stops at the first such epoch); optionally puts
    back the weights of the best epoch. The reason goes to ``history.stop_reason``.

    Parameters
    ----------
    monitor : str, default "val_loss"
        A logged key: "loss", a metric, or a ``"val_*"`` key (needs validation data).
    patience : int >= 0, default 0
        Epochs without improvement to tolerate.
    min_delta : float >= 0, default 0.0
        The smallest change that counts as an improvement.
    mode : {"auto", "min", "max"}, default "auto"
        Whether lower or higher is better; "auto" is "max" for keys containing
        "accuracy" or "r2", else "min".
    restore_best_weights : bool, default False
        At the end of training, put back the weights of the best epoch.

    Attributes
    ----------
    best : float
        The best monitored value.
    best_epoch : int or None
        Epoch index (from 0) of the best value.
    stopped_epoch : int or None
        Epoch index (from 0) at which training stopped, or None.

    Raises
    ------
    ValueError
        At fit, when ``monitor`` is not logged in that run.
    """

    def __init__(self, monitor="val_loss", patience=0, min_delta=0.0, mode="auto",
                 restore_best_weights=False):
        super().__init__(monitor, mode, min_delta)
        self.patience = check_int(patience, "patience", low=0)
        self.restore_best_weights = check_bool(restore_best_weights, "restore_best_weights")

    def check_training(self, log_keys, solver):
        """Raise ValueError if ``monitor`` is not among ``log_keys``."""
        self._check_monitor(log_keys)

    def on_train_begin(self, logs=None):
        """Reset the best value, the wait count and the saved weights."""
        self.best, self.wait, self.best_epoch, self.best_weights = None, 0, None, None
        self.stopped_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        """Compare ``logs[monitor]`` with the best so far; stop after ``patience`` misses."""
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
        """Put back the best epoch's weights (with ``restore_best_weights``)."""
        if self.restore_best_weights and self.best_weights is not None:
            self.model.params[...] = self.best_weights


class ModelCheckpoint(_Monitor):
    """Save the model after each epoch, or only when ``monitor`` improves.

    Parameters
    ----------
    path : str or path-like
        A ``str.format`` template whose fields are named: ``{epoch}`` (from 1, an int)
        or a logged value (a float), e.g. ``"m-{epoch:02d}-{val_loss:.3f}.npz"``.
    monitor : str, default "val_loss"
        The logged key compared with ``save_best_only``.
    save_best_only : bool, default False
        Save only when ``monitor`` improves on the best so far.
    mode : {"auto", "min", "max"}, default "auto"
        As for ``EarlyStopping``.

    Raises
    ------
    ValueError
        A malformed template or a positional field; at fit, a template field or a
        ``monitor`` that is not logged in that run.
    TypeError
        ``path`` is not a str or path-like.
    """

    def __init__(self, path, monitor="val_loss", save_best_only=False, mode="auto"):
        super().__init__(monitor, mode, 0.0)
        self.path = os.fsdecode(_check_path(path))
        self.save_best_only = check_bool(save_best_only, "save_best_only")
        self._fields = self._template_fields()

    def _template_fields(self):
        """The field names of the path template, after checking that each is named and
        that its conversion and format spec suit its value (an int for epoch, else a
        float)."""
        try:
            parsed = list(string.Formatter().parse(self.path))
        except ValueError as exc:
            raise ValueError(f"path template {self.path!r} is malformed: {exc} (write a "
                             "literal brace as {{ or }})") from None
        fields = []
        for _, field, spec, conversion in parsed:
            if field is None:
                continue
            if field == "" or field.isdigit():
                raise ValueError(f"path template {self.path!r} has the positional field "
                                 f"{{{field}}}; name the value: {{epoch}} or a logged value "
                                 "such as {loss}")
            sample = 1 if field == "epoch" else 1.0
            try:
                format(string.Formatter().convert_field(sample, conversion), spec)
            except ValueError as exc:
                raise ValueError(f"path template {self.path!r}: field {{{field}}} cannot be "
                                 f"formatted with conversion {conversion!r} and spec {spec!r} "
                                 f"({type(sample).__name__} value): {exc}") from None
            fields.append(field)
        return fields

    def check_training(self, log_keys, solver):
        """Raise ValueError if a template field (or, with ``save_best_only``, ``monitor``)
        is not among ``log_keys``."""
        for field in self._fields:
            if field != "epoch" and field not in log_keys:
                raise ValueError(_missing_log_message(
                    f"path template {self.path!r} has the field", field, ("epoch",) + log_keys))
        if self.save_best_only:
            self._check_monitor(log_keys)

    def on_train_begin(self, logs=None):
        """Forget the best value of an earlier fit."""
        self.best = None

    def on_epoch_end(self, epoch, logs=None):
        """Save the model to ``path`` formatted with ``epoch + 1`` and ``logs``."""
        if self.save_best_only:
            value = _monitored(logs, self.monitor, "ModelCheckpoint")
            if not self._is_improvement(value):
                return
            self.best = value
        self.model.save(self.path.format(epoch=epoch + 1, **logs))


class TerminateOnNaN(Callback):
    """Stop training cleanly (no exception) when the loss becomes NaN or infinite.

    fit checks every batch; without this callback a non-finite loss raises
    FloatingPointError, with it fit stops and returns. Either way the model keeps the
    weights of the last completed epoch.
    """

    def on_batch_end(self, batch, logs=None):
        """Set ``model.stop_training`` when ``logs["loss"]`` is NaN or infinite."""
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.model.stop_training = True


class ReduceLROnPlateau(_Monitor):
    """Lower the learning rate when a monitored value stops improving (Keras semantics).

    Multiplies the rate by ``factor`` after ``patience`` consecutive epochs without an
    improvement of more than ``min_delta``, then waits ``cooldown`` epochs before
    counting again; never goes below ``min_lr``. It scales the optimizer's
    ``lr_scale``, so it works on top of a schedule. Needs a first-order optimizer; logs
    the rate in use during the epoch as "lr".

    Parameters
    ----------
    monitor : str, default "val_loss"
        A logged key.
    factor : float in (0, 1), default 0.1
        The multiplier of the rate.
    patience : int >= 0, default 10
        Epochs without improvement before the rate drops.
    min_delta : float >= 0, default 1e-4
        The smallest change that counts as an improvement.
    cooldown : int >= 0, default 0
        Epochs to wait after a drop before counting again.
    min_lr : float >= 0, default 0.0
        The lowest rate.
    mode : {"auto", "min", "max"}, default "auto"
        As for ``EarlyStopping``.

    Raises
    ------
    ValueError
        At fit, when a full-batch solver trains or ``monitor`` is not logged.
    """

    adds_logs = ("lr",)

    def __init__(self, monitor="val_loss", factor=0.1, patience=10, min_delta=1e-4,
                 cooldown=0, min_lr=0.0, mode="auto"):
        super().__init__(monitor, mode, min_delta)
        self.factor = check_float(factor, "factor", low=0.0, high=1.0, low_open=True,
                                  high_open=True)
        self.patience = check_int(patience, "patience", low=0)
        self.cooldown = check_int(cooldown, "cooldown", low=0)
        self.min_lr = check_float(min_lr, "min_lr", low=0.0)

    def check_training(self, log_keys, solver):
        """Raise ValueError for a solver run, or if ``monitor`` is not among ``log_keys``."""
        if solver:
            raise ValueError("ReduceLROnPlateau lowers a first-order optimizer's learning "
                             "rate, but this model trains with a full-batch solver, whose "
                             "iterations it cannot steer; compile with an optimizer such as "
                             "'sgd' or 'adam', or drop the callback")
        self._check_monitor(log_keys)

    def on_train_begin(self, logs=None):
        """Reset the best value, the wait count and the cooldown."""
        self.best, self.wait, self.cooldown_left = None, 0, 0

    def on_epoch_end(self, epoch, logs=None):
        """Log "lr"; lower the rate after ``patience`` epochs without improvement."""
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
    """Write one row of logs per epoch to a CSV file (header written once).

    Columns: "epoch" (from 1), then the log keys of the first epoch, sorted.

    Parameters
    ----------
    path : str or path-like
        The CSV file.
    separator : str, default ","
        One character.
    append : bool, default False
        Append to an existing file instead of replacing it at the start of fit.

    Raises
    ------
    TypeError
        ``path`` is not path-like, or ``separator`` is not one character.
    """

    def __init__(self, path, separator=",", append=False):
        self.path = _check_path(path)
        if not isinstance(separator, str) or len(separator) != 1:
            raise TypeError(f"separator must be a 1-character str, got {separator!r}")
        self.separator = separator
        self.append = check_bool(append, "append")

    def on_train_begin(self, logs=None):
        """Remove an existing file unless ``append``."""
        self._keys = None
        if not self.append and os.path.exists(self.path):
            os.remove(self.path)

    def on_epoch_end(self, epoch, logs=None):
        """Append the epoch's row (and the header to a new or empty file)."""
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
