"""What a long-running user relies on: a save killed at any moment never leaves a broken
model behind, and training, prediction, saving and loading in a loop do not leak."""
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc

import numpy as np
import pytest

import fastnn as fn
from _helpers import blobs, mlp, rng

SAVER = textwrap.dedent("""
    import sys
    import numpy as np
    import fastnn as fn

    model = fn.Sequential([fn.Dense(512, 1024, "relu", seed=0), fn.Dense(1024, 10, seed=1)])
    model.compile("cross_entropy", "adam")
    version = 0
    while True:  # until killed
        version += 1
        model.params[...] = version
        model.save(sys.argv[1])
        print(version, flush=True)
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_a_save_killed_at_any_moment_leaves_the_last_complete_model(tmp_path):
    path = tmp_path / "model.npz"
    kills = 0
    for delay in np.random.default_rng(0).uniform(0.0, 0.15, size=8):
        saver = subprocess.Popen([sys.executable, "-c", SAVER, str(path)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            first = saver.stdout.readline()  # one save has completed
            assert first.strip() == "1", first
            time.sleep(delay)
        finally:
            saver.send_signal(signal.SIGKILL)
            saver.wait(timeout=60)
        kills += 1
        model = fn.load_model(path)  # never half-written: a complete save of some version
        values = np.unique(model.params)
        assert values.size == 1 and values[0] >= 1
    assert kills == 8
    # whatever temp files the kills left, the next save removes them (the savers' pids
    # are dead)
    fn.load_model(path).save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]


def test_no_memory_growth_over_300_fit_predict_save_load_cycles(tmp_path):
    X, y = blobs(20, rng(70))
    path = tmp_path / "m.npz"

    def cycle():
        model = mlp([2, 16, 3], activation="relu").compile(
            "cross_entropy", "adam", metrics=["accuracy"])
        model.fit(X, y, epochs=2, batch_size=16, verbose=0, seed=0)
        model.predict(X)
        model.save(path)
        fn.load_model(path).evaluate(X, y)

    for _ in range(30):  # warm up: caches, compiled kernels, buffer pools
        cycle()
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            cycle()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    # a leak of one small model per cycle would be ~300 x 1 KB and more
    assert grown < 100_000, f"{grown} bytes still allocated after 300 cycles"
