"""Callbacks: EarlyStopping, ModelCheckpoint, TerminateOnNaN (and divergence without it),
ReduceLROnPlateau, CSVLogger, and the hook order a custom Callback sees.

Monitored values that must follow a given curve are injected by a callback placed
before the one under test (callbacks run in order on the same logs dict), so patience,
min_delta and mode are checked exactly; the weights still come from real training.
"""
import csv
import math
import os
import re

import numpy as np
import pytest

import fastnn as fn
from _helpers import active_backend, blobs, rng  # noqa: F401  (active_backend: fixture)
from fastnn.callbacks import (
    Callback,
    CSVLogger,
    EarlyStopping,
    ModelCheckpoint,
    ReduceLROnPlateau,
    TerminateOnNaN,
    check_callbacks,
)

pytestmark = pytest.mark.usefixtures("active_backend")


class Inject(Callback):
    """Write ``values[epoch]`` into the logs under ``key``."""

    def __init__(self, key, values):
        self.key, self.values = key, values
        self.adds_logs = (key,)

    def on_epoch_end(self, epoch, logs=None):
        logs[self.key] = self.values[epoch]


class Snapshots(Callback):
    """The model's parameters at the end of every epoch."""

    def on_train_begin(self, logs=None):
        self.params = []

    def on_epoch_end(self, epoch, logs=None):
        self.params.append(self.model.params.copy())


def small_model(lr=0.05, optimizer=None):
    model = fn.Sequential([fn.Dense(2, 6, activation="tanh", seed=0), fn.Dense(6, 3, seed=1)])
    return model.compile("cross_entropy", optimizer or fn.optimizers.SGD(lr=lr),
                         metrics=["accuracy"])


def data():
    return blobs(10, rng())


def fit(model, callbacks, epochs=10, **kwargs):
    X, y = data()
    return model.fit(X, y, epochs=epochs, batch_size=8, seed=0, verbose=0,
                     callbacks=callbacks, **kwargs)


# ---------------------------------------------------------------------------- EarlyStopping
@pytest.mark.parametrize("patience, epochs_run", [(0, 3), (1, 3), (2, 4), (3, 5)])
def test_early_stopping_patience(patience, epochs_run):
    """Best at epoch index 1; each later epoch is worse. Training stops at the
    ``patience``-th consecutive epoch without improvement (Keras), the first for 0."""
    values = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3]
    model = small_model()
    stopper = EarlyStopping(monitor="score", patience=patience)
    history = fit(model, [Inject("score", values), stopper])
    assert len(history.epoch) == epochs_run
    assert stopper.stopped_epoch == epochs_run - 1
    assert (stopper.best, stopper.best_epoch) == (0.5, 1)
    assert history.stop_reason.startswith("early stopping: score did not improve")


def test_early_stopping_min_delta():
    values = [1.0, 0.95, 0.91, 0.88, 0.86, 0.85]
    stopper = EarlyStopping(monitor="score", patience=1, min_delta=0.1)
    history = fit(small_model(), [Inject("score", values), stopper], epochs=6)
    assert len(history.epoch) == 2  # 0.95 does not beat 1.0 by 0.1
    history = fit(small_model(), [Inject("score", values),
                                  EarlyStopping(monitor="score", patience=1)], epochs=6)
    assert len(history.epoch) == 6


def test_early_stopping_maximizes_accuracy():
    values = [0.5, 0.6, 0.55, 0.58, 0.7, 0.8]
    stopper = EarlyStopping(monitor="val_accuracy", patience=1)
    assert stopper.mode == "max"
    history = fit(small_model(), [Inject("val_accuracy", values), stopper], epochs=6)
    assert len(history.epoch) == 3 and stopper.best == 0.6
    assert EarlyStopping(monitor="val_accuracy", mode="min").mode == "min"


@pytest.mark.parametrize("restore", [True, False])
def test_early_stopping_restore_best_weights(restore):
    values = [3.0, 2.0, 1.0, 1.5, 1.6, 1.7, 1.8, 1.9]
    snapshots = Snapshots()
    stopper = EarlyStopping(monitor="score", patience=2, restore_best_weights=restore)
    model = small_model()
    history = fit(model, [Inject("score", values), snapshots, stopper], epochs=8)
    assert len(history.epoch) == 5
    assert not np.array_equal(snapshots.params[2], snapshots.params[-1])
    expected = snapshots.params[2] if restore else snapshots.params[-1]
    np.testing.assert_array_equal(model.params, expected)


