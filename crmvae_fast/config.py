"""``CRMVAEConfig``: MultiVae 1.0.3's config, field for field, readable and writable in its JSON format."""

from __future__ import annotations

import decimal
import json
import math
import numbers
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

DISTRIBUTIONS = ("normal", "bernoulli", "laplace", "categorical")
#: The parameters each built-in decoder distribution takes in ``decoder_dist_params``.
DIST_PARAMS = {"normal": ("scale",), "laplace": ("scale",), "bernoulli": (), "categorical": ()}


@dataclass
class CRMVAEConfig:
    """The CRMVAE configuration, with MultiVae's field names and defaults.

    Values are coerced as MultiVae's pydantic config coerces them (``latent_dim="8"`` or ``8.0`` is 8,
    ``uses_likelihood_rescaling="yes"`` is True, ``beta="2.5"`` is 2.5) and refused where it refuses them
    (``"eight"``, ``8.5`` for an int), with a ``ValueError`` naming the field. Also refused, where MultiVae
    would fail later or give NaN: counts below 1, ``input_dims`` sizes that are not integers >= 1, a
    non-finite ``beta``, ``rescale_factors`` and ``scale`` parameters that are not finite numbers > 0, and
    parameters a distribution does not take (bernoulli and categorical take none, normal and laplace only
    ``scale``). The model also refuses modality names that ``input_dims``, ``decoder_dist_params`` and
    ``rescale_factors`` give and it lacks, and ``decoders_dist`` or ``rescale_factors`` missing one of its
    modalities (``decoders_dist`` may name more, as in MultiVae).

    Args:
        n_modalities: number of modalities.
        latent_dim: dimension of the latent space (default 10).
        input_dims: modality name -> input shape; needed for the default architectures and for the default
            likelihood rescaling.
        uses_likelihood_rescaling: rescale each reconstruction term (Javaloy et al. 2022).
        rescale_factors: modality name -> factor; when None and rescaling is on, ``max_dim / dim_m``.
        decoders_dist: modality name -> "normal", "bernoulli" (logits), "laplace" or "categorical";
            None means normal for every modality.
        decoder_dist_params: modality name -> parameters, e.g. ``{"mod1": {"scale": 0.75}}``.
        custom_architectures: filled by the model with "encoders"/"decoders" when custom ones are given.
        beta: weight of the sum of KL terms (default 2.5).
    """

    n_modalities: int
    latent_dim: int = 10
    input_dims: Optional[dict] = None
    uses_likelihood_rescaling: bool = False
    rescale_factors: Optional[dict] = None
    decoders_dist: Optional[Dict[str, Any]] = None
    decoder_dist_params: Optional[dict] = None
    custom_architectures: list = field(default_factory=list)
    beta: float = 2.5

    def __post_init__(self):
        self._validate()

    def _validate(self, modalities=None) -> None:
        """Coerce every field as MultiVae's pydantic config does (lax mode: ``"8"`` and ``8.0`` are the int 8,
        ``"yes"`` is True, ...), refuse what it refuses, and refuse values that would give NaN or fail later
        (counts and sizes below 1, non-positive or non-finite scales and factors, parameters a distribution does
        not take): a ``ValueError`` naming the field. With ``modalities`` (the model's names), also refuse
        ``input_dims``, ``decoder_dist_params`` and ``rescale_factors`` naming an unknown modality, and
        ``decoders_dist`` and ``rescale_factors`` missing one."""
        self.n_modalities = _lax_int(self.n_modalities, "n_modalities", minimum=1)
        self.latent_dim = _lax_int(self.latent_dim, "latent_dim", minimum=1)
        self.uses_likelihood_rescaling = _lax_bool(self.uses_likelihood_rescaling, "uses_likelihood_rescaling")
        self.beta = _lax_float(self.beta, "beta")
        if not math.isfinite(self.beta):
            raise ValueError(f"CRMVAEConfig.beta must be a finite number, got {self.beta!r}; a NaN or infinite KL "
                             "weight makes every loss NaN or infinite")
        self.custom_architectures = _lax_list(self.custom_architectures, "custom_architectures")
        bad = [a for a in self.custom_architectures if a not in ("encoders", "decoders")]
        if bad:
            raise ValueError(f"CRMVAEConfig.custom_architectures may only hold 'encoders' and 'decoders', got {bad}; "
                             "the model fills it when custom architectures are given")
        self.input_dims = _lax_dict(self.input_dims, "input_dims")
        if self.input_dims is not None:
            self.input_dims = {_name(m, "input_dims"): _shape(m, d) for m, d in self.input_dims.items()}
        self.decoders_dist = _lax_dict(self.decoders_dist, "decoders_dist")
        if self.decoders_dist is not None:
            self.decoders_dist = {_name(m, "decoders_dist", bytes_ok=True): d for m, d in self.decoders_dist.items()}
            for m, d in self.decoders_dist.items():
                if not (callable(d) or (isinstance(d, str) and d in DISTRIBUTIONS)):
                    raise ValueError(f"CRMVAEConfig.decoders_dist[{m!r}] must be one of {DISTRIBUTIONS} or a "
                                     f"callable log_prob(recon, target), got {d!r}")
        self.rescale_factors = _lax_dict(self.rescale_factors, "rescale_factors")
        for m, f in (self.rescale_factors or {}).items():
            _name(m, "rescale_factors")
            f = _scalar(f)
            if not _is_real(f) or not (math.isfinite(f) and f > 0):
                raise ValueError(f"CRMVAEConfig.rescale_factors[{m!r}] must be a finite number > 0, got {f!r}; a "
                                 "factor multiplies the reconstruction term of its modality")
            self.rescale_factors[m] = float(f)  # a Python float whatever came (numpy, 0-d tensor): JSON takes it
        self.decoder_dist_params = _lax_dict(self.decoder_dist_params, "decoder_dist_params")
        for m, params in (self.decoder_dist_params or {}).items():
            self.decoder_dist_params[m] = _check_dist_params(_name(m, "decoder_dist_params"), params,
                                                             (self.decoders_dist or {}).get(m, "normal"))
        if modalities is not None:
            self._check_names(list(modalities))

    def _check_names(self, modalities: list) -> None:
        # decoders_dist may name more modalities than the model has (as in MultiVae: one dict for several
        # models); a misspelt name there still shows, as a missing one
        for name in ("input_dims", "decoder_dist_params", "rescale_factors"):
            unknown = [m for m in (getattr(self, name) or {}) if m not in modalities]
            if unknown:
                raise ValueError(f"CRMVAEConfig.{name} names unknown modality(ies) {unknown}; the model has "
                                 f"{modalities}: rename or drop those entries")
        if self.rescale_factors is not None:
            missing = [m for m in modalities if m not in self.rescale_factors]
            if missing:
                raise ValueError(f"CRMVAEConfig.rescale_factors lacks modality(ies) {missing}; give a factor for "
                                 f"every one of {modalities}, or rescale_factors=None for the default ones")
        if self.decoders_dist is not None:
            missing = [m for m in modalities if m not in self.decoders_dist]
            if missing:
                raise ValueError(f"CRMVAEConfig.decoders_dist lacks modality(ies) {missing}; give a distribution "
                                 f"for every one of {modalities}, or decoders_dist=None (normal for all)")

    @property
    def name(self) -> str:
        """``"CRMVAEConfig"``: the ``name`` field MultiVae writes into ``model_config.json``."""
        return "CRMVAEConfig"

    def to_dict(self) -> dict:
        """The fields as a dict, with ``name`` first: the content of MultiVae's ``model_config.json``."""
        return {"name": self.name, **asdict(self)}

    def save_json(self, dir_path: str, filename: str) -> None:
        """Write :meth:`to_dict` as JSON to ``dir_path/filename.json`` (MultiVae's ``save_json``)."""
        with open(os.path.join(dir_path, f"{filename}.json"), "w", encoding="utf-8") as fp:
            fp.write(json.dumps(self.to_dict()))

    @classmethod
    def from_dict(cls, config_dict: dict) -> "CRMVAEConfig":
        """A config from :meth:`to_dict`'s format; warns when its ``name`` is another model's config."""
        config_dict = dict(config_dict)
        name = config_dict.pop("name", cls.__name__)
        if name != cls.__name__:
            warnings.warn(f"Loading a {cls.__name__} from the config of a {name}.")
        return cls(**config_dict)

    @classmethod
    def from_json_file(cls, json_path: str) -> "CRMVAEConfig":
        """A config read from a ``model_config.json`` written by :meth:`save_json` or by MultiVae."""
        with open(json_path, encoding="utf-8") as fp:
            return cls.from_dict(json.load(fp))

    @classmethod
    def from_any(cls, config) -> "CRMVAEConfig":
        """Our config from our own or from MultiVae's ``CRMVAEConfig`` (or anything with its fields)."""
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            return cls.from_dict(config)
        fields = cls.__dataclass_fields__
        return cls(**{k: getattr(config, k) for k in fields if hasattr(config, k)})


