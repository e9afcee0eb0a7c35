"""The ``fastnn train`` command: in-process through ``fastnn.cli.main`` (per backend, via
``--backend``), and as ``python -m fastnn`` in a subprocess for --help and errors."""
import os
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
    assert f"saved training and test curves to {png}" in out


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


@pytest.mark.usefixtures("active_backend")
def test_zero_epochs_reports_the_untrained_model(capsys):
    code, out = run(capsys, "--dataset", "xor", "--epochs", "0")
    assert code == 0
    assert "trained 0 epochs in" in out and "samples/s" not in out and "test loss" in out


def fails_with(capsys, args, *fragments):
    """``fastnn train ARGS`` must exit 2 with one line on stderr holding ``fragments``."""
    with pytest.raises(SystemExit) as info:
        main(["train", "--quiet", "--epochs", "1", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastnn train: error: "), err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("args, fragments", [
    (["--epochs", "-1"], ["--epochs", ">= 0"]),
    (["--epochs", "1.5"], ["--epochs", "expected an int"]),
    (["--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["--threads", "0"], ["--threads", ">= 1"]),
    (["--threads", "-1"], ["--threads"]),
    (["--threads", "100000"], ["--threads", "usable CPUs"]),
    (["--backend", "cuda"], ["--backend", "'cuda'"]),
    (["--backend", ""], ["--backend"]),
    (["--activation", "swish"], ["--activation", "'swish'"]),
    (["--activation", "step"], ["--activation", "'step'"]),
    (["--loss", "nope"], ["--loss", "'nope'"]),
    (["--optimizer", "nope"], ["--optimizer", "'nope'"]),
    (["--lr", "0"], ["--lr"]),
    (["--lr", "-1"], ["--lr"]),
    (["--lr", "nan"], ["--lr", "finite"]),
    (["--lr", "abc"], ["--lr", "expected a number"]),
    (["--seed", "-1"], ["--seed"]),
    (["--test-size", "0"], ["--test-size"]),
    (["--test-size", "1"], ["--test-size"]),
    (["--test-size", "nan"], ["--test-size"]),
    (["--dtype", "float16"], ["--dtype"]),
    (["--hidden", "12,x"], ["--hidden takes comma-separated ints"]),
    (["--hidden", "0"], ["--hidden sizes must be >= 1"]),
    (["--dataset", "mnst"], ["unknown dataset 'mnst'; choose digits"]),
    (["--dataset", "csv"], ["--dataset csv needs a path"]),
    (["--dataset", "xor", "extra"], ["--dataset xor takes no path"]),
    (["--dataset", "mnist", "/nonexistent-dir"], ["/nonexistent-dir"]),
    (["--dataset", "iris", "--loss", "binary_cross_entropy"], ["0/1 labels"]),
    (["--save", "/nonexistent-dir/m.npz"], ["/nonexistent-dir"]),
])
def test_bad_option_values_are_one_line_errors(capsys, args, fragments):
    fails_with(capsys, args, *fragments)


def test_save_into_a_directory_is_refused_before_training(capsys, tmp_path):
    directory = tmp_path / "looks_like_a_file.npz"
    directory.mkdir()
    fails_with(capsys, ["--save", str(directory)], str(directory), "is a directory")
    fails_with(capsys, ["--save", str(tmp_path / "m.h5")], "m.h5", "writes .npz model files")


def test_plot_without_matplotlib_is_refused_before_training(capsys, tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    fails_with(capsys, ["--dataset", "xor", "--plot", str(tmp_path / "c.png")],
               "--plot needs matplotlib")


@pytest.mark.parametrize("content, fragment", [
    (bytes(range(256)) * 8, "is not a text file"),
    (b"", "has no data"),
    (b"a,b\nx,y\n", "0 numeric rows"),
    (b"1\n2\n3\n", ">= 2 columns"),
    (b"1,2\n3,4\n5\n", "not a numeric table"),
    (b"1,2\n3,nan\n5,6\n", "row 2"),
    (b"1,0\n2,5000\n3,7\n", "needs class labels 0..n-1"),
])
def test_bad_csv_files_are_named_in_one_line(capsys, tmp_path, content, fragment):
    path = tmp_path / "data.csv"
    path.write_bytes(content)
    loss = ["--loss", "cross_entropy"] if b"5000" in content else []
    fails_with(capsys, ["--dataset", "csv", str(path), *loss], str(path), fragment)


def test_csv_path_that_is_not_a_file(capsys, tmp_path):
    fails_with(capsys, ["--dataset", "csv", str(tmp_path / "absent.csv")], "is not a file")
    fails_with(capsys, ["--dataset", "csv", str(tmp_path)], "is not a file")


def test_backend_option_does_not_change_the_process_default(capsys):
    before = fn.get_backend()
    other = next(name for name in fn.kernels.BACKENDS if name != before)
    assert main(["train", "--dataset", "xor", "--epochs", "1", "--quiet",
                 "--backend", other]) == 0
    assert f"backend {other}" in capsys.readouterr().out
    assert fn.get_backend() == before


def test_missing_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "fastnn: error:" in capsys.readouterr().err


def python_m_fastnn(*args):
    # From a neutral directory: in the repository root, ./fastnn (the source tree) would
    # shadow a non-editable install.
    return subprocess.run([sys.executable, "-m", "fastnn", *args], capture_output=True,
                          text=True, timeout=120, cwd=os.path.dirname(sys.executable))


def test_python_m_fastnn_train_help():
    result = python_m_fastnn("train", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: fastnn train" in result.stdout
    for option in ("--dataset", "--hidden", "--backend", "--epochs", "--save"):
        assert option in result.stdout


def test_python_m_fastnn_bad_dataset():
    result = python_m_fastnn("train", "--dataset", "nope", "--quiet")
    assert result.returncode == 2
    assert result.stderr == ("fastnn train: error: unknown dataset 'nope'; choose digits, "
                             "iris, xor, spirals, mnist DIR or csv FILE\n")


def test_console_script_reports_a_binary_csv_in_one_line(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "fastnn")
    assert os.access(script, os.X_OK), f"console script not installed at {script}"
    binary = tmp_path / "blob.csv"
    binary.write_bytes(bytes(range(256)))
    result = subprocess.run([script, "train", "--dataset", "csv", str(binary), "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == (f"fastnn train: error: --dataset csv: {str(binary)!r} is not "
                             "a text file (binary data?)\n")


def test_bench_subcommand_is_wired(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--vs-torch" in out


# ---------------------------------------------------------------------------- first hour
def test_help_shows_defaults_and_every_solver(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name in sorted(fn.solvers.SOLVERS) + sorted(fn.optimizers.OPTIMIZERS):
        assert name in out
    assert "digits 30, iris 100" in out and "(default: 0.25)" in out
    assert "(default: None)" not in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_unknown_dataset_is_named_even_with_a_path(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--dataset", "csvv", "x"])
    assert info.value.code == 2
    assert "unknown dataset 'csvv'" in capsys.readouterr().err


def test_iris_defaults_train_to_a_good_result(capsys):
    code, out = run(capsys, "--dataset", "iris")
    assert code == 0
    assert float(out.split("test accuracy")[1]) >= 0.9
    assert "trained 100 epochs" in out


def test_solver_runs_report_iterations_not_samples_per_second(capsys):
    code, out = run(capsys, "--dataset", "xor", "--optimizer", "lbfgs", "--epochs", "5")
    assert code == 0
    assert "iterations in" in out and "loss+gradient evaluations" in out
    assert "samples/s" not in out and "stopped:" in out


def test_plot_shows_the_test_set_and_a_title(capsys, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    titles = []
    original = fn.History.plot

    def spy(history, path=None, keys=None, logy=None, title=None):
        titles.append((title, sorted(history.history)))
        return original(history, path, keys, logy, title)

    monkeypatch.setattr(fn.History, "plot", spy)
    code, out = run(capsys, "--dataset", "xor", "--epochs", "2", "--plot",
                    str(tmp_path / "c.png"))
    assert code == 0 and (tmp_path / "c.png").stat().st_size > 0
    (title, keys), = titles
    assert title.startswith("xor: 2-128-64-2 relu MLP") and "val_loss" in keys
