"""Fused latent step of CRMVAE: product of experts, M + 1 reparameterized samples and every KL, in one kernel.

Eager twin: :func:`crmvae_fast.reference.latent_step` (``poe``, ``reparameterize``, ``kl_prior``,
``kl_to_experts``). This file holds, side by side, the Triton kernels, their launchers
(:func:`latent_step_forward`, :func:`latent_step_backward`), the torch custom op ``crmvae_fast::latent_step``
(fake + autograd registered) and the public function :func:`latent_step`.

Math (per sample b and latent dim d; w_m = 1 where modality m is observed, sums over observed m only)::

    E_m = exp(lv_m)          T_m = w_m / (E_m + 1e-8)       P = sum_m T_m
    mu_J = sum_m T_m mu_m / P                                lv_J = -log P
    z_J = mu_J + exp(lv_J / 2) eps_J                         z_m = mu_m + exp(lv_m / 2) eps_m   (every m)
    KL_0 = 0.5 sum_d (-lv_J + exp(lv_J) + mu_J^2 - 1)
    KL_m = w_m 0.5 sum_d (lv_m - lv_J + exp(lv_J - lv_m) + (mu_J - mu_m)^2 exp(-lv_m) - 1)

A sample with no observed modality (P = 0) gets mu_J = lv_J = 0 (the prior), and no gradient flows through
its joint, exactly as the reference.

Derivatives (g_X is the upstream gradient of output X; all six may be zero). First the total gradient
reaching the joint::

    G_muJ = g_muJ + g_zJ + g_KL0 mu_J + sum_m w_m g_KLm (mu_J - mu_m) exp(-lv_m)
    G_lvJ = g_lvJ + g_zJ 0.5 exp(lv_J / 2) eps_J + g_KL0 0.5 (exp(lv_J) - 1)
            + sum_m w_m g_KLm 0.5 (exp(lv_J - lv_m) - 1)

then through the product of experts (d mu_J / d T_m = (mu_m - mu_J) / P, d lv_J / d T_m = -1 / P,
d T_m / d lv_m = -T_m^2 E_m, d mu_J / d mu_m = T_m / P), the direct KL_m terms and the z_m terms::

    d mu_m = w_m [G_muJ T_m / P - g_KLm (mu_J - mu_m) exp(-lv_m)] + g_zm
    d lv_m = w_m [-(G_muJ (mu_m - mu_J) - G_lvJ) / P * T_m^2 E_m
                  + g_KLm 0.5 (1 - exp(lv_J - lv_m) - (mu_J - mu_m)^2 exp(-lv_m))]
             + g_zm 0.5 exp(lv_m / 2) eps_m

Masked entries are removed with selects (``tl.where``), so NaN/inf placeholders in a missing modality reach no
output but its own z_m (as in the reference) and no gradient: the PoE/KL part of their gradient is exactly 0,
and the z_m part ``g_zm 0.5 exp(lv_m / 2) eps_m`` is taken as 0 wherever g_zm == 0 (a select, not a product,
so a zero upstream gradient on a NaN placeholder gives 0 where eager autograd would give 0 * NaN = NaN).

Noise: either given (``eps_J`` (B, D), ``eps`` (M, B, D)), or drawn in the kernel with Philox from a seed
tensor (int64, shape (1,)) drawn from torch's generator on the device: Philox counter ``b*D + d`` for eps_J
and ``(m + 1)*B*D + b*D + d`` for eps_m (int64). The backward regenerates the same noise from the seed.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _backend, reference
from ..common import VAR_FLOOR, LatentStep, compute_dtype

__all__ = ["latent_step", "latent_step_forward", "latent_step_backward"]

# ---------------------------------------------------------------------------------------------------------------
# Bytes moved per (b, d) element, float32, M modalities (mask, seed and the (M, B) / (B,) KL terms are O(M B),
# negligible next to O(M B D)):
#
#   forward  reads  mu, lv                       8M
#            writes mu_J, lv_J, z_J (12) + z    4M + 12
#            drawn noise: total 12M + 12        (M = 5: 72 B)
#            given noise: + eps_J, eps  4M + 4  -> 16M + 16 (M = 5: 96 B)
#   backward reads  mu, lv (8M), g_mu_J, g_lv_J, g_z_J (12), g_z (4M)
#            writes d mu, d lv (8M)
#            drawn noise: total 20M + 12        (M = 5: 112 B)
#            given noise: + eps_J, eps  4M + 4  -> 24M + 16 (M = 5: 136 B)
#
# Saved for backward: only the op's inputs (mu, lv, mask, and the seed, 8 bytes, or the given noise), which the
# autograd graph keeps alive anyway, so the fused op adds no activation memory. Recomputed in backward instead
# of saved: mu_J, lv_J, P, T_m (saving mu_J, lv_J, P would cost 12 B written + 12 B read per (b, d); the
# backward already reads mu, lv, so recomputing them is free in bytes) and the noise (saving it would cost
# 4(M + 1) B written + 4(M + 1) B read = 48 B at M = 5; Philox regenerates it from the 8-byte seed).
# Each mu_m, lv_m, eps_m and mask entry is read exactly once per pass: one program owns one sample b and holds
# all M modalities of a D-chunk in one [BLOCK_M, BLOCK_D] tile, so no second read is needed.
# One launch forward, one launch backward.
# ---------------------------------------------------------------------------------------------------------------

# One fixed config, no autotuning: a program holds a [BLOCK_M, BLOCK_D] tile of at most _TILE elements with 4
# elements per thread (ptxas for sm_90 at M = 5: 110 registers forward, 128 backward, no spills; 8 elements per
# thread took 190-255 registers and spilled in the backward).
_TILE = 1024
assert VAR_FLOOR == 1e-8, "the kernels hard-code common.VAR_FLOOR (1e-8) in _poe_tile: update them together"
_ELEMS_PER_THREAD = 4


def _blocks(M: int, D: int) -> tuple[int, int, int]:
    """BLOCK_M, BLOCK_D and num_warps for an (M, ., D) problem."""
    block_m = triton.next_power_of_2(M)
    block_d = min(triton.next_power_of_2(max(D, 1)), max(16, _TILE // block_m))
    num_warps = max(1, min(8, block_m * block_d // (32 * _ELEMS_PER_THREAD)))
    return block_m, block_d, num_warps


@triton.jit
def _poe_tile(mu, lv, obs, okd):
    """PoE of one [BLOCK_M, BLOCK_D] tile: cleaned mu/lv, T, E, mu_J, lv_J, 1/P and whether P > 0."""
    mu_c = tl.where(obs, mu, 0.0)
    lv_c = tl.where(obs, lv, 0.0)
    E = tl.exp(lv_c)
    T = tl.where(obs, 1.0 / (E + 1e-8), 0.0)
    P = tl.sum(T, axis=0)
    S = tl.sum(T * mu_c, axis=0)
    okP = (P > 0) & okd
    P_safe = tl.where(okP, P, 1.0)
    inv_P = 1.0 / P_safe
    mu_J = tl.where(okP, S * inv_P, 0.0)
    lv_J = tl.where(okP, -tl.log(P_safe), 0.0)
    return mu_c, lv_c, T, E, mu_J, lv_J, inv_P, okP


@triton.jit
def _noise_tile(epsJ_ptr, eps_ptr, seed, b, offs_d, okd, rows, ok2, BD, D, DRAW: tl.constexpr,
                CT: tl.constexpr):
    """eps_J [BLOCK_D] and eps [BLOCK_M, BLOCK_D]: Philox from the seed, or loaded."""
    if DRAW:
        eps_J = tl.randn(seed, b * D + offs_d).to(CT)
        eps = tl.randn(seed, BD + rows + offs_d[None, :]).to(CT)
    else:
        eps_J = tl.load(epsJ_ptr + b * D + offs_d, mask=okd, other=0.0).to(CT)
        eps = tl.load(eps_ptr + rows + offs_d[None, :], mask=ok2, other=0.0).to(CT)
    return eps_J, eps


@triton.jit(do_not_specialize=["B"])
def _latent_step_fwd_kernel(
    mu_ptr, lv_ptr, w_ptr, epsJ_ptr, eps_ptr, seed_ptr,
    muJ_ptr, lvJ_ptr, zJ_ptr, z_ptr, kl0_ptr, klm_ptr,
    M, B, D, stride_wm, stride_wb,
    HAS_MASK: tl.constexpr, DRAW: tl.constexpr, CT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per sample b: loops over D in BLOCK_D chunks, all M modalities in one tile."""
    b = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    okm = offs_m < M
    BD = B.to(tl.int64) * D
    if HAS_MASK:
        w = tl.load(w_ptr + offs_m.to(tl.int64) * stride_wm + b * stride_wb, mask=okm, other=0) != 0
    else:
        w = okm
    w = w & okm
    rows = offs_m.to(tl.int64)[:, None] * BD + b * D  # [BLOCK_M, 1] start of row (m, b)
    seed = 0
    if DRAW:
        seed = tl.load(seed_ptr)
    kl0_acc = tl.zeros([BLOCK_D], dtype=CT)
    klm_acc = tl.zeros([BLOCK_M], dtype=CT)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        okd = offs_d < D
        ok2 = okm[:, None] & okd[None, :]
        obs = w[:, None] & ok2
        mu = tl.load(mu_ptr + rows + offs_d[None, :], mask=ok2, other=0.0).to(CT)
        lv = tl.load(lv_ptr + rows + offs_d[None, :], mask=ok2, other=0.0).to(CT)
        mu_c, lv_c, T, E, mu_J, lv_J, inv_P, okP = _poe_tile(mu, lv, obs, okd)
        eps_J, eps = _noise_tile(epsJ_ptr, eps_ptr, seed, b, offs_d, okd, rows, ok2, BD, D, DRAW, CT)
        z_J = mu_J + tl.exp(0.5 * lv_J) * eps_J
        z = mu + tl.exp(0.5 * lv) * eps
        tl.store(muJ_ptr + b * D + offs_d, mu_J.to(muJ_ptr.dtype.element_ty), mask=okd)
        tl.store(lvJ_ptr + b * D + offs_d, lv_J.to(lvJ_ptr.dtype.element_ty), mask=okd)
        tl.store(zJ_ptr + b * D + offs_d, z_J.to(zJ_ptr.dtype.element_ty), mask=okd)
        tl.store(z_ptr + rows + offs_d[None, :], z.to(z_ptr.dtype.element_ty), mask=ok2)
        kl0_acc += tl.where(okd, 0.5 * (-lv_J + tl.exp(lv_J) + mu_J * mu_J - 1.0), 0.0)
        diff = mu_J[None, :] - mu_c
        term = 0.5 * (lv_c - lv_J[None, :] + tl.exp(lv_J[None, :] - lv_c) + diff * diff * tl.exp(-lv_c) - 1.0)
        klm_acc += tl.sum(tl.where(obs, term, 0.0), axis=1)
    tl.store(kl0_ptr + b, tl.sum(kl0_acc, axis=0).to(kl0_ptr.dtype.element_ty))
    klm = tl.where(w, klm_acc, 0.0)
    tl.store(klm_ptr + offs_m.to(tl.int64) * B + b, klm.to(klm_ptr.dtype.element_ty), mask=okm)


