"""Training runs for tests/test_distributed.py, started under ``mpiexec`` by the tests.

``python _distributed_runs.py OUTDIR NAME [NAME ...]`` runs each named run on every
rank and writes ``OUTDIR/NAME-rank{r}.npz`` (final parameters, the History as JSON,
or the exception raised, and whether fit took the fused epoch path). ``build(name, rank, size)`` is also what the tests call in
one process to make the single-process reference with batch ``size * batch_size``.
Every rank starts from its own random weights: fit must broadcast rank 0's.
"""
import contextlib
import json
import os
import sys
import warnings

import numpy as np

import fastnn as fn
from fastnn import _training
from fastnn import callbacks as cbs
from fastnn import kernels, optimizers, solvers

BATCH = 8
#: The runs ``build`` makes, each compared with one process by the tests.
EQUIVALENT = ("sgd_l2", "adam", "adam32", "fused_momentum", "fused_sgd", "full_batch_sgd",
              "fused_sgd32",
              "fused_adam", "streamed_fused_sgd", "streamed_fused_adam",
              "callbacks", "callbacks_on_rank0", "batch_callback_on_rank0", "warmup_on_rank0",
              "zero_weight_batch", "lbfgs", "lm", "lm_free", "conjugate_gradient",
              "newton_cg")


def _data(n, d, dtype, seed=3):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(dtype)
    y_class = (X[:, 0] + X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1)
    y_reg = np.stack([np.sin(X[:, 0]) + X[:, 1], X[:, 2] * X[:, 3]], axis=1)
    weights = rng.uniform(0.2, 2.0, n)
    return X, y_class, y_reg.astype(dtype), weights


