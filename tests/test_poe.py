"""The public product of experts ``crmvae_fast.ops.poe`` (``crmvae_fast.kernels.poe``) against MultiVae 1.0.3's
``poe`` (MVTCAE, MoPoE) and ``stable_poe`` (MVAE), and against its eager twin ``reference.poe_experts``.

MultiVae is the outside witness: masked experts are handed to it the way its models do (log-variance set to
+inf, MVTCAE's and MVAE's convention), a subset is the list of its experts (MoPoE's and MVAE's subsets), and
samples whose product is empty are left out of its call (MoPoE and MVAE filter them too), our answer for them
being N(0, I). Without a GPU the Triton kernels run through the interpreter (conftest), so shapes stay tiny.
"""

import importlib
import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crmvae_fast import _backend, reference
from crmvae_fast.ops import poe

multivae_utils = pytest.importorskip("multivae.models.base.base_utils",
                                     reason="MultiVae 1.0.3 (the outside witness) is not installed")
poe_mod = importlib.import_module("crmvae_fast.kernels.poe")  # the module (the package exports the function)

from conftest import needs_kernels  # noqa: E402

# (atol, rtol) for outputs and gradients, per input dtype; low precision rounds the inputs and outputs only
# (arithmetic is float32), so its tolerance is a few units in the last place of the output dtype.
TOL = {
    torch.float32: dict(out=(1e-5, 1e-5), grad=(1e-4, 1e-4)),
    torch.float16: dict(out=(2e-2, 1e-2), grad=(2e-2, 1e-2)),
    torch.bfloat16: dict(out=(1e-1, 2e-2), grad=(1e-1, 2e-2)),
    torch.float64: dict(out=(1e-11, 1e-11), grad=(1e-10, 1e-10)),
}

# name -> (prior_expert, var_floor): the MultiVae function each configuration reproduces
VARIANTS = {
    "poe": (False, 1e-8),  # MVTCAE's joint, MoPoE's subsets: poe(mus, logvars)
    "stable_poe+prior": (True, 0.0),  # MVAE: stable_poe over the experts and N(0, I)
    "poe+prior": (True, 1e-8),  # MoPoE's full subset: poe over the experts and N(0, I)
}

IMPLS = {"fused": poe, "twin": reference.poe_experts}


def _inputs(M, B, D, device, dtype=torch.float32, seed=0, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(M, B, D, generator=g)
    lv = scale * torch.randn(M, B, D, generator=g)
    return mu.to(device=device, dtype=dtype), lv.to(device=device, dtype=dtype)


def _random_mask(M, B, device, seed=0, p=0.6):
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.rand(M, B, generator=g) < p).to(device)


def _all_subsets(M, device):
    rows = [[m in s for m in range(M)] for r in range(1, M + 1) for s in itertools.combinations(range(M), r)]
    return torch.tensor(rows, dtype=torch.bool, device=device)


def multivae_poe(mu, lv, mask, subsets, prior_expert, var_floor):
    """MultiVae's own functions, called the way its models call them, on every subset (or all experts)."""
    M, B, D = mu.shape
    w = torch.ones(M, B, dtype=torch.bool, device=mu.device) if mask is None else mask
    rows = [torch.ones(M, dtype=torch.bool)] if subsets is None else list(subsets.cpu())
    mus_J, lvs_J = [], []
    for row in rows:
        idx = [m for m in range(M) if row[m]]
        keep = torch.ones(B, dtype=torch.bool, device=mu.device) if prior_expert else w[idx].any(0)
        mus = torch.where(w[idx, :, None], mu[idx], 0.0)[:, keep]
        lvs = torch.where(w[idx, :, None], lv[idx], math.inf)[:, keep]  # MVTCAE/MVAE: missing -> lv = +inf
        if prior_expert:  # MVAE's compute_mu_log_var_subset, MoPoE's _poe_fusion
            mus = torch.cat([mus, torch.zeros_like(mus[:1])])
            lvs = torch.cat([lvs, torch.zeros_like(lvs[:1])])
        if var_floor == 0:
            m_J, l_J = multivae_utils.stable_poe(mus, lvs)
        else:
            m_J, l_J = multivae_utils.poe(mus, lvs, eps=var_floor)
        zeros = mu.new_zeros(B, D)
        mus_J.append(zeros.index_put((keep,), m_J))
        lvs_J.append(zeros.index_put((keep,), l_J))
    if subsets is None:
        return mus_J[0], lvs_J[0]
    return torch.stack(mus_J), torch.stack(lvs_J)