def test_early_stopping_on_real_validation_loss():
    X, y = data()
    model = small_model(optimizer=fn.optimizers.Adam(lr=0.05))
    stopper = EarlyStopping(patience=1, restore_best_weights=True)
    history = model.fit(X, y, epochs=60, batch_size=8, seed=0, verbose=0,
                        validation_split=0.3, callbacks=[stopper])
    best = min(history.history["val_loss"])
    assert stopper.best == best
    assert model.evaluate(X[-9:], y[-9:])["loss"] == pytest.approx(best, rel=1e-5)


def test_monitor_missing_from_logs():
    with pytest.raises(ValueError, match="'val_loss'.*not among the logged values"):
        fit(small_model(), [EarlyStopping()], epochs=2)


# ---------------------------------------------------------------------------- ModelCheckpoint
def test_model_checkpoint_every_epoch(tmp_path):
    snapshots = Snapshots()
    model = small_model()
    fit(model, [snapshots, ModelCheckpoint(tmp_path / "m-{epoch}.npz")], epochs=3)
    assert sorted(os.listdir(tmp_path)) == ["m-1.npz", "m-2.npz", "m-3.npz"]
    for epoch in range(3):
        saved = fn.load_model(tmp_path / f"m-{epoch + 1}.npz")
        np.testing.assert_array_equal(saved.params, snapshots.params[epoch])
    np.testing.assert_array_equal(fn.load_model(tmp_path / "m-3.npz").params, model.params)


def test_model_checkpoint_formats_logs_into_the_path(tmp_path):
    history = fit(small_model(), [ModelCheckpoint(tmp_path / "m-{epoch:02d}-{loss:.3f}.npz")],
                  epochs=2)
    expected = [f"m-{e + 1:02d}-{loss:.3f}.npz" for e, loss in enumerate(history.history["loss"])]
    assert sorted(os.listdir(tmp_path)) == expected


def test_model_checkpoint_save_best_only(tmp_path):
    values = [3.0, 1.0, 2.0, 0.5, 0.7]
    fit(small_model(), [Inject("score", values),
                        ModelCheckpoint(tmp_path / "e{epoch}.npz", monitor="score",
                                        save_best_only=True)], epochs=5)
    assert sorted(os.listdir(tmp_path)) == ["e1.npz", "e2.npz", "e4.npz"]

    values = [3.0, 1.0, 2.0, 2.5]
    snapshots = Snapshots()
    model = small_model()
    fit(model, [Inject("score", values), snapshots,
                ModelCheckpoint(tmp_path / "best.npz", monitor="score", save_best_only=True)],
        epochs=4)
    best = fn.load_model(tmp_path / "best.npz")
    np.testing.assert_array_equal(best.params, snapshots.params[1])
    assert not np.array_equal(best.params, model.params)


# ---------------------------------------------------------------------------- divergence
def diverging_setup():
    gen = rng(1)
    X = gen.normal(size=(64, 4)).astype(np.float32)
    y = (10 * gen.normal(size=(64, 1))).astype(np.float32)
    model = fn.Sequential([fn.Dense(4, 8, activation="relu", seed=1), fn.Dense(8, 1, seed=2)])
    model.compile("mse", fn.optimizers.SGD(lr=1e6))
    return model, X, y


class LossRecorder(Callback):
    def on_train_begin(self, logs=None):
        self.losses = []

    def on_batch_end(self, batch, logs=None):
        self.losses.append(logs["loss"])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_terminate_on_nan_stops_cleanly():
    model, X, y = diverging_setup()
    recorder = LossRecorder()
    history = model.fit(X, y, epochs=20, batch_size=16, seed=0, verbose=0,
                        callbacks=[TerminateOnNaN(), recorder])
    assert len(history.epoch) < 20
    assert "loss became" in history.stop_reason and "last finite weights" in history.stop_reason
    assert not math.isfinite(recorder.losses[-1])  # callbacks saw the bad batch
    assert np.isfinite(model.params).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_without_terminate_on_nan_raises_and_keeps_finite_weights():
    model, X, y = diverging_setup()
    with pytest.raises(FloatingPointError, match="loss became .* at epoch 1"):
        model.fit(X, y, epochs=20, batch_size=16, seed=0, verbose=0)
    assert np.isfinite(model.params).all()
    assert np.isfinite(model.predict(X)).all()


