"""The fused latent step (``crmvae_fast.kernels.latent_step``) against its eager twin ``reference.latent_step``.

Without a GPU these run the Triton kernels through the interpreter (``TRITON_INTERPRET=1``, set by conftest),
so shapes stay small. Every output and every gradient is compared, with random upstream gradients on all six
outputs.
"""

import importlib
import itertools

import pytest
import torch

from crmvae_fast import _backend, reference
from crmvae_fast.ops import latent_step

ls_mod = importlib.import_module("crmvae_fast.kernels.latent_step")  # the module (the package exports the function)

needs_kernels = pytest.mark.skipif(
    not _backend.triton_runs_on(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    reason="the Triton kernels cannot run here: no GPU and TRITON_INTERPRET!=1 (conftest sets it without a GPU)",
)

# (atol, rtol) for outputs and for gradients, per input dtype. Low precision: the reference rounds mu_J and lv_J
# to the input dtype before the KLs and z_J, the kernel keeps them in float32, so the KL sums differ by that
# rounding times D.
TOL = {
    torch.float32: dict(out=(2e-5, 2e-5), grad=(1e-4, 1e-4)),
    torch.float16: dict(out=(2e-2, 1e-2), grad=(5e-2, 2e-2)),
    torch.bfloat16: dict(out=(1.5e-1, 3e-2), grad=(2.5e-1, 5e-2)),
    torch.float64: dict(out=(1e-10, 1e-10), grad=(1e-9, 1e-9)),
}
NAMES = ("mu_J", "lv_J", "z_J", "z", "kl_prior", "kl_experts")


def _inputs(M, B, D, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(M, B, D, generator=g)
    lv = 0.7 * torch.randn(M, B, D, generator=g)
    eps_J = torch.randn(B, D, generator=g)
    eps = torch.randn(M, B, D, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (mu, lv, eps_J, eps)]


def _random_mask(M, B, device, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.rand(M, B, generator=g) < 0.7).to(device)


def _run(fn, mu, lv, mask, eps_J, eps, upstream):
    """Outputs of ``fn`` and the gradients of mu, lv for the given upstream gradients of the six outputs."""
    mu = mu.detach().clone().requires_grad_()
    lv = lv.detach().clone().requires_grad_()
    out = fn(mu, lv, mask, eps_J, eps)
    pairs = [(o, g) for o, g in zip(out, upstream) if g is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], [mu, lv], [g.to(o.dtype) for o, g in pairs])
    return [o.detach() for o in out], grads


def _upstream(M, B, D, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 2)
    ct = reference.compute_dtype(dtype)
    shapes = [((B, D), dtype), ((B, D), dtype), ((B, D), dtype), ((M, B, D), dtype), ((B,), ct), ((M, B), ct)]
    return [torch.randn(s, generator=g).to(device=device, dtype=dt) for s, dt in shapes]


def _assert_close(actual, expected, tol, what):
    atol, rtol = tol
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _compare(mu, lv, mask, eps_J, eps, upstream, dtype=torch.float32):
    out, grads = _run(latent_step, mu, lv, mask, eps_J, eps, upstream)
    ref_out, ref_grads = _run(reference.latent_step, mu, lv, mask, eps_J, eps, upstream)
    ct = reference.compute_dtype(dtype)
    for name, a, e in zip(NAMES, out, ref_out):
        want = ct if name.startswith("kl") else dtype
        assert a.dtype == want, f"{name} has dtype {a.dtype}, expected {want}"
        assert a.shape == e.shape, f"{name} has shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        _assert_close(a, e, TOL[dtype]["out"], name)
    for name, a, e in zip(("d mu", "d lv"), grads, ref_grads):
        assert a.dtype == dtype
        _assert_close(a, e, TOL[dtype]["grad"], name)
    return out, grads


@needs_kernels
@pytest.mark.parametrize("M", [1, 2, 5])
@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("D", [1, 3, 33, 129])
def test_matches_reference(device, M, B, D):
    mu, lv, eps_J, eps = _inputs(M, B, D, device)
    mask = _random_mask(M, B, device) if M > 1 else None
    _compare(mu, lv, mask, eps_J, eps, _upstream(M, B, D, device, torch.float32))


@needs_kernels
@pytest.mark.parametrize("M,B,D", [(5, 2, 600), (16, 3, 129), (9, 2, 512)])
def test_matches_reference_several_d_chunks(device, M, B, D):
    """D larger than one BLOCK_D: the kernels loop over D chunks, the KL sums span them."""
    assert D > ls_mod._tiles(B, D)[1]
    mu, lv, eps_J, eps = _inputs(M, B, D, device)
    _compare(mu, lv, _random_mask(M, B, device), eps_J, eps, _upstream(M, B, D, device, torch.float32))


@needs_kernels
@pytest.mark.parametrize("M", [2, 3])
def test_every_mask_pattern(device, M):
    """One sample per observed/missing pattern: all observed, single observed, all missing (joint = prior)."""
    patterns = list(itertools.product([False, True], repeat=M))
    B, D = len(patterns), 5
    mask = torch.tensor(patterns, device=device).T.contiguous()  # (M, B)
    mu, lv, eps_J, eps = _inputs(M, B, D, device)
    out, grads = _compare(mu, lv, mask, eps_J, eps, _upstream(M, B, D, device, torch.float32))
    missing = ~mask.any(0)
    assert missing.sum() == 1
    assert torch.equal(out[0][missing], torch.zeros_like(out[0][missing]))  # mu_J
    assert torch.equal(out[1][missing], torch.zeros_like(out[1][missing]))  # lv_J
    assert torch.equal(out[4][missing], torch.zeros_like(out[4][missing]))  # KL_0 of the prior to itself
    assert torch.equal(out[5][~mask], torch.zeros_like(out[5][~mask]))


@needs_kernels
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_float_mask_equals_bool_mask(device, mask_kind):
    M, B, D = 3, 7, 9
    mu, lv, eps_J, eps = _inputs(M, B, D, device)
    mask = _random_mask(M, B, device)
    m = mask if mask_kind == "bool" else mask.float()
    a = latent_step(mu, lv, m, eps_J, eps)
    b = reference.latent_step(mu, lv, mask, eps_J, eps)
    for name, x, y in zip(NAMES, a, b):
        _assert_close(x, y, TOL[torch.float32]["out"], name)


@needs_kernels
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # z_m of a NaN placeholder
@pytest.mark.parametrize("placeholder", [(float("nan"), float("nan")), (float("inf"), float("inf")),
                                         (-float("inf"), -float("inf")), (float("nan"), float("inf"))])
@needs_kernels
def test_placeholders_in_masked_entries(device, placeholder):
    """NaN/inf in missing modalities reach no output but their own z_m, and no gradient."""
    M, B, D = 3, 7, 33
    mu, lv, eps_J, eps = _inputs(M, B, D, device)
    mask = _random_mask(M, B, device)
    mask[:, 0] = False  # one sample with nothing observed
    mask[1, 1], mask[0, 1], mask[2, 1] = True, False, False  # one with a single modality
    upstream = _upstream(M, B, D, device, torch.float32)
    upstream[3] = torch.where(mask[..., None], upstream[3], 0.0)  # the loss never uses z_m of a missing m
    dirty_mu = torch.where(mask[..., None], mu, placeholder[0])
    dirty_lv = torch.where(mask[..., None], lv, placeholder[1])
    out, grads = _run(latent_step, dirty_mu, dirty_lv, mask, eps_J, eps, upstream)
    ref_out, ref_grads = _run(reference.latent_step, mu, lv, mask, eps_J, eps, upstream)
    for name, a, e in zip(NAMES, out, ref_out):
        if name == "z":  # z_m of a missing modality is computed from its placeholder, like the reference
            a, e = a[mask], e[mask]
        assert torch.isfinite(a).all(), name
        _assert_close(a, e, TOL[torch.float32]["out"], name)
    for name, a, e in zip(("d mu", "d lv"), grads, ref_grads):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a[~mask], torch.zeros_like(a[~mask])), f"{name} of masked entries is not exactly 0"
        _assert_close(a, e, TOL[torch.float32]["grad"], name)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(device, dtype):
    M, B, D = 3, 7, 33
    mu, lv, eps_J, eps = _inputs(M, B, D, device, dtype)
    _compare(mu, lv, _random_mask(M, B, device), eps_J, eps, _upstream(M, B, D, device, dtype), dtype)


