"""Which fast paths are live on this machine, and why not when they are off.

``TRITON_INTERPRET=1`` must be set before ``crmvae_fast`` (and triton) are imported: it routes CPU tensors
through the Triton kernels, which is how CI tests them without a GPU.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Optional

import torch

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401

    TRITON_VERSION: Optional[str] = triton.__version__
    _TRITON_REASON = ""
except Exception as exc:  # pragma: no cover - triton ships with CUDA builds of torch
    TRITON_VERSION = None
    _TRITON_REASON = f"triton could not be imported: {exc!r}"


_INTERPRETER_LOCK = threading.RLock()


def launch_guard():
    """Wrap every Triton launch in ``with launch_guard():``. The interpreter patches global state (``tl`` and
    the kernel's globals) while it runs a kernel, so two threads interpreting at once break each other: under
    ``TRITON_INTERPRET=1`` this is a process-wide lock; on a GPU it is a no-op."""
    return _INTERPRETER_LOCK if INTERPRET else contextlib.nullcontext()


def triton_runs_on(device: torch.device) -> bool:
    """True when the Triton kernels can take tensors on ``device``."""
    if TRITON_VERSION is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and INTERPRET


def backend_info() -> dict:
    """A dict saying which paths are live: ``triton`` (version or None), ``interpreter`` (bool),
    ``extension`` ("cuda", "cpu" or None), ``cuda`` (bool), ``latent_step`` and ``joint_nll`` (what runs
    them for CPU and CUDA tensors), and a ``reasons`` dict naming why each path that is off is off."""
    from . import _extension

    ext_kind, ext_reason = _extension.status()
    cuda = torch.cuda.is_available()
    reasons = {}
    if TRITON_VERSION is None:
        reasons["triton"] = _TRITON_REASON
    elif not cuda and not INTERPRET:
        reasons["triton"] = "no CUDA device and TRITON_INTERPRET!=1: CPU tensors use the eager latent math"
    if ext_kind is None:
        reasons["extension"] = ext_reason
    elif ext_kind == "cpu" and cuda:
        reasons["extension"] = "built without CUDA: CUDA tensors use the eager importance weights"
    return {
        "triton": TRITON_VERSION,
        "interpreter": INTERPRET,
        "extension": ext_kind,
        "cuda": cuda,
        "torch": torch.__version__,
        "latent_step": {
            "cpu": "triton-interpreter" if (INTERPRET and TRITON_VERSION) else "eager",
            "cuda": ("triton" if TRITON_VERSION else "eager") if cuda else None,
        },
        "joint_nll": {
            "cpu": "extension" if ext_kind is not None else "eager",
            "cuda": ("extension" if ext_kind == "cuda" else "eager") if cuda else None,
        },
        "reasons": reasons,
    }
