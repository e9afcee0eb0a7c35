"""The API reference builds without warnings, and every public callable has a docstring.

``docs/`` is built with Sphinx (autodoc + napoleon, numpydoc style) as ``-W`` makes
any warning an error, so a broken docstring fails here. autodoc does not warn about a
missing docstring, hence the walk over the public API; the ``Examples`` in the
docstrings run as doctests.
"""
import doctest
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"

#: The public modules: ``fastnn`` and the submodules a user imports or reaches from it.
PUBLIC_MODULES = (
    "fastnn", "fastnn.model", "fastnn.layers", "fastnn.losses", "fastnn.metrics",
    "fastnn.optimizers", "fastnn.schedules", "fastnn.callbacks", "fastnn.solvers",
    "fastnn.datasets", "fastnn.gradcheck", "fastnn.perceptron", "fastnn.sklearn",
    "fastnn.onnx", "fastnn.kernels", "fastnn.distributed",
)
#: Modules whose docstring examples run as doctests (those that have examples).
DOCTEST_MODULES = (
    "fastnn", "fastnn._backend", "fastnn.callbacks", "fastnn.gradcheck", "fastnn.layers",
    "fastnn.model", "fastnn.perceptron", "fastnn.schedules", "fastnn.datasets._bundled",
    "fastnn.datasets._split",
)


def _is_fastnn(obj):
    return (getattr(obj, "__module__", None) or "").startswith("fastnn")


def _public_names(module):
    """``__all__``, else the public names the module defines itself (not imports)."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [name for name, obj in vars(module).items() if not name.startswith("_")
            and getattr(obj, "__module__", None) == module.__name__]


def _class_members(cls):
    """(qualified name, member) of the public methods and properties of ``cls`` and of
    the fastnn classes it inherits from, each under the class that defines it."""
    for base in cls.__mro__:
        if not _is_fastnn(base):
            continue
        for name, member in vars(base).items():
            if name.startswith("_") and name != "__call__":
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property) or inspect.isfunction(member):
                yield f"{base.__module__}.{base.__qualname__}.{name}", member


def public_api():
    """{qualified name: object} of every public module, class, function, method and
    property reachable from the PUBLIC_MODULES."""
    api = {}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        api[module_name] = module
        for name in _public_names(module):
            obj = getattr(module, name)
            if inspect.ismodule(obj) or not callable(obj) or not _is_fastnn(obj):
                continue
            api[f"{obj.__module__}.{obj.__qualname__}"] = obj
            if inspect.isclass(obj):
                api.update(_class_members(obj))
    return api


def _has_docstring(obj):
    return bool((inspect.getdoc(obj) or "").strip())


def test_public_api_is_found():
    api = public_api()
    assert len(api) > 200
    for name in ("fastnn.model.Sequential.fit", "fastnn.layers.Dense",
                 "fastnn.callbacks.Callback.on_epoch_end", "fastnn.metrics.R2.update",
                 "fastnn._backend.set_num_threads", "fastnn.sklearn.MLPClassifier.predict_proba"):
        assert name in api


def test_every_public_callable_has_a_docstring():
    api = public_api()
    missing = sorted(name for name, obj in api.items() if not _has_docstring(obj))
    assert missing == [], f"public callables without a docstring: {missing}"


@pytest.mark.parametrize("module_name", DOCTEST_MODULES)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = finder.find(module, module_name)
    assert sum(len(t.examples) for t in tests) > 0, f"{module_name} has no examples"
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} doctest failures in {module_name}"


def test_dense_help_lists_activations_init_and_alpha():
    import fastnn

    text = inspect.getdoc(fastnn.Dense)
    for word in ("sigmoid", "tanh", "relu", "leaky_relu", "softplus", "elu", "softmax",
                 "he_uniform", "he_normal", "glorot_uniform", "glorot_normal", "zeros",
                 "alpha"):
        assert word in text


def test_sphinx_build_has_no_warnings(tmp_path):
    pytest.importorskip("sphinx")
    # run outside the checkout, whose fastnn/ would shadow the installed package
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-E", "-b", "html",
         str(DOCS), str(tmp_path / "html")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr + result.stdout
    assert (tmp_path / "html" / "api" / "model.html").is_file()