@needs_kernels
@pytest.mark.parametrize("draw", [False, True])
def test_gradcheck_float64(device, draw):
    M, B, D = 3, 3, 4
    mu, lv, eps_J, eps = _inputs(M, B, D, device, torch.float64)
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=torch.bool, device=device)  # last: none observed
    seed = torch.tensor([1234], dtype=torch.int64, device=device) if draw else None
    if draw:
        eps_J = eps = None
    mu.requires_grad_()
    lv.requires_grad_()
    op = torch.ops.crmvae_fast.latent_step
    # fast mode (random projections of the Jacobian): the interpreter makes every call slow
    assert torch.autograd.gradcheck(lambda a, b: op(a, b, mask, eps_J, eps, seed), (mu, lv), fast_mode=True)


@needs_kernels
def test_drawn_noise_is_standard_normal(device):
    from scipy import stats

    M, B, D = 2, 64, 200
    mu = torch.zeros(M, B, D, device=device)
    lv = torch.zeros(M, B, D, device=device)
    torch.manual_seed(0)
    out = latent_step(mu, lv)
    eps_J = (out.z_J - out.mu_J) / torch.exp(0.5 * out.lv_J)
    for name, e in [("eps_J", eps_J), ("eps_1", out.z[0]), ("eps_2", out.z[1])]:
        e = e.double().flatten().cpu()
        assert abs(e.mean().item()) < 0.02, name  # 12 800 draws: std of the mean 0.009
        assert abs(e.var().item() - 1.0) < 0.04, name
        assert stats.kstest(e.numpy(), "norm").pvalue > 1e-3, name
    # the streams of z_J and of each z_m are distinct
    assert abs(torch.corrcoef(torch.stack([eps_J.flatten(), out.z[0].flatten(), out.z[1].flatten()]))
               .fill_diagonal_(0).abs().max().item()) < 0.05


