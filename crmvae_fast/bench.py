"""The benchmark library shared by ``crmvae-fast bench`` and the pytest-benchmark files in ``benchmarks/``.

Ops (``Case.op``) and their modes:

* ``latent_step`` (``fwd``, ``bwd``, ``full`` = fwd + bwd): PoE, M + 1 reparameterized samples, every KL.
* ``train_step`` (``step``): forward + backward + Adam step of the default MLP model.
* ``joint_nll`` (``eval``): ``compute_joint_nll`` (three 32-dim modalities, latent 8).

Providers: ``eager`` (:mod:`crmvae_fast.reference` / ``fast_kernels=False``), ``fused`` (:mod:`crmvae_fast.ops` /
``fast_kernels=True``), ``compile`` (``torch.compile`` of the eager math) and, for ``joint_nll`` only,
``multivae`` (MultiVae 1.0.3's ``CRMVAE`` on the same weights, the SPEC's peer). The eager and compile providers
draw their noise with ``torch.randn`` inside the timed call, as a training step does; the fused op draws it in
the kernel.

Timing (:func:`time_fn`): on a GPU, CUDA events around each call, with warm-up, an L2 flush before each call and
a synchronize (``triton.testing.do_bench`` style); on a CPU, ``time.perf_counter``. Rows report the median and
the 20/80 % quantiles in ms, the peak memory (``torch.cuda.max_memory_allocated`` on a GPU; None on a CPU, where
tracemalloc does not see torch's allocations), the fewest bytes the op must move (:func:`latent_step_bytes`) and,
on a GPU, the achieved bandwidth against the card's measured device-to-device copy bandwidth.

Rows are dicts (:data:`ROW_KEYS`) appended as JSON lines to one file, ``benchmarks/results/results.jsonl``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence

import torch

OPS = ("latent_step", "joint_nll", "train_step")
MODES = {"latent_step": ("fwd", "bwd", "full"), "joint_nll": ("eval",), "train_step": ("step",)}
PROVIDERS = ("eager", "fused", "compile", "multivae")
#: Sizes of the full suite (M, B, D); big ones are skipped where the device cannot take them quickly.
FULL_M = (2, 5)
FULL_D = (32, 512)
FULL_B = (256, 4096, 65536)
#: (M, B, D) of the full sweep, as pytest ids.
FULL_SIZES = [(M, B, D) for M in FULL_M for D in FULL_D for B in FULL_B]


def size_id(size) -> str:
    return "M{}-B{}-D{}".format(*size)


#: The SPEC's target configuration (one H100, float32): run first so that a time budget never drops it.
TARGET = (5, 4096, 512)
#: Features per modality of the synthetic data in the ``train_step`` case (default MLP model).
TRAIN_FEATURES = 64
#: The ``joint_nll`` case: three modalities of 32 features, latent 8.
NLL_M, NLL_FEATURES, NLL_LATENT = 3, 32, 8
#: CPU limits (2-core class machines): largest M*B*D for the latent step, largest M*B for a train step.
CPU_MAX_LATENT_ELEMS = 1 << 21
CPU_MAX_TRAIN_ROWS = 1 << 13
#: On a GPU, the compile provider of the train step is measured only at the target size (compiling a whole model
#: per shape takes tens of seconds, and run_gpu.sh must finish in 10 minutes).
GPU_COMPILE_TRAIN_SIZES = ((5, 4096, 512),)
#: On a GPU MultiVae's per-point NLL loop is timed once on this many points and scaled to n.
GPU_MULTIVAE_NLL_POINTS = 50
#: A quick CPU run compiles the latent step at this size only.
CPU_QUICK_COMPILE_SIZE = (5, 4096, 32)

ROW_KEYS = (
    "run_id", "date", "source", "device", "device_name", "torch", "triton", "cuda", "package_version",
    "git_commit", "git_dirty", "interpreter",
    "op", "mode", "provider", "backend", "dtype", "M", "B", "D", "params",
    "median_ms", "q20_ms", "q80_ms", "reps", "timer",
    "peak_mem_mb", "bytes", "bytes_formula", "gbps", "copy_gbps", "bw_fraction",
    "baseline", "speedup", "skipped", "note",
)

LATENT_BYTES_FORMULA = {
    "fwd": "e*(2MBD + 3BD + MBD) + MB + 4(M+1)B: reads mu,lv (2MBD) and mask (MB bytes); writes mu_J,lv_J,z_J "
           "(3BD), z (MBD) and the float32 KLs ((M+1)B); noise drawn in registers",
    "bwd": "e*(BD + MBD + 2MBD + 2MBD) + MB + 4(M+1)B: reads g_z_J (BD), g_z (MBD), mu,lv (2MBD), mask (MB "
           "bytes), g_KL ((M+1)B float32); writes d mu, d lv (2MBD); noise regenerated from the seed",
    "full": "fwd + bwd",
}


class Skip(Exception):
    """A (case, provider) that cannot run here; the message says why."""


@dataclass(frozen=True)
class Case:
    op: str
    mode: str
    M: int
    B: int
    D: int
    dtype: str = "float32"
    params: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def label(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.params.items())
        return f"{self.op}/{self.mode} M={self.M} B={self.B} D={self.D}{extra}"


# ------------------------------------------------------------------------------------------------ environment
def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "float64": torch.float64}[name]


def _git(*args) -> Optional[str]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    """``$CRMVAE_BENCH_JSON``, else ``benchmarks/results/results.jsonl`` of the source tree when there is one,
    else ``crmvae_fast_results.jsonl`` in the working directory."""
    env = os.environ.get("CRMVAE_BENCH_JSON")
    if env:
        return env
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(root, "benchmarks")):
        return os.path.join(root, "benchmarks", "results", "results.jsonl")
    return os.path.abspath("crmvae_fast_results.jsonl")


# ------------------------------------------------------------------------------------------------------ timing
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


def latent_step_bytes(M: int, B: int, D: int, mode: str, elem: int = 4) -> int:
    """The fewest bytes the fused latent step must move (see :data:`LATENT_BYTES_FORMULA`); ``elem`` is the
    element size of mu and lv, the mask is 1 byte per entry, the KL terms and their gradients float32."""
    MBD, BD, MB = M * B * D, B * D, M * B
    fwd = elem * (2 * MBD + 3 * BD + MBD) + MB + 4 * (M + 1) * B
    bwd = elem * (BD + MBD + 2 * MBD + 2 * MBD) + MB + 4 * (M + 1) * B
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


# ------------------------------------------------------------------------------------------- availability
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


def _multivae_unavailable() -> Optional[str]:
    try:
        import multivae.models  # noqa: F401
    except Exception as exc:
        return f"multivae is not importable ({exc.__class__.__name__}: {exc})"
    return None


def skip_reason(case: Case, provider: str, device: torch.device, quick: bool = False) -> Optional[str]:
    """Why ``provider`` does not run ``case`` on ``device`` (printed and stored in the row), or None."""
    if provider == "multivae" and case.op != "joint_nll":
        return "multivae is a provider of joint_nll only"
    if provider == "multivae":
        return _multivae_unavailable()
    if (quick and device.type == "cpu" and case.op == "joint_nll" and provider == "eager"
            and _multivae_unavailable() is None):
        return ("quick run on a CPU: the eager NLL (MultiVae's per-point loop on our model) is measured in the full "
                "suite; the peer here is multivae")
    if provider == "compile":
        if case.op == "joint_nll":
            return ("no compile provider for joint_nll: compute_joint_nll loops over sample chunks in Python, "
                    "compiling it would unroll that loop; the peers are multivae and eager")
        reason = compile_unavailable(device)
        if reason:
            return reason
        if quick and device.type == "cpu" and case.op == "train_step":
            return "quick run on a CPU: compiling the whole train step takes tens of seconds"
        if quick and device.type == "cpu" and (case.M, case.B, case.D) != CPU_QUICK_COMPILE_SIZE:
            return f"quick run on a CPU: compile measured at M,B,D = {CPU_QUICK_COMPILE_SIZE} only (~15 s per shape)"
        size = (case.M, case.B, case.D)
        if case.op == "train_step" and device.type == "cuda" and size not in GPU_COMPILE_TRAIN_SIZES:
            return ("compile of the whole train step measured on GPU only at M,B,D in "
                    f"{list(GPU_COMPILE_TRAIN_SIZES)} (tens of seconds of compilation per shape)")
    if device.type == "cpu":
        if case.op == "latent_step" and case.M * case.B * case.D > CPU_MAX_LATENT_ELEMS:
            return f"M*B*D = {case.M * case.B * case.D} > {CPU_MAX_LATENT_ELEMS}: too slow for a CPU run"
        if case.op == "train_step" and case.M * case.B > CPU_MAX_TRAIN_ROWS:
            return f"M*B = {case.M * case.B} > {CPU_MAX_TRAIN_ROWS}: MLP step too slow for a CPU run"
        if (provider == "fused" and case.op == "latent_step" and case.M * case.B * case.D > 1 << 15
                and os.environ.get("TRITON_INTERPRET", "0") == "1"):
            return "TRITON_INTERPRET=1: the fused kernels run in the Triton interpreter, too slow past M*B*D=2^15"
    if device.type == "cuda" and case.op == "latent_step":
        need = 16 * case.M * case.B * case.D * _dtype(case.dtype).itemsize
        free, _ = torch.cuda.mem_get_info(device)
        if need > free:
            return f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return None


def backend_of(case: Case, provider: str, device: torch.device) -> str:
    """What actually runs ``provider`` here (a fused op on a CPU without the interpreter falls back to eager)."""
    if provider == "eager":
        return "eager"
    if provider == "compile":
        return "inductor"
    if provider == "multivae":
        return "multivae"
    try:
        from ._backend import backend_info

        info = backend_info()
    except Exception:
        return "unknown"
    if case.op == "latent_step":
        return str(info["latent_step"].get(device.type))
    if case.op == "joint_nll":
        return str(info["joint_nll"].get(device.type))
    return f"latent_step={info['latent_step'].get(device.type)}"


# ------------------------------------------------------------------------------------------------------ cases
def suite_cases(device: torch.device, quick: bool = False, smoke: bool = False, ops: Iterable[str] = OPS,
                dtype: str = "float32") -> List[Case]:
    """The cases of a run, target configuration first. ``smoke``: tiny sizes (checks the plumbing, the numbers
    mean nothing); ``quick``: small sizes, under a minute on a 2-core CPU; else the full sweep."""
    ops = list(ops)
    gpu = device.type == "cuda"
    if smoke:
        latent = [(2, 16, 8)]
        train = [(2, 16, 8)]
        nll = [dict(n=4, K=20)]
    elif quick:
        latent = [(2, 256, 32), (5, 4096, 32)] if not gpu else [(2, 256, 32), TARGET, (5, 65536, 512)]
        train = [(2, 256, 32)] if not gpu else [(2, 256, 32), TARGET]
        nll = [dict(n=64, K=1000)] if not gpu else [dict(n=1000, K=1000)]
    else:
        sizes = [(M, B, D) for M in FULL_M for D in FULL_D for B in FULL_B]
        sizes.sort(key=lambda s: s != TARGET)
        latent = train = sizes
        nll = [dict(n=1000, K=1000)] if gpu else [dict(n=64, K=1000)]
    out = []
    for op in ops:
        if op == "latent_step":
            out += [Case(op, mode, M, B, D, dtype) for (M, B, D) in latent for mode in MODES[op]]
        elif op == "train_step":
            out += [Case(op, "step", M, B, D, dtype, {"features": TRAIN_FEATURES}) for (M, B, D) in train]
        elif op == "joint_nll":
            out += [Case(op, "eval", NLL_M, p["n"], NLL_LATENT, "float32",
                         {"n": p["n"], "K": p["K"], "features": NLL_FEATURES}) for p in nll]
        else:
            raise ValueError(f"unknown op {op!r}; expected some of {OPS}")
    if not smoke:  # the SPEC's target first, so a time budget never drops it
        out.sort(key=lambda c: (c.M, c.B, c.D) != TARGET and c.op != "joint_nll")
    return out


def _random_mask(M: int, B: int, device, generator: torch.Generator, missing: float = 0.2) -> torch.Tensor:
    mask = torch.rand(M, B, generator=generator) >= missing
    mask[0] |= ~mask.any(0)  # never a sample with no observed modality
    return mask.to(device)


def _eager_latent_step(mu, lv, mask):
    from . import reference

    return reference.latent_step(mu, lv, mask, *reference.draw_noise(mu))


def _fused_latent_step():
    from . import ops

    return ops.latent_step


def _compiled(fn):
    import torch._dynamo

    torch._dynamo.reset()  # one compile per case: no recompile limit, no cache carried between shapes
    return torch.compile(fn, dynamic=False)


def build(case: Case, provider: str, device: torch.device, quick: bool = False) -> tuple:
    """``(fn, note)``: a zero-argument callable running ``case`` with ``provider``, inputs already made.
    Raises :class:`Skip` when it cannot run here."""
    reason = skip_reason(case, provider, device, quick)
    if reason:
        raise Skip(reason)
    if case.op == "latent_step":
        return _build_latent(case, provider, device), None
    if case.op == "train_step":
        return _build_train(case, provider, device), None
    if case.op == "joint_nll":
        return _build_nll(case, provider, device)
    raise ValueError(f"unknown op {case.op!r}")


_COMPILED_LATENT: dict = {}


def _compiled_latent_step(case: Case):
    """``torch.compile`` of the eager latent step, compiled once per (M, B, D, dtype) and shared by the three
    modes (a new size resets dynamo: no recompile limit, nothing carried between shapes)."""
    key = (case.M, case.B, case.D, case.dtype)
    if key not in _COMPILED_LATENT:
        _COMPILED_LATENT.clear()
        _COMPILED_LATENT[key] = _compiled(_eager_latent_step)
    return _COMPILED_LATENT[key]


def _set_donated_buffers(value: Optional[bool]) -> Optional[bool]:
    """Set ``torch._functorch.config.donated_buffer`` (when it exists) and return its old value.

    The ``bwd`` mode calls the same backward again (``retain_graph=True``), which a compiled backward with
    donated buffers refuses; the compile provider of the latent step is compiled without them in every mode, so
    one compilation serves fwd, bwd and full (donated buffers only let the backward reuse saved buffers: the
    compile rows' peak memory may be a little higher for it). A context manager does not do: dynamo guards on
    the config and recompiles once it is restored, so the value stays set until the case is done
    (``fn.cleanup``)."""
    try:
        import torch._functorch.config as fconfig
    except Exception:  # pragma: no cover
        return None
    if value is None or not hasattr(fconfig, "donated_buffer"):
        return None
    old = fconfig.donated_buffer
    fconfig.donated_buffer = value
    return old


def _build_latent(case: Case, provider: str, device: torch.device):
    M, B, D = case.M, case.B, case.D
    dt = _dtype(case.dtype)
    g = torch.Generator().manual_seed(0)
    gd = torch.Generator(device=device).manual_seed(0)  # big tensors drawn on the device: fast set-up on a GPU
    mu = torch.randn(M, B, D, generator=gd, device=device).to(dt).requires_grad_()
    lv = (0.5 * torch.randn(M, B, D, generator=gd, device=device)).to(dt).requires_grad_()
    mask = _random_mask(M, B, device, g)
    if provider == "eager":
        step = _eager_latent_step
    elif provider == "fused":
        step = _fused_latent_step()
    elif provider == "compile":
        step = _compiled_latent_step(case)
    else:
        raise Skip(f"no provider {provider!r} for latent_step")
    old_donated = _set_donated_buffers(False) if provider == "compile" else None
    out = step(mu, lv, mask)  # also triggers compilation outside the timed region
    # The training loss uses z_J, z and the KLs (mu_J and lv_J only through the KLs).
    used = (out.z_J, out.z, out.kl_prior, out.kl_experts)
    grads = [torch.randn(t.shape, generator=gd, device=device).to(t.dtype) for t in used]
    torch.autograd.grad(used, (mu, lv), grads)  # compile / warm the backward too
    del out, used

    if case.mode == "fwd":
        def fn():
            return step(mu, lv, mask)
    elif case.mode == "bwd":
        out = step(mu, lv, mask)
        used = (out.z_J, out.z, out.kl_prior, out.kl_experts)

        def fn():
            return torch.autograd.grad(used, (mu, lv), grads, retain_graph=True)
    else:
        def fn():
            o = step(mu, lv, mask)
            return torch.autograd.grad((o.z_J, o.z, o.kl_prior, o.kl_experts), (mu, lv), grads)
    if old_donated is not None:
        fn.cleanup = lambda: _set_donated_buffers(old_donated)  # type: ignore[attr-defined]
    return fn


def _model_api():
    try:
        from . import CRMVAE, CRMVAEConfig
    except Exception as exc:
        raise Skip(f"crmvae_fast.CRMVAE is not importable: {exc!r}") from exc
    return CRMVAE, CRMVAEConfig


def _random_batch(M: int, B: int, F: int, device, g: torch.Generator, missing: float = 0.2) -> dict:
    mask = _random_mask(M, B, "cpu", g, missing)
    data = {f"m{i}": torch.rand(B, F, generator=g).to(device) for i in range(M)}
    return {"data": data, "masks": {f"m{i}": mask[i].to(device) for i in range(M)}}


def _build_train(case: Case, provider: str, device: torch.device):
    CRMVAE, CRMVAEConfig = _model_api()
    M, B, D, F = case.M, case.B, case.D, case.params.get("features", TRAIN_FEATURES)
    cfg = CRMVAEConfig(n_modalities=M, latent_dim=D, input_dims={f"m{i}": (F,) for i in range(M)})
    torch.manual_seed(0)
    model = CRMVAE(cfg, fast_kernels=(provider == "fused")).to(device)
    if case.dtype != "float32":
        raise Skip("train_step is measured in float32 only")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batch = _random_batch(M, B, F, device, torch.Generator().manual_seed(0))
    call = _compiled(model) if provider == "compile" else model

    def fn():
        opt.zero_grad(set_to_none=True)
        out = call(batch)
        out["loss"].backward()
        opt.step()
        return out["loss"]

    fn()  # warm-up (and compilation) outside the timed region
    return fn


def _nll_inputs(case: Case, device, g):
    n, F = case.params["n"], case.params.get("features", NLL_FEATURES)
    return {f"m{i}": torch.rand(n, F, generator=g).to(device) for i in range(case.M)}


def _build_nll(case: Case, provider: str, device: torch.device):
    CRMVAE, CRMVAEConfig = _model_api()
    M, D, K = case.M, case.D, case.params["K"]
    F = case.params.get("features", NLL_FEATURES)
    cfg = CRMVAEConfig(n_modalities=M, latent_dim=D, input_dims={f"m{i}": (F,) for i in range(M)})
    torch.manual_seed(0)
    model = CRMVAE(cfg, fast_kernels=(provider == "fused"))  # same seed: same weights for every provider
    data = _nll_inputs(case, device, torch.Generator().manual_seed(1))
    note = None
    if provider == "multivae":
        from multivae.data.datasets.base import MultimodalBaseDataset
        from multivae.models import CRMVAE as MVCRMVAE, CRMVAEConfig as MVConfig

        mv = MVCRMVAE(MVConfig(n_modalities=M, latent_dim=D, input_dims={f"m{i}": (F,) for i in range(M)}))
        try:
            mv.load_state_dict(model.state_dict())
        except Exception as exc:
            raise Skip(f"the state_dict does not load into MultiVae's CRMVAE: {exc}") from exc
        mv = mv.to(device)
        n = case.params["n"]
        if device.type == "cuda" and n > GPU_MULTIVAE_NLL_POINTS:
            sub = GPU_MULTIVAE_NLL_POINTS
            note = (f"MultiVae timed once on the first {sub} of {n} points and scaled by {n}/{sub} "
                    "(its Python loop over points is linear in n)")
            inputs = MultimodalBaseDataset(data={m: x[:sub] for m, x in data.items()})
            scale = n / sub
        else:
            inputs = MultimodalBaseDataset(data=data)
            scale = 1.0
        mv.compute_joint_nll(MultimodalBaseDataset(data={m: x[:2] for m, x in data.items()}), K=K)  # warm-up

        def fn():
            return mv.compute_joint_nll(inputs, K=K, batch_size_K=100)

        fn.scale = scale  # type: ignore[attr-defined]
        fn.single_run = device.type == "cuda"  # type: ignore[attr-defined]
        return fn, note
    model = model.to(device)
    inputs = {"data": data}

    def fn():
        return model.compute_joint_nll(inputs, K=K, batch_size_K=100)

    fn()  # warm-up
    return fn, note


# -------------------------------------------------------------------------------------------------------- rows
def make_row(env: dict, case: Case, provider: str, device: torch.device, *, stats: Optional[dict] = None,
             timer: Optional[str] = None, peak_mem_mb: Optional[float] = None, skipped: Optional[str] = None,
             note: Optional[str] = None) -> dict:
    """One JSON row (keys :data:`ROW_KEYS`)."""
    stats = stats or {}
    row = {k: None for k in ROW_KEYS}
    row.update(env)
    row.update(op=case.op, mode=case.mode, provider=provider, dtype=case.dtype, M=case.M, B=case.B, D=case.D,
               params=dict(case.params), timer=timer, peak_mem_mb=peak_mem_mb, skipped=skipped, note=note,
               backend=None if skipped else backend_of(case, provider, device))
    row.update({k: stats.get(k) for k in ("median_ms", "q20_ms", "q80_ms", "reps")})
    if case.op == "latent_step":
        nbytes = latent_step_bytes(case.M, case.B, case.D, case.mode, _dtype(case.dtype).itemsize)
        row["bytes"] = nbytes
        row["bytes_formula"] = LATENT_BYTES_FORMULA[case.mode]
        if row["median_ms"]:
            row["gbps"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
            if device.type == "cuda":
                row["copy_gbps"] = copy_bandwidth_gbps(device)
                row["bw_fraction"] = row["gbps"] / row["copy_gbps"]
    else:
        row["bytes_formula"] = "not reported: matmul-bound (decoders / MLP), bytes do not bound it"
    if env.get("interpreter") and provider == "fused" and device.type == "cpu":
        row["note"] = ((row["note"] + "; ") if row["note"] else "") + \
            "TRITON_INTERPRET=1: fused kernels ran in the Triton interpreter, the time means nothing"
    return row


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
            heavy = case.op != "latent_step"
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
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if log:
        log(f"  {case.label} [{provider}]: {row['median_ms']:.4g} ms")
    return row


def attach_speedups(rows: List[dict]) -> List[dict]:
    """Set ``baseline`` and ``speedup`` (baseline median / row median) on the rows of one run: the baseline is
    ``multivae`` for joint_nll when it ran (the SPEC's peer), else ``eager``."""
    groups = {}
    for r in rows:
        groups.setdefault(_group_key(r), []).append(r)
    for rs in groups.values():
        by = {r["provider"]: r for r in rs if r.get("median_ms")}
        base = "multivae" if ("multivae" in by and rs[0]["op"] == "joint_nll") else "eager"
        for r in rs:
            r["baseline"] = base if base in by else None
            if base in by and r.get("median_ms"):
                r["speedup"] = by[base]["median_ms"] / r["median_ms"]
            if r["op"] == "joint_nll" and base == "eager" and r.get("median_ms") and r["provider"] != "eager":
                msg = "MultiVae did not run here (see its row): the NLL baseline is eager (fast_kernels=False)"
                if msg not in (r.get("note") or ""):
                    r["note"] = ((r["note"] + "; ") if r.get("note") else "") + msg
    return rows


def _group_key(r: dict) -> tuple:
    return (r.get("run_id"), r["op"], r["mode"], r["dtype"], r["M"], r["B"], r["D"],
            json.dumps(r.get("params") or {}, sort_keys=True))


def run_suite(device: Optional[torch.device] = None, *, quick: bool = False, smoke: bool = False,
              ops: Iterable[str] = OPS, providers: Iterable[str] = PROVIDERS, dtype: str = "float32",
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
            if provider == "multivae" and case.op != "joint_nll":
                continue
            if case.op == "joint_nll" and provider == "multivae" and _multivae_unavailable():
                if log:
                    log(f"  skip {case.label} [multivae]: {_multivae_unavailable()}; the baseline is eager "
                        "(fast_kernels=False)")
                rows.append(make_row(env, case, provider, device, skipped=_multivae_unavailable()))
                continue
            if budget_s is not None and time.perf_counter() - t_start > budget_s:
                rows.append(make_row(env, case, provider, device,
                                     skipped=f"time budget of {budget_s:.0f} s spent before this case"))
                continue
            rows.append(run_case(case, provider, device, env, quick=quick, smoke=smoke, log=log))
            if on_row is not None:
                on_row(rows[-1])
    return attach_speedups(rows)


def append_rows(rows: Iterable[dict], path: Optional[str] = None) -> str:
    """Append rows as JSON lines to ``path`` (default :func:`default_results_path`); returns the path."""
    path = path or default_results_path()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fp:
        for r in rows:
            fp.write(json.dumps(r, sort_keys=False) + "\n")
    return path


def read_rows(path: str) -> List[dict]:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as fp:
        for line in fp:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


# ----------------------------------------------------------------------------------------------- table / plot
def _fmt(x, spec=".3g", none="-"):
    return none if x is None else format(x, spec)


def format_table(rows: List[dict]) -> str:
    """A plain-text table: one line per (case, provider), times in ms with the 20-80 % range, the speed-up
    over the baseline, peak memory and, for the latent step, GB/s and the fraction of the copy bandwidth."""
    head = ["op", "mode", "M", "B", "D", "provider", "backend", "median ms", "q20-q80 ms", "speed-up",
            "peak MB", "GB/s", "% copy BW"]
    lines = [head]
    order = {p: i for i, p in enumerate(PROVIDERS)}
    skipped = []
    for r in sorted(rows, key=lambda r: (OPS.index(r["op"]) if r["op"] in OPS else 9, r["mode"], r["M"], r["D"],
                                         r["B"], order.get(r["provider"], 9))):
        if r.get("skipped"):
            skipped.append(f"  {r['op']}/{r['mode']} M={r['M']} B={r['B']} D={r['D']} [{r['provider']}]: "
                           f"{r['skipped']}")
            continue
        sp = r.get("speedup")
        lines.append([r["op"], r["mode"], str(r["M"]), str(r["B"]), str(r["D"]), r["provider"], r.get("backend") or "-",
                      _fmt(r["median_ms"], ".4g"), f"{_fmt(r['q20_ms'], '.4g')}-{_fmt(r['q80_ms'], '.4g')}",
                      "-" if sp is None else f"{sp:.2f}x vs {r['baseline']}", _fmt(r.get("peak_mem_mb"), ".1f"),
                      _fmt(r.get("gbps"), ".1f"),
                      "-" if r.get("bw_fraction") is None else f"{100 * r['bw_fraction']:.0f}%"])
    widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    notes = sorted({r["note"] for r in rows if r.get("note")})
    if notes:
        out += ["", "notes:"] + [f"  {n}" for n in notes]
    if skipped:
        out += ["", "skipped:"] + skipped
    return "\n".join(out)


def plot(rows: List[dict], path: str) -> Optional[str]:
    """A PNG of speed-up against size (M*B*D), one panel per op/mode, one line per provider and (M, D). Returns
    None when written, else the reason (matplotlib missing, nothing measured)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401
    except Exception as exc:
        return f"matplotlib is not available ({exc.__class__.__name__}): no plot written"
    rows = [r for r in rows if r.get("speedup") is not None and r["provider"] != r.get("baseline")]
    if not rows:
        return "no speed-up to plot (no provider ran beside its baseline)"
    modes = {m: i for ms in MODES.values() for i, m in enumerate(ms)}
    panels = sorted({(r["op"], r["mode"]) for r in rows},
                    key=lambda p: (OPS.index(p[0]) if p[0] in OPS else 9, modes.get(p[1], 9)))
    ncol = min(3, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.8 * nrow), squeeze=False)
    colors = {"fused": "tab:blue", "compile": "tab:orange", "eager": "tab:green"}
    styles = ["-", "--", ":", "-."]
    for ax, (op, mode) in zip(axes.flat, panels):
        rs = [r for r in rows if (r["op"], r["mode"]) == (op, mode)]
        md = sorted({(r["M"], r["D"]) for r in rs})
        x_of = (lambda r: r["B"]) if op == "joint_nll" else (lambda r: r["M"] * r["B"] * r["D"])
        for prov, M, D in sorted({(r["provider"], r["M"], r["D"]) for r in rs}):
            pts = sorted((x_of(r), r["speedup"]) for r in rs if (r["provider"], r["M"], r["D"]) == (prov, M, D))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors.get(prov),
                    ls=styles[md.index((M, D)) % len(styles)], label=f"{prov} M={M} D={D}")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("n (data points)" if op == "joint_nll" else "M*B*D")
        ax.set_ylabel(f"speed-up vs {rs[0]['baseline']}")
        ax.set_title(f"{op} / {mode}")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    r0 = rows[0]
    fig.suptitle(f"crmvae_fast {r0.get('package_version')} on {r0.get('device_name')}, {r0.get('date', '')[:10]}",
                 fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------------------- pytest-benchmark
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
