"""The whole MultiVae 1.0.3 workflow on our CRMVAE: its real trainer (complete and incomplete data, eval set,
checkpoint, resume), its evaluators, its sampler and its architectures, with only the import changed.

Where the numbers are deterministic (``fast_kernels=False`` draws its noise with MultiVae's calls in MultiVae's
order) they are compared with MultiVae's own CRMVAE on the same weights and seed; the fused path draws its
noise in the kernel, so there the comparison is against the same draws (noise hooks) or a closed form.
"""

import copy
import glob
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import crmvae_fast as cf

multivae = pytest.importorskip("multivae", reason="MultiVae 1.0.3 is the outside witness (pip install multivae==1.0.3)")
from multivae.data.datasets.base import IncompleteDataset, MultimodalBaseDataset  # noqa: E402
from multivae.models import CRMVAE as MVCRMVAE  # noqa: E402
from multivae.models import CRMVAEConfig as MVConfig  # noqa: E402
from multivae.models.base import BaseAEConfig  # noqa: E402
from multivae.models.nn.default_architectures import Decoder_AE_MLP, Encoder_VAE_MLP  # noqa: E402
from multivae.trainers import BaseTrainer, BaseTrainerConfig  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)

DIMS = {"img": (1, 4, 4), "vec": (5,)}
N_CLASSES = 3


def make_dataset(n, seed, incomplete=False):
    """Labelled toy data: each modality is a noisy function of the label, so classifiers and clusters mean
    something; with ``incomplete`` about a third of each modality is missing (never both)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, N_CLASSES, (n,), generator=g)
    img = (torch.rand(n, *DIMS["img"], generator=g) < 0.2 + 0.3 * labels[:, None, None, None]).float()
    vec = labels[:, None].float() + 0.3 * torch.randn(n, *DIMS["vec"], generator=g)
    data = {"img": img, "vec": vec}
    if not incomplete:
        return MultimodalBaseDataset(data, labels)
    w = torch.rand(2, n, generator=g) > 0.33
    w[0, ~w.any(0)] = True
    return IncompleteDataset(data, {"img": w[0], "vec": w[1]}, labels)


def model_kwargs():
    return dict(n_modalities=2, latent_dim=3, input_dims=DIMS, decoders_dist={"img": "bernoulli", "vec": "normal"},
                beta=1.5)


def multivae_architectures(latent_dim=3):
    """MultiVae's own MLP encoders and decoders (``multivae.models.nn``)."""
    encs = {m: Encoder_VAE_MLP(BaseAEConfig(input_dim=d, latent_dim=latent_dim)) for m, d in DIMS.items()}
    decs = {m: Decoder_AE_MLP(BaseAEConfig(input_dim=d, latent_dim=latent_dim)) for m, d in DIMS.items()}
    return encs, decs


def make_pair(seed=0, fast=False):
    """MultiVae's CRMVAE and ours with MultiVae's architectures and the same weights."""
    torch.manual_seed(seed)
    encs, decs = multivae_architectures()
    mv = MVCRMVAE(MVConfig(**model_kwargs()), encoders=copy.deepcopy(encs), decoders=copy.deepcopy(decs))
    ours = cf.CRMVAE(cf.CRMVAEConfig(**model_kwargs()), encoders=copy.deepcopy(encs), decoders=copy.deepcopy(decs),
                     fast_kernels=fast)
    ours.load_state_dict(mv.state_dict())
    return mv, ours


def trainer_config(out, epochs=2, **kw):
    return BaseTrainerConfig(output_dir=str(out), num_epochs=epochs, per_device_train_batch_size=8,
                             per_device_eval_batch_size=8, learning_rate=1e-2, steps_saving=1, seed=3, no_cuda=True,
                             **kw)


def assert_same_weights(a, b, rtol=1e-4, atol=1e-5):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=rtol, atol=atol, msg=k)


def only_dir(pattern):
    found = glob.glob(pattern)
    assert len(found) == 1, f"expected one match of {pattern}, got {found}"
    return found[0]


