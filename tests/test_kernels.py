"""Kernel tests: every kernel, every backend, both dtypes.

Two kinds of check. Each backend is compared with the reference ``_numpy`` (the
oracle) over shapes that catch indexing bugs: 1x1, one row, one column, odd sizes and
a typical 128x784->256 layer. And the reference itself is checked against things that
do not share its code: textbook formulas (scipy.special, plain ``math`` loops over
PyTorch's loss definitions), central finite differences, and a line-by-line
transcription of the torch.optim algorithm boxes. So a bug in ``_numpy.py`` fails too.

Backend / dtype parametrization and tolerances live in ``conftest.py``.
"""
import functools
import math
from collections import namedtuple

import numpy as np
import pytest
import scipy.special

from fastnn import kernels
from fastnn.gradcheck import numerical_gradient
from fastnn.kernels import ACTIVATIONS, DEFAULT_ALPHA

#: The oracle, for results computed once and shared by every backend's test (the
#: ``oracle`` fixture is the same module).
ORACLE = kernels.load("numpy")

ACT_NAMES = tuple(ACTIVATIONS)

#: The kernel contract: every backend module has all of these.
KERNELS = (
    "activation_forward", "activation_backward", "dense_forward", "dense_backward",
    "dense_per_sample_grad", "dense_stack_forward", "softmax_forward",
    "softmax_cross_entropy", "sigmoid_binary_cross_entropy", "mean_squared_error",
    "mean_absolute_error", "huber", "multiclass_hinge",
    "sgd_update", "adagrad_update", "rmsprop_update", "adam_update",
)

#: Activations with a non-default ``alpha`` as well as the default (None: omitted).
ACT_CASES = [(name, None) for name in ACT_NAMES] + [("leaky_relu", 0.2), ("elu", 1.7)]

# Central differences in float64: step and tolerances.
FD_STEP = 1e-6
FD_RTOL, FD_ATOL = 1e-5, 1e-7
# Inputs of finite-difference checks stay this far from kinks (relu at 0, |d| = delta...).
KINK_GAP = 1e-3

#: Fill of memory a kernel must not touch (unused optimizer buffers, Jacobian columns of
#: other layers), and of SGD's momentum buffer before step 1, which must be overwritten.
SENTINEL = 7.0
#: Seed of inputs shared between tests (per-test inputs come from the ``rng`` fixture).
DENSE_SEED = 7

ELEMENTWISE_SHAPES = [(1, 1), (1, 13), (13, 1), (7, 13), (128, 256)]
DENSE_SHAPES = [(1, 1, 1), (1, 13, 7), (7, 1, 13), (7, 13, 1), (7, 13, 5), (128, 784, 256)]


def shape_id(shape):
    return "x".join(map(str, shape))


def dense_id(shape):
    n, d, k = shape
    return f"{n}x{d}->{k}"


def act_case_id(case):
    name, alpha = case
    return name if alpha is None else f"{name}-alpha{alpha}"


def alpha_args(alpha):
    """Trailing positional ``alpha``: omitted for the default, so the default is tested."""
    return () if alpha is None else (alpha,)


def resolved_alpha(name, alpha):
    return DEFAULT_ALPHA[ACTIVATIONS[name]] if alpha is None else alpha


def nans(shape, dtype):
    """An output buffer that shows any entry a kernel forgot to write."""
    return np.full(shape, np.nan, dtype=dtype)


def peak(x):
    """Largest |x| (1 for an all-zero array): the scale of a buffer's rounding error."""
    top = float(np.max(np.abs(x))) if np.size(x) else 0.0
    return top if top > 0 else 1.0


def describe(weights):
    return "None" if weights is None else "per-sample"


def read_only(*arrays):
    for a in arrays:
        a.setflags(write=False)
    return arrays


def test_backend_has_every_kernel(backend):
    missing = [name for name in KERNELS if not callable(getattr(backend, name, None))]
    assert not missing, f"{backend.__name__} lacks kernels {missing}"


# ----------------------------------------------------------------------------------
# Activations: independent formulas in float64
# ----------------------------------------------------------------------------------

def act_value(name, z, alpha):
    """act(z) from the textbook definitions, in float64."""
    z = np.asarray(z, dtype=np.float64)
    if name == "identity":
        return z.copy()
    if name == "step":
        return (z >= 0).astype(np.float64)
    if name == "sigmoid":
        return scipy.special.expit(z)
    if name == "tanh":
        return np.tanh(z)
    if name == "relu":
        return np.where(z > 0, z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, alpha * z)
    if name == "softplus":
        return -scipy.special.log_expit(-z)  # log(1 + e^z)
    if name == "elu":
        return np.where(z > 0, z, alpha * (np.exp(np.minimum(z, 0)) - 1))
    raise AssertionError(name)


def act_derivative(name, z, alpha):
    """d act(z) / dz from the textbook definitions, in float64 (step: 0 almost everywhere)."""
    z = np.asarray(z, dtype=np.float64)
    if name == "identity":
        return np.ones_like(z)
    if name == "step":
        return np.zeros_like(z)
    if name == "sigmoid":
        return scipy.special.expit(z) * scipy.special.expit(-z)
    if name == "tanh":
        with np.errstate(over="ignore"):
            return 1 / np.cosh(z) ** 2
    if name == "relu":
        return (z > 0).astype(np.float64)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, alpha)
    if name == "softplus":
        return scipy.special.expit(z)
    if name == "elu":
        return np.where(z > 0, 1.0, alpha * np.exp(np.minimum(z, 0)))
    raise AssertionError(name)


def activation_input(rng, shape, dtype):
    """Pre-activations over the interesting range, with one exact 0 (the kinks' point)."""
    z = rng.standard_normal(shape) * 3
    if z.size >= 3:
        z.flat[1] = 0.0
    return z.astype(dtype)


@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("act", ACT_NAMES)
def test_activation_forward(backend, oracle, dtype, rng, assert_close, act, shape):
    code = ACTIVATIONS[act]
    z = activation_input(rng, shape, dtype)
    out, expected = nans(shape, dtype), nans(shape, dtype)
    assert backend.activation_forward(code, z, out) is None
    oracle.activation_forward(code, z, expected)
    msg = f"{backend.__name__}.activation_forward({act}) shape {shape}"
    assert_close(out, expected, msg + " vs _numpy")
    assert_close(out, act_value(act, z, resolved_alpha(act, None)), msg + " vs formula")


@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=shape_id)
@pytest.mark.parametrize("act", ACT_NAMES)
def test_activation_backward(backend, oracle, dtype, rng, assert_close, act, shape):
    code = ACTIVATIONS[act]
    z = activation_input(rng, shape, dtype)
    a = np.empty_like(z)
    oracle.activation_forward(code, z, a)
    dout = rng.standard_normal(shape).astype(dtype)
    out, expected = nans(shape, dtype), nans(shape, dtype)
    assert backend.activation_backward(code, a, dout, out) is None
    oracle.activation_backward(code, a, dout, expected)
    msg = f"{backend.__name__}.activation_backward({act}) shape {shape}"
    assert_close(out, expected, msg + " vs _numpy")
    exact = dout * act_derivative(act, z, resolved_alpha(act, None))
    assert_close(out, exact, msg + " vs dout * act'(z)")


@pytest.mark.parametrize("act,alpha", [("leaky_relu", 0.2), ("leaky_relu", 0.0),
                                       ("elu", 0.5), ("elu", 1.7)])
def test_activation_explicit_alpha(backend, oracle, dtype, rng, assert_close, act, alpha):
    code = ACTIVATIONS[act]
    z = activation_input(rng, (7, 13), dtype)
    dout = rng.standard_normal(z.shape).astype(dtype)
    a, expected_a = nans(z.shape, dtype), nans(z.shape, dtype)
    backend.activation_forward(code, z, a, alpha)
    oracle.activation_forward(code, z, expected_a, alpha)
    msg = f"{backend.__name__} {act} alpha={alpha}"
    assert_close(a, expected_a, msg + " forward vs _numpy")
    assert_close(a, act_value(act, z, alpha), msg + " forward vs formula")
    da, expected_da = nans(z.shape, dtype), nans(z.shape, dtype)
    backend.activation_backward(code, expected_a, dout, da, alpha)
    oracle.activation_backward(code, expected_a, dout, expected_da, alpha)
    assert_close(da, expected_da, msg + " backward vs _numpy")
    assert_close(da, dout * act_derivative(act, z, alpha), msg + " backward vs formula")

    # alpha=None means the activation's default, exactly as when it is omitted.
    default_out, none_out = nans(z.shape, dtype), nans(z.shape, dtype)
    backend.activation_forward(code, z, default_out)
    backend.activation_forward(code, z, none_out, None)
    np.testing.assert_array_equal(none_out, default_out, err_msg=msg + " alpha=None")

    # The dense kernels take the same trailing alpha.
    x = rng.standard_normal((7, 4)).astype(dtype)
    w = (rng.standard_normal((4, 13)) / 2).astype(dtype)
    b = rng.standard_normal(13).astype(dtype)
    out, expected_out = nans((7, 13), dtype), nans((7, 13), dtype)
    backend.dense_forward(x, w, b, code, out, alpha)
    oracle.dense_forward(x, w, b, code, expected_out, alpha)
    assert_close(out, expected_out, msg + " dense_forward vs _numpy", scale=2.0)
    grads = [nans(s, dtype) for s in ((7, 13), (7, 4), (4, 13), (13,))]
    expected_grads = [nans(s, dtype) for s in ((7, 13), (7, 4), (4, 13), (13,))]
    backend.dense_backward(x, w, expected_out, dout, code, *grads, alpha)
    oracle.dense_backward(x, w, expected_out, dout, code, *expected_grads, alpha)
    for got, want, name in zip(grads, expected_grads, ("dz", "dx", "dw", "db")):
        assert_close(got, want, msg + f" dense_backward {name} vs _numpy", scale=3.0)


