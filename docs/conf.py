"""Sphinx configuration of the fastnn API reference (build: see README, Documentation)."""
import fastnn

project = "fastnn"
author = "the fastnn developers"
release = version = fastnn.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]

# numpydoc-style docstrings, read by napoleon
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

autodoc_default_options = {"members": True, "member-order": "bysource",
                           "show-inheritance": True}
autodoc_typehints = "none"
autoclass_content = "class"

exclude_patterns = ["_build"]
html_theme = "alabaster"
napoleon_use_ivar = True
# napoleon links the words of a type such as "ndarray, shape (n_params,)"; a word that
# names members of two classes (Sequential.n_params, Objective.n_params) is ambiguous,
# not broken: keep the link to the first and do not fail the -W build on it.
suppress_warnings = ["ref.python"]


def skip_foreign_members(app, what, name, obj, skip, options):
    """Skip members that classes inherit or get from another library (scikit-learn's
    ``set_*_request`` methods): they are documented there."""
    module = getattr(obj, "__module__", None)
    if callable(obj) and module is not None and not module.startswith("fastnn"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", skip_foreign_members)
