"""Every public entry checks its input before any work (issue 16, the part on inputs, outputs and memory).

Each finding of the issue has a test here that failed before the fix (said in its docstring); the hypothesis
fuzz at the end calls every public entry with malformed arguments and accepts only ``ValueError``/``TypeError``
with a message. The configuration's own checks are in ``tests/test_config.py``.
"""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import crmvae_fast as cf
from crmvae_fast import _backend

FAST = [pytest.param(False, id="eager"), pytest.param(True, id="fused")]
DIMS = {"a": (4,), "b": (2, 3)}
NAMES = list(DIMS)
B, D = 3, 2

needs_kernels = pytest.mark.skipif(
    not _backend.triton_runs_on(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    reason="the fused path needs a GPU or TRITON_INTERPRET=1 set before import (tests/conftest.py sets it)",
)


def make_model(fast, dims=DIMS, **kw):
    torch.manual_seed(0)
    return cf.CRMVAE(cf.CRMVAEConfig(n_modalities=len(dims), latent_dim=D, input_dims=dims, **kw), fast_kernels=fast)


def make_data(n=B, dims=DIMS, seed=1):
    """0/1 data: exact in every dtype, so a cast changes no number."""
    g = torch.Generator().manual_seed(seed)
    return {m: torch.rand((n, *d), generator=g).round() for m, d in dims.items()}


def seeded(fn, seed=5):
    torch.manual_seed(seed)
    return fn()


# ------------------------------------------------------------------------------------- 1. data dtypes
@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool, torch.float64, torch.float16])
def test_data_of_another_dtype_is_cast_to_the_encoders_dtype(fast, dtype):
    """Before: a uint8, int64, float64 or float16 modality failed deep in a matmul naming no modality. Now it is
    cast to the encoder's float dtype, on both paths, in every method, with the float32 numbers."""
    model = make_model(fast)
    data = make_data()
    other = {"data": {"a": data["a"].to(dtype), "b": data["b"]}}
    same = {"data": data}
    torch.testing.assert_close(seeded(lambda: model(other).loss), seeded(lambda: model(same).loss))
    torch.testing.assert_close(seeded(lambda: model.encode(other).z), seeded(lambda: model.encode(same).z))
    torch.testing.assert_close(seeded(lambda: model.predict(other, "a")["b"]),
                               seeded(lambda: model.predict(same, "a")["b"]))
    torch.testing.assert_close(seeded(lambda: model.compute_joint_nll(other, K=3)),
                               seeded(lambda: model.compute_joint_nll(same, K=3)))
    torch.testing.assert_close(seeded(lambda: model.compute_cond_nll(other, ["b"], ["a"], K=3)["a"]),
                               seeded(lambda: model.compute_cond_nll(same, ["b"], ["a"], K=3)["a"]))


@pytest.mark.parametrize("fast", FAST)
def test_complex_data_is_refused_naming_the_modality(fast):
    model = make_model(fast)
    data = make_data()
    data["b"] = data["b"].to(torch.complex64)
    for call in (lambda: model({"data": data}), lambda: model.encode({"data": data}),
                 lambda: model.compute_joint_nll({"data": data}, K=2)):
        with pytest.raises(TypeError, match=r"inputs.data\['b'\] is torch.complex64, expected real data"):
            call()


@pytest.mark.parametrize("fast", FAST)
def test_float64_data_under_autocast_still_runs_in_low_precision(fast):
    model = make_model(fast)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model({"data": {m: x.double() for m, x in make_data().items()}})
    assert torch.isfinite(out.loss)
    out.loss.backward()


