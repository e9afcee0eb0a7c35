"""Fuzz targets over fastnn's public entry points, run by tests/test_fuzz.py in a
subprocess: ``python _fuzz_worker.py TARGET MAX_EXAMPLES``.

Each example is drawn by hypothesis (derandomized, no database, no shrinking, so a run
is bounded and repeatable), printed to stderr as one ``INPUT ...`` line before it runs
(after a segfault the last such line names the crashing input), then run call by call.
A call may succeed or raise ValueError, TypeError or FloatingPointError (the library's
NotCompiledError and NotFittedError are ValueErrors); any other exception fails the
example, and hypothesis reports it. A call that raised must leave the model as it was.
"""
import contextlib
import faulthandler
import io
import json
import os
import sys
import tempfile

import numpy as np
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import fastnn as fn

ALLOWED = (ValueError, TypeError, FloatingPointError)
BACKENDS = st.sampled_from(fn.kernels.BACKENDS)
DTYPES = st.sampled_from(["float32", "float64"])
ACTIVATIONS = sorted(set(fn.kernels.ACTIVATIONS) - {"step"})
LOSSES = sorted(fn.losses.LOSSES)
OPTIMIZERS = sorted(fn.optimizers.OPTIMIZERS)
SOLVERS = sorted(fn.solvers.SOLVERS)
#: Values of the wrong kind for any argument.
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.just(2 ** 70),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
                 st.just([]), st.just("relu"), st.just(np.float32(0.5)), st.just(np.bool_(True)))


def show(case):
    with np.printoptions(threshold=200, floatmode="unique"):
        print("INPUT " + repr(case).replace("\n", " "), file=sys.stderr, flush=True)


def attempt(call, *args, **kwargs):
    """``call(*args, **kwargs)``: its result, or None when it raised an allowed error."""
    try:
        return call(*args, **kwargs)
    except ALLOWED:
        return None


def snapshot(model):
    """What a failed call must not change: layers, compile settings, parameters."""
    compiled = (None if model.loss is None else model.loss.get_config(),
                type(model.optimizer).__name__, tuple(model.metrics))
    params = model.params.copy() if model.layers else None
    return repr(model), compiled, params


def attempt_unchanged(model, call, *args, **kwargs):
    """As ``attempt``, and a call that raised must leave ``model`` exactly as it was."""
    before = snapshot(model)
    try:
        return call(*args, **kwargs)
    except ALLOWED:
        after = snapshot(model)
        assert before[:2] == after[:2], \
            f"a failed {call.__name__} changed the model: {before[:2]} -> {after[:2]}"
        assert (before[2] is None) == (after[2] is None) and (
            before[2] is None or before[2].shape == after[2].shape
            and np.array_equal(before[2], after[2], equal_nan=True)), \
            f"a failed {call.__name__} changed the parameters"
        return None


# ---------------------------------------------------------------------------- data
@st.composite
def matrices(draw, rows, cols, dtype="float64"):
    """Mostly an array (rows, cols); sometimes of the wrong shape, dtype, or values."""
    kind = draw(st.sampled_from(["good"] * 6 + ["nan", "inf", "huge", "tiny", "int", "bool",
                                                  "complex", "object", "datetime", "timedelta",
                                                  "1d", "3d", "rows", "cols", "empty",
                                                  "list", "str", "noncontig", "float16"]))
    gen = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    shape = (rows, cols)
    if kind == "rows":
        shape = (draw(st.integers(0, rows + 3)), cols)
    elif kind == "cols":
        shape = (rows, draw(st.integers(0, cols + 3)))
    elif kind == "empty":
        shape = (0, cols)
    a = gen.normal(size=shape).astype(dtype)
    if kind in ("nan", "inf", "huge", "tiny") and a.size:
        a.flat[draw(st.integers(0, a.size - 1))] = {"nan": np.nan, "inf": -np.inf,
                                                      "huge": 1e300, "tiny": 1e-320}[kind]
    conversions = {
        "int": lambda: a.astype(np.int64), "bool": lambda: a > 0,
        "complex": lambda: a.astype(np.complex128), "object": lambda: a.astype(object),
        "datetime": lambda: a.astype(np.int64).astype("datetime64[s]"),
        "timedelta": lambda: a.astype(np.int64).astype("timedelta64[s]"),
        "1d": lambda: a.ravel(), "3d": lambda: a[..., None], "list": lambda: a.tolist(),
        "str": lambda: a.astype(str), "noncontig": lambda: np.asfortranarray(a),
        "float16": lambda: a.astype(np.float16),
    }
    return conversions.get(kind, lambda: a)()


