"""Memory accesses of every Triton kernel, forward and backward, checked without a GPU (issue 17).

Each case runs a public op and its backward (through the custom op's autograd) on odd shapes under
:func:`guard.run_guarded`: every input inside a sentinel-padded buffer (padded strides where the op takes
strided tensors: masks, subsets, upstream gradients), every tensor the op allocates moved into one too, every
interpreted load and store checked against the kernel's tensor arguments (and no address stored by two
programs), and the results compared bit for bit between two sentinel fillings. The planted bugs at the end
(tests/planted.py) prove that each check fails when it should.

The sweep is a fixed list of representative cases plus a few hypothesis examples, derandomized in CI. The
interpreter is slow (a latent_step program of M = 6 experts, forward + backward, took ~1.2 s per fill on the
2-core CI machine), so each case keeps its number of programs small.
"""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

import planted
from conftest import DEVICE
from crmvae_fast import _backend
from crmvae_fast.ops import iw_lse_init, iw_lse_update, latent_step, likelihood, poe
from guard import run_guarded

pytestmark = pytest.mark.skipif(
    not (_backend.INTERPRET and DEVICE.type == "cpu"),
    reason="guard bands check kernels run by the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set by "
           "conftest without a GPU); on a GPU use compute-sanitizer",
)

LATENT = ["_latent_step_fwd_kernel", "_latent_step_bwd_kernel"]
POE = ["_poe_fwd_kernel", "_poe_bwd_kernel"]
LIKELIHOOD = ["_likelihood_fwd_kernel", "_likelihood_bwd_kernel"]
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def _check(case, expected_launches):
    report = run_guarded(case)
    assert not report.problems, "\n".join(report.problems)
    assert report.launches == expected_launches


def _mask(g, gen, kind: str, M: int, B: int):
    """An (M, B) mask of ``kind``, placed in a guarded buffer: ``none``, ``all`` (every expert observed),
    ``empty`` (random, sample 0 with nothing observed), ``bool`` (random, padded strides), ``float`` (random 0/1
    floats, padded strides)."""
    if kind == "none":
        return None
    w = torch.rand(M, B, generator=gen) < 0.6
    if kind == "all":
        w[:] = True
    if kind == "empty":
        w[:, 0] = False
    if kind == "float":
        w = w.float()
    return g.place(w, "mask", strided=kind in ("bool", "float"))


def _experts(g, gen, M, B, D, dtype, mask, strided=False):
    """mu, lv (M, B, D) requiring grad; masked entries hold NaN placeholders (they must reach nothing)."""
    mu = torch.randn(M, B, D, generator=gen)
    lv = 0.7 * torch.randn(M, B, D, generator=gen)
    if mask is not None:
        keep = (mask != 0)[..., None]
        mu, lv = torch.where(keep, mu, float("nan")), torch.where(keep, lv, float("nan"))
    return (g.place(mu.to(dtype), "mu", strided=strided, requires_grad=True),
            g.place(lv.to(dtype), "lv", strided=strided, requires_grad=True))


def _grads(g, gen, outputs: dict, names):
    """d outputs / d inputs for upstream gradients (random, padded strides) on the outputs in ``names`` only:
    the others are absent."""
    return [g.place(torch.randn(outputs[n].shape, generator=gen).to(outputs[n].dtype), f"g_{n}", strided=True)
            for n in names]


# ---------------------------------------------------------------------------------------------- latent_step
ALL6 = ("mu_J", "lv_J", "z_J", "z", "kl_prior", "kl_experts")
TRAIN = ("z_J", "z", "kl_prior", "kl_experts")
# (M, B, D, dtype, mask, noise, gradients, strided mu/lv): programs per launch = ceil(B / BLOCK_B) * D-chunks
LATENT_CASES = [
    (1, 1, 1, F32, "none", "draw", ALL6, False),
    (2, 3, 5, F32, "empty", "eps", TRAIN, False),
    (3, 7, 5, F16, "bool", "draw", ALL6, False),
    (4, 33, 1, BF16, "float", "eps", ("mu_J",), False),
    (5, 3, 67, F32, "all", "draw", ("lv_J", "kl_experts"), True),
    (6, 1, 130, F32, "bool", "eps", ALL6, False),
    (3, 1, 520, F32, "empty", "draw", TRAIN, False),  # two D-chunks of BLOCK_D = 512
    (2, 7, 5, F64, "bool", "draw", ("z",), False),
    (6, 7, 1, BF16, "none", "eps", ("kl_prior", "z_J"), False),
    (1, 3, 17, F16, "empty", "draw", TRAIN, False),
    (2, 33, 1, F32, "all", "eps", ("kl_experts",), True),
]


