"""Kernel speedups vs ``_numpy`` from a pytest-benchmark JSON of bench/:

    taskset -c 0 pytest bench/ --benchmark-only --benchmark-json=kernels.json
    python bench/kernel_table.py kernels.json                 # every case
    python bench/kernel_table.py kernels.json --slower        # only those not faster

One row per kernel x shape x dtype: the numpy backend's median time and each compiled
backend's speedup t_numpy / t_backend (> 1: faster than numpy), from medians measured
in the same run. A footer counts, per backend, the cases that are not faster.
"""
import argparse
import json
import sys

#: The compiled backends, each compared with the numpy reference.
COMPILED = ("cython", "numba")


def load_medians(path):
    """{(kernel, shape, dtype): {backend: median seconds}} from a pytest-benchmark JSON."""
    with open(path) as f:
        data = json.load(f)
    cases = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        key = (info["kernel"], info["shape"], info["dtype"])
        cases.setdefault(key, {})[info["backend"]] = bench["stats"]["median"]
    return cases, data.get("machine_info", {}).get("fastnn", {})


def speedup_rows(cases, backends=COMPILED):
    """(kernel, shape, dtype, numpy seconds, {backend: speedup}) for the cases timed on
    numpy, in the order the benchmarks ran."""
    rows = []
    for (kernel, shape, dtype), times in cases.items():
        base = times.get("numpy")
        if base is None:
            continue
        rows.append((kernel, shape, dtype, base,
                     {b: base / times[b] for b in backends if b in times}))
    return rows


def _seconds(s):
    return f"{s * 1e6:,.1f} us" if s < 1e-3 else f"{s * 1e3:,.2f} ms"


def format_table(rows, backends=COMPILED, slower_only=False):
    header = ("kernel", "shape", "dtype", "numpy") + tuple(f"{b}/numpy" for b in backends)
    body = []
    for kernel, shape, dtype, base, ratios in rows:
        if slower_only and all(ratios.get(b, 0.0) > 1.0 for b in backends):
            continue
        body.append((kernel, shape, dtype, _seconds(base)) + tuple(
            f"{ratios[b]:.2f}x" if b in ratios else "-" for b in backends))
    widths = [max(len(c) for c in col) for col in zip(header, *body)] if body else \
        [len(h) for h in header]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) if i < 3 else c.rjust(w)
                                for i, (c, w) in enumerate(zip(row, widths))) + " |"
              for row in body]
    for b in backends:
        timed = [r for r in rows if b in r[4]]
        slower = [r for r in timed if r[4][b] <= 1.0]
        lines.append(f"{b}: {len(slower)} of {len(timed)} cases not faster than numpy")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json) of bench/")
    parser.add_argument("--slower", action="store_true",
                        help="only the cases where a compiled backend is not faster")
    parser.add_argument("--kernel", action="append", metavar="NAME",
                        help="only this kernel (repeatable)")
    args = parser.parse_args(argv)
    cases, info = load_medians(args.json)
    rows = speedup_rows(cases)
    if args.kernel:
        rows = [r for r in rows if r[0] in args.kernel]
    if info:
        print(f"{info.get('cpu', '?')}, {info.get('threads', '?')} thread(s); "
              f"numpy {info['versions'].get('numpy')}, numba {info['versions'].get('numba')}")
    print(format_table(rows, slower_only=args.slower))
    return 0


if __name__ == "__main__":
    sys.exit(main())