@needs_kernels
def test_drawn_noise_seeding(device):
    M, B, D = 3, 5, 17
    mu, lv, _, _ = _inputs(M, B, D, device)
    torch.manual_seed(7)
    a = latent_step(mu, lv)
    b = latent_step(mu, lv)
    assert not torch.equal(a.z_J, b.z_J) and not torch.equal(a.z, b.z), "two calls drew the same noise"
    torch.manual_seed(7)
    c = latent_step(mu, lv)
    for name, x, y in zip(NAMES, a, c):
        assert torch.equal(x, y), f"{name} differs after torch.manual_seed"
    torch.manual_seed(7)
    d = latent_step(list(mu.unbind(0)), list(lv.unbind(0)))
    for name, x, y in zip(NAMES, a, d):
        assert torch.equal(x, y), f"{name}: list input differs from stacked input"


@needs_kernels
def test_drawn_noise_gradients_match_reference(device):
    """The backward regenerates the forward's noise from the seed: its gradients equal the reference's given
    the noise recovered from the forward's samples."""
    M, B, D = 3, 6, 20
    mu, lv, _, _ = _inputs(M, B, D, device)
    mask = _random_mask(M, B, device)
    upstream = _upstream(M, B, D, device, torch.float32)
    torch.manual_seed(3)
    out, grads = _run(lambda a, b, m, e1, e2: latent_step(a, b, m), mu, lv, mask, None, None, upstream)
    eps_J = (out[2] - out[0]) / torch.exp(0.5 * out[1])
    eps = (out[3] - mu) / torch.exp(0.5 * lv)
    ref_out, ref_grads = _run(reference.latent_step, mu, lv, mask, eps_J, eps, upstream)
    for name, a, e in zip(NAMES, out, ref_out):
        _assert_close(a, e, (1e-4, 1e-4), name)
    for name, a, e in zip(("d mu", "d lv"), grads, ref_grads):
        _assert_close(a, e, (1e-4, 1e-4), name)


@needs_kernels
@pytest.mark.parametrize("variant", ["explicit-noise", "drawn-noise", "no-mask"])
def test_opcheck(device, variant):
    # With drawn noise the op is still a pure function of its inputs (the seed is an input), so every opcheck
    # sub-test applies, nondeterminism included.
    M, B, D = 3, 4, 6
    mu, lv, eps_J, eps = _inputs(M, B, D, device)
    mask = None if variant == "no-mask" else _random_mask(M, B, device)
    seed = None
    if variant == "drawn-noise":
        eps_J = eps = None
        seed = torch.tensor([99], dtype=torch.int64, device=device)
    mu.requires_grad_()
    lv.requires_grad_()
    torch.library.opcheck(torch.ops.crmvae_fast.latent_step.default, (mu, lv, mask, eps_J, eps, seed))
    ups = [u.detach() for u in _upstream(M, B, D, device, torch.float32)]
    torch.library.opcheck(torch.ops.crmvae_fast.latent_step_backward.default,
                          (mu.detach(), lv.detach(), mask, eps_J, eps, seed, *ups))