@st.composite
def targets(draw, n, n_out):
    """Targets for n samples: labels (in or out of range), values, one-hot rows, junk."""
    gen = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    kind = draw(st.sampled_from(["labels"] * 4 + ["values"] * 3 + [
        "big_label", "negative", "float_labels", "huge", "uint64", "rows", "proba", "junk"]))
    if kind == "labels":
        return gen.integers(0, max(n_out, 1), size=n)
    if kind == "values":
        return draw(matrices(n, n_out))
    if kind == "big_label":
        y = gen.integers(0, max(n_out, 1), size=n)
        y[: min(n, 1)] = draw(st.sampled_from([n_out, 10 ** 6, 2 ** 62]))
        return y
    if kind == "negative":
        return -gen.integers(1, 3, size=n)
    if kind == "float_labels":
        return gen.integers(0, max(n_out, 1), size=n) + 0.5
    if kind == "huge":
        return np.full(n, 1e30)
    if kind == "uint64":
        return np.full(n, np.iinfo(np.uint64).max, dtype=np.uint64)
    if kind == "rows":
        return gen.integers(0, max(n_out, 1), size=draw(st.integers(0, n + 3)))
    if kind == "proba":
        p = gen.random((n, n_out))
        return p / p.sum(axis=1, keepdims=True)
    return draw(JUNK)


def optimizer_specs():
    """(name, kwargs) of an optimizer or solver; kwargs sometimes out of range or junk."""
    value = st.one_of(st.floats(-1.0, 2.0), st.floats(allow_nan=True), JUNK)
    kwargs = st.dictionaries(st.sampled_from(["lr", "momentum", "nesterov", "amsgrad",
                                              "weight_decay", "eps", "betas", "clipnorm",
                                              "centered", "alpha", "history", "gtol"]),
                             value, max_size=2)
    return st.tuples(st.sampled_from(OPTIMIZERS + SOLVERS + ["bogus"]), kwargs)


def make_optimizer(spec):
    name, kwargs = spec
    classes = {**fn.optimizers.OPTIMIZERS, **fn.solvers.SOLVERS}
    if name not in classes or not kwargs:
        return name
    return classes[name](**kwargs)


@st.composite
def networks(draw):
    """(sizes, activations, dtype) of a valid Dense stack."""
    sizes = draw(st.lists(st.integers(1, 6), min_size=2, max_size=4))
    acts = draw(st.lists(st.sampled_from(ACTIVATIONS), min_size=len(sizes) - 1,
                         max_size=len(sizes) - 1))
    return sizes, acts, draw(DTYPES)


def build(sizes, acts, dtype, seed=0):
    return fn.Sequential([fn.Dense(sizes[i], sizes[i + 1], activation=acts[i], dtype=dtype,
                                   seed=seed + i) for i in range(len(sizes) - 1)])


# ---------------------------------------------------------------------------- targets
@st.composite
def layer_cases(draw):
    value = st.one_of(st.integers(-2, 6), JUNK)
    return {
        "backend": draw(BACKENDS),
        "dense": draw(st.fixed_dictionaries(
            {"in_features": value, "out_features": value},
            optional={"activation": st.one_of(st.sampled_from(ACTIVATIONS + ["step", "gelu"]),
                                               JUNK),
                      "alpha": JUNK, "init": st.one_of(st.sampled_from(["auto", "he_normal",
                                                                         "zeros"]), JUNK),
                      "l1": JUNK, "l2": JUNK, "use_bias": JUNK, "dtype": st.one_of(DTYPES, JUNK),
                      "seed": JUNK})),
        "activation": draw(st.tuples(st.one_of(st.sampled_from(ACTIVATIONS), JUNK), JUNK)),
        "dropout": draw(st.tuples(st.one_of(st.floats(-0.5, 1.5), JUNK), JUNK)),
        "x": draw(matrices(3, 4)),
        "dout": draw(matrices(3, 4)),
    }


def run_layers(case):
    with fn.use_backend(case["backend"]):
        layers = [attempt(fn.Dense, **case["dense"]),
                  attempt(fn.Activation, *case["activation"]),
                  attempt(fn.Dropout, case["dropout"][0], seed=case["dropout"][1])]
        for layer in layers:
            if layer is not None:
                attempt(layer.forward, case["x"])
                attempt(layer.backward, case["dout"])


