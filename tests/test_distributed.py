"""Data-parallel training over MPI: real ``mpiexec -n 2`` and ``-n 3`` runs.

One mpiexec run per rank count does every training run of ``_distributed_runs.py``
(starting MPI costs about a second); each test then checks one of them: parameters
bit-identical on every rank, History identical on every rank and equal to one process
with the same global batch (rtol 1e-10 in float64, 1e-5 in float32), faults stopping
every rank with an error that names the failing rank; ranks on two hosts (network
namespaces, as root) equal one process too. Every subprocess has a timeout.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import fastnn as fn
from fastnn import distributed, kernels
from fastnn._epochs import BatchPlan
from fastnn.bench.mpi import run_launcher

pytest.importorskip("mpi4py")
import _distributed_runs as runs  # noqa: E402
from conftest import ATOL, RTOL  # noqa: E402

HERE = Path(__file__).resolve().parent
EQUIVALENT = runs.EQUIVALENT
SPECIAL = ("stop_on_one_rank", "shards", "fused_shards", "stepwise_shards", "balanced_shards",
           "fused_sgd_shards", "stepwise_sgd_shards", "numpy_sgd",
           "weights_on_one_shard", "string_label_shards", "zero_val_on_one_shard",
           "refused_then_refit",
           "numba_momentum",
           "numpy_momentum", "iallreduce_fused_momentum", "iallreduce_adam",
           "iallreduce_lbfgs", "no_room_fused_sgd", "no_split_room_fused_sgd",
           "no_room_fused_adam", "no_room_sgd_l2", "no_room_lbfgs", "no_room_twice_fused_sgd",
           "bad_data", "nan_on_one_rank", "callback_fails", "other_model", "other_data",
           "other_class_weight")
TIMEOUT = 120


def _mpiexec():
    beside_python = Path(sys.executable).parent / "mpiexec"
    found = str(beside_python) if beside_python.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpiexec (pip install 'fastnn[mpi]')")
    return found


def _mpi_env(**more):
    """This environment, letting Open MPI run as root (containers), with ``more``."""
    return dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                **more)


def _launch(size, out, names):
    """Run ``_distributed_runs.py`` on ``size`` ranks; the CompletedProcess."""
    env = _mpi_env()
    command = [_mpiexec(), "--oversubscribe", "-n", str(size), sys.executable,
               str(HERE / "_distributed_runs.py"), str(out), *names]
    return run_launcher(command, TIMEOUT, env=env)


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks(request, tmp_path_factory):
    """(size, output directory) of one mpiexec run doing every training run."""
    out = tmp_path_factory.mktemp(f"mpi{request.param}")
    done = _launch(request.param, out, EQUIVALENT + SPECIAL)
    assert done.returncode == 0, done.stdout + done.stderr
    return request.param, out


def _results(size, out, name):
    files = [np.load(out / f"{name}-rank{r}.npz") for r in range(size)]
    return [{key: (json.loads(str(f[key])) if key not in ("params", "states") else f[key])
             for key in f.files} for f in files]


def _same_on_every_rank(results, rank0_logs=()):
    """Parameters, the optimizer's state and History bit-identical on every rank (but
    for the ``rank0_logs`` that callbacks on rank 0 alone add to its History)."""
    first = results[0].get("history")
    if rank0_logs:
        first = {**first, "history": {k: v for k, v in first["history"].items()
                                      if k not in rank0_logs}}
    for r, result in enumerate(results[1:], start=1):
        assert np.array_equal(result["params"], results[0]["params"]), f"rank {r} params"
        if "states" in result:
            assert np.array_equal(result["states"], results[0]["states"]), f"rank {r} states"
        assert result.get("history") == first, f"rank {r} History"


@pytest.mark.parametrize("name", EQUIVALENT)
def test_equals_one_process_with_the_global_batch(ranks, name, tmp_path, monkeypatch):
    size, out = ranks
    monkeypatch.setenv("FASTNN_TEST_OUT", str(tmp_path))
    _check_equals_one_process(_results(size, out, name), name)


def _check_equals_one_process(results, name):
    """``results`` (every rank's run ``name``) are the same on every rank and equal one
    process with the global batch: rtol 1e-10 in float64, 1e-5 in float32."""
    size = len(results)
    assert "error" not in results[0], results[0].get("error")
    _same_on_every_rank(results, ("lr",) if name == "callbacks_on_rank0" else ())
    model, X, y, fit = runs.build(name, 0, 1)
    history, fused = runs.fit_and_trace(
        model, X, y, {**fit, "batch_size": fit["batch_size"] and size * fit["batch_size"],
                      "distributed": False})
    assert results[0]["fused"] == fused  # both fused or both step by step
    if name.startswith(("fused_", "streamed_")):
        assert fused
    rtol = 1e-5 if model.dtype == np.float32 else 1e-10
    if name == "newton_cg":  # its finite-difference Hessian products (step h ~ 1e-8)
        rtol = 1e-6          # amplify the ~1e-16 roundoff of a gradient summed by rank
    atol = rtol * float(np.abs(model.params).max())
    np.testing.assert_allclose(results[0]["params"], model.params, rtol=rtol, atol=atol)
    got = results[0]["history"]
    assert got["epoch"] == history.epoch and got["stop_reason"] == history.stop_reason
    assert sorted(got["history"]) == sorted(history.history)
    for key, values in history.history.items():
        np.testing.assert_allclose(got["history"][key], values, rtol=rtol, err_msg=key)


def test_rank_0_alone_writes_files(ranks):
    size, out = ranks
    assert (out / "log-rank0.csv").exists() and (out / "ckpt-rank0.npz").exists()
    for r in range(1, size):
        assert not (out / f"log-rank{r}.csv").exists()
        assert not (out / f"ckpt-rank{r}.npz").exists()


def test_a_stop_on_one_rank_stops_every_rank(ranks):
    size, out = ranks
    results = _results(size, out, "stop_on_one_rank")
    _same_on_every_rank(results)
    assert results[0]["history"]["epoch"] == [0, 1]
    assert "_StopOnRank" in results[0]["history"]["stop_reason"]


@pytest.mark.parametrize("name", ["shards", "fused_shards"])
def test_own_uneven_shards_keep_ranks_identical(ranks, name):
    size, out = ranks
    results = _results(size, out, name)
    _same_on_every_rank(results)
    assert results[0]["fused"] == (name == "fused_shards")
    assert results[0]["history"]["epoch"] == [0, 1, 2]
    assert np.isfinite(results[0]["history"]["history"]["loss"]).all()


def test_balanced_class_weight_counts_every_shard(ranks):
    """class_weight="balanced" on own shards (each with its own class mix) weighs the
    classes by their counts over all the shards, training and validation alike: the
    full-batch run equals one process on the concatenated parts."""
    size, out = ranks
    results = _results(size, out, "balanced_shards")
    assert "error" not in results[0], results[0].get("error")
    _same_on_every_rank(results)
    model, X, y, fit = runs.balanced_shards_reference(size)
    history = model.fit(X, y, **fit)
    np.testing.assert_allclose(results[0]["params"], model.params, rtol=1e-10, atol=1e-12)
    assert sorted(results[0]["history"]["history"]) == sorted(history.history)
    for key, values in history.history.items():
        np.testing.assert_allclose(results[0]["history"]["history"][key], values,
                                   rtol=1e-10, err_msg=key)


@pytest.mark.parametrize("name", ["weights_on_one_shard", "string_label_shards",
                                  "zero_val_on_one_shard", "refused_then_refit"])
def test_own_shards_that_differ_in_kind_equal_one_process(ranks, name):
    """Sample weights on one rank's shard send every rank step by step (not the fused
    epoch on the others: the ranks would wait in different sums); string labels get
    the codes of every rank's labels, though rank 0's shard lacks the first class (also
    after a refused fit, which fixes no labels); a rank's validation part may weigh
    nothing when the others' weigh something."""
    size, out = ranks
    results = _results(size, out, name)
    assert "error" not in results[0], results[0].get("error")
    _same_on_every_rank(results)
    assert len({result["fused"] for result in results}) == 1  # one path for all ranks
    if name in ("weights_on_one_shard", "zero_val_on_one_shard"):
        assert not results[0]["fused"]
    else:
        assert all(result["classes"] == ["ant", "bee", "cat"] for result in results)
    model, X, y, fit = runs.own_shards_reference(
        "string_label_shards" if name == "refused_then_refit" else name, size)
    history = model.fit(X, y, **fit)
    np.testing.assert_allclose(results[0]["params"], model.params, rtol=1e-10, atol=1e-12)
    for key, values in history.history.items():
        np.testing.assert_allclose(results[0]["history"]["history"][key], values,
                                   rtol=1e-10, err_msg=key)


