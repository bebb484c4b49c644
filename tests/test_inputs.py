"""Bad input never gives a silent wrong answer (issue 9, SPEC section 2): every check of
``crmvae_fast.inputs.read_inputs`` and of the model's count arguments, on the eager and the fused path, and a
hypothesis fuzz of ``read_inputs`` with malformed inputs that must raise ``ValueError``/``TypeError`` and never
anything else.

Each finding of issue 9 has a test here that failed before the fix (noted in its docstring)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crmvae_fast as cf
from crmvae_fast.inputs import as_count, read_inputs

FAST = [pytest.param(False, id="eager"), pytest.param(True, id="fused")]
DIMS = {"a": (4,), "b": (2, 3)}
NAMES = list(DIMS)
B = 3


def make_model(fast, dims=DIMS):
    torch.manual_seed(0)
    return cf.CRMVAE(cf.CRMVAEConfig(n_modalities=len(dims), latent_dim=2, input_dims=dims), fast_kernels=fast)


def make_data(n=B, dims=DIMS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.rand((n, *d), generator=g) for m, d in dims.items()}


def ones(n=B):
    return torch.ones(n, dtype=torch.bool)


# ------------------------------------------------------------------------------------ findings of issue 9
@pytest.mark.parametrize("fast", FAST)
def test_0d_masks_with_batched_data_raise(fast):
    """Before: 0-d masks made the batch one unbatched item; the eager path returned a wrong loss silently."""
    model = make_model(fast)
    inputs = {"data": make_data(), "masks": {m: torch.tensor(True) for m in NAMES}}
    with pytest.raises(ValueError, match=r"0-d \(one unbatched item\) but inputs.data\['a'\] is batched"):
        model(inputs)


@pytest.mark.parametrize("fast", FAST)
def test_0d_masks_without_input_dims_are_caught_at_the_encoder(fast):
    """Without input_dims the batch cannot be told from an item by shape; the encoder's output shape tells."""
    torch.manual_seed(0)
    enc = cf.nn.default_encoders(DIMS, 2)
    dec = cf.nn.default_decoders(DIMS, 2)
    model = cf.CRMVAE(cf.CRMVAEConfig(n_modalities=2, latent_dim=2), encoders=dict(enc), decoders=dict(dec),
                      fast_kernels=fast)
    inputs = {"data": make_data(), "masks": {m: torch.tensor(True) for m in NAMES}}
    with pytest.raises(ValueError, match=r"expected \(B, latent_dim\) = \(1, 2\).*0-d masks mark one unbatched"):
        model(inputs)


@pytest.mark.parametrize("fast", FAST)
def test_unbatched_item_is_a_batch_of_one(fast):
    """An item (0-d masks, Python bools or no masks) gives the loss of the same sample as a batch of one."""
    model = make_model(fast)
    data = make_data(n=1)
    item = {m: x[0] for m, x in data.items()}
    torch.manual_seed(5)
    want = model({"data": data, "masks": {m: ones(1) for m in NAMES}}).loss
    for masks in ({m: torch.tensor(True) for m in NAMES}, {m: True for m in NAMES}, {m: np.True_ for m in NAMES}):
        torch.manual_seed(5)
        torch.testing.assert_close(model({"data": item, "masks": masks}).loss, want)
    torch.manual_seed(5)
    torch.testing.assert_close(model({"data": item}).loss, want)


def test_multivae_dataset_item_is_read_as_one_sample():
    datasets = pytest.importorskip("multivae.data.datasets.base", reason="MultiVae 1.0.3 is the outside witness")
    data = make_data()
    masks = {"a": torch.tensor([True, False, True]), "b": ones()}
    item = datasets.IncompleteDataset(data, masks)[1]
    got, got_masks = read_inputs(item, NAMES, DIMS)
    assert got["a"].shape == (1, 4) and got["b"].shape == (1, 2, 3)
    assert got_masks["a"].tolist() == [False] and got_masks["b"].tolist() == [True]
    assert torch.equal(got["b"][0], data["b"][1]) and torch.equal(got["a"], torch.zeros(1, 4))


