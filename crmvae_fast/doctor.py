"""``crmvae-fast doctor`` (also ``python -m crmvae_fast.doctor``): does crmvae_fast work on this machine?

It prints, in order:

1. the versions (Python, torch and the CUDA it was built with, triton, the C++/CUDA extension, the GPU) against
   the range the package is tested on (:mod:`crmvae_fast.versions`);
2. where each registered op (:data:`crmvae_fast.registry.OPS`) runs on each device here: Triton, the Triton
   interpreter, the extension, or its eager twin and why (:func:`crmvae_fast._backend.op_backend`);
3. a table of verdicts: every registered op, forward and backward, against its eager twin on each device, in
   float32 and bfloat16 (the extension op in float32 and float64, forward only: it has no backward), with the
   tolerances of :data:`TOL`; one step of the default model, fused against ``fast_kernels=False``; and where a
   GPU is there, that step captured in a CUDA graph and run under ``torch.compile``, each against the same step
   run eagerly on the same seed;
4. one summary line. The exit code is 1 when any check fails (a mismatch, or an error: a check that raises is
   a FAIL with its error, and the other checks still run), 2 on bad arguments, else 0.

Each op's inputs come from :data:`CASES`, one entry per op name; an op registered without one fails its check
(``tests/test_doctor.py`` checks that every op has one). The fused function and its twin are looked up in the
registry when a check runs, and both are called with the same arguments.

Without a GPU and without ``TRITON_INTERPRET=1`` the Triton ops run their eager twin on CPU tensors (the table's
``runner`` column says so); ``--interpreter`` then re-runs their checks in a child process started with
``TRITON_INTERPRET=1`` (it must be set before triton is imported), so one command checks the eager path, the
extension and the Triton kernels through the interpreter. Shapes are small and odd (B = 37, D = 13, M = 3):
seconds on a GPU (plus the compile of the model step), a few minutes through the interpreter.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

import torch

from . import _backend, registry, versions

#: (atol, rtol) for outputs and for gradients, per input dtype: an element passes when
#: ``|fused - twin| <= atol + rtol * |twin|``. Low precision: the twins round some intermediates (mu_J, lv_J)
#: to the input dtype where the kernels keep float32, so the sums over D differ by that rounding.
TOL = {
    torch.float32: {"out": (1e-4, 1e-4), "grad": (1e-3, 1e-3)},
    torch.bfloat16: {"out": (1.5e-1, 3e-2), "grad": (2.5e-1, 5e-2)},
    torch.float64: {"out": (1e-9, 1e-9), "grad": (1e-6, 1e-6)},
}

#: The check shapes: small, and none a power of two.
B, D, M = 37, 13, 3
_SEED = 11  # torch.manual_seed of the model checks


# ------------------------------------------------------------------------------------------------- check cases
@dataclass(frozen=True)
class Case:
    """How doctor checks one registered op. ``make(device, dtype, variant)`` returns ``(args, kwargs)`` that
    both the op's fused function (the first of its ``functions``) and its eager twin take; ``grad_args`` are the
    positions of the arguments to differentiate (empty: no backward, ``no_backward`` says why); ``variants`` are
    labels passed to ``make`` (one check each); ``dtypes`` the input dtypes to check."""

    make: Callable
    grad_args: tuple = (0, 1)
    variants: tuple = ("",)
    dtypes: tuple = (torch.float32, torch.bfloat16)
    no_backward: str = ""


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mask(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """(rows, cols) bool, about 70 % True, column 0 all False (a sample with no observed expert)."""
    w = torch.rand(rows, cols, generator=g) < 0.7
    w[:, 0] = False
    return w


def _experts(device, dtype):
    """(M, B, D) means and log-variances, an (M, B) mask, and the generator to draw more from."""
    g = _gen()
    mu = torch.randn(M, B, D, generator=g).to(device=device, dtype=dtype)
    lv = (0.7 * torch.randn(M, B, D, generator=g)).to(device=device, dtype=dtype)
    return mu, lv, _mask(M, B, g).to(device), g


def _latent_step_case(device, dtype, variant):
    mu, lv, mask, g = _experts(device, dtype)
    eps_J = torch.randn(B, D, generator=g).to(device=device, dtype=dtype)
    eps = torch.randn(M, B, D, generator=g).to(device=device, dtype=dtype)
    return (mu, lv, mask, eps_J, eps), {}


def _poe_case(device, dtype, variant):
    mu, lv, mask, _ = _experts(device, dtype)
    if variant == "mask":  # MultiVae's poe (MVTCAE, CRMVAE)
        return (mu, lv, mask), {}
    subsets = torch.tensor([[m in s for m in range(M)] for r in range(1, M + 1)  # every non-empty subset
                            for s in itertools.combinations(range(M), r)], device=device)
    return (mu, lv, mask), {"subsets": subsets, "prior_expert": True, "var_floor": 0.0}  # MoPoE / stable_poe


def _likelihood_case(device, dtype, variant):
    g = _gen()
    event = (3, 5) if variant == "categorical" else (3, 11)
    recon = 2 * torch.randn(2 * B, *event, generator=g)
    if variant == "bernoulli":
        target = torch.randint(0, 2, (B, *event), generator=g).float()
    elif variant == "categorical":
        target = torch.nn.functional.one_hot(torch.randint(0, event[-1], (B, *event[:-1]), generator=g),
                                             event[-1]).float()
    else:
        target = torch.randn(B, *event, generator=g)
    mask = _mask(1, B, g)[0]
    mask[1:] |= torch.rand(B - 1, generator=g) < 0.5  # only sample 0 surely missing
    return ((recon.to(device=device, dtype=dtype), target.to(device), variant, mask.to(device)),
            {"scale": 0.7, "rescale": 1.3, "inner": 1})


def _iw_logsumexp_case(device, dtype, variant):
    g = _gen()
    k = 29
    log_px = 10 * torch.randn(B, k, generator=g, dtype=torch.float64)
    mu_J = torch.randn(B, D, generator=g, dtype=torch.float64)
    lv_J = 0.5 * torch.randn(B, D, generator=g, dtype=torch.float64)
    z = mu_J[:, None] + torch.exp(0.5 * lv_J)[:, None] * torch.randn(B, k, D, generator=g, dtype=torch.float64)
    run_max = 3 * torch.randn(B, generator=g, dtype=torch.float64) - 20  # a state from earlier chunks
    run_sum = 0.5 + torch.rand(B, generator=g, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (log_px, z, mu_J, lv_J, run_max, run_sum)), {}


#: One check case per registered op name (:mod:`crmvae_fast.registry`).
CASES = {
    "latent_step": Case(_latent_step_case),
    "poe": Case(_poe_case, variants=("mask", "subsets+prior")),
    "likelihood": Case(_likelihood_case, grad_args=(0,), variants=("normal", "laplace", "bernoulli", "categorical")),
    "iw_logsumexp": Case(_iw_logsumexp_case, grad_args=(), dtypes=(torch.float32, torch.float64),
                         no_backward="evaluation only: the op registers no autograd formula"),
}


# ------------------------------------------------------------------------------------------------------ verdicts
def _row(check: str, device: str, dtype: str, runner: str, verdict: str, detail: str = "", max_err=None,
         ratio=None, tol=None) -> dict:
    return {"check": check, "device": device, "dtype": dtype, "runner": runner, "max_err": max_err,
            "err_over_tol": ratio, "tol": tol, "verdict": verdict, "detail": detail}


def _error(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


def _tensors(out) -> list:
    """The outputs of an op as ``[(name, tensor)]`` (a NamedTuple's fields name them)."""
    if isinstance(out, torch.Tensor):
        return [("out", out)]
    names = getattr(out, "_fields", None) or [f"out{i}" for i in range(len(out))]
    return list(zip(names, out))


def _mismatch(got: Sequence, want: Sequence) -> str:
    """What differs in the number, shapes or dtypes of two lists of ``(name, tensor)``; "" when nothing."""
    if len(got) != len(want):
        return f"{len(got)} outputs, the twin gives {len(want)}"
    for (name, a), (_, e) in zip(got, want):
        if a.shape != e.shape or a.dtype != e.dtype:
            return f"{name}: {tuple(a.shape)} {a.dtype}, the twin gives {tuple(e.shape)} {e.dtype}"
    return ""


def compare(got: Sequence, want: Sequence, tol: tuple) -> tuple:
    """``(max |got - want|, max |got - want| / (atol + rtol |want|), problem)`` over pairs ``(name, tensor)``;
    problem is "" or says which output differs in shape or dtype, or holds NaN/inf where the other does not.
    Equal non-finite values (NaN and NaN, inf and inf) count as equal."""
    atol, rtol = tol
    max_err, ratio = 0.0, 0.0
    problem = _mismatch(got, want)
    if problem:
        return math.inf, math.inf, problem
    for (name, a), (_, e) in zip(got, want):
        a, e = a.detach().double().cpu(), e.detach().double().cpu()
        same = (a == e) | (a.isnan() & e.isnan())
        diff = torch.where(same, 0.0, (a - e).abs())
        if not torch.isfinite(diff).all():
            return math.inf, math.inf, f"{name}: NaN or inf where the twin has a different value"
        if diff.numel():
            max_err = max(max_err, diff.max().item())
            ratio = max(ratio, torch.where(same, 0.0, diff / (atol + rtol * e.abs())).max().item())
    return max_err, ratio, ""


def _judge(check, device, dtype, runner, got, want, tol, note) -> dict:
    err, ratio, problem = compare(got, want, tol)
    verdict = "PASS" if not problem and ratio <= 1.0 else "FAIL"
    detail = problem or ("" if verdict == "PASS" else f"max error {err:.3g} is {ratio:.3g} x the tolerance")
    return _row(check, device, dtype, runner, verdict, "; ".join(s for s in (detail, note) if s), err, ratio,
                list(tol))


def _run_op(fn, args, kwargs, grad_args):
    """Call ``fn`` on fresh leaf copies of the differentiable arguments; ``(outputs, leaves)``."""
    args = list(args)
    leaves = []
    for i in grad_args:
        args[i] = args[i].detach().clone().requires_grad_()
        leaves.append(args[i])
    return _tensors(fn(*args, **kwargs)), leaves


def _check_op(spec, case: Case, device: str, dtype, variant: str, runner: str, note: str) -> list:
    """The forward and backward rows of one (op, variant, device, dtype)."""
    name = spec.name + (f"[{variant}]" if variant else "")
    dname = str(dtype).replace("torch.", "")
    tol = TOL[dtype]
    try:
        from . import ops

        fused = getattr(ops, spec.functions[0])  # looked up now: a patched function is the one checked
        twin = spec.twin_function()
        args, kwargs = case.make(torch.device(device), dtype, variant)
        got, got_leaves = _run_op(fused, args, kwargs, case.grad_args)
        want, want_leaves = _run_op(twin, args, kwargs, case.grad_args)
    except Exception as exc:
        err = _error(exc)
        bwd = _row(f"{name} bwd", device, dname, runner, "SKIP", "the forward failed") if case.grad_args else None
        return [r for r in (_row(f"{name} fwd", device, dname, runner, "FAIL", err), bwd) if r]
    rows = [_judge(f"{name} fwd", device, dname, runner, got, want, tol["out"], note)]
    if not case.grad_args:
        rows.append(_row(f"{name} bwd", device, dname, runner, "SKIP", case.no_backward))
        return rows
    if _mismatch(got, want):
        rows.append(_row(f"{name} bwd", device, dname, runner, "SKIP", "the outputs differ in shape or dtype"))
        return rows
    try:
        g = _gen(1)
        pairs = [(o, w) for (_, o), (_, w) in zip(got, want) if w.requires_grad and w.is_floating_point()]
        ups = [torch.randn(w.shape, generator=g).to(device=device, dtype=w.dtype) for _, w in pairs]
        d_got = torch.autograd.grad([o for o, _ in pairs], got_leaves, ups, allow_unused=True)
        d_want = torch.autograd.grad([w for _, w in pairs], want_leaves, ups, allow_unused=True)
        names = [f"d arg{i}" for i in case.grad_args]
        d_got = [(n, torch.zeros_like(x) if t is None else t) for n, t, x in zip(names, d_got, got_leaves)]
        d_want = [(n, torch.zeros_like(x) if t is None else t) for n, t, x in zip(names, d_want, want_leaves)]
        rows.append(_judge(f"{name} bwd", device, dname, runner, d_got, d_want, tol["grad"], note))
    except Exception as exc:
        rows.append(_row(f"{name} bwd", device, dname, runner, "FAIL", _error(exc)))
    return rows


def _where(spec, device: str) -> tuple:
    """``(runner, reason)`` of ``spec`` on ``device``, or ``("error", why)`` when asking raises."""
    try:
        runner, reason = _backend.op_backend(spec, torch.device(device).type)
        return runner or "none", reason
    except Exception as exc:  # e.g. CRMVAE_FAST_REQUIRE_EXT=1 and no extension
        return "error", _error(exc)


def op_rows(ops: Sequence[str], devices: Sequence[str]) -> Iterator[dict]:
    """The verdict rows of the registered ops ``ops`` on ``devices`` (see :data:`CASES`), as they come."""
    for name in ops:
        spec = registry.OPS[name]
        case = CASES.get(name)
        for device in devices:
            runner, reason = _where(spec, device)
            if case is None:
                yield _row(name, device, "-", runner, "FAIL", f"no doctor case for the registered op {name!r}: add "
                           "one to crmvae_fast.doctor.CASES")
                continue
            note = "no kernel here: the fused function ran its eager twin" if runner == "eager" else ""
            if runner == "error":
                note = reason
            for dtype in case.dtypes:
                for variant in case.variants:
                    yield from _check_op(spec, case, device, dtype, variant, runner, note)


# ------------------------------------------------------------------------------------------------ model checks
def _default_model(device: str, fast: bool = True):
    """The default model (MLP architectures for the synthetic dataset, latent 8) and a batch of B samples with
    20 % of the modalities missing, on ``device``; the weights are the same for every call."""
    from . import CRMVAE, CRMVAEConfig, synthetic

    torch.manual_seed(0)
    model = CRMVAE(CRMVAEConfig(**synthetic.model_config_kwargs()), fast_kernels=fast).to(device)
    batch = synthetic.to_device(synthetic.make_dataset(B, seed=0, missing_rate=0.2), device)
    return model, batch


def _step(model, batch, **kw) -> list:
    """One forward + backward; ``[("loss", loss), ("d <param>", grad), ...]`` (copies)."""
    model.zero_grad(set_to_none=True)
    loss = model(batch, **kw).loss
    loss.backward()
    return [("loss", loss.detach().clone())] + [(f"d {n}", p.grad.clone()) for n, p in model.named_parameters()]


def _model_vs_eager(device: str) -> tuple:
    """``(fused, eager)``: the fused step and the ``fast_kernels=False`` one on zero noise
    (``use_mean_embedding=True``), each as :func:`_step` gives it."""
    fused, batch = _default_model(device, fast=True)
    eager, _ = _default_model(device, fast=False)
    return _step(fused, batch, use_mean_embedding=True), _step(eager, batch, use_mean_embedding=True)


def _model_cuda_graph(device: str) -> tuple:
    """The fused step captured in a ``torch.cuda.CUDAGraph`` and replayed, against the same step uncaptured, on
    the same seed (the replay draws its noise from the generator's state at replay time)."""
    model, batch = _default_model(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up outside the graph (Triton compiles, cuBLAS workspaces)
        for _ in range(2):
            _step(model, batch)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = model(batch).loss
        loss.backward()
    torch.manual_seed(_SEED)
    graph.replay()
    torch.cuda.synchronize(device)
    got = [("loss", loss.clone())] + [(f"d {n}", p.grad.clone()) for n, p in model.named_parameters()]
    torch.manual_seed(_SEED)
    return got, _step(model, batch)


def _model_compile(device: str) -> tuple:
    """The fused step under ``torch.compile(fullgraph=True)`` against the same step uncompiled, on the same
    seed (inductor's ``fallback_random``, so the compiled step draws the seed of the in-kernel noise as eager)."""
    import torch._inductor.config as inductor_config

    model, batch = _default_model(device)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    with inductor_config.patch(fallback_random=True):
        torch.manual_seed(_SEED)
        got = _step(compiled, batch)
    torch.manual_seed(_SEED)
    return got, _step(model, batch)


#: The model checks: (name, function of the device, needs CUDA).
MODEL_CHECKS = (
    ("model step vs eager", _model_vs_eager, False),
    ("model step cuda-graph", _model_cuda_graph, True),
    ("model step compile", _model_compile, True),
)


def model_rows(devices: Sequence[str]) -> Iterator[dict]:
    """The verdict rows of :data:`MODEL_CHECKS` on ``devices`` (float32), as they come."""
    spec = registry.OPS.get("latent_step")
    for name, fn, needs_cuda in MODEL_CHECKS:
        for device in devices:
            runner = _where(spec, device)[0] if spec is not None else "-"
            if needs_cuda and torch.device(device).type != "cuda":
                if not any(torch.device(d).type == "cuda" for d in devices):
                    yield _row(name, "cuda", "float32", "-", "SKIP", "no CUDA device here")
                continue
            try:
                got, want = fn(device)
                yield _judge(name, device, "float32", runner, got, want, TOL[torch.float32]["grad"], "")
            except Exception as exc:
                yield _row(name, device, "float32", runner, "FAIL", _error(exc))


# ---------------------------------------------------------------------------------------------------- versions
def version_info() -> dict:
    """Python, torch (and its CUDA), triton, the extension build, the GPU, and the tested range with a note on
    whether the installed torch and triton are inside it."""
    from . import _extension

    try:
        ext, why = _extension.status()
        ext = f"{ext} ({why})" if ext and why else (ext or f"not available ({why})")
    except Exception as exc:
        ext = f"error: {_error(exc)}"
    cuda = torch.cuda.is_available()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _backend.TRITON_VERSION,
        "extension": ext,
        "gpu": (f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
                if cuda else None),
        "interpreter": _backend.INTERPRET,
    }
    reason = versions.outside_range(torch.__version__, info["triton"])
    lo_hi = versions.tested_range()
    info["tested_range"] = ", ".join(f"{k} {lo} .. {hi}" for k, (lo, hi) in lo_hi.items())
    info["in_range"] = "yes" if not reason else f"OUTSIDE the tested range: {reason}"
    return info


# ------------------------------------------------------------------------------------------------------ output
_COLUMNS = (("check", "check", 28), ("device", "device", 6), ("dtype", "dtype", 8), ("runner", "runner", 18),
            ("max_err", "max|err|", 8), ("err_over_tol", "err/tol", 8), ("verdict", "verdict", 7),
            ("detail", "detail", 0))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.2g}"
    return str(v)