class TokenEncoder(nn.Module):
    """An encoder that takes token ids (an nn.Embedding): its data must reach it as given."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 2 * D)
        self.seen = None

    def forward(self, x):
        self.seen = x.dtype
        h = self.emb(x).mean(1)
        return {"embedding": h[:, :D], "log_covariance": h[:, D:]}


def test_an_embedding_encoder_gets_its_integer_data_as_given():
    enc = {"a": TokenEncoder(), "b": cf.nn.EncoderMLP((2, 3), D)}
    dec = {"a": cf.nn.DecoderMLP((4,), D), "b": cf.nn.DecoderMLP((2, 3), D)}
    model = cf.CRMVAE(cf.CRMVAEConfig(n_modalities=2, latent_dim=D), enc, dec, fast_kernels=False)
    data = make_data()
    data["a"] = data["a"].long()
    assert torch.isfinite(model({"data": data}).loss) and enc["a"].seen == torch.int64


@pytest.mark.parametrize("fast", FAST)
def test_data_on_another_device_than_the_model_is_refused(fast):
    model = make_model(fast)
    with pytest.raises(ValueError, match="the inputs are on meta but the model's parameters on cpu"):
        model({"data": {m: x.to("meta") for m, x in make_data().items()}})


# ------------------------------------------------------------------------------------------- 5. latents
@pytest.mark.parametrize("fast", FAST)
def test_decode_checks_the_latent_first(fast):
    """Before: a latent of the wrong width gave a matmul shape error."""
    model = make_model(fast)
    with pytest.raises(ValueError, match=r"embedding.z must have latent_dim = 2 as its last dim, got shape \(3, 5\)"):
        model.decode({"z": torch.zeros(3, 5)})
    with pytest.raises(TypeError, match="embedding.z must be a floating tensor of latents, got torch.int64"):
        model.decode({"z": torch.zeros(3, D, dtype=torch.long)})
    with pytest.raises(TypeError, match="decode takes the output of encode or generate_from_prior"):
        model.decode(torch.zeros(3, D))
    with pytest.raises(TypeError, match="modalities must be"):
        model.decode({"z": torch.zeros(3, D)}, modalities=3)
    with pytest.raises(ValueError, match="embedding.z is on meta but the decoders' parameters on cpu"):
        model.decode({"z": torch.zeros(3, D, device="meta")})
    z = torch.randn(3, D)
    torch.testing.assert_close(model.decode({"z": z.double()})["a"], model.decode({"z": z})["a"])
    assert model.decode(model.generate_from_prior(1))["b"].shape == (2, 3)  # one latent, MultiVae's (D,) shape


# --------------------------------------------------------------------------------- 6. generate_from_prior
def test_generate_from_prior_takes_a_count():
    """Before: generate_from_prior(0) and (-3) returned one sample."""
    model = make_model(False)
    for bad in (0, -3, np.int64(0)):
        with pytest.raises(ValueError, match="n_samples must be an int >= 1"):
            model.generate_from_prior(bad)
    for bad in (2.0, "2", True, None):
        with pytest.raises(TypeError, match="n_samples must be an int >= 1"):
            model.generate_from_prior(bad)
    assert model.generate_from_prior(np.int64(4)).z.shape == (4, D)


# ------------------------------------------------------------------------- 7. soft masks under compile
@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_soft_mask_is_refused_under_torch_compile(fast, backend):
    """Before: a mask of 0.5 was silently taken as observed on the no-sync path (masks on a GPU, or under
    torch.compile). Now it is checked on the device, without a host sync: fullgraph compiles, and it raises."""
    model = make_model(fast)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    good = {"a": torch.tensor([1.0, 0.0, 1.0]), "b": torch.ones(B)}
    assert torch.isfinite(compiled({"data": make_data(), "masks": good}).loss)
    with pytest.raises(RuntimeError, match=r"inputs.masks\['a'\] must hold only 0 and 1"):
        compiled({"data": make_data(), "masks": {**good, "a": torch.tensor([1.0, 0.5, 1.0])}})


# --------------------------------------------------------------------------------- 8. numpy integer counts
@pytest.mark.parametrize("fast", FAST)
def test_numpy_integers_are_counts_everywhere(fast):
    """Before: compute_cond_nll, evaluate_joint_nll and evaluate_cond_nll refused numpy integers."""
    model = make_model(fast)
    inputs = {"data": make_data()}
    want = seeded(lambda: model.compute_cond_nll(inputs, ["a"], ["b"], K=3, batch_size_K=2)["b"])
    got = seeded(lambda: model.compute_cond_nll(inputs, ["a"], ["b"], K=np.int64(3), batch_size_K=np.int32(2))["b"])
    torch.testing.assert_close(got, want)
    want = seeded(lambda: cf.evaluate_joint_nll(model, inputs, K=3, batch_size_K=2, batch_size=2, progress=False))
    got = seeded(lambda: cf.evaluate_joint_nll(model, inputs, K=np.int64(3), batch_size_K=np.int16(2),
                                               batch_size=np.uint8(2), progress=False))
    assert got == want
    want = seeded(lambda: cf.evaluate_cond_nll(model, inputs, "a", "b", K=3, batch_size_K=2, batch_size=2,
                                               progress=False))
    got = seeded(lambda: cf.evaluate_cond_nll(model, inputs, "a", "b", K=np.int64(3), batch_size_K=np.int64(2),
                                              batch_size=np.int64(2), progress=False))
    assert got == want
    with pytest.raises(TypeError, match="K must be an int >= 1"):
        cf.evaluate_joint_nll(model, inputs, K=3.0)
    with pytest.raises(ValueError, match=r"K \(alias k_iwae\) must be an int >= 1, got 0"):
        model.compute_cond_nll(inputs, ["a"], ["b"], k_iwae=np.int64(0))


# ------------------------------------------------------------------------------ 9. input gradients
def _use_noise(model, eps_J, eps):
    step = cf.ops.latent_step if model.fast_kernels else cf.reference.latent_step
    model._latent_step = lambda mu, lv, mask: step(mu, lv, mask, eps_J, eps)


@needs_kernels
@pytest.mark.parametrize("incomplete", [False, True], ids=["complete", "incomplete"])
def test_fused_path_gives_data_the_gradient_of_the_eager_path(incomplete):
    """Before: data that requires grad was refused on the fused path ('target requires grad'), where the eager
    path and MultiVae give the gradient. Now both give the same ``x.grad``, every distribution."""
    dists = {"a": "normal", "b": "laplace", "c": "bernoulli", "d": "categorical"}
    dims = {"a": (4,), "b": (2, 3), "c": (5,), "d": (2, 3)}
    g = torch.Generator().manual_seed(3)
    eps_J, eps = torch.randn(B, D, generator=g), torch.randn(4, B, D, generator=g)
    grads = []
    for fast in (False, True):
        model = make_model(fast, dims, decoders_dist=dists, decoder_dist_params={"b": {"scale": 0.7}})
        _use_noise(model, eps_J, eps)
        data = {m: x.clone().requires_grad_() for m, x in make_data(dims=dims).items()}
        inputs = {"data": data}
        if incomplete:
            inputs["masks"] = {m: torch.tensor([True, m != "c", True]) for m in dims}
        model(inputs).loss.backward()
        grads.append({m: x.grad for m, x in data.items()})
    for m in dims:
        assert grads[1][m] is not None and torch.isfinite(grads[1][m]).all(), m
        torch.testing.assert_close(grads[1][m], grads[0][m], rtol=1e-4, atol=1e-5, msg=m)
    if incomplete:
        assert not grads[1]["c"][1].any()  # a missing entry gets no gradient


# -------------------------------------------------------------------------------------- 12. memory
def _largest_draw(monkeypatch, fn):
    """The most standard normal values drawn at once by ``fn`` (every draw goes through Tensor.normal_)."""
    most = [0]
    normal_ = torch.Tensor.normal_

    def spy(self, *args, **kwargs):
        most[0] = max(most[0], self.numel())
        return normal_(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "normal_", spy)
    fn()
    monkeypatch.setattr(torch.Tensor, "normal_", normal_)
    return most[0]


@pytest.mark.parametrize("fast", FAST)
def test_joint_nll_draws_do_not_grow_with_the_number_of_points(fast, monkeypatch):
    """Before: the eager compute_joint_nll drew all K x n samples at once (the peak grew ~96 MB from n = 64 to
    512 at K = 200, latent 128). Now both paths draw (and decode) at most their row budget of latents at once,
    whatever n: the largest draw is the same for n = 64 and n = 512."""
    from crmvae_fast import model as model_module

    monkeypatch.setattr(model_module, "NLL_MAX_ROWS_CPU", 64)
    model = make_model(fast)
    sizes = [_largest_draw(monkeypatch, lambda: model.compute_joint_nll({"data": make_data(n)}, K=20))
             for n in (64, 512)]
    assert sizes[0] == sizes[1] <= 64 * D, sizes


def test_eager_joint_nll_in_slices_is_multivaes_draw_for_draw(monkeypatch):
    """The eager path draws MultiVae's (K, n, D) standard normals in slices of a few rows (here 4 latents, so
    slices end mid-point and mid-sample) and still gives MultiVae's number on the same seed."""
    mv_models = pytest.importorskip("multivae.models", reason="MultiVae 1.0.3 is the outside witness")
    from multivae.data.datasets.base import MultimodalBaseDataset

    from crmvae_fast import model as model_module

    kw = dict(n_modalities=2, latent_dim=3, input_dims=DIMS, decoders_dist={"a": "laplace", "b": "bernoulli"})
    torch.manual_seed(0)
    mv = mv_models.CRMVAE(mv_models.CRMVAEConfig(**kw))
    ours = cf.CRMVAE(cf.CRMVAEConfig(**kw), fast_kernels=False)
    ours.load_state_dict(mv.state_dict())
    data = make_data(5)
    want = seeded(lambda: mv.compute_joint_nll(MultimodalBaseDataset(data), K=13, batch_size_K=4), 21)
    for rows in (1, 4, 50):
        monkeypatch.setattr(model_module, "NLL_MAX_ROWS_CPU", rows)
        got = seeded(lambda: ours.compute_joint_nll({"data": data}, K=13, batch_size_K=4), 21)
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("total,rows", [(15, 16), (33, 16), (1000, 48), (4099, 256)])
def test_cpu_generator_slices_give_the_numbers_of_one_draw(dtype, total, rows):
    """What the eager NLL relies on: on the CPU, consecutive draws of whole blocks of 16 values, the last at least
    16 values (or the whole draw), give the numbers of one draw of them all."""
    whole = seeded(lambda: torch.empty(total, dtype=dtype).normal_())
    bounds = list(range(0, total, rows)) + [total]
    if len(bounds) > 2 and total - bounds[-2] < 16:
        del bounds[-2]
    torch.manual_seed(5)
    parts = [torch.empty(b - a, dtype=dtype).normal_() for a, b in zip(bounds[:-1], bounds[1:])]
    assert torch.equal(torch.cat(parts), whole)


