"""What a newcomer from Keras or scikit-learn meets first: Keras names, and errors that
say how to fix the mistake."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastnn as fn
from _helpers import blobs, mlp, rng


@pytest.mark.parametrize("alias, name", [
    ("sparse_categorical_crossentropy", "cross_entropy"),
    ("categorical_crossentropy", "cross_entropy"),
    ("binary_crossentropy", "binary_cross_entropy"),
    ("mean_squared_error", "mse"),
    ("mean_absolute_error", "mae"),
])
def test_keras_loss_names(alias, name):
    assert fn.losses.get(alias).name == name


def test_categorical_crossentropy_takes_one_hot_rows():
    X, y = blobs(10, rng(60))
    model = mlp([2, 6, 3]).compile("categorical_crossentropy", "adam")
    one_hot = np.eye(3)[y]
    np.testing.assert_allclose(model.evaluate(X, one_hot)["loss"],
                               model.evaluate(X, y)["loss"], rtol=1e-6)


def test_a_class_instead_of_an_instance_says_to_call_it():
    model = mlp([2, 3])
    with pytest.raises(TypeError, match=r"got the class Adam: call it, Adam\(\)"):
        model.compile("mse", fn.optimizers.Adam)
    with pytest.raises(TypeError, match=r"got the class LBFGS: call it, LBFGS\(\)"):
        model.compile("mse", fn.solvers.LBFGS)
    with pytest.raises(TypeError, match=r"got the class Huber: call it, Huber\(\)"):
        model.compile(fn.losses.Huber, "sgd")


def test_importing_the_source_checkout_explains_itself(tmp_path):
    # A checkout: fastnn/ beside kernels/, which only an install maps to fastnn.kernels.
    package = tmp_path / "checkout" / "fastnn"
    package.mkdir(parents=True)
    shutil.copy(Path(fn.__file__), package / "__init__.py")
    (tmp_path / "checkout" / "kernels").mkdir()
    (tmp_path / "checkout" / "kernels" / "_numpy.py").write_text("")
    # -S: no site-packages, so no installed fastnn (and no editable finder) to fall back on
    result = subprocess.run([sys.executable, "-S", "-c", "import fastnn"], text=True,
                            cwd=tmp_path / "checkout", capture_output=True, timeout=60)
    assert result.returncode != 0
    assert "imported from its source checkout" in result.stderr
    assert "pip install -e ." in result.stderr
