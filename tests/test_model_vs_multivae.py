"""The eager CRMVAE (``fast_kernels=False``) against MultiVae 1.0.3's CRMVAE with the same weights.

Both draw their noise with the same calls in the same order, so after the same ``torch.manual_seed`` they see
the same samples: loss, metrics and every parameter gradient must agree to float32 rounding.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import crmvae_fast as cf

multivae = pytest.importorskip("multivae", reason="MultiVae 1.0.3 is the outside witness (pip install multivae==1.0.3)")
from multivae.data.datasets.base import IncompleteDataset, MultimodalBaseDataset  # noqa: E402
from multivae.models import CRMVAE as MVCRMVAE  # noqa: E402
from multivae.models import CRMVAEConfig as MVConfig  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)

SHAPES = [(5,), (2, 3), (7,), (4,), (3, 2)]
DISTS = ["normal", "laplace", "bernoulli", "categorical", "normal"]


def make_pair(M, dists=None, params=None, rescale=False, latent_dim=4, seed=0):
    names = [f"m{i}" for i in range(M)]
    dims = {n: SHAPES[i] for i, n in enumerate(names)}
    kw = dict(n_modalities=M, latent_dim=latent_dim, input_dims=dims, uses_likelihood_rescaling=rescale,
              decoders_dist=dists, decoder_dist_params=params, beta=1.7)
    torch.manual_seed(seed)
    mv = MVCRMVAE(MVConfig(**copy.deepcopy(kw)))
    ours = cf.CRMVAE(cf.CRMVAEConfig(**copy.deepcopy(kw)), fast_kernels=False)
    ours.load_state_dict(mv.state_dict())
    return mv, ours, names, dims


def make_data(names, dims, dists, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    data = {}
    for n in names:
        d = (dists or {}).get(n, "normal")
        shape = (B, *dims[n])
        if d == "bernoulli":
            data[n] = torch.randint(0, 2, shape, generator=g).float()
        elif d == "categorical":
            data[n] = nn.functional.one_hot(torch.randint(0, shape[-1], shape[:-1], generator=g), shape[-1]).float()
        else:
            data[n] = torch.randn(shape, generator=g)
    return data


def make_masks(names, B, seed=2):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(len(names), B, generator=g) > 0.35
    w[0, ~w.any(0)] = True  # every sample keeps at least one modality
    return {n: w[i] for i, n in enumerate(names)}


def run(model, inputs, seed=3):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(inputs)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return out, grads


def assert_same(o1, g1, o2, g2, rtol=2e-5, atol=2e-5):
    torch.testing.assert_close(o2.loss, o1.loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(o2.loss_sum, o1.loss_sum, rtol=rtol, atol=atol)
    assert list(o2.metrics) == list(o1.metrics)
    for k in o1.metrics:
        torch.testing.assert_close(o2.metrics[k], o1.metrics[k].to(o2.metrics[k].dtype), rtol=rtol, atol=atol, msg=k)
    assert set(g1) == set(g2)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-5, msg=k)


CASES = [
    # M, decoder distributions, their params, likelihood rescaling
    (1, None, None, False),
    (2, {"m0": "normal", "m1": "laplace"}, {"m1": {"scale": 0.5}}, False),
    (2, {"m0": "bernoulli", "m1": "normal"}, {"m1": {"scale": 0.75}}, True),
    (3, {"m0": "normal", "m1": "laplace", "m2": "bernoulli"}, None, True),
    (4, {"m0": "normal", "m1": "laplace", "m2": "bernoulli", "m3": "categorical"}, {"m0": {"scale": 2.0}}, False),
    (5, dict(zip([f"m{i}" for i in range(5)], DISTS)), {"m1": {"scale": 0.3}}, True),
]


@pytest.mark.parametrize("M,dists,params,rescale", CASES)
def test_complete_data_matches_multivae(M, dists, params, rescale):
    mv, ours, names, dims = make_pair(M, dists, params, rescale)
    data = make_data(names, dims, dists, B=6)
    o1, g1 = run(mv, MultimodalBaseDataset(data))
    o2, g2 = run(ours, MultimodalBaseDataset(data))
    assert_same(o1, g1, o2, g2)
    # the same through a plain dict
    o3, g3 = run(ours, {"data": data})
    assert_same(o1, g1, o3, g3)


@pytest.mark.parametrize("M,dists,params,rescale", CASES[1:])
def test_incomplete_data_matches_multivae(M, dists, params, rescale):
    mv, ours, names, dims = make_pair(M, dists, params, rescale)
    data = make_data(names, dims, dists, B=9)
    masks = make_masks(names, 9)
    o1, g1 = run(mv, IncompleteDataset(data, masks))
    o2, g2 = run(ours, IncompleteDataset(data, masks))
    assert_same(o1, g1, o2, g2)
    float_masks = {n: w.float() for n, w in masks.items()}
    o3, g3 = run(ours, {"data": data, "masks": float_masks})
    assert_same(o1, g1, o3, g3)


def test_custom_pythae_architectures_and_rescale_factors():
    from multivae.models.nn.default_architectures import Decoder_AE_MLP, Encoder_VAE_MLP
    from multivae.models.base import BaseAEConfig

    dims = {"x": (6,), "y": (3,)}
    encs = {m: Encoder_VAE_MLP(BaseAEConfig(input_dim=d, latent_dim=3)) for m, d in dims.items()}
    decs = {m: Decoder_AE_MLP(BaseAEConfig(input_dim=d, latent_dim=3)) for m, d in dims.items()}
    kw = dict(n_modalities=2, latent_dim=3, uses_likelihood_rescaling=True, rescale_factors={"x": 0.5, "y": 3.0})
    mv = MVCRMVAE(MVConfig(**kw), encoders=copy.deepcopy(encs), decoders=copy.deepcopy(decs))
    ours = cf.CRMVAE(cf.CRMVAEConfig(**kw), encoders=copy.deepcopy(encs), decoders=copy.deepcopy(decs),
                     fast_kernels=False)
    ours.load_state_dict(mv.state_dict())
    assert ours.model_config.custom_architectures == ["encoders", "decoders"]
    data = {"x": torch.randn(4, 6), "y": torch.randn(4, 3)}
    masks = {"x": torch.tensor([True, False, True, True]), "y": torch.tensor([True, True, False, True])}
    o1, g1 = run(mv, IncompleteDataset(data, masks))
    o2, g2 = run(ours, IncompleteDataset(data, masks))
    assert_same(o1, g1, o2, g2)


def test_batches_items_and_trainer_kwargs():
    mv, ours, names, dims = make_pair(2)
    data = make_data(names, dims, None, B=5)
    masks = make_masks(names, 5)
    ds = IncompleteDataset(data, masks)
    # an unbatched item (dataset[i]) and a batch (dataset[list]) are accepted like MultiVae's
    item = ds[2]
    torch.manual_seed(0)
    o_item = ours(item, epoch=3, dataset_size=5)
    torch.manual_seed(0)
    o_mv = mv(IncompleteDataset({n: data[n][2:3] for n in names}, {n: masks[n][2:3] for n in names}))
    torch.testing.assert_close(o_item.loss, o_mv.loss)
    batch = ds[[0, 3, 4]]
    torch.manual_seed(0)
    assert torch.isfinite(ours(batch).loss)


def test_state_dict_and_folders_move_both_ways(tmp_path):
    mv, ours, names, dims = make_pair(3, {"m0": "normal", "m1": "laplace", "m2": "bernoulli"}, {"m1": {"scale": 0.5}})
    assert list(mv.state_dict()) == list(ours.state_dict())
    data = make_data(names, dims, {"m2": "bernoulli"}, B=4)
    ours.save(tmp_path / "ours")
    back = MVCRMVAE.load_from_folder(str(tmp_path / "ours"))
    o1, _ = run(back, MultimodalBaseDataset(data))
    o2, _ = run(ours, MultimodalBaseDataset(data))
    torch.testing.assert_close(o2.loss, o1.loss)
    mv.save(str(tmp_path / "mv"))
    ours2 = cf.CRMVAE.load_from_folder(str(tmp_path / "mv"), fast_kernels=False)
    assert ours2.model_config.decoder_dist_params == {"m1": {"scale": 0.5}}
    o3, _ = run(ours2, MultimodalBaseDataset(data))
    torch.testing.assert_close(o3.loss, o1.loss)


def test_folders_with_custom_architectures(tmp_path):
    from multivae.models.nn.default_architectures import Decoder_AE_MLP, Encoder_VAE_MLP
    from multivae.models.base import BaseAEConfig

    dims = {"x": (6,), "y": (3,)}
    encs = {m: Encoder_VAE_MLP(BaseAEConfig(input_dim=d, latent_dim=3)) for m, d in dims.items()}
    decs = {m: Decoder_AE_MLP(BaseAEConfig(input_dim=d, latent_dim=3)) for m, d in dims.items()}
    ours = cf.CRMVAE(cf.CRMVAEConfig(n_modalities=2, latent_dim=3), encoders=encs, decoders=decs, fast_kernels=False)
    ours.save(str(tmp_path / "m"))
    back = MVCRMVAE.load_from_folder(str(tmp_path / "m"))
    again = cf.CRMVAE.load_from_folder(str(tmp_path / "m"), fast_kernels=False)
    data = {"x": torch.randn(3, 6), "y": torch.randn(3, 3)}
    torch.testing.assert_close(run(back, MultimodalBaseDataset(data))[0].loss, run(ours, {"data": data})[0].loss)
    torch.testing.assert_close(run(again, {"data": data})[0].loss, run(ours, {"data": data})[0].loss)


def test_encode_predict_generate_match_multivae():
    mv, ours, names, dims = make_pair(3)
    data = make_data(names, dims, None, B=4)
    ds = MultimodalBaseDataset(data)
    for kw in [dict(), dict(cond_mod="m1"), dict(cond_mod=["m0", "m2"], N=3), dict(N=2, flatten=True),
               dict(return_mean=True), dict(return_mean=True, N=2)]:
        torch.manual_seed(5)
        z1 = mv.encode(ds, **kw).z
        torch.manual_seed(5)
        z2 = ours.encode(ds, **kw).z
        torch.testing.assert_close(z2, z1, rtol=2e-5, atol=2e-6)
    torch.manual_seed(6)
    p1 = mv.predict(ds, cond_mod=["m0"], gen_mod="all", N=2)
    torch.manual_seed(6)
    p2 = ours.predict(ds, cond_mod=["m0"], gen_mod="all", N=2)
    assert set(p2) == set(names)
    for n in names:
        torch.testing.assert_close(p2[n], p1[n], rtol=2e-5, atol=2e-6)
    torch.manual_seed(7)
    g1 = mv.generate_from_prior(5).z
    torch.manual_seed(7)
    g2 = ours.generate_from_prior(5).z
    torch.testing.assert_close(g2, g1)
    assert ours.generate_from_prior(1).z.shape == (ours.latent_dim,)


def test_joint_nll_eager_matches_multivae():
    mv, ours, names, dims = make_pair(3, {"m0": "normal", "m1": "laplace", "m2": "bernoulli"})
    data = make_data(names, dims, {"m2": "bernoulli"}, B=3)
    ds = MultimodalBaseDataset(data)
    torch.manual_seed(11)
    n1 = mv.compute_joint_nll(ds, K=50, batch_size_K=16)
    torch.manual_seed(11)
    n2 = ours.compute_joint_nll(ds, K=50, batch_size_K=16)
    assert n2.dim() == 0
    torch.testing.assert_close(n2, n1.to(n2.dtype), rtol=1e-5, atol=1e-4)


def test_joint_nll_batched_matches_multivae_on_the_same_samples():
    """The fast path (blocks of points, the extension's running log-sum-exp) against MultiVae's per-point
    loop: both see the same (K, n, D) draws, MultiVae's through the seed, ours through the noise hook."""
    mv, ours, names, dims = make_pair(3, {"m0": "normal", "m1": "laplace", "m2": "bernoulli"})
    ours.fast_kernels = True
    data = make_data(names, dims, {"m2": "bernoulli"}, B=4)
    K, D = 60, ours.latent_dim
    torch.manual_seed(12)
    expected = mv.compute_joint_nll(MultimodalBaseDataset(data), K=K, batch_size_K=25)
    torch.manual_seed(12)
    eps = torch.empty(K, 4, D).normal_()  # MultiVae's single draw, in its (K, n, D) layout
    d, masks = cf.inputs.read_inputs({"data": data}, ours.modalities_name)
    mu, lv = ours._encode_experts(d, ours.modalities_name)
    mu_J, lv_J = cf.reference.poe(mu, lv)
    noise = lambda k0, k1, i0, i1: eps[k0:k1, i0:i1]  # noqa: E731
    for bk, rows in [(25, 1 << 16), (7, 5)]:
        got = -ours._joint_ll_batched(d, masks, mu_J, lv_J, K, bk, noise=noise, max_rows=rows).sum()
        torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-5, atol=1e-4)