# ------------------------------------------------------------------------------------------- 13. outputs
@pytest.mark.parametrize("fast", FAST)
def test_outputs_are_pythae_model_outputs(fast):
    """Before: forward, encode, decode, predict returned crmvae_fast.nn.ModelOutput, so MultiVae's
    ``isinstance(out, ModelOutput)`` checks failed (24 of the 138 tests of its CRMVAE test file)."""
    base = pytest.importorskip("multivae.models.base", reason="MultiVae 1.0.3 is the outside witness")
    model = make_model(fast)
    inputs = {"data": make_data()}
    outs = {"forward": model(inputs), "encode": model.encode(inputs), "decode": model.decode(model.encode(inputs)),
            "predict": model.predict(inputs, "a"), "generate_from_prior": model.generate_from_prior(2)}
    for name, out in outs.items():
        assert isinstance(out, base.ModelOutput), name
    out = outs["forward"]
    assert out.loss is out["loss"] is out[0] and out.to_tuple()[2] is out.metrics
    out.extra = 1
    assert out["extra"] == 1
    with pytest.raises(AttributeError):
        out.nothing


@needs_kernels
def test_compiled_forward_returns_a_pythae_output_with_attributes():
    base = pytest.importorskip("multivae.models.base", reason="MultiVae 1.0.3 is the outside witness")
    model = make_model(True)
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")({"data": make_data()})
    assert isinstance(out, base.ModelOutput) and torch.isfinite(out.loss) and "joint_divergence" in out.metrics


