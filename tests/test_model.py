"""CRMVAE's own behaviour, on both paths: MultiVae's checks of its CRMVAE, SPEC section 2 (placeholders,
zero gradients, empty samples, bad input) and the joint NLL of a model whose answer is known in closed form."""

import math

import pytest
import torch
from torch import nn

import crmvae_fast as cf
from crmvae_fast.nn import ModelOutput

FAST = [pytest.param(False, id="eager"), pytest.param(True, id="fused")]
DIMS = {"img": (1, 3, 4), "vec": (5,), "txt": (4,)}


def make_model(fast, dims=DIMS, **kw):
    torch.manual_seed(0)
    cfg = cf.CRMVAEConfig(n_modalities=len(dims), latent_dim=3, input_dims=dims, **kw)
    return cf.CRMVAE(cfg, fast_kernels=fast)


def make_inputs(B=4, dims=DIMS, masks=None):
    g = torch.Generator().manual_seed(1)
    out = {"data": {m: torch.rand((B, *d), generator=g) for m, d in dims.items()}}
    if masks is not None:
        out["masks"] = masks
    return out


@pytest.mark.parametrize("fast", FAST)
def test_loss_is_a_scalar_with_grad(fast):
    model = make_model(fast)
    out = model(make_inputs())
    assert out.loss.dim() == 0 and out.loss.requires_grad
    assert out["loss"] is out.loss and out.loss_sum is out.loss
    assert set(out.metrics) == {"joint_divergence", *(f"kl_{m}" for m in DIMS),
                                *(f"recon_{m}_from_{s}" for m in DIMS for s in ("joint", m))}
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("fast", FAST)
def test_encode_shapes(fast):
    model = make_model(fast)
    inputs = make_inputs(B=5)
    assert model.encode(inputs).z.shape == (5, 3)
    assert model.encode(inputs, cond_mod="vec", N=4).z.shape == (4, 5, 3)
    assert model.encode(inputs, cond_mod=["vec", "txt"], N=4, flatten=True).z.shape == (20, 3)
    mean = model.encode(inputs, return_mean=True).z
    torch.testing.assert_close(model.encode(inputs, return_mean=True, N=2).z, torch.stack([mean, mean]))
    assert model.encode(inputs).one_latent_space is True


@pytest.mark.parametrize("fast", FAST)
def test_predict_returns_every_requested_modality(fast):
    model = make_model(fast)
    inputs = make_inputs(B=5)
    out = model.predict(inputs, cond_mod="img", gen_mod="all")
    assert set(out) == set(DIMS) and out["img"].shape == (5, 1, 3, 4)
    out = model.predict(inputs, cond_mod=["vec"], gen_mod=["txt", "img"], N=3)
    assert set(out) == {"txt", "img"} and out.txt.shape == (3, 5, 4)
    assert model.predict(inputs, gen_mod="vec", N=3, flatten=True).vec.shape == (15, 5)


@pytest.mark.parametrize("fast", FAST)
def test_missing_modality_gets_zero_gradients(fast):
    model = make_model(fast)
    B = 4
    masks = {"img": torch.ones(B, dtype=torch.bool), "vec": torch.zeros(B, dtype=torch.bool),
             "txt": torch.tensor([True, False, True, True])}
    model(make_inputs(B, masks=masks)).loss.backward()
    for name, p in model.encoders["vec"].named_parameters():
        assert p.grad is not None, name
        assert torch.equal(p.grad, torch.zeros_like(p.grad)), name
    for name, p in model.decoders["vec"].named_parameters():
        assert torch.equal(p.grad, torch.zeros_like(p.grad)), name
    assert model.encoders["txt"].embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("placeholder", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_placeholders_never_reach_loss_metrics_or_gradients(fast, placeholder):
    model = make_model(fast)
    B = 5
    masks = {"img": torch.tensor([1, 1, 0, 1, 0.0]), "vec": torch.tensor([1, 0, 1, 1, 0.0]),
             "txt": torch.tensor([0, 1, 1, 1, 1.0])}
    clean = make_inputs(B, masks=masks)
    dirty = make_inputs(B, masks=masks)
    for m, w in masks.items():
        dirty["data"][m][w == 0] = placeholder
    results = []
    for inputs in (clean, dirty):
        model.zero_grad()
        torch.manual_seed(4)
        out = model(inputs)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in model.parameters()]))
    (o1, g1), (o2, g2) = results
    assert torch.isfinite(o2.loss)
    torch.testing.assert_close(o2.loss, o1.loss, rtol=0, atol=0)
    for k in o1.metrics:
        torch.testing.assert_close(o2.metrics[k], o1.metrics[k], rtol=0, atol=0)
    for a, b in zip(g1, g2):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("fast", FAST)
