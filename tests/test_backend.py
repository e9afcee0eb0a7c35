"""The active backend is context-local (issue 18, item 16): ``use_backend`` affects its
own thread or task only; ``set_backend`` sets the process default."""
import asyncio
import contextvars
import threading

import numpy as np
import pytest

import fastnn as fn
from fastnn import _backend
from _helpers import blobs, mlp, rng


@pytest.fixture
def process_default():
    """Restore the process default backend after the test."""
    saved = dict(_backend._state)
    yield
    _backend._state.update(saved)


def train(backend, seed=3):
    """Parameters after a short Adam run on ``backend`` (fixed seeds)."""
    X, y = blobs(40, rng(50))
    with fn.use_backend(backend):
        model = mlp([2, 16, 16, 3], activation="tanh", seed=seed)
        model.compile("cross_entropy", fn.optimizers.Adam(lr=0.01))
        model.fit(X, y, epochs=25, batch_size=8, seed=seed, verbose=0)
        assert fn.get_backend() == backend
    return model.params.copy()


def in_threads(backends, repeat=1):
    """Run ``train`` for each backend in its own thread, all at once; the results."""
    results, errors = {}, []
    barrier = threading.Barrier(len(backends))

    def run(index, backend):
        try:
            barrier.wait()
            results[index] = [train(backend) for _ in range(repeat)]
        except BaseException as exc:  # reported below, with the backend
            errors.append((backend, exc))

    threads = [threading.Thread(target=run, args=(i, b)) for i, b in enumerate(backends)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return [results[i] for i in range(len(backends))]


def test_threads_with_different_backends_match_each_alone():
    backends = list(fn.kernels.BACKENDS)
    alone = {b: in_threads([b])[0][0] for b in backends}
    together = in_threads(backends, repeat=3)
    for backend, runs in zip(backends, together):
        for params in runs:
            np.testing.assert_array_equal(params, alone[backend], err_msg=backend)
    assert not np.array_equal(alone["numpy"], alone["cython"])  # the backends differ


def test_use_backend_is_invisible_to_other_threads(process_default):
    fn.set_backend("numpy")
    seen = {}
    inside, leave = threading.Event(), threading.Event()

    def holder():
        with fn.use_backend("cython"):
            inside.set()
            leave.wait(10)
            seen["holder"] = fn.get_backend()

    thread = threading.Thread(target=holder)
    thread.start()
    inside.wait(10)
    seen["main"] = fn.get_backend()
    leave.set()
    thread.join()
    assert seen == {"holder": "cython", "main": "numpy"}


def test_new_thread_runs_the_process_default_unless_given_the_context(process_default):
    fn.set_backend("numpy")
    seen = []
    with fn.use_backend("numba"):
        plain = threading.Thread(target=lambda: seen.append(fn.get_backend()))
        plain.start()
        plain.join()
        context = contextvars.copy_context()
        copied = threading.Thread(target=context.run,
                                  args=(lambda: seen.append(fn.get_backend()),))
        copied.start()
        copied.join()
    assert seen == ["numpy", "numba"]


def test_asyncio_tasks_keep_their_own_backend():
    async def task(backend, started, others_started):
        with fn.use_backend(backend):
            started.set()
            await others_started.wait()
            await asyncio.sleep(0)
            return fn.get_backend(), fn._backend.backend_module().__name__

    async def main():
        events = [asyncio.Event(), asyncio.Event()]
        both = asyncio.Event()

        async def release():
            await events[0].wait()
            await events[1].wait()
            both.set()

        results = await asyncio.gather(task("numpy", events[0], both),
                                       task("cython", events[1], both), release())
        return results[:2]

    assert asyncio.run(main()) == [("numpy", "fastnn.kernels._numpy"),
                                   ("cython", "fastnn.kernels._cython")]


def test_set_backend_sets_the_default_and_a_block_keeps_its_own(process_default):
    fn.set_backend("numpy")
    with fn.use_backend("cython"):
        fn.set_backend("numba")
        assert fn.get_backend() == "cython"
    assert fn.get_backend() == "numba"


def test_nested_blocks_restore_in_order():
    outer = fn.get_backend()
    with fn.use_backend("numpy") as module:
        assert module is fn.kernels.load("numpy")
        with fn.use_backend("cython"):
            assert fn.get_backend() == "cython"
        assert fn.get_backend() == "numpy"
    assert fn.get_backend() == outer


def test_use_backend_refuses_bad_names_and_leaves_the_backend():
    before = fn.get_backend()
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        with fn.use_backend("cuda"):
            pass
    with pytest.raises(TypeError, match="backend must be a str"):
        with fn.use_backend(3):
            pass
    assert fn.get_backend() == before


# ----------------------------------------------------------------------------------
# The thread budget
# ----------------------------------------------------------------------------------

@pytest.fixture
def restore_threads():
    saved = fn.get_num_threads()
    yield
    fn.set_num_threads(saved)


def test_set_num_threads_limits_every_blas_pool(restore_threads):
    from threadpoolctl import threadpool_info

    for n in sorted({1, len(_backend.usable_cpus())}):
        fn.set_num_threads(n)
        assert fn.get_num_threads() == n
        pools = [p for p in threadpool_info() if p["user_api"] == "blas"]
        assert pools and all(p["num_threads"] == n for p in pools), pools


@pytest.mark.parametrize("n, error", [(0, ValueError), (10**6, ValueError), (True, TypeError),
                                      ("2", TypeError), (1.0, TypeError)])
def test_set_num_threads_rejects(n, error, restore_threads):
    before = fn.get_num_threads()
    with pytest.raises(error, match="n must be"):
        fn.set_num_threads(n)
    assert fn.get_num_threads() == before


def test_set_num_threads_scans_the_libraries_again_only_after_an_import(
        monkeypatch, restore_threads):
    """threadpoolctl's scan of the loaded libraries costs milliseconds: switching the
    budget back and forth (as the sklearn estimators' n_threads does around every call)
    reuses it, and an import since the last scan (a new BLAS may come with it) redoes it."""
    import sys

    import threadpoolctl

    scans = []

    class CountingController(threadpoolctl.ThreadpoolController):
        def __init__(self):
            scans.append(1)
            super().__init__()

    monkeypatch.setattr(threadpoolctl, "ThreadpoolController", CountingController)
    monkeypatch.setitem(_backend._blas, "controller", None)
    for _ in range(3):
        fn.set_num_threads(1)
        fn.set_num_threads(len(_backend.usable_cpus()))
    assert len(scans) == 1
    monkeypatch.setitem(sys.modules, "fastnn_test_fresh_import", object())
    fn.set_num_threads(1)
    assert len(scans) == 2