def _run(fn, mu, lv, upstream, **kw):
    """Outputs of ``fn(mu, lv, **kw)`` and the gradients of mu, lv for the given upstream gradients."""
    mu = mu.detach().clone().requires_grad_()
    lv = lv.detach().clone().requires_grad_()
    out = fn(mu, lv, **kw)
    grads = torch.autograd.grad(out, [mu, lv], [g.to(o.dtype) for o, g in zip(out, upstream)])
    return [o.detach() for o in out], grads


def _upstream(shape, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 2)
    return [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(2)]


def _assert_close(actual, expected, tol, what):
    atol, rtol = tol
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def _compare(out, grads, ref_out, ref_grads, tol, who):
    for name, a, e in zip(("mu_J", "lv_J"), out, ref_out):
        assert a.shape == e.shape, f"{who} {name}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        _assert_close(a, e, tol["out"], f"{who} {name}")
    for name, a, e in zip(("d mu", "d lv"), grads, ref_grads):
        _assert_close(a, e, tol["grad"], f"{who} {name}")


@pytest.mark.parametrize("impl", ["fused", "twin"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_multivae(device, impl, variant, masked, dtype):
    if impl == "fused" and not _backend.triton_runs_on(device):
        pytest.skip("the Triton kernels cannot run here: no GPU and TRITON_INTERPRET!=1")
    M, B, D = 3, 5, 7
    prior_expert, var_floor = VARIANTS[variant]
    mu, lv = _inputs(M, B, D, device, dtype)
    mask = _random_mask(M, B, device) if masked else None
    if masked:
        mask[:, 0] = False  # one sample with no observed expert: N(0, I), or the prior alone
    ups = _upstream((B, D), device, dtype)
    kw = dict(prior_expert=prior_expert, var_floor=var_floor)
    out, grads = _run(lambda a, b, **k: IMPLS[impl](a, b, mask, **k), mu, lv, ups, **kw)
    ref_out, ref_grads = _run(lambda a, b, **k: multivae_poe(a, b, mask, None, **k), mu, lv, ups, **kw)
    assert out[0].dtype == dtype and out[1].dtype == dtype
    _compare(out, grads, ref_out, ref_grads, TOL[dtype], f"{impl} vs MultiVae {variant}")
    if masked:  # masked experts get exactly zero gradient
        assert (grads[0][~mask] == 0).all() and (grads[1][~mask] == 0).all()


@pytest.mark.parametrize("impl", ["fused", "twin"])
@pytest.mark.parametrize("variant", ["poe", "stable_poe+prior"])
@pytest.mark.parametrize("M", [3, 5])
def test_subsets_match_multivae(device, impl, variant, M):
    """Every non-empty subset of M experts (7 or 31, MoPoE's PolyMNIST count) in one call, with a mask."""
    if impl == "fused" and not _backend.triton_runs_on(device):
        pytest.skip("the Triton kernels cannot run here: no GPU and TRITON_INTERPRET!=1")
    B, D = 4, 5
    prior_expert, var_floor = VARIANTS[variant]
    mu, lv = _inputs(M, B, D, device, seed=M)
    mask = _random_mask(M, B, device, seed=M)
    subsets = _all_subsets(M, device)
    S = subsets.shape[0]
    ups = _upstream((S, B, D), device, torch.float32, seed=M)
    kw = dict(prior_expert=prior_expert, var_floor=var_floor, subsets=subsets)
    out, grads = _run(lambda a, b, **k: IMPLS[impl](a, b, mask, **k), mu, lv, ups, **kw)
    ref_out, ref_grads = _run(lambda a, b, **k: multivae_poe(a, b, mask, **k), mu, lv, ups, **kw)
    assert out[0].shape == (S, B, D)
    _compare(out, grads, ref_out, ref_grads, TOL[torch.float32], f"{impl} vs MultiVae {variant}, {S} subsets")


@needs_kernels
def test_subsets_equal_separate_calls(device):
    """Row s of a subsets call is the plain call on the experts of row s (mask and prior included)."""
    M, B, D = 4, 3, 6
    mu, lv = _inputs(M, B, D, device, seed=3)
    mask = _random_mask(M, B, device, seed=3)
    subsets = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=torch.bool, device=device)
    mu_S, lv_S = poe(mu, lv, mask, subsets=subsets, prior_expert=True)
    for s in range(subsets.shape[0]):
        idx = subsets[s].nonzero().flatten()
        mu_1, lv_1 = poe(mu[idx], lv[idx], mask[idx], prior_expert=True)
        torch.testing.assert_close(mu_S[s], mu_1, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lv_S[s], lv_1, atol=1e-6, rtol=1e-6)


@needs_kernels
@pytest.mark.parametrize(
    "kw",
    [dict(prior_expert=False, var_floor=1e-8), dict(prior_expert=True, var_floor=0.0),
     dict(prior_expert=True, var_floor=0.3, subsets="all")],
    ids=["poe", "stable_poe+prior", "subsets+prior+floor"],
)
def test_gradcheck_float64(device, kw):
    M, B, D = 3, 2, 3
    mu, lv = _inputs(M, B, D, device, torch.float64, seed=7)
    mask = _random_mask(M, B, device, seed=7)
    mask[:, 0] = True
    kw = dict(kw)
    if kw.get("subsets") == "all":
        kw["subsets"] = _all_subsets(M, device)
    mu.requires_grad_()
    lv.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: poe(a, b, mask, **kw), (mu, lv), fast_mode=True)