@st.composite
def model_cases(draw):
    sizes, acts, dtype = draw(networks())
    n = draw(st.integers(1, 12))
    fit_kwargs = draw(st.fixed_dictionaries({}, optional={
        "epochs": st.one_of(st.integers(-1, 3), JUNK),
        "batch_size": st.one_of(st.none(), st.integers(-1, 5), JUNK),
        "shuffle": JUNK, "replacement": JUNK,
        "sample_weight": st.one_of(matrices(n, 1).map(np.ravel), JUNK),
        "class_weight": st.one_of(st.dictionaries(st.integers(-1, 4), JUNK, max_size=3), JUNK),
        "validation_split": st.one_of(st.floats(-0.5, 1.5), JUNK),
        "seed": JUNK}))
    return {
        "backend": draw(BACKENDS), "sizes": sizes, "acts": acts, "dtype": dtype,
        "loss": draw(st.one_of(st.sampled_from(LOSSES), JUNK)),
        "optimizer": draw(optimizer_specs()),
        "metrics": draw(st.one_of(st.lists(st.sampled_from(["accuracy", "mae", "mse", "r2",
                                                            "bogus"]), max_size=2), JUNK)),
        "X": draw(matrices(n, sizes[0])), "y": draw(targets(n, sizes[-1])),
        "fit": fit_kwargs, "X_new": draw(matrices(draw(st.integers(1, 5)), sizes[0])),
    }


def run_model(case):
    with fn.use_backend(case["backend"]):
        model = build(case["sizes"], case["acts"], case["dtype"])
        optimizer = attempt(make_optimizer, case["optimizer"])
        attempt_unchanged(model, model.compile, case["loss"], optimizer, case["metrics"])
        attempt(model.fit, case["X"], case["y"], verbose=0, **case["fit"])
        attempt(model.predict, case["X_new"])
        attempt(model.forward, case["X_new"])
        attempt(model.evaluate, case["X"], case["y"])
        attempt(model.compute_gradients, case["X"], case["y"])


@st.composite
def structure_cases(draw):
    sizes, acts, dtype = draw(networks())
    layer = st.one_of(
        st.builds(lambda i, o: ("Dense", i, o), st.integers(1, 7), st.integers(1, 4)),
        st.sampled_from([("ReLU",), ("Dropout",), ("Dense64",)]), JUNK)
    weights = st.one_of(
        st.lists(matrices(draw(st.integers(1, 4)), draw(st.integers(1, 4))), max_size=6),
        st.just("networks-own"), JUNK)
    return {"backend": draw(BACKENDS), "sizes": sizes, "acts": acts, "dtype": dtype,
            "layers_arg": draw(st.one_of(st.lists(layer, max_size=3), layer)),
            "added": draw(layer), "weights": draw(weights),
            "X": draw(matrices(5, sizes[0])), "y": np.arange(5) % sizes[-1]}


def make_layer(spec, dtype):
    if not isinstance(spec, tuple):
        return spec
    if spec[0] == "Dense":
        return fn.Dense(spec[1], spec[2], dtype=dtype)
    if spec[0] == "Dense64":
        return fn.Dense(3, 2, dtype="float64" if dtype == "float32" else "float32")
    return fn.ReLU(dtype=dtype) if spec[0] == "ReLU" else fn.Dropout(0.5, dtype=dtype)


def run_structure(case):
    dtype = case["dtype"]
    with fn.use_backend(case["backend"]):
        spec = case["layers_arg"]
        attempt(fn.Sequential, [make_layer(s, dtype) for s in spec]
                if isinstance(spec, list) else make_layer(spec, dtype))
        model = build(case["sizes"], case["acts"], dtype)
        attempt_unchanged(model, model.add, make_layer(case["added"], dtype))
        weights = case["weights"]
        if weights == "networks-own":
            weights = [w * 2 for w in model.get_weights()]
        attempt_unchanged(model, model.set_weights, weights)
        model.compile("cross_entropy" if model.n_outputs > 1 else "mse", "adam")
        y = case["y"] if model.n_outputs > 1 else case["y"].astype(float)
        attempt(model.fit, case["X"], y, epochs=2, batch_size=2, verbose=0)
        attempt(model.predict, case["X"])