@pytest.mark.parametrize("fast", FAST)
def test_masks_naming_an_unknown_modality_raise(fast):
    """Before: a mask of a modality the model lacks was silently ignored."""
    model = make_model(fast)
    inputs = {"data": make_data(), "masks": {"a": ones(), "b": ones(), "c": ones()}}
    with pytest.raises(ValueError, match=r"unknown modality name\(s\) \['c'\] in inputs.masks"):
        model(inputs)


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("method", ["forward", "nll", "encode"])
def test_empty_batch_raises(fast, method):
    """Before: B = 0 crashed inside torch with 'cannot reshape tensor of 0 elements'."""
    model = make_model(fast)
    inputs = {"data": make_data(n=0)}
    call = {"forward": lambda: model(inputs), "nll": lambda: model.compute_joint_nll(inputs, K=2),
            "encode": lambda: model.encode(inputs)}[method]
    with pytest.raises(ValueError, match=r"the batch is empty \(B = 0"):
        call()


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("shape", [(B, 3), (B, 4, 1), (B, 3, 2), (B, 6)], ids=str)
def test_feature_shape_differing_from_input_dims_raises(fast, shape):
    """Before: the wrong feature shape failed deep in an encoder or decoder with torch's own message."""
    model = make_model(fast)
    data = make_data()
    data["a" if shape[1:] in ((3,), (4, 1)) else "b"] = torch.rand(shape)
    with pytest.raises(ValueError, match=r"must have shape \(B, \*input_dims\[.*as in the model_config"):
        model({"data": data})


@pytest.mark.parametrize("fast", FAST)
def test_K_true_raises_on_both_paths(fast):
    """Before: K=True ran with K=1 on the fused path and failed with torch's message on the eager one."""
    model = make_model(fast)
    for bad in (True, 2.0, "3", None, torch.tensor(3)):
        with pytest.raises(TypeError, match="K must be an int >= 1"):
            model.compute_joint_nll({"data": make_data()}, K=bad)
        with pytest.raises(TypeError, match="batch_size_K must be an int >= 1"):
            model.compute_joint_nll({"data": make_data()}, K=2, batch_size_K=bad)
    for bad in (0, -1, np.int64(0)):
        with pytest.raises(ValueError, match="K must be an int >= 1"):
            model.compute_joint_nll({"data": make_data()}, K=bad)


@pytest.mark.parametrize("fast", FAST)
def test_numpy_integers_are_accepted(fast):
    """Before: numpy integers were refused as K, batch_size_K and N."""
    model = make_model(fast)
    inputs = {"data": make_data()}
    torch.manual_seed(3)
    want = model.compute_joint_nll(inputs, K=5, batch_size_K=2)
    torch.manual_seed(3)
    got = model.compute_joint_nll(inputs, K=np.int64(5), batch_size_K=np.int32(2))
    torch.testing.assert_close(got, want)
    assert model.encode(inputs, N=np.int16(2)).z.shape == (2, B, 2)


def test_as_count():
    assert as_count(np.uint8(3), "n") == 3 and type(as_count(np.int64(3), "n")) is int
    for bad in (True, np.True_, 2.5, np.float32(2), "2", torch.tensor(2), None):
        with pytest.raises(TypeError, match=r"n must be an int >= 1 \(a Python or numpy integer\), got"):
            as_count(bad, "n")
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0; do this"):
        as_count(0, "n", "; do this")


@pytest.mark.parametrize(
    "masks,match",
    [
        ({"a": torch.full((B,), 0.5), "b": ones()}, r"must hold only 0 and 1 .*got 0.5 at sample\(s\) \[0, 1, 2\]"),
        ({"a": torch.tensor([1.0, math.nan, 1.0]), "b": ones()}, r"must hold only 0 and 1 .*nan at sample\(s\) \[1\]"),
        ({"a": torch.tensor([1, 2, 1]), "b": ones()}, r"must hold only 0 and 1 .*got 2 at sample\(s\) \[1\]"),
        ({"a": ones(B + 1), "b": ones()}, r"inputs.masks\['a'\] must have shape \(3,\)"),
        ({"a": ones()[:, None], "b": ones()}, r"inputs.masks\['a'\] must have shape \(3,\)"),
        ({"a": torch.ones(B, dtype=torch.complex64), "b": ones()}, "bool, float or integer"),
        ({"a": ones().to("meta"), "b": ones()}, r"is on meta but the data is on cpu; move it there"),
        ({"a": "yes", "b": ones()}, r"must have shape \(3,\)|must be a \(B,\) bool or float tensor"),
        ({"a": object(), "b": ones()}, r"must be a \(B,\) bool or float tensor, got object"),
        ({"a": torch.tensor(True), "b": ones()}, r"inputs.masks\['a'\] must have shape \(3,\)"),
        ([ones(), ones()], "inputs.masks must be a dict"),
    ],
    ids=["half", "nan", "two", "long", "2d", "complex", "device", "str", "object", "mixed-0d", "list"],
)
@pytest.mark.parametrize("fast", FAST)
def test_bad_masks_raise(fast, masks, match):
    model = make_model(fast)
    with pytest.raises(ValueError, match=match):
        model({"data": make_data(), "masks": masks})


