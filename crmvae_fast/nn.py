"""Outputs with attribute and key access, and the default MLP architectures.

Outputs (of the model and of the default architectures) are pythae's ``ModelOutput`` (which MultiVae re-exports
as ``multivae.models.base.ModelOutput``) wherever pythae is importable, so ``isinstance`` checks written for
MultiVae hold; :class:`ModelOutput` below, with the same access, otherwise. Neither pythae nor MultiVae is a
dependency: :func:`output_type` imports pythae on first use only (it takes seconds), never at package import.

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


_OUTPUT_TYPE = None


def output_type() -> type:
    """The class of every output: a subclass of pythae's ``ModelOutput`` when pythae is importable, else
    :class:`ModelOutput`. Resolved once, on first call (the model calls it when built, so a compiled step never
    imports). The subclass reads attributes from the keys, as :class:`ModelOutput` does: pythae's class keeps
    them in the instance ``__dict__`` as well, which ``torch.compile`` does not rebuild on the outputs of a
    compiled function."""
    global _OUTPUT_TYPE
    if _OUTPUT_TYPE is None:
        try:
            from pythae.models.base.base_utils import ModelOutput as pythae_output
        except Exception:  # not installed, or an install that fails to import: our own class serves
            _OUTPUT_TYPE = ModelOutput
        else:
            _OUTPUT_TYPE = type("PythaeModelOutput", (pythae_output,), {
                "__doc__": "pythae's ``ModelOutput`` (``isinstance`` holds) with attributes read from its keys.",
                "__module__": __name__,
                "__getattr__": ModelOutput.__getattr__,
            })
    return _OUTPUT_TYPE


def __getattr__(name):
    # ``crmvae_fast.nn.PythaeModelOutput`` exists once resolved; pickle finds it here in a fresh process too
    if name == "PythaeModelOutput" and output_type().__name__ == name:
        return output_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_output_pytree() -> None:
    """Let torch's pytree see into the outputs (the tensors of :func:`output_type`'s instances become its leaves,
    the keys its context); a second call does nothing. FSDP2 of torch 2.8 finds the tensors of a module's output
    with ``tree_flatten`` to hook its backward (the gathering of the parameters and the reduce-scatter of the
    gradients); it treats an unregistered dict subclass as one opaque leaf, so without this the gradients of a
    sharded CRMVAE were never reduced. :func:`crmvae_fast.distributed.fully_shard_model` calls it."""
    from torch.utils import _pytree as pytree

    cls = output_type()
    if cls in pytree.SUPPORTED_NODES:
        return

    def flatten(out):
        keys = list(out.keys())
        return [out[k] for k in keys], keys

    def unflatten(values, keys):
        return cls(zip(keys, values))

    pytree.register_pytree_node(cls, flatten, unflatten, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")


def make_output(*args, **kwargs):
    """An output of :func:`output_type` holding ``dict(*args, **kwargs)``: ``out.name``, ``out["name"]``,
    ``out[0]`` and ``out.to_tuple()`` all work."""
    return output_type()(*args, **kwargs)


def output_field(out, name: str):
    """``out.name`` or ``out[name]``: encoders and decoders may return either."""
    if isinstance(out, Mapping):
        if name in out:
            return out[name]
    elif hasattr(out, name):
        return getattr(out, name)
    raise TypeError(f"expected the module's output to have a {name!r} field (key or attribute), got {type(out).__name__}")


def first_parameter(module: nn.Module):
    """``module``'s first parameter, or None. A loop, not ``next(module.parameters(), None)``: dynamo of torch 2.8
    cannot trace ``next`` with a default, and the model calls this in ``forward``."""
    for p in module.parameters():
        return p
    return None


def input_dtype(module: nn.Module):
    """The float dtype ``module`` takes its input in: that of its first floating parameter, or None (take the
    input as given) when it has none or holds an ``nn.Embedding``/``nn.EmbeddingBag`` (which takes token ids)."""
    if any(isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) for mod in module.modules()):
        return None
    for p in module.parameters():  # a loop, as in first_parameter
        if p.is_floating_point():
            return p.dtype
    return None


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

    def forward(self, x: torch.Tensor):
        out = x.reshape(-1, prod(self.input_dim))
        for layer in self.layers:
            out = layer(out)
        return make_output(embedding=self.embedding(out), log_covariance=self.log_var(out))


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

    def forward(self, z: torch.Tensor):
        out = z
        for layer in self.layers:
            out = layer(out)
        return make_output(reconstruction=out.reshape(*z.shape[:-1], *self.input_dim))


def default_encoders(input_dims: dict, latent_dim: int) -> nn.ModuleDict:
    return nn.ModuleDict({m: EncoderMLP(d, latent_dim) for m, d in input_dims.items()})


def default_decoders(input_dims: dict, latent_dim: int) -> nn.ModuleDict:
    return nn.ModuleDict({m: DecoderMLP(d, latent_dim) for m, d in input_dims.items()})
