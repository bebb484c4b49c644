"""``crmvae-fast bench --readme``: the README's results table, measured on the machine at hand.

It prints, as Markdown, a header naming the machine (CPU model and cores, the GPU or none), the date, the Python,
torch, triton and MultiVae versions and the torch threads, then one row per measurement, each with the command
that reproduces it (``crmvae-fast bench --readme ROW``):

* ``nll-3x32``: ``compute_joint_nll`` of three 32-feature modalities, latent 8, n = 64, K = 1000;
* ``nll-784+10``: the same for a 784 + 10 feature model (an image and its label), latent 10;
* ``train-step``: one forward + backward of the default MLP model on the workload of :mod:`crmvae_fast.counts`
  (3 modalities of 64 features, normal / bernoulli / laplace decoders, latent 10, B = 256, 20 % missing);
* ``launches``: the launches that step dispatches, counted (:func:`crmvae_fast.counts.issue_table`); on a
  machine without a GPU they are counted in a subprocess with ``TRITON_INTERPRET=1``, so the fused column counts
  the Triton kernels a GPU launches, not the eager twins a CPU falls back to.

Each provider runs the same weights: MultiVae 1.0.3's ``CRMVAE``, this package's eager reference
(``fast_kernels=False``) and its fused path (``fast_kernels=True``). The NLL rows are the benchmark suite's
``joint_nll`` cases, timed by :func:`~crmvae_fast.bench.run_case`; the training step is timed by
:func:`~crmvae_fast.bench.time_fn`, the suite's timer. Each time is the median of at least 3 calls after one
untimed call. ``--smoke`` runs tiny sizes to check the plumbing (its numbers mean nothing).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from typing import Callable, List, Optional

import torch

from .cases import NLL_FEATURES, NLL_LATENT, NLL_M, Case
from .environment import default_device, device_name, environment, multivae_unavailable
from .report import backend_of
from .runner import run_case
from .timing import summarize, time_fn

#: The providers of every row, in column order.
PROVIDERS = ("multivae", "eager", "fused")
#: ``--readme ROW`` keys, in table order.
ROWS = ("nll-3x32", "nll-784+10", "train-step", "launches")
#: The columns of the table (the header line it is checked against).
COLUMNS = ("measured", "MultiVae 1.0.3", "eager (`fast_kernels=False`)", "fused (`fast_kernels=True`)",
           "fused vs MultiVae", "reproduce")


def _ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    return f"{ms / 1e3:.2f} s" if ms >= 1000 else f"{ms:.3g} ms"


def _ratio(base: Optional[float], new: Optional[float], word: str) -> str:
    return "-" if not base or not new else f"{base / new:.2f}x {word}"


def _nll_row(key: str, what: str, M: int, features, latent: int, device: torch.device, smoke: bool,
             log: Callable[[str], None]) -> dict:
    n, K = (4, 20) if smoke else (64, 1000)
    case = Case("joint_nll", "eval", M, n, latent, "float32", {"n": n, "K": K, "features": features})
    env = environment(device)
    times = {}
    for p in PROVIDERS:
        row = run_case(case, p, device, env, smoke=smoke, log=log)
        times[p] = row["median_ms"]
    return {"key": key, "what": what.format(n=n, K=K), "cells": {p: _ms(times[p]) for p in PROVIDERS},
            "ratio": _ratio(times["multivae"], times["fused"], "faster"),
            "fused_ran": backend_of(case, "fused", device)}


def _nll_small(device, smoke, log):
    return _nll_row("nll-3x32", f"`compute_joint_nll`, three {NLL_FEATURES}-feature modalities, latent "
                    f"{NLL_LATENT}, n={{n}}, K={{K}}", NLL_M, NLL_FEATURES, NLL_LATENT, device, smoke, log)


def _nll_image(device, smoke, log):
    return _nll_row("nll-784+10", "`compute_joint_nll`, 784 + 10 features (image + label), latent 10, n={n}, K={K}",
                    2, [784, 10], 10, device, smoke, log)


def _train_step(device, smoke, log):
    from ..counts import issue_models

    B = 16 if smoke else 256
    times = {}
    providers = [p for p in PROVIDERS if p != "multivae" or not multivae_unavailable()]
    for p, (model, inputs) in issue_models(providers, device, B=B).items():
        def step(model=model, inputs=inputs):
            model.zero_grad(set_to_none=True)
            out = model(inputs)
            (out["loss"] if isinstance(out, dict) else out.loss).backward()

        step()  # untimed first call
        samples = time_fn(step, device, warmup_ms=0 if smoke else 25, rep_ms=10 if smoke else 1000,
                          min_reps=1 if smoke else 3, max_reps=3 if smoke else 1000)
        times[p] = summarize(samples)["median_ms"]
        log(f"  train-step [{p}]: {_ms(times[p])}")
    case = Case("train_step", "step", 3, B, 10)
    return {"key": "train-step",
            "what": f"training step, forward + backward, default MLP model: 3 x 64 features, latent 10, B={B}, "
                    "20 % missing",
            "cells": {p: _ms(times.get(p)) for p in PROVIDERS},
            "ratio": _ratio(times.get("multivae"), times.get("fused"), "faster"),
            "fused_ran": backend_of(case, "fused", device)}


def _launches(device, smoke, log):
    B = 16 if smoke else 256
    providers = [p for p in PROVIDERS if p != "multivae" or not multivae_unavailable()]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")  # this crmvae_fast, installed or not
    if device.type == "cpu":
        env["TRITON_INTERPRET"] = "1"  # the fused column counts the Triton kernels, as a GPU launches them
    code = ("import json, sys; from crmvae_fast.counts import issue_table; "
            f"rows = issue_table({providers!r}, device={str(device)!r}, B={B}); "
            "print(json.dumps({p: c.launches for p, c in rows.items()}))")
    log(f"  launches: counting {', '.join(providers)} at B={B} in a subprocess"
        + (" (TRITON_INTERPRET=1)" if device.type == "cpu" else ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"counting the launches failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}")
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    return {"key": "launches",
            "what": f"launches per training step above (non-view ATen ops + Triton launches, counted at B={B})",
            "cells": {p: str(counts[p]) if p in counts else "-" for p in PROVIDERS},
            "ratio": _ratio(counts.get("multivae"), counts.get("fused"), "fewer"),
            "fused_ran": "the Triton kernels" + (" (through the interpreter)" if device.type == "cpu" else "")}


_MEASURE = {"nll-3x32": _nll_small, "nll-784+10": _nll_image, "train-step": _train_step, "launches": _launches}


def _versions() -> str:
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = "not installed"
    try:
        from importlib.metadata import version

        multivae_v = version("multivae")
    except Exception:
        multivae_v = "not installed"
    return (f"Python {platform.python_version()}, torch {torch.__version__}, triton {triton_v}, "
            f"MultiVae {multivae_v}")


def _machine(device: torch.device) -> str:
    cpu = device_name(torch.device("cpu")).split(" (")[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {cores} cores, {platform.machine()}, {gpu}"


def format_readme_table(rows: List[dict], device: torch.device, elapsed_s: float, smoke: bool = False) -> str:
    """The Markdown block ``bench --readme`` prints: a header (machine, date, versions, threads, run time), the
    table (:data:`COLUMNS`), and which backends the fused column ran here."""
    env = environment(device)
    threads = torch.get_num_threads()
    head = [f"Measured with `crmvae-fast bench --readme` on {_machine(device)} (device `{device}`), "
            f"{env['date'][:10]}; {_versions()}; {threads} torch thread{'s' if threads != 1 else ''}; "
            f"{elapsed_s:.0f} s in all, load average {os.getloadavg()[0]:.1f} at the end. Times are medians of {'1 to 3' if smoke else 'at least 3'} calls after one "
            "untimed call."]
    if smoke:
        head.append("SMOKE RUN (`--smoke`): tiny sizes, the numbers mean nothing.")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cmd = f"`crmvae-fast bench --readme {r['key']}`"
        lines.append("| " + " | ".join([r["what"], *(r["cells"][p] for p in PROVIDERS), r["ratio"], cmd]) + " |")
    ran = "; ".join(f"{r['key']}: {r['fused_ran']}" for r in rows)
    foot = [f"What the fused column ran here: {ran} (eager: the op's eager twin, which the Triton ops run without a "
            "GPU; extension: the C++/CUDA extension; triton: the Triton kernels)."]
    return "\n\n".join(["\n".join(head), "\n".join(lines), "\n".join(foot)])


def main(which: str = "all", device: Optional[str] = None, smoke: bool = False) -> int:
    """Measure the rows ``which`` (``"all"`` or comma-separated keys of :data:`ROWS`) on ``device`` (default:
    a GPU when present) and print the README's table; progress goes to stderr. Returns 0; an unknown row is a ``ValueError``
    (the command line prints it as one line and exits 2)."""
    keys = list(ROWS) if which in (None, "all") else which.split(",")
    bad = [k for k in keys if k not in ROWS]
    if bad:
        raise ValueError(f"unknown --readme row {', '.join(bad)}; expected 'all' or some of {','.join(ROWS)}")
    dev = torch.device(device) if device else default_device()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    log(f"crmvae-fast bench --readme: {', '.join(keys)} on {dev} ({'smoke' if smoke else 'a few minutes'}), "
        f"started {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}")
    t0 = time.perf_counter()
    rows = [_MEASURE[k](dev, smoke, log) for k in keys]
    print(format_readme_table(rows, dev, time.perf_counter() - t0, smoke=smoke))
    return 0
