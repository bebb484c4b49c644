"""``CRMVAEConfig`` takes what MultiVae's config takes, as MultiVae's config reads it, and refuses, with one
sentence naming the field, both what MultiVae's refuses and what would only fail later or give NaN (issue 16).

MultiVae 1.0.3's config is a pydantic dataclass in lax mode: ``latent_dim="8"`` and ``8.0`` are the int 8,
``uses_likelihood_rescaling="yes"`` is True, ``beta="2.5"`` is 2.5, ``"eight"`` and ``8.5`` are refused. Ours
mirrors that without pydantic; the hypothesis tests below draw values of every kind for each field and check
ours against MultiVae's own config.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import crmvae_fast as cf

warnings.filterwarnings("ignore", category=UserWarning)

DIMS = {"a": (4,), "b": (2, 3)}


def make_model(cfg, fast=False):
    torch.manual_seed(0)
    return cf.CRMVAE(cfg, fast_kernels=fast)


# ------------------------------------------------------------------------------ against MultiVae's config
def _multivae_config():
    return pytest.importorskip("multivae.models", reason="MultiVae 1.0.3 is the outside witness").CRMVAEConfig


def _both(field, value):
    """(theirs, ours): the field's value after construction, or None where the config refused it. Ours may only
    refuse with a ValueError naming the field."""
    kw = {"n_modalities": 2, field: value} if field != "n_modalities" else {field: value}
    try:
        theirs = (getattr(_multivae_config()(**kw), field),)
    except Exception:  # pydantic's ValidationError (a ValueError), or its TypeError on odd keyword values
        theirs = None
    try:
        ours = (getattr(cf.CRMVAEConfig(**kw), field),)
    except ValueError as e:
        assert f"CRMVAEConfig.{field}" in str(e) and "\n" not in str(e), str(e)
        ours = None
    return theirs, ours


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and type(a) is type(b)


_pad = st.sampled_from(["", " ", "\t", "\n "])
_int_strings = st.builds(lambda p, s, i, t, q: f"{p}{s}{i}{t}{q}", _pad, st.sampled_from(["", "+", "-"]),
                         st.integers(0, 200), st.sampled_from(["", ".0", ".00", ".5", ".", "e0", "_0"]), _pad)
_junk = st.one_of(st.none(), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(),
                                                                                  max_size=1),
                  st.sampled_from(["", " ", "eight", "0x8", "1e3", "nan", "inf", "8 8", "--8", "1__0", "٨"]))
INTS = st.one_of(st.integers(-5, 50), st.integers(-5, 50).map(float), st.floats(allow_nan=True, allow_infinity=True),
                 st.booleans(), _int_strings, _int_strings.map(str.encode), _junk)
FLOATS = st.one_of(st.integers(-5, 50), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                   st.floats(-1e3, 1e3).map(repr), st.builds(lambda p, x: f"{p}{x}{p}", _pad, st.floats(-10, 10)),
                   st.sampled_from(["inf", "-inf", "nan", "Infinity", "1e3", "1_0.5", "2.", ".5"]), _junk)
BOOLS = st.one_of(st.booleans(), st.integers(-2, 3), st.sampled_from([0.0, 1.0, 0.5, math.nan]),
                  st.sampled_from(["true", "True", "TRUE", "t", "yes", "Y", "on", "1", "0", "off", "No", "n", "F",
                                   "false", " true", "2", "1.0", "maybe", b"yes", b"0"]), _junk)
NAMES = st.sampled_from(["a", "b"])
SHAPES = st.one_of(st.lists(st.integers(-1, 4), max_size=3), st.lists(st.integers(-1, 4), max_size=3).map(tuple),
                   st.integers(-1, 4), st.sampled_from(["4", 2.0, None, (2.0,), (True,)]))
DICTS = {
    "input_dims": st.one_of(st.none(), st.dictionaries(NAMES, SHAPES, max_size=2), _junk),
    "rescale_factors": st.one_of(st.none(), st.dictionaries(NAMES, st.one_of(
        st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 5), st.sampled_from(["2", None, True])),
        max_size=2), _junk),
    "decoders_dist": st.one_of(st.none(), st.dictionaries(NAMES, st.sampled_from(
        ["normal", "laplace", "bernoulli", "categorical", "Normal", "poisson", " normal", 3, None]), max_size=2),
        _junk),
    "decoder_dist_params": st.one_of(st.none(), st.dictionaries(NAMES, st.one_of(st.dictionaries(
        st.sampled_from(["scale", "loc"]), st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                                   st.integers(-2, 3), st.sampled_from(["0.5", None, True])),
        max_size=2), st.sampled_from([None, 0.5, "scale"])), max_size=2), _junk),
    "custom_architectures": st.one_of(st.lists(st.sampled_from(["encoders", "decoders", "other"]), max_size=2),
                                      st.lists(st.sampled_from(["encoders", "decoders"]), max_size=2).map(tuple),
                                      st.sampled_from(["encoders", None, 3, {"encoders": 1}])),
}


def _valid_shape(v):
    return isinstance(v, (list, tuple)) and all(type(d) is int and d >= 1 for d in v)


def _positive(v):
    return type(v) in (int, float) and math.isfinite(v) and v > 0


#: What ours refuses beyond MultiVae (where MultiVae would fail later or give NaN), on MultiVae's value.
SEMANTIC = {
    "n_modalities": lambda v: v >= 1,
    "latent_dim": lambda v: v >= 1,
    "beta": math.isfinite,
    "uses_likelihood_rescaling": lambda v: True,
    "input_dims": lambda v: v is None or all(_valid_shape(d) for d in v.values()),
    "rescale_factors": lambda v: v is None or all(_positive(f) for f in v.values()),
    "decoders_dist": lambda v: True,
    "decoder_dist_params": lambda v: v is None or all(
        isinstance(p, dict) and set(p) <= {"scale"} and ("scale" not in p or _positive(p["scale"]))
        for p in v.values()),
    "custom_architectures": lambda v: set(v) <= {"encoders", "decoders"},
}
#: How ours stores what MultiVae stores as given (input_dims shapes become tuples, as in later MultiVae).
NORMAL = {"input_dims": lambda v: v if v is None else {m: tuple(d) for m, d in v.items()}}


@pytest.mark.parametrize("field,values", [("n_modalities", INTS), ("latent_dim", INTS), ("beta", FLOATS),
                                          ("uses_likelihood_rescaling", BOOLS)] + list(DICTS.items()),
                         ids=lambda x: x if isinstance(x, str) else "")
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_each_field_takes_what_multivae_takes_and_reads_it_alike(field, values, data):
    """Before: ``CRMVAEConfig(latent_dim="8")`` was refused where MultiVae's config gives 8, and 0 sizes, bad
    scales and factors were taken. Now: where MultiVae refuses, ours refuses naming the field; where it takes a
    value, ours takes it and reads the same value, unless the value fails a check MultiVae lacks (then ours
    refuses it, naming the field)."""
    value = data.draw(values)
    theirs, ours = _both(field, value)
    if theirs is None:
        assert ours is None, f"MultiVae refuses {field}={value!r} but ours took {ours}"
        return
    if not SEMANTIC[field](theirs[0]):
        assert ours is None, f"{field}={value!r} (MultiVae reads {theirs[0]!r}) should be refused"
        return
    assert ours is not None, f"MultiVae takes {field}={value!r} as {theirs[0]!r} but ours refused it"
    want = NORMAL.get(field, lambda v: v)(theirs[0])
    assert _same(ours[0], want), (field, value, ours[0], want)


@pytest.mark.parametrize("value,want", [("8", 8), (8.0, 8), (" +8.0 ", 8), ("1_0", 10), (True, 1)])
def test_latent_dim_is_coerced_like_multivae(value, want):
    """Before: ``latent_dim="8"`` raised 'latent_dim must be a positive int'."""
    assert cf.CRMVAEConfig(n_modalities=2, latent_dim=value).latent_dim == want


@pytest.mark.parametrize("value", ["eight", 8.5, "8.5", None, [8], "0x8"])
def test_latent_dim_refused_like_multivae(value):
    with pytest.raises(ValueError, match=r"CRMVAEConfig.latent_dim must be an integer .* got"):
        cf.CRMVAEConfig(n_modalities=2, latent_dim=value)


def test_bool_and_float_fields_are_coerced_like_multivae():
    cfg = cf.CRMVAEConfig(n_modalities="2", uses_likelihood_rescaling="yes", beta="0.5", input_dims={"a": [3]},
                          custom_architectures=("encoders",))
    assert (cfg.n_modalities, cfg.uses_likelihood_rescaling, cfg.beta) == (2, True, 0.5)
    assert cfg.input_dims == {"a": (3,)} and cfg.custom_architectures == ["encoders"]
    for field, bad in (("uses_likelihood_rescaling", "maybe"), ("beta", "abc"), ("beta", math.nan),
                       ("custom_architectures", "encoders"), ("input_dims", [("a", (3,))])):
        with pytest.raises(ValueError, match=f"CRMVAEConfig.{field} must be"):
            cf.CRMVAEConfig(n_modalities=2, **{field: bad})


# ------------------------------------------------------------------ decoder scales, factors, input_dims
@pytest.mark.parametrize("scale", [0, 0.0, -1.0, math.nan, math.inf, "0.5", None, True])
@pytest.mark.parametrize("dist", ["normal", "laplace"])
def test_bad_decoder_scale_is_refused_at_construction(scale, dist):
    """Before: a scale of 0 or below gave NaN losses and NaN NLLs on the eager path."""
    with pytest.raises(ValueError, match=r"decoder_dist_params\['a'\]\['scale'\] must be a finite number > 0"):
        cf.CRMVAEConfig(n_modalities=2, input_dims=DIMS, decoders_dist={"a": dist, "b": "normal"},
                        decoder_dist_params={"a": {"scale": scale}})


def test_bad_decoder_scale_set_after_the_config_is_refused_by_the_model():
    cfg = cf.CRMVAEConfig(n_modalities=2, input_dims=DIMS)
    cfg.decoder_dist_params = {"b": {"scale": -0.5}}
    with pytest.raises(ValueError, match=r"decoder_dist_params\['b'\]\['scale'\] must be a finite number > 0"):
        make_model(cfg)


@pytest.mark.parametrize("dist,params,match", [
    ("normal", {"loc": 1.0}, r"has \['loc'\], but the normal distribution of 'a' takes only \['scale'\]"),
    ("bernoulli", {"scale": 0.5}, "the bernoulli distribution of 'a' takes no parameters"),
    ("categorical", {"temperature": 2}, "the categorical distribution of 'a' takes no parameters"),
])
def test_parameters_a_distribution_does_not_take_are_refused(dist, params, match):
    with pytest.raises(ValueError, match=match):
        cf.CRMVAEConfig(n_modalities=2, decoders_dist={"a": dist, "b": "normal"}, decoder_dist_params={"a": params})


def test_scales_and_factors_of_numpy_or_tensor_type_are_stored_as_floats(tmp_path):
    """Taken as MultiVae takes them, then stored as Python floats: the fused likelihood takes them and the
    config's JSON file too (before, a 0-d tensor scale made save_json fail)."""
    cfg = cf.CRMVAEConfig(n_modalities=2, latent_dim=2, input_dims=DIMS, uses_likelihood_rescaling=True,
                          rescale_factors={"a": np.float32(2), "b": torch.tensor(0.5)},
                          decoder_dist_params={"a": {"scale": torch.tensor(0.5)}, "b": {"scale": 3}})
    assert cfg.decoder_dist_params == {"a": {"scale": 0.5}, "b": {"scale": 3.0}}
    assert cfg.rescale_factors == {"a": 2.0, "b": 0.5}
    assert all(type(v) is float for v in [*cfg.rescale_factors.values(), cfg.decoder_dist_params["a"]["scale"]])
    cfg.save_json(str(tmp_path), "model_config")
    model = make_model(cfg, fast=True)
    assert torch.isfinite(model({"data": {m: torch.rand(3, *d) for m, d in DIMS.items()}}).loss)


