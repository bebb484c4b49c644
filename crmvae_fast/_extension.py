"""Loading the C++/CUDA extension (``csrc/``) that holds ``torch.ops.crmvae_fast.iw_lse_update``.

Nothing is compiled or loaded at import time: the first :func:`load` or :func:`status` call does it, once.
The order is

1. an installed or in-place built ``crmvae_fast._C`` (``pip install -e . --no-build-isolation`` or
   ``python setup.py build_ext --inplace``);
2. else a JIT build of the same sources with ``torch.utils.cpp_extension.load`` into torch's extension cache
   (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``): the CPU file always, the CUDA file too when
   ``torch.cuda.is_available()`` and nvcc is found;
3. else no extension: one ``warnings.warn`` says why, and the callers use the eager twin in
   :mod:`crmvae_fast.kernels.iw_logsumexp`.

``CRMVAE_FAST_REQUIRE_EXT=1`` turns step 3 into a ``RuntimeError`` carrying the build error (CI sets it so the
extension is really tested). ``CRMVAE_FAST_NO_JIT=1`` skips step 2.
"""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

OP_NAME = "crmvae_fast::iw_lse_update"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
CPU_SOURCES = ("ops.cpp", "iw_logsumexp_cpu.cpp")
CUDA_SOURCES = ("iw_logsumexp_cuda.cu",)

_lock = threading.Lock()
_loaded: Optional[bool] = None  # None: not tried yet
_reason = "not loaded yet"


def _require() -> bool:
    return os.environ.get("CRMVAE_FAST_REQUIRE_EXT", "0") == "1"


def _has_kernel(dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, dispatch_key)
    except RuntimeError:  # the operator is not defined (no library loaded)
        return False


def _registered() -> bool:
    return _has_kernel("CPU") or _has_kernel("CUDA")


def cflags() -> list:
    """Host compiler flags for the extension: -O3, SIMD pragmas, and OpenMP when torch's own parallel
    backend is OpenMP (``at::parallel_for`` then runs on OpenMP threads)."""
    flags = ["-O3", "-fopenmp-simd"]
    if "OpenMP" in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]:
        flags.append("-fopenmp")
    return flags


def _nvcc_found() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return shutil.which("nvcc") is not None or (CUDA_HOME is not None and Path(CUDA_HOME, "bin", "nvcc").exists())


def _jit_build() -> str:
    """Compile and load the sources with torch's JIT; returns a note on what was built. The CUDA file is
    added when a GPU and nvcc are there; if that build fails, the CPU-only build is tried next."""
    from torch.utils import cpp_extension

    with_cuda = torch.cuda.is_available() and torch.version.cuda is not None and _nvcc_found()
    flags = cflags()

    def build(cuda: bool) -> None:
        sources = [str(CSRC / f) for f in CPU_SOURCES + (CUDA_SOURCES if cuda else ())]
        missing = [s for s in sources if not Path(s).exists()]
        if missing:
            raise FileNotFoundError(f"extension sources not found: {missing} (crmvae_fast is not a checkout?)")
        cpp_extension.load(
            name="crmvae_fast_C_cuda" if cuda else "crmvae_fast_C_cpu",
            sources=sources,
            extra_cflags=flags,
            extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"],
            extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
            extra_include_paths=[str(CSRC)],
            with_cuda=cuda,
            is_python_module=False,
            verbose=False,
        )

    if not with_cuda:
        build(False)
        return "JIT build (CPU only: " + ("no nvcc found)" if torch.cuda.is_available() else "no CUDA device)")
    try:
        build(True)
        return "JIT build"
    except Exception as exc:
        build(False)
        return f"JIT build (CPU only: the CUDA build failed: {type(exc).__name__}: {exc})"


def _try_load() -> tuple:
    """(loaded, reason) after trying the built module, then the JIT build."""
    if _registered():  # a library loaded by someone else in this process (torch.ops.load_library)
        return True, "already registered in this process"
    errors = []
    try:
        from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)

        if _registered():
            return True, "crmvae_fast._C"
        errors.append("crmvae_fast._C imported but registered no kernel for " + OP_NAME)
    except ImportError as exc:
        errors.append(f"crmvae_fast._C not importable ({exc})")
    if os.environ.get("CRMVAE_FAST_NO_JIT", "0") == "1":
        errors.append("JIT build skipped (CRMVAE_FAST_NO_JIT=1)")
        return False, "; ".join(errors)
    try:
        note = _jit_build()
        if _registered():
            return True, note
        errors.append("JIT build loaded but registered no kernel for " + OP_NAME)
    except Exception as exc:  # compiler missing, build error, ...
        errors.append(f"JIT build failed: {type(exc).__name__}: {exc}")
    return False, "; ".join(errors)


def load():
    """The op namespace ``torch.ops.crmvae_fast`` once the extension is loaded, else None (after one
    warning). Raises ``RuntimeError`` instead of returning None when ``CRMVAE_FAST_REQUIRE_EXT=1``."""
    global _loaded, _reason
    with _lock:
        if _loaded is None:
            _loaded, _reason = _try_load()
            if _loaded:
                from .kernels import iw_logsumexp

                iw_logsumexp._register_fake()
            elif not _require():
                warnings.warn(
                    "crmvae_fast: the C++/CUDA extension is not available, compute_joint_nll uses the eager "
                    f"importance weights instead ({_reason}). Build it with `pip install -e . "
                    "--no-build-isolation`.",
                    RuntimeWarning,
                    stacklevel=2,
                )
    if not _loaded:
        if _require():
            raise RuntimeError(f"crmvae_fast: CRMVAE_FAST_REQUIRE_EXT=1 but the extension is not available: {_reason}")
        return None
    return torch.ops.crmvae_fast


_kernels: dict = {}  # device type -> bool, filled once per device type


def has_kernel(device_type: str) -> bool:
    """True when the loaded extension has a kernel for ``device_type`` ("cpu" or "cuda"). Cached: after the
    first call per device type it is a dict look-up (``torch.compile`` traces through it)."""
    found = _kernels.get(device_type)
    if found is None:
        found = load() is not None and _has_kernel(device_type.upper())
        _kernels[device_type] = found
    return found


def status() -> tuple:
    """``(kind, reason)``: kind is "cuda" when the loaded extension has a CUDA kernel, "cpu" when only a CPU
    one, None when there is no extension; reason says why not (empty when kind is "cuda", or why CUDA is
    missing when kind is "cpu")."""
    if load() is None:
        return None, _reason
    if _has_kernel("CUDA"):
        return "cuda", ""
    return "cpu", f"extension built without CUDA ({_reason})"
