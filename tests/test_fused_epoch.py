"""The fused epoch kernel (train_epoch) and the fit fast path that uses it.

Every backend's train_epoch is compared with the numpy reference, and fit's fused path
with its general (batch-by-batch Python) path: same weights, same history.
"""
import os
import threading

import numpy as np
import pytest

import fastnn as fn
from fastnn import kernels

REF = kernels.load("numpy")
OPTIMIZER_CASES = {
    "sgd": ("sgd", [0.0, 0.0, 0.0, 0.0]),
    "sgd_weight_decay": ("sgd", [0.0, 0.0, 1e-2, 0.0]),  # folded: gemm beta = 1 - lr wd
    "sgd_momentum_wd": ("sgd", [0.9, 0.1, 1e-3, 0.0]),
    "sgd_nesterov": ("sgd", [0.9, 0.0, 0.0, 1.0]),
    "adagrad": ("adagrad", [0.01, 1e-3, 1e-10]),
    "rmsprop_centered_momentum": ("rmsprop", [0.9, 1e-8, 1e-3, 0.5, 1.0]),
    "rmsprop": ("rmsprop", [0.99, 1e-8, 0.0, 0.0, 0.0]),
    "adam": ("adam", [0.9, 0.999, 1e-8, 0.0, 0.0, 0.0]),
    "adamw_amsgrad": ("adam", [0.9, 0.99, 1e-8, 0.01, 1.0, 1.0]),
}
LOSS_PARAMS = {"huber": 0.5, "hinge": 1.0}


def make_problem(rng, dtype, widths, loss, n):
    X = rng.standard_normal((n, widths[0])).astype(dtype)
    k = widths[-1]
    if loss in ("cross_entropy", "hinge"):
        return X, rng.integers(0, k, n).astype(np.int64), np.empty((0, k), dtype)
    if loss == "binary_cross_entropy":
        return X, np.empty(0, np.int64), (rng.random((n, k)) < 0.5).astype(dtype)
    return X, np.empty(0, np.int64), rng.standard_normal((n, k)).astype(dtype)


def run_kernel(module, X, labels, targets, order, batch, widths, acts, use_bias, params,
               loss, opt, lr, step=3, states=None):
    name, values = OPTIMIZER_CASES[opt]
    hyper = np.array(values, dtype=np.float64)
    assert hyper.size == len(kernels.OPTIMIZER_HYPER[name])
    params = params.copy()
    grads = np.zeros_like(params)
    states = ([np.full_like(params, 0.01) for _ in range(3)]  # a run already under way
              if states is None else [state.copy() for state in states])
    n_batches = -(-order.size // batch)
    workspace = np.empty(kernels.train_epoch_workspace_size(batch, widths), params.dtype)
    stats = np.zeros(4)
    alphas = np.array([kernels.DEFAULT_ALPHA[a] for a in acts], np.float64)
    lrs = lr * (1.0 + 0.1 * np.arange(n_batches))
    module.train_epoch(kernels.TrainEpochSpec(
        X=X, labels=labels, targets=targets, order=order, batch_size=batch,
        widths=np.array(widths, np.int64), acts=np.array(acts, np.int64), alphas=alphas,
        use_bias=np.array(use_bias, np.int64), params=params, grads=grads,
        workspace=workspace, loss_code=kernels.LOSS_CODES[loss],
        loss_param=LOSS_PARAMS.get(loss, 0.0),
        optimizer=kernels.OptimizerSpec(kernels.OPTIMIZER_CODES[name], hyper, tuple(states)),
        lrs=lrs, step=step, stats=stats))
    return params, states, stats


def n_params(widths, use_bias):
    return sum(d * k + (k if bias else 0)
               for d, k, bias in zip(widths[:-1], widths[1:], use_bias))


CASES = [
    # widths, acts, use_bias, batch, n
    ((5, 3), ("identity",), (1,), 4, 10),
    ((6, 8, 3), ("relu", "identity"), (1, 1), 7, 23),
    ((4, 9, 5, 2), ("tanh", "elu", "identity"), (1, 0, 1), 1, 6),
    ((3, 6, 4), ("sigmoid", "leaky_relu"), (0, 1), 50, 13),
    ((5, 7, 3), ("softplus", "identity"), (1, 1), 8, 32),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("loss", sorted(kernels.LOSS_CODES))
def test_train_epoch_matches_reference(backend, dtype, loss, case):
    widths, act_names, use_bias, batch, n = CASES[case]
    if loss in ("cross_entropy", "hinge") and widths[-1] < 2:
        pytest.skip("label losses need two outputs")
    rng = np.random.default_rng(case)
    acts = [kernels.ACTIVATIONS[a] for a in act_names]
    X, labels, targets = make_problem(rng, dtype, widths, loss, n)
    params0 = (0.4 * rng.standard_normal(n_params(widths, use_bias))).astype(dtype)
    order = rng.permutation(n) if case % 2 else rng.integers(0, n, n)
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-12)
    for opt in OPTIMIZER_CASES:
        args = (X, labels, targets, order, batch, widths, acts, use_bias, params0, loss, opt,
                0.05)
        expected, expected_states, expected_stats = run_kernel(REF, *args)
        X.setflags(write=False)
        got, got_states, got_stats = run_kernel(backend, *args)
        X.setflags(write=True)
        msg = f"{backend.__name__} {loss} {opt} case {case}"
        np.testing.assert_allclose(got, expected, err_msg=msg, **tol)
        for g, e in zip(got_states, expected_states):
            np.testing.assert_allclose(g, e, err_msg=msg, **tol)
        np.testing.assert_allclose(got_stats, expected_stats, err_msg=msg, rtol=1e-4, atol=1e-6)


def test_train_epoch_stops_before_a_non_finite_loss(backend):
    rng = np.random.default_rng(0)
    widths, acts, use_bias = (4, 16, 3), [kernels.ACTIVATIONS["relu"], 0], (1, 1)
    X, labels, targets = make_problem(rng, np.float64, widths, "mse", 64)
    X *= 1e3
    params0 = rng.standard_normal(n_params(widths, use_bias))
    order = np.arange(64)
    args = (X, labels, targets, order, 8, widths, acts, use_bias, params0, "mse", "sgd")
    got, _, stats = run_kernel(backend, *args, lr=1e6)
    expected, _, expected_stats = run_kernel(REF, *args, lr=1e6)
    assert stats[2] < 8 and not np.isfinite(stats[3])
    assert stats[2] == expected_stats[2]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-9)


