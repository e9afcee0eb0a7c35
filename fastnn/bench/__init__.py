"""End-to-end benchmarks: what fastnn buys on this machine (``fastnn bench``).

One epoch of SGD and of Adam on synthetic data shaped like three reference nets, timed
for fastnn with each kernel backend, for a plain-numpy MLP written the way a careful
numpy user would (``NumpyMLP``, the hand-written baseline), and for PyTorch eager on the
CPU when ``torch`` is importable (never a dependency). Also measured in the same run:
this machine's sgemm rate (the roofline the GFLOP/s are compared with), the GEMM
crossover table (fastnn's own kernel vs OpenBLAS vs numpy at each product) and the startup
time (``import fastnn`` plus the first training step, with a cold and a warm numba cache).

Design:

* Every configuration runs in a fresh interpreter, so peak RSS and thread pools are its
  own; 1-thread runs are pinned to one CPU (the headline), all-thread runs are reported
  separately. The thread count reaches fastnn through ``fastnn.set_num_threads``, which
  limits the BLAS that the numpy baseline uses too; PyTorch gets
  ``torch.set_num_threads``.
* Every implementation starts from the same weights and visits the same batches in the
  same order, so their epoch losses agree: the loss column is a sanity check.
* Speedups are ratios of medians measured side by side in one run: > 1 means fastnn is
  faster. The benchmark measures and reports; it never fails because the machine is slow.

Modules: ``baselines`` (the implementations timed: fastnn, the numpy MLP, PyTorch, the
matmuls alone), ``gemm`` (the crossover table), ``machine`` (CPUs, pinning, peak RSS, versions, sgemm roofline,
startup), ``suite`` (planning, the worker processes), ``report`` (tables, notes, plot).
This module is the command line, also ``python -m fastnn.bench``.
"""
import argparse
import importlib.util
import json
import sys

from .. import kernels
from . import machine
from .baselines import OPTIMIZERS
from .report import format_report, import_matplotlib, plot_speedups
from .suite import NETS, QUICK_NETS, QUICK_REPEATS, REPEATS, RESULT_TAG, _log, run_suite, \
    worker


def _csv(choices):
    def parse(text):
        names = [s.strip() for s in text.split(",") if s.strip()]
        unknown = [s for s in names if s not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of "
                                             f"{','.join(choices)}, got {text!r}")
        return names
    return parse


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true",
                        help="a short run (under a minute): fewer samples, nets and repeats")
    parser.add_argument("--json", metavar="PATH", help="write every figure and the machine "
                        "info to PATH")
    parser.add_argument("--plot", metavar="PNG", help="bar chart of the speedups (matplotlib)")
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help="only this thread count (default: 1, pinned, and all usable "
                             "CPUs; --quick: 1)")
    torch_group = parser.add_mutually_exclusive_group()
    torch_group.add_argument("--vs-torch", action="store_true",
                             help="require the PyTorch comparison (default: included when "
                                  "torch is importable)")
    torch_group.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--nets", type=_csv(tuple(NETS)), metavar="LIST",
                        help=f"reference nets to run (default: {','.join(NETS)}; --quick: "
                             f"{','.join(QUICK_NETS)})")
    parser.add_argument("--backends", type=_csv(kernels.BACKENDS), metavar="LIST",
                        help="fastnn backends to run (default: every one that loads)")
    parser.add_argument("--optimizers", type=_csv(OPTIMIZERS), metavar="LIST",
                        default=list(OPTIMIZERS), help="sgd,adam (default: both)")
    parser.add_argument("--samples", type=_positive_int, metavar="N",
                        help="samples per epoch for every net (default: per net; --mpi: "
                             "16384, --quick 8192)")
    parser.add_argument("--repeats", type=_positive_int, metavar="N",
                        help=f"timed epochs per configuration; the median is reported "
                             f"(default {REPEATS}; --quick {QUICK_REPEATS}; --mpi: 3 per "
                             f"round, --quick 2)")
    parser.add_argument("--no-startup", action="store_true", help="skip the startup timing")
    parser.add_argument("--no-gemm", action="store_true",
                        help="skip the GEMM crossover table (own kernel vs OpenBLAS vs "
                             "numpy at each product of the nets)")
    parser.add_argument("--mpi", action="store_true",
                        help="instead: data-parallel training over MPI (pip install "
                             "'fastnn[mpi]'): Allreduce latency and bandwidth, scaling from "
                             "1 process to --ranks ranks, torch DDP when installed, and a "
                             "cost model of larger clusters")
    parser.add_argument("--ranks", type=_positive_int, metavar="K",
                        help="ranks for --mpi (default 2)")
    parser.add_argument("--rounds", type=_positive_int, metavar="N",
                        help="alternating rounds of every configuration for --mpi; the "
                             "ratios are the medians of the rounds' (default 5; --quick 1)")
    return parser


