"""Build the Cython hot path. There is no pure-Python fallback: if this does not compile, nothing imports."""
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "engine._ledger",
        ["engine/_ledger.pyx"],
        language="c++",
        include_dirs=[numpy.get_include(), "engine"],
        depends=["engine/ledger_core.h", "engine/_ledger.pxd"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3", "-std=c++17", "-fno-strict-aliasing"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
