"""The one part of the build that pyproject.toml cannot say: the optional fused CPU kernels.

``xrnn/kernels/cpu/recurrent.c`` becomes the extension module ``xrnn.kernels._xrnn_cpu``
(plain C functions that :mod:`xrnn.kernels.native` loads with ctypes, plus an empty Python
module so that the wheel carries the library for its platform). The extension is optional:
on a machine with no C compiler, or one that fails, the build warns and the package installs
without it, and every scan runs on the NumPy code. Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# GCC and clang: what the loops need to vectorize (xrnn.kernels.native.CFLAGS says why)
UNIX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast", "-pthread"]


class BuildExt(build_ext):
    def build_extensions(self):
        unix = self.compiler.compiler_type in ("unix", "mingw32", "cygwin")
        for ext in self.extensions:
            ext.extra_compile_args = UNIX_FLAGS if unix else ["/O2"]
            ext.extra_link_args = ["-pthread"] if unix else []
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "xrnn.kernels._xrnn_cpu",
            sources=["xrnn/kernels/cpu/recurrent.c"],
            depends=["xrnn/kernels/cpu/recurrent_kernels.h", "xrnn/kernels/cpu/scan_kernels.h"],
            define_macros=[("XRNN_PYTHON_MODULE", "1")],
            optional=True,  # no compiler: install without it (the NumPy code runs)
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