@pytest.mark.parametrize("act", ACT_NAMES)
def test_activation_in_place(backend, oracle, dtype, rng, assert_close, act):
    """``out`` may alias ``z`` (forward) and ``dout`` (backward); dense ``dz`` may alias
    ``dout``."""
    code = ACTIVATIONS[act]
    z = activation_input(rng, (7, 13), dtype)
    a = nans(z.shape, dtype)
    oracle.activation_forward(code, z, a)
    buf = z.copy()
    backend.activation_forward(code, buf, buf)
    assert_close(buf, a, f"{backend.__name__} activation_forward({act}) out is z")

    dout = rng.standard_normal(z.shape).astype(dtype)
    expected = nans(z.shape, dtype)
    oracle.activation_backward(code, a, dout, expected)
    buf = dout.copy()
    backend.activation_backward(code, a, buf, buf)
    assert_close(buf, expected, f"{backend.__name__} activation_backward({act}) out is dout")

    x = rng.standard_normal((7, 5)).astype(dtype)
    w = (rng.standard_normal((5, 13)) / 2).astype(dtype)
    dx, dw, db = nans((7, 5), dtype), nans((5, 13), dtype), nans(13, dtype)
    edz, edx, edw, edb = (nans(s, dtype) for s in (z.shape, (7, 5), (5, 13), (13,)))
    oracle.dense_backward(x, w, a, dout, code, edz, edx, edw, edb)
    buf = dout.copy()
    backend.dense_backward(x, w, a, buf, code, buf, dx, dw, db)
    msg = f"{backend.__name__} dense_backward({act}) dz is dout"
    for got, want, name in ((buf, edz, "dz"), (dx, edx, "dx"), (dw, edw, "dw"), (db, edb, "db")):
        assert_close(got, want, f"{msg}: {name}", scale=3.0)


# ----------------------------------------------------------------------------------
# Dense layer
# ----------------------------------------------------------------------------------

def spread(m, count=9):
    """Up to ``count`` indices spread over range(m), first and last included: where a big
    output is also checked against an independent float64 formula (all of it is
    compared with _numpy)."""
    return np.unique(np.linspace(0, m - 1, min(m, count)).round().astype(np.int64))


def dense_inputs(rng, n, d, k, dtype):
    """x ~ N(0, 1), w ~ N(0, 1/d), so pre-activations are of order one at any width."""
    x = rng.standard_normal((n, d)).astype(dtype)
    w = (rng.standard_normal((d, k)) / math.sqrt(d)).astype(dtype)
    b = (0.5 * rng.standard_normal(k)).astype(dtype)
    return x, w, b


@functools.lru_cache(maxsize=None)
def dense_reference(dtype, act, shape):
    """Inputs of the dense tests and the oracle's results on them, computed once and
    shared by every backend (read-only: the tests pass copies to the kernels).

    Returns x, w, b, dout, z (pre-activation), a (forward output) and the oracle's
    dz, dx, dw, db for ``dout``.
    """
    n, d, k = shape
    rng = np.random.default_rng(DENSE_SEED)
    x, w, b = dense_inputs(rng, n, d, k, dtype)
    dout = rng.standard_normal((n, k)).astype(dtype)
    z, a = nans((n, k), dtype), nans((n, k), dtype)
    ORACLE.dense_forward(x, w, b, ACTIVATIONS["identity"], z)
    ORACLE.dense_forward(x, w, b, ACTIVATIONS[act], a)
    grads = [nans(s, dtype) for s in ((n, k), (n, d), (d, k), (k,))]
    ORACLE.dense_backward(x, w, a, dout, ACTIVATIONS[act], *grads)
    return read_only(x, w, b, dout, z, a, *grads)


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=dense_id)
@pytest.mark.parametrize("act", ACT_NAMES)
def test_dense_forward(backend, dtype, assert_close, act, shape):
    n, d, k = shape
    x, w, b, _, z, expected = dense_reference(dtype, act, shape)[:6]
    out = nans((n, k), dtype)
    assert backend.dense_forward(x.copy(), w.copy(), b.copy(), ACTIVATIONS[act], out) is None
    msg = f"{backend.__name__}.dense_forward({act}) {dense_id(shape)}"
    scale = math.sqrt(d)
    # For step, rounding of the matmul may flip a z within rounding distance of 0.
    clear = np.abs(z) > 1e-3 if act == "step" else np.ones(z.shape, dtype=bool)
    assert_close(out[clear], expected[clear], msg + " vs _numpy", scale=scale)
    rows = spread(n)
    z64 = x[rows].astype(np.float64) @ w.astype(np.float64) + b.astype(np.float64)
    clear = clear[rows] & (np.abs(z64) > 1e-3 if act == "step" else True)
    formula = act_value(act, z64, resolved_alpha(act, None))
    assert_close(out[rows][clear], formula[clear], msg + f" vs act(x @ w + b), rows {rows}",
                 scale=scale)


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=dense_id)
@pytest.mark.parametrize("act", ACT_NAMES)
def test_dense_backward(backend, dtype, assert_close, act, shape):
    n, d, k = shape
    x, w, _, dout, _, a, *want = dense_reference(dtype, act, shape)
    got = [nans(e.shape, dtype) for e in want]
    assert backend.dense_backward(x.copy(), w.copy(), a.copy(), dout.copy(), ACTIVATIONS[act],
                                  *got) is None
    dz, dx, dw, db = got
    msg = f"{backend.__name__}.dense_backward({act}) {dense_id(shape)}"
    scales = {"dz": 1.0, "dx": math.sqrt(k), "dw": math.sqrt(n), "db": math.sqrt(n)}
    for name, g, e in zip(("dz", "dx", "dw", "db"), got, want):
        assert_close(g, e, f"{msg}: {name} vs _numpy", scale=scales[name])
    # The matmul part checked independently, from the backend's own dz.
    dz64, x64, w64 = dz.astype(np.float64), x.astype(np.float64), w.astype(np.float64)
    cols, rows = spread(k), spread(n)
    assert_close(dw[:, cols], x64.T @ dz64[:, cols], f"{msg}: dw vs x.T @ dz, columns {cols}",
                 scale=scales["dw"])
    assert_close(db, dz64.sum(axis=0), f"{msg}: db vs dz.sum(0)", scale=scales["db"])
    assert_close(dx[rows], dz64[rows] @ w64.T, f"{msg}: dx vs dz @ w.T, rows {rows}",
                 scale=scales["dx"])


@pytest.mark.parametrize("shape", [(7, 13, 5), (128, 784, 256)], ids=dense_id)
def test_dense_backward_without_dx(backend, dtype, rng, assert_close, shape):
    """dx=None (first layer): dz, dw, db as with dx, and no input written."""
    n, d, k = shape
    x, w, b = dense_inputs(rng, n, d, k, dtype)
    # Every activation on the small layer; the big one (parallel paths) needs just one.
    for act in ACT_NAMES if n * d * k < 10_000 else ("relu",):
        code = ACTIVATIONS[act]
        a = nans((n, k), dtype)
        backend.dense_forward(x, w, b, code, a)
        dout = rng.standard_normal((n, k)).astype(dtype)
        inputs = {"x": x, "w": w, "a": a, "dout": dout}
        before = {name: arr.copy() for name, arr in inputs.items()}
        with_dx = [nans(s, dtype) for s in ((n, k), (n, d), (d, k), (k,))]
        backend.dense_backward(x, w, a, dout, code, *with_dx)
        dz, dw, db = nans((n, k), dtype), nans((d, k), dtype), nans(k, dtype)
        assert backend.dense_backward(x, w, a, dout, code, dz, None, dw, db) is None
        msg = f"{backend.__name__}.dense_backward({act}, dx=None) {dense_id(shape)}"
        assert_close(dz, with_dx[0], msg + ": dz")
        assert_close(dw, with_dx[2], msg + ": dw", scale=math.sqrt(n))
        assert_close(db, with_dx[3], msg + ": db", scale=math.sqrt(n))
        for name, arr in inputs.items():
            np.testing.assert_array_equal(arr, before[name], err_msg=f"{msg}: wrote {name}")


PER_SAMPLE_SHAPES = [(1, 1, 1), (1, 13, 7), (7, 1, 13), (13, 7, 1), (7, 13, 5), (128, 100, 10)]


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", PER_SAMPLE_SHAPES, ids=dense_id)
def test_dense_per_sample_grad(backend, oracle, dtype, rng, assert_close, shape, use_bias):
    """jac[s, off + i*k + j] = x[s, i] dz[s, j] (and dz[s, j] after it with a bias);
    every other column untouched; x and dz read-only."""
    n, d, k = shape
    x, dz = read_only(rng.standard_normal((n, d)).astype(dtype),
                      rng.standard_normal((n, k)).astype(dtype))
    width = d * k + (k if use_bias else 0)
    for offset in (0, 5) if n * d * k < 10_000 else (5,):
        msg = (f"{backend.__name__}.dense_per_sample_grad {dense_id(shape)} offset={offset} "
               f"use_bias={use_bias}")
        jac = np.full((n, offset + width + 3), SENTINEL, dtype=dtype)
        expected = jac.copy()
        assert backend.dense_per_sample_grad(x, dz, jac, offset, use_bias) is None
        oracle.dense_per_sample_grad(x, dz, expected, offset, use_bias)
        assert_close(jac, expected, msg + " vs _numpy")
        x64, dz64 = x.astype(np.float64), dz.astype(np.float64)
        outer = np.einsum("si,sj->sij", x64, dz64).reshape(n, d * k)
        assert_close(jac[:, offset:offset + d * k], outer, msg + ": x_s dz_s^T rows")
        if use_bias:
            assert_close(jac[:, offset + d * k:offset + width], dz64, msg + ": bias columns")
        # Summed over samples, the rows are dense_backward's dw.
        assert_close(jac[:, offset:offset + d * k].sum(axis=0, dtype=np.float64).reshape(d, k),
                     x64.T @ dz64, msg + ": sum over samples vs x.T @ dz", scale=math.sqrt(n))
        untouched = np.ones(jac.shape[1], dtype=bool)
        untouched[offset:offset + width] = False
        np.testing.assert_array_equal(jac[:, untouched], SENTINEL,
                                      err_msg=msg + ": wrote outside its columns")


@pytest.mark.parametrize("shape", [(0, 3)] + ELEMENTWISE_SHAPES + [(3, 10)], ids=shape_id)
def test_softmax_forward(backend, oracle, dtype, rng, assert_close, shape):
    z = (10 * rng.standard_normal(shape)).astype(dtype)
    if shape == (3, 10):
        z[1] = [800, -800, 0, 1, 2, 3, 4, 5, 6, 7]  # a big-logit row: max-subtracted
    expected = nans(shape, dtype)
    oracle.softmax_forward(z, expected)
    out = nans(shape, dtype)
    assert backend.softmax_forward(read_only(z.copy())[0], out) is None
    msg = f"{backend.__name__}.softmax_forward {shape_id(shape)}"
    assert_close(out, expected, msg + " vs _numpy")
    assert_close(expected, scipy.special.softmax(z.astype(np.float64), axis=1),
                 msg + ": _numpy vs scipy.special.softmax")
    in_place = z.copy()
    backend.softmax_forward(in_place, in_place)
    assert_close(in_place, expected, msg + " in place")