# ------------------------------------------------------------------------------------ the user's script
USER_SCRIPT = """
{import_line}
from multivae.models.base import BaseAEConfig
from multivae.models.nn.default_architectures import Decoder_AE_MLP, Encoder_VAE_MLP
from multivae.trainers import BaseTrainer, BaseTrainerConfig
from multivae.metrics import LikelihoodsEvaluator, LikelihoodsEvaluatorConfig

config = CRMVAEConfig(n_modalities=2, latent_dim=3, input_dims=dims, decoders_dist={{"img": "bernoulli", "vec": "normal"}})
encoders = {{m: Encoder_VAE_MLP(BaseAEConfig(input_dim=d, latent_dim=3)) for m, d in dims.items()}}
decoders = {{m: Decoder_AE_MLP(BaseAEConfig(input_dim=d, latent_dim=3)) for m, d in dims.items()}}
model = CRMVAE(config, encoders=encoders, decoders=decoders)
trainer = BaseTrainer(model, train_dataset=train, eval_dataset=test,
                      training_config=BaseTrainerConfig(output_dir=out, num_epochs=2, learning_rate=1e-2,
                                                        per_device_train_batch_size=8, steps_saving=1,
                                                        steps_predict=1, no_cuda=True))
trainer.train()
trained = CRMVAE.load_from_folder(trainer.training_dir + "/final_model")
nll = LikelihoodsEvaluator(trained, test, eval_config=LikelihoodsEvaluatorConfig(num_samples=50, batch_size_k=25)).eval()
"""


def run_user_script(import_line, out, train, test):
    scope = {"dims": DIMS, "train": train, "test": test, "out": str(out)}
    torch.manual_seed(0)
    exec(USER_SCRIPT.format(import_line=import_line), scope)  # noqa: S102 - the test is the script
    return scope


def test_a_multivae_user_script_runs_with_one_import_changed(tmp_path):
    train, test = make_dataset(16, 1, incomplete=True), make_dataset(8, 2)
    theirs = run_user_script("from multivae.models import CRMVAE, CRMVAEConfig", tmp_path / "mv", train, test)
    ours = run_user_script("from crmvae_fast import CRMVAE, CRMVAEConfig", tmp_path / "ours", train, test)
    assert isinstance(ours["model"], cf.CRMVAE) and ours["trained"].fast_kernels  # the default, kept by the folder
    for scope in (theirs, ours):
        final = os.path.join(scope["trainer"].training_dir, "final_model")
        assert {"model_config.json", "model.pt", "encoders.pkl", "decoders.pkl"} <= set(os.listdir(final))
        assert os.path.exists(os.path.join(scope["trainer"].training_dir, "recon_from_all.png"))
    # The fused path draws other noise, so the two trainings differ by their samples only: the same model,
    # data and optimizer must reach a comparable held-out likelihood.
    ll_mv, ll_ours = float(theirs["nll"].joint_likelihood), float(ours["nll"].joint_likelihood)
    assert math.isfinite(ll_ours)
    assert abs(ll_ours - ll_mv) < 0.1 * abs(ll_mv), (ll_ours, ll_mv)
    # our final folder loads in MultiVae, MultiVae's in ours
    final_ours = os.path.join(ours["trainer"].training_dir, "final_model")
    MVCRMVAE.load_from_folder(final_ours)
    assert cf.CRMVAE.load_from_folder(os.path.join(theirs["trainer"].training_dir, "final_model")).fast_kernels


