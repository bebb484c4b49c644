"""Device-independent cost of a training step: launches and bytes per forward + backward.

A GPU step of a small model is launch-bound, and a GPU is not always there to time it; these counts can be taken
on any machine and say what the code dispatches:

* **launches**: every non-view ATen op dispatched (a torch ``TorchDispatchMode`` sees each one, forward and
  backward; views and pure metadata ops launch nothing) plus every Triton launch (each launcher of
  :mod:`crmvae_fast.kernels` wraps its launch in ``_backend.launch_guard()``, which is counted). A fused op
  runs opaquely inside its custom op, so its own allocations are not counted: one custom op, one launch.
  The optimizer step is excluded.
* **bytes** (modelled): each counted launch reads every tensor it takes and writes every tensor it returns once
  (no cache reuse, allocations move nothing): the sum of those sizes.
* **compiled**: for ``torch.compile`` (inductor) the launches are the kernel and extern calls of the generated
  wrapper code of the forward and backward graphs (:func:`count_compiled`).

The workload of issue 11 (:func:`issue_workload`): the default MLP model, 3 modalities of 64 features with
normal / bernoulli / laplace decoders, latent 10, B = 256, 20 % of modalities missing. ``python -m
crmvae_fast.counts`` prints the table for eager / fused / MultiVae (and fused under torch.compile with
``--compile``).
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections import Counter
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _backend

__all__ = ["StepCount", "count_launches", "count_step", "count_compiled", "issue_workload", "issue_models",
           "issue_table"]

# Ops that move no data and launch nothing although they are not flagged as views.
_FREE = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
         "lift_fresh", "_unsafe_view", "_to_copy_meta", "sym_size", "sym_stride", "sym_numel", "is_same_size", "_local_scalar_dense"}
_ALLOC_ONLY = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}


class StepCount(dict):
    """``launches``, ``aten`` (non-view ATen ops), ``triton`` (Triton launches), ``bytes`` (modelled) and
    ``by_op`` (a Counter of op names)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    if isinstance(x, dict):
        return sum(_nbytes(t) for t in x.values())
    return 0


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()
        self.aten = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        ns = func.namespace
        if ns == "crmvae_fast":  # a fused op: its Triton launches are counted by the launch guard
            self.bytes += _nbytes(args) + _nbytes(kwargs) + _nbytes(out)
            self.by_op[f"{ns}.{name}"] += 1
        elif ns == "aten" and not func.is_view and name not in _FREE:
            self.aten += 1
            self.by_op[name] += 1
            self.bytes += _nbytes(args) + _nbytes(kwargs) + _nbytes(out)
        return out


@contextlib.contextmanager
def _count_triton(counter: list):
    """Count every ``_backend.launch_guard()`` entered, i.e. every Triton launch."""
    original = _backend.launch_guard

    def counting_guard():
        counter[0] += 1
        return original()

    _backend.launch_guard = counting_guard
    try:
        yield
    finally:
        _backend.launch_guard = original


def count_launches(fn: Callable[[], None]) -> StepCount:
    """Run ``fn()`` once and count what it dispatches."""
    triton = [0]
    mode = _Counter()
    with _count_triton(triton), mode:
        fn()
    return StepCount(launches=mode.aten + triton[0], aten=mode.aten, triton=triton[0], bytes=mode.bytes,
                     by_op=mode.by_op)


def _step(model, inputs) -> Callable[[], None]:
    def run():
        out = model(inputs)
        loss = out["loss"] if isinstance(out, dict) else out.loss
        loss.backward()

    return run


def count_step(model, inputs, warmup: bool = True) -> StepCount:
    """Launches and bytes of one forward + backward of ``model`` on ``inputs`` (gradients set to None first,
    the optimizer not run). ``warmup`` runs the step once before counting (first calls may do one-off work)."""
    if warmup:
        model.zero_grad(set_to_none=True)
        _step(model, inputs)()
    model.zero_grad(set_to_none=True)
    return count_launches(_step(model, inputs))


_CALL = re.compile(r"^\s+(?:\w+\s*=\s*)?(cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+|torch\.ops\.\w+\.\w+"
                   r"(?:\.\w+)?|aten\.\w+(?:\.\w+)?)\(", re.M)