def test_importing_the_package_does_not_import_pythae():
    """pythae's import takes seconds: it happens on the first output, never at ``import crmvae_fast``."""
    code = "import sys, crmvae_fast, crmvae_fast.model; print('pythae' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_without_pythae_outputs_are_our_own_class(monkeypatch):
    from crmvae_fast import nn as cf_nn

    monkeypatch.setattr(cf_nn, "_OUTPUT_TYPE", None)
    monkeypatch.setitem(sys.modules, "pythae.models.base.base_utils", None)  # import fails as if not installed
    assert cf_nn.output_type() is cf_nn.ModelOutput
    out = cf_nn.make_output(z=torch.zeros(1))
    assert out.z is out["z"] is out[0]
    monkeypatch.setattr(cf_nn, "_OUTPUT_TYPE", None)


# ------------------------------------------------------------------------------------------- 11. the fuzz
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([math.nan, -1.5, 0.5, 2.0, 1e30, math.inf]),
    st.text(max_size=3), st.sampled_from(["all", "a", "b", "sum", "normal", "cpu"]),
    st.lists(st.sampled_from(["a", "b", "c", 1]), max_size=2), st.just({"data": 1}), st.just(object()),
    st.sampled_from([(1, 2), np.int64(0), np.float64(2.0), np.ones(2)]),
    st.builds(lambda shape, dtype, dev: torch.zeros(shape, dtype=dtype, device=dev),
              st.lists(st.integers(0, 3), max_size=3).map(tuple),
              st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool, torch.complex64, torch.float16]),
              st.sampled_from(["cpu", "cpu", "meta"])),
)


