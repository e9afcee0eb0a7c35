"""Optimizers and schedules: names, defaults, state, clipnorm, configs, and every update
rule against an independent transcription of the torch.optim algorithm boxes, both on
raw flat buffers and through ``Sequential.fit``."""
import math

import numpy as np
import pytest

import fastnn as fn
from _helpers import active_backend, rng  # noqa: F401  (active_backend: fixture)
from fastnn import optimizers as opt
from fastnn import schedules

pytestmark = pytest.mark.usefixtures("active_backend")


class Reference:
    """torch.optim's algorithms, written out plainly in float64 (one instance per run)."""

    def __init__(self, kind, lr, **hyper):
        self.kind, self.lr, self.h = kind, lr, hyper
        self.t = 0
        self.buf = self.sum = self.v = self.gavg = self.m = self.vmax = None

    def lr_at(self, t):
        return self.lr(t) if callable(self.lr) else self.lr

    def step(self, p, g):
        self.t += 1
        t, h, lr = self.t, self.h, self.lr_at(self.t)
        wd = h.get("weight_decay", 0.0)
        if self.kind == "sgd":
            mu, damp = h.get("momentum", 0.0), h.get("dampening", 0.0)
            g = g + wd * p
            if mu:
                self.buf = g.copy() if t == 1 else mu * self.buf + (1 - damp) * g
                g = g + mu * self.buf if h.get("nesterov") else self.buf
            return p - lr * g
        if self.kind == "adagrad":
            g = g + wd * p
            clr = lr / (1 + (t - 1) * h.get("lr_decay", 0.0))
            self.sum = g * g if self.sum is None else self.sum + g * g
            return p - clr * g / (np.sqrt(self.sum) + h.get("eps", 1e-10))
        if self.kind == "rmsprop":
            alpha, eps, mu = h.get("alpha", 0.99), h.get("eps", 1e-8), h.get("momentum", 0.0)
            g = g + wd * p
            self.v = (1 - alpha) * g * g if self.v is None else alpha * self.v + (1 - alpha) * g * g
            v = self.v
            if h.get("centered"):
                self.gavg = (1 - alpha) * g if self.gavg is None else \
                    alpha * self.gavg + (1 - alpha) * g
                v = v - self.gavg ** 2
            if mu > 0:
                self.buf = g / (np.sqrt(v) + eps) if self.buf is None else \
                    mu * self.buf + g / (np.sqrt(v) + eps)
                return p - lr * self.buf
            return p - lr * g / (np.sqrt(v) + eps)
        if self.kind in ("adam", "adamw"):
            b1, b2 = h.get("betas", (0.9, 0.999))
            eps = h.get("eps", 1e-8)
            if self.kind == "adamw":
                p = p * (1 - lr * wd)
            else:
                g = g + wd * p
            self.m = (1 - b1) * g if self.m is None else b1 * self.m + (1 - b1) * g
            self.v = (1 - b2) * g * g if self.v is None else b2 * self.v + (1 - b2) * g * g
            m_hat = self.m / (1 - b1 ** t)
            if h.get("amsgrad"):
                self.vmax = self.v.copy() if self.vmax is None else np.maximum(self.vmax, self.v)
                v_hat = self.vmax / (1 - b2 ** t)
            else:
                v_hat = self.v / (1 - b2 ** t)
            return p - lr * m_hat / (np.sqrt(v_hat) + eps)
        raise AssertionError(self.kind)


CASES = {
    "sgd": (opt.SGD, "sgd", dict(lr=0.1)),
    "sgd_momentum": (opt.SGD, "sgd", dict(lr=0.1, momentum=0.9)),
    "sgd_nesterov": (opt.SGD, "sgd", dict(lr=0.05, momentum=0.8, nesterov=True)),
    "sgd_dampening_wd": (opt.SGD, "sgd", dict(lr=0.1, momentum=0.5, dampening=0.3,
                                               weight_decay=0.01)),
    "adagrad": (opt.Adagrad, "adagrad", dict(lr=0.1, lr_decay=0.05, weight_decay=0.01)),
    "rmsprop": (opt.RMSprop, "rmsprop", dict(lr=0.01)),
    "rmsprop_momentum_centered": (opt.RMSprop, "rmsprop",
                                  dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01)),
    "adam": (opt.Adam, "adam", dict(lr=0.05)),
    "adam_amsgrad_wd": (opt.Adam, "adam", dict(lr=0.05, betas=(0.8, 0.9), amsgrad=True,
                                               weight_decay=0.01)),
    "adamw": (opt.AdamW, "adamw", dict(lr=0.05, weight_decay=0.1)),
}