# ------------------------------------------------------------------ NodeSum: ranks as threads
def node_segments(ranks, n_bytes):
    """``ranks`` NodeSum segments of one zeroed buffer, each on its own cache lines."""
    stride = -(-(kernels.NODE_DATA + n_bytes) // 64) * 64
    memory = np.zeros(ranks * stride + 64, np.uint8)
    offset = -memory.ctypes.data % 64
    return tuple(memory[offset + r * stride:offset + (r + 1) * stride] for r in range(ranks))


def aligned_zeros(n_bytes):
    """A zeroed uint8 array of ``n_bytes`` starting on a cache line."""
    memory = np.zeros(n_bytes + 64, np.uint8)
    offset = -memory.ctypes.data % 64
    return memory[offset:offset + n_bytes]


def run_node_sum(module, ranks, X, labels, targets, batch, widths, acts, use_bias, params,
                 loss, opt, lr, segments=None, step=3, split=False, epochs=1, shards=None,
                 alias_unused=False, stream_below=kernels.STREAM_BELOW):
    """``epochs`` epochs on ``ranks`` threads that share memory through a NodeSum, each
    taking its part of every global batch of ``ranks * batch`` rows (``BatchPlan``), or
    with ``shards`` (every rank's row count) stepping through its own shard (rank r's
    the rows after the shards before it), with run_kernel's arguments; ``split``: the
    first layer split by columns; ``alias_unused``: the optimizer's unused state slots
    are its first used one (as ``Optimizer.kernel_spec`` passes them); ``stream_below``:
    NodeSum's. Every rank's (params, states, stats of the last epoch)."""
    from fastnn._epochs import BatchPlan

    name, values = OPTIMIZER_CASES[opt]
    used = kernels.optimizer_states_used(kernels.OPTIMIZER_CODES[name], values)
    n = X.shape[0]
    segments = segments or node_segments(ranks, params.nbytes)
    shared = (aligned_zeros(kernels.node_split_bytes(widths, ranks * batch, params.itemsize,
                                                     len(used)))
              if split else None)
    results, errors = [None] * ranks, []

    def rank_epoch(rank):
        if shards is None:
            plan, rows = BatchPlan(n, batch, ranks, rank), None
        else:
            first = sum(shards[:rank])
            rows = np.arange(first, first + shards[rank])
            plan = BatchPlan(shards[rank], batch, part=rank,
                             n_batches=-(-max(shards) // batch), shard_sizes=shards)
        mine = params.copy()
        states = [np.full_like(params, 0.01) for _ in range(3)]
        if alias_unused:
            states = [states[slot if slot in used else used[0] if used else 0]
                      for slot in range(3)]
        stats = np.zeros(4)
        grads = segments[rank][kernels.NODE_DATA:kernels.NODE_DATA + params.nbytes].view(
            params.dtype)
        order = plan.positions() if rows is None else rows[plan.positions()]
        try:
            for epoch in range(epochs):
                module.train_epoch(kernels.TrainEpochSpec(
                    X=X, labels=labels, targets=targets, order=order, batch_size=batch,
                    widths=np.array(widths, np.int64), acts=np.array(acts, np.int64),
                    alphas=np.array([kernels.DEFAULT_ALPHA[a] for a in acts], np.float64),
                    use_bias=np.array(use_bias, np.int64), params=mine, grads=grads,
                    workspace=np.empty(kernels.train_epoch_workspace_size(batch, widths),
                                       params.dtype),
                    loss_code=kernels.LOSS_CODES[loss], loss_param=LOSS_PARAMS.get(loss, 0.0),
                    optimizer=kernels.OptimizerSpec(kernels.OPTIMIZER_CODES[name],
                                                    np.array(values), tuple(states)),
                    lrs=lr * (1.0 + 0.1 * np.arange(plan.n_batches)),
                    step=step + epoch * plan.n_batches, stats=stats,
                    reduce=kernels.NodeSum(
                        segments, rank, plan.global_rows(), 0.0, lambda: None,
                        ranks * batch if split else 0, shared,
                        plan.row_starts() if split else None, stream_below=stream_below)))
        except Exception as exc:  # reported by the test, not lost in the thread
            errors.append(exc)
        results[rank] = (mine, states, stats)

    threads = [threading.Thread(target=rank_epoch, args=(r,), daemon=True)
               for r in range(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a rank is still waiting"
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("loss, opt", [("cross_entropy", "sgd"), ("mse", "sgd_momentum_wd"),
                                       ("binary_cross_entropy", "adamw_amsgrad")])
def test_node_sum_ranks_equal_one_process_with_the_global_batch(backend, dtype, ranks, loss,
                                                                 opt):
    """K ranks (threads) summing through a NodeSum: every rank ends with the same bits,
    and they equal one process training with the global batch (rows split unevenly in
    the last step, and a rank with no rows in it)."""
    widths, acts, use_bias = (6, 8, 5, 3), (kernels.RELU, kernels.TANH, kernels.IDENTITY), \
        (1, 0, 1)
    rng = np.random.default_rng(ranks)
    n, batch = 25, 4
    X, labels, targets = make_problem(rng, dtype, widths, loss, n)
    params0 = (0.4 * rng.standard_normal(n_params(widths, use_bias))).astype(dtype)
    args = (X, labels, targets)
    net = (widths, acts, use_bias, params0, loss, opt, 0.05)
    ranked = run_node_sum(backend, ranks, *args, batch, *net)
    expected, expected_states, expected_stats = run_kernel(REF, *args, np.arange(n),
                                                           ranks * batch, *net)
    for params, states, stats in ranked[1:]:
        np.testing.assert_array_equal(params, ranked[0][0])
        for s, s0 in zip(states, ranked[0][1]):
            np.testing.assert_array_equal(s, s0)
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ranked[0][0], expected, **tol)
    for s, e in zip(ranked[0][1], expected_states):
        np.testing.assert_allclose(s, e, **tol)
    stats = np.array([stats for _, _, stats in ranked])
    assert (stats[:, 2] == expected_stats[2]).all()
    np.testing.assert_allclose(stats[:, :2].sum(axis=0), expected_stats[:2], rtol=1e-4)


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("case", ["relu_tanh", "first_layer_without_bias", "one_layer",
                                  "narrow_first_layer", "wide_first_layer",
                                  "tall_batches"])
def test_node_split_first_layer_equals_one_process_with_the_global_batch(backend, dtype,
                                                                        ranks, case):
    """Plain SGD with the first layer split by columns (NodeSum.split_rows): two epochs
    on K ranks (threads) end with the same bits on every rank and equal one process
    with the global batch (uneven last step, a rank with no rows in it; weight decay;
    a layer without bias; a single layer, whose only layer is the split one; a first
    layer of 2 units, so that the third rank has no column; a first layer of 1100 x 512,
    whose rank blocks of over 1 MiB the Cython kernel updates in place in the shared
    region instead of privately: SPLIT_PUBLISH_MAX_BYTES; a first layer of 300 x 192
    over 13 rows a rank, whose forward has whole tiles and strips, two KC blocks, and so
    asks for the next block of W1 and the next rows of x as it goes)."""
    widths, acts, use_bias, loss, opt = {
        "relu_tanh": ((6, 8, 5, 3), (kernels.RELU, kernels.TANH, kernels.IDENTITY), (1, 0, 1),
                      "cross_entropy", "sgd"),
        "first_layer_without_bias": ((6, 7, 2), (kernels.SIGMOID, kernels.IDENTITY), (0, 1),
                                     "mse", "sgd_weight_decay"),
        "one_layer": ((6, 3), (kernels.IDENTITY,), (1,), "binary_cross_entropy", "sgd"),
        "narrow_first_layer": ((6, 2, 3), (kernels.LEAKY_RELU, kernels.IDENTITY), (1, 1),
                               "huber", "sgd_weight_decay"),
        "wide_first_layer": ((1100, 512, 3), (kernels.RELU, kernels.IDENTITY), (1, 1),
                             "cross_entropy", "sgd_weight_decay"),
        "tall_batches": ((300, 192, 5), (kernels.RELU, kernels.IDENTITY), (1, 1),
                         "cross_entropy", "sgd"),
    }[case]
    rng = np.random.default_rng(ranks)
    n, batch = (70, 13) if case == "tall_batches" else (25, 4)
    X, labels, targets = make_problem(rng, dtype, widths, loss, n)
    params0 = (0.4 * rng.standard_normal(n_params(widths, use_bias))).astype(dtype)
    net = (widths, acts, use_bias, params0, loss, opt, 0.05)
    ranked = run_node_sum(backend, ranks, X, labels, targets, batch, *net, split=True,
                          epochs=2)
    steps = -(-n // (ranks * batch))
    expected, _, expected_stats = run_kernel(REF, X, labels, targets, np.arange(n),
                                             ranks * batch, *net)
    expected, _, expected_stats = run_kernel(REF, X, labels, targets, np.arange(n),
                                             ranks * batch, *net[:3], expected, *net[4:],
                                             step=3 + steps)
    for params, _, stats in ranked[1:]:
        np.testing.assert_array_equal(params, ranked[0][0])
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ranked[0][0], expected, **tol)
    stats = np.array([stats for _, _, stats in ranked])
    assert (stats[:, 2] == expected_stats[2]).all()
    np.testing.assert_allclose(stats[:, :2].sum(axis=0), expected_stats[:2], rtol=1e-4)


def split_problem(ranks, dtype, widths, opt, n):
    """(X, labels, targets, net) of a cross-entropy problem of ``n`` samples for a net
    of ``widths`` (ReLU, tanh, identity; the second layer without bias) trained with
    ``opt``: ``net`` as run_node_sum and run_kernel take it after the batch."""
    acts, use_bias = (kernels.RELU, kernels.TANH, kernels.IDENTITY), (1, 0, 1)
    rng = np.random.default_rng(ranks)
    X, labels, targets = make_problem(rng, dtype, widths, "cross_entropy", n)
    params0 = (0.4 * rng.standard_normal(n_params(widths, use_bias))).astype(dtype)
    return X, labels, targets, (widths, acts, use_bias, params0, "cross_entropy", opt, 0.05)


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("path", ["avx512", "avx2"])
def test_node_split_forward_asking_ahead_on_each_own_gemm(dtype, ranks, path):
    """The split forward's products ask for the next rank's block of W1 and for their
    next rows of x as they go (fastnn_gemm_epilogue.ahead, a_ahead) on either own
    kernel: a first layer of 300 x 192 over 13 rows a rank (whole tiles and strips, two
    KC blocks) ends with the same bits on every rank and equals one process with the
    global batch."""
    backend = kernels.load("cython")
    if path not in backend.gemm_paths_available():
        pytest.skip(f"this CPU / build has no {path} path")
    widths, acts, use_bias = (300, 192, 5), (kernels.RELU, kernels.IDENTITY), (1, 1)
    rng = np.random.default_rng(ranks)
    n, batch = 70, 13
    X, labels, targets = make_problem(rng, dtype, widths, "cross_entropy", n)
    params0 = (0.1 * rng.standard_normal(n_params(widths, use_bias))).astype(dtype)
    net = (widths, acts, use_bias, params0, "cross_entropy", "sgd", 0.05)
    backend.set_gemm_path(path)
    try:
        ranked = run_node_sum(backend, ranks, X, labels, targets, batch, *net, split=True)
    finally:
        backend.set_gemm_path("auto")
    expected, _, _ = run_kernel(REF, X, labels, targets, np.arange(n), ranks * batch, *net)
    for params, _, _ in ranked[1:]:
        np.testing.assert_array_equal(params, ranked[0][0])
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ranked[0][0], expected, **tol)


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("opt", ["sgd_weight_decay", "adam"])
def test_node_split_streaming_writes_change_no_value(dtype, ranks, opt):
    """A rank that writes its block of W1, its dz, its gradient and its inputs for the
    others with streaming stores (NodeSum.stream_below = inf: from its first publish
    on, but at every timed one) ends with the same bits as ranks that never stream (0)
    and equals one process with the global batch. Rows of 37 inputs and blocks of odd
    byte lengths, so that every streamed copy has a part before its first whole cache
    line and one after its last."""
    backend = kernels.load("cython")
    n, batch = 41, 4
    X, labels, targets, net = split_problem(ranks, dtype, (37, 11, 5, 3), opt, n)
    streamed, stored = (run_node_sum(backend, ranks, X, labels, targets, batch, *net,
                                     split=True, epochs=2, stream_below=below)
                        for below in (np.inf, 0.0))
    for (params, states, stats), (params0_, states0, stats0) in zip(streamed, stored):
        np.testing.assert_array_equal(params, params0_)
        for s, s0 in zip(states, states0):
            np.testing.assert_array_equal(s, s0)
        np.testing.assert_array_equal(stats, stats0)
    steps = -(-n // (ranks * batch))
    expected, states, _ = run_kernel(REF, X, labels, targets, np.arange(n), ranks * batch,
                                     *net)
    expected, _, _ = run_kernel(REF, X, labels, targets, np.arange(n), ranks * batch,
                                *net[:3], expected, *net[4:], step=3 + steps, states=states)
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(streamed[0][0], expected, **tol)


def test_node_sum_refuses_a_bad_stream_below():
    """A NaN or negative NodeSum.stream_below is refused before any step."""
    backend = kernels.load("cython")
    widths, acts, use_bias = (6, 8, 3), (kernels.RELU, kernels.IDENTITY), (1, 1)
    rng = np.random.default_rng(0)
    X, labels, targets = make_problem(rng, np.dtype(np.float32), widths, "cross_entropy", 8)
    params0 = (0.4 * rng.standard_normal(n_params(widths, use_bias))).astype(np.float32)
    for below in (np.nan, -1.0):
        with pytest.raises(ValueError):
            run_node_sum(backend, 1, X, labels, targets, 4, widths, (kernels.RELU,
                         kernels.IDENTITY), use_bias, params0, "cross_entropy", "sgd", 0.05,
                         split=True, stream_below=below)


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("opt", ["sgd_momentum_wd", "sgd_nesterov", "adagrad",
                                 "rmsprop_centered_momentum", "rmsprop", "adam",
                                 "adamw_amsgrad"])
def test_node_split_first_layer_with_any_optimizer(backend, dtype, ranks, opt):
    """Any optimizer but plain SGD takes its step on each rank's columns of the split
    first layer from their gradient over the global batch, with the columns of its
    states kept in the shared region: two epochs on K ranks (threads; the unused state
    slots aliasing a used one, as a fit passes them) end with the same parameters and
    states on every rank, equal to one process with the global batch."""
    n, batch = 25, 4
    X, labels, targets, net = split_problem(ranks, dtype, (6, 8, 5, 3), opt, n)
    ranked = run_node_sum(backend, ranks, X, labels, targets, batch, *net, split=True,
                          epochs=2, alias_unused=True)
    steps = -(-n // (ranks * batch))
    expected, states, _ = run_kernel(REF, X, labels, targets, np.arange(n), ranks * batch,
                                     *net)
    expected, states, expected_stats = run_kernel(
        REF, X, labels, targets, np.arange(n), ranks * batch, *net[:3], expected, *net[4:],
        step=3 + steps, states=states)
    name, values = OPTIMIZER_CASES[opt]
    used = kernels.optimizer_states_used(kernels.OPTIMIZER_CODES[name], values)
    for params, rank_states, _ in ranked[1:]:
        np.testing.assert_array_equal(params, ranked[0][0])
        for slot in used:
            np.testing.assert_array_equal(rank_states[slot], ranked[0][1][slot])
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ranked[0][0], expected, **tol)
    for slot in used:
        np.testing.assert_allclose(ranked[0][1][slot], states[slot], **tol)
    stats = np.array([stats for _, _, stats in ranked])
    assert (stats[:, 2] == expected_stats[2]).all()
    np.testing.assert_allclose(stats[:, :2].sum(axis=0), expected_stats[:2], rtol=1e-4)


@pytest.mark.parametrize("ranks", [2, 3])
def test_node_split_first_layer_on_own_shards(backend, ranks):
    """Own uneven shards (10, 17, 24 rows; batch 8: rank 0 has no rows in the last
    steps): each step's global batch is every rank's rows in rank order, so the split
    epoch equals one process stepping through those rows."""
    widths, acts, use_bias = (5, 6, 3), (kernels.RELU, kernels.IDENTITY), (1, 1)
    rng = np.random.default_rng(ranks)
    shards = [10 + 7 * r for r in range(ranks)]
    X, labels, targets = make_problem(rng, np.float64, widths, "cross_entropy", sum(shards))
    params0 = 0.4 * rng.standard_normal(n_params(widths, use_bias))
    net = (widths, acts, use_bias, params0, "cross_entropy", "sgd", 0.05)
    batch, steps = 8, -(-max(shards) // 8)
    ranked = run_node_sum(backend, ranks, X, labels, targets, batch, *net, split=True,
                          shards=shards)
    starts = np.cumsum([0] + shards[:-1])
    order = np.concatenate([np.arange(s + b * batch, s + min((b + 1) * batch, size))
                            for b in range(steps) for s, size in zip(starts, shards)
                            if b * batch < size])
    global_rows = [sum(min(batch, max(size - b * batch, 0)) for size in shards)
                   for b in range(steps)]
    expected = params0.copy()
    done = 0
    for b, rows in enumerate(global_rows):  # one process, one step per global batch
        expected, _, _ = run_kernel(REF, X, labels, targets, order[done:done + rows], rows,
                                    *net[:3], expected, *net[4:6],
                                    0.05 * (1.0 + 0.1 * b), step=3 + b)
        done += rows
    for params, _, _ in ranked[1:]:
        np.testing.assert_array_equal(params, ranked[0][0])
    np.testing.assert_allclose(ranked[0][0], expected, rtol=1e-9, atol=1e-12)


def test_node_split_refuses_what_it_cannot_split(backend):
    """A split first layer takes a shared region large enough (with room for the
    optimizer's states) on a cache line, and every step's rows of this rank inside its
    global batch."""
    rng = np.random.default_rng(0)
    widths, acts, use_bias = (4, 5, 3), [kernels.RELU, kernels.IDENTITY], (1, 1)
    X, labels, targets = make_problem(rng, np.float64, widths, "cross_entropy", 8)
    params0 = rng.standard_normal(n_params(widths, use_bias))
    segments = node_segments(1, params0.nbytes)
    shared = aligned_zeros(kernels.node_split_bytes(widths, 4, 8) + 64)
    node = kernels.NodeSum(segments, 0, np.full(2, 4.0), 0.0, lambda: None, 4,
                           shared[:-64], np.zeros(2, np.int64))
    sgd = kernels.OptimizerSpec(kernels.OPTIMIZER_CODES["sgd"], np.zeros(4),
                                (np.zeros_like(params0),) * 3)
    spec = kernels.TrainEpochSpec(
        X, labels, targets, np.arange(8), 4, np.array(widths), np.array(acts), np.zeros(2),
        np.array(use_bias), params0.copy(), segments[0][kernels.NODE_DATA:][
            :params0.nbytes].view(np.float64),
        np.empty(kernels.train_epoch_workspace_size(4, widths)), kernels.CROSS_ENTROPY, 0.0,
        sgd, np.full(2, 0.1), 0, np.zeros(4), reduce=node)
    backend.train_epoch(spec._replace(params=params0.copy()))  # accepted as it is
    momentum = sgd._replace(hyper=np.array([0.9, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"at least 960 bytes \(node_split_bytes with "
                                         r"n_states=1\), got 704"):
        backend.train_epoch(spec._replace(optimizer=momentum))  # no room for its buffer
    with pytest.raises(ValueError, match="reduce.shared must hold at least"):
        backend.train_epoch(spec._replace(reduce=node._replace(shared=shared[:-65])))
    with pytest.raises(ValueError, match="reduce.shared must start on a 64-byte boundary"):
        backend.train_epoch(spec._replace(reduce=node._replace(shared=shared[8:])))
    with pytest.raises(ValueError, match=r"step 1's rows \[1, 5\) of this rank must lie"):
        backend.train_epoch(spec._replace(reduce=node._replace(
            row_starts=np.array([0, 1], np.int64))))
    with pytest.raises(ValueError, match="at most reduce.split_rows"):
        backend.train_epoch(spec._replace(reduce=node._replace(
            global_rows=np.full(2, 5.0))))
    with pytest.raises(ValueError, match=r"step 0's rows \[0, 4\) of this rank must lie"):
        backend.train_epoch(spec._replace(reduce=node._replace(
            global_rows=np.array([np.nan, 4.0]))))
    with pytest.raises(ValueError, match="reduce.split_rows must be an int >= 0, got None"):
        backend.train_epoch(spec._replace(reduce=node._replace(split_rows=None)))
    with pytest.raises(ValueError, match="reduce.row_starts must hold every step's"):
        backend.train_epoch(spec._replace(reduce=node._replace(
            row_starts=np.zeros(1, np.int64))))


@pytest.mark.parametrize("split", [False, True], ids=["summed", "split"])
def test_node_sum_stops_every_rank_before_a_non_finite_global_loss(backend, split):
    """The loss overflows: every rank stops at the same step, before its update, with
    the global loss in stats[3], and the parameters of the steps before it."""
    rng = np.random.default_rng(0)
    widths, acts, use_bias = (4, 16, 3), [kernels.RELU, kernels.IDENTITY], (1, 1)
    X, labels, targets = make_problem(rng, np.float64, widths, "mse", 64)
    X *= 1e3
    params0 = rng.standard_normal(n_params(widths, use_bias))
    net = (widths, acts, use_bias, params0, "mse", "sgd", 1e6)
    ranked = run_node_sum(backend, 2, X, labels, targets, 4, *net, split=split)
    expected, _, expected_stats = run_kernel(REF, X, labels, targets, np.arange(64), 8, *net)
    assert expected_stats[2] < 8 and not np.isfinite(expected_stats[3])
    for params, _, stats in ranked:
        assert stats[2] == expected_stats[2] and not np.isfinite(stats[3])
        np.testing.assert_allclose(params, expected, rtol=1e-9)


@pytest.mark.parametrize("split", [False, True], ids=["summed", "split"])
def test_node_sum_gives_up_waiting_once_its_launcher_is_gone(backend, split):
    """Rank 0 of 2 runs alone (rank 1 never comes) with a ``parent`` that is not this
    process's parent, as after its launcher was killed: its first wait that outlasts
    the spin raises RuntimeError naming the launcher instead of polling for ever."""
    rng = np.random.default_rng(0)
    widths, acts, use_bias = (4, 5, 3), [kernels.RELU, kernels.IDENTITY], (1, 1)
    X, labels, targets = make_problem(rng, np.float64, widths, "cross_entropy", 8)
    params0 = rng.standard_normal(n_params(widths, use_bias))
    segments = node_segments(2, params0.nbytes)
    gone = os.getppid() + 1
    node = kernels.NodeSum(
        segments, 0, np.full(2, 8.0), 0.0, lambda: None, 8 if split else 0,
        aligned_zeros(kernels.node_split_bytes(widths, 8, 8)) if split else None,
        np.zeros(2, np.int64) if split else None, gone)
    spec = kernels.TrainEpochSpec(
        X, labels, targets, np.arange(8), 4, np.array(widths), np.array(acts), np.zeros(2),
        np.array(use_bias), params0.copy(),
        segments[0][kernels.NODE_DATA:][:params0.nbytes].view(np.float64),
        np.empty(kernels.train_epoch_workspace_size(4, widths)), kernels.CROSS_ENTROPY, 0.0,
        kernels.OptimizerSpec(kernels.OPTIMIZER_CODES["sgd"], np.zeros(4),
                              (np.zeros_like(params0),) * 3),
        np.full(2, 0.1), 0, np.zeros(4), reduce=node)
    errors = []

    def alone():
        try:
            backend.train_epoch(spec)
        except RuntimeError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=alone, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the wait did not notice that its launcher is gone"
    assert errors == [kernels.LAUNCHER_GONE.format(gone)]
    with pytest.raises(ValueError, match="reduce.parent must be a process id >= 0"):
        backend.train_epoch(spec._replace(reduce=node._replace(parent=-1)))


def test_node_sum_refuses_a_gradient_outside_its_segment(backend):
    rng = np.random.default_rng(0)
    widths, acts, use_bias = (4, 5, 3), [kernels.RELU, kernels.IDENTITY], (1, 1)
    X, labels, targets = make_problem(rng, np.float64, widths, "cross_entropy", 8)
    params0 = rng.standard_normal(n_params(widths, use_bias))
    segments = node_segments(1, params0.nbytes)
    node = kernels.NodeSum(segments, 0, np.full(2, 4.0), 0.0, lambda: None)
    spec = kernels.TrainEpochSpec(
        X, labels, targets, np.arange(8), 4, np.array(widths), np.array(acts), np.zeros(2),
        np.array(use_bias), params0.copy(), np.zeros_like(params0),
        np.empty(kernels.train_epoch_workspace_size(4, widths)), kernels.CROSS_ENTROPY, 0.0,
        kernels.OptimizerSpec(kernels.OPTIMIZER_CODES["sgd"], np.zeros(4),
                              (np.zeros_like(params0),) * 3),
        np.full(2, 0.1), 0, np.zeros(4), reduce=node)
    with pytest.raises(ValueError, match="grads must be the gradient in this rank's segment"):
        backend.train_epoch(spec)
    short = (segments[0][:kernels.NODE_DATA + 8],)
    with pytest.raises(ValueError, match=r"segments\[0\] must hold at least"):
        backend.train_epoch(spec._replace(reduce=node._replace(segments=short)))
    with pytest.raises(ValueError, match="rank must be in"):
        backend.train_epoch(spec._replace(reduce=node._replace(rank=1)))


# ------------------------------------------------------------------ fit: fused vs general
@pytest.fixture(params=kernels.BACKENDS)
def active_backend(request):
    with fn.use_backend(request.param):
        yield request.param


def two_fits(make_model, X, y, compile_args, fit_args):
    """Fit two identical models (each with a fresh optimizer from
    ``compile_args["optimizer"]()``), the first on the fused path, the second not."""
    results = []
    for fused in (True, False):
        model = make_model()
        model.compile(**dict(compile_args, optimizer=compile_args["optimizer"]()))
        model.use_fused_epoch = fused
        history = model.fit(X, y, verbose=0, **fit_args)
        results.append((model, history))
    return results


FIT_CASES = {
    "digits_sgd": ("cross_entropy", lambda: fn.optimizers.SGD(lr=0.1), {"batch_size": 32}),
    "momentum_replacement": ("cross_entropy", lambda: fn.optimizers.SGD(
        lr=0.05, momentum=0.9, nesterov=True), {"batch_size": 16, "replacement": True}),
    "adam_schedule": ("cross_entropy", lambda: fn.optimizers.Adam(
        lr=fn.schedules.InverseSqrt(0.01)), {"batch_size": 50}),
    "adamw_full_batch": ("cross_entropy", lambda: fn.optimizers.AdamW(lr=0.01),
                         {"batch_size": None}),
    "rmsprop_no_shuffle": ("hinge", lambda: fn.optimizers.RMSprop(lr=0.001, centered=True),
                           {"batch_size": 24, "shuffle": False}),
    "adagrad_sgd_single": ("cross_entropy", lambda: fn.optimizers.Adagrad(lr=0.05),
                           {"batch_size": 1}),
}


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_fit_fused_path_equals_general_path(active_backend, case):
    loss, make_optimizer, fit_args = FIT_CASES[case]
    X, y = fn.datasets.load_digits(scale=True)
    X, y = X[:300], y[:300]

    def make_model():
        return fn.Sequential([fn.Dense(64, 24, activation="relu", seed=0),
                              fn.Dense(24, 10, seed=1)])

    (fused, h_fused), (general, h_general) = two_fits(
        make_model, X, y, {"loss": loss, "optimizer": make_optimizer,
                           "metrics": ["accuracy"]},
        dict(fit_args, epochs=3, seed=5, validation_data=(X[:50], y[:50])))
    np.testing.assert_allclose(fused.params, general.params, rtol=2e-4, atol=2e-5)
    assert fused.optimizer.iterations == general.optimizer.iterations
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(h_fused.history[key], h_general.history[key], rtol=1e-4,
                                   atol=1e-6, err_msg=key)


@pytest.mark.parametrize("loss", ["mse", "mae", "huber", "binary_cross_entropy"])
def test_fit_fused_path_equals_general_path_for_target_losses(active_backend, loss):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((120, 5))
    Y = (X[:, :3] > 0.2).astype(float) if loss == "binary_cross_entropy" else np.sin(X[:, :3])
    metrics = ["accuracy"] if loss == "binary_cross_entropy" else None

    def make_model():
        return fn.Sequential([fn.Dense(5, 16, activation="tanh", dtype="float64", seed=0),
                              fn.Dense(16, 3, dtype="float64", seed=1)])

    (fused, h_fused), (general, h_general) = two_fits(
        make_model, X, Y, {"loss": loss, "optimizer": lambda: fn.optimizers.Adam(lr=0.01),
                           "metrics": metrics},
        {"epochs": 4, "batch_size": 10, "seed": 1})
    np.testing.assert_allclose(fused.params, general.params, rtol=1e-9, atol=1e-12)
    for key in h_general.history:
        np.testing.assert_allclose(h_fused.history[key], h_general.history[key], rtol=1e-9)


def spy_on(monkeypatch, name):
    """Record the arguments of every call of the active backend's kernel ``name``."""
    module = kernels.load(fn.get_backend())
    calls = []
    original = getattr(module, name)

    def spy(*args):
        calls.append(args)
        return original(*args)
    monkeypatch.setattr(module, name, spy)
    return calls


def test_fused_path_is_taken_only_when_eligible(active_backend, monkeypatch):
    X, y = fn.datasets.load_digits(scale=True)
    calls = spy_on(monkeypatch, "train_epoch")

    def fit(model, **kwargs):
        calls.clear()
        model.fit(X[:64], y[:64], epochs=2, verbose=0, **kwargs)
        return len(calls)

    def model(**dense_kwargs):
        m = fn.Sequential([fn.Dense(64, 8, activation="relu", seed=0, **dense_kwargs),
                           fn.Dense(8, 10, seed=1)])
        m.compile("cross_entropy", "sgd", metrics=["accuracy"])
        return m

    assert fit(model()) == 2
    assert fit(model(), callbacks=[fn.callbacks.TerminateOnNaN()]) == 2
    assert fit(model(l2=1e-3)) == 0
    assert fit(model(), sample_weight=np.ones(64)) == 0
    clipped = model()
    clipped.compile("cross_entropy", fn.optimizers.SGD(clipnorm=1.0))
    assert fit(clipped) == 0
    with_dropout = fn.Sequential([fn.Dense(64, 8, activation="relu", seed=0),
                                  fn.Dropout(0.2, seed=0), fn.Dense(8, 10, seed=1)])
    with_dropout.compile("cross_entropy", "sgd")
    assert fit(with_dropout) == 0

    class EveryBatch(fn.callbacks.Callback):
        def on_batch_end(self, batch, logs=None):
            pass
    assert fit(model(), callbacks=[EveryBatch()]) == 0
    forced = model()
    forced.use_fused_epoch = False
    assert fit(forced) == 0


@pytest.mark.parametrize("fused", [True, False])
def test_divergence_keeps_last_finite_weights(active_backend, fused):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 4)) * 100
    y = rng.standard_normal((64, 1)) * 100
    model = fn.Sequential([fn.Dense(4, 16, activation="relu", seed=0), fn.Dense(16, 1, seed=1)])
    model.compile("mse", fn.optimizers.SGD(lr=10.0))
    model.use_fused_epoch = fused
    start = model.params.copy()
    with pytest.raises(FloatingPointError):
        model.fit(X, y, epochs=5, batch_size=8, verbose=0)
    np.testing.assert_array_equal(model.params, start)
    history = model.fit(X, y, epochs=5, batch_size=8, verbose=0,
                        callbacks=[fn.callbacks.TerminateOnNaN()])
    assert model.stop_training and np.isfinite(model.params).all()
    assert "loss became" in history.stop_reason or "weights became" in history.stop_reason


def test_steady_state_steps_reuse_their_buffers(active_backend, monkeypatch):
    """The general path allocates no new buffers per step: every full-size batch writes
    its forward output, loss gradient and backward buffers to the same memory."""
    X, y = fn.datasets.load_digits(scale=True)
    model = fn.Sequential([fn.Dense(64, 16, activation="relu", seed=0), fn.Dense(16, 10, seed=1)])
    model.compile("cross_entropy", "adam")
    model.use_fused_epoch = False
    forward = spy_on(monkeypatch, "dense_forward")
    backward = spy_on(monkeypatch, "dense_backward")
    model.fit(X[:320], y[:320], epochs=3, batch_size=32, verbose=0)

    def addresses(calls, positions):
        return {tuple(call[i].__array_interface__["data"][0] for i in positions
                      if call[i] is not None) for call in calls}
    assert len(forward) == len(backward) == 2 * 30
    assert len(addresses(forward, [4])) == 2          # out: one buffer per layer
    assert len(addresses(backward, [3, 5, 6, 7, 8])) == 2  # dout, dz, dx, dw, db


def test_fused_path_reuses_its_workspace(active_backend, monkeypatch):
    X, y = fn.datasets.load_digits(scale=True)
    model = fn.Sequential([fn.Dense(64, 16, activation="relu", seed=0), fn.Dense(16, 10, seed=1)])
    model.compile("cross_entropy", "adam")
    calls = spy_on(monkeypatch, "train_epoch")
    model.fit(X[:320], y[:320], epochs=4, batch_size=32, verbose=0)
    assert len(calls) == 4
    for field in ("params", "grads", "workspace"):
        assert len({getattr(spec, field).__array_interface__["data"][0]
                    for (spec,) in calls}) == 1
