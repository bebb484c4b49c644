"""Types and constants shared by the fused ops (:mod:`crmvae_fast.kernels`) and their eager twins
(:mod:`crmvae_fast.reference`): neither imports the other for them."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

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


TensorOrList = Union[Tensor, Sequence[Tensor]]
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _as_stack(x: TensorOrList, name: str, op: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, Tensor) for t in x):
        shapes = {tuple(t.shape) for t in x}
        if len(shapes) != 1:
            raise ValueError(f"{op}: every {name}_m must have the same (B, D) shape, got {sorted(shapes)}")
        kinds = {(t.dtype, t.device) for t in x}
        if len(kinds) != 1:
            raise ValueError(f"{op}: every {name}_m must have one dtype and device, got {sorted(map(str, kinds))}")
        return torch.stack(list(x))
    raise TypeError(f"{op}: expected {name} as an (M, B, D) tensor or a non-empty list of (B, D) tensors, "
                    f"got {type(x).__name__}")


def check_experts(op: str, mu: TensorOrList, lv: TensorOrList, mask: Optional[Tensor]):
    """The checks every op over M Gaussian experts makes before a kernel runs, with one wording: ``mu``, ``lv``
    as (M, B, D) tensors (or lists of M (B, D) ones) of one floating dtype on one device, M >= 1, and ``mask``
    (M, B) bool or numeric (nonzero = observed) or None. Returns ``(mu, lv, mask)`` with the mask as bool."""
    mu, lv = _as_stack(mu, "mu", op), _as_stack(lv, "lv", op)
    if mu.dim() != 3 or lv.shape != mu.shape:
        raise ValueError(f"{op}: expected mu and lv of the same (M, B, D) shape, got {tuple(mu.shape)} and "
                         f"{tuple(lv.shape)}; stack the experts on dim 0")
    if mu.dtype != lv.dtype or mu.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: expected mu and lv of one floating dtype (float32, float16, bfloat16 or float64), "
                        f"got {mu.dtype} and {lv.dtype}")
    if mu.device != lv.device:
        raise ValueError(f"{op}: mu is on {mu.device} but lv is on {lv.device}; move both to one device")
    M, B, _ = mu.shape
    if M < 1:
        raise ValueError(f"{op}: expected at least one expert (M >= 1) in mu and lv of shape (M, B, D), got "
                         f"{tuple(mu.shape)}; pass the encoders' outputs stacked along a first dimension of size M")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"{op}: expected mask as an (M, B) bool or float tensor or None, got {type(mask).__name__}")
        if tuple(mask.shape) != (M, B):
            raise ValueError(f"{op}: expected mask of shape (M, B) = {(M, B)}, got {tuple(mask.shape)}")
        if mask.device != mu.device:
            raise ValueError(f"{op}: mask is on {mask.device} but mu is on {mu.device}; move it to {mu.device}")
        if mask.dtype != torch.bool:
            if mask.is_complex():
                raise TypeError(f"{op}: expected a bool or float mask, got {mask.dtype}")
            mask = mask != 0
    return mu, lv, mask
