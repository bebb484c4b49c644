"""The benchmark cases: one :class:`BenchSpec` per benchmarked op, registered in :data:`SPECS`.

A spec says, for one op (``Case.op``): its modes, the providers that run it, the sizes of a smoke, quick and full
run (:attr:`BenchSpec.cases`), how to build a zero-argument callable for a (case, provider) with its inputs made
(:attr:`BenchSpec.build`), why a (case, provider) cannot run here (:attr:`BenchSpec.skip`), the fewest bytes it
must move (:attr:`BenchSpec.nbytes`), its baselines and which registered ops (:mod:`crmvae_fast.registry`) its
fused provider runs. The runner, the report, the CLI's ``--ops`` and ``benchmarks/`` loop over :data:`SPECS` and
name no op. Adding a benchmark is one ``register_bench(BenchSpec(...))`` at the end of this file.

Specs here:

* ``latent_step`` (``fwd``, ``bwd``, ``full`` = fwd + bwd): PoE, M + 1 reparameterized samples, every KL.
* ``joint_nll`` (``eval``): ``compute_joint_nll`` (three 32-dim modalities, latent 8): the ``iw_logsumexp`` op
  timed through the model, against MultiVae's per-point loop on the same weights.
* ``train_step`` (``step``): forward + backward + Adam step of the default MLP model.

Providers: ``eager`` (:mod:`crmvae_fast.reference` / ``fast_kernels=False``), ``fused`` (:mod:`crmvae_fast.ops` /
``fast_kernels=True``), ``compile`` (``torch.compile`` of the eager math) and ``multivae`` (MultiVae 1.0.3's
``CRMVAE`` on the same weights, the SPEC's peer). The eager and compile providers draw their noise with
``torch.randn`` inside the timed call, as a training step does; the fused op draws it in the kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from .environment import dtype_of, multivae_unavailable

#: Every provider, in the order tables show them.
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
#: A train_step case is counted (launches, modelled bytes) at COUNT_SMALL_B instead of its B under the Triton
#: interpreter on a CPU past this M*B*D (a fused count at M=5, B=64, D=32 takes 35 s there).
COUNT_MAX_INTERP_ELEMS = 1 << 10
#: The batch size of those counts.
COUNT_SMALL_B = 16


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


def _no_skip(case: Case, provider: str, device: torch.device, quick: bool) -> Optional[str]:
    return None


@dataclass(frozen=True)
class BenchSpec:
    """How one op is benchmarked.

    * ``name``: ``Case.op`` of its cases (``--ops`` takes it); ``modes``: its modes, in table order.
    * ``providers``: the providers that get a row (a provider that cannot run says why in ``skip``).
    * ``cases(device, quick, smoke, dtype) -> [Case]``: the sizes of a smoke, quick or full run.
    * ``build(case, provider, device, quick) -> (fn, note)``: ``fn()`` runs one call with the inputs made;
      raise :class:`Skip` when it cannot run. ``fn`` may carry ``scale`` (multiply the times),
      ``single_run`` (time one call only) and ``cleanup`` (called when the case is done).
    * ``skip(case, provider, device, quick) -> reason or None``: op-specific reasons (sizes a device cannot take
      quickly, providers that do not apply); the availability of compile and MultiVae is checked by the runner.
    * ``uses``: the registered ops (:mod:`crmvae_fast.registry`) the fused provider runs: its row's ``backend``.
    * ``nbytes(case) -> int`` and ``bytes_formula[mode]``: the fewest bytes a call must move (None when the op
      is not bound by bytes; ``bytes_formula`` then says why).
    * ``baselines``: the provider that speed-ups are taken against, first one that ran wins.
    * ``figures(case, provider, device) -> dict``: device-independent figures merged into a row that ran
      (:data:`~crmvae_fast.bench.report.FIGURE_KEYS`: counted launches and modelled bytes of a train step,
      modelled kernel figures of the fused latent step), taken once per (case, provider) outside the timed
      region; None: none.
    * ``heavy``: a whole step (long calls: fewer repetitions, no warm-up); ``x_axis``: the plot's x (``"MBD"``
      or ``"n"``, the number of data points in ``B``); ``target(case)``: run first so a time budget never
      drops it.
    """

    name: str
    modes: Tuple[str, ...]
    providers: Tuple[str, ...]
    cases: Callable[..., List[Case]]
    build: Callable[..., tuple]
    uses: Tuple[str, ...]
    skip: Callable[..., Optional[str]] = _no_skip
    nbytes: Optional[Callable[[Case], int]] = None
    bytes_formula: Dict[str, str] = field(default_factory=dict)
    baselines: Tuple[str, ...] = ("eager",)
    heavy: bool = False
    figures: Optional[Callable[..., dict]] = None
    x_axis: str = "MBD"
    target: Callable[[Case], bool] = lambda c: (c.M, c.B, c.D) == TARGET

    def __post_init__(self):
        bad = [p for p in self.providers + self.baselines if p not in PROVIDERS]
        if bad:
            raise ValueError(f"bench {self.name!r}: unknown providers {bad}; expected some of {PROVIDERS}")


#: name -> spec, in the order runs and tables take them.
SPECS: Dict[str, BenchSpec] = {}


def register_bench(spec: BenchSpec) -> BenchSpec:
    if spec.name in SPECS:
        raise ValueError(f"bench {spec.name!r} is registered twice")
    SPECS[spec.name] = spec
    return spec


def suite_cases(device: torch.device, quick: bool = False, smoke: bool = False, ops: Optional[Iterable[str]] = None,
                dtype: str = "float32") -> List[Case]:
    """The cases of a run, target configuration first. ``smoke``: tiny sizes (checks the plumbing, the numbers
    mean nothing); ``quick``: small sizes, under a minute on a 2-core CPU; else the full sweep."""
    out = []
    for op in (list(SPECS) if ops is None else list(ops)):
        if op not in SPECS:
            raise ValueError(f"unknown op {op!r}; expected some of {tuple(SPECS)}")
        out += SPECS[op].cases(device, quick, smoke, dtype)
    if not smoke:  # the SPEC's target first, so a time budget never drops it
        out.sort(key=lambda c: not SPECS[c.op].target(c))
    return out


def _sweep(device: torch.device, quick: bool, smoke: bool, quick_cpu, quick_gpu) -> list:
    """(M, B, D) sizes: tiny for a smoke run, ``quick_cpu``/``quick_gpu`` for a quick one, else the full sweep
    with the target first."""
    if smoke:
        return [(2, 16, 8)]
    if quick:
        return quick_gpu if device.type == "cuda" else quick_cpu
    sizes = [(M, B, D) for M in FULL_M for D in FULL_D for B in FULL_B]
    sizes.sort(key=lambda s: s != TARGET)
    return sizes


def _random_mask(M: int, B: int, device, generator: torch.Generator, missing: float = 0.2) -> torch.Tensor:
    mask = torch.rand(M, B, generator=generator) >= missing
    mask[0] |= ~mask.any(0)  # never a sample with no observed modality
    return mask.to(device)


def _eager_latent_step(mu, lv, mask):
    from .. import reference

    return reference.latent_step(mu, lv, mask, *reference.draw_noise(mu))


def _fused_latent_step():
    from .. import ops

    return ops.latent_step


def _compiled(fn):
    import torch._dynamo

    torch._dynamo.reset()  # one compile per case: no recompile limit, no cache carried between shapes
    return torch.compile(fn, dynamic=False)



# ------------------------------------------------------------------------------------- a spec for a tensor op
def latent_inputs(case: Case, device: torch.device) -> tuple:
    """``(mu, lv, mask)``: the latent step's inputs, (M, B, D) in ``case.dtype`` requiring grad and an (M, B) bool
    mask with 20 % missing (never a sample with none observed); seeded, so every provider gets the same."""
    g = torch.Generator().manual_seed(0)
    gd = torch.Generator(device=device).manual_seed(0)
    dt = dtype_of(case.dtype)
    mu = torch.randn(case.M, case.B, case.D, generator=gd, device=device).to(dt).requires_grad_()
    lv = (0.5 * torch.randn(case.M, case.B, case.D, generator=gd, device=device)).to(dt).requires_grad_()
    return mu, lv, _random_mask(case.M, case.B, device, g)


def op_bench(name: str, *, fused: str, eager: str, inputs: Callable[[Case, torch.device], tuple] = latent_inputs,
             uses: Optional[Tuple[str, ...]] = None, nbytes: Optional[Callable[[Case], int]] = None,
             bytes_formula: Optional[Dict[str, str]] = None, sizes=None) -> BenchSpec:
    """A :class:`BenchSpec` for a differentiable tensor op, in one call: ``fused`` and ``eager`` are
    ``"module:function"`` paths of the op and its twin, both called as ``fn(*inputs(case, device))``; modes
    ``fwd``, ``bwd`` (the backward alone, graph retained) and ``full``; providers eager, fused and compile
    (``torch.compile`` of the twin). The backward takes random upstream gradients for every floating output and
    differentiates with respect to every input that requires grad. Sizes: the latent step's sweep (``sizes`` =
    ``(quick_cpu, quick_gpu)`` to change the quick ones). E.g.::

        register_bench(op_bench("poe", fused="crmvae_fast.ops:poe", eager="crmvae_fast.reference:poe_experts"))
    """
    from ..registry import resolve

    quick_cpu, quick_gpu = sizes or ([(2, 256, 32), (5, 4096, 32)], [(2, 256, 32), TARGET, (5, 65536, 512)])

    def cases(device, quick, smoke, dtype):
        return [Case(name, mode, M, B, D, dtype) for (M, B, D) in _sweep(device, quick, smoke, quick_cpu, quick_gpu)
                for mode in ("fwd", "bwd", "full")]

    def build(case: Case, provider: str, device: torch.device, quick: bool):
        args = inputs(case, device)
        if provider == "compile":
            step = _compiled(resolve(eager))
        else:
            step = resolve(fused if provider == "fused" else eager)
        wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        gd = torch.Generator(device=device).manual_seed(1)

        def used(out):
            outs = out if isinstance(out, (tuple, list)) else (out,)
            return [t for t in outs if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]

        old_donated = _set_donated_buffers(False) if provider == "compile" else None
        first = used(step(*args))  # compiles outside the timed region
        grads = [torch.randn(t.shape, generator=gd, device=device).to(t.dtype) for t in first]
        torch.autograd.grad(first, wrt, grads)
        del first
        if case.mode == "fwd":
            def fn():
                return step(*args)
        elif case.mode == "bwd":
            kept = used(step(*args))

            def fn():
                return torch.autograd.grad(kept, wrt, grads, retain_graph=True)
        else:
            def fn():
                return torch.autograd.grad(used(step(*args)), wrt, grads)
        if old_donated is not None:
            fn.cleanup = lambda: _set_donated_buffers(old_donated)  # type: ignore[attr-defined]
        return fn, None

    return BenchSpec(name=name, modes=("fwd", "bwd", "full"), providers=("eager", "fused", "compile"),
                     cases=cases, build=build, uses=uses or (name,), skip=_latent_skip, nbytes=nbytes,
                     bytes_formula=bytes_formula or {m: "not reported" for m in ("fwd", "bwd", "full")})


# ------------------------------------------------------------------------------------------------- latent_step
#: mode -> the formula of :func:`latent_step_bytes`, stored in each row's ``bytes_formula``.
LATENT_BYTES_FORMULA = {
    "fwd": "e*(2MBD + 3BD + MBD) + MB + 4(M+1)B: reads mu,lv (2MBD) and mask (MB bytes); writes mu_J,lv_J,z_J "
           "(3BD), z (MBD) and the float32 KLs ((M+1)B); noise drawn in registers",
    "bwd": "e*(BD + MBD + 2MBD + 2MBD) + MB + 4(M+1)B: reads g_z_J (BD), g_z (MBD), mu,lv (2MBD), mask (MB "
           "bytes), g_KL ((M+1)B float32); writes d mu, d lv (2MBD); noise regenerated from the seed",
    "full": "fwd + bwd",
}


def latent_step_bytes(M: int, B: int, D: int, mode: str, elem: int = 4) -> int:
    """The fewest bytes the fused latent step must move (see :data:`LATENT_BYTES_FORMULA`); ``elem`` is the
    element size of mu and lv, the mask is 1 byte per entry, the KL terms and their gradients float32."""
    MBD, BD, MB = M * B * D, B * D, M * B
    fwd = elem * (2 * MBD + 3 * BD + MBD) + MB + 4 * (M + 1) * B
    bwd = elem * (BD + MBD + 2 * MBD + 2 * MBD) + MB + 4 * (M + 1) * B
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def _latent_cases(device, quick, smoke, dtype):
    sizes = _sweep(device, quick, smoke, [(2, 256, 32), (5, 4096, 32)], [(2, 256, 32), TARGET, (5, 65536, 512)])
    return [Case("latent_step", mode, M, B, D, dtype) for (M, B, D) in sizes for mode in ("fwd", "bwd", "full")]


def _latent_skip(case: Case, provider: str, device: torch.device, quick: bool) -> Optional[str]:
    if provider == "compile" and quick and device.type == "cpu" and (case.M, case.B, case.D) != CPU_QUICK_COMPILE_SIZE:
        return f"quick run on a CPU: compile measured at M,B,D = {CPU_QUICK_COMPILE_SIZE} only (~15 s per shape)"
    if device.type == "cpu":
        if case.M * case.B * case.D > CPU_MAX_LATENT_ELEMS:
            return f"M*B*D = {case.M * case.B * case.D} > {CPU_MAX_LATENT_ELEMS}: too slow for a CPU run"
        if (provider == "fused" and case.M * case.B * case.D > 1 << 15
                and os.environ.get("TRITON_INTERPRET", "0") == "1"):
            return "TRITON_INTERPRET=1: the fused kernels run in the Triton interpreter, too slow past M*B*D=2^15"
    if device.type == "cuda":
        need = 16 * case.M * case.B * case.D * dtype_of(case.dtype).itemsize
        free, _ = torch.cuda.mem_get_info(device)
        if need > free:
            return f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return None


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
    dt = dtype_of(case.dtype)
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



#: (M, B, D, dtype) -> kernel_report.analyze rows, or the reason it failed: each size is compiled once per process
#: (the tiles, hence the kernels, depend on B too: ``kernels.latent_step._tiles``).
_KERNEL_FIGURES: dict = {}


def _latent_figures(case: Case, provider: str, device: torch.device) -> dict:
    """The fused rows' modelled kernel figures (:func:`crmvae_fast.kernel_report.analyze`: sm_90 cubin built
    in a subprocess, no GPU): ``fwd`` the forward kernel, ``bwd`` the backward, ``full`` both (instructions,
    bytes and times summed, registers the larger, spills summed, occupancy the lower). A failed compilation
    gives ``figures_reason``, never an exception."""
    if provider != "fused":
        return {}
    key = (case.M, case.B, case.D, case.dtype)
    if key not in _KERNEL_FIGURES:
        try:
            from ..kernel_report import analyze

            _KERNEL_FIGURES[key] = analyze(case.M, case.B, case.D, case.dtype)
        except Exception as exc:
            msg = str(exc).strip().splitlines()
            _KERNEL_FIGURES[key] = (f"kernel report failed: {exc.__class__.__name__}: "
                                    f"{msg[0] if msg else ''}")[:300]
    rows = _KERNEL_FIGURES[key]
    if isinstance(rows, str):
        return {"modelled": True, "figures_reason": rows}
    ks = [r for r in rows if ("_bwd_" in r["name"]) == (case.mode == "bwd")] if case.mode != "full" else rows
    out = {"modelled": True, "modelled_kernels": [r["name"] for r in ks],
           "registers": max(r["registers"] for r in ks), "spills": sum(r["spills"] for r in ks),
           "occupancy": min(r["occupancy"] for r in ks)}
    for k in ("warp_instr_per_element", "bytes_per_element", "H100_issue_us", "H100_memory_us",
              "H200_issue_us", "H200_memory_us"):
        out[k] = sum(r[k] for r in ks)
    return out


register_bench(BenchSpec(
    name="latent_step", modes=("fwd", "bwd", "full"), providers=("eager", "fused", "compile"),
    cases=_latent_cases, build=lambda case, provider, device, quick: (_build_latent(case, provider, device), None),
    uses=("latent_step",), skip=_latent_skip, figures=_latent_figures,
    nbytes=lambda c: latent_step_bytes(c.M, c.B, c.D, c.mode, dtype_of(c.dtype).itemsize),
    bytes_formula=LATENT_BYTES_FORMULA,
))


# --------------------------------------------------------------------------------------------------- joint_nll
def _nll_cases(device, quick, smoke, dtype):
    if smoke:
        nll = [dict(n=4, K=20)]
    else:
        nll = [dict(n=1000, K=1000)] if device.type == "cuda" else [dict(n=64, K=1000)]
    return [Case("joint_nll", "eval", NLL_M, p["n"], NLL_LATENT, "float32",
                 {"n": p["n"], "K": p["K"], "features": NLL_FEATURES}) for p in nll]


def _nll_skip(case: Case, provider: str, device: torch.device, quick: bool) -> Optional[str]:
    if quick and device.type == "cpu" and provider == "eager" and multivae_unavailable() is None:
        return ("quick run on a CPU: the eager NLL (MultiVae's per-point loop on our model) is measured in the full "
                "suite; the peer here is multivae")
    if provider == "compile":
        return ("no compile provider for joint_nll: compute_joint_nll loops over sample chunks in Python, "
                "compiling it would unroll that loop; the peers are multivae and eager")
    return None


def nll_dims(case: Case) -> dict:
    """``input_dims`` of a joint_nll case: ``params["features"]`` is one size for all ``case.M`` modalities
    (default :data:`NLL_FEATURES`) or one size per modality (``[784, 10]``: an image and its label)."""
    F = case.params.get("features", NLL_FEATURES)
    sizes = list(F) if isinstance(F, (list, tuple)) else [F] * case.M
    if len(sizes) != case.M:
        raise ValueError(f"joint_nll case: expected {case.M} feature sizes (one per modality), got {sizes}")
    return {f"m{i}": (int(f),) for i, f in enumerate(sizes)}


def _nll_inputs(case: Case, device, g):
    n = case.params["n"]
    return {m: torch.rand(n, *d, generator=g).to(device) for m, d in nll_dims(case).items()}


def _build_nll(case: Case, provider: str, device: torch.device):
    CRMVAE, CRMVAEConfig = _model_api()
    M, D, K = case.M, case.D, case.params["K"]
    cfg = CRMVAEConfig(n_modalities=M, latent_dim=D, input_dims=nll_dims(case))
    torch.manual_seed(0)
    model = CRMVAE(cfg, fast_kernels=(provider == "fused"))  # same seed: same weights for every provider
    data = _nll_inputs(case, device, torch.Generator().manual_seed(1))
    note = None
    if provider == "multivae":
        from multivae.data.datasets.base import MultimodalBaseDataset
        from multivae.models import CRMVAE as MVCRMVAE, CRMVAEConfig as MVConfig

        mv = MVCRMVAE(MVConfig(n_modalities=M, latent_dim=D, input_dims=nll_dims(case)))
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


register_bench(BenchSpec(
    name="joint_nll", modes=("eval",), providers=("eager", "fused", "compile", "multivae"),
    cases=_nll_cases, build=lambda case, provider, device, quick: _build_nll(case, provider, device),
    uses=("iw_logsumexp", "likelihood"), skip=_nll_skip,
    bytes_formula={"eval": "not reported: matmul-bound (decoders / MLP), bytes do not bound it"},
    baselines=("multivae", "eager"), heavy=True, x_axis="n", target=lambda c: True,
))


# -------------------------------------------------------------------------------------------------- train_step
def _train_cases(device, quick, smoke, dtype):
    sizes = _sweep(device, quick, smoke, [(2, 256, 32)], [(2, 256, 32), TARGET])
    return [Case("train_step", "step", M, B, D, dtype, {"features": TRAIN_FEATURES}) for (M, B, D) in sizes]


def _train_skip(case: Case, provider: str, device: torch.device, quick: bool) -> Optional[str]:
    if provider == "compile":
        if quick and device.type == "cpu":
            return "quick run on a CPU: compiling the whole train step takes tens of seconds"
        if device.type == "cuda" and (case.M, case.B, case.D) not in GPU_COMPILE_TRAIN_SIZES:
            return ("compile of the whole train step measured on GPU only at M,B,D in "
                    f"{list(GPU_COMPILE_TRAIN_SIZES)} (tens of seconds of compilation per shape)")
    if device.type == "cpu" and case.M * case.B > CPU_MAX_TRAIN_ROWS:
        return f"M*B = {case.M * case.B} > {CPU_MAX_TRAIN_ROWS}: MLP step too slow for a CPU run"
    return None


def _model_api():
    try:
        from .. import CRMVAE, CRMVAEConfig
    except Exception as exc:
        raise Skip(f"crmvae_fast.CRMVAE is not importable: {exc!r}") from exc
    return CRMVAE, CRMVAEConfig


def _random_batch(M: int, B: int, F: int, device, g: torch.Generator, missing: float = 0.2) -> dict:
    mask = _random_mask(M, B, "cpu", g, missing)
    data = {f"m{i}": torch.rand(B, F, generator=g).to(device) for i in range(M)}
    return {"data": data, "masks": {f"m{i}": mask[i].to(device) for i in range(M)}}


def _train_model(case: Case, provider: str, device: torch.device, B: int) -> tuple:
    """``(model, batch)`` of a train_step case at batch size ``B``: same seed, same weights for every provider."""
    CRMVAE, CRMVAEConfig = _model_api()
    M, D, F = case.M, case.D, case.params.get("features", TRAIN_FEATURES)
    cfg = CRMVAEConfig(n_modalities=M, latent_dim=D, input_dims={f"m{i}": (F,) for i in range(M)})
    torch.manual_seed(0)
    model = CRMVAE(cfg, fast_kernels=(provider == "fused")).to(device)
    return model, _random_batch(M, B, F, device, torch.Generator().manual_seed(0))


def _build_train(case: Case, provider: str, device: torch.device):
    if case.dtype != "float32":
        raise Skip("train_step is measured in float32 only")
    model, batch = _train_model(case, provider, device, case.B)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    call = _compiled(model) if provider == "compile" else model

    def fn():
        opt.zero_grad(set_to_none=True)
        out = call(batch)
        out["loss"].backward()
        opt.step()
        return out["loss"]

    fn()  # warm-up (and compilation) outside the timed region
    return fn



def counts_batch(case: Case, device: torch.device) -> int:
    """The B a train_step case is counted at: its own, except under the Triton interpreter on a CPU past
    :data:`COUNT_MAX_INTERP_ELEMS` (slow there), where it is :data:`COUNT_SMALL_B` for every provider of the
    case. The launches do not depend on B (no data-dependent branch: same counts at B = 16, 32, 64 for eager and
    fused, M in {2, 5}, D in {8, 32}); the modelled bytes do, so rows carry ``counts_B``."""
    from .._backend import INTERPRET

    if device.type == "cpu" and INTERPRET and case.M * case.B * case.D > COUNT_MAX_INTERP_ELEMS:
        return min(case.B, COUNT_SMALL_B)
    return case.B


def _train_figures(case: Case, provider: str, device: torch.device) -> dict:
    """Launches and modelled bytes of one forward + backward (:func:`crmvae_fast.counts.count_step`: non-view
    ATen ops + Triton launches, optimizer excluded) of the case's model, at :func:`counts_batch`. They count
    what runs here (the row's ``backend``). Not for ``compile`` (a second compilation of the whole model:
    ``python -m crmvae_fast.counts --compile``)."""
    if provider == "compile":
        return {"figures_reason": "not counted in the suite (a second whole-model compilation); "
                                  "python -m crmvae_fast.counts --compile counts it"}
    from ..counts import count_step

    B = counts_batch(case, device)
    model, batch = _train_model(case, provider, device, B)
    c = count_step(model, batch)
    return {"launches": c.launches, "aten_launches": c.aten, "triton_launches": c.triton,
            "bytes_modelled": c.bytes, "counts_B": B}


register_bench(BenchSpec(
    name="train_step", modes=("step",), providers=("eager", "fused", "compile"),
    cases=_train_cases, build=lambda case, provider, device, quick: (_build_train(case, provider, device), None),
    uses=("latent_step", "likelihood"), skip=_train_skip, figures=_train_figures,
    bytes_formula={"step": "not reported: matmul-bound (decoders / MLP), bytes do not bound it"},
    heavy=True,
))

register_bench(op_bench("poe", fused="crmvae_fast.ops:poe", eager="crmvae_fast.reference:poe_experts"))

#: The benchmarked ops and their modes, in run order (snapshots of :data:`SPECS`).
OPS = tuple(SPECS)
MODES = {name: spec.modes for name, spec in SPECS.items()}
