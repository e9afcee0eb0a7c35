"""The ``fastnn`` command (also ``python -m fastnn``).

``fastnn train`` with no arguments trains an MLP on the bundled digits and prints the
test accuracy, samples/s and wall time.
"""
import argparse
import contextlib
import functools
import importlib.util
import os
import sys
import time
import warnings

import numpy as np

from . import kernels, losses, optimizers
from ._model_file import check_destination
from ._validation import check_float, check_int
from .solvers import SOLVERS

#: Settings per dataset that train to a good test result with the default network;
#: --epochs, --batch-size and --lr override them.
DATASET_DEFAULTS = {
    "digits": {"epochs": 30, "batch_size": 32, "lr": None},
    "iris": {"epochs": 100, "batch_size": 16, "lr": 0.01},
    "xor": {"epochs": 30, "batch_size": 32, "lr": None},
    "spirals": {"epochs": 100, "batch_size": 16, "lr": 0.01},
    "mnist": {"epochs": 10, "batch_size": 128, "lr": None},
    "csv": {"epochs": 30, "batch_size": 32, "lr": None},
}
ACTIVATIONS = sorted(set(kernels.ACTIVATIONS) - {"step"})


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" for the options whose default is a plain value."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, (bool, list)):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, "<prog>: error: <message>", with exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_hidden(text):
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()] if text.strip() else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden takes comma-separated ints, got {text!r}")
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"--hidden sizes must be >= 1, got {text!r}")
    return sizes