@pytest.mark.parametrize("prior_expert,var_floor", [(False, 1e-8), (True, 0.0), (True, 0.3)])
def test_twin_gradcheck_float64(device, prior_expert, var_floor):
    M, B, D = 3, 2, 3
    mu, lv = _inputs(M, B, D, device, torch.float64, seed=8)
    mask = _random_mask(M, B, device, seed=8)
    kw = dict(prior_expert=prior_expert, var_floor=var_floor, subsets=_all_subsets(M, device))
    mu.requires_grad_()
    lv.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: reference.poe_experts(a, b, mask, **kw), (mu, lv))


@needs_kernels
def test_extreme_lv_keeps_every_expert(device):
    """exp(lv) overflows float32 past lv = 88.7: MultiVae's poe then drops the expert (T = 0) and returns NaN
    when it was the only one; the log domain keeps it."""
    mu = torch.tensor([[[0.5, -2.0]], [[3.0, 1.0]]], device=device)  # (M=2, B=1, D=2)
    lv = torch.tensor([[[100.0, -100.0]], [[90.0, -95.0]]], device=device)
    mask = torch.tensor([[True], [False]], device=device)
    mu_J, lv_J = poe(mu, lv, mask)
    torch.testing.assert_close(mu_J, mu[0])
    # lv = -100 sits under the floor: var_J = e^-100 + 1e-8
    torch.testing.assert_close(lv_J, torch.tensor([[100.0, math.log(math.exp(-100.0) + 1e-8)]], device=device))
    mv_mu, _ = multivae_utils.poe(mu[:1], lv[:1])
    assert torch.isnan(mv_mu[0, 0]), "MultiVae's poe no longer drops this expert: update the docstring"
    # both observed: precisions e^-100 and e^-90 in d=0 (1/(e^100) underflows float32 to 0 in MultiVae's poe)
    mu_J, lv_J = poe(mu, lv)
    w1 = 1.0 / (1.0 + math.exp(-10.0))  # share of the second expert
    expected_mu0 = (1 - w1) * 0.5 + w1 * 3.0
    assert abs(mu_J[0, 0].item() - expected_mu0) < 1e-5
    assert abs(lv_J[0, 0].item() - (90.0 - math.log1p(math.exp(-10.0)))) < 1e-4