def _model(sizes, dtype, seed, l2=0.0, activation="tanh"):
    layers = [fn.Dense(a, b, activation=activation if i < len(sizes) - 2 else None,
                       l2=l2, dtype=dtype, seed=seed + i)
              for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
    return fn.Sequential(layers)


def build(name, rank, size):
    """(model, X, y, fit keyword arguments) of run ``name`` on ``rank`` of ``size``
    (rank 0 of 1: the single-process reference, whose batch is size * BATCH);
    "streamed_<run>": <run> with every rank streaming its writes for the others
    (``distributed.STREAM_BELOW`` = inf, set by ``_run``)."""
    if name.startswith("streamed_"):
        return build(name[len("streamed_"):], rank, size)
    dtype = "float32" if name.endswith("32") else "float64"
    seed = 0 if rank == 0 else 100 + rank
    X, y_class, y_reg, weights = _data(61, 5, dtype)
    fit = {"epochs": 3, "batch_size": BATCH, "verbose": 0, "seed": 7, "distributed": True}
    if name == "sgd_l2":  # momentum, l2, a validation split, accuracy
        model = _model((5, 7, 3), dtype, seed, l2=1e-3)
        model.compile("cross_entropy", optimizers.SGD(lr=0.2, momentum=0.9), ["accuracy"])
        return model, X, y_class, {**fit, "validation_split": 0.25}
    if name.startswith("adam"):  # sample weights, weighted validation data, r2 and mae
        model = _model((5, 6, 2), dtype, seed)
        model.compile("mse", optimizers.Adam(lr=0.02), ["mae", "r2"])
        val = (X[:13] * 0.5, y_reg[:13], weights[:13])
        return model, X, y_reg, {**fit, "sample_weight": weights, "validation_data": val}
    if name == "fused_momentum":  # the fused epoch: uneven last batches, validation
        model = _model((5, 7, 3), dtype, seed)
        model.compile("cross_entropy", optimizers.SGD(lr=0.2, momentum=0.9), ["accuracy"])
        return model, X, y_class, {**fit, "validation_split": 0.25}
    if name == "fused_sgd":  # plain SGD: the first layer split by columns on the node
        model = _model((5, 7, 3), dtype, seed, activation="relu")
        model.compile("cross_entropy", optimizers.SGD(lr=0.2, weight_decay=1e-3),
                      ["accuracy"])
        return model, X, y_class, {**fit, "validation_split": 0.25, "epochs": 4}
    if name == "full_batch_sgd":  # the split first layer's region: one global batch of n
        model, X, y, fit = build("fused_sgd", rank, size)
        return model, X, y, {**fit, "batch_size": None, "validation_split": 0.0}
    if name == "fused_sgd32":  # plain SGD, folded into the backward in one process only
        model = _model((5, 6, 2), dtype, seed, activation="relu")
        model.compile("mse", optimizers.SGD(lr=0.05))
        return model, X, y_reg, fit
    if name == "fused_adam":
        model = _model((5, 8, 6, 2), dtype, seed)
        model.compile("huber", optimizers.Adam(lr=0.02))
        return model, X, y_reg, {**fit, "batch_size": 5}
    if name == "callbacks":  # early stopping with restored weights, lr plateaus, files
        model = _model((5, 7, 3), dtype, seed)
        model.compile("cross_entropy", optimizers.SGD(lr=0.5), ["accuracy"])
        out = os.environ.get("FASTNN_TEST_OUT", ".")
        callbacks = [cbs.ReduceLROnPlateau("loss", patience=0, factor=0.5),
                     cbs.EarlyStopping("val_accuracy", patience=1, restore_best_weights=True),
                     cbs.CSVLogger(os.path.join(out, f"log-rank{rank}.csv")),
                     cbs.ModelCheckpoint(os.path.join(out, f"ckpt-rank{rank}.npz"), "loss")]
        return model, X, y_class, {**fit, "epochs": 8, "validation_split": 0.3,
                                   "callbacks": callbacks}
    if name == "callbacks_on_rank0":  # restored weights and lr plateaus on rank 0 alone
        model = _model((5, 7, 3), dtype, seed)
        model.compile("cross_entropy", optimizers.SGD(lr=0.5, momentum=0.5), ["accuracy"])
        callbacks = [cbs.ReduceLROnPlateau("loss", patience=0, factor=0.5),
                     cbs.EarlyStopping("val_accuracy", patience=1,
                                       restore_best_weights=True)] if rank == 0 else []
        return model, X, y_class, {**fit, "epochs": 8, "validation_split": 0.3,
                                   "callbacks": callbacks}
    if name == "batch_callback_on_rank0":  # sends every rank step by step, not rank 0 alone
        model, X, y, fit = build("fused_momentum", rank, size)
        return model, X, y, {**fit, "callbacks": [_CountBatches()] if rank == 0 else []}
    if name == "warmup_on_rank0":  # the rate set per batch on rank 0 holds on every rank
        model, X, y, fit = build("fused_momentum", rank, size)
        return model, X, y, {**fit, "callbacks": [_WarmUp()] if rank == 0 else []}
    if name == "zero_weight_batch":  # the first global batch (2 or 3 ranks) weighs nothing
        model = _model((5, 7, 3), dtype, seed)
        model.compile("cross_entropy", optimizers.SGD(lr=0.2, momentum=0.9), ["accuracy"])
        weights = weights.copy()
        weights[:24] = 0.0
        return model, X, y_class, {**fit, "sample_weight": weights, "shuffle": False}
    model = _model((5, 4, 2), dtype, seed, l2=1e-4 if name == "lm" else 0.0)
    solver = {"lbfgs": solvers.LBFGS(), "lm": solvers.LevenbergMarquardt(matrix_free=False),
              "lm_free": solvers.LevenbergMarquardt(matrix_free=True),
              "conjugate_gradient": solvers.ConjugateGradient(),
              "newton_cg": solvers.NewtonCG()}[name]
    model.compile("mse", solver, ["r2"])
    return model, X, y_reg, {**fit, "epochs": 4, "sample_weight": weights,
                             "validation_split": 0.2 if name == "lbfgs" else 0.0}


class _CountBatches(cbs.Callback):
    """A batch-level callback: the fit cannot run whole epochs in one kernel call."""

    def __init__(self):
        self.batches = 0

    def on_batch_end(self, batch, logs=None):
        self.batches += 1


class _WarmUp(cbs.Callback):
    """Raises the learning rate step by step (lr = 0.02 (t + 1) up to 0.2)."""

    def on_batch_end(self, batch, logs=None):
        self.model.optimizer.lr = min(0.2, 0.02 * (self.model.optimizer.iterations + 1))


class _StopOnRank(cbs.Callback):
    """Stops training after epoch ``epoch`` on one rank only."""

    def __init__(self, rank, epoch):
        self.rank, self.epoch = rank, epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch and fn.distributed.rank() == self.rank:
            self.model.stop_training = True


class _FailOnRank(cbs.Callback):
    """Raises in ``on_epoch_end`` of epoch 1 on the last rank."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1 and fn.distributed.rank() == fn.distributed.size() - 1:
            raise RuntimeError("callback failed on purpose")


def build_special(name, rank, size, out):
    """Runs that are not compared with one process: stops and faults."""
    model, X, y, fit = build("sgd_l2", rank, size)
    fit.pop("validation_split")
    if name == "stop_on_one_rank":
        fit.update(epochs=5, callbacks=[_StopOnRank(size - 1, 1)])
    elif name in ("numba_momentum", "numpy_momentum"):
        # numba steps in Python when distributed; the numpy reference runs the fused
        # epoch with the hook
        model, X, y, fit = build("fused_momentum", rank, size)
    elif name == "numpy_sgd":  # the numpy reference's split first layer
        model, X, y, fit = build("fused_sgd", rank, size)
    elif name.startswith("no_room_") or name.startswith("no_split_room_"):
        # _NoRoom shrinks the node's shared memory; "twice": two fits in a row
        model, X, y, fit = build(name.split("room_")[1].replace("twice_", ""), rank, size)
    elif name.startswith("iallreduce_"):  # Iallreduce instead of the node's shared memory
        model, X, y, fit = build(name[len("iallreduce_"):], rank, size)
    elif name == "balanced_shards":
        model, X, y, fit = balanced_shards(rank, size)
    elif name in ("weights_on_one_shard", "string_label_shards", "zero_val_on_one_shard"):
        model, X, y, fit = own_shards(name, rank, size)
    elif name == "refused_then_refit":  # a refused fit fixes no labels on any rank
        model, X, y, fit = own_shards("string_label_shards", rank, size)
        try:
            model.fit(X[:10], y[:10], **{**fit, "epochs": -1})
        except ValueError:
            pass
        else:
            raise AssertionError("epochs=-1 was accepted")
        if model.class_labels is not None:
            raise AssertionError(f"a refused fit fixed {model.class_labels}")
    elif name == "other_class_weight":  # one rank weighs its shard's classes, the others not
        model, X, y, fit = balanced_shards(rank, size)
        if rank != size - 1:
            del fit["class_weight"]
    elif "shards" in name:  # own parts of 20 + 7 r samples, uneven
        X, y = X[:20 + 7 * rank], y[:20 + 7 * rank]
        fit.update(distributed="shards", batch_size=25)
        if name != "shards":  # no l2: the fused epoch, with empty steps on rank 0
            model = _model((5, 7, 3), "float64", 0)
            model.compile("cross_entropy", optimizers.SGD(
                lr=0.2, **({"weight_decay": 1e-3} if "sgd" in name else {"momentum": 0.9})))
            model.use_fused_epoch = name.startswith("fused")
    elif name == "bad_data":
        if rank == size - 1:
            X = X.copy()
            X[4, 1] = np.nan
    elif name == "nan_on_one_rank":  # the squared error overflows on the last rank
        model = _model((5, 6, 2), "float64", 0)
        model.compile("mse", "sgd")
        y = _data(61, 5, "float64")[2] * (1e200 if rank == size - 1 else 1.0)
        fit["distributed"] = "shards"
    elif name == "callback_fails":
        fit.update(epochs=4, callbacks=[
            cbs.ModelCheckpoint(os.path.join(out, "fault-ckpt-{epoch}.npz"), "loss"),
            _FailOnRank()])
    elif name == "other_model":
        model = _model((5, 7 + rank, 3), "float64", 0)
        model.compile("cross_entropy", "sgd")
    elif name == "other_data":
        X = X + rank
    elif name == "abort" and rank == size - 1:  # fails outside fit's agreements
        def broken_step(params, grads):
            raise MemoryError("optimizer step failed on purpose")
        model.optimizer.step = broken_step
    return model, X, y, fit


def _shard(rank):
    """Rank ``rank``'s own part of the 61 samples: 25 + 7 rank of them, from 5 rank on."""
    return np.arange(61)[5 * rank:25 + 12 * rank]


def _balanced_model(rank):
    model = _model((5, 7, 3), "float64", 0 if rank == 0 else 100 + rank)
    model.compile("cross_entropy", optimizers.SGD(lr=0.3, momentum=0.9), ["accuracy"])
    return model


BALANCED_FIT = {"epochs": 3, "batch_size": None, "verbose": 0, "seed": 7}


def balanced_shards(rank, size):
    """Own shards with their own class mixes, class_weight="balanced", a validation
    split of each shard, full-batch steps."""
    X, y, _, _ = _data(61, 5, "float64")
    part = _shard(rank)
    return _balanced_model(rank), X[part], y[part], {
        **BALANCED_FIT, "distributed": "shards", "class_weight": "balanced",
        "validation_split": 0.25}


def balanced_shards_reference(size):
    """``balanced_shards`` of ``size`` ranks in one process: the concatenated training
    parts with each class weighted by its count over every shard, and the concatenated
    validation parts weighted alike."""
    X, y, _, _ = _data(61, 5, "float64")
    parts = [_shard(r) for r in range(size)]
    counts = np.bincount(y[np.concatenate(parts)], minlength=3).astype(np.float64)
    factors = counts.sum() / (np.count_nonzero(counts) * counts)
    cuts = [len(part) - int(round(len(part) * 0.25)) for part in parts]
    train = np.concatenate([part[:cut] for part, cut in zip(parts, cuts)])
    val = np.concatenate([part[cut:] for part, cut in zip(parts, cuts)])
    return _balanced_model(0), X[train], y[train], {
        **BALANCED_FIT, "class_weight": dict(enumerate(factors)),
        "validation_data": (X[val], y[val], factors[y[val]])}


#: The class names of ``own_shards``: rank 0's part lacks "ant" (code 0 of the union).
NAMES = np.array(["ant", "bee", "cat"])


def own_shards(name, rank, size):
    """Own shards, full-batch steps, a model the fused epoch would take:
    "weights_on_one_shard": rank 0 alone passes sample weights (every rank then steps in
    Python, the others with weight 1); "string_label_shards": string labels, and rank
    0's part lacks one class (the codes must be those of every rank's labels)."""
    X, y, _, weights = _data(61, 5, "float64")
    model = _balanced_model(rank)
    fit = {**BALANCED_FIT, "distributed": "shards"}
    if name == "weights_on_one_shard":
        part = _shard(rank)
        if rank == 0:
            fit["sample_weight"] = weights[part]
        return model, X[part], y[part], fit
    if name == "zero_val_on_one_shard":  # the last rank's validation part weighs nothing
        part = _shard(rank)
        fit.update(validation_split=0.25, sample_weight=_zero_val_weights(weights, part, rank,
                                                                          size))
        return model, X[part], y[part], fit
    part = _label_shard(y, rank, size)
    return model, X[part], NAMES[y[part]], fit


def _zero_val_weights(weights, part, rank, size):
    """``weights`` of ``part``, zero on the validation quarter of the last rank's."""
    w = weights[part].copy()
    if rank == size - 1:
        w[len(part) - int(round(len(part) * 0.25)):] = 0.0
    return w


def _label_shard(y, rank, size):
    """Rank 0: the samples of classes 1 and 2 among the first 30; the other ranks split
    the rest."""
    if rank == 0:
        return np.flatnonzero(y[:30] != 0)
    return 30 + np.array_split(np.arange(31), size - 1)[rank - 1]


def own_shards_reference(name, size):
    """``own_shards`` of ``size`` ranks in one process: the concatenated parts (weight 1
    for the parts passed without weights)."""
    X, y, _, weights = _data(61, 5, "float64")
    fit = dict(BALANCED_FIT)
    if name == "zero_val_on_one_shard":
        parts = [_shard(r) for r in range(size)]
        w = [_zero_val_weights(weights, part, r, size) for r, part in enumerate(parts)]
        cuts = [len(part) - int(round(len(part) * 0.25)) for part in parts]
        train = np.concatenate([part[:cut] for part, cut in zip(parts, cuts)])
        val = np.concatenate([part[cut:] for part, cut in zip(parts, cuts)])
        fit["sample_weight"] = np.concatenate([wr[:cut] for wr, cut in zip(w, cuts)])
        fit["validation_data"] = (X[val], y[val],
                                  np.concatenate([wr[cut:] for wr, cut in zip(w, cuts)]))
        return _balanced_model(0), X[train], y[train], fit
    if name == "weights_on_one_shard":
        parts = [_shard(r) for r in range(size)]
        fit["sample_weight"] = np.concatenate(
            [weights[parts[0]]] + [np.ones(len(part)) for part in parts[1:]])
        labels = y
    else:
        parts = [_label_shard(y, r, size) for r in range(size)]
        labels = NAMES[y]
    rows = np.concatenate(parts)
    return _balanced_model(0), X[rows], labels[rows], fit


class _CountSharedMemorySteps:
    """Counts the steps that train_epoch runs on the node's shared memory (a NodeSum
    reduce): how far each call moves this rank's DONE flag; ``split_rows`` the largest
    NodeSum.split_rows seen."""

    def __init__(self):
        self.steps = self.split_rows = 0
        self.modules = [fn.kernels.load(name) for name in fn.kernels.available_backends()]
        self.calls = [module.train_epoch for module in self.modules]

    def __enter__(self):
        def counting(call):
            def train_epoch(spec):
                if not isinstance(spec.reduce, fn.kernels.NodeSum):
                    return call(spec)
                done = spec.reduce.segments[spec.reduce.rank][:24].view(np.int64)
                before = int(done[fn.kernels.NODE_DONE])
                self.split_rows = max(self.split_rows, spec.reduce.split_rows)
                try:
                    return call(spec)
                finally:
                    self.steps += int(done[fn.kernels.NODE_DONE]) - before
            return train_epoch
        for module, call in zip(self.modules, self.calls):
            module.train_epoch = counting(call)
        return self

    def __exit__(self, *exc):
        for module, call in zip(self.modules, self.calls):
            module.train_epoch = call


class _NoRoom:
    """A node whose shared memory has no room for any window ("no_room_" runs) or for
    no more than the model's gradient ("no_split_room_": the first layer is summed, not
    split); a fresh node: the windows made so far are forgotten. Keeps the warnings and
    counts the sums in Python that go through a window (``window_sums``)."""

    def __init__(self, name, model, size):
        self.free = 0
        if name.startswith("no_split_room_"):  # just room for the gradient's window
            gradient = -(-model.grads.nbytes // 64) * 64
            self.free = int(size * (fn.kernels.NODE_DATA + gradient)
                            / fn.distributed.SHARED_MEMORY_SHARE) + 1
        self.warnings, self.window_sums = [], 0

    def __enter__(self):
        self.saved = (fn.distributed._shared_memory_room, fn.distributed._node_window,
                      fn.distributed._NodeWindow.begin)
        fn.distributed._shared_memory_room = lambda: ("/no-room", self.free)
        begin = fn.distributed._NodeWindow.begin

        def counting(window):
            self.window_sums += 1
            return begin(window)
        fn.distributed._NodeWindow.begin = counting
        self._forget()
        fn.distributed._node_window = None
        self.catching = warnings.catch_warnings(record=True)
        self.warnings = self.catching.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self.catching.__exit__(*exc)
        (fn.distributed._shared_memory_room, fn.distributed._node_window,
         fn.distributed._NodeWindow.begin) = self.saved
        self._forget()

    @staticmethod
    def _forget():
        """No window refused yet."""
        fn.distributed._refused_total = fn.distributed._refusal = None
        fn.distributed._refusal_told = True


def fit_and_trace(model, X, y, fit):
    """``model.fit(X, y, **fit)`` and whether it ran the fused epoch: (History, bool)."""
    runner, fused = _training.fused_epoch_runner, []

    def traced(*args, **kwargs):
        run = runner(*args, **kwargs)
        fused.append(run is not None)
        return run
    _training.fused_epoch_runner = traced
    try:
        return model.fit(X, y, **fit), any(fused)
    finally:
        _training.fused_epoch_runner = runner


def _run(name, rank, size, out):
    if name in EQUIVALENT:
        model, X, y, fit = build(name, rank, size)
    else:
        model, X, y, fit = build_special(name, rank, size, out)
    backend = name.split("_")[0] if name.startswith(("numba_", "numpy_")) else fn.get_backend()
    fn.distributed.SHARED_MEMORY = not name.startswith("iallreduce")
    fn.distributed.STREAM_BELOW = np.inf if name.startswith("streamed_") else kernels.STREAM_BELOW
    room = _NoRoom(name, model, size) if "room_" in name else contextlib.nullcontext()
    try:
        with fn.use_backend(backend), _CountSharedMemorySteps() as shared, room:
            history, fused = fit_and_trace(model, X, y, fit)
            if "twice" in name:
                history, fused = fit_and_trace(model, X, y, fit)
    except Exception as exc:
        return {"params": model.params, "error": json.dumps([type(exc).__name__, str(exc)])}
    finally:
        fn.distributed.SHARED_MEMORY = True
        fn.distributed.STREAM_BELOW = kernels.STREAM_BELOW
    classes = None if model.class_labels is None else model.class_labels.classes.tolist()
    optimizer = model.optimizer
    states = [optimizer.state[name] for name in getattr(optimizer, "state_names", ())
              if name in getattr(optimizer, "state", {})]
    return {"params": model.params, "fused": json.dumps(fused), "classes": json.dumps(classes),
            "states": np.concatenate(states) if states else np.empty(0, model.dtype),
            "shared_memory_steps": json.dumps(shared.steps),
            "split_rows": json.dumps(shared.split_rows),
            "warnings": json.dumps([str(w.message) for w in getattr(room, "warnings", [])]),
            "window_sums": json.dumps(getattr(room, "window_sums", None)),
            "history": json.dumps({"history": history.history, "epoch": history.epoch,
                                   "stop_reason": history.stop_reason})}


def main(argv):
    out, names = argv[0], argv[1:]
    os.environ["FASTNN_TEST_OUT"] = out
    # every sum through the node's shared memory, however small (the runs' nets are),
    # except in the iallreduce_ runs
    fn.distributed.SHARED_MEMORY_BYTES = 0
    rank, size = fn.distributed.rank(), fn.distributed.size()
    for name in names:
        np.savez(os.path.join(out, f"{name}-rank{rank}.npz"), **_run(name, rank, size, out))


if __name__ == "__main__":
    main(sys.argv[1:])
