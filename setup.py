"""Build the Cython kernels. Metadata lives in pyproject.toml."""
import sys

import numpy  # noqa: F401  (build requirement; keeps the error early and clear)
from Cython.Build import cythonize
from setuptools import Extension, setup

# Compiler directives are set once here, not per file.
DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "nonecheck": False,
}

if sys.platform == "win32":
    compile_args, link_args = ["/O2", "/openmp"], []
elif sys.platform == "darwin":
    compile_args, link_args = ["-O3"], []
else:
    compile_args, link_args = ["-O3", "-fopenmp"], ["-fopenmp"]

extensions = [
    Extension(
        "fastnn.kernels._cython",
        ["kernels/_cython.pyx"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES))