@needs_kernels
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    M=st.integers(1, 4), B=st.integers(1, 3), D=st.integers(1, 5), seed=st.integers(0, 2**16),
    shift=st.floats(-100.0, 100.0), scale=st.floats(0.0, 30.0), prior_expert=st.booleans(),
    var_floor=st.sampled_from([0.0, 1e-8, 0.5]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    use_subsets=st.booleans(),
)
def test_extreme_lv_hypothesis(device, M, B, D, seed, shift, scale, prior_expert, var_floor, dtype, use_subsets):
    """Log-variances from -130 to 130: finite outputs and gradients, equal to the twin run in float64."""
    mu, lv = _inputs(M, B, D, device, torch.float32, seed=seed, scale=1.0)
    lv = (shift + scale * lv.clamp(-1, 1)).to(dtype)
    mu = mu.to(dtype)
    mask = _random_mask(M, B, device, seed=seed)
    subsets = _all_subsets(M, device) if use_subsets else None
    kw = dict(prior_expert=prior_expert, var_floor=var_floor, subsets=subsets)
    shape = (B, D) if subsets is None else (subsets.shape[0], B, D)
    ups = _upstream(shape, device, torch.float32, seed=seed)
    out, grads = _run(lambda a, b, **k: poe(a, b, mask, **k), mu, lv, ups, **kw)
    ref_out, ref_grads = _run(lambda a, b, **k: reference.poe_experts(a, b, mask, **k), mu.double(), lv.double(),
                              [u.double() for u in ups], **kw)
    for t in (*out, *grads):
        assert torch.isfinite(t).all()
    tol = dict(out=TOL[dtype]["out"], grad=(1e-4, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2))
    _compare(out, grads, [o.to(dtype) for o in ref_out], ref_grads, tol, "fused vs float64 twin")


@needs_kernels
@pytest.mark.parametrize("placeholder", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_placeholders_in_masked_entries(device, placeholder):
    M, B, D = 3, 4, 5
    mu, lv = _inputs(M, B, D, device)
    mask = _random_mask(M, B, device)
    dirty_mu = torch.where(mask[..., None], mu, placeholder)
    dirty_lv = torch.where(mask[..., None], lv, placeholder)
    subsets = _all_subsets(M, device)
    ups = _upstream((subsets.shape[0], B, D), device, torch.float32)
    clean = _run(lambda a, b: poe(a, b, mask, subsets=subsets), mu, lv, ups)
    dirty = _run(lambda a, b: poe(a, b, mask, subsets=subsets), dirty_mu, dirty_lv, ups)
    for a, e in zip([*dirty[0], *dirty[1]], [*clean[0], *clean[1]]):
        assert torch.equal(a, e)
    assert (dirty[1][0][~mask] == 0).all() and (dirty[1][1][~mask] == 0).all()


@needs_kernels
@pytest.mark.parametrize("prior_expert", [False, True])
def test_empty_product(device, prior_expert):
    """No observed expert: N(0, I) without the prior expert, N(0, 1 + f) with it; no gradient either way."""
    M, B, D = 2, 3, 4
    mu, lv = _inputs(M, B, D, device)
    mu.requires_grad_()
    lv.requires_grad_()
    mask = torch.zeros(M, B, dtype=torch.bool, device=device)
    mu_J, lv_J = poe(mu, lv, mask, prior_expert=prior_expert, var_floor=0.25)
    assert torch.equal(mu_J, torch.zeros_like(mu_J))
    torch.testing.assert_close(lv_J, torch.full_like(lv_J, math.log(1.25) if prior_expert else 0.0))
    (mu_J.sum() + lv_J.sum()).backward()
    assert torch.equal(mu.grad, torch.zeros_like(mu)) and torch.equal(lv.grad, torch.zeros_like(lv))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_and_expanded_gradients(device, dtype):
    """float16/bfloat16 in and out (float32 arithmetic); ``.sum().backward()`` hands stride-0 gradients."""
    M, B, D = 3, 4, 5
    mu, lv = _inputs(M, B, D, device, dtype)
    mask = _random_mask(M, B, device)
    subsets = _all_subsets(M, device)
    got, want = [], []
    for fn, store in ((poe, got), (reference.poe_experts, want)):
        a, b = mu.clone().requires_grad_(), lv.clone().requires_grad_()
        out = fn(a, b, mask, subsets=subsets, prior_expert=True)
        (out[0].sum() + 2 * out[1].sum()).backward()
        store += [*out, a.grad, b.grad]
    assert got[0].dtype == dtype and got[2].dtype == dtype
    for name, a, e in zip(("mu_J", "lv_J", "d mu", "d lv"), got, want):
        _assert_close(a, e, TOL[dtype]["out"], name)


@needs_kernels
@pytest.mark.parametrize("variant", ["plain", "mask+prior", "subsets+floor0"])
def test_opcheck(device, variant):
    M, B, D = 3, 2, 4
    mu, lv = _inputs(M, B, D, device)
    mask = _random_mask(M, B, device) if variant != "plain" else None
    subsets = _all_subsets(M, device) if variant == "subsets+floor0" else None
    prior, floor = variant == "mask+prior", (0.0 if variant == "subsets+floor0" else 1e-8)
    args = (mu.clone().requires_grad_(), lv.clone().requires_grad_(), mask, subsets, prior, floor)
    torch.library.opcheck(torch.ops.crmvae_fast.poe.default, args)
    ups = _upstream((B, D) if subsets is None else (subsets.shape[0], B, D), device, torch.float32)
    torch.library.opcheck(torch.ops.crmvae_fast.poe_backward.default, (mu, lv, mask, subsets, prior, floor, *ups))


class _Counter:
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@needs_kernels
def test_one_launch_for_all_subsets(device, monkeypatch):
    fwd = _Counter(poe_mod._poe_fwd_kernel)
    bwd = _Counter(poe_mod._poe_bwd_kernel)
    monkeypatch.setattr(poe_mod, "_poe_fwd_kernel", fwd)
    monkeypatch.setattr(poe_mod, "_poe_bwd_kernel", bwd)
    M, B, D = 3, 2, 300  # several D chunks, 7 subsets: still one launch each way
    mu, lv = _inputs(M, B, D, device)
    mu.requires_grad_()
    lv.requires_grad_()
    subsets = _all_subsets(M, device)
    out = poe(mu, lv, _random_mask(M, B, device), subsets=subsets)
    assert (fwd.launches, bwd.launches) == (1, 0)
    torch.autograd.grad(out, [mu, lv], _upstream((7, B, D), device, torch.float32))
    assert (fwd.launches, bwd.launches) == (1, 1)


@needs_kernels
def test_compile_fullgraph(device):
    """No graph break: the op is opaque to dynamo; values and gradients equal the uncompiled call."""
    M, B, D = 3, 2, 4
    mu, lv = _inputs(M, B, D, device)
    mask = _random_mask(M, B, device)
    subsets = _all_subsets(M, device)

    def loss_fn(mu, lv, mask, subsets):
        mu_S, lv_S = poe(mu, lv, mask, subsets=subsets, prior_expert=True, var_floor=0.0)
        mu_J, lv_J = poe(mu, lv, mask)
        kl = 0.5 * (-lv_S + lv_S.exp() + mu_S.square() - 1).sum()
        return kl + (mu_J * lv_J).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, loss_fn):
        a, b = mu.clone().requires_grad_(), lv.clone().requires_grad_()
        loss = fn(a, b, mask, subsets)
        loss.backward()
        results.append((loss.detach(), a.grad, b.grad))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y)


