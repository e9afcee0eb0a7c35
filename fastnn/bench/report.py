"""The ``fastnn bench`` report: the printed tables and notes, and the speedup plot."""
import math

from ..kernels import BACKENDS
from .baselines import WARMUP_BATCHES, impl_label

#: A configuration whose slowest timed epoch exceeds its fastest by this factor is
#: flagged in the notes: on a VM whose vCPUs are not always scheduled, its median may
#: not be typical.
UNEVEN_SPREAD = 1.25
#: The baselines of the speedups (impl -> what the report and the plot call it).
BASELINE_NAMES = {"numpy": "numpy MLP (hand-written baseline)", "torch": "PyTorch (eager, CPU)"}


def speedups(result):
    """One row per (threads, workload, fastnn backend, baseline): the speedup
    t_baseline / t_fastnn (> 1: fastnn is faster); ``baseline`` is a key of
    BASELINE_NAMES."""
    seconds = {(r["threads"], r["net"], r["batch"], r["optimizer"], r["impl"], r["backend"]):
               r["seconds_per_epoch"] for r in result["training"] if r.get("error") is None}
    rows = []
    for (threads, net, batch, optimizer, impl, backend), t in seconds.items():
        if impl != "fastnn":
            continue
        for baseline in BASELINE_NAMES:
            t_base = seconds.get((threads, net, batch, optimizer, baseline, None))
            if t_base is not None:
                rows.append({"threads": threads, "net": net, "batch": batch,
                             "optimizer": optimizer, "backend": backend,
                             "baseline": baseline, "speedup": t_base / t})
    return rows


def threads_label(n):
    """"1 thread", "2 threads"."""
    return f"{n} thread{'' if n == 1 else 's'}"


def _threads_title(threads, records):
    cpus = next((r.get("cpus") for r in records if r.get("cpus")), None)
    where = f", pinned to CPU {cpus[0]}" if threads == 1 and cpus else \
        (f", CPUs {','.join(map(str, cpus))}" if cpus else ", unpinned")
    return threads_label(threads) + where


def format_report(result):
    """The printed report: machine, roofline, per-implementation table, speedups."""
    m = result["machine"]
    v = m["versions"]
    lines = [f"fastnn {v['fastnn']} benchmark — {m['cpu']}, {m['usable_cpus']} usable of "
             f"{m['logical_cpus']} logical CPUs; python {m['python']}, numpy {v['numpy']}, "
             f"scipy {v['scipy']}, numba {v['numba']}, torch {v['torch'] or 'not installed'}"]
    if m["blas"]:
        lines.append("BLAS: " + "; ".join(f"{b['internal_api']} {b['version']} "
                                          f"({b['architecture']})" for b in m["blas"]))
    lines += [_roofline_line(int(threads), roof)
              for threads, roof in result["roofline"].items()]
    lines += [_bf16_gemm_line(int(threads), roof)
              for threads, roof in result["roofline"].items() if roof.get("bf16_gemm")]
    if result.get("gemm"):
        lines += ["", "== GEMM crossover, float32, 1 thread pinned: GFLOP/s of one product "
                      "(own kernel forced, OpenBLAS forced, numpy.matmul) and the path "
                      "'auto' picks =="]
        lines += _gemm_table(result["gemm"])
    ratios = speedups(result)
    for threads in result["settings"]["threads"]:
        records = [r for r in result["training"] if r["threads"] == threads]
        if not records:
            continue
        lines += ["", f"== One training epoch, float32, {_threads_title(threads, records)} =="]
        lines += _detail_table(records)
        for baseline, name in BASELINE_NAMES.items():
            rows = [r for r in ratios if (r["threads"], r["baseline"]) == (threads, baseline)]
            if rows:
                lines += ["", f"== Speedup of fastnn over {name}, "
                              f"{threads_label(threads)}: t_baseline / t_fastnn "
                              "(> 1 = fastnn faster) =="]
                lines += _ratio_table(rows, result["settings"]["backends"])
        lines += _bf16_table(result, threads)
    if result["startup"]:
        lines += ["", "== Startup: import fastnn + load backend + first training step "
                      "(fresh interpreter, 1 CPU) =="]
        lines += _startup_table(result["startup"])
    lines += [""] + _notes(result)
    return "\n".join(lines)


