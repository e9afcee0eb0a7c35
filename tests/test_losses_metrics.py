"""Losses (value, gradient, weights, link, targets) and metrics, against numpy written
from the PyTorch definitions of each loss."""
import numpy as np
import pytest

import fastnn as fn
from _helpers import LOSSES, active_backend, mlp, rng, targets_for  # noqa: F401

pytestmark = pytest.mark.usefixtures("active_backend")


def reference_per_sample(name, pred, target, delta=1.0, margin=1.0):
    """Per-sample loss l_i in float64, written from the PyTorch definitions."""
    p = np.asarray(pred, dtype=np.float64)
    if name == "mse":
        return ((p - target) ** 2).mean(axis=1)
    if name == "mae":
        return np.abs(p - target).mean(axis=1)
    if name == "huber":
        d = np.abs(p - target)
        return np.where(d <= delta, 0.5 * d ** 2, delta * (d - 0.5 * delta)).mean(axis=1)
    if name == "binary_cross_entropy":
        prob = 1 / (1 + np.exp(-p))
        return -(target * np.log(prob) + (1 - target) * np.log(1 - prob)).mean(axis=1)
    log_softmax = p - p.max(axis=1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(axis=1, keepdims=True))
    if name == "cross_entropy":
        if target.ndim == 2:
            return -(target * log_softmax).sum(axis=1)
        return -log_softmax[np.arange(len(p)), target]
    if name == "hinge":
        correct = p[np.arange(len(p)), target][:, None]
        margins = np.maximum(0, p - correct + margin)
        margins[np.arange(len(p)), target] = 0
        return margins.sum(axis=1)
    raise AssertionError(name)


def prepared(name, n=8, k=3, dtype=np.float64, offset=0, **loss_kwargs):
    """(loss object, pred, kernel-ready target) with pred kept off the kinks."""
    gen = rng(offset)
    loss = fn.losses.get({"name": name, **loss_kwargs})
    pred = gen.normal(size=(n, k)) * 2
    raw = targets_for(name, n, k, gen)
    if name in ("mae", "huber"):  # |pred - target| well away from 0 and from delta
        raw = pred - np.where(gen.random((n, k)) < 0.5, -1, 1) * gen.choice([0.3, 2.5], (n, k))
    target = loss.prepare_target(raw, n, k, np.dtype(dtype))
    return loss, pred.astype(dtype), target


def numeric_gradient(loss, pred, target, weights, eps=1e-6):
    grad = np.zeros_like(pred)
    for idx in np.ndindex(pred.shape):
        saved = pred[idx]
        pred[idx] = saved + eps
        up = loss(pred, target, weights, None)
        pred[idx] = saved - eps
        down = loss(pred, target, weights, None)
        pred[idx] = saved
        grad[idx] = (up - down) / (2 * eps)
    return grad


# ---------------------------------------------------------------------------- losses
@pytest.mark.parametrize("name", LOSSES)
def test_loss_value_matches_reference(name):
    loss, pred, target = prepared(name)
    dpred = np.empty_like(pred)
    value = loss(pred, target, None, dpred)
    assert isinstance(value, float)
    assert value == pytest.approx(reference_per_sample(name, pred, target).mean(), rel=1e-12)