def test_softmax_forward_refuses_mismatched_arguments(backend):
    with pytest.raises(ValueError, match=r"out must have shape \(2, 3\)"):
        backend.softmax_forward(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="z must have at least one column"):
        backend.softmax_forward(np.zeros((2, 0)), np.zeros((2, 0)))


# ----------------------------------------------------------------------------------
# A stack of dense layers in one call (the inference path)
# ----------------------------------------------------------------------------------

#: (widths, use_bias) of the stacks: one layer (no workspace), a 1-wide hidden layer,
#: the digits net, and five layers with odd widths, some without bias.
STACKS = [((13, 7), (1,)), ((5, 1, 3), (1, 0)), ((64, 128, 64, 10), (1, 1, 1)),
          ((9, 17, 4, 31, 6, 2), (0, 1, 1, 0, 1))]
STACK_ROWS = (0, 1, 7, 129)


def stack_id(stack):
    widths, use_bias = stack
    return "-".join(map(str, widths)) + ("" if all(use_bias) else "-nobias")


def stack_arrays(widths, use_bias, acts, alpha, dtype, rng):
    """The kernel's layer description and params (N(0, 1/d) weights, N(0, 1/4) biases)."""
    widths = np.array(widths, np.int64)
    n_layers = widths.shape[0] - 1
    codes = np.array([ACTIVATIONS[acts[i % len(acts)]] for i in range(n_layers)], np.int64)
    alphas = np.array([DEFAULT_ALPHA[c] if alpha is None else alpha for c in codes])
    parts = []
    for d, k, bias in zip(widths[:-1], widths[1:], use_bias):
        parts.append(rng.standard_normal(d * k) / math.sqrt(d))
        if bias:
            parts.append(0.5 * rng.standard_normal(k))
    params = np.concatenate(parts).astype(dtype)
    return widths, codes, alphas, np.array(use_bias, np.int64), params


def stack_formula(x, params, widths, codes, alphas, use_bias):
    """The stack's output from the textbook definitions, layer by layer in float64."""
    a, p = x.astype(np.float64), 0
    names = {code: name for name, code in ACTIVATIONS.items()}
    for layer, (d, k) in enumerate(zip(widths[:-1], widths[1:])):
        w = params[p:p + d * k].astype(np.float64).reshape(d, k)
        p += d * k
        z = a @ w
        if use_bias[layer]:
            z += params[p:p + k]
            p += k
        a = act_value(names[codes[layer]], z, alphas[layer])
    return a


@pytest.mark.parametrize("n", STACK_ROWS)
@pytest.mark.parametrize("stack", STACKS, ids=stack_id)
@pytest.mark.parametrize("act,alpha", [c for c in ACT_CASES if c[0] != "step"],
                         ids=[act_case_id(c) for c in ACT_CASES if c[0] != "step"])
def test_dense_stack_forward(backend, oracle, dtype, rng, assert_close, act, alpha, stack,
                             n):
    widths, codes, alphas, use_bias, params = stack_arrays(
        *stack, (act, "identity"), alpha, dtype, rng)
    x = rng.standard_normal((n, widths[0])).astype(dtype)
    size = kernels.dense_stack_workspace_size(n, widths)
    expected = nans((n, widths[-1]), dtype)
    oracle.dense_stack_forward(x, params, widths, codes, alphas, use_bias,
                               nans(size, dtype), expected)
    out = nans((n, widths[-1]), dtype)
    read_only(x, params, widths, codes, alphas, use_bias)
    assert backend.dense_stack_forward(x, params, widths, codes, alphas, use_bias,
                                       nans(size, dtype), out) is None
    msg = f"{backend.__name__}.dense_stack_forward({act}) {stack_id(stack)} n={n}"
    scale = math.sqrt(max(widths))
    assert_close(out, expected, msg + " vs _numpy", scale=scale)
    assert_close(expected, stack_formula(x, params, widths, codes, alphas, use_bias),
                 msg + ": _numpy vs the layer-by-layer formula", scale=scale)


def test_dense_stack_forward_writes_only_its_workspace(backend, dtype, rng):
    widths, codes, alphas, use_bias, params = stack_arrays(*STACKS[3], ("tanh",), None,
                                                           dtype, rng)
    x = rng.standard_normal((5, widths[0])).astype(dtype)
    size = kernels.dense_stack_workspace_size(5, widths)
    workspace = np.full(size + 3, SENTINEL, dtype)
    backend.dense_stack_forward(x, params, widths, codes, alphas, use_bias, workspace,
                                nans((5, widths[-1]), dtype))
    np.testing.assert_array_equal(workspace[size:], SENTINEL)


def stack_call(widths=(4, 6, 3), use_bias=(1, 1), n=2, acts=None, n_params=None,
               workspace_size=None, out_shape=None, dtype=np.float64):
    """The arguments of a valid dense_stack_forward call, with one of them changed."""
    widths, codes, alphas, use_bias, params = stack_arrays(
        widths, use_bias, ("relu",), None, dtype, np.random.default_rng(0))
    if acts is not None:
        codes = np.array(acts, np.int64)
    if n_params is not None:
        params = np.zeros(n_params, dtype)
    size = (kernels.dense_stack_workspace_size(n, widths) if workspace_size is None
            else workspace_size)
    out = np.empty(out_shape or (n, widths[-1]), dtype)
    return (np.zeros((n, widths[0]), dtype), params, widths, codes, alphas, use_bias,
            np.empty(size, dtype), out)


@pytest.mark.parametrize("change,match", [
    ({"acts": (4, 99)}, "act must be an activation code"),
    ({"acts": (4,)}, "acts must have shape"),
    ({"n_params": 10}, "params must have shape"),
    ({"workspace_size": 23}, "workspace must have at least 24 elements"),
    ({"out_shape": (2, 4)}, r"out must have shape \(2, 3\)"),
    ({"widths": (4, 0, 3)}, "widths must hold at least two widths, each >= 1"),
])
def test_dense_stack_forward_refuses_mismatched_arguments(backend, change, match):
    args = stack_call(**{k: v for k, v in change.items() if k != "widths"})
    if "widths" in change:
        args = args[:2] + (np.array(change["widths"], np.int64),) + args[3:]
    with pytest.raises(ValueError, match=match):
        backend.dense_stack_forward(*args)


def test_dense_stack_forward_refuses_mixed_dtypes(backend):
    args = list(stack_call())
    args[1] = args[1].astype(np.float32)
    with pytest.raises(ValueError, match="params must have dtype float64"):
        backend.dense_stack_forward(*args)


# ----------------------------------------------------------------------------------
# Gradients of activations and the dense layer: central differences, float64
# ----------------------------------------------------------------------------------

def away_from_zero(rng, shape):
    """N(0, 2) samples with |z| >= 0.05: no kink of relu/leaky_relu/elu/step nearby."""
    z = rng.standard_normal(shape) * 2
    return np.where(np.abs(z) < 0.05, np.copysign(0.05, z) + z, z)


@pytest.mark.parametrize("act,alpha", ACT_CASES, ids=[act_case_id(c) for c in ACT_CASES])
def test_activation_gradient_finite_differences(backend, rng, act, alpha):
    code = ACTIVATIONS[act]
    z = away_from_zero(rng, (4, 6))
    dout = rng.standard_normal(z.shape)

    def forward(zz):
        out = nans(zz.shape, np.float64)
        backend.activation_forward(code, np.ascontiguousarray(zz), out, *alpha_args(alpha))
        return out

    a = forward(z)
    grad = nans(z.shape, np.float64)
    backend.activation_backward(code, a, dout, grad, *alpha_args(alpha))
    numeric = dout * (forward(z + FD_STEP) - forward(z - FD_STEP)) / (2 * FD_STEP)
    np.testing.assert_allclose(grad, numeric, rtol=FD_RTOL, atol=FD_ATOL,
                               err_msg=f"{backend.__name__} {act_case_id((act, alpha))}")


@pytest.mark.parametrize("act,alpha", ACT_CASES, ids=[act_case_id(c) for c in ACT_CASES])
def test_dense_gradient_finite_differences(backend, rng, act, alpha):
    code = ACTIVATIONS[act]
    n, d, k = 3, 4, 5
    while True:  # deterministic: the seeded rng picks the same inputs every run
        x, w, b = dense_inputs(rng, n, d, k, np.float64)
        if np.abs(x @ w + b).min() > 0.01:
            break
    dout = rng.standard_normal((n, k))

    def objective():
        out = nans((n, k), np.float64)
        backend.dense_forward(x, w, b, code, out, *alpha_args(alpha))
        return float(np.sum(dout * out))

    a = nans((n, k), np.float64)
    backend.dense_forward(x, w, b, code, a, *alpha_args(alpha))
    dz, dx, dw, db = (nans(s, np.float64) for s in ((n, k), (n, d), (d, k), (k,)))
    backend.dense_backward(x, w, a, dout, code, dz, dx, dw, db, *alpha_args(alpha))
    msg = f"{backend.__name__}.dense_backward {act_case_id((act, alpha))}"
    for name, analytic, param in (("dx", dx, x), ("dw", dw, w), ("db", db, b)):
        numeric = numerical_gradient(objective, param, FD_STEP)
        np.testing.assert_allclose(analytic, numeric, rtol=FD_RTOL, atol=FD_ATOL,
                                   err_msg=f"{msg}: {name}")


# ----------------------------------------------------------------------------------
# Extreme inputs: exact known values, nothing NaN or inf
# ----------------------------------------------------------------------------------

EXTREME_Z = [1e4, -1e4, 1e3, -1e3, 90.0, -90.0, 0.0]
#: activation -> (act(z), act'(z)) at EXTREME_Z, exactly (to any dtype's precision).
EXTREME_VALUES = {
    "sigmoid": ([1, 0, 1, 0, 1, 0, 0.5], [0, 0, 0, 0, 0, 0, 0.25]),
    "softplus": ([1e4, 0, 1e3, 0, 90, 0, math.log(2)], [1, 0, 1, 0, 1, 0, 0.5]),
    "tanh": ([1, -1, 1, -1, 1, -1, 0], [0, 0, 0, 0, 0, 0, 1]),
    "elu": ([1e4, -1, 1e3, -1, 90, -1, 0], [1, 0, 1, 0, 1, 0, 1]),
}