def _roofline_line(threads, roof):
    what = f"sgemm roofline, {threads_label(threads)}"
    if roof.get("error"):
        return f"{what}: error"
    bf16 = (f"; vdpbf16ps peak {roof['bf16_peak']:.1f} GFLOP/s (fastnn's bf16 register "
            f"tile, L1-resident, best of the runs)" if roof.get("bf16_peak") else "")
    own = "" if roof.get("fastnn") is None else f", fastnn's own {roof['fastnn']:.1f}"
    return (f"{what}: {roof['roofline']:.1f} GFLOP/s (scipy sgemm {roof['scipy']:.1f}, "
            f"numpy matmul {roof['numpy']:.1f}{own}; {roof['size']}^3, median){bf16}")


def _bf16_gemm_line(threads, roof):
    shapes = ", ".join(f"{name} {rate:.0f} ({100 * rate / roof['bf16_peak']:.0f} %)"
                       for name, rate in roof["bf16_gemm"].items())
    return (f"bf16 GEMM, {threads_label(threads)}, GFLOP/s and % of the vdpbf16ps peak "
            f"(best of the runs, interleaved with the peak's): {shapes}")


def _table(header, rows, align):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:{a}{w}}}" for a, w in zip(align, widths))
    out = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    out += [fmt.format(*map(str, row)) for row in rows]
    return out


def _detail_table(records):
    """One row per implementation, the implementations of a workload together."""
    header = ("net", "batch", "opt", "impl", "s/epoch", "samples/s", "GFLOP/s", "%sgemm",
              "%matmuls", "RSS MB", "loss")
    workloads = list(dict.fromkeys((r["net"], r["batch"], r["optimizer"]) for r in records))
    impls = [impl_label("fastnn", b) for b in BACKENDS] + \
        [impl_label("fastnn-bf16", "cython")] + \
        [impl_label(impl) for impl in ("numpy", "torch", "torch-bf16", "matmuls")]
    records = sorted(records, key=lambda r: (
        workloads.index((r["net"], r["batch"], r["optimizer"])), impls.index(r["label"])))
    matmuls = {(r["net"], r["batch"], r["optimizer"]): r["seconds_per_epoch"]
               for r in records if r["label"] == "matmuls" and not r.get("error")}
    rows, previous = [], None
    for r in records:
        key = (r["net"], r["batch"], r["optimizer"])
        lead = key if key != previous else ("", "", "")
        previous = key
        if r.get("error"):
            cells = ("error",) + ("",) * 6
        else:
            pct = r.get("roofline_pct")
            t_matmuls = matmuls.get(key)
            cells = (f"{r['seconds_per_epoch']:.3f}", f"{r['samples_per_s']:,.0f}",
                     f"{r['gflop_per_s']:.1f}", "" if pct is None else f"{pct:.0f}%",
                     "" if t_matmuls is None else
                     f"{100 * t_matmuls / r['seconds_per_epoch']:.0f}%",
                     f"{r.get('peak_rss_mb', 0):.0f}",
                     "-" if math.isnan(r["loss"]) else f"{r['loss']:.4f}")
        rows.append(lead + (r["label"],) + cells)
    return _table(header, rows, "<><<>>>>>>>")