def add_parser(subparsers):
    """Add the ``bench`` subcommand to the ``fastnn`` command's subparsers."""
    parser = subparsers.add_parser(
        "bench", help="benchmark fastnn against numpy and PyTorch on this machine",
        description="Time one training epoch of three reference nets for fastnn (each "
                    "backend), a careful numpy MLP and PyTorch (when installed); print "
                    "seconds/epoch, samples/s, GFLOP/s against this machine's sgemm rate, "
                    "peak RSS, startup time and the speedups.")
    return add_arguments(parser)


def run(args):
    """Run ``fastnn bench`` from parsed arguments; returns the exit code."""
    if args.mpi:
        return _run_mpi(args)
    for flag, value in (("--ranks", args.ranks), ("--rounds", args.rounds)):
        if value is not None:
            print(f"fastnn bench: {flag} applies to --mpi only", file=sys.stderr)
            return 2
    with_torch = machine.torch_available()
    if args.vs_torch and not with_torch:
        print("fastnn bench: --vs-torch needs PyTorch, which is not installed "
              "(pip install torch; fastnn itself never needs it)", file=sys.stderr)
        return 2
    with_torch = with_torch and not args.no_torch
    if args.plot:
        try:
            import_matplotlib()
        except ImportError as exc:
            print(f"fastnn bench: {exc}", file=sys.stderr)
            return 2
    cpus = len(machine.usable_cpus())
    if args.threads is not None and args.threads > cpus:
        print(f"fastnn bench: --threads must be between 1 and {cpus} (usable CPUs), got "
              f"{args.threads}", file=sys.stderr)
        return 2
    if args.threads is not None:
        threads_list = [args.threads]
    else:
        threads_list = [1] if args.quick or cpus == 1 else [1, cpus]
    if args.backends:  # asked for by name: each must load (the workers skip others)
        for name in args.backends:
            try:
                kernels.load(name)
            except ImportError as exc:
                print(f"fastnn bench: {exc}", file=sys.stderr)
                return 2
    backends = [b for b in kernels.BACKENDS if b in (args.backends or kernels.BACKENDS)]
    nets = args.nets or list(QUICK_NETS if args.quick else NETS)
    result = run_suite(nets, backends, threads_list, with_torch, quick=args.quick,
                       samples=args.samples, repeats=args.repeats,
                       startup=not args.no_startup, optimizers=args.optimizers,
                       gemm=not args.no_gemm)
    print(format_report(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot_speedups(result, args.plot)
        print(f"wrote {args.plot}")
    return 1 if result["errors"] else 0


def _run_mpi(args):
    """``fastnn bench --mpi``; returns the exit code."""
    from . import mpi

    unused = [flag for flag, given in (
        ("--plot", args.plot), ("--threads", args.threads), ("--nets", args.nets),
        ("--backends", args.backends), ("--optimizers", args.optimizers != list(OPTIMIZERS)),
        ("--no-startup", args.no_startup), ("--no-gemm", args.no_gemm)) if given]
    if unused:
        print(f"fastnn bench: --mpi does not use {', '.join(unused)} (it trains the "
              f"{mpi.SCALING_NET} net with SGD, 1 thread per process)", file=sys.stderr)
        return 2
    if args.samples is not None and args.samples < mpi.GLOBAL_BATCH:
        print(f"fastnn bench: --samples with --mpi must be at least the global batch, "
              f"{mpi.GLOBAL_BATCH}; got {args.samples}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("mpi4py") is None or mpi.mpiexec() is None:
        print("fastnn bench: --mpi needs mpi4py and mpiexec: pip install 'fastnn[mpi]'",
              file=sys.stderr)
        return 2
    with_torch = machine.torch_available() and not args.no_torch
    if args.vs_torch and not with_torch:
        print("fastnn bench: --vs-torch needs PyTorch, which is not installed", file=sys.stderr)
        return 2
    result = mpi.run_mpi_bench(args.ranks or 2, args.quick, with_torch, _log,
                               rounds=args.rounds, repeats=args.repeats, samples=args.samples)
    print(mpi.format_mpi_report(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if result["errors"] else 0


def main(argv=None):
    """``python -m fastnn.bench``: the same options as ``fastnn bench``."""
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m fastnn.bench",
        description="Benchmark fastnn against numpy and PyTorch on this machine (the same "
                    "program as `fastnn bench`)."))
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--mpi-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mpi_worker:
        from .mpi import worker as mpi_worker

        result = mpi_worker(json.loads(args.mpi_worker))
        if result is not None:
            print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    return run(args)