def _latent_case(M, B, D, dtype, mask_kind, noise, names, strided):
    def case(g):
        gen = torch.Generator().manual_seed(M * 1000 + B * 10 + D)
        mask = _mask(g, gen, mask_kind, M, B)
        mu, lv = _experts(g, gen, M, B, D, dtype, mask, strided)
        eps = []
        if noise == "eps":
            eps = [g.place(torch.randn(B, D, generator=gen).to(dtype), "eps_J"),
                   g.place(torch.randn(M, B, D, generator=gen).to(dtype), "eps")]
        out = latent_step(mu, lv, mask, *eps)._asdict()
        dmu, dlv = torch.autograd.grad([out[n] for n in names], [mu, lv], _grads(g, gen, out, names))
        return dict(out, d_mu=dmu, d_lv=dlv)
    return case


@pytest.mark.parametrize("M,B,D,dtype,mask,noise,grads,strided", LATENT_CASES,
                         ids=[f"M{c[0]}-B{c[1]}-D{c[2]}-{str(c[3])[6:]}-{c[4]}-{c[5]}-{len(c[6])}g"
                              for c in LATENT_CASES])
def test_latent_step(M, B, D, dtype, mask, noise, grads, strided):
    _check(_latent_case(M, B, D, dtype, mask, noise, grads, strided), LATENT)


# ---------------------------------------------------------------------------------------------- poe
def _subsets(g, kind: str, M: int):
    """``None``, ``all`` (every non-empty subset, padded strides) or ``some`` (3 rows, one of them empty)."""
    if kind == "none":
        return None
    if kind == "all":
        rows = [r for r in itertools.product([False, True], repeat=M) if any(r)]
    else:
        rows = [[m % 2 == 0 for m in range(M)], [False] * M, [True] * M]
    return g.place(torch.tensor(rows, dtype=torch.bool), "subsets", strided=True)


# (M, B, D, dtype, mask, prior_expert, var_floor, subsets, gradients): programs = B * ceil(D / BLOCK_D)
POE_CASES = [
    (1, 1, 1, F32, "none", False, 1e-8, "none", ("mu_J", "lv_J")),
    (2, 3, 5, F16, "empty", False, 1e-8, "all", ("mu_J",)),
    (3, 3, 17, BF16, "bool", True, 0.0, "all", ("lv_J",)),
    (4, 1, 67, F32, "float", True, 0.3, "some", ("mu_J", "lv_J")),
    (5, 2, 130, F32, "empty", False, 1e-8, "some", ("mu_J", "lv_J")),  # two D-chunks of BLOCK_D = 128
    (6, 1, 33, F64, "all", True, 1e-8, "none", ("mu_J",)),
    (6, 7, 1, F32, "bool", False, 0.0, "some", ("lv_J",)),
]


def _poe_case(M, B, D, dtype, mask_kind, prior, floor, sub_kind, names):
    def case(g):
        gen = torch.Generator().manual_seed(M * 1000 + B * 10 + D)
        mask = _mask(g, gen, mask_kind, M, B)
        mu, lv = _experts(g, gen, M, B, D, dtype, mask)
        mu_J, lv_J = poe(mu, lv, mask, prior_expert=prior, var_floor=floor, subsets=_subsets(g, sub_kind, M))
        out = dict(mu_J=mu_J, lv_J=lv_J)
        dmu, dlv = torch.autograd.grad([out[n] for n in names], [mu, lv], _grads(g, gen, out, names))
        return dict(out, d_mu=dmu, d_lv=dlv)
    return case


@pytest.mark.parametrize("M,B,D,dtype,mask,prior,floor,subsets,grads", POE_CASES,
                         ids=[f"M{c[0]}-B{c[1]}-D{c[2]}-{str(c[3])[6:]}-{c[4]}-prior{int(c[5])}-{c[7]}-{len(c[8])}g"
                              for c in POE_CASES])
def test_poe(M, B, D, dtype, mask, prior, floor, subsets, grads):
    _check(_poe_case(M, B, D, dtype, mask, prior, floor, subsets, grads), POE)


