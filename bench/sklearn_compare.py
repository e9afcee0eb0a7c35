"""fastnn.sklearn's MLPs against sklearn.neural_network's, with the same hyperparameters.

On sklearn's bundled datasets (digits, breast_cancer, wine, iris: MLPClassifier;
diabetes: MLPRegressor), each of 5 seeds splits the data 75/25 (stratified for the
classifiers), standardizes X (and the regression target) on the training part, and
fits both estimators with the same parameters and random_state: a 128-64 relu network,
Adam at 1e-3, batch 32, exactly ``--epochs`` epochs (n_iter_no_change = epochs, so no
early stop cuts either run short). fastnn trains in float32 (its default), sklearn in
float64 (its default for float64 input). Reports test accuracy (R² for diabetes), mean
over the seeds, and the median fit time at 1 thread (BLAS limited by threadpoolctl,
fastnn with n_threads=1) over the seeds times ``--repeats`` fits of each (the two
estimators alternating, so a busy spell on a shared machine hits both); run it pinned
for a clean 1-core figure:

    taskset -c 0 python bench/sklearn_compare.py [--epochs 30] [--seeds 5] [--repeats 1]
                                                 [--json PATH]
"""
import argparse
import json
import statistics
import time
import warnings

import numpy as np
from sklearn import datasets, neural_network
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import fastnn
import fastnn.sklearn

DATASETS = {
    "digits": (datasets.load_digits, "classifier"),
    "breast_cancer": (datasets.load_breast_cancer, "classifier"),
    "wine": (datasets.load_wine, "classifier"),
    "iris": (datasets.load_iris, "classifier"),
    "diabetes": (datasets.load_diabetes, "regressor"),
}


def params(epochs, seed):
    return dict(hidden_layer_sizes=(128, 64), solver="adam", batch_size=32,
                learning_rate_init=1e-3, max_iter=epochs, n_iter_no_change=epochs,
                random_state=seed)


def split(loader, kind, seed):
    X, y = loader(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.25, random_state=seed, stratify=y if kind == "classifier" else None)
    scaler = StandardScaler().fit(X_train)
    X_train, X_test = scaler.transform(X_train), scaler.transform(X_test)
    if kind == "regressor":
        mean, std = y_train.mean(), y_train.std()
        y_train, y_test = (y_train - mean) / std, (y_test - mean) / std
    return X_train, X_test, y_train, y_test


def timed_fit(estimator, X, y):
    start = time.perf_counter()
    estimator.fit(X, y)
    return time.perf_counter() - start


def compare(name, epochs, seeds, repeats):
    loader, kind = DATASETS[name]
    ours_cls = getattr(fastnn.sklearn, "MLP" + kind.capitalize())
    theirs_cls = getattr(neural_network, "MLP" + kind.capitalize())
    result = {"dataset": name, "metric": "accuracy" if kind == "classifier" else "R2",
              "fastnn_score": [], "sklearn_score": [], "fastnn_s": [], "sklearn_s": []}
    # Warm-up: the first fit compiles fastnn's kernels for these shapes (Numba JIT).
    X_train, _, y_train, _ = split(loader, kind, 0)
    ours_cls(**params(1, 0), n_threads=1).fit(X_train, y_train)
    for seed in range(seeds):
        X_train, X_test, y_train, y_test = split(loader, kind, seed)
        for _ in range(repeats):
            ours = ours_cls(**params(epochs, seed), n_threads=1)
            theirs = theirs_cls(**params(epochs, seed))
            result["fastnn_s"].append(timed_fit(ours, X_train, y_train))
            result["sklearn_s"].append(timed_fit(theirs, X_train, y_train))
        result["fastnn_score"].append(ours.score(X_test, y_test))
        result["sklearn_score"].append(theirs.score(X_test, y_test))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1,
                        help="fits per seed and estimator (the time is their median)")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    warnings.simplefilter("ignore", ConvergenceWarning)
    results = []
    print(f"{args.epochs} epochs, 128-64 relu, Adam 1e-3, batch 32; score: mean of "
          f"{args.seeds} seeds on a 25% test split; fit: median seconds at 1 thread\n")
    print("| dataset | metric | fastnn | sklearn | fastnn fit (s) | sklearn fit (s) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    # One thread for the whole run: the estimators' n_threads=1 then matches the process
    # budget and no fit pays for switching it.
    fastnn.set_num_threads(1)
    with threadpool_limits(limits=1):
        for name in DATASETS:
            r = compare(name, args.epochs, args.seeds, args.repeats)
            results.append(r)
            ours_s, theirs_s = statistics.median(r["fastnn_s"]), statistics.median(r["sklearn_s"])
            print(f"| {name} | {r['metric']} | {np.mean(r['fastnn_score']):.3f} | "
                  f"{np.mean(r['sklearn_score']):.3f} | {ours_s:.3f} | {theirs_s:.3f} | "
                  f"{theirs_s / ours_s:.1f}x |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
