"""Running benchmarks: why a (case, provider) cannot run here (:func:`skip_reason`), building it through its
spec (:func:`build`), timing it into a row (:func:`run_case`) and a whole run (:func:`run_suite`). Nothing here
names an op: the specs in :mod:`crmvae_fast.bench.cases` say everything op-specific."""

from __future__ import annotations

import time
from typing import Callable, Iterable, List, Optional

import torch

from .cases import PROVIDERS, SPECS, Case, Skip, suite_cases
from .environment import compile_unavailable, default_device, environment, multivae_unavailable
from .report import attach_speedups, make_row
from .timing import _sync, copy_bandwidth_gbps, peak_memory_mb, summarize, time_fn


def skip_reason(case: Case, provider: str, device: torch.device, quick: bool = False) -> Optional[str]:
    """Why ``provider`` does not run ``case`` on ``device`` (printed and stored in the row), or None: the
    provider is not one of the op's, the op's spec says why not (sizes, providers that do not apply), or
    torch.compile / MultiVae are not available here."""
    spec = SPECS.get(case.op)
    if spec is None:
        return f"no benchmark spec for op {case.op!r}; expected one of {tuple(SPECS)}"
    if provider not in spec.providers:
        return f"{provider} is not a provider of {case.op} (its providers: {', '.join(spec.providers)})"
    reason = spec.skip(case, provider, device, quick)
    if reason:
        return reason
    if provider == "multivae":
        return multivae_unavailable()
    if provider == "compile":
        return compile_unavailable(device)
    return None


def build(case: Case, provider: str, device: torch.device, quick: bool = False) -> tuple:
    """``(fn, note)``: a zero-argument callable running ``case`` with ``provider``, inputs already made.
    Raises :class:`Skip` when it cannot run here."""
    reason = skip_reason(case, provider, device, quick)
    if reason:
        raise Skip(reason)
    return SPECS[case.op].build(case, provider, device, quick)


def run_case(case: Case, provider: str, device: torch.device, env: dict, *, quick: bool = False,
             smoke: bool = False, timer: Optional[Callable] = None,
             log: Optional[Callable[[str], None]] = print) -> dict:
    """Build, time and measure one (case, provider); a row, with ``skipped`` set when it could not run.

    ``timer(fn) -> (samples_ms, timer_name)`` replaces :func:`time_fn` (the pytest files pass pytest-benchmark).
    """
    def skipped(msg: str) -> dict:
        if log:
            log(f"  skip {case.label} [{provider}]: {msg}")
        return make_row(env, case, provider, device, skipped=msg)

    def failed(what: str, exc: Exception) -> dict:  # OOM and the like: say so in the row, go on
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return skipped(f"{what}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    try:
        fn, note = build(case, provider, device, quick=quick and not smoke)
    except Skip as exc:
        return skipped(str(exc))
    except Exception as exc:
        return failed("failed to build", exc)
    try:
        if getattr(fn, "single_run", False):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples, timer_name = [(time.perf_counter() - t0) * 1e3], "single-run"
            peak = None
        elif timer is not None:
            samples, timer_name = timer(fn)
            peak = peak_memory_mb(fn, device)
        else:
            heavy = SPECS[case.op].heavy
            short = quick or smoke
            extra = {}
            samples = time_fn(fn, device, warmup_ms=0 if heavy else (10 if short else 25),
                              rep_ms=(300 if short else 1000) if heavy else (100 if short else 200),
                              min_reps=1 if smoke else 3, max_reps=3 if smoke else 1000, stats=extra)
            timer_name = "cuda-events" if device.type == "cuda" else "perf_counter"
            peak = extra.get("peak_mem_mb")
        scale = getattr(fn, "scale", 1.0)
        samples = [s * scale for s in samples]
    except Exception as exc:
        return failed("failed", exc)
    finally:
        cleanup = getattr(fn, "cleanup", None)
        if cleanup is not None:
            cleanup()
        del fn
    row = make_row(env, case, provider, device, stats=summarize(samples), timer=timer_name, peak_mem_mb=peak,
                   note=note)
    figures = SPECS[case.op].figures
    if figures is not None:  # device-independent figures, once per (case, provider), outside the timed region
        try:
            row.update(figures(case, provider, device))
        except Exception as exc:
            msg = str(exc).strip().splitlines()
            row["figures_reason"] = f"failed: {exc.__class__.__name__}: {msg[0] if msg else ''}"[:300]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if log:
        log(f"  {case.label} [{provider}]: {row['median_ms']:.4g} ms")
    return row


def run_suite(device: Optional[torch.device] = None, *, quick: bool = False, smoke: bool = False,
              ops: Optional[Iterable[str]] = None, providers: Iterable[str] = PROVIDERS, dtype: str = "float32",
              budget_s: Optional[float] = None, log: Optional[Callable[[str], None]] = print,
              source: str = "cli", on_row: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """Run every (case, provider) and return the rows (speed-ups attached). Cases left when ``budget_s``
    seconds have passed are recorded as skipped, with that reason. ``on_row(row)`` sees each row as it is made
    (before speed-ups are attached), e.g. to save progress."""
    device = device or default_device()
    env = environment(device, source)
    providers = list(providers)
    t_start = time.perf_counter()
    rows = []
    if device.type == "cuda" and log:
        log(f"device-to-device copy bandwidth: {copy_bandwidth_gbps(device):.0f} GB/s")
    for case in suite_cases(device, quick=quick, smoke=smoke, ops=ops, dtype=dtype):
        for provider in providers:
            if provider not in SPECS[case.op].providers:
                continue
            if provider == "multivae" and multivae_unavailable():
                if log:
                    log(f"  skip {case.label} [multivae]: {multivae_unavailable()}; the baseline is eager "
                        "(fast_kernels=False)")
                rows.append(make_row(env, case, provider, device, skipped=multivae_unavailable()))
                continue
            if budget_s is not None and time.perf_counter() - t_start > budget_s:
                rows.append(make_row(env, case, provider, device,
                                     skipped=f"time budget of {budget_s:.0f} s spent before this case"))
                continue
            rows.append(run_case(case, provider, device, env, quick=quick, smoke=smoke, log=log))
            if on_row is not None:
                on_row(rows[-1])
    return attach_speedups(rows)