@pytest.mark.parametrize("name", LOSSES)
def test_loss_gradient_matches_finite_differences(name):
    loss, pred, target = prepared(name, offset=1)
    dpred = np.empty_like(pred)
    value = loss(pred, target, None, dpred)
    assert loss(pred, target, None, None) == value  # dpred=None: the loss only
    np.testing.assert_allclose(dpred, numeric_gradient(loss, pred, target, None),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", LOSSES)
def test_weighted_loss_is_weighted_mean_of_sample_losses(name):
    loss, pred, target = prepared(name, offset=2)
    weights = rng(3).uniform(0.1, 3.0, size=len(pred))
    dpred = np.empty_like(pred)
    value = loss(pred, target, weights, dpred)
    per_sample = reference_per_sample(name, pred, target)
    assert value == pytest.approx((weights * per_sample).sum() / weights.sum(), rel=1e-12)
    np.testing.assert_allclose(dpred, numeric_gradient(loss, pred, target, weights),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", LOSSES)
def test_zero_weights_drop_samples(name):
    loss, pred, target = prepared(name, offset=4)
    half = len(pred) // 2
    weights = np.r_[np.zeros(half), np.ones(len(pred) - half)]
    d_all, d_half = np.empty_like(pred), np.empty_like(pred[half:])
    value = loss(pred, target, weights, d_all)
    assert value == pytest.approx(loss(pred[half:], target[half:], None, d_half), rel=1e-12)
    assert not d_all[:half].any()
    np.testing.assert_allclose(d_all[half:], d_half, rtol=1e-12)


@pytest.mark.parametrize("name", LOSSES)
def test_float32_loss_close_to_float64(name):
    loss, pred, target = prepared(name, offset=5)
    loss32, pred32, target32 = prepared(name, offset=5, dtype=np.float32)
    d64, d32 = np.empty_like(pred), np.empty_like(pred32)
    assert loss32(pred32, target32, None, d32) == pytest.approx(
        loss(pred, target, None, d64), rel=1e-5)
    assert d32.dtype == np.float32
    np.testing.assert_allclose(d32, d64, rtol=1e-4, atol=1e-6)


def test_huber_delta_and_hinge_margin():
    loss, pred, target = prepared("huber", offset=6, delta=2.0)
    assert loss.delta == 2.0
    assert loss(pred, target, None, None) == pytest.approx(
        reference_per_sample("huber", pred, target, delta=2.0).mean(), rel=1e-12)
    loss, pred, target = prepared("hinge", offset=7, margin=0.5)
    assert loss(pred, target, None, None) == pytest.approx(
        reference_per_sample("hinge", pred, target, margin=0.5).mean(), rel=1e-12)


def test_cross_entropy_probability_rows_equal_labels():
    loss, pred, labels = prepared("cross_entropy", offset=8)
    onehot = loss.prepare_target(np.eye(3)[labels], len(pred), 3, np.dtype(np.float64))
    d_labels, d_rows = np.empty_like(pred), np.empty_like(pred)
    assert loss(pred, onehot, None, d_rows) == pytest.approx(
        loss(pred, labels, None, d_labels), rel=1e-12)
    np.testing.assert_allclose(d_rows, d_labels, atol=1e-15)
    soft = rng(9).dirichlet(np.ones(3), size=len(pred))
    assert loss(pred, soft, None, None) == pytest.approx(
        reference_per_sample("cross_entropy", pred, soft).mean(), rel=1e-12)


def test_labels_reach_kernels_as_int64():
    loss = fn.losses.get("cross_entropy")
    target = loss.prepare_target(np.array([0.0, 2.0, 1.0]), 3, 3, np.dtype(np.float32))
    assert target.dtype == np.int64
    np.testing.assert_array_equal(target, [0, 2, 1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_big_logits_are_stable(dtype):
    pred = np.array([[1000.0, 0.0, -1000.0], [-800.0, 800.0, 0.0]], dtype=dtype)
    labels = np.array([0, 0])
    ce = fn.losses.get("cross_entropy")
    dpred = np.empty_like(pred)
    value = ce(pred, labels, None, dpred)
    assert value == pytest.approx(1600.0 / 2, rel=1e-6)
    assert np.isfinite(dpred).all()
    bce = fn.losses.get("binary_cross_entropy")
    target = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]], dtype=dtype)
    value = bce(pred, target, None, dpred)
    assert value == pytest.approx((3600 + 2 * np.log(2)) / 6, rel=1e-6)
    assert np.isfinite(dpred).all()


def test_links():
    out = rng(10).normal(size=(5, 3)) * 3
    np.testing.assert_allclose(fn.losses.get("cross_entropy").link(out).sum(axis=1), 1.0)
    np.testing.assert_allclose(fn.losses.get("binary_cross_entropy").link(out),
                               1 / (1 + np.exp(-out)), rtol=1e-12)
    for name in ("mse", "mae", "huber", "hinge"):
        linked = fn.losses.get(name).link(out)
        np.testing.assert_array_equal(linked, out)
        assert linked is not out


def test_get_accepts_names_configs_and_instances():
    assert set(fn.losses.LOSSES) == set(LOSSES)
    huber = fn.losses.Huber(delta=0.5)
    assert fn.losses.get(huber) is huber
    assert fn.losses.get({"name": "huber", "delta": 0.5}).delta == 0.5
    assert isinstance(fn.losses.get("mae"), fn.losses.MeanAbsoluteError)
    assert fn.losses.get(huber.get_config()).get_config() == huber.get_config()
    assert repr(huber) == "Huber(delta=0.5)"
    with pytest.raises(ValueError, match="unknown loss 'nope'.*cross_entropy"):
        fn.losses.get("nope")
    with pytest.raises(ValueError, match="unknown loss"):
        fn.losses.get({"name": "nope"})
    with pytest.raises(TypeError, match="loss must be"):
        fn.losses.get(3)
    with pytest.raises(ValueError, match="delta"):
        fn.losses.Huber(delta=0.0)


# ---------------------------------------------------------------------------- metrics
def metric_values(names, loss_name, out, target, chunk=None):
    loss = fn.losses.get(loss_name)
    metrics = fn.metrics.build(fn.metrics.check_metrics(names, loss), loss)
    step = chunk or len(out)
    for i in range(0, len(out), step):
        for m in metrics:
            m.update(out[i:i + step], target[i:i + step])
    return {m.name: m.result() for m in metrics}


def test_accuracy_for_labels_rows_and_multilabel():
    out = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 0.0, 0.0]])
    labels = np.array([0, 1, 0, 1])
    assert metric_values(["accuracy"], "cross_entropy", out, labels)["accuracy"] == 0.5
    assert metric_values("accuracy", "hinge", out, labels)["accuracy"] == 0.5
    rows = np.eye(3)[labels]
    assert metric_values(["accuracy"], "cross_entropy", out, rows)["accuracy"] == 0.5
    logits = np.array([[1.0, -1.0], [-2.0, -0.5], [0.3, 2.0]])
    multi = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    acc = metric_values(["accuracy"], "binary_cross_entropy", logits, multi)["accuracy"]
    assert acc == pytest.approx(5 / 6)