def test_fallback_when_triton_cannot_run(device, monkeypatch):
    monkeypatch.setattr(_backend, "triton_runs_on", lambda dev: False)
    M, B, D = 3, 2, 4
    mu, lv = _inputs(M, B, D, device)
    mask = _random_mask(M, B, device)
    subsets = _all_subsets(M, device)
    kw = dict(prior_expert=True, var_floor=0.0, subsets=subsets)
    for x, y in zip(poe(mu, lv, mask, **kw), reference.poe_experts(mu, lv, mask, **kw)):
        assert torch.equal(x, y)


@needs_kernels
def test_list_input_and_float_mask(device):
    M, B, D = 2, 3, 4
    mu, lv = _inputs(M, B, D, device)
    mask = _random_mask(M, B, device)
    a = poe(list(mu), list(lv), mask.float())
    b = poe(mu, lv, mask)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_bad_input(device):
    M, B, D = 2, 3, 4
    mu, lv = _inputs(M, B, D, device)
    with pytest.raises(ValueError, match="same \\(M, B, D\\) shape"):
        poe(mu, lv[:, :2])
    with pytest.raises(ValueError, match="mask of shape"):
        poe(mu, lv, torch.ones(M, B + 1, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="subsets of shape \\(S, M\\)"):
        poe(mu, lv, subsets=torch.ones(3, M + 1, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="var_floor >= 0"):
        poe(mu, lv, var_floor=-1.0)
    with pytest.raises(TypeError, match="one floating dtype"):
        poe(mu, lv.double())
    with pytest.raises(ValueError, match="at least one expert"):
        poe(mu[:0], lv[:0])
    with pytest.raises(ValueError, match="same \\(B, D\\) shape"):
        poe([mu[0], mu[1, :2]], [lv[0], lv[1]])
