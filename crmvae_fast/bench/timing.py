"""How a benchmark is timed: CUDA events with warm-up and an L2 flush on a GPU, ``time.perf_counter`` on a CPU
(:func:`time_fn`), the median and 20/80 % quantiles (:func:`summarize`), the peak memory, the card's measured
copy bandwidth, and a timer for pytest-benchmark (:func:`pytest_timer`)."""

from __future__ import annotations

import math
import time
from typing import Callable, List, Optional, Sequence

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(samples_ms: Sequence[float]) -> dict:
    """Median and 20/80 % quantiles (linear interpolation) of a list of times in ms."""
    xs = sorted(float(x) for x in samples_ms)
    if not xs:
        return {"median_ms": None, "q20_ms": None, "q80_ms": None, "reps": 0}

    def q(p):
        pos = p * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"median_ms": q(0.5), "q20_ms": q(0.2), "q80_ms": q(0.8), "reps": len(xs)}


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
            min_reps: int = 3, max_reps: int = 1000, stats: Optional[dict] = None) -> List[float]:
    """Times of ``fn()`` in ms, one per call after warm-up (``fn`` has been called once already).

    GPU: ``triton.testing.do_bench`` style: a first call, timed with CUDA events, estimates the time (and gives
    the peak memory: ``torch.cuda.max_memory_allocated`` over that call, stored in ``stats["peak_mem_mb"]``
    when ``stats`` is given); then warm-up calls and repetitions sized to take about ``warmup_ms`` and
    ``rep_ms``, each repetition between CUDA events after a 256 MB L2 flush, and one synchronize at the end.
    CPU: ``time.perf_counter`` around each call, same budgets; no peak memory.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        est = max(start.elapsed_time(end), 1e-3)
        if stats is not None:
            stats["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        cache = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
        if 5 * est < rep_ms:  # fast: a better estimate from 5 more calls
            start.record()
            for _ in range(5):
                cache.zero_()
                fn()
            end.record()
            torch.cuda.synchronize(device)
            est = max(start.elapsed_time(end) / 5, 1e-3)
        n_warm = min(int(warmup_ms / est), 1000)
        n_rep = max(min_reps, min(max_reps, int(rep_ms / est)))
        for _ in range(n_warm):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        for i in range(n_rep):
            cache.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(device)
        del cache
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]

    t0 = time.perf_counter()
    fn()
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    n_warm = min(int(warmup_ms / est), 100)
    n_rep = max(min_reps, min(max_reps, int(rep_ms / est)))
    for _ in range(n_warm):
        fn()
    out = []
    for _ in range(n_rep):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """``torch.cuda.max_memory_allocated`` over one call of ``fn`` (MB, inputs included); None on a CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


_COPY_GBPS = {}


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> Optional[float]:
    """The card's device-to-device copy bandwidth (GB/s, read + write counted), measured once per process
    with a ``copy_`` of ``nbytes``; None on a CPU."""
    if device.type != "cuda":
        return None
    key = str(device)
    if key not in _COPY_GBPS:
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = min(nbytes, free // 4)
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        ms = summarize(time_fn(lambda: dst.copy_(src), device, rep_ms=200))["median_ms"]
        _COPY_GBPS[key] = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
        del src, dst
        torch.cuda.empty_cache()
    return _COPY_GBPS[key]


def pytest_timer(benchmark, device: torch.device, rounds: int = 20, warmup_rounds: int = 3) -> Callable:
    """A ``timer`` for :func:`run_case` that times with pytest-benchmark's ``benchmark.pedantic`` (each call
    followed by a synchronize on a GPU), so the numbers show in pytest-benchmark's report too."""

    def timer(fn):
        def call():
            fn()
            _sync(device)

        benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        stats = getattr(benchmark, "stats", None)
        data = getattr(getattr(stats, "stats", None), "data", None) if stats is not None else None
        if not data:
            return [], "pytest-benchmark (disabled)"
        return [x * 1e3 for x in data], "pytest-benchmark+sync"

    return timer