def _bf16_table(result, threads):
    """Speedups of fastnn[cython] bf16 over fastnn[cython] (float32) and over torch
    autocast-bf16, per workload (empty without bf16 rows)."""
    seconds = {}
    for r in result["training"]:
        if (r["threads"] == threads and r.get("error") is None
                and (r.get("impl") in ("fastnn-bf16", "torch-bf16")
                     or (r.get("impl"), r.get("backend")) == ("fastnn", "cython"))):
            seconds[(r["net"], r["batch"], r["optimizer"], r["impl"])] = r["seconds_per_epoch"]
    rows = []
    for (net, batch, optimizer, impl), t in seconds.items():
        if impl == "fastnn-bf16":
            rows.append((net, batch, optimizer) + tuple(
                f"{seconds[(net, batch, optimizer, base)] / t:.2f}x"
                if (net, batch, optimizer, base) in seconds else "-"
                for base in ("fastnn", "torch-bf16")))
    if not rows:
        return []
    return ["", f"== Speedup of fastnn[cython] bf16, {threads_label(threads)}: t_baseline "
                "/ t_bf16 =="] + _table(("net", "batch", "opt", "vs fastnn[cython] fp32",
                                        "vs torch autocast-bf16"), rows, "<><>>")


def _gemm_table(records):
    """The GEMM crossover table (own / BLAS > 1: the own kernel is faster)."""
    own = records[0]["own_path"]
    header = ("product", "m", "n", "k", f"own ({own})", "OpenBLAS", "numpy", "own/BLAS",
              "auto picks")
    rows = [(r["shape"], r["m"], r["n"], r["k"],
             "-" if r["own"] is None else f"{r['own']:.1f}", f"{r['blas']:.1f}",
             f"{r['numpy']:.1f}", "-" if r["own"] is None else f"{r['own'] / r['blas']:.2f}x",
             r["chosen"]) for r in records]
    return _table(header, rows, "<>>>>>>><")


def _ratio_table(rows, backends):
    """Speedups over one baseline: a row per workload, a column per fastnn backend."""
    header = ("net", "batch", "opt") + tuple(impl_label("fastnn", b) for b in backends)
    cells = {}
    for r in rows:
        cells.setdefault((r["net"], r["batch"], r["optimizer"]), {})[r["backend"]] = \
            r["speedup"]
    table = [key + tuple(f"{speedup[b]:.2f}x" if b in speedup else "-" for b in backends)
             for key, speedup in cells.items()]
    return _table(header, table, "<><" + ">" * len(backends))


def _startup_table(records):
    header = ("backend", "numba cache", "import fastnn", "load backend", "first step",
              "total", "process")
    rows = []
    for r in records:
        if r.get("error"):
            rows.append((r["backend"], r["state"], "error", "", "", "", ""))
        else:
            rows.append((r["backend"], r["state"], f"{r['import_s']:.2f} s",
                         f"{r['backend_s']:.2f} s", f"{r['first_step_s']:.3f} s",
                         f"{r['total_s']:.2f} s", f"{r['process_s']:.2f} s"))
    return _table(header, rows, "<<>>>>>")


def _notes(result):
    s = result["settings"]
    notes = ["Notes:",
             "- fastnn: Sequential.fit(epochs=1, shuffle=True, seed=0), its fused train_epoch "
             f"path, after a warm-up fit on {WARMUP_BATCHES} batches; "
             f"{BASELINE_NAMES['numpy']}: NumpyMLP (fastnn.bench.baselines), preallocated "
             "buffers, in-place ops, float32; all start from the same weights and batch order.",
             "- s/epoch: median of the repeats; GFLOP/s counts the matmuls (2ndk forward, "
             "2ndk dW, 2ndk dx but the first layer); %sgemm: of the roofline above.",
             "- matmuls: only the epoch's matmuls, at the net's shapes, through scipy's "
             "sgemm on preallocated buffers, called from Python (a few us of call "
             "overhead each, which dominates on small nets); %matmuls: its time over "
             "the row's time.",
             "- RSS MB: peak resident set of the configuration's process (data included)."]
    if s["torch"]:
        notes.append("- torch: eager CPU (nn.Sequential, CrossEntropyLoss, torch.optim), "
                     "included because it is importable (--no-torch leaves it out).")
    else:
        notes.append("- torch: not included (not installed, or --no-torch): "
                     "pip install torch adds its rows and speedups.")
    if any(r.get("impl") in ("fastnn-bf16", "torch-bf16") for r in result["training"]):
        notes.append("- bf16 rows (where the CPU has AVX512_BF16): fastnn compiled with "
                     "precision='bf16' (every Dense product in bfloat16, float32 "
                     "accumulation, float32 master weights); torch with its forward and "
                     "loss under torch.autocast('cpu', dtype=torch.bfloat16). GFLOP/s and "
                     "%sgemm count the same matmuls against the float32 roofline.")
    if s["quick"]:
        notes.append("- --quick: fewer samples, nets and repeats, 1 thread unless --threads; "
                     "startup of the default backend, warm only. `fastnn bench` runs the "
                     "full suite.")
    uneven = [r for r in result["training"] if r.get("error") is None
              and max(r["seconds"]) > UNEVEN_SPREAD * min(r["seconds"])]
    if uneven:
        notes.append(
            f"- uneven epochs (slowest > {UNEVEN_SPREAD}x the fastest: the machine was "
            "busy elsewhere or a vCPU was descheduled; rerun these to confirm): " +
            "; ".join(f"{threads_label(r['threads'])} {r['net']} b{r['batch']} "
                      f"{r['optimizer']} {r['label']} "
                      f"{min(r['seconds']):.3f}-{max(r['seconds']):.3f} s" for r in uneven))
    for reason in result.get("skipped", ()):
        notes.append(f"- skipped: {reason}")
    for error in result["errors"]:
        notes.append(f"- ERROR {error}")
    return notes


