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

The sources are every ``*.cpp`` of the ``csrc`` folder (and every ``*.cu`` when building with CUDA), found
beside the package in a checkout (``<repo>/csrc``) or inside it in an installed wheel (``crmvae_fast/csrc``,
shipped as package data): :func:`csrc_dir`. The ops the extension must register are the registry entries whose
backend is ``"extension"`` (:mod:`crmvae_fast.registry`).

This module imports no op module: an op module that needs something done once the library is loaded (its
fake registration, which needs the C++ schema) hands a callback to :func:`when_loaded`.

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

from . import registry

_PACKAGE = Path(__file__).resolve().parent


def csrc_dir() -> Optional[Path]:
    """The folder holding the C++/CUDA sources: ``<checkout>/csrc`` beside the package, else
    ``crmvae_fast/csrc`` inside an installed wheel; None when neither has a ``*.cpp`` file."""
    for d in (_PACKAGE.parent / "csrc", _PACKAGE / "csrc"):
        if d.is_dir() and any(d.glob("*.cpp")):
            return d
    return None


def sources(cuda: bool, root: Optional[Path] = None) -> list:
    """Every ``*.cpp`` of ``root`` (default :func:`csrc_dir`), then every ``*.cu`` when ``cuda``; sorted."""
    root = root if root is not None else csrc_dir()
    if root is None:
        return []
    return sorted(root.glob("*.cpp")) + (sorted(root.glob("*.cu")) if cuda else [])


def op_names() -> tuple:
    """The ``torch.ops`` names the extension registers: the custom ops of every op the registry runs on it."""
    return tuple(n for spec in registry.OPS.values() if spec.backend == "extension" for n in spec.custom_ops)


_lock = threading.RLock()
_loaded: Optional[bool] = None  # None: not tried yet
_reason = "not loaded yet"
_on_load: list = []  # callbacks run once the library is loaded (fake registrations)


def _require() -> bool:
    return os.environ.get("CRMVAE_FAST_REQUIRE_EXT", "0") == "1"


def _has_kernel(dispatch_key: str) -> bool:
    """True when every op of :func:`op_names` has a kernel for ``dispatch_key``."""
    names = op_names()
    try:
        return bool(names) and all(torch._C._dispatch_has_kernel_for_dispatch_key(n, dispatch_key) for n in names)
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

    root = csrc_dir()
    if root is None:
        raise FileNotFoundError(
            f"extension sources not found: no *.cpp in {_PACKAGE.parent / 'csrc'} (checkout) nor in "
            f"{_PACKAGE / 'csrc'} (installed wheel); reinstall crmvae_fast from a wheel or checkout that has them")

    def build(cuda: bool) -> None:
        cpp_extension.load(
            name="crmvae_fast_C_cuda" if cuda else "crmvae_fast_C_cpu",
            sources=[str(p) for p in sources(cuda, root)],
            extra_cflags=flags,
            extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"],
            extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
            extra_include_paths=[str(root)],
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
        errors.append(f"crmvae_fast._C imported but registered no kernel for {', '.join(op_names())}")
    except ImportError as exc:
        errors.append(f"crmvae_fast._C not importable ({exc})")
    if os.environ.get("CRMVAE_FAST_NO_JIT", "0") == "1":
        errors.append("JIT build skipped (CRMVAE_FAST_NO_JIT=1)")
        return False, "; ".join(errors)
    try:
        note = _jit_build()
        if _registered():
            return True, note
        errors.append(f"JIT build loaded but registered no kernel for {', '.join(op_names())}")
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
                for fn in _on_load:
                    fn()
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


def when_loaded(fn) -> None:
    """Run ``fn()`` once the library is loaded: now if its ops are already registered in this process, else
    right after :func:`load` has loaded it. Op modules register their fake functions this way (they need the
    schema that the library declares), so this module never imports them."""
    with _lock:
        if _loaded or (_loaded is None and _registered()):
            fn()
        elif _loaded is None:
            _on_load.append(fn)


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