def fused_with_multivae_noise(ours):
    """The fused model (fused latent step, one decoder call on [z_J; z_m], fused likelihood) drawing its noise
    with MultiVae's calls in MultiVae's order, so it sees MultiVae's samples."""
    ours.fast_kernels = True
    ours._latent_step = lambda mu, lv, mask: cf.ops.latent_step(mu, lv, mask, *cf.reference.draw_noise(mu))
    return ours


@pytest.mark.parametrize("concat", [True, False], ids=["concat", "split"])
@pytest.mark.parametrize("M,dists,params,rescale", CASES[1:])
def test_fused_model_matches_multivae_on_the_same_noise(M, dists, params, rescale, concat):
    mv, ours, names, dims = make_pair(M, dists, params, rescale)
    fused_with_multivae_noise(ours).concat_decoding = concat
    data = make_data(names, dims, dists, B=7)
    masks = make_masks(names, 7)
    for inputs in (MultimodalBaseDataset(data), IncompleteDataset(data, masks)):
        o1, g1 = run(mv, inputs)
        o2, g2 = run(ours, inputs)
        assert_same(o1, g1, o2, g2)


def test_fused_model_keeps_custom_distributions_eager():
    """A callable decoder distribution (which MultiVae's config refuses) runs the eager way inside the fused
    model, beside a fused one: the fused model equals the eager one on the same noise."""
    def student(recon, target):
        return torch.distributions.StudentT(3.0, recon, 1.0).log_prob(target)

    dims = {"m0": (5,), "m1": (2, 3)}
    kw = dict(n_modalities=2, latent_dim=3, input_dims=dims, uses_likelihood_rescaling=True,
              decoders_dist={"m0": student, "m1": "bernoulli"})
    torch.manual_seed(0)
    eager = cf.CRMVAE(cf.CRMVAEConfig(**kw), fast_kernels=False)
    ours = fused_with_multivae_noise(cf.CRMVAE(cf.CRMVAEConfig(**kw), fast_kernels=True))
    ours.load_state_dict(eager.state_dict())
    data = make_data(["m0", "m1"], dims, {"m1": "bernoulli"}, B=5)
    inputs = IncompleteDataset(data, make_masks(["m0", "m1"], 5))
    o1, g1 = run(eager, inputs)
    o2, g2 = run(ours, inputs)
    assert_same(o1, g1, o2, g2)