def format_row(row: Optional[dict] = None) -> str:
    """One line of the verdict table (fixed column widths, so rows print as they come); the header when
    ``row`` is None."""
    cells = [title if row is None else _fmt(row[key]) for key, title, _ in _COLUMNS]
    return "  ".join(c.ljust(w) for c, (_, _, w) in zip(cells, _COLUMNS)).rstrip()


def _interpreter_rows(ops: Sequence[str], with_model: bool) -> Iterator[dict]:
    """The checks of the Triton ops ``ops`` on CPU tensors, re-run in a child process started with
    ``TRITON_INTERPRET=1`` (it must be set before triton is imported)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", "crmvae_fast.doctor", "--device", "cpu", "--ops", ",".join(ops), "--json", path]
        if not with_model:
            cmd.append("--no-model")
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            yield _row("interpreter run", "cpu", "-", "triton-interpreter", "FAIL", "took over 1800 s")
            return
        if not os.path.exists(path):
            tail = " | ".join((r.stdout + r.stderr).strip().splitlines()[-3:])
            yield _row("interpreter run", "cpu", "-", "triton-interpreter", "FAIL",
                       f"the child process exited {r.returncode} without rows: {tail[-400:]}")
            return
        with open(path, encoding="utf-8") as fp:
            rows = json.load(fp)["rows"]
    yield from (r for r in rows if r["runner"] == "triton-interpreter" or r["verdict"] == "FAIL")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``crmvae-fast doctor`` (:func:`run` reads them)."""
    parser.add_argument("--ops", default=None,
                        help="comma-separated subset of the registered ops (default: all: " + ",".join(registry.OPS)
                             + ")")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: every device here)")
    parser.add_argument("--no-model", action="store_true",
                        help="skip the model-step checks (fused vs eager; CUDA graph and torch.compile on a GPU)")
    parser.add_argument("--interpreter", action="store_true",
                        help="also re-run the Triton ops' checks on CPU tensors through the Triton interpreter, in "
                             "a child process started with TRITON_INTERPRET=1 (a few minutes)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="write the versions, where each op runs, and the verdict rows to this JSON file")


def run(args: argparse.Namespace) -> int:
    """Run the checks chosen by ``args`` (see :func:`add_arguments`), print the report; 1 if any check failed,
    2 on bad arguments, else 0."""
    ops = list(registry.OPS) if not args.ops else [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in registry.OPS]
    if unknown or not ops:
        print(f"error: --ops expects registered op names ({','.join(registry.OPS)}), got {args.ops!r}; pick "
              "some of those", file=sys.stderr)
        return 2
    if args.device is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    elif args.device == "cpu" or (args.device.startswith("cuda") and torch.cuda.is_available()):
        devices = [args.device]
    else:
        print(f"error: --device expects cpu or cuda[:i] with a CUDA device present, got {args.device!r}"
              f"{' (no CUDA device here)' if args.device.startswith('cuda') else ''}; pass cpu", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    info = version_info()
    print("crmvae-fast doctor\n\nversions")
    for k in ("python", "torch", "torch_cuda", "triton", "extension", "gpu", "interpreter"):
        print(f"  {k:<12} {_fmt(info[k])}")
    print(f"  {'tested':<12} {info['tested_range']}: {info['in_range']}")

    where = {name: {d: _where(registry.OPS[name], d) for d in devices} for name in ops}
    print("\nwhere each op runs")
    for name in ops:
        cells = [f"{d}: {runner}" + (f" ({why})" if runner in ("eager", "error") and why else "")
                 for d, (runner, why) in where[name].items()]
        print(f"  {name:<14} " + "; ".join(cells), flush=True)

    rows = []
    checks = itertools.chain(op_rows(ops, devices), model_rows(devices) if not args.no_model else ())
    triton_ops = [o for o in ops if registry.OPS[o].backend == "triton"]
    interp_note = ""
    if args.interpreter and "cpu" in devices and triton_ops:
        if _backend.INTERPRET:
            interp_note = "--interpreter: this process already runs the interpreter (TRITON_INTERPRET=1)"
        else:
            print(f"\n--interpreter: the checks of {', '.join(triton_ops)} on CPU tensors are re-run at the end "
                  "through the Triton interpreter, in a child process started with TRITON_INTERPRET=1 (minutes)")
            checks = itertools.chain(checks, _interpreter_rows(triton_ops, with_model=not args.no_model))
    elif "cpu" in devices and triton_ops and not _backend.INTERPRET:
        interp_note = ("on CPU tensors the Triton ops ran their eager twin: add --interpreter to check the "
                       "kernels through the Triton interpreter")
    print("\n" + format_row(), flush=True)
    for row in checks:
        rows.append(row)
        print(format_row(row), flush=True)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("PASS", "FAIL", "SKIP")}
    failed = sorted({r["check"].removesuffix(" fwd").removesuffix(" bwd") for r in rows if r["verdict"] == "FAIL"})
    print(f"\ndoctor: {len(rows)} checks, {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP in "
          f"{time.perf_counter() - t0:.1f} s" + (f"; FAILED: {', '.join(failed)}" if failed else "; all passed")
          + ("" if info["in_range"] == "yes" else f"; versions {info['in_range']}"))
    if interp_note:
        print(f"note: {interp_note}")
    if args.json:
        doc = {"versions": info, "where": {n: {d: list(v) for d, v in w.items()} for n, w in where.items()},
               "rows": rows, "counts": counts, "passed": not counts["FAIL"]}
        with open(args.json, "w", encoding="utf-8") as fp:
            json.dump(doc, fp, indent=1, default=str)
    return 1 if counts["FAIL"] else 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m crmvae_fast.doctor [options]``: parse ``argv`` and :func:`run`."""
    parser = argparse.ArgumentParser(prog="crmvae-fast doctor",
                                     description="Check crmvae_fast on this machine: versions, where each op "
                                                 "runs, every op against its eager twin on each device.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