@pytest.mark.parametrize("act", sorted(EXTREME_VALUES))
def test_activation_extreme_inputs(backend, dtype, assert_close, act):
    code = ACTIVATIONS[act]
    value, slope = (np.array([v], dtype=np.float64) for v in EXTREME_VALUES[act])
    m = len(EXTREME_Z)
    z = np.array([EXTREME_Z], dtype=dtype)
    msg = f"{backend.__name__} {act} at {EXTREME_Z}"

    a = nans((1, m), dtype)
    backend.activation_forward(code, z, a)
    assert np.isfinite(a).all(), f"{msg}: forward {a}"
    assert_close(a, value, msg + ": activation_forward")
    da = nans((1, m), dtype)
    backend.activation_backward(code, a, np.ones((1, m), dtype), da)
    assert np.isfinite(da).all(), f"{msg}: backward {da}"
    assert_close(da, slope, msg + ": activation_backward")

    # The same values through the dense kernels' fused epilogue: z = 1 @ 0 + b.
    x, w, b = np.ones((1, 1), dtype), np.zeros((1, m), dtype), z[0].copy()
    out = nans((1, m), dtype)
    backend.dense_forward(x, w, b, code, out)
    assert np.isfinite(out).all(), f"{msg}: dense_forward {out}"
    assert_close(out, value, msg + ": dense_forward")
    dz, dx, dw, db = nans((1, m), dtype), nans((1, 1), dtype), nans((1, m), dtype), nans(m, dtype)
    backend.dense_backward(x, w, out, np.ones((1, m), dtype), code, dz, dx, dw, db)
    for name, g in (("dz", dz), ("dw", dw[0]), ("db", db)):
        assert np.isfinite(g).all(), f"{msg}: dense_backward {name} {g}"
        assert_close(g.ravel(), slope.ravel(), f"{msg}: dense_backward {name}")
    assert_close(dx, [[0.0]], msg + ": dense_backward dx")


def test_float32_exponentials_are_accurate_over_the_whole_range(backend):
    """sigmoid (e^-|z|), softmax (e^(z - max)), tanh, elu (e^z - 1) and softplus
    (log1p) in float32, from where e^x underflows through the subnormal results to 0,
    within a few ulp of the float64 value (the cython backend computes them with its
    own inline expf, expm1f, log1pf and tanhf); NaN stays NaN. Measured: <= 3.3 ulp on every backend, but softmax on
    the numpy reference: 8.7 (its float32 normalisation)."""
    z = np.concatenate([np.linspace(-110, 30, 200_001), -np.logspace(-8, 2.05, 20_001),
                        [-103.97, -87.3365, -87.3366, 0.0]]).astype(np.float32)
    exact = scipy.special.expit(z.astype(np.float64))
    out = np.empty_like(z)
    backend.activation_forward(ACTIVATIONS["sigmoid"], z[None, :], out[None, :])
    ulps = np.abs(out - exact) / np.spacing(exact.astype(np.float32))
    assert ulps.max() <= 4, f"sigmoid: {ulps.max():.1f} ulp at z = {z[ulps.argmax()]}"

    # Softmax of one row [0, x] (a batch of one: no 1/n scaling): d(loss)/dz_1 with
    # label 0 is e^x / (1 + e^x).
    grad, label = np.empty((1, 2), np.float32), np.zeros(1, np.int64)
    for x, e in zip(z[::100], exact[::100]):
        backend.softmax_cross_entropy(np.array([[0, x]], np.float32), label, None, grad)
        ulps = abs(grad[0, 1] - e) / np.spacing(np.float32(e))
        assert ulps <= 16, f"softmax: {ulps:.1f} ulp at x = {x}"

    # tanh, elu (e^x - 1) and softplus (log1p) around 0 (where cancellation would
    # show) and beyond.
    tiny = np.logspace(-40, 1.5, 20_001)
    z = np.concatenate([np.linspace(-30, 30, 200_001), tiny, -tiny]).astype(np.float32)
    for act, f in (("tanh", np.tanh), ("elu", lambda v: np.where(v > 0, v, np.expm1(v))),
                   ("softplus", lambda v: np.maximum(v, 0) + np.log1p(np.exp(-np.abs(v))))):
        exact = f(z.astype(np.float64))
        out = np.empty_like(z)
        backend.activation_forward(ACTIVATIONS[act], z[None, :], out[None, :])
        ulps = np.abs(out - exact) / np.spacing(np.abs(exact).astype(np.float32))
        assert ulps.max() <= 4, f"{act}: {ulps.max():.1f} ulp at z = {z[ulps.argmax()]}"

    at_zero = {"sigmoid": 0.5, "tanh": 0.0, "elu": 0.0, "softplus": np.float32(np.log(2))}
    for act, value in at_zero.items():
        nan = np.array([[np.nan, 0.0]], np.float32)
        with np.errstate(invalid="ignore"):  # numpy's logaddexp warns on NaN
            backend.activation_forward(ACTIVATIONS[act], nan, out[None, :2])
        assert np.isnan(out[0]) and out[1] == value, act


# logits row, label, exact loss, exact d(loss)/d(logits) for that row alone.
EXTREME_CE_ROWS = {
    2: [([1e4, -1e4], 0, 0.0, [0, 0]),
        ([1e4, -1e4], 1, 2e4, [1, -1]),
        ([-1e4, 1e4], 0, 2e4, [-1, 1]),
        ([1e4, 1e4], 0, math.log(2), [-0.5, 0.5]),
        ([-1e4, -1e4], 1, math.log(2), [0.5, -0.5])],
    3: [([1e4, 0, -1e4], 2, 2e4, [1, 0, -1]),
        ([1e4, 0, -1e4], 1, 1e4, [1, -1, 0]),
        ([-1e4, 1e4, 1e4], 1, math.log(2), [0, -0.5, 0.5]),
        ([-1e4, -1e4, -1e4], 0, math.log(3), [-2 / 3, 1 / 3, 1 / 3])],
}


@pytest.mark.parametrize("k", sorted(EXTREME_CE_ROWS))
def test_cross_entropy_extreme_logits(backend, dtype, assert_close, k):
    rows = EXTREME_CE_ROWS[k]
    logits = np.array([r[0] for r in rows], dtype=dtype)
    labels = np.array([r[1] for r in rows], dtype=np.int64)
    losses = np.array([r[2] for r in rows])
    grads = np.array([r[3] for r in rows], dtype=np.float64)
    for i in range(len(rows)):
        msg = f"{backend.__name__} softmax_cross_entropy logits {rows[i][0]} label {rows[i][1]}"
        dlogits = nans((1, k), dtype)
        loss = backend.softmax_cross_entropy(logits[i:i + 1].copy(), labels[i:i + 1].copy(),
                                             None, dlogits)
        assert math.isfinite(loss) and np.isfinite(dlogits).all(), f"{msg}: {loss} {dlogits}"
        assert_close(loss, losses[i], msg + ": loss")
        assert_close(dlogits[0], grads[i], msg + ": dlogits")
        onehot = np.eye(k, dtype=dtype)[labels[i:i + 1]]
        dlogits = nans((1, k), dtype)
        loss = backend.softmax_cross_entropy(logits[i:i + 1].copy(), onehot, None, dlogits)
        assert_close(loss, losses[i], msg + ": loss, one-hot probability row")
        assert_close(dlogits[0], grads[i], msg + ": dlogits, one-hot probability row")
    n = len(rows)
    dlogits = nans((n, k), dtype)
    loss = backend.softmax_cross_entropy(logits, labels, None, dlogits)
    msg = f"{backend.__name__} softmax_cross_entropy batch of extreme rows, k={k}"
    assert_close(loss, losses.mean(), msg + ": loss")
    assert_close(dlogits, grads / n, msg + ": dlogits")


# logits row, targets, exact loss (mean over the row), exact gradient for that row alone.
EXTREME_BCE_ROWS = [
    ([1e4, -1e4], [1, 0], 0.0, [0, 0]),
    ([1e4, -1e4], [0, 1], 1e4, [0.5, -0.5]),
    ([-1e4, 1e4], [0.5, 0.5], 5e3, [-0.25, 0.25]),
    ([1e4, 1e4], [1, 1], 0.0, [0, 0]),
    ([-1e4, 0], [1, 0], (1e4 + math.log(2)) / 2, [-0.5, 0.25]),
]


def test_binary_cross_entropy_extreme_logits(backend, dtype, assert_close):
    logits = np.array([r[0] for r in EXTREME_BCE_ROWS], dtype=dtype)
    targets = np.array([r[1] for r in EXTREME_BCE_ROWS], dtype=dtype)
    losses = np.array([r[2] for r in EXTREME_BCE_ROWS])
    grads = np.array([r[3] for r in EXTREME_BCE_ROWS], dtype=np.float64)
    for i, row in enumerate(EXTREME_BCE_ROWS):
        msg = f"{backend.__name__} sigmoid_binary_cross_entropy logits {row[0]} targets {row[1]}"
        dpred = nans((1, 2), dtype)
        loss = backend.sigmoid_binary_cross_entropy(logits[i:i + 1].copy(),
                                                    targets[i:i + 1].copy(), None, dpred)
        assert math.isfinite(loss) and np.isfinite(dpred).all(), f"{msg}: {loss} {dpred}"
        assert_close(loss, losses[i], msg + ": loss")
        assert_close(dpred[0], grads[i], msg + ": dpred")
    n = len(EXTREME_BCE_ROWS)
    dpred = nans((n, 2), dtype)
    loss = backend.sigmoid_binary_cross_entropy(logits, targets, None, dpred)
    msg = f"{backend.__name__} sigmoid_binary_cross_entropy batch of extreme rows"
    assert_close(loss, losses.mean(), msg + ": loss")
    assert_close(dpred, grads / n, msg + ": dpred")


# ----------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------

