"""What a benchmark row records about where it ran: device, versions, commit; where the rows go; and whether
the optional peers (``torch.compile``, MultiVae) can run here."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import subprocess
import sys
import uuid
from typing import Optional

import torch

#: The results file of a run that names none: ``./crmvae_fast_bench/results.jsonl`` in the working directory.
DEFAULT_RESULTS = os.path.join("crmvae_fast_bench", "results.jsonl")


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "float64": torch.float64}[name]


def _git(*args) -> Optional[str]:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, if any
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
    except Exception:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_version() -> Optional[str]:
    try:
        import crmvae_fast

        v = getattr(crmvae_fast, "__version__", None)
        if v:
            return v
    except Exception:
        pass
    try:
        from importlib.metadata import version

        return version("crmvae_fast")
    except Exception:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fp:
            for line in fp:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} ({cores} cores, torch threads {torch.get_num_threads()})"


def environment(device: torch.device, source: str = "cli") -> dict:
    """The fields every row of one run shares."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    status = _git("status", "--porcelain")
    return {
        "run_id": f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "package_version": package_version(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_results_path() -> str:
    """``$CRMVAE_BENCH_JSON``, else ``./crmvae_fast_bench/results.jsonl`` in the working directory: never
    inside the package or its checkout unless asked (the repository's own suite, ``benchmarks/``, passes
    ``benchmarks/results/results.jsonl`` explicitly)."""
    env = os.environ.get("CRMVAE_BENCH_JSON")
    if env:
        return env
    return os.path.abspath(DEFAULT_RESULTS)


def compile_unavailable(device: torch.device) -> Optional[str]:
    """Why ``torch.compile`` cannot run here, or None."""
    try:
        import torch._dynamo as dynamo

        if hasattr(dynamo, "is_dynamo_supported") and not dynamo.is_dynamo_supported():
            return f"torch.compile (dynamo) is not supported on Python {sys.version.split()[0]}"
    except Exception as exc:  # pragma: no cover
        return f"torch._dynamo could not be imported: {exc!r}"
    if device.type == "cpu":
        cxx = os.environ.get("CXX")
        if not any(shutil.which(c) for c in ([cxx] if cxx else []) + ["g++", "c++", "clang++"]):
            return "torch.compile on CPU needs a C++ compiler (none of $CXX, g++, c++, clang++ found)"
    else:
        try:
            import triton  # noqa: F401
        except Exception as exc:
            return f"torch.compile on GPU needs triton: {exc!r}"
    return None


def multivae_unavailable() -> Optional[str]:
    try:
        import multivae.models  # noqa: F401
    except Exception as exc:
        return f"multivae is not importable ({exc.__class__.__name__}: {exc})"
    return None