@pytest.mark.parametrize("fast", FAST)
def test_float_and_integer_masks_of_0_and_1_are_bool_masks(fast):
    model = make_model(fast)
    bool_masks = {"a": torch.tensor([True, False, True]), "b": torch.tensor([True, True, False])}
    torch.manual_seed(2)
    want = model({"data": make_data(), "masks": bool_masks}).loss
    for dtype in (torch.float32, torch.float16, torch.int64, torch.uint8):
        torch.manual_seed(2)
        got = model({"data": make_data(), "masks": {m: w.to(dtype) for m, w in bool_masks.items()}}).loss
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fast", FAST)
def test_checks_run_before_any_encoder_or_kernel(fast, monkeypatch):
    """Bad input is refused before the encoders (and so before any kernel) run."""
    model = make_model(fast)

    def boom(*args, **kwargs):
        raise AssertionError("an encoder ran on bad input")

    monkeypatch.setattr(model, "_encode_experts", boom)
    for inputs in ({"data": make_data(n=0)}, {"data": {**make_data(), "a": torch.rand(B, 5)}},
                   {"data": make_data(), "masks": {m: torch.tensor(True) for m in NAMES}}):
        with pytest.raises(ValueError):
            model(inputs)
        with pytest.raises(ValueError):
            model.compute_joint_nll(inputs, K=2)


def test_same_error_on_both_paths():
    bad = [{"data": make_data(n=0)}, {"data": {**make_data(), "b": torch.rand(B, 6)}},
           {"data": make_data(), "masks": {"a": ones(), "b": ones(), "zzz": ones()}}]
    for inputs in bad:
        messages = []
        for fast in (False, True):
            with pytest.raises(ValueError) as info:
                make_model(fast)(inputs)
            messages.append(str(info.value))
        assert messages[0] == messages[1]


# ------------------------------------------------------------------------------------------ the fuzz test
def _corruptions():
    """Strategies of (description, inputs) that are malformed for NAMES / DIMS: each must be refused."""
    def with_data(**over):
        return {"data": {**make_data(), **over}}

    def with_masks(**over):
        return {"data": make_data(), "masks": {**{m: ones() for m in NAMES}, **over}}

    n = st.integers(0, 5)
    feat = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
    dtypes = st.sampled_from([torch.bool, torch.float32, torch.float16, torch.int32, torch.complex64])
    junk = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.text(max_size=3),
                     st.lists(st.integers(), max_size=3), st.builds(object))
    return st.one_of(
        # wrong batch size in one modality
        st.tuples(st.sampled_from(NAMES), n.filter(lambda k: k != B)).map(
            lambda t: with_data(**{t[0]: torch.rand((t[1], *DIMS[t[0]]))})),
        # wrong feature shape in one modality
        st.tuples(st.sampled_from(NAMES), feat).filter(lambda t: t[1] != DIMS[t[0]]).map(
            lambda t: with_data(**{t[0]: torch.rand((B, *t[1]))})),
        # not a tensor
        st.tuples(st.sampled_from(NAMES), junk).map(lambda t: with_data(**{t[0]: t[1]})),
        # empty batch
        st.just({"data": make_data(n=0)}),
        # unknown modality in data or masks, a missing modality
        st.text(min_size=1, max_size=3).filter(lambda s: s not in NAMES).map(lambda s: with_data(**{s: ones()})),
        st.text(min_size=1, max_size=3).filter(lambda s: s not in NAMES).map(lambda s: with_masks(**{s: ones()})),
        st.sampled_from(NAMES).map(lambda m: {"data": {k: v for k, v in make_data().items() if k != m}}),
        st.sampled_from(NAMES).map(lambda m: {"data": make_data(), "masks": {m: ones()}}),
        # masks of the wrong shape, dtype or values
        st.tuples(st.sampled_from(NAMES), feat.filter(lambda s: s != (B,)), dtypes).map(
            lambda t: with_masks(**{t[0]: torch.ones(t[1], dtype=t[2])})),
        st.tuples(st.sampled_from(NAMES), st.floats(allow_nan=True).filter(lambda x: x not in (0.0, 1.0))).map(
            lambda t: with_masks(**{t[0]: torch.tensor([1.0, t[1], 1.0], dtype=torch.float64)})),
        st.tuples(st.sampled_from(NAMES), junk).map(lambda t: with_masks(**{t[0]: t[1]})),
        # 0-d masks beside batched data
        st.just({"data": make_data(), "masks": {m: torch.tensor(True) for m in NAMES}}),
        # a sample with no observed modality (CPU masks)
        st.integers(0, B - 1).map(lambda i: {"data": make_data(),
                                             "masks": {m: torch.arange(B) != i for m in NAMES}}),
        # not inputs at all
        junk.map(lambda j: j),
        junk.map(lambda j: {"data": j}),
        junk.filter(lambda j: j is not None).map(lambda j: {"data": make_data(), "masks": j}),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=_corruptions())