@needs_kernels
def test_expanded_upstream_gradients(device):
    """``out.sum().backward()`` hands the backward stride-0 gradients: the kernel reads them through strides."""
    M, B, D = 2, 3, 5
    mu, lv, eps_J, eps = _inputs(M, B, D, device)
    mask = _random_mask(M, B, device)
    grads = []
    for fn in (latent_step, reference.latent_step):
        a = mu.clone().requires_grad_()
        b = lv.clone().requires_grad_()
        out = fn(a, b, mask, eps_J, eps)
        sum(o.sum() for o in out).backward()
        grads.append((a.grad, b.grad))
    for x, y in zip(*grads):
        _assert_close(x, y, TOL[torch.float32]["grad"], "grad")


class _Counter:
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@needs_kernels
@pytest.mark.parametrize("draw", [False, True])
def test_launch_count(device, monkeypatch, draw):
    fwd = _Counter(ls_mod._latent_step_fwd_kernel)
    bwd = _Counter(ls_mod._latent_step_bwd_kernel)
    monkeypatch.setattr(ls_mod, "_latent_step_fwd_kernel", fwd)
    monkeypatch.setattr(ls_mod, "_latent_step_bwd_kernel", bwd)
    M, B, D = 3, 4, 300  # several D chunks still take one launch
    mu, lv, eps_J, eps = _inputs(M, B, D, device)
    mu.requires_grad_()
    lv.requires_grad_()
    out = latent_step(mu, lv, _random_mask(M, B, device), *((None, None) if draw else (eps_J, eps)))
    assert (fwd.launches, bwd.launches) == (1, 0)
    ups = _upstream(M, B, D, device, torch.float32)
    torch.autograd.grad(out, [mu, lv], ups)
    assert (fwd.launches, bwd.launches) == (1, 1)


@needs_kernels
def test_compile_fullgraph(device):
    """No graph break and no data-dependent branch: the op is opaque to dynamo, noise drawn from a seed tensor."""
    M, B, D = 2, 3, 4
    mu, lv, eps_J, eps = _inputs(M, B, D, device)
    mask = _random_mask(M, B, device)

    def step(mu, lv, mask):
        out = latent_step(mu, lv, mask)
        return out.kl_prior.sum() + out.kl_experts.sum() + out.z.square().sum() + out.z_J.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = mu.clone().requires_grad_()
    loss = compiled(a, lv, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()
    torch.manual_seed(5)
    x = compiled(mu, lv, mask)
    torch.manual_seed(5)
    y = step(mu, lv, mask)
    torch.testing.assert_close(x, y)


def test_fallback_when_triton_cannot_run(device, monkeypatch):
    monkeypatch.setattr(_backend, "triton_runs_on", lambda dev: False)
    M, B, D = 2, 3, 4
    mu, lv, eps_J, eps = _inputs(M, B, D, device)
    mask = _random_mask(M, B, device)
    for x, y in zip(latent_step(mu, lv, mask, eps_J, eps), reference.latent_step(mu, lv, mask, eps_J, eps)):
        assert torch.equal(x, y)
    out = latent_step(mu, lv, mask)
    assert out.z.shape == (M, B, D) and out.kl_experts.shape == (M, B)


def test_bad_input(device):
    M, B, D = 2, 3, 4
    mu, lv, eps_J, eps = _inputs(M, B, D, device)
    with pytest.raises(ValueError, match="same \\(M, B, D\\) shape"):
        latent_step(mu, lv[:, :2])
    with pytest.raises(ValueError, match="mask of shape"):
        latent_step(mu, lv, torch.ones(M, B + 1, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="both eps_J and eps"):
        latent_step(mu, lv, None, eps_J, None)
    with pytest.raises(ValueError, match="eps_J of shape"):
        latent_step(mu, lv, None, eps_J[:1], eps)
    with pytest.raises(TypeError, match="one floating dtype"):
        latent_step(mu, lv.double())
    with pytest.raises(ValueError, match="same \\(B, D\\) shape"):
        latent_step([mu[0], mu[1, :2]], [lv[0], lv[1]])
