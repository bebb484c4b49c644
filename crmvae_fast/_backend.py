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

from . import versions

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401

    TRITON_VERSION: Optional[str] = triton.__version__
    _TRITON_REASON = ""
except Exception as exc:  # pragma: no cover - triton ships with CUDA builds of torch
    TRITON_VERSION = None
    _TRITON_REASON = f"triton could not be imported: {exc!r}"

#: torch and triton against the tested range (:mod:`crmvae_fast.versions`); warns once, here, when outside it.
VERSIONS = versions.check(torch.__version__, TRITON_VERSION)


_INTERPRETER_LOCK = threading.RLock()


def fix_interpreter_index(interpreter) -> bool:
    """Make the Triton interpreter's scalar-to-int conversion work with numpy >= 2.4; True when it patched.

    The interpreter holds a kernel's scalar arguments as numpy arrays of shape (1,), and up to triton 3.6 turns
    one into an int (``range(0, D, BLOCK_D)`` in a kernel) with ``int(array)``, which numpy 2.4 made a
    TypeError ("only 0-dimensional arrays can be converted to Python scalars"): every kernel with a loop over
    a runtime bound failed. triton 3.8 squeezes the array first; this wraps ``_patch_lang_tensor`` of the given
    ``triton.runtime.interpreter`` module so the older ones do the same (``.item()``). It changes nothing where
    the interpreter does not have the bug (its source is checked) and nothing on a GPU."""
    import inspect
    import re

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "__wrapped__", None) is not None:
        return False
    try:
        buggy = re.search(r"int\(self\.handle\.data\)", inspect.getsource(original)) is not None
    except (OSError, TypeError):
        return False
    if not buggy:
        return False

    def _index(self):
        return int(self.handle.data.item())

    def _patch_lang_tensor(tensor, *args, **kwargs):
        out = original(tensor, *args, **kwargs)
        scope = args[0] if args else kwargs.get("scope")
        if hasattr(scope, "set_attr"):  # restored with the rest when the kernel returns
            scope.set_attr(tensor, "__index__", _index)
        else:
            tensor.__index__ = _index
        return out

    _patch_lang_tensor.__wrapped__ = original
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True


if INTERPRET and TRITON_VERSION is not None:
    from triton.runtime import interpreter as _interpreter

    fix_interpreter_index(_interpreter)


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


def op_backend(spec, device_type: str) -> tuple:
    """``(runner, reason)`` for the registered op ``spec`` (:class:`crmvae_fast.registry.OpSpec`) on tensors
    of ``device_type``: runner is ``"triton"``, ``"triton-interpreter"`` or ``"extension"`` when the fused path
    is live, ``"eager"`` when the eager twin runs instead (reason says why), None when there is no such
    device here."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return None, "no CUDA device"
    if spec.backend == "triton":
        if TRITON_VERSION is None:
            return "eager", _TRITON_REASON
        if device_type == "cuda":
            return "triton", ""
        if INTERPRET:
            return "triton-interpreter", ""
        return "eager", "Triton needs a CUDA device, or TRITON_INTERPRET=1 set before import for CPU tensors"
    if spec.backend == "extension":
        from . import _extension

        kind, reason = _extension.status()
        if kind is None:
            return "eager", reason
        if device_type == "cuda" and kind != "cuda":
            return "eager", "the extension was built without CUDA: CUDA tensors use the eager twin"
        return "extension", ""
    raise ValueError(f"op {spec.name!r}: unknown backend {spec.backend!r}")


def backend_info() -> dict:
    """A dict saying which paths are live: ``triton`` (version or None), ``interpreter`` (bool),
    ``extension`` ("cuda", "cpu" or None), ``cuda`` (bool), then for every registered op
    (:mod:`crmvae_fast.registry`, under its name and its aliases, e.g. ``latent_step`` and ``joint_nll``) what
    runs it for CPU and CUDA tensors, and a ``reasons`` dict naming why each path that is off is off
    (``reasons["<op>.<device>"]`` for an op that runs its eager twin there). ``torch``, ``tested_range`` and
    ``in_tested_range`` place the installed versions in the tested range (:mod:`crmvae_fast.versions`); outside
    it ``reasons["versions"]`` says how, and importing the package has warned once."""
    from . import _extension, registry

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
    info = {
        "triton": TRITON_VERSION,
        "interpreter": INTERPRET,
        "extension": ext_kind,
        "cuda": cuda,
        "torch": torch.__version__,
        "tested_range": VERSIONS["tested_range"],
        "in_tested_range": VERSIONS["in_tested_range"],
    }
    if VERSIONS["reason"]:
        reasons["versions"] = VERSIONS["reason"]
    for spec in registry.OPS.values():
        where = {}
        for dev in ("cpu", "cuda"):
            runner, why = op_backend(spec, dev)
            where[dev] = runner
            if runner == "eager" and why:
                reasons[f"{spec.name}.{dev}"] = why
        for key in (spec.name,) + spec.aliases:
            info[key] = dict(where)
    info["reasons"] = reasons
    return info
