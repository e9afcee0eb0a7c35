"""Kernel benchmarks: thread budget, backend fixture, tolerances and machine info.

Run ``pytest bench/ --benchmark-only`` (all usable CPUs) or, for the 1-thread
headline, ``taskset -c 0 pytest bench/ --benchmark-only``. ``--bench-threads N`` sets
the thread budget (BLAS and kernels, through ``fastnn.set_num_threads``).
"""
import numpy as np
import pytest

import fastnn
from fastnn import kernels
from fastnn.bench import machine

def pytest_addoption(parser):
    parser.addoption("--bench-threads", type=int, default=None,
                     help="thread budget of the kernel benchmarks (default: usable CPUs)")


def pytest_configure(config):
    threads = config.getoption("--bench-threads") or len(machine.usable_cpus())
    fastnn.set_num_threads(threads)
    config._fastnn_bench_threads = threads


def pytest_report_header(config):
    return (f"fastnn kernel benchmarks: {config._fastnn_bench_threads} thread(s), "
            f"backends {kernels.available_backends()}")


def pytest_benchmark_update_machine_info(config, machine_info):
    info = machine.machine_info()
    machine_info["fastnn"] = dict(info, threads=config._fastnn_bench_threads,
                                  backends=kernels.available_backends())


@pytest.fixture(params=kernels.BACKENDS)
def backend(request):
    """Each backend module; a backend that cannot load here is skipped (the test suite
    in tests/ is where a broken backend goes red)."""
    try:
        return kernels.load(request.param)
    except ImportError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def oracle():
    return kernels.load("numpy")


@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def dtype(request):
    return np.dtype(request.param)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Keep the statistics, drop the per-round timings (hundreds of MB for a full run)."""
    for bench in output_json["benchmarks"]:
        bench["stats"].pop("data", None)
