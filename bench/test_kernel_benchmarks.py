"""Kernel benchmarks: every kernel of the contract x backend x dtype, on the shapes of
the three reference nets (fastnn.bench.suite.NETS).

``train_epoch`` (a whole epoch of a reference net in one call) is timed over
TRAIN_EPOCH_BATCHES batches; ``dense_stack_forward`` (a net's inference pass in one
call) at INFERENCE_BATCHES rows. Each case checks the backend against ``_numpy`` first (the
same call on fresh outputs), then makes one warm-up call and times the kernel on
preallocated outputs. Groups are kernel + shape + dtype, so the backends of one case
read side by side:

    pytest bench/ --benchmark-only                       # all usable CPUs
    taskset -c 0 pytest bench/ --benchmark-only          # 1 thread, pinned (headline)
    pytest bench/ --benchmark-only -k "dense and mnist"  # a subset

No benchmark asserts a time: they measure and report.
"""
import math
from typing import Callable, NamedTuple, Optional

import numpy as np
import pytest

from fastnn.bench.baselines import initial_weights
from fastnn.bench.suite import NETS
from fastnn.kernels import (
    ACTIVATIONS, LOSS_CODES, OPTIMIZER_CODES, OPTIMIZER_HYPER, OptimizerSpec,
    TrainEpochSpec, dense_stack_workspace_size, train_epoch_workspace_size,
)
from fastnn.kernels import load as load_backend

RELU, IDENTITY = ACTIVATIONS["relu"], ACTIVATIONS["identity"]
#: Activations whose every element is a transcendental function, benchmarked at one
#: shape (the MNIST net's first hidden layer at batch 128) besides ReLU everywhere.
SMOOTH_ACTIVATIONS = ("sigmoid", "tanh", "softplus", "elu")
SMOOTH_ACTIVATION_SHAPE = ("mnist-b128-256", (128, 256))
SEED = 20240611
#: Batches per train_epoch call.
TRAIN_EPOCH_BATCHES = 4
#: Rows of the dense_stack_forward cases: one sample (call overhead), a bulk predict.
INFERENCE_BATCHES = (1, 4096)
#: train_epoch hyper-parameters by name (the layout is kernels.OPTIMIZER_HYPER).
_HYPER = {
    "sgd": {"lr": 0.01, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
            "nesterov": 0.0},
    "adam": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
             "decoupled": 0.0, "amsgrad": 0.0},
}
#: Tolerance of a backend against ``_numpy``, relative to the largest magnitude of the
#: checked output (each BLAS sums in its own order).
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


class Case(NamedTuple):
    """``build(dtype, rng) -> (new_outputs, call)``: ``new_outputs()`` returns fresh
    output (or in-place state) arrays, ``call(module, outputs)`` runs the kernel.
    The first ``checked`` outputs (all when None) are compared with ``_numpy``, with
    an absolute tolerance of at least ``atol``."""

    kernel: str
    shape_id: str
    build: Callable
    checked: Optional[int] = None
    atol: float = 0.0