# ---------------------------------------------------------------------------------------------- likelihood
# (dist, N, copies, inner, event shape, dtype, mask, scale, rescale, strided recon): R = N * copies programs,
# each looping over its G groups in chunks of BLOCK_G = min(next_pow2(G), 1024 // next_pow2(C)).
LIKELIHOOD_CASES = [
    ("normal", 1, 2, 1, (1030,), F32, "bool", 0.7, 1.5, False),  # two chunks of 1024 features
    ("laplace", 3, 2, 2, (5,), F16, "float", 2.0, 1.0, True),
    ("bernoulli", 3, 1, 1, (2, 3, 5), BF16, "none", 1.0, 0.5, False),
    ("categorical", 1, 3, 3, (130, 5), F32, "empty", 1.0, 2.0, False),  # G = 130 in chunks of 128
    ("categorical", 3, 1, 1, (17, 67), F64, "bool", 1.0, 1.0, False),  # C = 67: G = 17 in chunks of 8
    ("categorical", 7, 1, 1, (5,), F16, "all", 1.0, 1.0, True),
    ("bernoulli", 2, 2, 1, (17,), F32, "expanded", 1.0, 1.0, False),  # a stride-0 mask
    ("normal", 5, 1, 1, (1,), F32, "bool", 1.0, 1.0, False),
]


def _likelihood_case(dist, N, copies, inner, event, dtype, mask_kind, scale, rescale, strided):
    def case(g):
        gen = torch.Generator().manual_seed(N * 100 + len(event) + copies)
        R = N * copies
        if dist == "categorical":
            target = torch.nn.functional.one_hot(torch.randint(event[-1], (N, *event[:-1]), generator=gen),
                                                 event[-1]).float()
        elif dist == "bernoulli":
            target = (torch.rand(N, *event, generator=gen) < 0.5).float()
        else:
            target = torch.randn(N, *event, generator=gen)
        if mask_kind == "expanded":
            mask = g.place(torch.ones(1, dtype=torch.bool), "mask").expand(N)
        elif mask_kind == "none":
            mask = None
        else:
            w = torch.rand(N, generator=gen) < 0.6
            w = {"all": torch.ones_like(w), "empty": torch.zeros_like(w), "float": w.float()}.get(mask_kind, w)
            mask = g.place(w, "mask", strided=True)
        recon = g.place(torch.randn(R, *event, generator=gen).to(dtype), "recon", strided=strided,
                        requires_grad=True)
        out = likelihood(recon, g.place(target.to(dtype), "target"), dist, mask, scale, rescale, inner)
        (d,) = torch.autograd.grad(out, recon, g.place(torch.randn(R, generator=gen).to(out.dtype), "g", strided=True))
        return dict(out=out, d_recon=d)
    return case


@pytest.mark.parametrize("dist,N,copies,inner,event,dtype,mask,scale,rescale,strided", LIKELIHOOD_CASES,
                         ids=[f"{c[0]}-N{c[1]}x{c[2]}-inner{c[3]}-{'x'.join(map(str, c[4]))}-{str(c[5])[6:]}-{c[6]}"
                              for c in LIKELIHOOD_CASES])
def test_likelihood(dist, N, copies, inner, event, dtype, mask, scale, rescale, strided):
    _check(_likelihood_case(dist, N, copies, inner, event, dtype, mask, scale, rescale, strided), LIKELIHOOD)


# ---------------------------------------------------------------------------------------------- iw_lse_update
@pytest.mark.parametrize("n,k,D,dtype", [(1, 1, 1, F32), (3, 4, 5, F64), (7, 3, 17, F32)])
def test_iw_lse_update_cpu_op(n, k, D, dtype):
    """The C++ CPU op: inputs in guarded buffers (z with padded strides, so the op's own contiguous copy is
    guarded too) and its outputs, allocated by ``at::empty_like`` in C++, moved into guarded buffers."""
    def case(g):
        gen = torch.Generator().manual_seed(n + k + D)
        run_max, run_sum = iw_lse_init(n, dtype=dtype)
        args = [g.place(torch.randn(n, k, generator=gen).to(dtype) * 3, "log_px"),
                g.place(torch.randn(n, k, D, generator=gen).to(dtype), "z", strided=True),
                g.place(torch.randn(n, D, generator=gen).to(dtype), "mu_J"),
                g.place(torch.randn(n, D, generator=gen).to(dtype), "lv_J")]
        m1, s1 = iw_lse_update(*args, g.place(run_max, "run_max"), g.place(run_sum, "run_sum"))
        m2, s2 = iw_lse_update(*args, m1, s1)  # a second chunk folds into the first's state
        return dict(m1=m1, s1=s1, m2=m2, s2=s2)

    from crmvae_fast import _extension

    if not _extension.has_kernel("cpu"):
        pytest.skip("the C++ extension is not built here: nothing but the eager twin to check")
    _check(case, [])


