"""The fused likelihood (``crmvae_fast.kernels.likelihood``) against its eager twin ``reference.neg_log_likelihood``
and against MultiVae's own ``recon_log_probs``.

Without a GPU the Triton kernels run through the interpreter (``TRITON_INTERPRET=1``, set by conftest): shapes
stay tiny. Values and recon gradients are compared for every distribution, with masks, NaN placeholders in
missing rows, both row layouts (``inner`` = 1 and k) and float32 / float64 / bfloat16 recon.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from crmvae_fast import _backend, reference
from crmvae_fast.ops import likelihood

lk_mod = importlib.import_module("crmvae_fast.kernels.likelihood")

from conftest import needs_kernels  # noqa: E402

# (atol, rtol) for values and for gradients, per recon dtype (the arithmetic is float32, float64 for float64).
TOL = {
    torch.float32: dict(out=(1e-4, 1e-5), grad=(1e-5, 1e-5)),
    torch.float64: dict(out=(1e-10, 1e-10), grad=(1e-6, 1e-6)),  # scale enters the kernel as a float32 scalar
    torch.bfloat16: dict(out=(5e-2, 1e-2), grad=(2e-2, 2e-2)),
}
DISTS = ["normal", "laplace", "bernoulli", "categorical"]


def make(dist, R, N, event, dtype=torch.float32, seed=0, device="cpu", nan_rows=()):
    g = torch.Generator().manual_seed(seed)
    recon = (2 * torch.randn(R, *event, generator=g)).to(dtype)
    if dist == "bernoulli":
        target = torch.randint(0, 2, (N, *event), generator=g).float()
    elif dist == "categorical":
        target = F.one_hot(torch.randint(0, event[-1], (N, *event[:-1]), generator=g), event[-1]).float()
    else:
        target = torch.randn(N, *event, generator=g)
    for i in nan_rows:
        target[i] = float("nan")
    return recon.to(device).requires_grad_(), target.to(device)


def compare(dist, recon, target, mask, scale, rescale, inner, dtype, use_compile=False):
    fn = torch.compile(likelihood, fullgraph=True, backend="aot_eager") if use_compile else likelihood
    out = fn(recon, target, dist, mask, scale=scale, rescale=rescale, inner=inner)
    ref = reference.neg_log_likelihood(recon, target, dist, mask, scale, rescale, inner)
    assert out.shape == (recon.shape[0],) and out.dtype == ref.dtype
    atol, rtol = TOL[dtype]["out"]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype).to(out.device)
    g_out, = torch.autograd.grad(out, recon, up)
    g_ref, = torch.autograd.grad(ref, recon, up)
    assert torch.isfinite(g_out).all()
    atol, rtol = TOL[dtype]["grad"]
    torch.testing.assert_close(g_out.float(), g_ref.float(), atol=atol, rtol=rtol)
    return out, g_out


@needs_kernels
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("use_compile", [False, True], ids=["eager", "compiled"])
def test_matches_the_eager_twin_with_masks_and_nan_placeholders(dist, use_compile, device):
    event = (3, 5) if dist == "categorical" else (2, 7)
    N = 4
    recon, target = make(dist, 2 * N, N, event, device=device, nan_rows=(1,))
    mask = torch.tensor([True, False, True, True], device=device)
    out, grad = compare(dist, recon, target, mask, 0.6, 1.7, 1, torch.float32, use_compile)
    # the missing row (and its copy in the second half) is exactly 0, and so is its gradient
    assert out[1] == 0 and out[N + 1] == 0
    assert (grad[1] == 0).all() and (grad[N + 1] == 0).all()


@needs_kernels
@pytest.mark.parametrize("dist", DISTS)
def test_nll_layout_inner_k(dist, device):
    """The joint NLL's layout: the k samples of a point adjacent, n*k rows against n targets."""
    n, k = 3, 4
    event = (2, 3) if dist == "categorical" else (5,)
    recon, target = make(dist, n * k, n, event, device=device, seed=3)
    compare(dist, recon, target, torch.tensor([True, True, False], device=device), 1.3, -1.0, k, torch.float32)


@needs_kernels
def test_strided_mask(device):
    """A mask that is one column of an (N, M) matrix: the kernels used to read ``w_ptr + t`` with no stride, so
    they took other samples' flags (and read past a stride-0 expanded mask: tests/test_guard_band.py)."""
    N = 4
    recon, target = make("normal", 2 * N, N, (3,), device=device, seed=5, nan_rows=(1,))
    masks = torch.tensor([[True, False], [False, True], [True, True], [True, False]], device=device)
    mask = masks[:, 0]  # sample 1 is missing (a NaN placeholder)
    assert not mask.is_contiguous()
    compare("normal", recon, target, mask, 0.8, 1.0, 1, torch.float32)