def test_save_then_load_gives_the_same_outputs(fast, tmp_path):
    model = make_model(fast, decoders_dist={"img": "bernoulli", "vec": "laplace", "txt": "normal"},
                       decoder_dist_params={"vec": {"scale": 0.4}})
    inputs = make_inputs()
    model.save(str(tmp_path))
    back = cf.CRMVAE.load_from_folder(str(tmp_path), fast_kernels=fast)
    for a, b in zip(model.state_dict().values(), back.state_dict().values()):
        torch.testing.assert_close(a, b)
    torch.manual_seed(2)
    o1 = model(inputs)
    torch.manual_seed(2)
    o2 = back(inputs)
    torch.testing.assert_close(o2.loss, o1.loss)
    torch.manual_seed(3)
    z1 = model.encode(inputs, return_mean=True).z
    torch.manual_seed(3)
    torch.testing.assert_close(back.encode(inputs, return_mean=True).z, z1)


def test_empty_sample_with_cpu_masks_is_a_clear_error():
    model = make_model(False)
    masks = {m: torch.tensor([True, False, True, True]) for m in DIMS}
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\] have no observed modality"):
        model(make_inputs(masks=masks))
    with pytest.raises(ValueError, match="no observed modality"):
        model.compute_joint_nll(make_inputs(masks=masks), K=3)


def test_empty_sample_reference_result_is_finite_prior():
    """Where the check cannot run without a sync (masks on the GPU), the joint is the prior N(0, I)."""
    mu = torch.randn(2, 3, 4)
    lv = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    mu_J, lv_J = cf.reference.poe(mu, lv, mask)
    assert torch.equal(mu_J[1], torch.zeros(4)) and torch.equal(lv_J[1], torch.zeros(4))
    assert cf.reference.kl_prior(mu_J, lv_J)[1] == 0


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda i: i["data"].update(bogus=torch.zeros(4, 2)), r"unknown modality name\(s\) \['bogus'\]"),
        (lambda i: i["data"].pop("vec"), r"lacks modality\(ies\) \['vec'\]"),
        (lambda i: i["data"].update(vec=torch.zeros(3, 5)), "same batch size"),
        (lambda i: i.update(masks={"img": torch.ones(4, dtype=torch.bool)}), "lacks modality 'vec'"),
        (lambda i: i.update(masks={m: torch.ones(4, 1, dtype=torch.bool) for m in DIMS}), r"shape \(4,\)"),
        (lambda i: i.update(masks={m: torch.ones(4, dtype=torch.complex64) for m in DIMS}), "bool, float or integer"),
        (lambda i: i["data"].update(vec=torch.zeros(4, 5, device="meta")), "one device"),
        (lambda i: i.update(data=[1, 2]), "expected inputs with a 'data' dict"),
    ],
)
def test_bad_input_is_a_clear_error(mutate, match):
    model = make_model(False)
    inputs = make_inputs()
    mutate(inputs)
    with pytest.raises(ValueError, match=match):
        model(inputs)


def test_bad_arguments_are_clear_errors():
    model = make_model(False)
    with pytest.raises(ValueError, match="K must be an int >= 1"):
        model.compute_joint_nll(make_inputs(), K=0)
    with pytest.raises(ValueError, match="cond_mod"):
        model.encode(make_inputs(), cond_mod="nope")
    with pytest.raises(ValueError, match="uses_likelihood_rescaling"):
        cf.CRMVAE(cf.CRMVAEConfig(n_modalities=1, uses_likelihood_rescaling=True),
                  encoders={"a": nn.Linear(1, 1)}, decoders={"a": nn.Linear(1, 1)})
    with pytest.raises(ValueError, match="must be one of"):
        cf.CRMVAEConfig(n_modalities=1, decoders_dist={"a": "poisson"})


# --------------------------------------------------------------------------------- closed-form joint NLL
class ExactExpert(nn.Module):
    """The Gaussian expert of a linear-Gaussian modality x = A z + b + N(0, s^2), A diagonal (D -> D).

    Its precision is A^2 / s^2 + prior_share, so a product of experts whose prior shares sum to one is the
    exact posterior, and every importance weight equals p(X): the estimate is exact for any K.
    """

    def __init__(self, a, b, s, prior_share):
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.s = s
        self.prec = a**2 / s**2 + prior_share

    def forward(self, x):
        mean = self.a * (x - self.b) / self.s**2 / self.prec
        return {"embedding": mean, "log_covariance": (-torch.log(self.prec)).expand_as(mean)}


