"""The ``fastnn`` command (also ``python -m fastnn``).

``fastnn train`` with no arguments trains an MLP on the bundled digits and prints the
test accuracy, samples/s and wall time.
"""
import argparse
import sys
import time

import numpy as np

CLASSIFICATION_LOSSES = ("cross_entropy", "hinge", "binary_cross_entropy")


def _parse_hidden(text):
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()] if text.strip() else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden takes comma-separated ints, got {text!r}")
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"--hidden sizes must be >= 1, got {text!r}")
    return sizes


def build_parser():
    from . import bench  # the benchmark program loads with the command line, not with fastnn

    parser = argparse.ArgumentParser(prog="fastnn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train an MLP and report test accuracy and speed")
    train.add_argument("--dataset", nargs="+", default=["digits"], metavar="NAME [PATH]",
                       help="digits (default), iris, xor, spirals, 'mnist DIR' (IDX files) "
                            "or 'csv FILE' (numeric, last column is the target)")
    train.add_argument("--hidden", type=_parse_hidden, default=[128, 64],
                       help="hidden layer sizes, e.g. 128,64 (default)")
    train.add_argument("--activation", default="relu", help="hidden activation (relu)")
    train.add_argument("--loss", default=None,
                       help="cross_entropy (default for classification data), hinge, mse, "
                            "mae, huber, binary_cross_entropy")
    train.add_argument("--optimizer", default="adam", help="sgd, momentum, nesterov, "
                       "adagrad, rmsprop, adam (default), adamw")
    train.add_argument("--lr", type=float, default=None, help="learning rate")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--backend", default=None, help="numba, cython or numpy")
    train.add_argument("--threads", type=int, default=None)
    train.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--test-size", type=float, default=0.25)
    train.add_argument("--save", default=None, metavar="PATH", help="save the model (.npz)")
    train.add_argument("--plot", default=None, metavar="PNG",
                       help="save the training curves (needs matplotlib)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.add_parser(sub)
    return parser


def load_dataset(spec):
    """(X, y, is_classification) for a --dataset spec."""
    from . import datasets

    name, rest = spec[0], spec[1:]
    if name in ("mnist", "csv") and len(rest) != 1:
        raise SystemExit(f"--dataset {name} needs a path: --dataset {name} PATH")
    if name not in ("mnist", "csv") and rest:
        raise SystemExit(f"--dataset {name} takes no path")
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
    elif name == "csv":
        table = np.genfromtxt(rest[0], delimiter=",", dtype=np.float64)
        if table.ndim != 2 or table.shape[1] < 2:
            raise SystemExit(f"{rest[0]}: expected a numeric table with >= 2 columns")
        table = table[~np.isnan(table).all(axis=1)]  # a header row parses as NaN
        X, target = table[:, :-1], table[:, -1]
        is_labels = np.array_equal(target, np.round(target)) and target.min() >= 0
        return X, (target.astype(np.int64) if is_labels else target), is_labels
    else:
        raise SystemExit(f"unknown dataset {name!r}; choose digits, iris, xor, spirals, "
                         "mnist DIR or csv FILE")
    return X, y, True


def train(args):
    import fastnn as fn

    if args.backend:
        fn.set_backend(args.backend)
    if args.threads:
        fn.set_num_threads(args.threads)
    X, y, is_classification = load_dataset(args.dataset)
    loss = args.loss or ("cross_entropy" if is_classification else "mse")
    regression = loss not in CLASSIFICATION_LOSSES
    if loss == "binary_cross_entropy":
        if not is_classification or y.max() > 1:
            raise SystemExit("binary_cross_entropy needs 0/1 labels")
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
    if args.lr is not None:
        optimizer.lr = args.lr
    metrics = ["r2"] if regression else ["accuracy"]
    model.compile(loss=loss, optimizer=optimizer, metrics=metrics)
    print(f"fastnn {fn.__version__} | backend {fn.get_backend()} | threads "
          f"{fn.get_num_threads()} | {args.dtype}")
    print(f"data {args.dataset[0]}: {X_train.shape[0]} train / {X_test.shape[0]} test samples, "
          f"{X.shape[1]} features")
    print(f"model {'-'.join(map(str, sizes))} ({args.activation}), {model.n_params:,} "
          f"params, loss {loss}, optimizer {optimizer!r}")
    start = time.perf_counter()
    history = model.fit(X_train, y_train, epochs=args.epochs, batch_size=args.batch_size,
                        verbose=0 if args.quiet else 1, seed=args.seed)
    seconds = time.perf_counter() - start
    result = model.evaluate(X_test, y_test)
    metric = metrics[0]
    samples = X_train.shape[0] * len(history.epoch)
    print(f"trained {len(history.epoch)} epochs in {seconds:.2f} s "
          f"({samples / seconds:,.0f} samples/s); final train loss {history.history['loss'][-1]:.4f}")
    print(f"test loss {result['loss']:.4f} | test {metric} {result[metric]:.4f}")
    if args.save:
        model.save(args.save)
        print(f"saved model to {args.save}")
    if args.plot:
        history.plot(args.plot)
        print(f"saved training curves to {args.plot}")
    return 0


def main(argv=None):
    from . import bench

    args = build_parser().parse_args(argv)
    commands = {"train": train, "bench": bench.run}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