@triton.jit(do_not_specialize=["B"])
def _latent_step_bwd_kernel(
    mu_ptr, lv_ptr, w_ptr, epsJ_ptr, eps_ptr, seed_ptr,
    g_muJ_ptr, g_lvJ_ptr, g_zJ_ptr, g_z_ptr, g_kl0_ptr, g_klm_ptr,
    dmu_ptr, dlv_ptr,
    M, B, D, stride_wm, stride_wb,
    s_muJ_b, s_muJ_d, s_lvJ_b, s_lvJ_d, s_zJ_b, s_zJ_d,
    s_z_m, s_z_b, s_z_d, s_kl0_b, s_klm_m, s_klm_b,
    HAS_MASK: tl.constexpr, DRAW: tl.constexpr, CT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per sample b; recomputes the PoE and the noise, writes d mu and d lv in one pass."""
    b = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_m64 = offs_m.to(tl.int64)
    okm = offs_m < M
    BD = B.to(tl.int64) * D
    if HAS_MASK:
        w = tl.load(w_ptr + offs_m64 * stride_wm + b * stride_wb, mask=okm, other=0) != 0
    else:
        w = okm
    w = w & okm
    rows = offs_m64[:, None] * BD + b * D
    seed = 0
    if DRAW:
        seed = tl.load(seed_ptr)
    g_kl0 = tl.load(g_kl0_ptr + b * s_kl0_b).to(CT)
    g_klm = tl.load(g_klm_ptr + offs_m64 * s_klm_m + b * s_klm_b, mask=okm, other=0.0).to(CT)
    g_klm = tl.where(w, g_klm, 0.0)[:, None]  # [BLOCK_M, 1]
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        offs_d64 = offs_d.to(tl.int64)
        okd = offs_d < D
        ok2 = okm[:, None] & okd[None, :]
        obs = w[:, None] & ok2
        mu = tl.load(mu_ptr + rows + offs_d[None, :], mask=ok2, other=0.0).to(CT)
        lv = tl.load(lv_ptr + rows + offs_d[None, :], mask=ok2, other=0.0).to(CT)
        mu_c, lv_c, T, E, mu_J, lv_J, inv_P, okP = _poe_tile(mu, lv, obs, okd)
        eps_J, eps = _noise_tile(epsJ_ptr, eps_ptr, seed, b, offs_d, okd, rows, ok2, BD, D, DRAW, CT)
        g_muJ = tl.load(g_muJ_ptr + b * s_muJ_b + offs_d64 * s_muJ_d, mask=okd, other=0.0).to(CT)
        g_lvJ = tl.load(g_lvJ_ptr + b * s_lvJ_b + offs_d64 * s_lvJ_d, mask=okd, other=0.0).to(CT)
        g_zJ = tl.load(g_zJ_ptr + b * s_zJ_b + offs_d64 * s_zJ_d, mask=okd, other=0.0).to(CT)
        g_z = tl.load(g_z_ptr + offs_m64[:, None] * s_z_m + b * s_z_b + offs_d64[None, :] * s_z_d,
                      mask=ok2, other=0.0).to(CT)
        # total gradient reaching mu_J and lv_J
        inv_v = tl.exp(-lv_c)
        diff = mu_J[None, :] - mu_c
        r = tl.exp(lv_J[None, :] - lv_c)
        G_muJ = g_muJ + g_zJ + g_kl0 * mu_J + tl.sum(g_klm * diff * inv_v, axis=0)
        G_lvJ = (g_lvJ + g_zJ * 0.5 * tl.exp(0.5 * lv_J) * eps_J + g_kl0 * 0.5 * (tl.exp(lv_J) - 1.0)
                 + tl.sum(g_klm * 0.5 * (r - 1.0), axis=0))
        G_muJ = tl.where(okP, G_muJ, 0.0)  # no observed modality: the joint is a constant
        G_lvJ = tl.where(okP, G_lvJ, 0.0)
        # through the product of experts and the direct KL_m terms (observed entries only)
        dT = (G_muJ[None, :] * (mu_c - mu_J[None, :]) - G_lvJ[None, :]) * inv_P[None, :]
        dmu = G_muJ[None, :] * T * inv_P[None, :] - g_klm * diff * inv_v
        dlv = -dT * T * (T * E) + g_klm * 0.5 * (1.0 - r - diff * diff * inv_v)
        dmu = tl.where(obs, dmu, 0.0)
        dlv = tl.where(obs, dlv, 0.0)
        # z_m = mu_m + exp(lv_m / 2) eps_m, every m (a zero upstream gradient gives exactly 0)
        dmu += g_z
        dlv += tl.where(g_z != 0.0, g_z * 0.5 * tl.exp(0.5 * lv) * eps, 0.0)
        tl.store(dmu_ptr + rows + offs_d[None, :], dmu.to(dmu_ptr.dtype.element_ty), mask=ok2)
        tl.store(dlv_ptr + rows + offs_d[None, :], dlv.to(dlv_ptr.dtype.element_ty), mask=ok2)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def _ct(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _common(mu: Tensor, mask: Optional[Tensor], eps_J: Optional[Tensor], eps: Optional[Tensor],
            seed: Optional[Tensor]):
    """The mask as bytes (no copy for a bool mask) and its strides, whether to draw the noise, and pointer
    stand-ins for the absent inputs: ``(w, swm, swb, draw, eps_J, eps, seed)``."""
    if mask is None:
        w, swm, swb = mu, 0, 0
    else:
        w = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        swm, swb = w.stride()
    draw = eps is None
    if draw and seed is None:
        raise ValueError("latent_step: give both eps_J and eps, or a seed tensor to draw them from")
    if draw:
        eps_J, eps = mu, mu
    else:
        eps_J, eps, seed = eps_J.contiguous(), eps.contiguous(), mu
    return w, swm, swb, draw, eps_J, eps, seed


def latent_step_forward(
    mu: Tensor, lv: Tensor, mask: Optional[Tensor], eps_J: Optional[Tensor], eps: Optional[Tensor],
    seed: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One launch: ``(mu_J, lv_J, z_J, z, kl_prior, kl_experts)`` from (M, B, D) ``mu``, ``lv``."""
    mu, lv = mu.contiguous(), lv.contiguous()
    M, B, D = mu.shape
    ct = compute_dtype(mu.dtype)
    mu_J = torch.empty((B, D), dtype=mu.dtype, device=mu.device)
    lv_J = torch.empty_like(mu_J)
    z_J = torch.empty_like(mu_J)
    z = torch.empty_like(mu)
    kl0 = torch.empty((B,), dtype=ct, device=mu.device)
    klm = torch.empty((M, B), dtype=ct, device=mu.device)
    if mu.numel() == 0:  # nothing to launch; the KL of an empty sum is 0, the joint of D = 0 is empty
        kl0.zero_(), klm.zero_()
        return mu_J, lv_J, z_J, z, kl0, klm
    w, swm, swb, draw, eps_J, eps, seed = _common(mu, mask, eps_J, eps, seed)
    block_m, block_d, num_warps = _blocks(M, D)
    with _backend.launch_guard():
        _latent_step_fwd_kernel[(B,)](
            mu, lv, w, eps_J, eps, seed,
            mu_J, lv_J, z_J, z, kl0, klm,
            M, B, D, swm, swb,
            HAS_MASK=mask is not None, DRAW=draw, CT=_ct(mu.dtype),
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )
    return mu_J, lv_J, z_J, z, kl0, klm


def latent_step_backward(
    mu: Tensor, lv: Tensor, mask: Optional[Tensor], eps_J: Optional[Tensor], eps: Optional[Tensor],
    seed: Optional[Tensor],
    g_mu_J: Tensor, g_lv_J: Tensor, g_z_J: Tensor, g_z: Tensor, g_kl0: Tensor, g_klm: Tensor,
) -> tuple[Tensor, Tensor]:
    """One launch: ``(d mu, d lv)`` from the gradients of all six outputs (any strides, expanded ones too)."""
    mu, lv = mu.contiguous(), lv.contiguous()
    M, B, D = mu.shape
    dmu = torch.empty_like(mu)
    dlv = torch.empty_like(lv)
    if mu.numel() == 0:
        return dmu, dlv
    w, swm, swb, draw, eps_J, eps, seed = _common(mu, mask, eps_J, eps, seed)
    block_m, block_d, num_warps = _blocks(M, D)
    with _backend.launch_guard():
        _latent_step_bwd_kernel[(B,)](
            mu, lv, w, eps_J, eps, seed,
            g_mu_J, g_lv_J, g_z_J, g_z, g_kl0, g_klm,
            dmu, dlv,
            M, B, D, swm, swb,
            *g_mu_J.stride(), *g_lv_J.stride(), *g_z_J.stride(),
            *g_z.stride(), *g_kl0.stride(), *g_klm.stride(),
            HAS_MASK=mask is not None, DRAW=draw, CT=_ct(mu.dtype),
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )
    return dmu, dlv


def compile_configs() -> list:
    """The specializations to build for a GPU without one (``tests/test_kernels_compile.py``):
    ``(name, kernel, signature, constexprs, num_warps)`` for the model's float32 config with a mask and drawn
    noise at M = 5, D = 512, and a bfloat16 one with given noise and no mask at M = 16, D = 33."""
    const = ("HAS_MASK", "DRAW", "CT", "BLOCK_M", "BLOCK_D")
    kl = ("kl0_ptr", "klm_ptr", "g_kl0_ptr", "g_klm_ptr")

    def signature(kernel, io):
        sig = {}
        for name in kernel.arg_names:
            if name in const:
                sig[name] = "constexpr"
            elif name == "w_ptr":
                sig[name] = "*u8"
            elif name == "seed_ptr":
                sig[name] = "*i64"
            elif name in kl:
                sig[name] = "*fp32"
            elif name.endswith("_ptr"):
                sig[name] = io
            else:
                sig[name] = "i32"
        return sig

    out = []
    for io, flags, (M, D) in (("*fp32", dict(HAS_MASK=True, DRAW=True), (5, 512)),
                              ("*bf16", dict(HAS_MASK=False, DRAW=False), (16, 33))):
        block_m, block_d, num_warps = _blocks(M, D)
        for name, kernel in (("_latent_step_fwd_kernel", _latent_step_fwd_kernel),
                             ("_latent_step_bwd_kernel", _latent_step_bwd_kernel)):
            constexprs = dict(flags, CT=tl.float32, BLOCK_M=block_m, BLOCK_D=block_d)
            out.append((f"{name}[{io[1:]},M={M},D={D}]", kernel, signature(kernel, io), constexprs, num_warps))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Custom op: opaque to torch.compile, fake + autograd registered
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("crmvae_fast::latent_step", mutates_args=())
def _latent_step_op(
    mu: Tensor, lv: Tensor, mask: Optional[Tensor], eps_J: Optional[Tensor], eps: Optional[Tensor],
    seed: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(mu_J, lv_J, z_J, z, kl_prior, kl_experts)``. ``mu``, ``lv`` (M, B, D); ``mask`` (M, B) bool or None;
    noise given as ``eps_J`` (B, D) and ``eps`` (M, B, D), or both None and drawn from ``seed`` (int64, (1,))."""
    return latent_step_forward(mu, lv, mask, eps_J, eps, seed)


@_latent_step_op.register_fake
def _(mu, lv, mask, eps_J, eps, seed):
    M, B, D = mu.shape
    ct = compute_dtype(mu.dtype)
    mu_J = mu.new_empty((B, D))
    z = torch.empty_like(mu, memory_format=torch.contiguous_format)
    return mu_J, mu.new_empty((B, D)), mu.new_empty((B, D)), z, mu.new_empty((B,), dtype=ct), mu.new_empty((M, B), dtype=ct)


def _setup_context(ctx, inputs, output):
    mu, lv, mask, eps_J, eps, seed = inputs
    ctx.save_for_backward(mu, lv, mask, eps_J, eps, seed)


def _backward(ctx, g_mu_J, g_lv_J, g_z_J, g_z, g_kl0, g_klm):
    mu, lv, mask, eps_J, eps, seed = ctx.saved_tensors
    M, B, D = mu.shape
    ct = compute_dtype(mu.dtype)
    # autograd materializes absent gradients as zeros; these stand-ins only cover a caller that passes None
    if g_mu_J is None:
        g_mu_J = mu.new_zeros(()).expand(B, D)
    if g_lv_J is None:
        g_lv_J = mu.new_zeros(()).expand(B, D)
    if g_z_J is None:
        g_z_J = mu.new_zeros(()).expand(B, D)
    if g_z is None:
        g_z = mu.new_zeros(()).expand(M, B, D)
    if g_kl0 is None:
        g_kl0 = mu.new_zeros((), dtype=ct).expand(B)
    if g_klm is None:
        g_klm = mu.new_zeros((), dtype=ct).expand(M, B)
    dmu, dlv = torch.ops.crmvae_fast.latent_step_backward(
        mu, lv, mask, eps_J, eps, seed, g_mu_J, g_lv_J, g_z_J, g_z, g_kl0, g_klm
    )
    return dmu, dlv, None, None, None, None


@torch.library.custom_op("crmvae_fast::latent_step_backward", mutates_args=())
def _latent_step_backward_op(
    mu: Tensor, lv: Tensor, mask: Optional[Tensor], eps_J: Optional[Tensor], eps: Optional[Tensor],
    seed: Optional[Tensor], g_mu_J: Tensor, g_lv_J: Tensor, g_z_J: Tensor, g_z: Tensor, g_kl0: Tensor,
    g_klm: Tensor,
) -> tuple[Tensor, Tensor]:
    """Backward of ``crmvae_fast::latent_step`` as its own opaque op (so compiled backward graphs keep it
    fused): ``(d mu, d lv)``."""
    return latent_step_backward(mu, lv, mask, eps_J, eps, seed, g_mu_J, g_lv_J, g_z_J, g_z, g_kl0, g_klm)


@_latent_step_backward_op.register_fake
def _(mu, lv, mask, eps_J, eps, seed, g_mu_J, g_lv_J, g_z_J, g_z, g_kl0, g_klm):
    return (torch.empty_like(mu, memory_format=torch.contiguous_format),
            torch.empty_like(lv, memory_format=torch.contiguous_format))


_latent_step_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------

TensorOrList = Union[Tensor, Sequence[Tensor]]


def _as_stack(x: TensorOrList, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, Tensor) for t in x):
        shapes = {tuple(t.shape) for t in x}
        if len(shapes) != 1:
            raise ValueError(f"latent_step: every {name}_m must have the same (B, D) shape, got {sorted(shapes)}")
        return torch.stack(list(x))
    raise TypeError(f"latent_step: expected {name} as an (M, B, D) tensor or a non-empty list of (B, D) "
                    f"tensors, got {type(x).__name__}")


def latent_step(
    mu: TensorOrList,
    lv: TensorOrList,
    mask: Optional[Tensor] = None,
    eps_J: Optional[Tensor] = None,
    eps: Optional[Tensor] = None,
) -> LatentStep:
    """The whole latent computation of a CRMVAE step, fused (eager twin: :func:`reference.latent_step`).

    ``mu``, ``lv``: (M, B, D) tensors or lists of M (B, D) tensors. ``mask``: (M, B) bool or float (nonzero =
    observed) or None (all observed). ``eps_J`` (B, D) and ``eps`` (M, B, D): the noise, both or neither;
    when neither, it is drawn in the kernel from a seed drawn from torch's generator on the device (so
    ``torch.manual_seed`` reproduces a run and CUDA-graph replays draw fresh noise).

    Returns a :class:`reference.LatentStep` ``(mu_J, lv_J, z_J, z, kl_prior, kl_experts)``: the first four in
    the input dtype, the KL terms (B,) and (M, B) in float32 (float64 for float64 inputs). Tensors the Triton
    kernels cannot take (CPU without ``TRITON_INTERPRET=1``) go through the eager reference instead.
    """
    mu = _as_stack(mu, "mu")
    lv = _as_stack(lv, "lv")
    if mu.dim() != 3 or lv.shape != mu.shape:
        raise ValueError(f"latent_step: expected mu and lv of the same (M, B, D) shape, got {tuple(mu.shape)} "
                         f"and {tuple(lv.shape)}")
    if mu.dtype != lv.dtype or mu.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"latent_step: expected mu and lv of one floating dtype (float32, float16, bfloat16 or "
                        f"float64), got {mu.dtype} and {lv.dtype}")
    if mu.device != lv.device:
        raise ValueError(f"latent_step: mu is on {mu.device} but lv is on {lv.device}")
    M, B, D = mu.shape
    if mask is not None:
        if tuple(mask.shape) != (M, B):
            raise ValueError(f"latent_step: expected mask of shape (M, B) = {(M, B)}, got {tuple(mask.shape)}")
        if mask.device != mu.device:
            raise ValueError(f"latent_step: mask is on {mask.device} but mu is on {mu.device}")
        if mask.dtype != torch.bool:
            if mask.is_complex():
                raise TypeError(f"latent_step: expected a bool or float mask, got {mask.dtype}")
            mask = mask != 0
    if (eps_J is None) != (eps is None):
        raise ValueError("latent_step: give both eps_J and eps, or neither (then the noise is drawn)")
    if eps is not None:
        if tuple(eps_J.shape) != (B, D) or tuple(eps.shape) != (M, B, D):
            raise ValueError(f"latent_step: expected eps_J of shape {(B, D)} and eps of shape {(M, B, D)}, got "
                             f"{tuple(eps_J.shape)} and {tuple(eps.shape)}")
        if eps_J.device != mu.device or eps.device != mu.device:
            raise ValueError(f"latent_step: eps_J and eps must be on {mu.device}, like mu")

    if not _backend.triton_runs_on(mu.device):
        if eps is None:
            eps_J, eps = reference.draw_noise(mu)
        return reference.latent_step(mu, lv, mask, eps_J, eps)

    seed = None
    if eps is None:
        seed = torch.randint(2**31 - 1, (1,), device=mu.device, dtype=torch.int64)
    return LatentStep(*torch.ops.crmvae_fast.latent_step(mu, lv, mask, eps_J, eps, seed))
