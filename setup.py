"""Builds the C++/CUDA extension ``crmvae_fast._C`` (sources in ``csrc/``); the metadata, packages and the
``crmvae-fast`` console script are declared in pyproject.toml.

    pip install -e . --no-build-isolation        # or: python setup.py build_ext --inplace

``CUDAExtension`` when CUDA is usable (``torch.cuda.is_available()``, or ``FORCE_CUDA=1`` to build the CUDA
kernel on a machine without a GPU), ``CppExtension`` otherwise. ``TORCH_CUDA_ARCH_LIST`` picks the GPU
architectures (default without a visible GPU: "8.0;9.0", A100 and H100). ``--no-build-isolation`` makes the
build use the torch already installed, the one the extension must match. torch finds the CUDA toolkit through
``CUDA_HOME`` (else from the nvcc on PATH): where nvcc is a wrapper script outside the toolkit, set
``CUDA_HOME=/usr/local/cuda`` so that libcudart is found at link time.

The sources are every ``csrc/*.cpp`` (and ``csrc/*.cu`` with CUDA): a new C++ op only adds files there. The same
folder ships inside the package as ``crmvae_fast/csrc`` (pyproject.toml maps it), so an installed wheel can still
JIT-build the extension (``crmvae_fast/_extension.py``). ``CRMVAE_FAST_SKIP_EXT=1`` builds no extension at all
(a pure-Python wheel that JIT-builds on first use).
"""

import os
import runpy
from pathlib import Path

try:
    from packaging.version import Version
except ImportError:  # machines without internet may lack `packaging`: torch vendors the same module
    from torch._vendor.packaging.version import Version
from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

#: Measured on a 2-core x86_64 VM (1m48s of CPU, 5m15s wall at load 11); printed before the build.
CPU_BUILD_TIME = "about 2 minutes of CPU time (5 minutes of wall time on a loaded 2-core machine)"
ROOT = Path(__file__).resolve().parent
# the supported range is declared once, in crmvae_fast/versions.py (standard library only: safe to run here)
MIN_TORCH = Version(runpy.run_path(str(ROOT / "crmvae_fast" / "versions.py"))["MIN_TORCH"])
if Version(torch.__version__).release < MIN_TORCH.release:
    raise RuntimeError(f"crmvae_fast needs torch>={MIN_TORCH}, found torch {torch.__version__}; install a newer torch "
                       "(docs/compatibility.md lists the tested versions)")
CSRC = ROOT / "csrc"


def _openmp() -> bool:
    """True when torch's own parallel backend is OpenMP: at::parallel_for then needs -fopenmp."""
    return "OpenMP" in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]


def _extension():
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    with_cuda = (torch.cuda.is_available() or force_cuda) and CUDA_HOME is not None and torch.version.cuda is not None
    cxx = ["-O3", "-fopenmp-simd"] + (["-fopenmp"] if _openmp() else [])
    sources = [str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cpp"))]
    common = dict(
        name="crmvae_fast._C",
        include_dirs=[str(CSRC)],
        extra_link_args=["-fopenmp"] if _openmp() else [],
    )
    if with_cuda:
        if not torch.cuda.is_available():  # no GPU to read the architecture from
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += [str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cu"))]
        return CUDAExtension(
            sources=sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            **common,
        )
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)


class _BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension, saying first what it builds and for how long: pip shows only "still running"
    during the compile (``pip install -v`` shows this line)."""

    def run(self):
        for ext in self.extensions:
            cuda = any(src.endswith(".cu") for src in ext.sources)
            kind = (f"CUDA + C++ (nvcc, archs {os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the visible GPUs')}; "
                    "nvcc adds minutes per architecture)" if cuda else
                    f"C++ for the CPU only (no CUDA here; FORCE_CUDA=1 builds the GPU kernel), {CPU_BUILD_TIME}")
            print(f"crmvae_fast: building the extension {ext.name} with torch {torch.__version__}: {kind}", flush=True)
        super().run()


setup(
    ext_modules=[] if os.environ.get("CRMVAE_FAST_SKIP_EXT", "0") == "1" else [_extension()],
    cmdclass={"build_ext": _BuildExt},
)