LossCase = namedtuple("LossCase", "id kernel param target")
LOSS_CASES = [
    LossCase("cross_entropy-labels", "softmax_cross_entropy", None, "labels"),
    LossCase("cross_entropy-probs", "softmax_cross_entropy", None, "probs"),
    # Rows need not sum to one: then dlogits = softmax * sum_j y_ij - y.
    LossCase("cross_entropy-unnormalized", "softmax_cross_entropy", None, "soft"),
    LossCase("bce-binary", "sigmoid_binary_cross_entropy", None, "binary"),
    LossCase("bce-soft", "sigmoid_binary_cross_entropy", None, "soft"),
    LossCase("mse", "mean_squared_error", None, "real"),
    LossCase("mae", "mean_absolute_error", None, "real"),
    LossCase("huber-delta1", "huber", 1.0, "real"),
    LossCase("huber-delta0.5", "huber", 0.5, "real"),
    LossCase("hinge-margin1", "multiclass_hinge", 1.0, "labels"),
    LossCase("hinge-margin0.3", "multiclass_hinge", 0.3, "labels"),
]
LOSS_IDS = [c.id for c in LOSS_CASES]
#: (n, k, index of a row scaled to logits of order 1e4, or None).
LOSS_SHAPES = [(1, 1, None), (1, 13, None), (13, 1, None), (7, 13, None), (7, 13, 3),
               (256, 10, None)]


def loss_shape_id(shape):
    n, k, big = shape
    return f"{n}x{k}" + ("" if big is None else "-bigrow")


def make_target(case, rng, n, k, dtype):
    if case.target == "labels":
        return rng.integers(0, k, n).astype(np.int64)
    if case.target == "probs":
        return rng.dirichlet(np.ones(k), n).astype(dtype)
    if case.target == "binary":
        return (rng.random((n, k)) < 0.5).astype(dtype)
    if case.target == "soft":
        return rng.random((n, k)).astype(dtype)
    return rng.standard_normal((n, k)).astype(dtype)


def make_loss_inputs(case, rng, n, k, dtype, big_row=None):
    pred = 2 * rng.standard_normal((n, k))
    if big_row is not None:
        pred[big_row] *= 5e3
    return pred.astype(dtype), make_target(case, rng, n, k, dtype)


def call_loss(module, case, pred, target, weights, dpred):
    kernel = getattr(module, case.kernel)
    if case.param is None:
        return kernel(pred, target, weights, dpred)
    return kernel(pred, target, case.param, weights, dpred)


def _log_sigmoid(z):
    """log(1 / (1 + e^-z)) without overflow."""
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def torch_sample_loss(case, z, y):
    """One sample's loss l_i from PyTorch's definitions, so the batch loss is mean_i l_i.

    Plain float64 arithmetic, sharing nothing with the kernels.
    """
    z = [float(v) for v in z]
    k = len(z)
    if case.kernel == "softmax_cross_entropy":
        # CrossEntropyLoss: -sum_c y_c log softmax(z)_c; an index label is a one-hot y.
        top = max(z)
        log_norm = top + math.log(sum(math.exp(v - top) for v in z))
        y = [float(c == y) for c in range(k)] if case.target == "labels" else [float(v) for v in y]
        return -sum(yc * (zc - log_norm) for yc, zc in zip(y, z))
    if case.kernel == "multiclass_hinge":
        # Weston-Watkins: sum over wrong classes j of max(0, s_j - s_y + margin).
        return sum(max(0.0, z[j] - z[y] + case.param) for j in range(k) if j != y)
    t = [float(v) for v in y]
    if case.kernel == "sigmoid_binary_cross_entropy":
        # BCEWithLogitsLoss: -[t log sigmoid(z) + (1 - t) log(1 - sigmoid(z))].
        terms = [-(ti * _log_sigmoid(zi) + (1 - ti) * _log_sigmoid(-zi)) for zi, ti in zip(z, t)]
    elif case.kernel == "mean_squared_error":
        terms = [(zi - ti) ** 2 for zi, ti in zip(z, t)]
    elif case.kernel == "mean_absolute_error":
        terms = [abs(zi - ti) for zi, ti in zip(z, t)]
    elif case.kernel == "huber":
        delta = case.param
        terms = [0.5 * (zi - ti) ** 2 if abs(zi - ti) < delta
                 else delta * (abs(zi - ti) - 0.5 * delta)
                 for zi, ti in zip(z, t)]
    else:
        raise AssertionError(case.kernel)
    return sum(terms) / k  # these losses average over all n*k elements


def torch_loss(case, pred, target, weights=None):
    """Batch loss: mean_i l_i, or sum_i w_i l_i / sum_i w_i."""
    per_sample = [torch_sample_loss(case, pred[i], target[i]) for i in range(pred.shape[0])]
    w = [1.0] * len(per_sample) if weights is None else [float(v) for v in weights]
    return sum(wi * li for wi, li in zip(w, per_sample)) / sum(w)


@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=loss_shape_id)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_loss_matches_oracle(backend, oracle, dtype, rng, assert_close, case, shape):
    n, k, big = shape
    pred, target = make_loss_inputs(case, rng, n, k, dtype, big)
    sample_weights = rng.uniform(0.1, 2.0, n).astype(dtype)
    for weights in (None, sample_weights):
        msg = (f"{backend.__name__}.{case.kernel} [{case.id}] {loss_shape_id(shape)} "
               f"weights={describe(weights)}")
        dpred, expected_dpred = nans((n, k), dtype), nans((n, k), dtype)
        loss = call_loss(backend, case, pred, target, weights, dpred)
        expected = call_loss(oracle, case, pred, target, weights, expected_dpred)
        assert isinstance(loss, float), f"{msg}: returned {type(loss).__name__}, not float"
        assert_close(loss, expected, msg + ": loss vs _numpy")
        assert_close(dpred, expected_dpred, msg + ": dpred vs _numpy", scale=1.0 / n)


@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=loss_shape_id)
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_loss_matches_torch_definition(backend, dtype, rng, assert_close, case, shape):
    """Reductions as in PyTorch's MSELoss, L1Loss, HuberLoss, CrossEntropyLoss,
    BCEWithLogitsLoss, and the Weston-Watkins multiclass hinge."""
    n, k, big = shape
    pred, target = make_loss_inputs(case, rng, n, k, dtype, big)
    weights = rng.uniform(0.1, 2.0, n).astype(dtype)
    msg = f"{backend.__name__}.{case.kernel} [{case.id}] {loss_shape_id(shape)}"
    loss = call_loss(backend, case, pred, target, None, nans((n, k), dtype))
    assert_close(loss, torch_loss(case, pred, target), msg + ": mean")
    loss = call_loss(backend, case, pred, target, weights, nans((n, k), dtype))
    assert_close(loss, torch_loss(case, pred, target, weights), msg + ": weighted mean")


def distance_to_kink(case, pred, target):
    """How far the inputs are from a point where the loss is not differentiable."""
    if case.kernel == "mean_absolute_error":
        return np.abs(pred - target).min()
    if case.kernel == "huber":
        return np.abs(np.abs(pred - target) - case.param).min()
    if case.kernel == "multiclass_hinge":
        rows = np.arange(pred.shape[0])
        margins = pred - pred[rows, target][:, None] + case.param
        margins[rows, target] = np.inf
        return np.abs(margins).min()
    return np.inf


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_loss_gradient_finite_differences(backend, rng, case, weighted):
    n, k = 5, 4
    while True:  # deterministic: the seeded rng picks the same inputs every run
        pred, target = make_loss_inputs(case, rng, n, k, np.float64)
        if distance_to_kink(case, pred, target) > KINK_GAP:
            break
    weights = rng.uniform(0.1, 2.0, n) if weighted else None
    dpred = nans((n, k), np.float64)
    call_loss(backend, case, pred, target, weights, dpred)
    numeric = numerical_gradient(
        lambda: call_loss(backend, case, pred, target, weights, None), pred, FD_STEP)
    np.testing.assert_allclose(
        dpred, numeric, rtol=FD_RTOL, atol=FD_ATOL,
        err_msg=f"{backend.__name__}.{case.kernel} [{case.id}] weighted={weighted}")


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_loss_without_gradient(backend, dtype, rng, assert_close, case):
    """dpred=None computes the same loss."""
    n, k = 7, 13
    pred, target = make_loss_inputs(case, rng, n, k, dtype)
    weights = rng.uniform(0.1, 2.0, n).astype(dtype)
    for w in (None, weights):
        msg = f"{backend.__name__}.{case.kernel} [{case.id}] weights={describe(w)}"
        with_grad = call_loss(backend, case, pred, target, w, nans((n, k), dtype))
        without = call_loss(backend, case, pred, target, w, None)
        assert isinstance(without, float), f"{msg}: dpred=None returned {type(without).__name__}"
        assert_close(without, with_grad, msg + ": loss with dpred=None")


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_loss_weights_are_a_weighted_mean_of_rows(backend, dtype, rng, assert_close, case):
    """loss = sum w_i l_i / sum w_i with l_i from single-row calls; dpred_i = w_i/sum(w) * dl_i."""
    n, k = 6, 5
    pred, target = make_loss_inputs(case, rng, n, k, dtype)
    weights = rng.uniform(0.1, 3.0, n)
    weights[2] = 0.0  # a zero weight drops its sample
    weights = weights.astype(dtype)
    row_losses, row_grads = [], []
    for i in range(n):
        drow = nans((1, k), dtype)
        row_losses.append(call_loss(backend, case, np.ascontiguousarray(pred[i:i + 1]),
                                    np.ascontiguousarray(target[i:i + 1]), None, drow))
        row_grads.append(drow[0].astype(np.float64))
    w64 = weights.astype(np.float64)
    dpred = nans((n, k), dtype)
    loss = call_loss(backend, case, pred, target, weights, dpred)
    msg = f"{backend.__name__}.{case.kernel} [{case.id}] weights {weights}"
    assert_close(loss, np.dot(w64, row_losses) / w64.sum(), msg + ": loss")
    assert_close(dpred, (w64 / w64.sum())[:, None] * np.array(row_grads), msg + ": dpred")


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_loss_uniform_weights_equal_no_weights(backend, dtype, rng, assert_close, case):
    n, k = 7, 13
    pred, target = make_loss_inputs(case, rng, n, k, dtype)
    d_none, d_uniform = nans((n, k), dtype), nans((n, k), dtype)
    loss_none = call_loss(backend, case, pred, target, None, d_none)
    loss_uniform = call_loss(backend, case, pred, target, np.full(n, 2.5, dtype), d_uniform)
    msg = f"{backend.__name__}.{case.kernel} [{case.id}] weights all 2.5 vs None"
    assert_close(loss_uniform, loss_none, msg + ": loss")
    assert_close(d_uniform, d_none, msg + ": dpred", scale=1.0 / n)


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (256, 10)], ids=shape_id)
def test_cross_entropy_one_hot_rows_equal_labels(backend, dtype, rng, assert_close, shape):
    n, k = shape
    logits = (2 * rng.standard_normal((n, k))).astype(dtype)
    labels = rng.integers(0, k, n).astype(np.int64)
    onehot = np.ascontiguousarray(np.eye(k, dtype=dtype)[labels])
    weights = rng.uniform(0.1, 2.0, n).astype(dtype)
    for w in (None, weights):
        msg = f"{backend.__name__}.softmax_cross_entropy {shape} weights={describe(w)}"
        d_labels, d_onehot = nans((n, k), dtype), nans((n, k), dtype)
        loss_labels = backend.softmax_cross_entropy(logits, labels, w, d_labels)
        loss_onehot = backend.softmax_cross_entropy(logits, onehot, w, d_onehot)
        assert_close(loss_onehot, loss_labels, msg + ": loss, one-hot rows vs labels")
        assert_close(d_onehot, d_labels, msg + ": dlogits, one-hot rows vs labels", scale=1.0 / n)


