"""Build script: the package plus its C++ CPU kernels (``tgate_kernels._C``).

The extension is compiled against the installed torch, so install with
``pip install --no-build-isolation .``. Set ``TGATE_KERNELS_NO_EXTENSION=1`` to skip it;
the package then falls back to its PyTorch reference ops (and says so once).
"""

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("TGATE_KERNELS_NO_EXTENSION", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if sources:
        ext_modules.append(
            CppExtension(
                name="tgate_kernels._C",
                sources=sources,
                extra_compile_args={"cxx": ["-O3", "-fopenmp", "-DAT_PARALLEL_OPENMP=1"]},
                extra_link_args=["-fopenmp"],
                py_limited_api=False,
            )
        )
        cmdclass["build_ext"] = BuildExtension.with_options(no_python_abi_suffix=False)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