def reference_for(kind, hyper):
    hyper = dict(hyper)
    return Reference(kind, hyper.pop("lr"), **hyper)


# ---------------------------------------------------------------------------- raw buffers
@pytest.mark.parametrize("case", sorted(CASES))
def test_step_matches_torch_algorithm_on_flat_buffers(case):
    cls, kind, hyper = CASES[case]
    gen = rng()
    optimizer = cls(**hyper)
    ref = reference_for(kind, hyper)
    params = gen.normal(size=13)
    optimizer.build(params.size, params.dtype)
    expected = params.copy()
    for t in range(1, 7):
        # Gradient signs flip so that amsgrad's running max actually matters.
        g = gen.normal(size=13) * (3.0 if t % 2 else 0.3)
        expected = ref.step(expected, g)
        optimizer.step(params, g.copy())
        assert optimizer.iterations == t
        np.testing.assert_allclose(params, expected, rtol=1e-11, atol=1e-13,
                                   err_msg=f"step {t}")


def test_step_float32_buffers():
    gen = rng(1)
    params = gen.normal(size=20).astype(np.float32)
    optimizer = opt.Adam(lr=0.01)
    optimizer.build(params.size, params.dtype)
    ref = Reference("adam", 0.01)
    expected = params.astype(np.float64)
    for _ in range(5):
        g = gen.normal(size=20).astype(np.float32)
        expected = ref.step(expected, g.astype(np.float64))
        optimizer.step(params, g)
    assert params.dtype == np.float32
    assert all(s.dtype == np.float32 for s in optimizer.state.values())
    np.testing.assert_allclose(params, expected, rtol=1e-5, atol=1e-6)


def test_clipnorm_rescales_only_large_gradients():
    optimizer = opt.SGD(lr=1.0, clipnorm=1.0)
    optimizer.build(2, np.dtype(np.float64))
    params = np.zeros(2)
    optimizer.step(params, np.array([3.0, 4.0]))          # norm 5 -> scaled to norm 1
    np.testing.assert_allclose(params, [-0.6, -0.8], rtol=1e-12)
    optimizer.step(params, np.array([0.3, 0.4]))          # norm 0.5: untouched
    np.testing.assert_allclose(params, [-0.9, -1.2], rtol=1e-12)
    assert optimizer.get_config()["clipnorm"] == 1.0


def test_build_allocates_zeroed_state_and_keeps_fitting_state():
    for name in sorted(fn.optimizers.OPTIMIZERS):
        optimizer = fn.optimizers.get(name)
        optimizer.build(7, np.dtype(np.float32))
        assert set(optimizer.state) == set(type(optimizer).state_names)
        for buf in optimizer.state.values():
            assert buf.shape == (7,) and buf.dtype == np.float32 and not buf.any()
        before = dict(optimizer.state)
        optimizer.build(7, np.dtype(np.float32))
        assert all(optimizer.state[k] is before[k] for k in before)
        optimizer.build(9, np.dtype(np.float64))
        assert all(b.shape == (9,) and b.dtype == np.float64 for b in optimizer.state.values())


# ---------------------------------------------------------------------------- names
def test_optimizer_names_and_torch_defaults():
    assert set(fn.optimizers.OPTIMIZERS) == {"sgd", "momentum", "nesterov", "adagrad",
                                             "rmsprop", "adam", "adamw"}
    sgd = fn.optimizers.get("sgd")
    assert type(sgd) is opt.SGD and sgd.lr == 0.01 and sgd.momentum == 0
    momentum = fn.optimizers.get("momentum")
    assert momentum.momentum == 0.9 and not momentum.nesterov
    nesterov = fn.optimizers.get("nesterov")
    assert nesterov.momentum == 0.9 and nesterov.nesterov
    adagrad = fn.optimizers.get("adagrad")
    assert (adagrad.lr, adagrad.lr_decay, adagrad.eps) == (0.01, 0.0, 1e-10)
    rmsprop = fn.optimizers.get("rmsprop")
    assert (rmsprop.lr, rmsprop.alpha, rmsprop.eps, rmsprop.centered) == (0.01, 0.99, 1e-8, False)
    adam = fn.optimizers.get("adam")
    assert (adam.lr, adam.betas, adam.eps, adam.weight_decay) == (1e-3, (0.9, 0.999), 1e-8, 0.0)
    adamw = fn.optimizers.get("adamw")
    assert type(adamw) is opt.AdamW and adamw.weight_decay == 0.01
    assert fn.optimizers.get("adam") is not adam  # a fresh object per name
    assert fn.optimizers.get(adam) is adam