# ----------------------------------------------------------------------------------
# Read-only inputs: kernels never write their inputs
# ----------------------------------------------------------------------------------

def test_layer_kernels_accept_read_only_inputs(backend, oracle, dtype, rng, assert_close):
    n, d, k = 7, 13, 5
    for act in ACT_NAMES:
        code = ACTIVATIONS[act]
        msg = f"{backend.__name__} read-only inputs, {act}"
        x, w, b = read_only(*dense_inputs(rng, n, d, k, dtype))
        out, expected = nans((n, k), dtype), nans((n, k), dtype)
        backend.dense_forward(x, w, b, code, out)
        oracle.dense_forward(x, w, b, code, expected)
        assert_close(out, expected, msg + ": dense_forward", scale=math.sqrt(d))

        a, dout = read_only(expected.copy(), rng.standard_normal((n, k)).astype(dtype))
        shapes = ((n, k), (n, d), (d, k), (k,))
        got, want = [nans(s, dtype) for s in shapes], [nans(s, dtype) for s in shapes]
        backend.dense_backward(x, w, a, dout, code, *got)
        oracle.dense_backward(x, w, a, dout, code, *want)
        for name, g, e in zip(("dz", "dx", "dw", "db"), got, want):
            assert_close(g, e, f"{msg}: dense_backward {name}", scale=math.sqrt(n))


        (z,) = read_only(activation_input(rng, (n, k), dtype))
        out, expected = nans((n, k), dtype), nans((n, k), dtype)
        backend.activation_forward(code, z, out)
        oracle.activation_forward(code, z, expected)
        assert_close(out, expected, msg + ": activation_forward")
        out, expected = nans((n, k), dtype), nans((n, k), dtype)
        backend.activation_backward(code, a, dout, out)
        oracle.activation_backward(code, a, dout, expected)
        assert_close(out, expected, msg + ": activation_backward")


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_losses_accept_read_only_inputs(backend, oracle, dtype, rng, assert_close, case):
    n, k = 7, 13
    pred, target = read_only(*make_loss_inputs(case, rng, n, k, dtype))
    (weights,) = read_only(rng.uniform(0.1, 2.0, n).astype(dtype))
    for w in (None, weights):
        msg = (f"{backend.__name__}.{case.kernel} [{case.id}] read-only inputs, "
               f"weights={describe(w)}")
        dpred, expected_dpred = nans((n, k), dtype), nans((n, k), dtype)
        loss = call_loss(backend, case, pred, target, w, dpred)
        expected = call_loss(oracle, case, pred, target, w, expected_dpred)
        assert_close(loss, expected, msg + ": loss")
        assert_close(dpred, expected_dpred, msg + ": dpred", scale=1.0 / n)


# ----------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------
# A line-by-line transcription of the algorithm boxes in the torch.optim docs, one
# scalar parameter at a time. ``state`` holds this parameter's buffers between steps;
# a missing buffer is the box's zero initialisation. ``t`` is the 1-based step.

def torch_sgd_step(theta, g, state, t, lr, momentum, dampening, weight_decay, nesterov):
    if weight_decay != 0:
        g = g + weight_decay * theta
    if momentum != 0:
        if t > 1:
            b = momentum * state["b"] + (1 - dampening) * g
        else:
            b = g
        state["b"] = b
        if nesterov:
            g = g + momentum * b
        else:
            g = b
    return theta - lr * g


def torch_adagrad_step(theta, g, state, t, lr, lr_decay, weight_decay, eps):
    lr_t = lr / (1 + (t - 1) * lr_decay)
    if weight_decay != 0:
        g = g + weight_decay * theta
    state["sum"] = state.get("sum", 0.0) + g * g
    return theta - lr_t * g / (math.sqrt(state["sum"]) + eps)


def torch_rmsprop_step(theta, g, state, t, lr, alpha, eps, weight_decay, momentum, centered):
    if weight_decay != 0:
        g = g + weight_decay * theta
    v = alpha * state.get("v", 0.0) + (1 - alpha) * g * g
    state["v"] = v
    v_tilde = v
    if centered:
        g_ave = state.get("g_ave", 0.0) * alpha + (1 - alpha) * g
        state["g_ave"] = g_ave
        v_tilde = v_tilde - g_ave * g_ave
    if momentum > 0:
        b = momentum * state.get("b", 0.0) + g / (math.sqrt(v_tilde) + eps)
        state["b"] = b
        return theta - lr * b
    return theta - lr * g / (math.sqrt(v_tilde) + eps)


def torch_adam_step(theta, g, state, t, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad):
    """Adam box (decoupled=False) or AdamW box (decoupled=True).

    AMSGrad keeps the running max of the raw second moment v_t and bias-corrects that
    max, as torch's code and its current docs do (an older docs box took the max of the
    bias-corrected v-hat instead, which is not what torch computes).
    """
    if decoupled:
        theta = theta - lr * weight_decay * theta
    elif weight_decay != 0:
        g = g + weight_decay * theta
    m = beta1 * state.get("m", 0.0) + (1 - beta1) * g
    v = beta2 * state.get("v", 0.0) + (1 - beta2) * g * g
    state["m"], state["v"] = m, v
    m_hat = m / (1 - beta1 ** t)
    if amsgrad:
        state["v_max"] = max(state.get("v_max", 0.0), v)
        v_hat = state["v_max"] / (1 - beta2 ** t)
    else:
        v_hat = v / (1 - beta2 ** t)
    return theta - lr * m_hat / (math.sqrt(v_hat) + eps)


TORCH_STEPS = {"sgd": torch_sgd_step, "adagrad": torch_adagrad_step,
               "rmsprop": torch_rmsprop_step, "adam": torch_adam_step}
#: kernel buffer -> the transcription's state key, per optimizer (kernel argument order).
OPT_BUFFERS = {
    "sgd": {"momentum_buf": "b"},
    "adagrad": {"state_sum": "sum"},
    "rmsprop": {"square_avg": "v", "momentum_buf": "b", "grad_avg": "g_ave"},
    "adam": {"exp_avg": "m", "exp_avg_sq": "v", "max_exp_avg_sq": "v_max"},
}

OptCase = namedtuple("OptCase", "id kind hyper")
OPT_CASES = [
    OptCase("sgd", "sgd", dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0,
                               nesterov=False)),
    OptCase("sgd-wd", "sgd", dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.05,
                                  nesterov=False)),
    OptCase("sgd-momentum", "sgd", dict(lr=0.05, momentum=0.9, dampening=0.0,
                                        weight_decay=0.0, nesterov=False)),
    OptCase("sgd-momentum-dampening-wd", "sgd", dict(lr=0.05, momentum=0.9, dampening=0.3,
                                                     weight_decay=0.01, nesterov=False)),
    OptCase("sgd-nesterov-wd", "sgd", dict(lr=0.05, momentum=0.8, dampening=0.0,
                                           weight_decay=0.01, nesterov=True)),
    OptCase("adagrad", "adagrad", dict(lr=0.1, lr_decay=0.0, weight_decay=0.0, eps=1e-10)),
    OptCase("adagrad-lr_decay-wd", "adagrad", dict(lr=0.1, lr_decay=0.05, weight_decay=0.01,
                                                   eps=1e-10)),
    OptCase("adagrad-eps", "adagrad", dict(lr=0.01, lr_decay=0.1, weight_decay=0.0, eps=1e-3)),
    OptCase("rmsprop", "rmsprop", dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0,
                                       momentum=0.0, centered=False)),
    OptCase("rmsprop-centered", "rmsprop", dict(lr=0.01, alpha=0.9, eps=1e-8,
                                                weight_decay=0.0, momentum=0.0, centered=True)),
    OptCase("rmsprop-momentum-wd", "rmsprop", dict(lr=0.01, alpha=0.99, eps=1e-8,
                                                   weight_decay=0.01, momentum=0.9,
                                                   centered=False)),
    OptCase("rmsprop-centered-momentum-wd", "rmsprop", dict(lr=0.01, alpha=0.9, eps=1e-6,
                                                            weight_decay=0.01, momentum=0.5,
                                                            centered=True)),
    OptCase("adam", "adam", dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                 decoupled=False, amsgrad=False)),
    OptCase("adam-wd", "adam", dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                                    weight_decay=0.1, decoupled=False, amsgrad=False)),
    OptCase("adamw", "adam", dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                                  decoupled=True, amsgrad=False)),
    OptCase("adam-amsgrad", "adam", dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                                         weight_decay=0.0, decoupled=False, amsgrad=True)),
    OptCase("adamw-amsgrad", "adam", dict(lr=1e-2, beta1=0.8, beta2=0.9, eps=1e-6,
                                          weight_decay=0.05, decoupled=True, amsgrad=True)),
]
OPT_IDS = [c.id for c in OPT_CASES]

#: Gradient scale per step (steps 1..5): shrinking gradients make v_t fall, so AMSGrad's
#: running max differs from v_t.
GRAD_SCALES = (1.0, 0.01, 1.0, 0.01, 0.01)


