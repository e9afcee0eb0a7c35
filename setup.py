"""Build the Cython kernels. Metadata lives in pyproject.toml."""
import glob
import os
import sys
import tempfile

import numpy  # noqa: F401  (build requirement; keeps the error early and clear)
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

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
    compile_args, link_args = ["-O3", "-fno-math-errno"], []
else:
    compile_args, link_args = ["-O3", "-fno-math-errno", "-fopenmp"], ["-fopenmp"]

extensions = [
    Extension(
        "fastnn.kernels._cython",
        ["kernels/_cython.pyx"],
        include_dirs=["kernels"],
        depends=sorted(glob.glob("kernels/*.h")),  # C headers: a change rebuilds
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
]



def _compiler_accepts(compiler, flag):
    """True if ``compiler`` compiles a trivial C file with ``flag``."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write("int main(void) { return 0; }\n")
        try:
            compiler.compile([source], output_dir=tmp, extra_postargs=[flag])
        except Exception:  # CompileError, or a missing compiler binary
            return False
    return True


class BuildExt(build_ext):
    """Compile for the CPU that builds (AVX2/FMA/AVX-512 where present), as numba's JIT
    does: the elementwise loops (optimizer updates, epilogues) vectorise 2x wider.
    ``FASTNN_PORTABLE=1`` builds for the baseline ISA instead: set it when the binary
    will run on other machines (wheels, container images for mixed fleets)."""

    def build_extensions(self):
        portable = os.environ.get("FASTNN_PORTABLE", "0") not in ("", "0")
        if (not portable and self.compiler.compiler_type == "unix"
                and _compiler_accepts(self.compiler, "-march=native")):
            for ext in self.extensions:
                ext.extra_compile_args.append("-march=native")
        super().build_extensions()


setup(ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES),
      cmdclass={"build_ext": BuildExt})