def test_custom_distributions_take_any_parameters():
    cfg = cf.CRMVAEConfig(n_modalities=2, decoders_dist={"a": lambda r, t: -(r - t) ** 2, "b": "normal"},
                          decoder_dist_params={"a": {"anything": 1}})
    assert cfg.decoder_dist_params == {"a": {"anything": 1}}


@pytest.mark.parametrize("field,value", [
    ("decoder_dist_params", {"c": {"scale": 1.0}}),
    ("rescale_factors", {"a": 1.0, "b": 2.0, "c": 3.0}),
])
def test_unknown_modality_names_are_refused_at_construction(field, value):
    """Before: a misspelt name in decoder_dist_params was ignored (its scale silently stayed 1)."""
    cfg = cf.CRMVAEConfig(n_modalities=2, input_dims=DIMS, uses_likelihood_rescaling=True, **{field: value})
    with pytest.raises(ValueError, match=rf"CRMVAEConfig.{field} names unknown modality\(ies\) \['c'\]"):
        make_model(cfg)


def test_decoders_dist_may_name_more_modalities_but_not_fewer():
    """As in MultiVae, one decoders_dist may serve models with fewer modalities; one that misses a modality (a
    misspelt name shows so) is refused."""
    make_model(cf.CRMVAEConfig(n_modalities=2, input_dims=DIMS,
                               decoders_dist={"a": "normal", "b": "laplace", "c": "bernoulli"}))
    with pytest.raises(ValueError, match=r"CRMVAEConfig.decoders_dist lacks modality\(ies\) \['b'\]"):
        make_model(cf.CRMVAEConfig(n_modalities=2, input_dims=DIMS, decoders_dist={"a": "normal", "bb": "normal"}))