def used_buffers(case):
    hp = case.hyper
    if case.kind == "sgd":
        return {"momentum_buf"} if hp["momentum"] != 0 else set()
    if case.kind == "adagrad":
        return {"state_sum"}
    if case.kind == "rmsprop":
        return ({"square_avg"} | ({"momentum_buf"} if hp["momentum"] > 0 else set())
                | ({"grad_avg"} if hp["centered"] else set()))
    return {"exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if hp["amsgrad"] else set())


def new_buffers(case, size, dtype):
    """Zeros where torch starts from zero; SENTINEL for SGD's momentum (overwritten at
    step 1) and for buffers the configuration does not use (never touched)."""
    used = used_buffers(case)
    return {name: (np.zeros(size, dtype) if name in used and case.kind != "sgd"
                   else np.full(size, SENTINEL, dtype))
            for name in OPT_BUFFERS[case.kind]}


def run_update(module, case, params, grads, bufs, step):
    hp = case.hyper
    if case.kind == "sgd":
        return module.sgd_update(params, grads, bufs["momentum_buf"], hp["lr"], hp["momentum"],
                                 hp["dampening"], hp["weight_decay"], hp["nesterov"], step)
    if case.kind == "adagrad":
        return module.adagrad_update(params, grads, bufs["state_sum"], hp["lr"], hp["lr_decay"],
                                     hp["weight_decay"], hp["eps"], step)
    if case.kind == "rmsprop":
        return module.rmsprop_update(params, grads, bufs["square_avg"], bufs["momentum_buf"],
                                     bufs["grad_avg"], hp["lr"], hp["alpha"], hp["eps"],
                                     hp["weight_decay"], hp["momentum"], hp["centered"])
    return module.adam_update(params, grads, bufs["exp_avg"], bufs["exp_avg_sq"],
                              bufs["max_exp_avg_sq"], hp["lr"], hp["beta1"], hp["beta2"],
                              hp["eps"], hp["weight_decay"], hp["decoupled"], hp["amsgrad"], step)


def gradient(noise, scale, params):
    """A gradient that depends on the parameters, so a wrong update also skews later steps."""
    return np.ascontiguousarray(scale * (noise + 0.5 * params.astype(np.float64)),
                                dtype=params.dtype)


@pytest.mark.parametrize("case", OPT_CASES, ids=OPT_IDS)
def test_optimizer_follows_torch_algorithm(backend, dtype, rng, assert_close, case):
    size = 37
    params = rng.standard_normal(size).astype(dtype)
    noise = rng.standard_normal((len(GRAD_SCALES), size))
    bufs = new_buffers(case, size, dtype)
    used = used_buffers(case)
    untouched = {name: buf.copy() for name, buf in bufs.items() if name not in used}
    theta = [float(v) for v in params]
    states = [{} for _ in range(size)]
    torch_step = TORCH_STEPS[case.kind]
    for t, scale in enumerate(GRAD_SCALES, start=1):
        grads = gradient(noise[t - 1], scale, params)
        assert run_update(backend, case, params, grads, bufs, t) is None
        for i in range(size):
            g = scale * (noise[t - 1, i] + 0.5 * theta[i])
            theta[i] = torch_step(theta[i], g, states[i], t, **case.hyper)
        msg = f"{backend.__name__} {case.id} {case.hyper} step {t}"
        assert_close(params, theta, msg + ": params vs torch.optim algorithm")
        for name, key in OPT_BUFFERS[case.kind].items():
            if name in used:
                expected = [s[key] for s in states]
                assert_close(bufs[name], expected, f"{msg}: {name} vs torch.optim algorithm",
                             scale=peak(expected))
    for name, before in untouched.items():
        np.testing.assert_array_equal(bufs[name], before,
                                      err_msg=f"{case.id}: {name} must be untouched")
    if case.kind == "adam" and case.hyper["amsgrad"]:
        assert any(s["v_max"] > s["v"] * 1.01 for s in states), \
            "the test's gradients never make AMSGrad's max differ from v"


@pytest.mark.parametrize("case", OPT_CASES, ids=OPT_IDS)
def test_optimizer_matches_oracle(backend, oracle, dtype, rng, assert_close, case):
    size = 20_011  # big enough for a parallel path, odd for a remainder loop
    params = rng.standard_normal(size).astype(dtype)
    noise = rng.standard_normal((len(GRAD_SCALES), size))
    bufs = new_buffers(case, size, dtype)
    expected_params, expected_bufs = params.copy(), {name: b.copy() for name, b in bufs.items()}
    for t, scale in enumerate(GRAD_SCALES, start=1):
        run_update(backend, case, params, gradient(noise[t - 1], scale, params), bufs, t)
        run_update(oracle, case, expected_params, gradient(noise[t - 1], scale, expected_params),
                   expected_bufs, t)
        msg = f"{backend.__name__} {case.id} step {t}"
        assert_close(params, expected_params, msg + ": params vs _numpy")
        for name, buf in bufs.items():
            assert_close(buf, expected_bufs[name], f"{msg}: {name} vs _numpy",
                         scale=peak(expected_bufs[name]))


@pytest.mark.parametrize("case", OPT_CASES, ids=OPT_IDS)
def test_optimizers_accept_read_only_gradients(backend, oracle, dtype, rng, assert_close, case):
    size = 37
    params = rng.standard_normal(size).astype(dtype)
    bufs = new_buffers(case, size, dtype)
    expected_params, expected_bufs = params.copy(), {name: b.copy() for name, b in bufs.items()}
    for t in (1, 2):
        (grads,) = read_only(rng.standard_normal(size).astype(dtype))
        run_update(backend, case, params, grads, bufs, t)
        run_update(oracle, case, expected_params, grads, expected_bufs, t)
        assert_close(params, expected_params,
                     f"{backend.__name__} {case.id} step {t} read-only grads")


# ----------------------------------------------------------------------------------
# PyTorch itself, where it is installed (the transcriptions above are the must-have)
# ----------------------------------------------------------------------------------

def torch_optimizer(torch, case, tensors):
    hp = case.hyper
    if case.kind == "sgd":
        return torch.optim.SGD(tensors, lr=hp["lr"], momentum=hp["momentum"],
                               dampening=hp["dampening"], weight_decay=hp["weight_decay"],
                               nesterov=hp["nesterov"])
    if case.kind == "adagrad":
        return torch.optim.Adagrad(tensors, lr=hp["lr"], lr_decay=hp["lr_decay"],
                                   weight_decay=hp["weight_decay"], eps=hp["eps"])
    if case.kind == "rmsprop":
        return torch.optim.RMSprop(tensors, lr=hp["lr"], alpha=hp["alpha"], eps=hp["eps"],
                                   weight_decay=hp["weight_decay"], momentum=hp["momentum"],
                                   centered=hp["centered"])
    cls = torch.optim.AdamW if hp["decoupled"] else torch.optim.Adam
    return cls(tensors, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
               weight_decay=hp["weight_decay"], amsgrad=hp["amsgrad"])


@pytest.mark.parametrize("case", OPT_CASES, ids=OPT_IDS)
def test_optimizer_against_installed_torch(backend, rng, case):
    torch = pytest.importorskip("torch")
    size = 37
    params = rng.standard_normal(size)
    noise = rng.standard_normal((len(GRAD_SCALES), size))
    bufs = new_buffers(case, size, np.float64)
    weight = torch.tensor(params.copy(), dtype=torch.float64, requires_grad=True)
    optimizer = torch_optimizer(torch, case, [weight])
    for t, scale in enumerate(GRAD_SCALES, start=1):
        run_update(backend, case, params, gradient(noise[t - 1], scale, params), bufs, t)
        current = weight.detach().numpy().copy()
        weight.grad = torch.from_numpy(gradient(noise[t - 1], scale, current))
        optimizer.step()
        np.testing.assert_allclose(params, weight.detach().numpy(), rtol=1e-10, atol=1e-12,
                                   err_msg=f"{backend.__name__} {case.id} step {t} vs torch.optim")


@pytest.mark.parametrize("case", LOSS_CASES, ids=LOSS_IDS)
def test_loss_against_installed_torch(backend, rng, case):
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    n, k = 7, 13
    pred, target = make_loss_inputs(case, rng, n, k, np.float64)
    weights = rng.uniform(0.1, 2.0, n)
    z = torch.tensor(pred, requires_grad=True)
    y = torch.from_numpy(target)
    if case.kernel == "softmax_cross_entropy":
        per_sample = functional.cross_entropy(z, y, reduction="none")
    elif case.kernel == "multiclass_hinge":
        # torch's multi_margin_loss divides the Weston-Watkins sum by the class count.
        per_sample = functional.multi_margin_loss(z, y, margin=case.param, reduction="none") * k
    elif case.kernel == "sigmoid_binary_cross_entropy":
        per_sample = functional.binary_cross_entropy_with_logits(z, y, reduction="none")
        per_sample = per_sample.mean(dim=1)
    elif case.kernel == "mean_squared_error":
        per_sample = functional.mse_loss(z, y, reduction="none").mean(dim=1)
    elif case.kernel == "mean_absolute_error":
        per_sample = functional.l1_loss(z, y, reduction="none").mean(dim=1)
    else:
        per_sample = functional.huber_loss(z, y, reduction="none", delta=case.param).mean(dim=1)
    w = torch.from_numpy(weights)
    expected = (w * per_sample).sum() / w.sum()
    expected.backward()
    dpred = nans((n, k), np.float64)
    loss = call_loss(backend, case, pred, target, weights, dpred)
    msg = f"{backend.__name__}.{case.kernel} [{case.id}] vs torch"
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-10, err_msg=msg + ": loss")
    np.testing.assert_allclose(dpred, z.grad.numpy(), rtol=1e-10, atol=1e-12,
                               err_msg=msg + ": dpred")


# ----------------------------------------------------------------------------------
# Bad arguments: every backend refuses them with the reference's error, never reading
# or writing out of bounds (issue 18)
# ----------------------------------------------------------------------------------

def call_kernel(module, name, args):
    """``module.name(*args)`` on fresh copies of the array arguments; returns the
    exception it raised (the test fails if none)."""
    args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    with pytest.raises((ValueError, TypeError)) as caught:
        getattr(module, name)(*args)
    return caught.value


def assert_refused(backend, oracle, name, args, match):
    """The backend raises exactly the oracle's error, whose message contains ``match``."""
    expected = call_kernel(oracle, name, args)
    assert match in str(expected), str(expected)
    got = call_kernel(backend, name, args)
    assert (type(got), str(got)) == (type(expected), str(expected))


def float_arrays(dtype, *shapes):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(shape).astype(dtype) for shape in shapes]