@st.composite
def model_file_cases(draw):
    json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10, 10 ** 20),
                          st.floats(allow_nan=True), st.text(max_size=4))
    json_value = st.recursive(json_leaf, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
        max_leaves=6)
    return {
        "backend": draw(BACKENDS),
        "optimizer": draw(st.sampled_from(["adam", "sgd", "rmsprop", "adagrad", "lbfgs", None])),
        "mutation": draw(st.sampled_from(["bytes", "meta", "member"])),
        "byte_edits": draw(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                    min_size=1, max_size=4)),
        "truncate": draw(st.one_of(st.none(), st.floats(0, 1))),
        "meta_path": draw(st.lists(st.integers(0, 50), min_size=1, max_size=4)),
        "meta_value": draw(json_value),
        "member": draw(st.tuples(st.sampled_from(["params", "optimizer/exp_avg",
                                                  "optimizer/momentum_buffer", "meta"]),
                                 matrices(draw(st.integers(0, 4)), 2))),
    }


def mutate_meta(meta, path, value):
    """Replace the node reached by indexing ``meta`` along ``path`` (indices taken
    modulo each container's size) by ``value``."""
    node = meta
    for step in path[:-1]:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        child = node[keys[step % len(keys)]]
        if not isinstance(child, (dict, list)):
            break
        node = child
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    if keys:
        node[keys[path[-1] % len(keys)]] = value
    elif isinstance(node, dict):
        node["extra"] = value
    return meta


def run_model_file(case):
    with fn.use_backend(case["backend"]), tempfile.TemporaryDirectory() as directory:
        model = build([3, 4, 2], ["tanh", "identity"], "float32")
        if case["optimizer"] is not None:
            model.compile("cross_entropy", case["optimizer"])
            X, y = np.random.default_rng(0).normal(size=(8, 3)), np.arange(8) % 2
            model.fit(X, y, epochs=1, batch_size=4, verbose=0)
        path = os.path.join(directory, "m.npz")
        model.save(path)
        if case["mutation"] == "bytes":
            data = bytearray(open(path, "rb").read())
            for where, byte in case["byte_edits"]:
                data[int(where * (len(data) - 1))] = byte
            if case["truncate"] is not None:
                data = data[:int(case["truncate"] * len(data))]
            open(path, "wb").write(bytes(data))
        else:
            with np.load(path) as saved:
                arrays = {k: saved[k] for k in saved.files}
            if case["mutation"] == "meta":
                meta = mutate_meta(json.loads(str(arrays["meta"])), case["meta_path"],
                                   case["meta_value"])
                arrays["meta"] = np.array(json.dumps(meta))
            else:
                name, array = case["member"]
                arrays[name] = array
            np.savez(path, **arrays)
        loaded = attempt(fn.load_model, path)
        if loaded is not None and loaded.loss is not None:
            X = np.random.default_rng(1).normal(size=(6, 3))
            attempt(loaded.fit, X, np.arange(6) % 2, epochs=1, verbose=0)
            attempt(loaded.predict, X)


@st.composite
def kernel_cases(draw):
    """Raw kernels with one argument spoiled: a float array of another dtype, layout,
    rank or shape (a row or column short or long), or class labels out of range, of the
    wrong length or dtype."""
    return {"backend": draw(BACKENDS), "dtype": draw(DTYPES),
            "kernel": draw(st.sampled_from(["dense_forward", "dense_backward",
                                            "activation_forward", "softmax_cross_entropy",
                                            "multiclass_hinge", "mean_squared_error",
                                            "sgd_update", "adam_update",
                                            "dense_stack_forward", "softmax_forward"])),
            "spoil": draw(st.sampled_from(["none", "dtype", "fortran", "strided", "rank",
                                           "int", "short", "long", "label_value",
                                           "label_length", "label_dtype"])),
            "which": draw(st.integers(0, 8)), "axis": draw(st.integers(0, 1)),
            "act": draw(st.integers(0, 7)), "label": draw(st.sampled_from([-1, 3, 2**40]))}