# ------------------------------------------------------------------------- the trainer, number for number
@pytest.mark.parametrize("incomplete", [False, True], ids=["complete", "incomplete"])
def test_trainer_checkpoint_and_resume_match_multivae(tmp_path, incomplete):
    """SGD, not Adam: Adam divides by the gradient's running norm, so float32 rounding in a parameter whose
    gradient is ~0 moves it by a whole step (5e-4 apart after 2 epochs, the losses equal to 1e-7)."""
    train, test = make_dataset(20, 1, incomplete), make_dataset(8, 2, incomplete)
    results = {}
    for name, model in zip(("mv", "ours"), make_pair()):
        cfg = trainer_config(tmp_path / name, epochs=2, optimizer_cls="SGD")
        torch.manual_seed(5)
        tr = BaseTrainer(model, train, test, training_config=cfg)
        tr.train()
        ckpt = only_dir(os.path.join(tr.training_dir, "checkpoint_epoch_1"))
        info = json.load(open(os.path.join(ckpt, "info_checkpoint.json")))
        torch.manual_seed(6)
        resumed = BaseTrainer(model, train, test, training_config=cfg, checkpoint=ckpt)
        resumed.train()
        results[name] = (tr._best_model, tr.best_eval_loss, info, resumed.model, resumed.best_eval_loss)
    mv, ours = results["mv"], results["ours"]
    assert isinstance(ours[3], cf.CRMVAE) and ours[3].fast_kernels is False  # kept through the checkpoint
    assert_same_weights(mv[0], ours[0])
    assert ours[1] == pytest.approx(mv[1], rel=1e-5)
    assert ours[2]["best_eval_loss"] == pytest.approx(mv[2]["best_eval_loss"], rel=1e-5)
    assert_same_weights(mv[3], ours[3])
    assert ours[4] == pytest.approx(mv[4], rel=1e-5)


def test_trainer_runs_the_fused_path_with_a_scheduler_and_callbacks(tmp_path):
    from multivae.trainers.base.callbacks import TrainingCallback

    class Epochs(TrainingCallback):
        def __init__(self):
            self.logged = []

        def on_log(self, training_config, logs, **kwargs):
            self.logged.append(logs)

    cb = Epochs()
    _, ours = make_pair(fast=True)
    cfg = trainer_config(tmp_path, epochs=2, scheduler_cls="StepLR", scheduler_params={"step_size": 1, "gamma": 0.5})
    tr = BaseTrainer(ours, make_dataset(8, 1, True), make_dataset(8, 2), training_config=cfg, callbacks=[cb])
    tr.train()
    assert all({"eval_epoch_loss", "train_epoch_loss", "train_kl_img"} <= set(log) for log in cb.logged)
    assert all(math.isfinite(log["train_epoch_loss"]) for log in cb.logged) and len(cb.logged) == 2
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)
    assert str(ours.device) == "cpu"


