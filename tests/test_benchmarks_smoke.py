"""Smoke test of the benchmark suite: the machinery runs end to end and the numpy
baseline really trains. A handful of iterations each; no timing is ever asserted."""
import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fastnn as fn
from fastnn import bench
from fastnn.bench import baselines, machine, report, suite

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("optimizer", baselines.OPTIMIZERS)
def test_numpy_baseline_trains_like_fastnn(optimizer):
    """Same weights, data and batch order: NumpyMLP's loss falls and tracks fastnn's."""
    sizes = (64, 32, 10)
    X, y = suite.synthetic_data(sizes, 512)
    weights = baselines.initial_weights(sizes)
    mlp = baselines.NumpyMLP(weights, optimizer)
    numpy_losses = [mlp.fit_epoch(X, y, batch_size=32) for _ in range(3)]
    with fn.use_backend("numpy"):
        model = fn.Sequential([fn.Dense(64, 32, activation="relu"), fn.Dense(32, 10)])
        model.set_weights(weights)
        opt = (fn.optimizers.SGD(lr=baselines.LEARNING_RATES["sgd"]) if optimizer == "sgd"
               else fn.optimizers.Adam(lr=baselines.LEARNING_RATES["adam"]))
        model.compile(loss="cross_entropy", optimizer=opt)
        fastnn_losses = [model.fit(X, y, epochs=1, batch_size=32, verbose=0, seed=0)
                         .history["loss"][0] for _ in range(3)]
    assert numpy_losses[2] < numpy_losses[0]
    np.testing.assert_allclose(numpy_losses, fastnn_losses, rtol=1e-4)
    for ours, theirs in zip(mlp.get_weights(), model.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_flops_per_sample_counts_forward_dw_and_dx_but_the_first():
    assert suite.flops_per_sample((5, 3, 2)) == 4 * 5 * 3 + 6 * 3 * 2


@pytest.mark.parametrize("samples", [96, 100])
def test_matmuls_baseline_makes_the_epochs_matmuls(monkeypatch, samples):
    """The matmuls-only row times exactly the FLOPs the GFLOP/s column counts: the
    shapes of each call, summed over an epoch (a partial last batch included)."""
    from scipy.linalg import blas

    sizes, batch = [7, 5, 4, 3], 32
    flops, real = [], blas.sgemm

    def counting_sgemm(alpha, a, b, trans_a=0, trans_b=0, **kw):
        m, k = a.shape[::-1] if trans_a else a.shape
        k2, n = b.shape[::-1] if trans_b else b.shape
        assert k == k2
        flops.append(2 * m * n * k)
        out = real(alpha, a, b, trans_a=trans_a, trans_b=trans_b, **kw)
        assert np.shares_memory(out, kw["c"])  # written in place, no copy
        return out

    monkeypatch.setattr(blas, "sgemm", counting_sgemm)
    cfg = {"impl": "matmuls", "backend": None, "net": "t", "sizes": sizes, "batch": batch,
           "optimizer": "sgd", "samples": samples, "repeats": 1, "dtype": "float32"}
    record = suite.run_training(cfg, threads=1)
    per_epoch = suite.flops_per_sample(sizes) * samples
    warmup = suite.flops_per_sample(sizes) * min(samples, 3 * batch)
    assert sum(flops) == warmup + per_epoch
    assert np.isnan(record["loss"]) and record["gflop_per_s"] > 0


def test_kernel_benchmarks_run(tmp_path):
    """bench/ on the digits-shaped cases: every kernel x backend x dtype, checked
    against _numpy, then timed for a handful of rounds."""
    pytest.importorskip("pytest_benchmark")
    if not BENCH_DIR.is_dir():
        pytest.skip("bench/ is not in this checkout")
    # cwd=bench/: `python -m` puts the cwd on sys.path, and the repository root would
    # shadow the installed package.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(BENCH_DIR), "-q", "-x", "-k", "digits",
         "-p", "no:cacheprovider", "--benchmark-min-rounds=2",
         "--benchmark-max-time=0.000001", "--benchmark-min-time=0.000001",
         "--benchmark-warmup=off", f"--benchmark-json={tmp_path / 'kernels.json'}"],
        cwd=BENCH_DIR, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "kernels.json").read_text())
    kernels = {b["extra_info"]["kernel"] for b in results["benchmarks"]}
    assert len(kernels) == 16 and "train_epoch" in kernels, sorted(kernels)
    assert results["machine_info"]["fastnn"]["threads"] >= 1

    # bench/kernel_table.py turns that JSON into the speedup table: one row per kernel x
    # shape x dtype, each ratio the numpy median over the backend's.
    table = subprocess.run([sys.executable, str(BENCH_DIR / "kernel_table.py"),
                            str(tmp_path / "kernels.json")], cwd=BENCH_DIR,
                           capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    medians = {(b["extra_info"]["kernel"], b["extra_info"]["shape"],
                b["extra_info"]["dtype"], b["extra_info"]["backend"]): b["stats"]["median"]
               for b in results["benchmarks"]}
    cases = {key[:3] for key in medians}
    rows = [line for line in table.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(cases)
    row = next(r for r in rows if "| softmax_cross_entropy " in r and "float32" in r)
    shape = row.split("|")[2].strip()
    expected = medians[("softmax_cross_entropy", shape, "float32", "numpy")] / \
        medians[("softmax_cross_entropy", shape, "float32", "cython")]
    assert row.split("|")[5].strip() == f"{expected:.2f}x"
    assert "cython: " in table.stdout and f"of {len(cases)} cases not faster" in table.stdout


def test_fastnn_bench_quick_end_to_end(tmp_path, capsys):
    """The whole orchestration in a tiny configuration: roofline and training workers,
    table, JSON and plot. (Every backend runs through the same worker code; the numpy
    one keeps this fast.)"""
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["--quick", "--nets", "digits", "--backends", "numpy", "--no-torch",
            "--samples", "256", "--repeats", "1", "--no-startup", "--json", str(json_path)]
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    if has_matplotlib:
        argv += ["--plot", str(png_path)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "Speedup of fastnn over numpy MLP (hand-written baseline)" in out
    assert "pip install torch adds its rows and speedups" in out
    result = json.loads(json_path.read_text())
    records = {r["label"]: r for r in result["training"]}
    assert set(records) == {"fastnn[numpy]", "numpy MLP", "matmuls"}
    assert all(r["error"] is None and r["seconds_per_epoch"] > 0 and r["peak_rss_mb"] > 0
               and r["gflop_per_s"] > 0 for r in records.values())
    assert "%matmuls" in out
    assert records["fastnn[numpy]"]["loss"] == pytest.approx(records["numpy MLP"]["loss"],
                                                             rel=1e-4)
    assert result["roofline"]["1"]["roofline"] > 0
    assert result["machine"]["versions"]["numpy"] == np.__version__
    if has_matplotlib:
        assert png_path.stat().st_size > 0


def _synthetic_result(seconds):
    """A ``run_suite`` result at 1 thread from ``seconds``: {(impl, backend): s/epoch}
    for one workload, digits b32 sgd."""
    training = []
    for (impl, backend), t in seconds.items():
        training.append({
            "impl": impl, "backend": backend, "label": baselines.impl_label(impl, backend),
            "threads": 1, "net": "digits", "batch": 32, "optimizer": "sgd", "error": None,
            "seconds": [t], "seconds_per_epoch": t, "samples_per_s": 1000 / t,
            "gflop_per_s": 1.0 / t, "roofline_pct": 1.0, "peak_rss_mb": 70.0,
            "loss": 2.3, "cpus": [0]})
    versions = {"fastnn": "0", "numpy": "0", "scipy": "0", "numba": "0", "torch": None}
    return {"machine": {"cpu": "test CPU", "usable_cpus": 1, "logical_cpus": 1,
                        "python": "3", "versions": versions, "blas": []},
            "settings": {"threads": [1], "backends": ["cython", "numpy"], "torch": True,
                         "quick": True},
            "roofline": {}, "training": training, "startup": [], "skipped": [], "errors": []}


SECONDS = {("fastnn", "cython"): 0.02, ("fastnn", "numpy"): 0.2, ("numpy", None): 0.16,
           ("torch", None): 0.8}


def test_report_names_the_numpy_mlp_and_its_speedup_columns_the_backends():
    """The hand-written baseline is "numpy MLP", never a bare "numpy" beside
    fastnn[numpy]; each baseline has its own speedup table, a column per backend."""
    text = report.format_report(_synthetic_result(SECONDS))
    assert "numpy/numpy" not in text and "/numpy" not in text
    lines = text.splitlines()
    for name in ("numpy MLP (hand-written baseline)", "PyTorch (eager, CPU)"):
        title = lines.index(f"== Speedup of fastnn over {name}, 1 thread: t_baseline / "
                            "t_fastnn (> 1 = fastnn faster) ==")
        assert lines[title + 1].split() == ["net", "batch", "opt", "fastnn[cython]",
                                            "fastnn[numpy]"]
    over_numpy = lines[lines.index("== Speedup of fastnn over numpy MLP (hand-written "
                                   "baseline), 1 thread: t_baseline / t_fastnn (> 1 = "
                                   "fastnn faster) ==") + 3]
    assert over_numpy.split() == ["digits", "32", "sgd", "8.00x", "0.80x"]
    impl_column = next(line for line in lines if line.startswith("net ")).index("impl")
    impls = [line[impl_column:].split("  ")[0] for line in lines if line.endswith("2.3000")]
    assert impls == ["fastnn[cython]", "fastnn[numpy]", "numpy MLP", "torch"]


def test_plot_has_a_log_axis_and_the_values_on_the_bars():
    pytest.importorskip("matplotlib")
    fig = report.speedup_figure(_synthetic_result(SECONDS))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["fastnn vs numpy MLP (hand-written baseline), 1 thread (> 1: fastnn "
                      "faster)", "fastnn vs PyTorch (eager, CPU), 1 thread (> 1: fastnn "
                                 "faster)"]
    assert all(ax.get_yscale() == "log" for ax in fig.axes)
    labels = [[t.get_text() for t in ax.texts] for ax in fig.axes]
    assert labels == [["8.00x", "0.80x"], ["40.0x", "4.00x"]]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["fastnn[cython]", "fastnn[numpy]"]


def test_notes_flag_uneven_epochs():
    """A configuration whose epochs spread more than UNEVEN_SPREAD is named in the
    notes with its range; an even one is not."""
    record = {"error": None, "threads": 2, "net": "mnist", "batch": 32, "optimizer": "sgd"}
    result = {"settings": {"torch": False, "quick": False}, "errors": [], "training": [
        dict(record, label="fastnn[numba]", seconds=[0.65, 0.66, 1.53, 1.81, 1.88]),
        dict(record, label="numpy", seconds=[1.0, 1.02, 0.99, 1.01, 1.0]),
        dict(record, label="torch", seconds=[0.5])]}
    notes = "\n".join(report._notes(result))
    assert "uneven epochs" in notes
    assert "2 threads mnist b32 sgd fastnn[numba] 0.650-1.880 s" in notes
    assert "numpy 0.990" not in notes and "torch" not in notes.split("uneven")[1]
    even = dict(result, training=result["training"][1:])
    assert "uneven" not in "\n".join(report._notes(even))


def test_torch_baseline_matches_numpy():
    """PyTorch (when installed) trains from the same weights on the same batches."""
    pytest.importorskip("torch")
    cfg = {"net": "digits", "sizes": [64, 32, 10], "batch": 32, "optimizer": "adam",
           "samples": 256, "repeats": 2, "dtype": "float32", "backend": None}
    torch_run = suite.run_training(dict(cfg, impl="torch"), threads=1)
    numpy_run = suite.run_training(dict(cfg, impl="numpy"), threads=1)
    np.testing.assert_allclose(torch_run["epoch_losses"], numpy_run["epoch_losses"],
                               rtol=1e-4)
    assert torch_run["epoch_losses"][1] < torch_run["epoch_losses"][0]


def test_startup_is_measured_in_a_fresh_interpreter():
    (record,) = machine.measure_startup(["numpy"], cold=False)
    assert record["error"] is None and record["state"] == "warm"
    assert 0 < record["import_s"] <= record["process_s"]


def test_vs_torch_without_torch_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(machine, "torch_available", lambda: False)
    assert bench.main(["--quick", "--vs-torch"]) == 2
    assert "--vs-torch needs PyTorch" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--mpi", "--nets", "mnist"], "--mpi does not use --nets"),
    (["--mpi", "--threads", "1", "--no-gemm"], "--mpi does not use --threads, --no-gemm"),
    (["--mpi", "--optimizers", "adam"], "--mpi does not use --optimizers"),
    (["--mpi", "--samples", "100"], "at least the global batch, 256; got 100"),
    (["--quick", "--rounds", "3"], "--rounds applies to --mpi only"),
    (["--quick", "--ranks", "4"], "--ranks applies to --mpi only"),
])
def test_bench_options_that_do_not_apply_are_errors(argv, message, capsys):
    """An option the chosen benchmark would ignore stops it before anything runs."""
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


def test_bench_mpi_takes_rounds_repeats_and_samples(monkeypatch):
    from fastnn.bench import mpi

    asked = []

    def run_mpi_bench(ranks, quick, with_torch, log, **options):
        asked.append((ranks, quick, options))
        raise KeyboardInterrupt  # stop before the report: only the arguments matter here

    monkeypatch.setattr(mpi, "mpiexec", lambda: "mpiexec")
    monkeypatch.setattr(mpi, "run_mpi_bench", run_mpi_bench)
    for argv in (["--mpi", "--no-torch"],
                 ["--mpi", "--no-torch", "--ranks", "3", "--rounds", "9", "--repeats", "4",
                  "--samples", "4096"]):
        with pytest.raises(KeyboardInterrupt):
            bench.main(argv)
    assert asked == [(2, False, {"rounds": None, "repeats": None, "samples": None}),
                     (3, False, {"rounds": 9, "repeats": 4, "samples": 4096})]


def test_bench_subcommand_wiring():
    parser = argparse.ArgumentParser(prog="fastnn")
    sub = parser.add_subparsers(dest="command", required=True)
    bench.add_parser(sub)
    args = parser.parse_args(["bench", "--quick", "--json", "out.json", "--plot", "out.png",
                              "--threads", "1", "--vs-torch"])
    assert (args.command, args.quick, args.json, args.plot, args.threads, args.vs_torch) == \
        ("bench", True, "out.json", "out.png", 1, True)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--vs-torch", "--no-torch"])


def test_importing_fastnn_leaves_the_bench_unloaded(tmp_path):
    """``import fastnn`` and ``import fastnn.cli`` do not load the benchmark program;
    building the command line does."""
    code = ("import sys, fastnn, fastnn.cli\n"
            "before = sorted(m for m in sys.modules if m.startswith('fastnn.bench'))\n"
            "fastnn.cli.build_parser()\n"
            "print(before, 'fastnn.bench' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "True"]


LAUNCHER = """
import os, signal, subprocess, sys, time
# like Open MPI's ranks: a child in a process group of its own, here deaf to SIGTERM
child = subprocess.Popen([sys.executable, "-c",
                          "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
                          " open(%r, 'w').write('ready'); time.sleep(600)"],
                         process_group=0)
with open(%r, "w") as f:
    f.write(str(child.pid))
time.sleep(600)
"""


LINUX_311 = pytest.mark.skipif(
    not sys.platform.startswith("linux") or sys.version_info < (3, 11),
    reason="session cleanup reads /proc; Popen(process_group=) needs 3.11")


def _assert_gone(pid):
    for _ in range(100):  # SIGKILL is delivered at once; reaping may take a moment
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still runs after the launcher was stopped")


@LINUX_311
def test_a_launcher_timeout_leaves_no_process_behind(tmp_path):
    """run_launcher (every mpiexec of the bench and the tests): on a timeout, mpiexec and
    every process of its session stop, even one in its own process group that ignores
    SIGTERM (before, a rank waiting for a dead peer polled for ever)."""
    from fastnn.bench.mpi import run_launcher

    pid_file, ready = tmp_path / "pid", tmp_path / "ready"
    script = LAUNCHER % (str(ready), str(pid_file))
    with pytest.raises(subprocess.TimeoutExpired):
        run_launcher([sys.executable, "-c", script], timeout=3, grace=0.5)
    assert ready.exists() and pid_file.exists(), "the child did not start within 3 s"
    _assert_gone(int(pid_file.read_text()))


@LINUX_311
def test_ctrl_c_while_a_launcher_runs_leaves_no_process_behind(tmp_path):
    """The launcher has a session of its own, so the terminal's Ctrl-C does not reach
    it: the KeyboardInterrupt in the waiting process stops it and its children."""
    pid_file, ready = tmp_path / "pid", tmp_path / "ready"
    script = LAUNCHER % (str(ready), str(pid_file))
    waiter = (
        "import signal, sys\n"
        "from fastnn.bench.mpi import run_launcher\n"
        "def interrupt(*_): raise KeyboardInterrupt\n"
        "signal.signal(signal.SIGALRM, interrupt)\n"
        "signal.alarm(3)\n"
        "try:\n"
        "    run_launcher([sys.executable, '-c', sys.argv[1]], timeout=60, grace=0.5)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted')\n")
    done = subprocess.run([sys.executable, "-c", waiter, script], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "interrupted", done.stderr
    assert ready.exists() and pid_file.exists(), "the child did not start within 3 s"
    _assert_gone(int(pid_file.read_text()))
