"""Solvers vs first-order optimizers on one small regression task.

Task: a 1-16-1 tanh network (float64) fitting y = sin(x) + N(0, 0.1^2) on 200 points
of [-3, 3]; every method starts from the same weights and runs full-batch until the
training MSE reaches the target (default 0.0125, the noise floor being 0.01) or its
budget ends. Reports wall time, iterations and loss/gradient evaluations to target.

    python bench/solvers.py [--target 0.0125] [--repeats 3] [--backend numba] [--json PATH]
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np

import fastnn as fn


class StopAtLoss(fn.callbacks.Callback):
    """Stop as soon as the training loss is at or below ``target``."""

    def __init__(self, target):
        self.target = target

    def on_epoch_end(self, epoch, logs=None):
        if logs["loss"] <= self.target:
            self.model.stop_training = True
            self.model.stop_reason = "reached target"


METHODS = {
    "Adam (lr=0.01)": (lambda: fn.optimizers.Adam(lr=0.01), 20000),
    "SGD+momentum (lr=0.05, 0.9)": (lambda: fn.optimizers.SGD(lr=0.05, momentum=0.9), 20000),
    "L-BFGS": (lambda: fn.solvers.LBFGS(), 5000),
    "CG (Polak-Ribiere)": (lambda: fn.solvers.ConjugateGradient(), 5000),
    "LM dense": (lambda: fn.solvers.LevenbergMarquardt(matrix_free=False), 2000),
    "LM matrix-free": (lambda: fn.solvers.LevenbergMarquardt(matrix_free=True), 2000),
    "Newton": (lambda: fn.solvers.Newton(), 500),
    "Newton-CG": (lambda: fn.solvers.NewtonCG(), 2000),
}


def task(n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = np.linspace(-3, 3, n)[:, None]
    return x, np.sin(x) + 0.1 * rng.standard_normal(x.shape)


def run_method(make, budget, x, y, target):
    model = fn.Sequential([fn.Dense(1, 16, activation="tanh", dtype="float64", seed=0),
                           fn.Dense(16, 1, dtype="float64", seed=1)])
    model.compile("mse", make())
    start = time.perf_counter()
    history = model.fit(x, y, epochs=budget, batch_size=None, verbose=0,
                        callbacks=[StopAtLoss(target)])
    seconds = time.perf_counter() - start
    loss = history.history["loss"][-1]
    return {"seconds": seconds, "iterations": len(history.epoch),
            "evaluations": history.n_evaluations, "final_loss": loss,
            "reached": loss <= target, "stop_reason": history.stop_reason}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.0125)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.backend:
        fn.set_backend(args.backend)
    x, y = task()
    for make, _ in METHODS.values():  # warm-up: compile kernels, import scipy paths
        run_method(make, 2, x, y, args.target)
    rows = {}
    for name, (make, budget) in METHODS.items():
        runs = [run_method(make, budget, x, y, args.target) for _ in range(args.repeats)]
        result = dict(runs[0])
        result["seconds"] = statistics.median(r["seconds"] for r in runs)
        rows[name] = result
    print(f"fastnn {fn.__version__}, backend {fn.get_backend()}, threads "
          f"{fn.get_num_threads()}; 1-16-1 tanh, 200 samples, float64, target MSE "
          f"{args.target}, median of {args.repeats}")
    print("| method | reached | wall time (s) | iterations | loss+grad evaluations | final MSE |")
    print("|---|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {'yes' if r['reached'] else 'no'} | {r['seconds']:.3f} | "
              f"{r['iterations']} | {r['evaluations']} | {r['final_loss']:.5f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": args.target, "backend": fn.get_backend(), "results": rows}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
