"""The ``fastnn train`` command: in-process through ``fastnn.cli.main`` (per backend, via
``--backend``), and as ``python -m fastnn`` in a subprocess for --help and errors."""
import re
import subprocess
import sys

import numpy as np
import pytest

import fastnn as fn
from _helpers import active_backend, rng  # noqa: F401  (active_backend: fixture)
from fastnn.cli import main


def run(capsys, *args):
    """Run ``fastnn train ARGS --quiet --backend <the active one>``; returns (exit code,
    stdout)."""
    code = main(["train", *args, "--quiet", "--backend", fn.get_backend()])
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet: no progress bar
    return code, captured.out


def printed_metric(out, name):
    match = re.search(rf"test {name} (-?[0-9.]+)", out)
    assert match, out
    return float(match.group(1))


@pytest.mark.usefixtures("active_backend")
def test_xor(capsys):
    backend = fn.get_backend()
    code, out = run(capsys, "--dataset", "xor", "--epochs", "200")
    assert code == 0
    assert f"backend {backend}" in out
    assert "data xor: 192 train / 64 test samples, 2 features" in out
    assert "trained 200 epochs" in out
    assert printed_metric(out, "accuracy") == 1.0
    assert fn.get_backend() == backend


@pytest.mark.usefixtures("active_backend")
def test_default_digits_run_reaches_96_percent(capsys):
    code, out = run(capsys)
    assert code == 0
    assert "data digits: 1347 train / 450 test samples, 64 features" in out
    assert "model 64-128-64-10 (relu)" in out and "loss cross_entropy" in out
    assert "trained 30 epochs" in out and "samples/s" in out
    assert printed_metric(out, "accuracy") >= 0.96


@pytest.mark.usefixtures("active_backend")
def test_options_save_and_plot(capsys, tmp_path):
    path = tmp_path / "xor.npz"
    code, out = run(capsys, "--dataset", "xor", "--epochs", "3",
                    "--hidden", "8", "--activation", "tanh", "--optimizer", "sgd",
                    "--lr", "0.5", "--batch-size", "16", "--dtype", "float64",
                    "--loss", "hinge", "--seed", "3", "--save", str(path))
    assert code == 0
    assert "model 2-8-2 (tanh)" in out and "loss hinge" in out and "SGD(lr=0.5" in out
    model = fn.load_model(path)
    assert model.dtype == np.float64 and model.loss.name == "hinge"
    X, y = fn.datasets.xor()
    assert model.predict(X).shape == (4, 2)

    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    code, out = run(capsys, "--dataset", "xor", "--epochs", "2",
                    "--plot", str(png))
    assert code == 0 and png.stat().st_size > 0
    assert f"saved training curves to {png}" in out


@pytest.mark.usefixtures("active_backend")
def test_binary_cross_entropy_on_xor(capsys):
    code, out = run(capsys, "--dataset", "xor", "--epochs", "100",
                    "--loss", "binary_cross_entropy")
    assert code == 0 and "model 2-128-64-1 (relu)" in out
    assert printed_metric(out, "accuracy") == 1.0


@pytest.mark.usefixtures("active_backend")
def test_csv_regression(capsys, tmp_path):
    gen = rng()
    X = gen.normal(size=(200, 3))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.1 * gen.normal(size=200)
    path = tmp_path / "data.csv"
    np.savetxt(path, np.column_stack([X, y]), delimiter=",", header="a,b,c,target",
               comments="")
    code, out = run(capsys, "--dataset", "csv", str(path), "--epochs", "40",
                    "--hidden", "16", "--lr", "0.01")
    assert code == 0 and "loss mse" in out and "model 3-16-1" in out
    assert printed_metric(out, "r2") >= 0.95


def test_bad_arguments_give_clean_errors(capsys):
    with pytest.raises(SystemExit, match=r"unknown dataset 'mnst'; choose digits"):
        main(["train", "--dataset", "mnst"])
    with pytest.raises(SystemExit, match=r"--dataset csv needs a path"):
        main(["train", "--dataset", "csv"])
    with pytest.raises(SystemExit, match=r"--dataset xor takes no path"):
        main(["train", "--dataset", "xor", "extra"])
    with pytest.raises(SystemExit) as info:
        main(["train", "--hidden", "12,x"])
    assert info.value.code == 2
    assert "--hidden takes comma-separated ints" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def python_m_fastnn(*args):
    return subprocess.run([sys.executable, "-m", "fastnn", *args], capture_output=True,
                          text=True, timeout=120)


def test_python_m_fastnn_train_help():
    result = python_m_fastnn("train", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: fastnn train" in result.stdout
    for option in ("--dataset", "--hidden", "--backend", "--epochs", "--save"):
        assert option in result.stdout


def test_python_m_fastnn_bad_dataset():
    result = python_m_fastnn("train", "--dataset", "nope", "--quiet")
    assert result.returncode == 1
    assert "unknown dataset 'nope'" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_subcommand_is_wired(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--vs-torch" in out