def overflowing_setup():
    """One float32 SGD step that overflows the weights while the loss is still finite:
    grad dW = 2 * (0 - 1000) * 1000 = -2e6, times lr 1e38, is beyond float32."""
    model = fn.Sequential([fn.Dense(1, 1, init="zeros")])
    model.compile("mse", fn.optimizers.SGD(lr=1e38))
    return model, np.array([[1000.0]]), np.array([[1000.0]])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_weights_overflowing_in_the_last_update_are_caught():
    model, X, y = overflowing_setup()
    history = model.fit(X, y, epochs=1, batch_size=None, verbose=0,
                        callbacks=[TerminateOnNaN()])
    assert "weights became NaN or infinite" in history.stop_reason
    np.testing.assert_array_equal(model.params, 0.0)  # the weights before the bad epoch
    model, X, y = overflowing_setup()
    with pytest.raises(FloatingPointError, match="weights became NaN or infinite"):
        model.fit(X, y, epochs=3, batch_size=None, verbose=0)
    np.testing.assert_array_equal(model.params, 0.0)


# ---------------------------------------------------------------------------- ReduceLROnPlateau
@pytest.mark.parametrize("cooldown, reductions_at", [(0, (1, 2, 3, 4, 5)), (2, (1, 3, 5))])
def test_reduce_lr_on_plateau(cooldown, reductions_at):
    model = small_model(lr=0.1)
    reducer = ReduceLROnPlateau(monitor="score", factor=0.5, patience=1, cooldown=cooldown)
    history = fit(model, [Inject("score", [1.0] * 6), reducer], epochs=6)
    lr, expected = 0.1, []
    for epoch in range(6):
        expected.append(lr)  # logged before this epoch's decision
        if epoch in reductions_at:
            lr *= 0.5
    assert history.history["lr"] == pytest.approx(expected, rel=1e-12)
    assert model.optimizer.current_lr() == pytest.approx(0.1 * 0.5 ** len(reductions_at),
                                                         rel=1e-12)


def test_reduce_lr_on_plateau_respects_min_lr_and_improvements():
    model = small_model(lr=0.1)
    reducer = ReduceLROnPlateau(monitor="score", factor=0.1, patience=0, min_lr=0.004)
    fit(model, [Inject("score", [1.0, 0.5, 0.5, 0.5, 0.5]), reducer], epochs=5)
    assert model.optimizer.current_lr() == pytest.approx(0.004, rel=1e-12)
    model = small_model(lr=0.1)
    fit(model, [Inject("score", [1.0, 0.9, 0.8, 0.7]),
                ReduceLROnPlateau(monitor="score", patience=0)], epochs=4)
    assert model.optimizer.current_lr() == 0.1


def test_reduced_lr_drives_the_sgd_step():
    X, y = data()
    model = small_model(lr=0.1)
    fit(model, [Inject("score", [1.0] * 3),
                ReduceLROnPlateau(monitor="score", factor=0.5, patience=1)], epochs=3)
    _, grads = model.compute_gradients(X, y)
    before = model.params.copy()
    model.fit(X, y, epochs=1, batch_size=None, verbose=0)
    flat = np.concatenate([g.ravel() for g in grads])
    np.testing.assert_allclose(before - model.params, 0.025 * flat, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------- CSVLogger
def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_csv_logger_header_and_one_row_per_epoch(tmp_path):
    path = tmp_path / "log.csv"
    history = fit(small_model(), [CSVLogger(path)], epochs=3, validation_split=0.2)
    rows = read_csv(path)
    assert rows[0] == ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"]
    assert len(rows) == 4
    for epoch, row in enumerate(rows[1:]):
        assert int(row[0]) == epoch + 1
        for key, text in zip(rows[0][1:], row[1:]):
            assert float(text) == history.history[key][epoch]


def test_csv_logger_append_and_overwrite(tmp_path):
    path = tmp_path / "log.csv"
    fit(small_model(), [CSVLogger(path)], epochs=2)
    fit(small_model(), [CSVLogger(path, append=True)], epochs=3)
    rows = read_csv(path)
    assert len(rows) == 1 + 2 + 3 and rows.count(rows[0]) == 1
    fit(small_model(), [CSVLogger(path, separator=";")], epochs=1)
    assert path.read_text().splitlines()[0] == "epoch;accuracy;loss"
    assert len(path.read_text().splitlines()) == 2


# ---------------------------------------------------------------------------- custom hooks
class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, logs=None):
        self.events.append(("train_begin",))

    def on_epoch_begin(self, epoch, logs=None):
        self.events.append(("epoch_begin", epoch))

    def on_batch_end(self, batch, logs=None):
        assert math.isfinite(logs["loss"])
        self.events.append(("batch_end", batch))

    def on_epoch_end(self, epoch, logs=None):
        assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(logs)
        self.events.append(("epoch_end", epoch))

    def on_train_end(self, logs=None):
        self.events.append(("train_end",))