def test_batch_norm_decoders_opt_out_of_concatenated_decoding():
    from multivae.models.base import BaseAEConfig
    from multivae.models.nn.default_architectures import Encoder_VAE_MLP
    from pythae.models.base.base_utils import ModelOutput as PythaeOutput
    from pythae.models.nn import BaseDecoder

    names, dims = ["x", "y"], {"x": (4,), "y": (3,)}
    encs = {m: Encoder_VAE_MLP(BaseAEConfig(input_dim=d, latent_dim=2)) for m, d in dims.items()}

    class BNDecoder(BaseDecoder):
        def __init__(self, d):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Linear(8, d))

        def forward(self, z):
            return PythaeOutput(reconstruction=self.net(z))

    decs = {m: BNDecoder(d[0]) for m, d in dims.items()}
    kw = dict(n_modalities=2, latent_dim=2)
    mv = MVCRMVAE(MVConfig(**kw), encoders=copy.deepcopy(encs), decoders=copy.deepcopy(decs))
    ours = cf.CRMVAE(cf.CRMVAEConfig(**kw), encoders=copy.deepcopy(encs), decoders=copy.deepcopy(decs))
    assert ours.concat_decoding is False  # a BatchNorm in a decoder turns the concatenation off
    ours.load_state_dict(mv.state_dict())
    fused_with_multivae_noise(ours)
    data = make_data(names, dims, None, B=6)
    o1, g1 = run(mv, MultimodalBaseDataset(data))
    o2, g2 = run(ours, MultimodalBaseDataset(data))
    assert_same(o1, g1, o2, g2)
    # with the concatenation forced on, the batch statistics of [z_J; z_m] differ: the loss moves
    ours.concat_decoding = True
    o3, _ = run(ours, MultimodalBaseDataset(data))
    assert not torch.allclose(o3.loss, o1.loss, rtol=1e-4, atol=1e-4)


def test_fused_joint_nll_matches_multivae_incomplete_free():
    """``compute_joint_nll`` through the fused likelihood (inner = k layout) on MultiVae's samples, all four
    distributions."""
    dists = {"m0": "normal", "m1": "laplace", "m2": "bernoulli", "m3": "categorical"}
    mv, ours, names, dims = make_pair(4, dists, {"m1": {"scale": 0.5}})
    ours.fast_kernels = True
    data = make_data(names, dims, dists, B=3)
    K, D = 30, ours.latent_dim
    torch.manual_seed(13)
    expected = mv.compute_joint_nll(MultimodalBaseDataset(data), K=K, batch_size_K=10)
    torch.manual_seed(13)
    eps = torch.empty(K, 3, D).normal_()
    d, masks = cf.inputs.read_inputs({"data": data}, ours.modalities_name)
    mu, lv = ours._encode_experts(d, ours.modalities_name)
    mu_J, lv_J = cf.reference.poe(mu, lv)
    got = -ours._joint_ll_batched(d, masks, mu_J, lv_J, K, 10, noise=lambda k0, k1, i0, i1: eps[k0:k1, i0:i1]).sum()
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-5, atol=1e-4)