def kernel_arguments(kernel, dtype, act):
    gen = np.random.default_rng(0)
    n, k, m = 5, 4, 3

    def a(*shape):
        return gen.normal(size=shape).astype(dtype)

    labels = gen.integers(0, m, size=n)
    return {
        "dense_forward": [a(n, k), a(k, m), a(m), act, a(n, m)],
        "dense_backward": [a(n, k), a(k, m), a(n, m), a(n, m), act, a(n, m), a(n, k),
                           a(k, m), a(m)],
        "activation_forward": [act, a(n, m), a(n, m)],
        "softmax_cross_entropy": [a(n, m), labels, None, a(n, m)],
        "multiclass_hinge": [a(n, m), labels, 1.0, None, a(n, m)],
        "mean_squared_error": [a(n, m), a(n, m), None, a(n, m)],
        "sgd_update": [a(n), a(n), a(n), 0.1, 0.9, 0.0, 0.0, False, 1],
        "adam_update": [a(n), a(n), a(n), np.abs(a(n)), np.abs(a(n)), 1e-3, 0.9, 0.999,
                        1e-8, 0.0, False, False, 1],
        "dense_stack_forward": [a(n, k), a(k * m + m + m * m + m), np.array([k, m, m]),
                                np.array([act, 0]), np.zeros(2), np.ones(2, np.int64),
                                a(fn.kernels.dense_stack_workspace_size(n, [k, m, m])),
                                a(n, m)],
        "softmax_forward": [a(n, m), a(n, m)],
    }[kernel]


def spoiled(array, spoil, axis):
    if spoil == "dtype":
        return array.astype(np.float64 if array.dtype == np.float32 else np.float32)
    if spoil == "fortran":
        return np.asfortranarray(array) if array.ndim == 2 else array[::-1]
    if spoil == "strided":
        return np.repeat(array, 2, axis=-1)[..., ::2]
    if spoil == "rank":
        return array[None]
    if spoil in ("short", "long"):
        axis = min(axis, array.ndim - 1)
        if spoil == "short":
            return np.ascontiguousarray(np.delete(array, 0, axis=axis))
        return np.ascontiguousarray(np.concatenate([array, array.take([0], axis)], axis))
    return array.astype(np.int64)


def run_kernels(case):
    module = fn.kernels.load(case["backend"])
    labelled = case["kernel"] in ("softmax_cross_entropy", "multiclass_hinge")
    args = kernel_arguments(case["kernel"], case["dtype"], case["act"] % 7 + 1
                            if not labelled else 0)
    spoil = case["spoil"]
    if spoil.startswith("label_"):
        if not labelled:
            return
        labels = args[1].copy()
        if spoil == "label_value":
            labels[case["which"] % labels.size] = case["label"]
        elif spoil == "label_length":
            labels = labels[1:]
        else:
            labels = labels.astype(np.float64)
        args[1] = labels
    elif spoil != "none":
        slots = [i for i, v in enumerate(args)
                 if isinstance(v, np.ndarray) and v.dtype.kind == "f"]
        i = slots[case["which"] % len(slots)]
        args[i] = spoiled(args[i], spoil, case["axis"])
    attempt(getattr(module, case["kernel"]), *args)


#: Inputs every run tries first: the bugs the fuzzer found (see tests/test_fuzz.py).
KNOWN_CRASHERS = {
    "layers": [{"backend": "numpy", "dense": {"in_features": 4, "out_features": 2},
                "activation": ("relu", None), "dropout": (0.5, None),
                "x": np.ones(3), "dout": np.ones((3, 2))}],
    "model": [{"backend": "numpy", "sizes": [3, 2], "acts": ["relu"], "dtype": "float32",
               "loss": "mae", "optimizer": ("adam", {"lr": -1.0}), "metrics": None,
               "X": np.ones((4, 3)), "y": np.ones((4, 2)), "fit": {},
               "X_new": np.ones((2, 3))}],
    "structure": [{"backend": "cython", "sizes": [3, 4], "acts": ["tanh"],
                   "dtype": "float32", "layers_arg": [], "added": ("Dense", 5, 2),
                   "weights": [], "X": np.ones((5, 3)), "y": np.arange(5) % 4}],
}
TARGETS = {"layers": (layer_cases, run_layers), "model": (model_cases, run_model),
           "structure": (structure_cases, run_structure),
           "model_file": (model_file_cases, run_model_file),
           "kernels": (kernel_cases, run_kernels)}


def main(target, max_examples):
    strategy, run = TARGETS[target]

    def fuzz(case):
        show(case)
        with contextlib.redirect_stdout(io.StringIO()):  # progress lines of fit/solvers
            run(case)

    for case in KNOWN_CRASHERS.get(target, []):
        fuzz = example(case)(fuzz)
    fuzz = settings(max_examples=max_examples, derandomize=True, database=None,
                    deadline=None, phases=(Phase.explicit, Phase.generate),
                    print_blob=False, suppress_health_check=list(HealthCheck))(
        given(strategy())(fuzz))
    fuzz()


if __name__ == "__main__":
    faulthandler.enable()
    np.seterr(all="ignore")
    main(sys.argv[1], int(sys.argv[2]))