@pytest.mark.parametrize("rescale", [True, False])
def test_rescale_factors_missing_a_modality_are_refused_at_construction(rescale):
    """Before: accepted, then a KeyError in the first forward."""
    cfg = cf.CRMVAEConfig(n_modalities=2, input_dims=DIMS, uses_likelihood_rescaling=rescale,
                          rescale_factors={"a": 2.0})
    with pytest.raises(ValueError, match=r"CRMVAEConfig.rescale_factors lacks modality\(ies\) \['b'\]"):
        make_model(cfg)


@pytest.mark.parametrize("factor", [0, -1.0, math.nan, math.inf, "2", None])
def test_bad_rescale_factors_are_refused(factor):
    with pytest.raises(ValueError, match=r"CRMVAEConfig.rescale_factors\['a'\] must be a finite number > 0"):
        cf.CRMVAEConfig(n_modalities=2, input_dims=DIMS, uses_likelihood_rescaling=True,
                        rescale_factors={"a": factor, "b": 1.0})


@pytest.mark.parametrize("shape", [(0,), (4, -1), (2.5,), ("4",), (True,), 4, "4", None])
def test_input_dims_with_a_size_below_1_or_not_an_int_are_refused(shape):
    """Before: ``input_dims`` with a 0 or negative size was taken (and failed, or silently did nothing, later)."""
    with pytest.raises(ValueError, match=r"CRMVAEConfig.input_dims\['a'\] must (hold ints >= 1|be a shape)"):
        cf.CRMVAEConfig(n_modalities=2, input_dims={"a": shape, "b": (3,)})


def test_good_values_still_give_the_same_losses():
    """Coercion changes nothing for values that were taken before."""
    torch.manual_seed(0)
    data = {"data": {m: torch.rand(3, *d) for m, d in DIMS.items()}}
    plain = make_model(cf.CRMVAEConfig(n_modalities=2, latent_dim=3, input_dims=DIMS, uses_likelihood_rescaling=True,
                                       rescale_factors={"a": 2, "b": 0.5}, decoder_dist_params={"a": {"scale": 2}}))
    coerced = make_model(cf.CRMVAEConfig(n_modalities="2", latent_dim=3.0, input_dims={"a": [4], "b": [2, 3]},
                                         uses_likelihood_rescaling="true", rescale_factors={"a": 2.0, "b": 0.5},
                                         decoder_dist_params={"a": {"scale": 2.0}}))
    torch.manual_seed(1)
    want = plain(data).loss
    torch.manual_seed(1)
    torch.testing.assert_close(coerced(data).loss, want)
