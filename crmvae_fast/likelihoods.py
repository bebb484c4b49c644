"""Decoder log-likelihoods ``log p(x | z)``, elementwise, exactly as MultiVae's ``set_decoder_dist``.

One difference: argument validation is off (``validate_args=False``). Checking a target against the
distribution's support is a device-to-host sync on every step, which CUDA graphs and
``torch.compile(fullgraph=True)`` cannot take; so Bernoulli targets in [0, 1] that are not exactly 0 or 1 are
scored by the same cross-entropy formula instead of raising as in MultiVae.
"""

from __future__ import annotations

import torch
import torch.distributions as dist
import torch.nn.functional as F


def categorical_log_prob(recon, target, eps: float = 1e-6):
    """MultiVae's ``cross_entropy``: ``target * log_softmax(recon + eps)`` (one-hot or token targets)."""
    if isinstance(recon, dict):
        recon = recon["one_hot"]
    if isinstance(target, dict):
        target = target["one_hot"] if "one_hot" in target else F.one_hot(target["tokens"], recon.shape[-1])
    return target * F.log_softmax(recon + eps, dim=-1)


def make_log_prob(name, params: dict | None = None):
    """The elementwise ``log_prob(recon, target)`` of a decoder distribution name (or a callable)."""
    if callable(name):
        return name
    params = dict(params or {})
    if name == "normal":
        scale = params.get("scale", 1.0)
        return lambda recon, target: dist.Normal(recon, scale, validate_args=False).log_prob(target)
    if name == "laplace":
        scale = params.get("scale", 1.0)
        return lambda recon, target: dist.Laplace(recon, scale, validate_args=False).log_prob(target)
    if name == "bernoulli":
        return lambda recon, target: dist.Bernoulli(logits=recon, validate_args=False).log_prob(target)
    if name == "categorical":
        return categorical_log_prob
    raise ValueError(f"decoder distribution must be 'normal', 'laplace', 'bernoulli', 'categorical' or a callable, got {name!r}")


def summed_log_prob(log_prob, recon: torch.Tensor, target: torch.Tensor, n_batch_dims: int = 1) -> torch.Tensor:
    """``log_prob(recon, target)`` summed over every dim after the first ``n_batch_dims``."""
    lp = log_prob(recon, target)
    return lp.reshape(*lp.shape[:n_batch_dims], -1).sum(-1)