# (n, k) of the label tests: one row, and enough rows for the parallel cores.
LABEL_SHAPES = [(1, 3), (7, 5), (40000, 4)]


@pytest.mark.parametrize("kernel", ["softmax_cross_entropy", "multiclass_hinge"])
@pytest.mark.parametrize("bad_label", [-1, "k", 2**40])
@pytest.mark.parametrize("shape", LABEL_SHAPES, ids=shape_id)
@pytest.mark.parametrize("with_grad", [True, False])
def test_label_out_of_range_is_refused(backend, oracle, dtype, kernel, bad_label, shape,
                                       with_grad):
    n, k = shape
    scores, grad = float_arrays(dtype, shape, shape)
    labels = np.arange(n, dtype=np.int64) % k
    labels[n // 2] = k if bad_label == "k" else bad_label
    if kernel == "softmax_cross_entropy":
        args = [scores, labels, None, grad if with_grad else None]
    else:
        args = [scores, labels, 1.0, None, grad if with_grad else None]
    assert_refused(backend, oracle, kernel, args, f"labels must be class indices in [0, {k})")


LENGTH_CASES = {
    # kernel: (args with lengths 5 unless named otherwise, argument named in the error)
    "sgd_update": (lambda p, s: [p(5), p(4), p(5), 0.1, 0.9, 0.0, 0.0, False, 2], "grads"),
    "sgd_update-momentum_buf": (
        lambda p, s: [p(5), p(5), p(3), 0.1, 0.9, 0.0, 0.0, False, 2], "momentum_buf"),
    "adagrad_update": (lambda p, s: [p(5), p(5), p(6), 0.1, 0.0, 0.0, 1e-10, 1], "state_sum"),
    "rmsprop_update": (lambda p, s: [p(5), p(5), s(5), p(5), p(2), 0.01, 0.99, 1e-8, 0.0,
                                     0.0, True], "grad_avg"),
    "adam_update": (lambda p, s: [p(5), p(5), p(5), s(4), p(5), 1e-3, 0.9, 0.999, 1e-8, 0.0,
                                  False, False, 1], "exp_avg_sq"),
    "adam_update-grads": (lambda p, s: [p(9), p(5), p(9), s(9), p(9), 1e-3, 0.9, 0.999, 1e-8,
                                        0.0, False, False, 1], "grads"),
    "adam_update-amsgrad": (lambda p, s: [p(5), p(5), p(5), s(5), p(1), 1e-3, 0.9, 0.999,
                                          1e-8, 0.0, True, True, 1], "max_exp_avg_sq"),
}


@pytest.mark.parametrize("case", sorted(LENGTH_CASES))
def test_optimizer_length_mismatch_is_refused(backend, oracle, dtype, case):
    make, name = LENGTH_CASES[case]
    args = make(lambda n: np.full(n, 0.5, dtype), lambda n: np.full(n, 0.25, dtype))
    assert_refused(backend, oracle, case.split("-")[0], args, f"{name} must have shape")


def dense_cases(dtype):
    """(kernel, args, argument named in the error) with one shape or dtype wrong."""
    x, w, b, out = float_arrays(dtype, (4, 3), (3, 2), (2,), (4, 2))
    a, dz, dx, dw = float_arrays(dtype, (4, 2), (4, 2), (4, 3), (3, 2))
    other = np.float64 if dtype == np.float32 else np.float32
    relu = ACTIVATIONS["relu"]
    return [
        ("dense_forward", [x, w[:2], b, relu, out], "w"),
        ("dense_forward", [x, w, b[:1], relu, out], "b"),
        ("dense_forward", [x, w, b, relu, out[:3]], "out"),
        ("dense_forward", [x, w, b, relu, out.astype(other)], "out"),
        ("dense_forward", [x, w, b, 99, out], "act"),
        ("dense_backward", [x, w, a, a, relu, dz, dx, dw, b[:1]], "db"),
        ("dense_backward", [x, w, a, a, relu, dz, dx[:, :2], dw, b], "dx"),
        ("dense_backward", [x, w, a[:2], a, relu, dz, None, dw, b], "a"),
        ("dense_backward", [x, w, a, a, relu, dz, None, dw.T.copy(), b], "dw"),
        ("activation_forward", [relu, x, out], "out"),
        ("activation_backward", [relu, a, a[:1], dz], "dout"),
        ("dense_per_sample_grad", [x, a, np.zeros((4, 7), dtype), 0, True], "jac"),
        ("mean_squared_error", [a, dz[:3], None, None], "target"),
        ("huber", [a, dz, 1.0, b[:1], None], "weights"),
        ("softmax_cross_entropy", [a, np.zeros(3, np.int64), None, None], "labels"),
        ("multiclass_hinge", [a, np.zeros(4, np.int64), 1.0, None, dz.T.copy()], "dscores"),
    ]


@pytest.mark.parametrize("case", range(len(dense_cases(np.float32))))
def test_layer_and_loss_shape_mismatch_is_refused(backend, oracle, dtype, case):
    kernel, args, name = dense_cases(dtype)[case]
    assert_refused(backend, oracle, kernel, args, name)


def epoch_spec(dtype, **changes):
    """A valid cross-entropy train_epoch spec of a 3-5-2 net (8 samples, batch 3), with
    ``changes`` applied."""
    rng = np.random.default_rng(1)
    widths = np.array([3, 5, 2], np.int64)
    n_params = 3 * 5 + 5 + 5 * 2 + 2
    spec = kernels.TrainEpochSpec(
        X=rng.standard_normal((8, 3)).astype(dtype), labels=np.arange(8, dtype=np.int64) % 2,
        targets=np.empty((0, 2), dtype), order=np.arange(8, dtype=np.int64), batch_size=3,
        widths=widths, acts=np.array([ACTIVATIONS["relu"], 0], np.int64),
        alphas=np.zeros(2), use_bias=np.ones(2, np.int64),
        params=rng.standard_normal(n_params).astype(dtype), grads=np.zeros(n_params, dtype),
        workspace=np.zeros(kernels.train_epoch_workspace_size(3, widths), dtype),
        loss_code=kernels.CROSS_ENTROPY, loss_param=0.0,
        optimizer=kernels.OptimizerSpec(kernels.ADAM, np.array([0.9, 0.999, 1e-8, 0, 0, 0.]),
                                        tuple(np.zeros(n_params, dtype) for _ in range(3))),
        lrs=np.full(3, 0.01), step=0, stats=np.zeros(4))
    return spec._replace(**changes)


def epoch_error(module, spec):
    """The error train_epoch raises on a copy of ``spec``'s parameters; asserts that the
    parameters are untouched (the bad input is in the first batch or is a size)."""
    params = spec.params.copy()
    with pytest.raises((ValueError, TypeError)) as caught:
        module.train_epoch(spec._replace(params=params))
    np.testing.assert_array_equal(params, spec.params)
    return caught.value


EPOCH_CASES = {
    "label": (lambda s: dict(labels=np.array([0, 1, 2, 0, 1, 0, 1, 0])),
              "labels (of the samples in order) must be class indices in [0, 2)"),
    "negative_label": (lambda s: dict(labels=np.array([0, -3, 1, 0, 1, 0, 1, 0])),
                       "class indices in [0, 2), got -3"),
    "order": (lambda s: dict(order=np.array([0, 1, 8, 3, 4, 5, 6, 7])),
              "order must be class indices in [0, 8)"),
    "labels_length": (lambda s: dict(labels=s.labels[:5]), "labels must have shape (8,)"),
    "X_width": (lambda s: dict(X=np.zeros((8, 4), s.X.dtype)), "X must have shape (8, 3)"),
    "params": (lambda s: dict(params=s.params[:-1]), "params must have shape (32,)"),
    "workspace": (lambda s: dict(workspace=s.workspace[:-1]), "workspace must have at least"),
    "lrs": (lambda s: dict(lrs=s.lrs[:2]), "lrs must hold one rate per batch (3)"),
    "hyper": (lambda s: dict(optimizer=s.optimizer._replace(hyper=np.zeros(4))),
              "optimizer.hyper must have shape (6,)"),
    "state": (lambda s: dict(optimizer=s.optimizer._replace(
        states=(s.optimizer.states[0][:3],) + s.optimizer.states[1:])),
        "optimizer.states[0] must have shape (32,)"),
    "acts": (lambda s: dict(acts=np.array([4, 42], np.int64)), "act must be an activation"),
    "targets": (lambda s: dict(loss_code=kernels.MSE, targets=np.zeros((8, 3), s.X.dtype)),
                "targets must have shape (8, 2)"),
    # the compiled kernels pick their dtype's code from X: a mismatch elsewhere is refused
    "params_dtype": (lambda s: dict(params=s.params.astype(_other_float(s.X.dtype))),
                     "params must have dtype"),
    "X_dtype": (lambda s: dict(X=s.X.astype(_other_float(s.X.dtype))),
                "params must have dtype"),
    "X_int": (lambda s: dict(X=s.X.astype(np.int64)), "X must be float32 or float64"),
}


def _other_float(dtype):
    return np.float64 if dtype == np.float32 else np.float32


@pytest.mark.parametrize("case", sorted(EPOCH_CASES))
def test_train_epoch_refuses_bad_arguments(backend, oracle, dtype, case):
    changes, match = EPOCH_CASES[case]
    spec = epoch_spec(dtype)
    spec = spec._replace(**changes(spec))
    expected = epoch_error(oracle, spec)
    assert match in str(expected), str(expected)
    got = epoch_error(backend, spec)
    assert (type(got), str(got)) == (type(expected), str(expected))


def test_train_epoch_reports_a_bad_label_of_a_later_batch(backend, oracle, dtype):
    """A bad label in the last batch is refused too (the compiled backends find it
    when they reach that batch)."""
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 5])
    spec = epoch_spec(dtype, labels=labels)
    with pytest.raises(ValueError, match=r"labels \(of the samples in order\)"):
        backend.train_epoch(spec)


def test_integer_loss_inputs_are_refused(backend):
    """Found by the fuzz test: numba's loss wrappers raised KeyError for int64 input."""
    pred = np.zeros((3, 2), np.int64)
    labels = np.zeros(3, np.int64)
    with pytest.raises(ValueError, match="logits must be float32 or float64, got int64"):
        backend.softmax_cross_entropy(pred, labels, None, None)
    with pytest.raises(ValueError, match="must be float32 or float64, got int64"):
        backend.mean_squared_error(pred, pred, None, None)