def _normal(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ----------------------------------------------------------------------------------
# Shapes of the reference nets
# ----------------------------------------------------------------------------------

def _layers():
    """(id, n, d, k, act, first): every dense layer of every reference net and batch."""
    for net, spec in NETS.items():
        sizes = spec["sizes"]
        for batch in spec["batches"]:
            for i, (d, k) in enumerate(zip(sizes[:-1], sizes[1:])):
                act = IDENTITY if i == len(sizes) - 2 else RELU
                yield f"{net}-b{batch}-{d}x{k}", batch, d, k, act, i == 0


def _unique(items):
    """Drop repeated shapes (keeping the first net that has them)."""
    seen, out = set(), []
    for shape_id, shape in items:
        if shape not in seen:
            seen.add(shape)
            out.append((shape_id, shape))
    return out


def _hidden_shapes():
    """Outputs of the ReLU layers: "mnist-b128-784x256" -> ("mnist-b128-256", (128, 256))."""
    return _unique((f"{shape_id.rsplit('-', 1)[0]}-{k}", (n, k))
                   for shape_id, n, d, k, act, _ in _layers() if act == RELU)


def _logit_shapes():
    return _unique((f"{net}-b{batch}-{spec['sizes'][-1]}", (batch, spec["sizes"][-1]))
                   for net, spec in NETS.items() for batch in spec["batches"])


def _param_counts():
    return [(f"{net}-{sum(d * k + k for d, k in zip(s[:-1], s[1:]))}",
             sum(d * k + k for d, k in zip(s[:-1], s[1:])))
            for net, s in ((net, spec["sizes"]) for net, spec in NETS.items())]


# ----------------------------------------------------------------------------------
# Case builders
# ----------------------------------------------------------------------------------

def _dense_forward(n, d, k, act):
    def build(dtype, rng):
        x, w = _normal(rng, (n, d), dtype), _normal(rng, (d, k), dtype, 1 / math.sqrt(d))
        b = _normal(rng, k, dtype, 0.1)
        return (lambda: [np.empty((n, k), dtype)],
                lambda m, out: m.dense_forward(x, w, b, act, out[0]))
    return build


def _dense_backward(n, d, k, act, first):
    def build(dtype, rng):
        x, w = _normal(rng, (n, d), dtype), _normal(rng, (d, k), dtype, 1 / math.sqrt(d))
        a = _normal(rng, (n, k), dtype)
        if act == RELU:
            np.maximum(a, 0, out=a)
        dout = _normal(rng, (n, k), dtype, 0.1)

        def outputs():  # dz, dw, db, and dx unless this is the first layer (fit skips it)
            outs = [np.empty((n, k), dtype), np.empty((d, k), dtype), np.empty(k, dtype)]
            return outs if first else outs + [np.empty((n, d), dtype)]

        def call(m, out):
            dx = None if first else out[3]
            m.dense_backward(x, w, a, dout, act, out[0], dx, out[1], out[2])
        return outputs, call
    return build


def _activation_forward(shape, act=RELU):
    def build(dtype, rng):
        z = _normal(rng, shape, dtype)
        return (lambda: [np.empty(shape, dtype)],
                lambda m, out: m.activation_forward(act, z, out[0]))
    return build


def _activation_backward(shape, act=RELU):
    def build(dtype, rng):
        a = np.empty(shape, dtype)  # the activation of normal z (ReLU: max(z, 0))
        load_backend("numpy").activation_forward(act, _normal(rng, shape, dtype), a)
        dout = _normal(rng, shape, dtype)
        return (lambda: [np.empty(shape, dtype)],
                lambda m, out: m.activation_backward(act, a, dout, out[0]))
    return build


def _loss(kernel, shape):
    n, k = shape

    def build(dtype, rng):
        pred = _normal(rng, shape, dtype, 3.0)
        labels = rng.integers(0, k, n)
        if kernel == "sigmoid_binary_cross_entropy":
            target = (rng.random(shape) < 0.3).astype(dtype)
        else:
            target = _normal(rng, shape, dtype)
        args = {"softmax_cross_entropy": (labels,), "multiclass_hinge": (labels, 1.0),
                "huber": (target, 1.0)}.get(kernel, (target,))
        return (lambda: [np.empty(shape, dtype)],
                lambda m, out: getattr(m, kernel)(pred, *args, None, out[0]))
    return build


#: Hyper-parameters after the buffers, and the number of state buffers, per optimizer:
#: plain SGD (lr 0.01) as in the training benchmark; torch.optim defaults otherwise.
_OPTIMIZERS = {
    "sgd_update": (1, (0.01, 0.0, 0.0, 0.0, False, 1)),
    "adagrad_update": (1, (0.01, 0.0, 0.0, 1e-10, 1)),
    "rmsprop_update": (3, (0.01, 0.99, 1e-8, 0.0, 0.0, False)),
    "adam_update": (3, (1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, 1)),
}


def _optimizer(kernel, size):
    n_state, hyper = _OPTIMIZERS[kernel]

    def build(dtype, rng):
        params, grads = _normal(rng, size, dtype), _normal(rng, size, dtype, 0.1)
        state = [np.abs(_normal(rng, size, dtype, 0.01)) for _ in range(n_state)]
        return (lambda: [params.copy()] + [s.copy() for s in state],
                lambda m, out: getattr(m, kernel)(out[0], grads, *out[1:], *hyper))
    return build


def _train_epoch(sizes, batch, optimizer):
    """A whole epoch of TRAIN_EPOCH_BATCHES batches of a reference net: cross-entropy,
    SGD (lr 0.01) or Adam (lr 1e-3, torch defaults), as ``fit`` runs it."""
    hyper = np.array([_HYPER[optimizer][name] for name in OPTIMIZER_HYPER[optimizer]],
                     dtype=np.float64)
    widths = np.array(sizes, dtype=np.int64)
    m = TRAIN_EPOCH_BATCHES * batch
    n_params = sum(d * k + k for d, k in zip(sizes[:-1], sizes[1:]))

    def build(dtype, rng):
        X = _normal(rng, (m, sizes[0]), dtype)
        labels = rng.integers(0, sizes[-1], m)
        targets = np.empty((0, sizes[-1]), dtype)
        order = rng.permutation(m)
        acts = np.array([RELU] * (len(sizes) - 2) + [IDENTITY], dtype=np.int64)
        alphas = np.zeros(len(sizes) - 1)
        use_bias = np.ones(len(sizes) - 1, dtype=np.int64)
        params = np.concatenate([w.ravel() for w in initial_weights(sizes, dtype)])
        lrs = np.full(TRAIN_EPOCH_BATCHES, _HYPER[optimizer]["lr"])
        workspace_size = train_epoch_workspace_size(batch, widths)

        def outputs():  # params, state0..2, stats; then grads and workspace (scratch)
            return [params.copy()] + [np.zeros(n_params, dtype) for _ in range(3)] + \
                [np.zeros(4), np.zeros(n_params, dtype), np.zeros(workspace_size, dtype)]

        def call(m_, out):
            m_.train_epoch(TrainEpochSpec(
                X, labels, targets, order, batch, widths, acts, alphas, use_bias,
                params=out[0], grads=out[5], workspace=out[6],
                loss_code=LOSS_CODES["cross_entropy"], loss_param=0.0,
                optimizer=OptimizerSpec(OPTIMIZER_CODES[optimizer], hyper, tuple(out[1:4])),
                lrs=lrs, step=0, stats=out[4]))
        return outputs, call
    return build


def _dense_stack_forward(sizes, n):
    """The inference pass of a reference net (ReLU hidden layers, identity output) on
    n rows, as ``predict`` runs it."""
    widths = np.array(sizes, dtype=np.int64)
    acts = np.array([RELU] * (len(sizes) - 2) + [IDENTITY], dtype=np.int64)
    alphas = np.zeros(len(sizes) - 1)
    use_bias = np.ones(len(sizes) - 1, dtype=np.int64)

    def build(dtype, rng):
        x = _normal(rng, (n, sizes[0]), dtype)
        params = np.concatenate([w.ravel() for w in initial_weights(sizes, dtype)])
        workspace = np.empty(dense_stack_workspace_size(n, widths), dtype)
        return (lambda: [np.empty((n, sizes[-1]), dtype)],
                lambda m, out: m.dense_stack_forward(x, params, widths, acts, alphas,
                                                     use_bias, workspace, out[0]))
    return build


def _cases():
    cases = []
    for shape_id, n, d, k, act, first in _layers():
        cases.append(Case("dense_forward", shape_id, _dense_forward(n, d, k, act)))
        cases.append(Case("dense_backward", shape_id, _dense_backward(n, d, k, act, first)))
    for shape_id, shape in _hidden_shapes():
        cases.append(Case("activation_forward", shape_id, _activation_forward(shape)))
        cases.append(Case("activation_backward", shape_id, _activation_backward(shape)))
    # The smooth activations (exp / log1p / tanh per element) at one shape.
    shape_id, shape = SMOOTH_ACTIVATION_SHAPE
    for name in SMOOTH_ACTIVATIONS:
        act = ACTIVATIONS[name]
        cases.append(Case("activation_forward", f"{shape_id}-{name}",
                          _activation_forward(shape, act)))
        cases.append(Case("activation_backward", f"{shape_id}-{name}",
                          _activation_backward(shape, act)))
    for kernel in ("softmax_cross_entropy", "sigmoid_binary_cross_entropy",
                   "mean_squared_error", "mean_absolute_error", "huber", "multiclass_hinge"):
        for shape_id, shape in _logit_shapes():
            cases.append(Case(kernel, shape_id, _loss(kernel, shape)))
    for kernel in _OPTIMIZERS:
        for shape_id, size in _param_counts():
            cases.append(Case(kernel, shape_id, _optimizer(kernel, size)))
    for net, spec in NETS.items():
        for batch in spec["batches"]:
            for optimizer in ("sgd", "adam"):
                # Adam's m/sqrt(v) amplifies rounding where a gradient is near zero:
                # allow a tenth of one step there. grads and workspace are scratch.
                atol = 0.1 * _HYPER["adam"]["lr"] if optimizer == "adam" else 0.0
                cases.append(Case("train_epoch",
                                  f"{net}-b{batch}x{TRAIN_EPOCH_BATCHES}-{optimizer}",
                                  _train_epoch(spec["sizes"], batch, optimizer),
                                  checked=5, atol=atol))
    for net, spec in NETS.items():
        for n in INFERENCE_BATCHES:
            cases.append(Case("dense_stack_forward", f"{net}-b{n}",
                              _dense_stack_forward(spec["sizes"], n)))
    return cases


CASES = _cases()


def _check(actual, desired, dtype, what, atol=0.0):
    desired = np.asarray(desired, dtype=np.float64)
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), desired,
                               rtol=RTOL[dtype], atol=max(RTOL[dtype] * (scale or 1.0), atol),
                               err_msg=f"{what} differs from _numpy")


@pytest.mark.parametrize("case", CASES, ids=[f"{c.kernel}-{c.shape_id}" for c in CASES])
def test_kernel(benchmark, case, backend, dtype, oracle):
    new_outputs, call = case.build(dtype, np.random.default_rng(SEED))
    expected, actual = new_outputs(), new_outputs()
    expected_return = call(oracle, expected)
    actual_return = call(backend, actual)
    what = f"{case.kernel} {case.shape_id} {dtype.name} on {backend.__name__}"
    if expected_return is not None:
        _check(actual_return, expected_return, dtype, f"{what}: returned loss")
    for i, (a, e) in enumerate(zip(actual[:case.checked], expected[:case.checked])):
        _check(a, e, dtype, f"{what}: output {i}", case.atol)

    outputs = new_outputs()
    call(backend, outputs)  # warm-up: numba dispatch, first-touch of the outputs
    benchmark.group = f"{case.kernel} {case.shape_id} {dtype.name}"
    benchmark.extra_info.update(kernel=case.kernel, shape=case.shape_id, dtype=dtype.name,
                                backend=backend.__name__.rsplit("._", 1)[-1])
    benchmark(call, backend, outputs)
