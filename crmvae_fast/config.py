"""``CRMVAEConfig``: MultiVae 1.0.3's config, field for field, readable and writable in its JSON format."""

from __future__ import annotations

import json
import numbers
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

DISTRIBUTIONS = ("normal", "bernoulli", "laplace", "categorical")


@dataclass
class CRMVAEConfig:
    """The CRMVAE configuration, with MultiVae's field names and defaults.

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
        for name in ("n_modalities", "latent_dim"):  # numpy integers too, stored as int (JSON takes no np.int64)
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            setattr(self, name, int(value))
        if self.input_dims is not None:
            self.input_dims = {k: tuple(int(s) for s in v) for k, v in self.input_dims.items()}
        for m, d in (self.decoders_dist or {}).items():
            if isinstance(d, str) and d not in DISTRIBUTIONS:
                raise ValueError(f"decoders_dist[{m!r}] must be one of {DISTRIBUTIONS} or a callable, got {d!r}")

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