def plot_speedups(result, path):
    """Bar chart of the speedups (one panel per thread count and baseline) to ``path``."""
    speedup_figure(result).savefig(path, dpi=120)


def speedup_figure(result):
    """The speedups as a matplotlib Figure: a panel per thread count and baseline, a bar
    per workload and fastnn backend growing from 1x (up: fastnn faster), labelled with
    its value, on a log axis (digits' 40x and MNIST's 1.1x read on one scale)."""
    import_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = speedups(result)
    panels = sorted({(r["threads"], r["baseline"]) for r in rows})
    backends = result["settings"]["backends"]
    workloads = list(dict.fromkeys((r["net"], r["batch"], r["optimizer"]) for r in rows))
    fig = Figure(figsize=(max(6, 1.1 * len(workloads) + 2), 3.4 * max(len(panels), 1)))
    axes = fig.subplots(max(len(panels), 1), 1, squeeze=False)[:, 0]
    width = 0.8 / max(len(backends), 1)
    for ax, (threads, baseline) in zip(axes, panels):
        ax.set_yscale("log")
        for j, backend in enumerate(backends):
            values = {(r["net"], r["batch"], r["optimizer"]): r["speedup"] for r in rows
                      if (r["threads"], r["baseline"], r["backend"]) ==
                      (threads, baseline, backend)}
            shown = [(i, values[w]) for i, w in enumerate(workloads) if w in values]
            xs = [i + (j - (len(backends) - 1) / 2) * width for i, _ in shown]
            # From 1x, so a slowdown points down: height v - 1 spans 1 .. v.
            bars = ax.bar(xs, [v - 1 for _, v in shown], width, bottom=1.0,
                          label=impl_label("fastnn", backend))
            ax.bar_label(bars, labels=[_speedup_text(v) for _, v in shown], fontsize=7,
                         padding=2)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.margins(y=0.3)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(workloads)))
        ax.set_xlim(-0.5, len(workloads) - 0.5)  # a workload with no bars keeps its slot
        ax.set_xticklabels([f"{n}\nb{b} {o}" for n, b, o in workloads], fontsize=8)
        ax.set_ylabel("speedup (log scale)")
        ax.set_title(f"fastnn vs {BASELINE_NAMES[baseline]}, {threads_label(threads)} "
                     "(> 1: fastnn faster)", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"fastnn bench — {result['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    return fig


def _speedup_text(speedup):
    return f"{speedup:.2f}x" if speedup < 10 else f"{speedup:.1f}x"


def import_matplotlib():
    """matplotlib, or an ImportError that says how to install it."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install 'fastnn[plot]'") from exc
    return matplotlib