def test_custom_callback_sees_every_hook_in_order():
    X, y = data()  # 30 samples, 6 held out: 24 = 3 batches of 8
    model = small_model()
    recorder = Recorder()
    model.fit(X, y, epochs=2, batch_size=8, validation_split=0.2, verbose=0,
              callbacks=[recorder])
    assert recorder.model is model
    per_epoch = lambda e: [("epoch_begin", e), ("batch_end", 0), ("batch_end", 1),  # noqa: E731
                           ("batch_end", 2), ("epoch_end", e)]
    assert recorder.events == [("train_begin",)] + per_epoch(0) + per_epoch(1) + [("train_end",)]


def test_custom_callback_can_stop_training():
    class StopAfterTwo(Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.model.stop_training = True
                self.model.stop_reason = "enough"

    history = fit(small_model(), [StopAfterTwo()], epochs=10)
    assert history.epoch == [0, 1] and history.stop_reason == "enough"


# ---------------------------------------------------------------------------- start-of-fit checks
class SettingRecorder(Callback):
    """Records what ``check_training`` was told."""

    def check_training(self, log_keys, solver):
        self.setting = (log_keys, solver)


def test_check_training_sees_the_log_keys_and_the_solver():
    X, y = data()
    recorders = [SettingRecorder(), Inject("score", [0.0] * 2), SettingRecorder()]
    small_model().fit(X, y, epochs=2, verbose=0, validation_split=0.2, callbacks=recorders)
    logged = ("loss", "accuracy", "val_loss", "val_accuracy")
    assert recorders[0].setting == (logged, False)
    assert recorders[2].setting == (logged + ("score",), False)
    recorder = SettingRecorder()
    model = fn.Sequential([fn.Dense(2, 3, seed=0)]).compile("cross_entropy", "lbfgs")
    model.fit(X, y, epochs=2, verbose=0, callbacks=[recorder])
    assert recorder.setting == (("loss",), True)
    assert Callback().check_training((), True) is None  # the base accepts everything


def refused_before_training(callbacks, message, **kwargs):
    """fit raises ``message`` before the first epoch: weights untouched, nothing saved."""
    model = small_model()
    before = model.params.copy()
    recorder = Recorder()
    with pytest.raises(ValueError, match=message):
        fit(model, callbacks + [recorder], epochs=3, **kwargs)
    np.testing.assert_array_equal(model.params, before)
    assert recorder.events == []


@pytest.mark.parametrize("template, field", [("run{v2}.npz", "v2"),
                                             ("m-{epoch}-{accuracy.real}.npz", "accuracy.real"),
                                             ("m{val_loss:.3f}.npz", "val_loss")])
def test_model_checkpoint_template_fields_are_checked_at_the_start(tmp_path, template, field):
    """Issue 18, item 13: a field that is no logged value raised KeyError after the
    first epoch; {val_loss} without validation data likewise."""
    path = str(tmp_path / template)
    refused_before_training([ModelCheckpoint(path)],
                            rf"path template '{re.escape(path)}' has the field '{field}', "
                            r"which is not among the logged values \['accuracy', 'epoch', "
                            r"'loss'\]")
    assert list(tmp_path.iterdir()) == []


def test_model_checkpoint_val_field_with_validation_data(tmp_path):
    fit(small_model(), [ModelCheckpoint(tmp_path / "m{epoch}-{val_loss:.2f}.npz")], epochs=2,
        validation_split=0.2)
    assert len(list(tmp_path.iterdir())) == 2
    with pytest.raises(ValueError, match=r"has the field 'val_loss', .*; pass validation_data "
                                         r"or validation_split"):
        fit(small_model(), [ModelCheckpoint(tmp_path / "m{val_loss}.npz")], epochs=2)


@pytest.mark.parametrize("template, message", [
    ("m{}.npz", r"has the positional field \{\}; name the value"),
    ("m{0}.npz", r"has the positional field \{0\}; name the value"),
    ("m{epoch.npz", r"is malformed: .*write a literal brace as \{\{ or \}\}"),
    ("m}.npz", r"is malformed"),
    ("m{loss:02d}.npz", r"field \{loss\} cannot be formatted with conversion None and spec "
                        r"'02d' \(float value\)"),
    ("m{epoch!x}.npz", r"field \{epoch\} cannot be formatted with conversion 'x'"),
])
def test_model_checkpoint_template_syntax_is_checked_at_construction(template, message):
    with pytest.raises(ValueError, match=rf"path template '{re.escape(template)}'.*{message}"):
        ModelCheckpoint(template)


def test_model_checkpoint_template_may_name_values_earlier_callbacks_add(tmp_path):
    fit(small_model(), [ReduceLROnPlateau(monitor="loss"),
                        ModelCheckpoint(tmp_path / "m-{epoch}-{lr:.2f}-{loss!s:.4}.npz")],
        epochs=2)
    assert sorted(os.listdir(tmp_path))[0].startswith("m-1-0.05-")
    with pytest.raises(ValueError, match=r"has the field 'lr'"):
        fit(small_model(), [ModelCheckpoint(tmp_path / "m{lr}.npz"),
                            ReduceLROnPlateau(monitor="loss")], epochs=2)


@pytest.mark.parametrize("make", [
    lambda: EarlyStopping(),
    lambda: ReduceLROnPlateau(),
    lambda: ModelCheckpoint("m.npz", save_best_only=True),
    lambda: EarlyStopping(monitor="val_accuracy"),
])
def test_missing_monitor_is_refused_before_the_first_epoch(make):
    """It used to fail after a whole epoch of training."""
    callback = make()
    refused_before_training([callback], rf"{type(callback).__name__} monitors "
                                        rf"'{callback.monitor}', which is not among the logged "
                                        r"values \['accuracy', 'loss'\]; pass validation_data")


def test_unmonitored_checkpoint_needs_no_monitored_value(tmp_path):
    fit(small_model(), [ModelCheckpoint(tmp_path / "last.npz", monitor="val_r2")], epochs=1)
    assert os.listdir(tmp_path) == ["last.npz"]


@pytest.mark.parametrize("solver", ["lbfgs", "gradient_descent"])
def test_reduce_lr_on_plateau_with_a_solver_is_refused(solver):
    """Issue 18, item 13: it raised AttributeError after the first iteration."""
    X, y = data()
    model = fn.Sequential([fn.Dense(2, 3, seed=0)]).compile("cross_entropy", solver)
    before = model.params.copy()
    with pytest.raises(ValueError, match=r"ReduceLROnPlateau lowers a first-order optimizer's "
                                         r"learning rate, but this model trains with a "
                                         r"full-batch solver"):
        model.fit(X, y, epochs=3, verbose=0, callbacks=[ReduceLROnPlateau(monitor="loss")])
    np.testing.assert_array_equal(model.params, before)
    history = model.fit(X, y, epochs=3, verbose=0, callbacks=[EarlyStopping(monitor="loss")])
    assert len(history.epoch) >= 1


def test_check_callbacks_takes_one_callback_or_a_list():
    """Issue 18, item 14: fit(callbacks=TerminateOnNaN()) said "'TerminateOnNaN' object
    is not iterable"."""
    stop = TerminateOnNaN()
    assert check_callbacks(None) == [] and check_callbacks(()) == []
    assert check_callbacks(stop) == [stop]
    assert check_callbacks((stop, Recorder()))[0] is stop
    with pytest.raises(TypeError, match=r"callbacks must be a fastnn.callbacks.Callback or a "
                                        r"list of them, got int"):
        check_callbacks(5)
    with pytest.raises(TypeError, match=r"callbacks\[1\] must be a fastnn.callbacks.Callback, "
                                        r"got str"):
        check_callbacks([stop, "stop"])
    with pytest.raises(TypeError, match=r"callbacks\[0\] is the class EarlyStopping; pass an "
                                        r"instance, EarlyStopping\(...\)"):
        check_callbacks([EarlyStopping])


def test_callback_constructor_arguments_are_named():
    with pytest.raises(TypeError, match=r"path must be a str or path-like, got int"):
        ModelCheckpoint(5)
    with pytest.raises(TypeError, match=r"path must be a str or path-like, got NoneType"):
        CSVLogger(None)
    with pytest.raises(TypeError, match=r"separator must be a 1-character str, got ';;'"):
        CSVLogger("log.csv", separator=";;")
    assert ModelCheckpoint(b"m{epoch}.npz").path == "m{epoch}.npz"