def test_numba_steps_in_python_and_equals_the_fused_epoch(ranks):
    size, out = ranks
    numba, fused = (_results(size, out, name) for name in ("numba_momentum", "fused_momentum"))
    _same_on_every_rank(numba)
    assert fused[0]["fused"] and not numba[0]["fused"]
    np.testing.assert_allclose(numba[0]["params"], fused[0]["params"], rtol=1e-10, atol=1e-12)


def test_fused_epochs_on_one_node_sum_in_shared_memory(ranks):
    """Every fused run sums through the node's shared-memory window (one reduction
    step per global batch), unless told to use Iallreduce; the step-by-step path never."""
    size, out = ranks
    steps = {name: _results(size, out, name)[0]["shared_memory_steps"]
             for name in ("fused_momentum", "fused_adam", "fused_shards", "numpy_momentum",
                          "iallreduce_fused_momentum", "sgd_l2", "numba_momentum",
                          "fused_sgd", "numpy_sgd", "fused_sgd_shards")}
    assert steps["fused_momentum"] == steps["numpy_momentum"] > 0
    assert steps["fused_adam"] == 3 * -(-61 // (size * 5))
    assert steps["fused_shards"] > 0 and steps["fused_sgd_shards"] > 0
    assert steps["fused_sgd"] == steps["numpy_sgd"] > 0
    # the first layer is split with any optimizer; its region holds the largest global
    # batch, not size x n rows
    split_rows = {name: _results(size, out, name)[0]["split_rows"]
                  for name in ("fused_sgd", "full_batch_sgd", "fused_sgd_shards",
                               "fused_momentum", "fused_adam")}
    assert split_rows == {"fused_sgd": size * runs.BATCH, "full_batch_sgd": 61,
                          "fused_sgd_shards": 20 + 25 * (size - 1),  # batch 25 of 20 + 7 r
                          "fused_momentum": size * runs.BATCH, "fused_adam": size * 5}
    assert steps["iallreduce_fused_momentum"] == steps["sgd_l2"] == steps["numba_momentum"] == 0


@pytest.mark.parametrize("name, same_as", [
    ("numpy_momentum", "fused_momentum"), ("iallreduce_fused_momentum", "fused_momentum"),
    ("numpy_sgd", "fused_sgd"),
    ("iallreduce_adam", "adam"), ("iallreduce_lbfgs", "lbfgs")])
def test_shared_memory_sums_equal_iallreduce_and_the_numpy_reference(ranks, name, same_as):
    """The same run summed by Iallreduce instead of the node's shared memory (the fused
    epoch, the per-step path, a solver), or run by the numpy reference kernels (hooked,
    into the same window), gives the same parameters and History."""
    size, out = ranks
    other, base = (_results(size, out, n) for n in (name, same_as))
    _same_on_every_rank(other)
    assert other[0]["fused"] == base[0]["fused"]
    np.testing.assert_allclose(other[0]["params"], base[0]["params"], rtol=1e-10, atol=1e-12)
    for key, values in other[0]["history"]["history"].items():
        np.testing.assert_allclose(base[0]["history"]["history"][key], values, rtol=1e-10)


@pytest.mark.parametrize("name, same_as, summed_there, said", [
    ("no_room_fused_sgd", "fused_sgd", False, "the ranks sum through Iallreduce"),
    ("no_room_fused_adam", "fused_adam", False, "the ranks sum through Iallreduce"),
    ("no_split_room_fused_sgd", "fused_sgd", True,
     "the ranks sum the first layer instead of splitting it"),
    ("no_room_sgd_l2", "sgd_l2", False, "the ranks sum through Iallreduce"),  # step by step
    ("no_room_lbfgs", "lbfgs", False, "the ranks sum through Iallreduce")])
def test_a_node_short_of_shared_memory_trains_the_same_and_says_so(
        ranks, name, same_as, summed_there, said):
    """A node whose /dev/shm (64 MB in a container) has no room for the window sums
    through MPI instead, or sums the first layer instead of splitting it, and gives the
    same result (up to rounding); rank 0 alone warns, once, saying what to do."""
    size, out = ranks
    results = _results(size, out, name)
    assert "error" not in results[0], results[0].get("error")
    _same_on_every_rank(results)
    base = _results(size, out, same_as)[0]
    got = results[0]
    assert got["fused"] == base["fused"]
    assert (got["shared_memory_steps"] > 0) == summed_there and got["split_rows"] == 0
    if not summed_there:
        assert got["window_sums"] == 0   # every sum in Python through Iallreduce
    if base["fused"]:
        assert base["shared_memory_steps"] > 0 and base["split_rows"] > 0
    np.testing.assert_allclose(got["params"], base["params"], rtol=1e-10, atol=1e-12)
    for key, values in base["history"]["history"].items():
        np.testing.assert_allclose(got["history"]["history"][key], values, rtol=1e-10)
    [warning] = got["warnings"]
    assert said in warning and "has no room" in warning and "--shm-size" in warning
    assert "/no-room" in warning and "a window may take 90%" in warning
    assert all(not result["warnings"] for result in results[1:])


def test_a_node_short_of_shared_memory_warns_once_and_tries_no_more(ranks):
    """A second fit on a node that had no room takes the same path at once: no new
    window asked for, no second warning, every rank alike (a rank that asked again
    alone would wait for the others forever)."""
    size, out = ranks
    results = _results(size, out, "no_room_twice_fused_sgd")
    assert "error" not in results[0], results[0].get("error")
    _same_on_every_rank(results)
    assert results[0]["fused"] and results[0]["shared_memory_steps"] == 0
    assert results[0]["window_sums"] == 0 and len(results[0]["warnings"]) == 1
    assert all(not result["warnings"] for result in results[1:])


def test_the_room_check_reads_open_mpis_parameter_files_in_its_order(tmp_path, monkeypatch):
    """osc_sm_backing_directory: the environment, else ~/.openmpi/mca-params.conf, else
    the installation's openmpi-mca-params.conf, else /dev/shm (Open MPI's own order)."""
    home, system = tmp_path / "home", tmp_path / "etc"
    (home / ".openmpi").mkdir(parents=True)
    system.mkdir()
    for name in ("user", "system", "env"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("OPAL_SYSCONFDIR", str(system))
    monkeypatch.delenv("OMPI_MCA_osc_sm_backing_directory", raising=False)
    room = distributed._shared_memory_room
    assert distributed._mca_parameter("osc_sm_backing_directory") is None
    assert room() is None or room()[0] == "/dev/shm"
    (system / "openmpi-mca-params.conf").write_text(
        "# osc_sm_backing_directory = /nowhere\n"
        f"osc_sm_backing_directory = /nowhere\nosc_sm_backing_directory={tmp_path / 'system'}"
        "  # the last line wins\nbtl = self\n")
    assert room()[0] == str(tmp_path / "system") and room()[1] > 0
    (home / ".openmpi" / "mca-params.conf").write_text(
        f"osc_sm_backing_directory = {tmp_path / 'user'}\n")
    assert room()[0] == str(tmp_path / "user")
    monkeypatch.setenv("OMPI_MCA_osc_sm_backing_directory", str(tmp_path / "env"))
    assert room()[0] == str(tmp_path / "env")
    monkeypatch.setenv("OMPI_MCA_osc_sm_backing_directory", str(tmp_path / "missing"))
    assert room() is None   # nothing there to check: Open MPI will say what is wrong


@pytest.mark.parametrize("files", [("system",), ("user", "system")])
def test_the_room_checked_is_where_open_mpi_puts_the_window(tmp_path, files):
    """With osc_sm_backing_directory set in the installation's openmpi-mca-params.conf
    (here under OPAL_SYSCONFDIR), and overridden in ~/.openmpi/mca-params.conf, the
    window of a distributed fit is a file of the directory Open MPI takes, and the room
    check looks there. (mpiexec passes the user's file on as OMPI_MCA_ variables; the
    installation's file only Open MPI itself reads.)"""
    home, etc = tmp_path / "home", tmp_path / "etc"
    (home / ".openmpi").mkdir(parents=True)
    etc.mkdir()
    for name in files:
        (tmp_path / name).mkdir()
    (etc / "openmpi-mca-params.conf").write_text(
        f"osc_sm_backing_directory = {tmp_path / 'system'}\n")
    if "user" in files:
        (home / ".openmpi" / "mca-params.conf").write_text(
            f"osc_sm_backing_directory = {tmp_path / 'user'}\n")
    backing = str(tmp_path / files[0])
    script = tmp_path / "fit.py"
    script.write_text(
        "import numpy as np, fastnn as fn\n"
        "from fastnn import distributed\n"
        "X = np.random.default_rng(0).standard_normal((64, 6)).astype('float32')\n"
        "model = fn.Sequential([fn.Dense(6, 8, activation='relu', seed=1), fn.Dense(8, 2)])\n"
        "model.compile('cross_entropy', fn.optimizers.SGD(lr=0.1))\n"
        "model.fit(X, (X[:, 0] > 0).astype(int), batch_size=8, epochs=1, verbose=0,\n"
        "          distributed=True)\n"
        "maps = open('/proc/self/maps').read().split('\\n')\n"
        "window = sorted({line.split()[5] for line in maps if 'osc_sm.' in line})\n"
        "print(distributed.rank(), distributed._shared_memory_room()[0], window)\n")
    env = _mpi_env(HOME=str(home), OPAL_SYSCONFDIR=str(etc))
    env.pop("OMPI_MCA_osc_sm_backing_directory", None)
    done = run_launcher([_mpiexec(), "--oversubscribe", "-n", "2", sys.executable,
                         str(script)], TIMEOUT, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = sorted(line for line in done.stdout.split("\n") if line[:2] in ("0 ", "1 "))
    assert [line.split()[:2] for line in lines] == [["0", backing], ["1", backing]]
    for line in lines:
        assert f"'{backing}/osc_sm." in line, line


@pytest.mark.parametrize("fused_name, stepwise_name", [
    ("fused_shards", "stepwise_shards"), ("fused_sgd_shards", "stepwise_sgd_shards")])
def test_fused_shards_equal_the_steps_in_python(ranks, fused_name, stepwise_name):
    """Own uneven shards (rank 0's empty in the last step): the fused epoch (summed,
    or with plain SGD its first layer split) equals the steps in Python."""
    size, out = ranks
    _same_on_every_rank(_results(size, out, fused_name))
    fused, stepwise = (_results(size, out, name)[0] for name in (fused_name, stepwise_name))
    assert fused["fused"] and not stepwise["fused"]
    np.testing.assert_allclose(fused["params"], stepwise["params"], rtol=1e-10, atol=1e-12)
    for key, values in stepwise["history"]["history"].items():
        np.testing.assert_allclose(fused["history"]["history"][key], values, rtol=1e-10)


@pytest.mark.parametrize("name, own_error, cause", [
    ("bad_data", "ValueError", "ValueError: X contains 1 NaN"),
    ("callback_fails", "RuntimeError", "RuntimeError: callback failed on purpose"),
])
def test_a_failing_rank_stops_every_rank_naming_it(ranks, name, own_error, cause):
    size, out = ranks
    results = _results(size, out, name)
    assert results[-1]["error"][0] == own_error
    for result in results[:-1]:
        kind, message = result["error"]
        assert kind == "RankFailedError"
        assert f"rank {size - 1} failed: {cause}" in message


def test_a_checkpoint_written_before_a_failure_survives(ranks):
    _, out = ranks
    assert fn.load_model(out / "fault-ckpt-1.npz").n_params > 0


def test_a_nonfinite_loss_on_one_rank_stops_every_rank_naming_it(ranks):
    size, out = ranks
    for result in _results(size, out, "nan_on_one_rank"):
        kind, message = result["error"]
        assert kind == "FloatingPointError"
        assert f"loss became inf (on the batch part of rank {size - 1} of {size})" in message


@pytest.mark.parametrize("name, difference", [
    ("other_model", "rank 1 has layers[0]="), ("other_data", "rank 1 has data checksum"),
    ("other_class_weight", "has class_weight='balanced' where rank 0 has None")])
def test_ranks_that_disagree_fail_before_training(ranks, name, difference):
    size, out = ranks
    for result in _results(size, out, name):
        kind, message = result["error"]
        assert kind == "ValueError" and difference in message
        # only ranks that pass the full data set are pointed to own shards
        assert ("distributed='shards'" in message) == (name != "other_class_weight")


def test_an_error_outside_the_agreements_aborts_the_job(tmp_path):
    done = _launch(2, tmp_path, ["abort"])
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "rank 1 of 2 failed outside a collective" in output
    assert "MemoryError: optimizer step failed on purpose" in output


# ------------------------------------------------------------------ two hosts
#: Runs across two hosts: the fused epoch (an Iallreduce per layer), the per-step path
#: with sample weights, float32, a quasi-Newton and a matrix-free LM solver.
ACROSS_HOSTS = ("fused_momentum", "adam", "fused_sgd32", "lbfgs", "lm_free")
HOST_ADDRESSES = ("10.231.0.1", "10.231.0.2")
#: Open MPI's ssh agent for the test's hosts: ``agent [options] HOST COMMAND`` runs
#: COMMAND in HOST's network namespace, under a hostname of its own.
AGENT = """#!/bin/sh
while [ "${1#-}" != "$1" ]; do shift; done
host=$1; shift
case $host in
%s
  *) echo "no such test host: $host" >&2; exit 1;;
esac
exec "%s" netns exec "$ns" "%s" --uts /bin/sh -c "hostname $ns && $*"
"""


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    """The start of a command that runs ``mpiexec -n 2`` with one rank on each of two
    hosts: two Linux network namespaces, each with its own hostname, joined by a veth
    pair, Open MPI reaching the second through ``AGENT`` instead of ssh. The ranks are
    on different nodes to MPI (no shared memory between them) and talk TCP. Needs root,
    iproute2's ``ip`` and util-linux's ``unshare``; skipped where namespaces cannot be
    made."""
    tools = [shutil.which(tool) for tool in ("ip", "unshare", "hostname")]
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or None in tools:
        pytest.skip("two hosts on one machine need Linux, root, ip, unshare and hostname")
    ip, unshare, _ = tools
    names = [f"fnn{os.getpid() % 100000}{host}" for host in "ab"]

    def remove():
        for name in names:
            subprocess.run([ip, "netns", "del", name], capture_output=True, timeout=30)

    remove()
    steps = [["netns", "add", name] for name in names]
    steps.append(["link", "add", names[0] + "v", "type", "veth", "peer", "name", names[1] + "v"])
    for name, address in zip(names, HOST_ADDRESSES):
        steps += [["link", "set", name + "v", "netns", name],
                  ["-n", name, "addr", "add", address + "/24", "dev", name + "v"],
                  ["-n", name, "link", "set", name + "v", "up"],
                  ["-n", name, "link", "set", "lo", "up"]]
    for step in steps:
        done = subprocess.run([ip, *step], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            remove()
            pytest.skip(f"cannot make network namespaces here: ip {' '.join(step)}: "
                        f"{done.stderr.strip()}")
    home = tmp_path_factory.mktemp("hosts")
    (home / "hosts").write_text("".join(f"{a} slots=1\n" for a in HOST_ADDRESSES))
    agent = home / "agent.sh"
    agent.write_text(AGENT % ("\n".join(f"  {a}) ns={n};;" for a, n in zip(HOST_ADDRESSES, names)),
                              ip, unshare))
    agent.chmod(0o755)
    yield [ip, "netns", "exec", names[0], unshare, "--uts", "/bin/sh", "-c",
           'hostname "$0" && exec "$@"', names[0], _mpiexec(), "--hostfile",
           str(home / "hosts"), "-n", "2", "--prtemca", "plm_ssh_agent", str(agent),
           "-x", "PATH"]
    remove()


def test_two_hosts_over_tcp_equal_one_process(two_hosts, tmp_path, monkeypatch):
    """Ranks on two hosts (``two_hosts``) sum without shared memory, by Iallreduce over
    TCP, and still equal one process with the global batch."""
    out = tmp_path / "out"
    out.mkdir()
    env = _mpi_env(PATH=os.pathsep.join([str(Path(sys.executable).parent),
                                         os.environ["PATH"]]))
    done = run_launcher(two_hosts + [sys.executable, str(HERE / "_distributed_runs.py"),
                                     str(out), *ACROSS_HOSTS], TIMEOUT, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    monkeypatch.setenv("FASTNN_TEST_OUT", str(tmp_path))
    for name in ACROSS_HOSTS:
        results = _results(2, out, name)
        assert [r.get("shared_memory_steps") for r in results] == [0, 0], name
        _check_equals_one_process(results, name)


# ------------------------------------------------------------------ one process
def test_outside_a_launcher_rank_size_and_a_clear_message(monkeypatch):
    for variable in distributed._LAUNCHER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    if "mpi4py.MPI" in sys.modules:
        pytest.skip("MPI was initialised in this process by another test")
    assert (distributed.rank(), distributed.size(), distributed.is_main()) == (0, 1, True)
    model, X, y, fit = runs.build("sgd_l2", 0, 1)
    with pytest.raises(RuntimeError, match="needs processes started by an MPI launcher.*mpiexec"):
        model.fit(X, y, **fit)
    with pytest.raises(ValueError, match="distributed must be False, True or 'shards'"):
        model.fit(X, y, **{**fit, "distributed": "all"})
    assert "mpi4py.MPI" not in sys.modules  # MPI was never initialised here


def test_without_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    model, X, y, fit = runs.build("sgd_l2", 0, 1)
    with pytest.raises(ImportError, match=r"pip install 'fastnn\[mpi\]'"):
        model.fit(X, y, **fit)


def test_import_fastnn_does_not_import_mpi4py():
    code = "import sys, fastnn; assert 'mpi4py' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=TIMEOUT)


@pytest.mark.parametrize("n, batch, parts", [(61, 8, 2), (61, 8, 3), (5, 4, 3), (16, 8, 2)])
def test_rank_parts_tile_the_single_process_batches(n, batch, parts):
    single = BatchPlan(n, parts * batch)
    plans = [BatchPlan(n, batch, parts=parts, part=r) for r in range(parts)]
    assert all(p.n_batches == single.n_batches for p in plans)
    for b in range(single.n_batches):
        bounds = [p.bounds(b) for p in plans]
        assert bounds[0][0] == single.bounds(b)[0] and bounds[-1][1] == single.bounds(b)[1]
        assert all(a[1] == c[0] for a, c in zip(bounds, bounds[1:]))
        sizes = [stop - start for start, stop in bounds]
        assert max(sizes) - min(sizes) <= 1


LAUNCHER_KILLED = """
import os, sys, time
from pathlib import Path
import numpy as np
import fastnn as fn
out = Path(sys.argv[1])
rank = fn.distributed.rank()
# the launcher that would show the ranks' output is killed: rank 0's stderr to a file
os.dup2(os.open(str(out / f"stderr{rank}"), os.O_WRONLY | os.O_CREAT), 2)
(out / f"pid{rank}").write_text(str(os.getpid()))


class Stall(fn.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            (out / "stalled").write_text("")
            time.sleep(300)   # never comes back while the test runs


model = fn.Sequential([fn.Dense(4, 8, activation="relu"), fn.Dense(8, 3)])
model.compile("cross_entropy", fn.optimizers.SGD(lr=0.1))
model.fit(np.ones((64, 4), np.float32), np.zeros(64, np.int64), epochs=2, verbose=0,
          batch_size=8, distributed=True, callbacks=[Stall()] if rank == 1 else [])
"""


def _running(pid):
    """True while process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_rank_whose_launcher_is_killed_stops_waiting(tmp_path):
    """SIGKILL reaches mpiexec alone and its ranks live on, reparented. Rank 0, waiting
    in the fused epoch's shared memory for rank 1 (asleep in a callback: no MPI call
    on either, so Open MPI cannot stop them), raises within seconds naming the launcher
    instead of polling for ever (``kernels.NodeSum.parent``)."""
    (tmp_path / "killed.py").write_text(LAUNCHER_KILLED, encoding="utf-8")
    # Killed ranks leave Open MPI's shared-memory transport files behind, and the killed
    # launcher its session directory: in tmp_path, not in the machine's /dev/shm and
    # TMPDIR (where a later launcher given the same process id would fail to start).
    system_tmp = Path(tempfile.gettempdir())
    before = set(system_tmp.iterdir())
    env = _mpi_env(OMPI_MCA_btl_sm_backing_directory=str(tmp_path), TMPDIR=str(tmp_path))
    launcher = subprocess.Popen(
        [_mpiexec(), "--oversubscribe", "-n", "2", sys.executable,
         str(tmp_path / "killed.py"), str(tmp_path)], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = []
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(pids) < 2 and time.monotonic() < deadline:
            pids = [int(p.read_text()) for p in sorted(tmp_path.glob("pid*"))
                    if p.read_text()]
            time.sleep(0.1)
        while not (tmp_path / "stalled").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(pids) == 2 and (tmp_path / "stalled").exists(), "rank 1 did not stall"
        time.sleep(1)                       # rank 0 is waiting for rank 1 by now
        assert _running(pids[0])
        launcher.kill()
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 30
        while _running(pids[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        error = (tmp_path / "stderr0").read_text()
        assert not _running(pids[0]), ("rank 0 still waits after its launcher was killed; "
                                       f"its stderr:\n{error}")
        assert f"this rank's launcher (process {launcher.pid}) is gone while it waited" in error
        assert "its launcher is gone: exiting" in error   # no MPI_Abort through it
        assert not [p for p in set(system_tmp.iterdir()) - before
                    if str(launcher.pid) in p.name]
        assert [p for p in tmp_path.iterdir() if str(launcher.pid) in p.name]
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=10)


def test_each_launch_has_a_tmpdir_of_its_own_removed_after_it(tmp_path):
    """Open MPI keeps its session directory in TMPDIR; one that a killed launcher left
    behind makes a later launcher with the same process id fail to start, so
    run_launcher gives each launch a fresh TMPDIR (inside the caller's) and removes it."""
    done = run_launcher([_mpiexec(), "-n", "1", sys.executable, "-c",
                         "import os, tempfile; print(os.environ['TMPDIR']); "
                         "print(tempfile.gettempdir())"],
                        TIMEOUT, env=_mpi_env(TMPDIR=str(tmp_path)))
    assert done.returncode == 0, done.stderr
    session, rank_tmp = done.stdout.split()
    assert Path(session).parent == tmp_path and rank_tmp == session
    assert not Path(session).exists() and list(tmp_path.iterdir()) == []


def test_readme_example_prints_the_same_on_two_ranks(tmp_path):
    readme = (HERE.parent / "README.md").read_text(encoding="utf-8")
    start = readme.index("# train.py")
    script = tmp_path / "train.py"
    script.write_text(readme[start:readme.index("```", start)], encoding="utf-8")
    alone = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           cwd=tmp_path, timeout=TIMEOUT)
    assert alone.returncode == 0, alone.stderr
    env = _mpi_env()
    two = run_launcher([_mpiexec(), "--oversubscribe", "-n", "2", sys.executable, "-m",
                        "mpi4py", str(script)], TIMEOUT, cwd=tmp_path, env=env)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout == alone.stdout and alone.stdout.startswith("val_accuracy 0.")


def test_cost_model_efficiency_falls_with_ranks_and_the_batch_keeps_the_target():
    from fastnn.bench import mpi

    allreduce = {"ranks": 2, "seconds": {str(b): 1e-6 + b / 2e9 for b in mpi.MESSAGE_BYTES}}
    steps = {f"{net}/{b}": 1e-4 + 5e-6 * b for net in mpi.NETS for b in (16, 256)}
    model = mpi.cost_model(allreduce, steps)
    for entry in model.values():
        for gbps in mpi.NETWORKS_GBPS:
            efficiency = [row[str(gbps)]["efficiency"] for row in entry["rows"]]
            assert all(0 < e <= 1 for e in efficiency) and efficiency == sorted(efficiency)[::-1]
            for row in entry["rows"]:
                k, batch = row["ranks"], row[str(gbps)]["batch_for_target"]
                assert batch % k == 0
                comm = (2 * (k - 1) * (1e-6 + mpi.NETWORK_LATENCY)
                        + 2 * (k - 1) / k * entry["grad_bytes"] / (gbps * 1e9 / 8))
                compute = entry["c0"] + entry["c1"] * batch / k
                assert compute / (compute + comm) >= mpi.TARGET_EFFICIENCY - 1e-12
    table = mpi.model_table(model)
    assert "NOT a measurement" in table
    assert mpi.model_table(json.loads(json.dumps(model))) == table  # from `--json` too


def test_independent_processes_add_up_their_rates():
    from fastnn.bench import mpi

    # half the samples each in 1 s and in 3 s: 1/2 + 1/6 = 2/3 of them per s, 1.5 s in all
    assert mpi.together([[1.0, 2.0], [3.0, 2.0]]) == pytest.approx([1.5, 2.0])


def test_bench_mpi_ratios_pair_each_round_with_its_own_baseline():
    from fastnn.bench import mpi

    def rounds(*seconds):
        return [{"epoch_seconds": [t, t], "loss": 0.5} for t in seconds]

    # the host slows down between the rounds: 1 process 100 then 50 samples/s
    results = {mpi.BASELINE: rounds(1.0, 2.0), mpi._FUSED.format(2): rounds(0.5, 1.25),
               "2 ranks (torch DDP, gloo)": rounds(2.0, 2.5)}
    training = {label: dict(mpi._merge_rounds(rs, results[mpi.BASELINE], 100),
                            samples_per_s=75.0) for label, rs in results.items()}
    assert training[mpi._FUSED.format(2)]["round_ratios"] == [2.0, 1.6]
    report = mpi.format_mpi_report({
        "allreduce": {"error": "skipped"}, "net": "mnist", "sizes": [784, 256, 128, 10],
        "global_batch": 256, "samples": 100, "rounds": 2, "load_average": [0.5, None],
        "ranks": 2, "training": training})
    fused = next(line for line in report.splitlines() if "shared memory" in line)
    assert "1.80x [1.60-2.00]" in fused   # not 1.71x, the ratio of the medians
    assert "fastnn / torch DDP: 3.00x" in report   # the rounds' 4.00x and 2.00x


def test_bench_mpi_leaves_out_a_round_whose_launch_failed():
    """Open MPI's launcher now and then fails to start: the round is left out of the
    configuration's figures (and said so), not the whole configuration; a configuration
    whose every round failed reports the error."""
    from fastnn.bench import mpi

    def ran(t):
        return {"epoch_seconds": [t, t], "loss": 0.5}

    pmix = {"error": "worker exited with code 213: The PMIx server's listener thread "
                     "failed to start. We cannot\ncontinue."}
    base = [ran(1.0), ran(1.0), ran(2.0)]
    results = {mpi.BASELINE: base, mpi._FUSED.format(2): [ran(0.5), ran(0.5), ran(1.0)],
               "2 ranks (torch DDP, gloo)": [ran(2.0), pmix, ran(4.0)],
               "2 ranks, per-step": [pmix, pmix, pmix]}
    training = {label: mpi._merge_rounds(rs, base, 100) for label, rs in results.items()}
    ddp = training["2 ranks (torch DDP, gloo)"]
    assert ddp["round_ratios"] == [0.5, None, 0.5] and ddp["rounds"] == 2
    assert ddp["epoch_seconds"] == [2.0, 2.0, 4.0, 4.0] and list(ddp["failed"]) == [1]
    assert training["2 ranks, per-step"] == pmix
    for record in training.values():
        if not record.get("error"):
            record["samples_per_s"] = mpi._rate(record, 100)
    report = mpi.format_mpi_report({
        "allreduce": {"error": "skipped"}, "net": "mnist", "sizes": [784, 256, 128, 10],
        "global_batch": 256, "samples": 100, "rounds": 3, "load_average": [0.5] * 3,
        "ranks": 2, "training": training})
    lines = report.splitlines()
    at = next(i for i, line in enumerate(lines) if "torch DDP" in line)
    assert "0.50x [0.50-0.50]" in lines[at]
    assert lines[at + 1].strip().startswith("left out: 1 of 3 rounds, which failed "
                                            "(round 2: worker exited with code 213")
    assert "fastnn / torch DDP: 4.00x" in report   # rounds 1 and 3 only
    assert any("per-step" in line and "error: worker exited" in line for line in lines)


@pytest.mark.parametrize("slower, warned", [(1.05, False), (1.4, True)])
def test_bench_mpi_flags_independent_processes_that_ran_at_different_speeds(slower, warned):
    """A process that runs much slower than its twin means something else used a CPU
    (a stray rank of a killed job once did): the report says so."""
    from fastnn.bench import mpi

    base = [{"epoch_seconds": [1.0, 1.0], "loss": 0.5}] * 2
    ceiling = [{"epoch_seconds": [0.6, 0.6], "loss": 0.5,
                "process_seconds": [[1.0, 1.1, 1.0], [slower, slower, slower]]}] * 2
    training = {label: dict(mpi._merge_rounds(rs, base, 100), samples_per_s=75.0)
                for label, rs in {mpi.BASELINE: base, "2 independent processes (ceiling)":
                                  ceiling}.items()}
    assert training["2 independent processes (ceiling)"]["process_spread"] == [slower] * 2
    report = mpi.format_mpi_report({
        "allreduce": {"error": "skipped"}, "net": "mnist", "sizes": [784, 256, 128, 10],
        "global_batch": 256, "samples": 100, "rounds": 2, "load_average": [0.5, 0.5],
        "ranks": 2, "training": training})
    assert ("warning: the independent processes ran at different speeds "
            f"(slowest / fastest up to {slower:.2f}x)" in report) == warned


def test_bench_mpi_groups_the_rounds_by_where_the_cpus_sat():
    """The probes split at their largest jump (>= FAR_FACTOR); a round is near when both
    its probes are below it, far when both are above, mixed when the host moved the
    CPUs in between."""
    from fastnn.bench import mpi

    ns = 1e-9
    # one probe at 52 ns (two vCPUs on one core) must not make the 110 ns ones "far"
    trips = [(90 * ns, 100 * ns), (400 * ns, 420 * ns), (95 * ns, 410 * ns),
             (52 * ns, 150 * ns), (390 * ns, 400 * ns)]
    where = mpi.placement(trips, [1.96, 1.62, 1.8, 1.9, None])   # the last round failed
    assert where["threshold"] == pytest.approx((150 * 390) ** 0.5 * ns)
    assert (where["near"], where["far"], where["mixed"]) == ([1.96, 1.9], [1.62], [1.8])
    assert mpi.placement(trips[:2] + [(None, 100 * ns)], [1.9, 1.6, 1.9]) is None
    assert mpi.placement(trips[:2] + [(0.0, 100 * ns)], [1.9, 1.6, 1.9]) is None
    assert mpi.placement([], []) is None
    lines = mpi._placement_lines(where, mpi._FUSED.format(2))
    assert lines[0].endswith("90/100, 400/420, 95/410, 52/150, 390/400 ns")
    assert ("2 rounds within 242 ns (near): 1.93x [1.90-1.96]; 1 round beyond it (far): "
            "1.62x; 1 round that moved (mixed): 1.80x") in lines[1]
    assert mpi._placement_lines(None, mpi._FUSED.format(2)) == []
    alike = mpi.placement([(90 * ns, 100 * ns), (120 * ns, 170 * ns)], [1.9, None])
    assert alike["threshold"] is None and alike["near"] == [1.9]
    assert "sat alike in every round" in mpi._placement_lines(alike, "2 ranks")[1]
    # run ah: one probe at 44 ns, every other one near (104-122 ns): no round is far
    ah = [(44 * ns, 110 * ns)] + [(112 * ns, 114 * ns)] * 6 + [(114 * ns, 122 * ns)]
    lone = mpi.placement(ah, [1.98] + [1.95] * 7)
    assert lone["threshold"] is None and lone["far"] == [] and len(lone["near"]) == 8
    # two probes on one core do split from the rest, as any two below a 2x jump
    assert mpi.placement(ah[:1] + [(45 * ns, 112 * ns)] + ah[1:],
                         [1.9] * 9)["threshold"] == pytest.approx((45 * 110) ** 0.5 * ns)


def test_cpu_round_trip_between_two_cpus():
    pytest.importorskip("fastnn.kernels._cython")
    from fastnn.bench import mpi
    from fastnn.kernels import _cython

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2 or not sys.platform.startswith("linux"):
        pytest.skip("needs Linux and two usable CPUs")
    seconds = _cython.cpu_round_trip_seconds(cpus[0], cpus[1], 2000)
    assert 0 < seconds < 1e-3           # tens to hundreds of ns; a busy CPU adds to it
    assert os.sched_getaffinity(0) == set(cpus)   # the caller stays where it was
    assert 0 < mpi.cpu_round_trip(2) < 1e-3
    assert _cython.cpu_round_trip_seconds(cpus[0], 100_000, 10) is None  # no such CPU
    with pytest.raises(ValueError, match="two different CPUs"):
        _cython.cpu_round_trip_seconds(cpus[0], cpus[0])
    with pytest.raises(ValueError, match="rounds >= 1"):
        _cython.cpu_round_trip_seconds(cpus[0], cpus[1], 0)


def test_bench_mpi_runs_every_configuration_once_per_round(monkeypatch):
    from fastnn.bench import mpi

    launched = []

    def launch(spec, ranks):
        launched.append(spec)
        if spec["kind"] == "allreduce":
            return {"ranks": ranks, "seconds": {str(b): 1e-6 + b / 2e9 for b in spec["bytes"]}}
        if spec["kind"] == "steps":
            return {f"{net}/{b}": 1e-4 + 5e-6 * b for net in spec["nets"] for b in spec["batches"]}
        return {"epoch_seconds": [0.1] * spec["repeats"], "loss": 0.5}

    monkeypatch.setattr(mpi, "_launch", launch)
    for options, (rounds, repeats, samples) in (({}, (1, 2, 8192)),
                                                 ({"rounds": 3, "repeats": 4, "samples": 1024},
                                                  (3, 4, 1024))):
        launched.clear()
        result = mpi.run_mpi_bench(2, True, False, lambda message: None, **options)
        training = [spec for spec in launched if spec["kind"] == "fastnn"]
        assert len(training) == rounds * len(result["training"]) == rounds * 8
        assert sum(s.get("optimizer") == "adam" for s in training) == 2 * rounds
        assert {(s["repeats"], s["samples"]) for s in training} == {(repeats, samples)}
        assert result["rounds"] == rounds and not result["errors"]
        assert all(len(r["round_ratios"]) == rounds for r in result["training"].values())
        # a placement probe before and after each round's shared-memory runs
        for probes in (result["placement"], result["placement_adam"]):
            if probes is not None:
                assert len(probes["round_trips"]) == rounds
                assert len(probes["near"] + probes["far"] + probes["mixed"]) == rounds


def test_cli_trains_on_two_ranks_and_rank_0_alone_prints_and_saves(tmp_path):
    env = _mpi_env()
    done = run_launcher([_mpiexec(), "--oversubscribe", "-n", "2", sys.executable, "-m",
                         "fastnn", "train", "--epochs", "2", "--threads", "1", "--quiet",
                         "--save", "m.npz"], TIMEOUT, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("trained 2 epochs") == 1 and "saved model to m.npz" in done.stdout
    assert fn.load_model(tmp_path / "m.npz").n_features == 64


def test_bench_mpi_workers_measure_on_two_ranks():
    from fastnn.bench import mpi

    allreduce = mpi._launch({"kind": "allreduce", "bytes": [8, 4096], "trials": 1}, 2)
    assert allreduce["ranks"] == 2 and set(allreduce["seconds"]) == {"8", "4096"}
    spec = {"kind": "fastnn", "sizes": [8, 6, 3], "samples": 256, "batch": 64, "repeats": 1,
            "distributed": True, "fused": False}
    two = mpi._launch(spec, 2)
    fused = mpi._launch(dict(spec, fused=True), 2)
    iallreduce = mpi._launch(dict(spec, fused=True, shared_memory=False), 2)
    one = mpi._launch(dict(spec, distributed=False), None)
    apart = mpi._launch(dict(spec, distributed=False, fused=True, independent=True), 2)
    assert len(two["epoch_seconds"]) == 1
    # the independent processes' rate is both processes' together, not 2 x rank 0's
    assert np.array(apart["process_seconds"]).shape == (2, 1)
    assert apart["epoch_seconds"] == mpi.together(apart["process_seconds"])
    for run in (two, fused, iallreduce):
        np.testing.assert_allclose(run["loss"], one["loss"], rtol=1e-5)


# ------------------------------------------------------------------ the reduce hook
class _RecordingReduce:
    """A one-rank ``TrainEpochSpec.reduce``: records its calls, scales the loss
    gradient by ``share`` and returns the loss of step ``nonfinite_step`` as NaN."""

    def __init__(self, share=1.0, nonfinite_step=None):
        self.calls, self.share, self.nonfinite_step = [], share, nonfinite_step

    def __call__(self, phase, layer, value, rows):
        self.calls.append((phase, layer, rows))
        if phase == kernels.REDUCE_LOSS:
            self.loss = value
            return self.share
        steps = sum(call[0] == kernels.REDUCE_LOSS for call in self.calls)
        return float("nan") if steps == self.nonfinite_step else self.loss


def _epoch_with_reduce(module, dtype, reduce, extra_steps=0, visit=23):
    """One train_epoch (momentum SGD: the same arithmetic folded or not) of a 3-layer
    net over the first ``visit`` of 23 samples in batches of 7; (params, stats)."""
    rng = np.random.default_rng(5)
    widths = np.array([6, 8, 5, 3], np.int64)
    n, batch = 23, 7
    X = rng.standard_normal((n, 6)).astype(dtype)
    labels = rng.integers(0, 3, n).astype(np.int64)
    size = int(sum(d * k + k for d, k in zip(widths[:-1], widths[1:])))
    params = (0.3 * rng.standard_normal(size)).astype(dtype)
    states = tuple(np.zeros(size, dtype) for _ in range(3))
    stats = np.zeros(4)
    module.train_epoch(kernels.TrainEpochSpec(
        X, labels, np.empty((0, 3), dtype), np.arange(visit, dtype=np.int64), batch, widths,
        np.array([kernels.RELU, kernels.TANH, kernels.IDENTITY], np.int64), np.zeros(3),
        np.ones(3, np.int64), params, np.zeros(size, dtype),
        np.empty(kernels.train_epoch_workspace_size(batch, widths), dtype),
        kernels.CROSS_ENTROPY, 0.0,
        kernels.OptimizerSpec(kernels.OPTIMIZER_CODES["sgd"], np.array([0.9, 0, 0, 0.0]),
                              states),
        np.full(-(-visit // batch) + extra_steps, 0.1), 0, stats, reduce=reduce))
    return params, stats


def test_reduce_hook_calls_and_result_are_the_same_on_every_backend(backend, dtype, oracle):
    plain, plain_stats = _epoch_with_reduce(backend, dtype, None)
    hooked, hooked_stats = _epoch_with_reduce(backend, dtype, _RecordingReduce())
    np.testing.assert_allclose(hooked, plain, rtol=RTOL[dtype], atol=ATOL[dtype])
    np.testing.assert_allclose(hooked_stats, plain_stats, rtol=RTOL[dtype])
    # two empty steps after the 4 batches (7, 7, 7, 2 rows), the gradient halved
    reduce, expected = _RecordingReduce(share=0.5), _RecordingReduce(share=0.5)
    got, _ = _epoch_with_reduce(backend, dtype, reduce, extra_steps=2)
    want, _ = _epoch_with_reduce(oracle, dtype, expected, extra_steps=2)
    np.testing.assert_allclose(got, want, rtol=RTOL[dtype], atol=ATOL[dtype])
    assert reduce.calls == expected.calls
    step = [(kernels.REDUCE_LOSS, -1)] + [(kernels.REDUCE_START, layer) for layer in (2, 1, 0)] \
        + [(kernels.REDUCE_WAIT, layer) for layer in (2, 1, 0)]
    rows = [7, 7, 7, 2, 0, 0]
    assert reduce.calls == [(phase, layer, r) for r in rows for phase, layer in step]


def test_a_nonfinite_global_loss_stops_the_epoch_before_the_update(backend):
    reduce = _RecordingReduce(nonfinite_step=2)
    params, stats = _epoch_with_reduce(backend, np.float64, reduce)
    assert stats[2] == 1 and np.isnan(stats[3])
    assert reduce.calls[-1] == (kernels.REDUCE_WAIT, 2, 7)  # the first wait of step 2
    one_step, _ = _epoch_with_reduce(backend, np.float64, _RecordingReduce(), visit=7)
    np.testing.assert_array_equal(params, one_step)


def test_an_exception_in_reduce_is_raised_by_train_epoch(backend):
    def failing(phase, layer, value, rows):
        raise RuntimeError("reduction failed on purpose")
    with pytest.raises(RuntimeError, match="reduction failed on purpose"):
        _epoch_with_reduce(backend, np.float64, failing)
    with pytest.raises(TypeError, match="reduce must be None, a callable or a NodeSum, got int"):
        _epoch_with_reduce(backend, np.float64, 3)