# ------------------------------------------------------------------------------------------------ coercion
# MultiVae's config is a pydantic dataclass in lax mode; these mirror its coercions for our field types without
# making pydantic a dependency (tests/test_config.py checks them against MultiVae's config).

_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}
_INT_STR = re.compile(r"[+-]?[0-9]+(?:_[0-9]+)*(?:\.0+)?")


def _refuse(name: str, expected: str, value) -> ValueError:
    return ValueError(f"CRMVAEConfig.{name} must be {expected}, got {value!r} of type {type(value).__name__}; "
                      "give a value of that kind")


def _scalar(value):
    """numpy scalars, 0-d arrays and 0-d tensors as Python scalars (pydantic reads them so too)."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        try:
            return value.item()
        except (RuntimeError, ValueError, TypeError):  # a meta tensor has no value: refused as not a number
            pass
    return value


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _lax_int(value, name: str, minimum: Optional[int] = None) -> int:
    v = _scalar(value)
    out = None
    if isinstance(v, numbers.Integral):  # bool too: True is 1, as in pydantic
        out = int(v)
    elif isinstance(v, (numbers.Real, decimal.Decimal)):
        if math.isfinite(v) and v == int(v) and abs(v) < 2**63:
            out = int(v)
    elif isinstance(v, (str, bytes)):
        s = (v.decode("utf-8", "replace") if isinstance(v, bytes) else v).strip()
        if _INT_STR.fullmatch(s):
            out = int(s.split(".")[0])
    if out is None:
        raise _refuse(name, "an integer (an int, an integral float such as 8.0 or a string such as '8')", value)
    if minimum is not None and out < minimum:
        raise ValueError(f"CRMVAEConfig.{name} must be an integer >= {minimum}, got {value!r}")
    return out


def _lax_float(value, name: str) -> float:
    v = _scalar(value)
    try:
        if isinstance(v, (numbers.Real, decimal.Decimal)):
            return float(v)
        if isinstance(v, (str, bytes)):
            s = (v.decode("utf-8", "replace") if isinstance(v, bytes) else v).strip()
            if s.isascii():
                return float(s)
    except (ValueError, OverflowError):
        pass
    raise _refuse(name, "a number (an int, a float or a numeric string such as '2.5')", value)


def _lax_bool(value, name: str) -> bool:
    v = _scalar(value)
    if isinstance(v, bool):
        return v
    if isinstance(v, (str, bytes)):
        s = (v.decode("utf-8", "replace") if isinstance(v, bytes) else v).lower()
        if s in _TRUE or s in _FALSE:
            return s in _TRUE
    elif isinstance(v, (numbers.Real, decimal.Decimal)) and v in (0, 1):
        return bool(v)
    raise _refuse(name, "a bool (True/False, 0/1 or a string such as 'true', 'no')", value)


def _lax_dict(value, name: str) -> Optional[dict]:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return dict(value)
    raise _refuse(name, "a dict (modality name -> value) or None", value)


def _lax_list(value, name: str) -> list:
    if isinstance(value, (str, bytes, bytearray, Mapping)) or not isinstance(value, Iterable):
        raise _refuse(name, "a list", value)
    return list(value)


def _name(m, field_name: str, bytes_ok: bool = False) -> str:
    if bytes_ok and isinstance(m, bytes):
        m = m.decode("utf-8", "replace")
    if not isinstance(m, str):
        raise ValueError(f"CRMVAEConfig.{field_name} keys must be modality names (str), got {m!r}")
    return m


def _shape(m: str, dims) -> tuple:
    """``input_dims[m]`` as a tuple of ints >= 1 (numpy integers too)."""
    if isinstance(dims, (str, bytes, Mapping)) or not isinstance(dims, Iterable):
        raise ValueError(f"CRMVAEConfig.input_dims[{m!r}] must be a shape, a tuple of ints >= 1 such as (784,) or "
                         f"(1, 28, 28), got {dims!r}")
    dims = tuple(_scalar(d) for d in dims)
    bad = [d for d in dims if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1]
    if bad:
        raise ValueError(f"CRMVAEConfig.input_dims[{m!r}] must hold ints >= 1 (the size of each feature dim), got "
                         f"{dims}; fix the shape of modality {m!r}")
    return tuple(int(d) for d in dims)


def _check_dist_params(m: str, params, dist) -> dict:
    """``decoder_dist_params[m]`` for the distribution ``dist`` of modality m (a callable takes anything), as a
    new dict whose ``scale`` is a Python float."""
    if not isinstance(params, Mapping):
        raise ValueError(f"CRMVAEConfig.decoder_dist_params[{m!r}] must be a dict of parameters such as "
                         f"{{'scale': 0.75}}, got {params!r}")
    if callable(dist) or dist not in DIST_PARAMS:
        return dict(params)
    unknown = [k for k in params if k not in DIST_PARAMS[dist]]
    if unknown:
        takes = f"only {list(DIST_PARAMS[dist])}" if DIST_PARAMS[dist] else "no parameters"
        raise ValueError(f"CRMVAEConfig.decoder_dist_params[{m!r}] has {unknown}, but the {dist} distribution of "
                         f"{m!r} takes {takes}; drop them")
    if "scale" in params:
        scale = _scalar(params["scale"])
        if not _is_real(scale) or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"CRMVAEConfig.decoder_dist_params[{m!r}]['scale'] must be a finite number > 0, got "
                             f"{params['scale']!r}; a scale of 0 or below gives NaN losses")
        return {**params, "scale": float(scale)}
    return dict(params)