def _model_entries(model):
    inputs = {"data": make_data()}
    z = {"z": torch.zeros(B, D)}
    return {
        "forward": (model.forward, dict(inputs=inputs, beta=1.0)),
        "encode": (model.encode, dict(inputs=inputs, cond_mod="all", N=2)),
        "decode": (model.decode, dict(embedding=z, modalities="all")),
        "predict": (model.predict, dict(inputs=inputs, cond_mod="a", gen_mod="b", N=2)),
        "generate_from_prior": (model.generate_from_prior, dict(n_samples=2)),
        "compute_joint_nll": (model.compute_joint_nll, dict(inputs=inputs, K=2, batch_size_K=2)),
        "compute_cond_nll": (model.compute_cond_nll, dict(inputs=inputs, cond_mod=["a"], gen_mod=["b"], K=2,
                                                          batch_size_K=2, reduction="mean")),
        "evaluate_joint_nll": (lambda **kw: cf.evaluate_joint_nll(progress=False, **kw),
                               dict(model=model, dataset=inputs, K=2, batch_size_K=2, batch_size=2)),
        "evaluate_cond_nll": (lambda **kw: cf.evaluate_cond_nll(progress=False, **kw),
                              dict(model=model, dataset=inputs, cond_mod="a", gen_mod="b", K=2, batch_size_K=2,
                                   batch_size=2)),
    }


def _op_entries():
    M = 2
    mu, lv = torch.zeros(M, B, D), torch.zeros(M, B, D)
    state = cf.ops.iw_lse_init(B)
    return {
        "latent_step": (cf.ops.latent_step, dict(mu=mu, lv=lv, mask=torch.ones(M, B, dtype=torch.bool),
                                                 eps_J=torch.zeros(B, D), eps=torch.zeros(M, B, D))),
        "poe": (cf.ops.poe, dict(mu=mu, lv=lv, mask=None, prior_expert=False, var_floor=1e-8,
                                 subsets=torch.ones(1, M, dtype=torch.bool))),
        "likelihood": (cf.ops.likelihood, dict(recon=torch.zeros(2 * B, 4), target=torch.zeros(B, 4), dist="normal",
                                               mask=torch.ones(B, dtype=torch.bool), scale=1.0, rescale=1.0,
                                               inner=1)),
        "iw_lse_init": (cf.ops.iw_lse_init, dict(n=B, device="cpu", dtype=torch.float32)),
        "iw_lse_update": (cf.ops.iw_lse_update, dict(log_px=torch.zeros(B, 2), z=torch.zeros(B, 2, D),
                                                     mu_J=torch.zeros(B, D), lv_J=torch.zeros(B, D),
                                                     run_max=state[0], run_sum=state[1])),
        "iw_lse_finalize": (cf.ops.iw_lse_finalize, dict(run_max=state[0], run_sum=state[1], K=2)),
        "CRMVAEConfig": (cf.CRMVAEConfig, dict(n_modalities=2, latent_dim=D, input_dims=DIMS,
                                               uses_likelihood_rescaling=False, rescale_factors=None,
                                               decoders_dist=None, decoder_dist_params=None,
                                               custom_architectures=[], beta=1.0)),
    }


_MODELS = {}


def _entries(fast):
    if fast not in _MODELS:
        _MODELS[fast] = make_model(fast)
    return {**_model_entries(_MODELS[fast]), **_op_entries()}


@pytest.mark.parametrize("fast", FAST)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_every_public_entry_raises_only_value_or_type_errors(fast, data):
    """Each public entry called with one argument replaced by junk (wrong types, dtypes, shapes, devices,
    counts, names) either works or raises ValueError/TypeError with a message: never a RuntimeError,
    IndexError, KeyError or AttributeError from inside torch or Python."""
    entries = _entries(fast)
    name = data.draw(st.sampled_from(sorted(entries)), label="entry")
    fn, kwargs = entries[name]
    arg = data.draw(st.sampled_from(sorted(kwargs)), label="argument")
    kwargs = {**kwargs, arg: data.draw(JUNK, label="value")}
    try:
        fn(**kwargs)
    except (ValueError, TypeError) as e:
        assert str(e).strip(), f"{name}({arg}=...) raised {type(e).__name__} without a message"