# --------------------------------------------------------------------------- evaluators and the sampler
class TinyClassifier(nn.Module):
    """Stands in for MultiVae's pretrained PolyMNIST classifiers: a fixed linear map to class logits."""

    def __init__(self, dim, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(dim, N_CLASSES)

    def forward(self, x):
        return self.lin(x.reshape(x.shape[0], -1))


def run_evaluators(model, test, out, sampler=None):
    from multivae.metrics import (Clustering, ClusteringConfig, CoherenceEvaluator, CoherenceEvaluatorConfig,
                                  FIDEvaluator, FIDEvaluatorConfig, LikelihoodsEvaluator, LikelihoodsEvaluatorConfig,
                                  Reconstruction, ReconstructionConfig, Visualization, VisualizationConfig)

    clfs = {"img": TinyClassifier(16, 1), "vec": TinyClassifier(5, 2)}
    got = {}
    torch.manual_seed(10)
    np.random.seed(10)  # the Gaussian mixture sampler draws from numpy
    got["likelihoods"] = LikelihoodsEvaluator(
        model, test, eval_config=LikelihoodsEvaluatorConfig(batch_size=4, num_samples=30, batch_size_k=12)).eval()
    torch.manual_seed(11)
    np.random.seed(11)
    got["coherence"] = CoherenceEvaluator(
        model, clfs, test, eval_config=CoherenceEvaluatorConfig(batch_size=4, num_classes=N_CLASSES,
                                                                 nb_samples_for_joint=20), sampler=sampler).eval()
    torch.manual_seed(12)
    np.random.seed(12)
    got["reconstruction"] = Reconstruction(model, test, eval_config=ReconstructionConfig(batch_size=4,
                                                                                           metric="MSE")).eval()
    # FID with MultiVae's custom_encoders hook: tiny fixed networks instead of InceptionV3, whose weights would
    # have to be downloaded
    torch.manual_seed(14)
    np.random.seed(14)
    fid_nets = {"img": TinyClassifier(16, 3), "vec": TinyClassifier(5, 4)}
    got["fid"] = FIDEvaluator(model, test, eval_config=FIDEvaluatorConfig(batch_size=4), sampler=sampler,
                              custom_encoders=fid_nets).eval()
    np.random.seed(0)
    got["clustering"] = Clustering(model, test, test, eval_config=ClusteringConfig(
        batch_size=4, n_clusters=N_CLASSES, number_of_runs=2)).eval()
    torch.manual_seed(13)
    np.random.seed(13)
    vis = Visualization(model, test, output=str(out), eval_config=VisualizationConfig(n_samples=4, n_data_cond=2))
    got["images"] = [vis.unconditional_samples(), vis.conditional_samples_subset(["img"])]
    assert os.path.exists(os.path.join(str(out), "unconditional.png"))
    return got


def test_evaluators_match_multivae(tmp_path):
    mv, ours = make_pair(seed=1)
    test = make_dataset(8, 2)
    theirs = run_evaluators(mv, test, tmp_path / "mv")
    got = run_evaluators(ours, test, tmp_path / "ours")
    for name in ("likelihoods", "coherence", "reconstruction", "clustering", "fid"):
        assert list(got[name]) == list(theirs[name]), name
        for k in theirs[name]:
            torch.testing.assert_close(torch.as_tensor(got[name][k]).double(), torch.as_tensor(theirs[name][k]).double(),
                                       rtol=1e-5, atol=1e-5, msg=f"{name}: {k}")
    for a, b in zip(got["images"], theirs["images"]):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_evaluators_and_gaussian_mixture_sampler_on_the_fused_path(tmp_path):
    from multivae.samplers import GaussianMixtureSampler, GaussianMixtureSamplerConfig

    mv, ours = make_pair(seed=1, fast=True)
    train, test = make_dataset(16, 1), make_dataset(8, 2)
    samplers = {}
    for name, model in (("mv", mv), ("ours", ours)):
        torch.manual_seed(20)
        np.random.seed(20)
        s = GaussianMixtureSampler(model, GaussianMixtureSamplerConfig(n_components=2))
        s.fit(train)
        samplers[name] = s
        torch.manual_seed(21)
        np.random.seed(21)
        z = s.sample(5).z
        assert z.shape == (5, 3)
    # encode draws the same noise on both paths, so the mixtures are fitted to the same latents
    np.testing.assert_allclose(samplers["ours"].gmm.means_, samplers["mv"].gmm.means_, rtol=1e-4, atol=1e-5)
    got = run_evaluators(ours, test, tmp_path, sampler=samplers["ours"])
    theirs = run_evaluators(mv, test, tmp_path / "mv", sampler=samplers["mv"])
    # The batched joint NLL draws its samples in another order: the same estimate, other draws.
    assert got["likelihoods"].joint_likelihood == pytest.approx(float(theirs["likelihoods"].joint_likelihood), rel=0.05)
    for name in ("coherence", "reconstruction", "clustering", "fid"):
        for k in theirs[name]:
            torch.testing.assert_close(torch.as_tensor(got[name][k]).double(),
                                       torch.as_tensor(theirs[name][k]).double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["MAF", "IAF"])
def test_flow_samplers_fit_and_sample(tmp_path, kind):
    """MultiVae's normalizing-flow samplers train a pythae flow on our model's latents."""
    import multivae.samplers as samplers
    from pythae.trainers import BaseTrainerConfig as PythaeTrainerConfig

    _, ours = make_pair(fast=True)
    sampler_cls, config_cls = getattr(samplers, f"{kind}Sampler"), getattr(samplers, f"{kind}SamplerConfig")
    s = sampler_cls(ours, config_cls(n_made_blocks=1, hidden_size=8))
    s.fit(make_dataset(16, 1), training_config=PythaeTrainerConfig(num_epochs=1, output_dir=str(tmp_path),
                                                                   no_cuda=True))
    out = s.sample(3)
    assert out.z.shape == (3, 3) and out.one_latent_space and bool(torch.isfinite(out.z).all())
    assert ours.decode(out)["img"].shape == (3, *DIMS["img"])


# ------------------------------------------------------------------------------------ compute_cond_nll
def test_cond_nll_eager_matches_multivae_with_its_argument_names():
    mv, ours = make_pair(seed=2)
    ds = make_dataset(6, 3)
    torch.manual_seed(30)
    expected = mv.compute_cond_nll(ds, ["img"], ["vec", "img"], k_iwae=40)
    for call in (lambda: ours.compute_cond_nll(ds, ["img"], ["vec", "img"], 40),
                 lambda: ours.compute_cond_nll(ds, subset=["img"], pred_mods=["vec", "img"], k_iwae=40),
                 lambda: ours.compute_cond_nll(ds, cond_mod="img", gen_mod=["vec", "img"], K=40, batch_size_K=7)):
        torch.manual_seed(30)
        got = call()
        assert type(got) is dict and list(got) == ["vec", "img"]
        for m in expected:
            assert got[m].dim() == 0
            torch.testing.assert_close(got[m], expected[m], rtol=1e-5, atol=1e-5)


def test_cond_nll_batched_matches_multivae_on_the_same_samples():
    """The fused path (blocks of points, the importance-weight op's running log-sum-exp over a zero-width
    latent) against MultiVae's loop: both see the same K draws of (n, D), MultiVae's through the seed."""
    mv, ours = make_pair(seed=2, fast=True)
    ds = make_dataset(6, 3)
    K, n, D = 30, 6, 3
    torch.manual_seed(31)
    expected = mv.compute_cond_nll(ds, ["vec"], ["img", "vec"], k_iwae=K)
    torch.manual_seed(31)
    eps = torch.stack([torch.empty(n, D).normal_() for _ in range(K)])  # MultiVae's K draws, in order
    data, _ = cf.inputs.read_inputs(ds, ours.modalities_name)
    mu, lv = ours._encode_experts(data, ["vec"])
    mu_c, lv_c = cf.reference.poe(mu, lv)
    noise = lambda k0, k1, i0, i1: eps[k0:k1, i0:i1]  # noqa: E731
    for bk, rows in [(K, 1 << 16), (7, 10), (1, 3)]:
        ll = ours._cond_ll_batched(data, ["img", "vec"], mu_c, lv_c, K, bk, noise=noise, max_rows=rows)
        for j, m in enumerate(["img", "vec"]):
            torch.testing.assert_close(-ll[:, j].mean(), expected[m], rtol=1e-5, atol=1e-4)
    got = ours.compute_cond_nll(ds, ["vec"], ["img", "vec"], K=K)
    assert all(math.isfinite(float(v)) for v in got.values())


def test_importance_weight_op_on_a_zero_width_latent_is_a_plain_logsumexp():
    """What compute_cond_nll feeds the op: with D = 0 both Gaussian terms are empty sums, so the running
    log-sum-exp of log_px alone comes out, from the extension and from its eager twin alike."""
    from crmvae_fast import _extension, ops
    from crmvae_fast.kernels.iw_logsumexp import iw_lse_update_eager

    g = torch.Generator().manual_seed(7)
    log_px = torch.randn(5, 11, generator=g) * 30 - 100
    log_px[2] = -math.inf
    chunks = [log_px[:, :4], log_px[:, 4:5], log_px[:, 5:]]
    updates = [iw_lse_update_eager]
    if _extension.has_kernel("cpu"):
        updates.append(ops.iw_lse_update)
    for update in updates:
        state = ops.iw_lse_init(5)
        for c in chunks:
            state = update(c, torch.empty(5, c.shape[1], 0), torch.empty(5, 0), torch.empty(5, 0), *state)
        torch.testing.assert_close(ops.iw_lse_finalize(*state, 11), torch.logsumexp(log_px, 1) - math.log(11))


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fused"])
def test_cond_nll_closed_form_with_incomplete_data(fast):
    """A linear-Gaussian model whose experts multiply to the exact posterior: log p(x2 | observed x0, x1) is a
    Gaussian in closed form. Points missing x2, or missing every conditioning modality, are left out."""
    from test_model import linear_gaussian_model

    model, A, b, s = linear_gaussian_model(fast)
    g = torch.Generator().manual_seed(4)
    n = 6
    z = torch.randn(n, 3, generator=g)
    data = {m: A[m] * z + b[m] + s[m] * torch.randn(n, 3, generator=g) for m in A}
    masks = {"x0": torch.tensor([1, 1, 1, 1, 1, 0]).bool(), "x1": torch.tensor([1, 0, 1, 0, 1, 0]).bool(),
             "x2": torch.tensor([1, 1, 0, 1, 1, 1]).bool()}
    data["x2"][2] = float("nan")  # a placeholder never reaches the result
    torch.manual_seed(40)
    got = model.compute_cond_nll({"data": data, "masks": masks}, ["x0", "x1"], ["x2"], K=3000, batch_size_K=500)
    total, count = 0.0, 0
    for i in range(n):
        if not masks["x2"][i] or not (masks["x0"][i] or masks["x1"][i]):  # nothing to score or to condition on
            continue
        obs = [m for m in ("x0", "x1") if masks[m][i]]
        prec = 1.0 + sum(A[m].double() ** 2 / s[m] ** 2 for m in obs)
        mean = sum(A[m].double() * (data[m][i].double() - b[m]) / s[m] ** 2 for m in obs) / prec
        var = A["x2"].double() ** 2 / prec + s["x2"] ** 2
        dist = torch.distributions.Normal(A["x2"].double() * mean + b["x2"], var.sqrt())
        total -= dist.log_prob(data["x2"][i].double()).sum().item()
        count += 1
    # MC estimate of log E_q p(x2 | z) with K = 3000: the error is a few hundredths per point
    assert float(got["x2"]) == pytest.approx(total / count, abs=0.05)


def test_cond_nll_argument_errors():
    _, ours = make_pair()
    ds = make_dataset(4, 3)
    with pytest.raises(ValueError, match="not both"):
        ours.compute_cond_nll(ds, ["img"], ["vec"], K=3, k_iwae=3)
    with pytest.raises(ValueError, match="cond_mod"):
        ours.compute_cond_nll(ds, gen_mod=["vec"])
    with pytest.raises(ValueError, match="gen_mod must name"):
        ours.compute_cond_nll(ds, ["img"], ["txt"])
    with pytest.raises(ValueError, match="K .alias k_iwae. must be"):
        ours.compute_cond_nll(ds, ["img"], ["vec"], K=0)
    masks = {"img": torch.tensor([1, 1, 0, 0]).bool(), "vec": torch.tensor([0, 0, 1, 1]).bool()}
    with pytest.raises(ValueError, match="nothing to score"):
        ours.compute_cond_nll({"data": ds.data, "masks": masks}, ["img"], ["vec"], K=3)


# ---------------------------------------------------------------------------------- the model's surface
def test_device_is_settable_and_update_exists():
    _, ours = make_pair()
    ours.device = "cpu"  # what MultiVae's trainer, evaluators and samplers do
    ours.device = torch.device("cpu")
    assert ours.device == torch.device("cpu")
    with pytest.raises(ValueError, match="must name a torch device"):
        ours.device = "not-a-device"
    ours.update()
    empty = cf.CRMVAE(cf.CRMVAEConfig(n_modalities=1), encoders={"a": nn.Identity()}, decoders={"a": nn.Identity()})
    empty.device = "meta"
    assert empty.device == torch.device("meta")


def test_model_output_behaves_like_pythaes():
    from pythae.models.base.base_utils import ModelOutput as PythaeOutput

    _, ours = make_pair()
    out = ours(make_dataset(4, 3))
    ref = PythaeOutput(loss=out.loss, loss_sum=out.loss_sum, metrics=out.metrics)
    assert out[0] is out.loss and out[1] is out["loss_sum"] and out[-1] is out.metrics
    assert out.to_tuple() == ref.to_tuple() and out[0:2] == ref[0:2]
    assert hasattr(out, "loss_sum") and not hasattr(out, "nothing")
    with pytest.raises(KeyError):
        out["nothing"]
    enc = ours.encode(make_dataset(4, 3))
    enc.z = enc.z * 0  # the evaluators reassign fields by attribute
    assert torch.equal(enc["z"], enc[0]) and not enc.z.any()


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fused"])
def test_forward_honours_beta_and_use_mean_embedding(fast):
    _, ours = make_pair(fast=fast)
    ds = make_dataset(5, 3, incomplete=True)
    torch.manual_seed(50)
    base = ours(ds)
    torch.manual_seed(50)
    scaled = ours(ds, beta=torch.tensor(4.0), epoch=3)
    # the loss is recon / (2 (M + 1)) + beta * divergence / (M + 1): only the KL part moves with beta
    div = base.metrics["joint_divergence"] + base.metrics["kl_img"] + base.metrics["kl_vec"]
    torch.testing.assert_close(scaled.loss - base.loss, (4.0 - 1.5) * div * 5 / 3, rtol=1e-4, atol=1e-4)
    torch.manual_seed(50)
    mean1 = ours(ds, use_mean_embedding=True)
    torch.manual_seed(51)
    mean2 = ours(ds, use_mean_embedding=True)
    torch.testing.assert_close(mean1.loss, mean2.loss)  # no noise drawn
    # MultiVae's forward with its sampler returning the means is the witness
    mv, _ = make_pair()
    mv._rsample = lambda params, **kw: (params.embedding, params.log_covariance, params.embedding)
    expected = mv(ds)
    torch.testing.assert_close(mean1.loss, expected.loss, rtol=1e-5, atol=1e-4)
    for k in expected.metrics:
        torch.testing.assert_close(mean1.metrics[k], expected.metrics[k], rtol=1e-5, atol=1e-5, msg=k)


def test_fast_kernels_survives_save_and_load_and_the_folder_still_loads_in_multivae(tmp_path):
    for fast in (False, True):
        _, ours = make_pair(fast=fast)
        path = str(tmp_path / f"m{fast}")
        ours.save(path)
        assert json.load(open(os.path.join(path, "crmvae_fast.json")))["fast_kernels"] is fast
        assert cf.CRMVAE.load_from_folder(path).fast_kernels is fast
        assert cf.CRMVAE.load_from_folder(path, fast_kernels=not fast).fast_kernels is (not fast)
        assert ours.load_from_folder(path).fast_kernels is fast  # MultiVae's trainer calls it on an instance
        MVCRMVAE.load_from_folder(path)
    with open(os.path.join(path, "crmvae_fast.json"), "w") as fp:
        json.dump({"fast_kernels": "yes"}, fp)
    with pytest.raises(ValueError, match="boolean 'fast_kernels'"):
        cf.CRMVAE.load_from_folder(path)


def test_the_isinstance_workaround_of_the_readme(tmp_path):
    """MultiVae's trainer draws the cross-modal reconstructions only for ``isinstance(model, BaseMultiVAE)``;
    the README's one-line workaround (a subclass of both) makes it draw them for our model too."""
    from multivae.models import BaseMultiVAE

    _, ours = make_pair()
    cfg = trainer_config(tmp_path / "plain", epochs=1, steps_predict=1)
    tr = BaseTrainer(ours, make_dataset(8, 1), make_dataset(8, 2), training_config=cfg)
    tr.train()
    assert not os.path.exists(os.path.join(tr.training_dir, "recon_from_img.png"))

    class CRMVAE(cf.CRMVAE, BaseMultiVAE):  # the README's one line: MultiVae's checks pass, our methods win
        pass

    patched = CRMVAE.load_from_folder(os.path.join(tr.training_dir, "final_model"))
    assert isinstance(patched, BaseMultiVAE) and patched.fast_kernels is False
    tr2 = BaseTrainer(patched, make_dataset(8, 1), make_dataset(8, 2),
                      training_config=trainer_config(tmp_path / "patched", epochs=1, steps_predict=1))
    tr2.train()
    assert os.path.exists(os.path.join(tr2.training_dir, "recon_from_img.png"))
