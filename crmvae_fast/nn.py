"""Outputs with attribute and key access, and the default MLP architectures.

The default encoder and decoder have MultiVae's parameter names and shapes (``layers.0.0.weight``, ...,
``embedding``, ``log_var``), so a state_dict moves between the two libraries either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from math import prod

import torch
from torch import nn


class ModelOutput(dict):
    """A dict whose keys are also attributes, like pythae's ``ModelOutput``: ``out.loss``, ``out["loss"]``,
    ``out[0]`` (the first field, in insertion order; slices too) and ``out.to_tuple()``."""

    def __getitem__(self, k):
        if isinstance(k, (int, slice)):
            return self.to_tuple()[k]
        return super().__getitem__(k)

    def to_tuple(self) -> tuple:
        """The values, in insertion order (pythae keeps None values too)."""
        return tuple(self.values())

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


def output_field(out, name: str):
    """``out.name`` or ``out[name]``: encoders and decoders may return either."""
    if isinstance(out, Mapping):
        if name in out:
            return out[name]
    elif hasattr(out, name):
        return getattr(out, name)
    raise TypeError(f"expected the module's output to have a {name!r} field (key or attribute), got {type(out).__name__}")


class EncoderMLP(nn.Module):
    """MultiVae's ``Encoder_VAE_MLP``: flatten, two 512-unit ReLU layers, linear mean and log-variance."""

    def __init__(self, input_dim, latent_dim: int, n_hidden: int = 1):
        super().__init__()
        self.input_dim = tuple(input_dim)
        self.latent_dim = latent_dim
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(prod(self.input_dim), 512), nn.ReLU(inplace=True))])
        for _ in range(n_hidden):
            self.layers.append(nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True)))
        self.embedding = nn.Linear(512, latent_dim)
        self.log_var = nn.Linear(512, latent_dim)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        out = x.reshape(-1, prod(self.input_dim))
        for layer in self.layers:
            out = layer(out)
        return ModelOutput(embedding=self.embedding(out), log_covariance=self.log_var(out))


class DecoderMLP(nn.Module):
    """MultiVae's ``Decoder_AE_MLP``: one 512-unit ReLU layer, a sigmoid output, any leading shape."""

    def __init__(self, input_dim, latent_dim: int):
        super().__init__()
        self.input_dim = tuple(input_dim)
        self.layers = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(latent_dim, 512), nn.ReLU(inplace=True)),
                nn.Sequential(nn.Linear(512, prod(self.input_dim)), nn.Sigmoid()),
            ]
        )

    def forward(self, z: torch.Tensor) -> ModelOutput:
        out = z
        for layer in self.layers:
            out = layer(out)
        return ModelOutput(reconstruction=out.reshape(*z.shape[:-1], *self.input_dim))


def default_encoders(input_dims: dict, latent_dim: int) -> nn.ModuleDict:
    return nn.ModuleDict({m: EncoderMLP(d, latent_dim) for m, d in input_dims.items()})


def default_decoders(input_dims: dict, latent_dim: int) -> nn.ModuleDict:
    return nn.ModuleDict({m: DecoderMLP(d, latent_dim) for m, d in input_dims.items()})
