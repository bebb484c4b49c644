"""Types and constants shared by the fused ops (:mod:`crmvae_fast.kernels`) and their eager twins
(:mod:`crmvae_fast.reference`): neither imports the other for them."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

#: MultiVae's variance floor in the product of experts: T_m = 1 / (exp(lv_m) + VAR_FLOOR).
VAR_FLOOR = 1e-8


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the latent math runs in for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class LatentStep(NamedTuple):
    """Everything the CRMVAE loss needs from the latent space for one step."""

    mu_J: Tensor  # (B, D) joint mean
    lv_J: Tensor  # (B, D) joint log-variance
    z_J: Tensor  # (B, D) one sample of the joint
    z: Tensor  # (M, B, D) one sample of each unimodal posterior (unmasked parameters)
    kl_prior: Tensor  # (B,) KL of the joint to N(0, I)
    kl_experts: Tensor  # (M, B) KL of the joint to each expert, zero where masked