def count_compiled(model, inputs) -> StepCount:
    """Launches of one forward + backward of ``torch.compile(model, fullgraph=True)`` (inductor), counted from
    the wrapper code inductor generates for the forward and the backward graph: every generated kernel call
    and every extern call (matmuls, the fused custom ops). Bytes are not modelled here (0)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    model.zero_grad(set_to_none=True)
    _, codes = run_and_get_code(_step(compiled, inputs))
    by_op: Counter = Counter()
    for code in codes:
        call = code[code.find("def call("):]
        for m in _CALL.finditer(call):
            by_op[re.sub(r"_\d+$", "", m.group(1).replace(".run", ""))] += 1
    n = sum(by_op.values())
    return StepCount(launches=n, aten=n, triton=0, bytes=0, by_op=by_op, graphs=len(codes))


def issue_workload(B: int = 256, features: int = 64, latent_dim: int = 10, missing: float = 0.2, seed: int = 0,
                   device=None):
    """``(config_kwargs, data, masks)`` of issue 11: 3 modalities of ``features`` with normal / bernoulli /
    laplace decoders, latent 10, B = 256, each modality missing with probability 0.2 (at least one kept)."""
    g = torch.Generator().manual_seed(seed)
    names = ["m0", "m1", "m2"]
    kw = dict(n_modalities=3, latent_dim=latent_dim, input_dims={m: (features,) for m in names},
              decoders_dist={"m0": "normal", "m1": "bernoulli", "m2": "laplace"})
    data = {"m0": torch.randn(B, features, generator=g),
            "m1": (torch.rand(B, features, generator=g) > 0.5).float(),
            "m2": torch.randn(B, features, generator=g)}
    w = torch.rand(3, B, generator=g) >= missing
    w[0] |= ~w.any(0)
    masks = {m: w[i] for i, m in enumerate(names)}
    if device is not None:
        data = {m: x.to(device) for m, x in data.items()}
        masks = {m: x.to(device) for m, x in masks.items()}
    return kw, data, masks


def issue_models(providers=("eager", "fused", "multivae"), device=None, **workload) -> dict:
    """provider -> ``(model, inputs)`` for :func:`issue_workload`, every model with the same initial weights:
    ``eager`` and ``fused`` (and ``compile``, counted fused under torch.compile) are :class:`~crmvae_fast.CRMVAE`
    with ``fast_kernels`` off or on, ``multivae`` MultiVae 1.0.3's CRMVAE on an ``IncompleteDataset``."""
    import copy

    from .config import CRMVAEConfig
    from .model import CRMVAE

    kw, data, masks = issue_workload(device=device, **workload)
    out = {}
    for p in providers:
        torch.manual_seed(0)
        if p == "multivae":
            from multivae.data.datasets.base import IncompleteDataset
            from multivae.models import CRMVAE as MVCRMVAE
            from multivae.models import CRMVAEConfig as MVConfig

            model = MVCRMVAE(MVConfig(**copy.deepcopy(kw)))
            inputs = IncompleteDataset(data, masks)
        else:
            model = CRMVAE(CRMVAEConfig(**copy.deepcopy(kw)), fast_kernels=p != "eager")
            inputs = {"data": data, "masks": masks}
        out[p] = (model if device is None else model.to(device), inputs)
    return out


def issue_table(providers=("eager", "fused", "multivae"), device=None, **workload) -> dict:
    """provider -> :class:`StepCount` for :func:`issue_workload` (``compile``: fused under torch.compile)."""
    return {p: count_compiled(model, inputs) if p == "compile" else count_step(model, inputs)
            for p, (model, inputs) in issue_models(providers, device, **workload).items()}


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crmvae_fast.counts", description=__doc__.split("\n\n")[0])
    ap.add_argument("--compile", action="store_true", help="also count fused under torch.compile (inductor)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--top", type=int, default=0, help="print the N most frequent ops of each provider")
    args = ap.parse_args(argv)
    providers = ("eager", "fused", "multivae") + (("compile",) if args.compile else ())
    rows = issue_table(providers, device=args.device)
    print(f"{'provider':10s} {'launches':>9s} {'aten':>6s} {'triton':>7s} {'MB moved (modelled)':>20s}")
    for p, c in rows.items():
        print(f"{p:10s} {c.launches:9d} {c.aten:6d} {c.triton:7d} {c.bytes / 1e6:20.2f}")
        if args.top:
            print("   ", ", ".join(f"{k} {v}" for k, v in c.by_op.most_common(args.top)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