# ---------------------------------------------------------------------------------------------- random sample
@settings(max_examples=6, deadline=None)
@given(op=st.sampled_from(["latent_step", "poe", "likelihood"]), M=st.integers(1, 6), B=st.integers(1, 5),
       D=st.sampled_from([1, 2, 3, 5, 9, 17]), dtype=st.sampled_from([F32, F16, BF16]),
       mask=st.sampled_from(["none", "all", "empty", "bool", "float"]), flag=st.booleans(),
       dist=st.sampled_from(["normal", "laplace", "bernoulli", "categorical"]))
def test_hypothesis_sample(op, M, B, D, dtype, mask, flag, dist):
    if op == "latent_step":
        _check(_latent_case(M, B, D, dtype, mask, "draw" if flag else "eps", TRAIN if flag else ALL6, False),
               LATENT)
    elif op == "poe":
        _check(_poe_case(M, B, D, dtype, mask, flag, 1e-8, "some" if flag else "none", ("mu_J", "lv_J")), POE)
    else:
        _check(_likelihood_case(dist, B, 1 + flag, 1 + flag, (D, M), dtype, mask, 1.3, 0.7, flag), LIKELIHOOD)


def test_every_kernel_is_swept():
    """A new @triton.jit kernel in crmvae_fast.kernels must get cases here: the sweep names every one."""
    found = set()
    for name in ("latent_step", "poe", "likelihood", "iw_logsumexp"):
        mod = importlib.import_module(f"crmvae_fast.kernels.{name}")
        found |= {k for k, v in vars(mod).items() if k.endswith("_kernel") and hasattr(v, "fn")}
    assert found == set(LATENT + POE + LIKELIHOOD)


# ---------------------------------------------------------------------------------------------- planted bugs
def _planted_sum(bug, B=3, D=5):
    def case(g):
        x = g.place(torch.randn(B, D, generator=torch.Generator().manual_seed(0)), "x", strided=True)
        out = torch.empty(B)
        planted.row_sum[(B,)](x, out, D, x.stride(0), BLOCK=triton.next_power_of_2(D), BUG=bug)
        return dict(out=out)
    return run_guarded(case).problems


def _planted_copy(bug, B=3, D=5):
    def case(g):
        x = g.place(torch.randn(B, D, generator=torch.Generator().manual_seed(0)), "x")
        y = torch.empty(B, D)
        planted.row_copy[(B,)](x, y, D, x.stride(0), y.stride(0), BLOCK=triton.next_power_of_2(D), BUG=bug)
        return dict(y=y)
    return run_guarded(case).problems


def _kinds(problems):
    return {"address": any("outside every tensor argument" in p for p in problems),
            "race": any("more than one program" in p for p in problems),
            "margin": any("changed the margin" in p for p in problems),
            "sentinel": any("differs between fills" in p for p in problems)}


def test_planted_kernels_are_clean_without_their_bug():
    assert _planted_sum(0) == [] and _planted_copy(0) == []


def test_planted_missed_store_is_caught():
    """A store one column short: the output's last column keeps what ``torch.empty`` left, the sentinel."""
    problems = _planted_copy(2)
    assert _kinds(problems) == {"address": False, "race": False, "margin": False, "sentinel": True}, problems


def test_planted_out_of_bounds_load_is_caught():
    """An unmasked load past the row: the address check refuses it, and the sum reads the sentinels."""
    kinds = _kinds(_planted_sum(1))
    assert kinds["address"] and kinds["sentinel"], kinds


def test_planted_one_column_load_overshoot_is_caught():
    """``offs <= D`` in a load mask: one element past every row (into the padded stride's gap)."""
    problems = _planted_sum(2)
    kinds = _kinds(problems)
    assert kinds["address"] and kinds["sentinel"], kinds
    assert any("element offset 5 of x_ptr" in p for p in problems), problems  # row 0, column D


def test_planted_one_column_store_overshoot_is_caught():
    """``offs <= D`` in a store mask: rows 0 and 1 write the next row's first element (inside the tensor: the
    race check sees it), the last row writes the margin of the output the case allocated."""
    problems = _planted_copy(1)
    kinds = _kinds(problems)
    assert kinds["address"] and kinds["margin"] and kinds["race"], kinds
    assert any("changed the margin of aten.empty" in p and "offsets 15..15" in p for p in problems), problems


def test_planted_discarded_load_is_caught_by_the_address_check_only():
    """A stray load whose value a select throws away changes no result: only the address check sees it (on a
    GPU it can still fault), which is why the guard bands come with it."""
    kinds = _kinds(_planted_sum(3))
    assert kinds == {"address": True, "race": False, "margin": False, "sentinel": False}, kinds
