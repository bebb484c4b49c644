"""The torch / Triton versions crmvae_fast supports, declared once, and the runs that tested them.

The supported range runs from :data:`MIN_TORCH` / :data:`MIN_TRITON` up to the newest minor release in
:data:`TESTED`. Every row of :data:`TESTED` is a run of ``tests/compat/run.sh TORCH_VERSION`` (a fresh venv with
that torch and the triton it pulls: the kernels through the interpreter and compiled to sm_80/sm_90, the
extension, the model); ``docs/compatibility.md`` shows the same table with what each run did not cover.
``pyproject.toml`` and ``setup.py`` take their lower bound from here (a test checks they agree).

This module imports nothing but the standard library (``setup.py`` reads it before torch is known to be there).
"""

from __future__ import annotations

import re
import warnings
from typing import NamedTuple, Optional, Tuple

#: The oldest torch and Triton the package supports (and was tested on). Older ones were tried and left out: under
#: triton 3.1 (torch 2.5) and 3.3 (torch 2.7) the latent-step kernels compile to 28-29 (forward) and 41-42
#: (backward) SASS warp-instructions per element at the SPEC shape, issue-bound on an H100 by the kernel report's
#: model (3.4: 21 and 34, memory-bound), and spill under a register cap.
MIN_TORCH = "2.8.0"
#: The oldest Triton, the one torch 2.8 pairs with.
MIN_TRITON = "3.4.0"


class TestedRun(NamedTuple):
    """One run of ``tests/compat/run.sh``: the versions it ran under, when, and what came out."""

    torch: str
    triton: str
    python: str
    cuda: str  # the CUDA the torch wheel was built for
    date: str
    result: str  # the script's summary: "N passed, M failed, S skipped (reasons)"


#: Every tested pair, oldest first (``docs/compatibility.md`` has the same rows and what each did not run).
TESTED: Tuple[TestedRun, ...] = (
    TestedRun("2.8.0", "3.4.0", "3.11.7", "12.8", "2026-12-02", "430 passed, 0 failed, 57 skipped"),
    TestedRun("2.11.0", "3.6.0", "3.11.7", "13.0", "2026-12-02", "431 passed, 0 failed, 56 skipped"),
    TestedRun("2.11.0", "3.6.0", "3.11.7", "13.0", "2026-12-02", "264 passed, 0 failed, 54 skipped (--quick)"),
    TestedRun("2.14.1", "3.8.0", "3.11.7", "13.0", "2026-12-02", "431 passed, 0 failed, 56 skipped"),
    TestedRun("2.15.0", "3.9.0", "3.11.7", "13.2", "2026-12-02", "431 passed, 0 failed, 56 skipped"),
)


def release(version: str) -> Tuple[int, ...]:
    """``"2.11.0+cu128"`` -> ``(2, 11, 0)``: the numeric release, local and pre-release tags dropped."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(version))
    if m is None:
        raise ValueError(f"expected a version like '2.11.0', got {version!r}; pass torch.__version__ or "
                         "triton.__version__")
    return tuple(int(p) for p in m.group(1).split("."))


def _minor(version: str) -> Tuple[int, int]:
    r = release(version) + (0,)
    return r[0], r[1]


def tested_range() -> dict:
    """``{"torch": (MIN_TORCH, newest tested), "triton": (MIN_TRITON, newest tested)}``, versions as strings."""
    newest_torch = max((r.torch for r in TESTED), key=release, default=MIN_TORCH)
    newest_triton = max((r.triton for r in TESTED), key=release, default=MIN_TRITON)
    return {"torch": (MIN_TORCH, newest_torch), "triton": (MIN_TRITON, newest_triton)}


def outside_range(torch_version: str, triton_version: Optional[str]) -> str:
    """Why ``torch_version`` / ``triton_version`` lie outside the tested range, or ``""`` when they are inside
    (older than the bound, or a minor release newer than the newest tested one, is outside; a patch release of a
    tested minor is inside). ``triton_version`` None (no triton) is not checked: the eager paths need none."""
    rng = tested_range()
    out = []
    for name, version in (("torch", torch_version), ("triton", triton_version)):
        if version is None:
            continue
        low, high = rng[name]
        if release(version) < release(low):
            out.append(f"{name} {version} is older than the oldest supported, {low}")
        elif _minor(version) > _minor(high):
            out.append(f"{name} {version} is newer than the newest tested, {high}")
    return "; ".join(out)


_warned = False


def check(torch_version: str, triton_version: Optional[str]) -> dict:
    """The versions against the tested range: ``{"torch", "triton", "tested_range", "in_tested_range", "reason"}``
    (``tested_range`` as ``"torch 2.8.0 .. 2.15.0, triton 3.4.0 .. 3.9.0"``). Outside the range it warns, once per
    process, with what to do."""
    global _warned
    reason = outside_range(torch_version, triton_version)
    rng = tested_range()
    text = f"torch {rng['torch'][0]} .. {rng['torch'][1]}, triton {rng['triton'][0]} .. {rng['triton'][1]}"
    if reason and not _warned:
        _warned = True
        warnings.warn(f"crmvae_fast was tested with {text}, but {reason}: it may work, but nothing has checked it; "
                      "run `crmvae-fast doctor` to check this machine, or install a torch in the range",
                      RuntimeWarning, stacklevel=2)
    return {"torch": torch_version, "triton": triton_version, "tested_range": text,
            "in_tested_range": not reason, "reason": reason}