class LinearDecoder(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("b", b)

    def forward(self, z):
        return ModelOutput(reconstruction=z * self.a + self.b)


def linear_gaussian_model(fast, D=3, M=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = [f"x{i}" for i in range(M)]
    A = {n: 0.5 + torch.rand(D, generator=g) for n in names}
    b = {n: torch.randn(D, generator=g) for n in names}
    s = {n: 0.6 + 0.2 * i for i, n in enumerate(names)}
    # the first modality is always observed and carries the whole prior: every observed subset is exact
    encoders = {n: ExactExpert(A[n], b[n], s[n], 1.0 if i == 0 else 0.0) for i, n in enumerate(names)}
    decoders = {n: LinearDecoder(A[n], b[n]) for n in names}
    cfg = cf.CRMVAEConfig(n_modalities=M, latent_dim=D, decoder_dist_params={n: {"scale": s[n]} for n in names})
    return cf.CRMVAE(cfg, encoders, decoders, fast_kernels=fast), A, b, s


def exact_nll(data, masks, A, b, s):
    """-sum_i log p(X_i observed) with x_m = A_m z + b_m + noise, z ~ N(0, I), in float64."""
    total = 0.0
    n = next(iter(data.values())).shape[0]
    for i in range(n):
        obs = [m for m in data if masks is None or masks[m][i]]
        Amat = torch.cat([torch.diag(A[m].double()) for m in obs])
        mean = torch.cat([b[m].double() for m in obs])
        noise = torch.cat([torch.full((A[m].numel(),), s[m] ** 2, dtype=torch.float64) for m in obs])
        cov = Amat @ Amat.T + torch.diag(noise)
        x = torch.cat([data[m][i].double() for m in obs])
        total -= torch.distributions.MultivariateNormal(mean, cov).log_prob(x).item()
    return total


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("incomplete", [False, True])
def test_joint_nll_closed_form(fast, incomplete):
    model, A, b, s = linear_gaussian_model(fast)
    g = torch.Generator().manual_seed(3)
    n = 5
    data = {m: A[m] * torch.randn(n, 3, generator=g) + b[m] + s[m] * torch.randn(n, 3, generator=g) for m in A}
    masks = None
    if incomplete:
        masks = {"x0": torch.ones(n, dtype=torch.bool), "x1": torch.tensor([1, 0, 1, 0, 1]).bool(),
                 "x2": torch.tensor([0, 0, 1, 1, 1]).bool()}
    inputs = {"data": data} if masks is None else {"data": data, "masks": masks}
    nll = model.compute_joint_nll(inputs, K=37, batch_size_K=10)
    assert nll.dim() == 0
    assert nll.item() == pytest.approx(exact_nll(data, masks, A, b, s), rel=1e-5, abs=1e-4)


def test_joint_nll_batched_equals_per_point_on_the_same_samples():
    """The fast path (blocks of points, chunks of samples, running log-sum-exp) is the per-point algorithm
    on the same draws, and its answer does not depend on batch_size_K or the block size."""
    model = make_model(True, decoders_dist={"img": "bernoulli", "vec": "laplace", "txt": "normal"})
    masks = {"img": torch.tensor([1, 1, 0, 1, 1]).bool(), "vec": torch.tensor([1, 0, 1, 1, 1]).bool(),
             "txt": torch.tensor([0, 1, 1, 1, 1]).bool()}
    inputs = make_inputs(B=5, masks=masks)
    K = 23
    data, masks = cf.inputs.read_inputs(inputs, model.modalities_name)
    mu, lv = model._encode_experts(data, model.modalities_name)
    mu_J, lv_J = cf.reference.poe(mu, lv, cf.inputs.stack_masks(masks, model.modalities_name))
    torch.manual_seed(9)
    eps = torch.randn(K, 5, 3)
    torch.manual_seed(9)
    per_point = model._joint_ll_per_point(data, masks, mu_J, lv_J, K, batch_size_K=6)
    noise = lambda k0, k1, i0, i1: eps[k0:k1, i0:i1]  # noqa: E731
    for bk, rows in [(6, 1 << 16), (K, 7), (1, 3), (100, 1)]:
        batched = model._joint_ll_batched(data, masks, mu_J, lv_J, K, bk, noise=noise, max_rows=rows)
        torch.testing.assert_close(batched, per_point, rtol=1e-5, atol=1e-4)
    assert math.isfinite(model.compute_joint_nll(inputs, K=K).item())


class RowSpy(nn.Module):
    """Wraps a decoder and records the most latent rows it was asked to decode at once."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.most = 0

    def forward(self, z):
        self.most = max(self.most, z.reshape(-1, z.shape[-1]).shape[0])
        return self.inner(z)


@pytest.mark.parametrize("max_rows,batch_size_K", [(50, 10), (7, 10), (1000, 4)])
def test_joint_nll_never_decodes_more_than_its_row_budget(monkeypatch, max_rows, batch_size_K):
    from crmvae_fast import model as model_module

    model = make_model(True)
    model.decoders = nn.ModuleDict({m: RowSpy(d) for m, d in model.decoders.items()})
    monkeypatch.setattr(model_module, "NLL_MAX_ROWS_CPU", max_rows)
    monkeypatch.setattr(model_module, "NLL_MAX_ROWS", max_rows)
    K = 30
    model.compute_joint_nll(make_inputs(B=7), K=K, batch_size_K=batch_size_K)
    # at most max_rows, unless one point's chunk of batch_size_K samples is already larger
    bound = max(max_rows - max_rows % min(batch_size_K, K), min(batch_size_K, K))
    for m, spy in model.decoders.items():
        assert 0 < spy.most <= bound, (m, spy.most, bound)