def test_fuzz_malformed_inputs_raise_value_or_type_error(inputs):
    with pytest.raises((ValueError, TypeError)):
        read_inputs(inputs, NAMES, DIMS)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 4),
    shapes=st.dictionaries(st.sampled_from(NAMES + ["c"]), st.lists(st.integers(0, 4), max_size=3), max_size=3),
    masks=st.one_of(st.none(), st.dictionaries(
        st.sampled_from(NAMES + ["c"]),
        st.tuples(st.lists(st.integers(0, 4), max_size=2),
                  st.sampled_from([torch.bool, torch.float32, torch.int64, torch.complex64]),
                  st.sampled_from([0, 1, 0.5, math.nan])),
        max_size=3)),
    use_dims=st.booleans(),
)
def test_fuzz_anything_either_reads_consistently_or_raises_value_or_type_error(n, shapes, masks, use_dims):
    """Inputs drawn at random (valid or not): read_inputs returns consistent (B, ...) data and (B,) bool masks,
    or raises ValueError/TypeError, never anything else."""
    inputs = {"data": {m: torch.rand((n, *s)) for m, s in shapes.items()}}
    if masks is not None:
        inputs["masks"] = {m: torch.full(s, v).to(dt) for m, (s, dt, v) in masks.items()}
    try:
        data, got_masks = read_inputs(inputs, NAMES, DIMS if use_dims else None)
    except (ValueError, TypeError):
        return
    assert list(data) == NAMES
    batch = {x.shape[0] for x in data.values()}
    assert len(batch) == 1 and batch.pop() >= 1
    if use_dims:
        assert all(tuple(data[m].shape[1:]) == DIMS[m] for m in NAMES)
    if got_masks is not None:
        assert all(w.dtype == torch.bool and w.shape == data[m].shape[:1] for m, w in got_masks.items())
        assert torch.stack(list(got_masks.values())).any(0).all()


def test_config_takes_numpy_integers_and_coerces_like_multivae(tmp_path):
    """Before issue 9: numpy integers were refused as n_modalities / latent_dim. Issue 16: MultiVae's config
    (pydantic, lax mode) takes True, 2.0 and "2" as ints (1, 2, 2), and so does ours (tests/test_config.py checks
    it against MultiVae's config); 0, 2.5 and "two" are refused."""
    cfg = cf.CRMVAEConfig(n_modalities=np.int64(2), latent_dim=np.int32(2), input_dims=DIMS)
    assert type(cfg.n_modalities) is int and type(cfg.latent_dim) is int
    cf.CRMVAE(cfg, fast_kernels=False).save(tmp_path / "m")  # the JSON writer takes them
    assert cf.CRMVAE.load_from_folder(tmp_path / "m").latent_dim == 2
    for value, want in ((True, 1), (2.0, 2), ("2", 2)):
        assert cf.CRMVAEConfig(n_modalities=value).n_modalities == want
    for bad in (0, 2.5, "two"):
        with pytest.raises(ValueError, match="CRMVAEConfig.n_modalities must be an integer"):
            cf.CRMVAEConfig(n_modalities=bad)