def test_unknown_optimizer_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamax'.*'adam'.*'sgd'"):
        fn.optimizers.get("adamax")
    with pytest.raises(TypeError, match="optimizer must be"):
        fn.optimizers.get(0.1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_round_trip(case):
    cls, _, hyper = CASES[case]
    optimizer = cls(clipnorm=2.0, **hyper)
    clone = fn.optimizers.from_config(optimizer.get_config())
    assert type(clone) is cls
    assert clone.get_config() == optimizer.get_config()
    assert repr(clone) == repr(optimizer)
    assert repr(optimizer).startswith(cls.__name__ + "(lr=")


def test_config_round_trip_with_schedule():
    optimizer = opt.SGD(lr=schedules.StepDecay(0.5, step_size=3, gamma=0.5), momentum=0.9)
    clone = fn.optimizers.from_config(optimizer.get_config())
    assert isinstance(clone.lr, schedules.StepDecay)
    assert [clone.current_lr(t) for t in range(1, 8)] == \
        [optimizer.current_lr(t) for t in range(1, 8)]


def test_lr_is_validated_and_settable():
    optimizer = opt.SGD()
    optimizer.lr = 0.25
    assert optimizer.current_lr() == 0.25
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lr"):
            optimizer.lr = bad
    with pytest.raises(TypeError, match="lr"):
        optimizer.lr = "0.1"
    with pytest.raises(TypeError, match="lr"):
        opt.Adam(lr=True)


def test_lr_scale_multiplies_the_rate():
    optimizer = opt.SGD(lr=schedules.InverseSqrt(1.0))
    optimizer.lr_scale = 0.5
    assert optimizer.current_lr(4) == pytest.approx(0.25)
    optimizer.build(1, np.dtype(np.float64))
    params = np.zeros(1)
    optimizer.step(params, np.ones(1))
    assert params[0] == pytest.approx(-0.5)


@pytest.mark.parametrize("lr", [0.3, schedules.StepDecay(0.5, step_size=2, gamma=0.1)],
                         ids=["constant", "schedule"])
def test_upcoming_lrs_are_the_next_updates_rates_into_out_when_given(lr):
    optimizer = opt.SGD(lr=lr)
    optimizer.iterations, optimizer.lr_scale = 3, 0.5
    expected = [optimizer.current_lr(t) for t in range(4, 9)]
    fresh = optimizer.upcoming_lrs(5)
    assert fresh.dtype == np.float64 and fresh.tolist() == expected
    out = np.full(5, np.nan)
    assert optimizer.upcoming_lrs(5, out) is out and out.tolist() == expected


# ---------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("schedule, formula", [
    (schedules.Constant(0.3), lambda t: 0.3),
    (schedules.InverseSqrt(0.5), lambda t: 0.5 / math.sqrt(t)),
    (schedules.InverseTime(0.5, k=0.1), lambda t: 0.5 / (1 + 0.1 * t)),
    (schedules.StepDecay(0.5, step_size=3, gamma=0.1), lambda t: 0.5 * 0.1 ** ((t - 1) // 3)),
    (schedules.ExponentialDecay(0.5, gamma=0.9), lambda t: 0.5 * 0.9 ** (t - 1)),
    (schedules.CosineDecay(0.5, T_max=10, eta_min=0.01),
     lambda t: 0.01 + 0.49 * (1 + math.cos(math.pi * min(t - 1, 10) / 10)) / 2),
], ids=lambda v: type(v).__name__ if isinstance(v, schedules.Schedule) else "")
def test_schedule_formulas_and_configs(schedule, formula):
    for t in range(1, 25):
        assert schedule(t) == pytest.approx(formula(t), rel=1e-12)
    clone = schedules.from_config(schedule.get_config())
    assert type(clone) is type(schedule) and repr(clone) == repr(schedule)
    assert [clone(t) for t in range(1, 25)] == [schedule(t) for t in range(1, 25)]


def test_schedule_validation():
    with pytest.raises(ValueError, match="lr"):
        schedules.InverseSqrt(0.0)
    with pytest.raises(ValueError, match="step_size"):
        schedules.StepDecay(0.1, step_size=0)
    with pytest.raises(ValueError, match="eta_min"):
        schedules.CosineDecay(0.1, T_max=5, eta_min=0.2)
    with pytest.raises(ValueError, match="unknown schedule 'Nope'"):
        schedules.from_config({"name": "Nope", "lr": 0.1})


def test_inverse_sqrt_first_update_uses_lr0_then_lr0_over_sqrt_t():
    lr0 = 0.5
    optimizer = opt.SGD(lr=schedules.InverseSqrt(lr0))
    optimizer.build(1, np.dtype(np.float64))
    params = np.zeros(1)
    for t in range(1, 11):
        assert optimizer.current_lr() == pytest.approx(lr0 / math.sqrt(t), rel=1e-15)
        before = params[0]
        optimizer.step(params, np.ones(1))
        # With a unit gradient the observed step size is the rate itself.
        assert before - params[0] == pytest.approx(lr0 / math.sqrt(t), rel=1e-12)
    assert optimizer.iterations == 10


# ---------------------------------------------------------------------------- through fit
def linear_problem():
    gen = rng(2)
    X = gen.normal(size=(6, 3))
    Y = gen.normal(size=(6, 2))
    W0 = gen.normal(size=(3, 2))
    b0 = gen.normal(size=2)
    return X, Y, W0, b0


def hand_gradient(X, Y, W, b):
    """d mean((X W + b - Y)^2) / d(W, b), the mean over all n*k elements."""
    dout = 2 * (X @ W + b - Y) / Y.size
    return X.T @ dout, dout.sum(axis=0)


FIT_CASES = dict(CASES, sgd_inverse_sqrt=(opt.SGD, "sgd", dict(lr=schedules.InverseSqrt(0.2))))


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_fit_full_batch_matches_hand_computed_updates(case):
    cls, kind, hyper = FIT_CASES[case]
    X, Y, W0, b0 = linear_problem()
    model = fn.Sequential([fn.Dense(3, 2, dtype="float64")])
    model.set_weights([W0, b0])
    model.compile("mse", cls(**hyper))
    steps = 5
    model.fit(X, Y, epochs=steps, batch_size=None, shuffle=False, verbose=0)

    ref = reference_for(kind, hyper)
    flat = np.concatenate([W0.ravel(), b0])
    for _ in range(steps):
        W, b = flat[:6].reshape(3, 2), flat[6:]
        dW, db = hand_gradient(X, Y, W, b)
        flat = ref.step(flat, np.concatenate([dW.ravel(), db]))
    W, b = model.get_weights()
    np.testing.assert_allclose(W, flat[:6].reshape(3, 2), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b, flat[6:], rtol=1e-10, atol=1e-12)
    assert model.optimizer.iterations == steps


def test_fit_observes_inverse_sqrt_step_sizes():
    """One full-batch SGD step per epoch: the t-th weight change is lr0/sqrt(t) * grad."""
    X, Y, W0, b0 = linear_problem()
    model = fn.Sequential([fn.Dense(3, 2, dtype="float64")])
    model.set_weights([W0, b0])
    model.compile("mse", opt.SGD(lr=schedules.InverseSqrt(0.3)))
    for t in range(1, 6):
        assert model.optimizer.current_lr() == pytest.approx(0.3 / math.sqrt(t))
        _, (dW, db) = model.compute_gradients(X, Y)
        before = model.params.copy()
        model.fit(X, Y, epochs=1, batch_size=None, verbose=0)
        step = before - model.params
        np.testing.assert_allclose(step, 0.3 / math.sqrt(t) * np.concatenate([dW.ravel(), db]),
                                   rtol=1e-10)


def test_an_optimizer_reused_by_another_model_starts_afresh():
    """State belongs to the model that built it: a second model compiled with the same
    optimizer object does not inherit the first one's momentum or update count."""
    X = np.linspace(-1, 1, 32)[:, None]
    y = 2 * X

    def model():
        m = fn.Sequential([fn.Dense(1, 1, seed=0)])
        return m

    shared = fn.optimizers.Adam(lr=0.1)
    first = model()
    first.compile("mse", shared)
    first.fit(X, y, epochs=3, batch_size=8, verbose=0)
    assert shared.iterations == 12
    second = model()
    second.compile("mse", shared)
    assert shared.iterations == 0
    assert all(not s.any() for s in shared.state.values())
    second.fit(X, y, epochs=3, batch_size=8, verbose=0, seed=0)
    fresh = model()
    fresh.compile("mse", fn.optimizers.Adam(lr=0.1))
    fresh.fit(X, y, epochs=3, batch_size=8, verbose=0, seed=0)
    np.testing.assert_array_equal(second.params, fresh.params)
    second.compile("mse", shared, metrics=["mae"])  # recompiling keeps the state
    assert shared.iterations == 12