@needs_kernels
@pytest.mark.parametrize("dist", DISTS)
def test_float64_gradcheck(dist, device):
    event = (2, 3) if dist == "categorical" else (4,)
    recon, target = make(dist, 4, 2, event, dtype=torch.float64, device=device, seed=5)
    mask = torch.tensor([True, False], device=device)
    # laplace is not differentiable where recon == target; the random draws keep away from it
    torch.autograd.gradcheck(lambda r: likelihood(r, target, dist, mask, scale=0.8, rescale=2.0), (recon,),
                             eps=1e-6, atol=1e-5, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("inner", [1, 2])
def test_float64_gradcheck_of_the_target(dist, inner, device):
    """Before: a target that requires grad was refused ('the fused op gives no gradient to the target'). Now the
    op gives it, like its eager twin: gradcheck in float64 for recon and target together, masked rows included."""
    event = (2, 3) if dist == "categorical" else (4,)
    recon, target = make(dist, 2 * inner * 2, 2, event, dtype=torch.float64, device=device, seed=6)
    recon.requires_grad_()
    target = target.detach().double().requires_grad_()
    mask = torch.tensor([True, False], device=device)
    fn = lambda r, t: likelihood(r, t, dist, mask, scale=0.8, rescale=2.0, inner=inner)  # noqa: E731
    torch.autograd.gradcheck(fn, (recon, target), eps=1e-6, atol=1e-5, rtol=1e-4)
    got = torch.autograd.grad(fn(recon, target).sum(), target)[0]
    twin = reference.neg_log_likelihood(recon, target, dist, mask, 0.8, 2.0, inner)
    torch.testing.assert_close(got, torch.autograd.grad(twin.sum(), target)[0])
    assert not got[1].any()  # the masked target row


@needs_kernels
@settings(max_examples=25, deadline=None)
@given(
    dist=st.sampled_from(DISTS),
    N=st.integers(1, 5),
    copies=st.integers(1, 3),
    inner=st.integers(1, 3),
    features=st.integers(1, 40),
    classes=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    masked=st.booleans(),
    scale=st.floats(0.1, 5.0),
    rescale=st.floats(-3.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes_masks_dtypes(dist, N, copies, inner, features, classes, dtype, masked, scale, rescale,
                                        seed):
    event = (max(1, features // classes), classes) if dist == "categorical" else (features,)
    recon, target = make(dist, copies * N * inner, N, event, dtype=dtype, seed=seed)
    mask = None
    if masked:
        mask = torch.rand(N, generator=torch.Generator().manual_seed(seed)) > 0.4
    compare(dist, recon, target, mask, scale, rescale, inner, dtype)


@needs_kernels
def test_extreme_logits_and_wide_rows():
    """Logits of +-80 (exp overflows in a naive formula) and a row wider than one tile (784 features)."""
    recon = torch.tensor([[80.0, -80.0, 0.0, 30.0]], requires_grad=True)
    target = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    compare("bernoulli", recon, target, None, 1.0, 1.0, 1, torch.float32)
    recon, target = make("bernoulli", 2, 2, (784,), seed=7)
    compare("bernoulli", recon, target, None, 1.0, 1.0, 1, torch.float32)
    recon, target = make("categorical", 2, 1, (3, 40), seed=8)
    with torch.no_grad():
        recon[0, 0, 0] = 90.0
    compare("categorical", recon, target, None, 1.0, 1.0, 1, torch.float32)


@pytest.mark.parametrize("dist,params", [("normal", {"scale": 0.4}), ("laplace", {"scale": 2.5}),
                                         ("bernoulli", {}), ("categorical", {})])
def test_twin_and_fused_equal_multivae_recon_log_probs(dist, params, device):
    """The outside witness: MultiVae's own ``recon_log_probs`` of a model built with this distribution."""
    multivae = pytest.importorskip("multivae", reason="MultiVae 1.0.3 is the outside witness")
    from multivae.models import CRMVAE as MVCRMVAE
    from multivae.models import CRMVAEConfig as MVConfig

    mv = MVCRMVAE(MVConfig(n_modalities=1, latent_dim=2, input_dims={"x": (2, 4)}, decoders_dist={"x": dist},
                           decoder_dist_params={"x": params} if params else None))
    recon, target = make(dist, 3, 3, (2, 4), seed=11)
    expected = -mv.recon_log_probs["x"](recon, target).reshape(3, -1).sum(-1) * 1.5
    got = reference.neg_log_likelihood(recon, target, dist, None, params.get("scale", 1.0), 1.5)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    if _backend.triton_runs_on(recon.device):
        fused = likelihood(recon, target, dist, None, scale=params.get("scale", 1.0), rescale=1.5)
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-4)
    assert multivae is not None


def test_bad_inputs_get_clear_errors():
    recon, target = make("normal", 4, 2, (3,))
    with pytest.raises(ValueError, match="expected dist"):
        likelihood(recon, target, "poisson")
    with pytest.raises(ValueError, match="multiple of the target rows"):
        likelihood(recon, target[:1].expand(3, 3)[:3], "normal")
    with pytest.raises(ValueError, match="same event shape"):
        likelihood(recon, target[:, :2], "normal")
    with pytest.raises(ValueError, match="mask of shape"):
        likelihood(recon, target, "normal", torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale > 0"):
        likelihood(recon, target, "laplace", scale=0.0)