def test_regression_metrics_match_numpy_and_accumulate_exactly():
    gen = rng(11)
    out = gen.normal(size=(50, 2))
    target = out + 0.3 * gen.normal(size=(50, 2)) + np.array([0.0, 1.0])
    one_pass = metric_values(["mae", "mse", "r2"], "mse", out, target)
    chunked = metric_values(["mae", "mse", "r2"], "mse", out, target, chunk=7)
    r2 = np.mean(1 - ((target - out) ** 2).sum(0) / ((target - target.mean(0)) ** 2).sum(0))
    expected = {"mae": np.abs(out - target).mean(), "mse": ((out - target) ** 2).mean(),
                "r2": r2}
    for name, value in expected.items():
        assert one_pass[name] == pytest.approx(value, rel=1e-10)
        assert chunked[name] == pytest.approx(value, rel=1e-10)


def test_metrics_go_through_the_link():
    out = np.array([[0.0], [2.0]])
    target = np.array([[0.5], [1.0]])
    mae = metric_values(["mae"], "binary_cross_entropy", out, target)["mae"]
    assert mae == pytest.approx(np.abs(1 / (1 + np.exp(-out)) - target).mean())


def test_check_metrics_rejects_mismatches():
    mse, ce = fn.losses.get("mse"), fn.losses.get("cross_entropy")
    assert fn.metrics.check_metrics(None, mse) == ()
    assert fn.metrics.check_metrics("r2", mse) == ("r2",)
    with pytest.raises(ValueError, match="accuracy.*classification loss"):
        fn.metrics.check_metrics(["accuracy"], mse)
    with pytest.raises(ValueError, match="'r2'.*class labels"):
        fn.metrics.check_metrics(["r2"], ce)
    with pytest.raises(ValueError, match="unknown metric 'f1'.*accuracy"):
        fn.metrics.check_metrics(["f1"], ce)


def test_evaluate_reports_metrics_over_all_samples():
    gen = rng(12)
    X = gen.normal(size=(37, 3))
    y = X @ gen.normal(size=(3, 2)) + 0.1 * gen.normal(size=(37, 2))
    model = mlp([3, 5, 2], dtype="float64").compile("mse", metrics=["mae", "mse", "r2"])
    pred = model.predict(X)
    r2 = np.mean(1 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0))
    for batch_size in (None, 5):
        logs = model.evaluate(X, y, batch_size=batch_size)
        assert logs["loss"] == pytest.approx(((pred - y) ** 2).mean(), rel=1e-10)
        assert logs["mse"] == pytest.approx(((pred - y) ** 2).mean(), rel=1e-10)
        assert logs["mae"] == pytest.approx(np.abs(pred - y).mean(), rel=1e-10)
        assert logs["r2"] == pytest.approx(r2, rel=1e-10)


def test_evaluate_weighted_loss():
    gen = rng(13)
    X = gen.normal(size=(20, 4))
    y = gen.integers(0, 3, size=20)
    w = gen.uniform(0, 2, size=20)
    model = mlp([4, 6, 3], dtype="float64").compile("cross_entropy", metrics=["accuracy"])
    per_sample = reference_per_sample("cross_entropy", model.forward(X), y)
    for batch_size in (None, 6):
        logs = model.evaluate(X, y, sample_weight=w, batch_size=batch_size)
        assert logs["loss"] == pytest.approx((w * per_sample).sum() / w.sum(), rel=1e-10)
        assert logs["accuracy"] == np.mean(model.predict(X).argmax(1) == y)
