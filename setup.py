"""Build metalm-fast: the Python package plus its compiled extensions.

- ``metalm_fast._C``    C++ CPU kernels from csrc/cpu (always built, with ninja).
- ``metalm_fast._cuda`` CUDA kernels from csrc/cuda (built only when torch has CUDA
  and nvcc is found).

Environment flags: ``METALM_FAST_NO_CPU_EXT=1`` skips ``_C``;
``METALM_FAST_NO_CUDA_EXT=1`` skips ``_cuda``. A missing extension never breaks
``import metalm_fast``: the ops layer reports the backend as unavailable.

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch
already installed (torch==2.13.0, the CPU build, on CPU machines).
"""

import glob
import os
import time

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    extensions = []
    if not _flag("METALM_FAST_NO_CPU_EXT"):
        sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
        if sources:
            extensions.append(
                CppExtension(
                    "metalm_fast._C",
                    sources,
                    extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
                    extra_link_args=["-fopenmp"],
                )
            )
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    wants_cuda = not _flag("METALM_FAST_NO_CUDA_EXT") and torch.version.cuda is not None
    if wants_cuda and CUDA_HOME is not None and cuda_sources:
        bindings = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        extensions.append(
            CUDAExtension(
                "metalm_fast._cuda",
                cuda_sources + bindings,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]},
            )
        )
    return extensions


#: Object files live here across installs, so ninja recompiles only what changed.
BUILD_TEMP = os.path.join(ROOT, "build", "ninja")


def _announce(message: str) -> None:
    """Print to the terminal too: pip hides a build backend's output unless ``-v``."""
    print(message, flush=True)
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(message + "\n")
    except OSError:
        pass  # no controlling terminal (CI, a pipe): stdout alone is enough


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    class IncrementalBuildExtension(BuildExtension):
        """torch's ninja build, with a persistent build directory.

        pip builds an editable install in a fresh temporary directory each
        time, so every ``pip install -e .`` would recompile every source.
        Keeping the object files and ninja's log in ``build/ninja`` lets the
        second install relink only; ninja's dependency files (``-MMD``) make a
        changed source or header rebuild exactly what includes it.
        """

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = BUILD_TEMP

        def build_extensions(self):
            names = ", ".join(ext.name for ext in self.extensions)
            _announce(
                f"metalm-fast: compiling {names} with ninja in {BUILD_TEMP} "
                "(a first build takes minutes; later ones reuse it)"
            )
            start = time.perf_counter()
            super().build_extensions()
            _announce(f"metalm-fast: extensions ready in {time.perf_counter() - start:.0f} s")

    return {"build_ext": IncrementalBuildExtension.with_options(use_ninja=True)}


setup(
    name="metalm-fast",
    version="0.1.0",
    description="Fast, exact kernels for MetaLM-style encoder-connector-decoder models",
    packages=[
        "metalm_fast",
        "metalm_fast.reference",
        "metalm_fast.ops",
        "metalm_fast.nn",
        "metalm_fast.models",
        "metalm_fast.data",
        "metalm_fast.training",
        "metalm_fast.evaluation",
        "metalm_fast.commands",
        "metalm_fast.tools",
        "metalm_fast.hf",
        "metalm_fast.kernels",
    ],
    package_dir={"metalm_fast": "metalm_fast", "metalm_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "numpy",
        "tokenizers",
        "safetensors",
        "scikit-learn",
        "tqdm",
    ],
    extras_require={
        # metalm_fast.hf.register and the export's checks import transformers; loading does not.
        "hf": ["transformers>=5.0"],
        "eval": ["lm-eval>=0.4"],
        "dev": [
            "transformers>=5.0",
            "accelerate",
            "lm-eval>=0.4",
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "ruff",
            "pybind11",
            "ninja",
            "expecttest",
        ],
    },
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    entry_points={"console_scripts": ["metalm-fast=metalm_fast.cli:main"]},
)
