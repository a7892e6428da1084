"""Build and install ebkernels.

The native ops in csrc/ (C++ CPU, plus CUDA where torch has CUDA and nvcc is present) are built
through torch's cpp_extension with ninja. They are optional: if no compiler is available the build
says why and the package installs without them (its Triton and PyTorch paths still work).
Install with ``pip install --no-build-isolation -e .`` so the build sees the installed torch.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
cpp_sources = sorted(glob.glob("csrc/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/*.cu"))
if cpp_sources and os.environ.get("EBKERNELS_NO_NATIVE", "0") != "1":
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

        class OptionalBuildExtension(BuildExtension):
            """A failed native build is reported, not fatal."""

            failed = ()

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as e:  # compiler missing or broken
                    self.failed = (*self.failed, ext.name)
                    print(f"ebkernels: native ops not built ({type(e).__name__}: {e}); "
                          "the Triton/PyTorch paths will be used", file=sys.stderr)

            def build_extensions(self):
                super().build_extensions()
                # forget what failed, so --inplace / editable installs and wheels don't look for it
                self.extensions = [e for e in self.extensions if e.name not in self.failed]

        with_cuda = bool(torch.version.cuda) and CUDA_HOME is not None and cuda_sources
        # no -std flag: torch's cpp_extension adds the standard its own headers need
        extra = {"cxx": ["-O3"]}
        if with_cuda:
            extra["nvcc"] = ["-O3"]
            ext = CUDAExtension("ebkernels._C", cpp_sources + cuda_sources, extra_compile_args=extra,
                                define_macros=[("EBK_WITH_CUDA", "1")])
        else:
            ext = CppExtension("ebkernels._C", cpp_sources, extra_compile_args=extra)
        ext_modules = [ext]
        cmdclass = {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}
    except ImportError as e:
        print(f"ebkernels: torch not importable at build time ({e}); native ops skipped", file=sys.stderr)

setup(
    name="ebkernels",
    version="0.1.0",
    description="int8 tensor-core training kernels (Triton) and the early-bird lottery ticket workflow",
    packages=find_packages(include=["ebkernels", "ebkernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib", "scikit-learn", "torch-pruning>=1.6",
                      "triton>=3.2; platform_system == 'Linux'"],
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-xdist"], "torchvision": ["torchvision"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["ebkernels=ebkernels.__main__:main"]},
)