def _parse_number(text, kind, check):
    """``check(kind(text))``, its ValueError turned into argparse's one-line error."""
    try:
        value = kind(text)
    except ValueError:
        expected = "an int" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    try:
        return check(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _int_option(low):
    return functools.partial(_parse_number, kind=int,
                             check=functools.partial(check_int, name="value", low=low))


def _float_option(**bounds):
    return functools.partial(_parse_number, kind=float,
                             check=functools.partial(check_float, name="value", **bounds))


def build_parser():
    from . import bench  # the benchmark program loads with the command line, not with fastnn

    parser = _Parser(prog="fastnn", description="fastnn: fast CPU training of multilayer "
                     "perceptrons. Commands: train (an MLP on a bundled or your data), "
                     "bench (the benchmark suite).")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="train an MLP and report test accuracy and speed",
        description="Train an MLP on a dataset, then report the held-out test loss and "
                    "metric, samples/s and wall time.",
        formatter_class=_HelpFormatter)
    train.add_argument("--dataset", nargs="+", default=["digits"], metavar="NAME [PATH]",
                       help="digits (default), iris, xor, spirals, 'mnist DIR' (IDX files) "
                            "or 'csv FILE' (numeric, last column is the target)")
    train.add_argument("--hidden", type=_parse_hidden, default=[128, 64],
                       help="hidden layer sizes, comma-separated (default: 128,64)")
    train.add_argument("--activation", default="relu", choices=ACTIVATIONS,
                       help="activation of the hidden layers")
    train.add_argument("--loss", default=None, choices=sorted(losses.LOSSES),
                       help="the loss; by default cross_entropy for class labels, mse for "
                            "regression targets")
    train.add_argument("--optimizer", default="adam",
                       choices=sorted(optimizers.OPTIMIZERS) + sorted(SOLVERS),
                       metavar="NAME",
                       help="a first-order optimizer (" + ", ".join(sorted(
                           optimizers.OPTIMIZERS)) + ") or a full-batch solver (" +
                            ", ".join(sorted(SOLVERS)) + ")")
    train.add_argument("--lr", type=_float_option(low=0.0, low_open=True), default=None,
                       help="learning rate (> 0); by default the dataset's (see "
                            "--epochs) or the optimizer's")
    train.add_argument("--epochs", type=_int_option(0), default=None,
                       help="epochs (solvers: iterations); by default per dataset: " +
                            ", ".join(f"{name} {d['epochs']}"
                                      for name, d in DATASET_DEFAULTS.items()))
    train.add_argument("--batch-size", type=_int_option(1), default=None,
                       help="samples per step (ignored by solvers); by default per "
                            "dataset: " + ", ".join(f"{name} {d['batch_size']}"
                                                    for name, d in DATASET_DEFAULTS.items()))
    train.add_argument("--backend", default=None, choices=kernels.BACKENDS,
                       help="kernel backend; by default the fastest that loads")
    train.add_argument("--threads", type=_int_option(1), default=None,
                       help="thread budget, 1 to the number of usable CPUs; by default all")
    train.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                       help="floating-point type of the model")
    train.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                       help="bf16: every Dense product in bfloat16 with float32 "
                            "accumulation (float32 model; AVX512_BF16 on the compiled "
                            "backends; first-order optimizers only)")
    train.add_argument("--seed", type=_int_option(0), default=0,
                       help="seed of the split, the initial weights and the shuffling")
    train.add_argument("--test-size", type=_float_option(low=0.0, high=1.0, low_open=True,
                                                         high_open=True), default=0.25,
                       help="fraction of the data held out for testing, in (0, 1)")
    train.add_argument("--save", default=None, metavar="PATH", help="save the model (.npz)")
    train.add_argument("--plot", default=None, metavar="PNG",
                       help="save the training and test curves (needs matplotlib)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.add_parser(sub)
    return parser


def load_dataset(spec):
    """(X, y, is_classification) for a --dataset spec; ValueError or OSError naming the
    dataset or file for a bad one."""
    from . import datasets

    name, rest = spec[0], spec[1:]
    if name not in DATASET_DEFAULTS:
        raise ValueError(f"unknown dataset {name!r}; choose digits, iris, xor, spirals, "
                         "mnist DIR or csv FILE")
    if name in ("mnist", "csv") and len(rest) != 1:
        raise ValueError(f"--dataset {name} needs a path: --dataset {name} PATH")
    if name not in ("mnist", "csv") and rest:
        raise ValueError(f"--dataset {name} takes no path")
    if name == "digits":
        X, y = datasets.load_digits(scale=True)
    elif name == "iris":
        X, y = datasets.load_iris()
        X = (X - X.mean(axis=0)) / X.std(axis=0)
    elif name == "xor":
        X, y = datasets.xor()
        X, y = np.tile(X, (64, 1)), np.tile(y, 64)
    elif name == "spirals":
        X, y = datasets.spirals(seed=0)
    elif name == "mnist":
        X, y = datasets.load_mnist(rest[0], kind="train")
    else:
        return _load_csv(rest[0])
    return X, y, True


def _load_csv(path):
    """A numeric CSV table: header rows skipped, the last column is the target (class
    labels when they are integers in [0, n_rows), else regression values)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--dataset csv: {path!r} is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Empty input file": see below
            table = np.genfromtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except UnicodeDecodeError:
        raise ValueError(f"--dataset csv: {path!r} is not a text file (binary data?)") from None
    except ValueError as exc:
        raise ValueError(f"--dataset csv: {path!r} is not a numeric table: {exc}") from None
    if table.size == 0:
        raise ValueError(f"--dataset csv: {path!r} has no data")
    if table.shape[1] < 2:
        raise ValueError(f"--dataset csv: {path!r}: expected a numeric table with >= 2 "
                         f"columns, got {table.shape[1]}")
    table = table[~np.isnan(table).all(axis=1)]  # a header row parses as NaN
    if table.shape[0] < 2:
        raise ValueError(f"--dataset csv: {path!r} has {table.shape[0]} numeric rows; "
                         "need at least 2")
    bad_rows = np.flatnonzero(~np.isfinite(table).all(axis=1))
    if bad_rows.size:
        raise ValueError(f"--dataset csv: {path!r}: row {bad_rows[0] + 1} of the numeric "
                         "rows has a missing, non-numeric or infinite value")
    X, target = table[:, :-1], table[:, -1]
    is_labels = (np.array_equal(target, np.round(target)) and target.min() >= 0
                 and target.max() < len(target))
    return X, (target.astype(np.int64) if is_labels else target), is_labels


def train(args):
    """``fastnn train``. A user error (a bad data file, a setting the data cannot take, a
    backend that does not load, a --save path that cannot be written) exits with
    status 2 and one line on stderr, "fastnn train: error: ...", as argparse's do."""
    try:
        return _train(args)
    except (ValueError, OSError, ImportError) as exc:
        message = " ".join(str(exc).split())
        print(f"fastnn train: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def _train(args):
    import fastnn as fn

    if args.save:
        check_destination(args.save)
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            raise ImportError("--plot needs matplotlib: pip install 'fastnn[plot]'")
        _check_plot_path(args.plot)
    backend = fn.use_backend(args.backend) if args.backend else contextlib.nullcontext()
    # Under mpiexec every rank trains (fit(distributed=True)); only rank 0 prints
    # (print() writes nothing while sys.stdout is None) and saves.
    quiet = contextlib.nullcontext() if fn.distributed.is_main() else \
        contextlib.redirect_stdout(None)
    with backend, quiet:
        if args.threads is not None:
            try:
                fn.set_num_threads(args.threads)
            except ValueError as exc:
                raise ValueError(f"--threads: {exc}") from None
        return _run(fn, args)


def _check_plot_path(path):
    """Refuse a --plot path that cannot be written, before training starts."""
    if os.path.isdir(path):
        raise ValueError(f"--plot: {path!r} is a directory; give a file name such as "
                         "curves.png")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"--plot: cannot write {path!r}: there is no directory "
                         f"{directory!r}")
    if not os.access(directory, os.W_OK):
        raise ValueError(f"--plot: cannot write {path!r}: the directory {directory!r} is "
                         "not writable")


def _run(fn, args):
    X, y, is_classification = load_dataset(args.dataset)
    loss = args.loss or ("cross_entropy" if is_classification else "mse")
    regression = not losses.LOSSES[loss].classification
    if not regression and not is_classification:
        raise ValueError(f"--loss {loss} needs class labels 0..n-1 (n samples) in the target "
                         f"column; --dataset {' '.join(args.dataset)} has regression targets")
    if loss == "binary_cross_entropy":
        if y.max() > 1:
            raise ValueError("--loss binary_cross_entropy needs 0/1 labels")
        y = y.astype(np.float64)
    n_out = 1 if (regression or loss == "binary_cross_entropy") else int(y.max()) + 1
    split = fn.datasets.train_test_split(X, y, test_size=args.test_size, seed=args.seed,
                                         stratify=not regression)
    X_train, X_test, y_train, y_test = split
    sizes = [X.shape[1]] + args.hidden + [n_out]
    layers = [fn.Dense(sizes[i], sizes[i + 1],
                       activation=args.activation if i < len(sizes) - 2 else None,
                       dtype=args.dtype, seed=args.seed + i)
              for i in range(len(sizes) - 1)]
    model = fn.Sequential(layers)
    optimizer = fn.optimizers.get(args.optimizer)
    defaults = DATASET_DEFAULTS[args.dataset[0]]
    solver = isinstance(optimizer, fn.solvers.Solver)
    lr = args.lr if args.lr is not None else None if solver else defaults["lr"]
    if lr is not None:
        if not hasattr(optimizer, "lr"):
            raise ValueError(f"--lr: the solver {args.optimizer} takes no learning rate")
        optimizer.lr = lr
    epochs = defaults["epochs"] if args.epochs is None else args.epochs
    batch_size = defaults["batch_size"] if args.batch_size is None else args.batch_size
    metrics = ["r2"] if regression else ["accuracy"]
    model.compile(loss=loss, optimizer=optimizer, metrics=metrics, precision=args.precision)
    print(f"fastnn {fn.__version__} | backend {fn.get_backend()} | threads "
          f"{fn.get_num_threads()} | {args.dtype}"
          + (" | bf16 products" if args.precision == "bf16" else ""))
    print(f"data {args.dataset[0]}: {X_train.shape[0]} train / {X_test.shape[0]} test samples, "
          f"{X.shape[1]} features")
    print(f"model {'-'.join(map(str, sizes))} ({args.activation}), {model.n_params:,} "
          f"params, loss {loss}, optimizer {optimizer!r}")
    start = time.perf_counter()
    history = model.fit(X_train, y_train, epochs=epochs, batch_size=batch_size,
                        verbose=0 if args.quiet else 1, seed=args.seed,
                        distributed=fn.distributed.launched(),
                        validation_data=(X_test, y_test) if args.plot else None)
    seconds = time.perf_counter() - start
    result = model.evaluate(X_test, y_test)
    metric = metrics[0]
    done = len(history.epoch)
    if solver:
        speed = f" ({history.n_evaluations} loss+gradient evaluations)"
    else:
        speed = (f" ({X_train.shape[0] * done / seconds:,.0f} samples/s)"
                 if done and seconds > 0 else "")
    final = f"; final train loss {history.history['loss'][-1]:.4f}" if done else ""
    print(f"trained {done} {history.unit}s in {seconds:.2f} s{speed}{final}")
    if solver:
        print(f"stopped: {history.stop_reason}")
    print(f"test loss {result['loss']:.4f} | test {metric} {result[metric]:.4f}")
    if args.save and fn.distributed.is_main():
        model.save(args.save)
        print(f"saved model to {args.save}")
    if args.plot:
        title = (f"{' '.join(args.dataset)}: {'-'.join(map(str, sizes))} {args.activation} "
                 f"MLP, {loss}, {args.optimizer} (test set as val_*)")
        history.plot(args.plot, title=title)
        print(f"saved training and test curves to {args.plot}")
    return 0


def main(argv=None):
    from . import bench

    args = build_parser().parse_args(argv)
    commands = {"train": train, "bench": bench.run}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
