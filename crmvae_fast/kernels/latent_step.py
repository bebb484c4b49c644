"""Fused latent step of CRMVAE: product of experts, M + 1 reparameterized samples and every KL, in one kernel.

Eager twin: :func:`crmvae_fast.reference.latent_step` (``poe``, ``reparameterize``, ``kl_prior``,
``kl_to_experts``). This file holds, side by side, the Triton kernels, their launchers
(:func:`latent_step_forward`, :func:`latent_step_backward`), the torch custom op ``crmvae_fast::latent_step``
(fake + autograd registered) and the public function :func:`latent_step`.

Math (per sample b and latent dim d; w_m = 1 where modality m is observed, sums over observed m only)::

    T_m = w_m / (exp(lv_m) + 1e-8)     P = sum_m T_m      mu_J = sum_m T_m mu_m / P      lv_J = -log P
    z_J = mu_J + exp(lv_J / 2) eps_J                         z_m = mu_m + exp(lv_m / 2) eps_m   (every m)
    KL_0 = 0.5 sum_d (-lv_J + exp(lv_J) + mu_J^2 - 1)
    KL_m = w_m 0.5 sum_d (lv_m - lv_J + exp(lv_J - lv_m) + (mu_J - mu_m)^2 exp(-lv_m) - 1)

computed in the log domain, so that no observed expert is ever dropped (``exp(lv)`` overflows float32 from
lv = 89, which used to turn the joint into the prior) and no gradient overflows where its value fits::

    a_m = log(exp(lv_m) + 1e-8) = max(lv_m, LF) + log(1 + exp(-|lv_m - LF|))       LF = log(1e-8)
    p = argmin over observed m of lv_m (the most precise expert, the "pivot"; a_p = min a_m as a is increasing)
    t_m = exp(a_p - a_m) in (0, 1], t_p = 1      S = sum_m t_m >= 1        pi_m = t_m / S = T_m / P
    lv_J = a_p - log S                           (= -log P, a log-sum-exp)
    delta = sum_m t_m (mu_m - mu_p) / S          mu_J = mu_p + delta
    diff_m = mu_J - mu_m = (mu_p - mu_m) + delta (exact for the pivot: no cancellation of mu_J - mu_p)
    q_m = diff_m exp(-lv_m / 2)                  f(x) = exp(x) - 1 - x  (a series for |x| < 1/8; the kernels
                                                 form 0.5 f(x) as exp(x - ln 2) - 0.5 - 0.5 x, finite to 89.4)
    KL_0 = 0.5 sum_d (f(lv_J) + mu_J^2)          KL_m = w_m 0.5 sum_d (f(lv_J - lv_m) + q_m^2)

A sample with no observed modality gets mu_J = lv_J = 0 (the prior), and no gradient flows through its joint,
exactly as the reference.

Derivatives (g_X is the upstream gradient of output X; any of the six may be absent, the backward kernel is
specialized on which are there). First the total gradient reaching the joint::

    G_muJ = g_muJ + g_zJ + g_KL0 mu_J + sum_m w_m g_KLm q_m exp(-lv_m / 2)
    G_lvJ = g_lvJ + g_zJ 0.5 exp(lv_J / 2) eps_J + g_KL0 0.5 expm1(lv_J) + sum_m w_m g_KLm 0.5 expm1(lv_J - lv_m)

then through the product of experts (d lv_J / d a_m = pi_m, d mu_J / d a_m = pi_m diff_m,
d a_m / d lv_m = sigma_m = exp(lv_m - a_m), d mu_J / d mu_m = pi_m), the direct KL_m terms and the z_m terms::

    d mu_m = w_m [G_muJ pi_m - g_KLm q_m exp(-lv_m / 2)] + g_zm
    d lv_m = w_m [sigma_m pi_m (G_lvJ + G_muJ diff_m) - g_KLm 0.5 (expm1(lv_J - lv_m) + q_m^2)]
             + g_zm 0.5 exp(lv_m / 2) eps_m

Every factor is bounded (pi, sigma in [0, 1]) or is a value of the output itself, so a gradient is finite
wherever its float64 value fits in float32; two experts at lv = -30 and +30 give mu_J = mu_p + (a 1e-21
correction), so diff_p = delta exactly instead of the rounding error of mu_J - mu_p times exp(30).

Masked entries are removed with selects (``tl.where``) or never loaded, so NaN/inf placeholders in a missing
modality reach no output but its own z_m (as in the reference) and no gradient: the PoE/KL part of their
gradient is exactly 0, and the z_m part ``g_zm 0.5 exp(lv_m / 2) eps_m`` is taken as 0 wherever g_zm == 0 (a
select, not a product, so a zero upstream gradient on a NaN placeholder gives 0 where eager autograd would give
0 * NaN = NaN).

Layout (issue 12): a program owns a [BLOCK_B, BLOCK_D] tile of (sample, latent dim) elements, threads run over
d (contiguous elements per thread, 4 forward and 2 backward: 16- and 8-byte loads in float32, half that in
16-bit dtypes, where D is a multiple of 16 as the JIT then knows the rows are aligned), and the M experts are
a loop unrolled inside each thread (``M`` is a constexpr): every per-(b, d) quantity (a_p, S, mu_J, lv_J, KL_0)
is computed once, there are no padding rows, and the only cross-thread reductions are the KL sums over d, once
per expert per D-chunk (one chunk up to D = 512). The experts are walked in passes (forward: pivot, PoE, outputs;
backward: pivot, PoE, the KL_m part of G, gradients), re-reading mu_m, lv_m from L1/L2 rather than keeping M
tiles live in registers: the re-reads cost load instructions, not DRAM bytes. Small D packs several samples per
program (latent_dim = 10, B = 256: 128 programs of 2 samples x 16 lanes, one warp each).

Noise: either given (``eps_J`` (B, D), ``eps`` (M, B, D)), or drawn in the kernel with Philox (``tl.randn4x``,
four normals per counter) from a seed tensor (int64, shape (1,)) drawn from torch's generator on the device.
Counter layout: with e = b*D + d and k = 0 .. ceil((M + 1) / 4) - 1, counter ``k*B*D + e`` (int64) gives the
four normals of slots 4k .. 4k + 3; slot 0 is eps_J, slot m + 1 is eps_m (so at M = 5 two Philox calls per
(b, d) give 6 of 8 normals). The backward regenerates the same noise from the seed, and only when a gradient
of z_J or z is there.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from .. import _backend, reference
from ..common import VAR_FLOOR, LatentStep, TensorOrList, check_experts, compute_dtype

__all__ = ["latent_step", "latent_step_forward", "latent_step_backward"]

# ---------------------------------------------------------------------------------------------------------------
# Bytes moved per (b, d) element, float32, M modalities (mask, seed and the (M, B) / (B,) KL terms are O(M B),
# negligible next to O(M B D)); :func:`bytes_per_element` computes these for any flags and dtype:
#
#   forward  reads  mu, lv                       8M
#            writes mu_J, lv_J, z_J (12) + z    4M + 12
#            drawn noise: total 12M + 12        (M = 5: 72 B)
#            given noise: + eps_J, eps  4M + 4  -> 16M + 16 (M = 5: 96 B)
#   backward reads  mu, lv (8M), g_z (4M) and g_mu_J, g_lv_J, g_z_J (4 each) where they are there
#            writes d mu, d lv (8M)
#            drawn noise, the CRMVAE loss (g_z_J, g_z, g_KL; no g_mu_J, g_lv_J): 20M + 4   (M = 5: 104 B)
#            drawn noise, all six gradients: 20M + 12                                    (M = 5: 112 B)
#            given noise: + eps_J, eps  4M + 4 (only read when g_z_J or g_z is there)
#
# Absent upstream gradients are neither materialized nor read: the custom op's autograd runs with
# ``ctx.set_materialize_grads(False)`` and the backward kernel is specialized on which gradients are there
# (HAS_G* constexprs), so a training step reads no (B, D) tensor of zeros for the unused d mu_J, d lv_J.
#
# Saved for backward: only the op's inputs (mu, lv, mask, and the seed, 8 bytes, or the given noise), which the
# autograd graph keeps alive anyway, so the fused op adds no activation memory. Recomputed in backward instead
# of saved: a_p, S, mu_J, lv_J (saving them would cost 16 B written + 16 B read per (b, d); the backward already
# reads mu, lv, so recomputing them is free in bytes) and the noise (saving it would cost 4(M + 1) B written +
# 4(M + 1) B read = 48 B at M = 5; Philox regenerates it from the 8-byte seed).
# Each mu_m, lv_m, eps_m and mask entry is read from DRAM once per pass over the tile; the kernels re-read
# mu_m, lv_m of the tile they own 2-4 times (L1/L2 hits: a tile is at most 512 x M x 8 bytes = 20 KiB at M = 5).
# Launches: one forward, one backward, plus the seed draw (torch.randint) with drawn noise: 3 per step.
# ---------------------------------------------------------------------------------------------------------------

assert VAR_FLOOR == 1e-8, "the kernels hard-code common.VAR_FLOOR (1e-8) as _LOG_FLOOR: update them together"
_LOG_FLOOR = tl.constexpr(math.log(VAR_FLOOR))
_VEC = 4  # contiguous elements of d per thread
_MAX_WARPS = 4  # a tile holds at most _VEC * 32 * _MAX_WARPS = 512 elements
H100_SMS = 132
# Registers per thread: the ptx ``.maxnreg`` set to the hardware's 255, so that ptxas never trades registers for
# occupancy. Left to its own heuristic it did, by luck of the version: at M = 5, D = 512 float32 it gave the
# backward 128 registers and 2 spill instructions (an 8-byte stack) on sm_90 under triton 3.8, 143 and none under
# 3.9. Lower caps were tried and are no better: at 128 triton 3.6 spills (3 instructions forward, 14 backward at
# sm_80), at 168 its forward still spills 3 at sm_90 (ptxas fills the cap with hoisted loads). At 255 no kernel
# spills on any triton of the tested range (``tests/test_kernel_report.py`` checks it per version, with the
# registers each one takes). The price is occupancy: 170-215 registers leave 8 warps per SM (one backward
# program of 8 warps, two forward programs of 4), where 128 registers left 16: memory-bound by the kernel
# report's model either way, but not yet measured on a GPU.
_MAXNREG = 255


def _has_maxnreg() -> bool:
    """True when this triton takes a ``maxnreg`` option (its NVIDIA backend's ``CUDAOptions`` has the field)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "maxnreg" in getattr(CUDAOptions, "__dataclass_fields__", {})


def _options(num_warps: int) -> dict:
    """The compile options of a launch: ``num_warps`` and, where this triton has it, the register cap."""
    return dict(num_warps=num_warps, **({"maxnreg": _MAXNREG} if _has_maxnreg() else {}))


def _tiles(B: int, D: int, backward: bool = False) -> tuple[int, int, int]:
    """``(BLOCK_B, BLOCK_D, num_warps)`` for a (., B, D) problem: a D-chunk of up to 512 elements, several
    samples per program when D is small, and at least one program per H100 SM where B allows (never less than
    one full warp of lanes per program). The backward spreads the same tile over twice the warps (2 elements
    per thread): at 4 it needed 244 registers on sm_90 and spilled on sm_80."""
    tile = _VEC * 32 * _MAX_WARPS
    block_d = min(triton.next_power_of_2(max(D, 1)), tile)
    per_sm = max(1, B // H100_SMS)
    block_b = 1 << (min(tile // block_d, per_sm).bit_length() - 1)  # a power of two <= both
    block_b = max(block_b, 32 // block_d)
    block_b = min(block_b, triton.next_power_of_2(max(B, 1)))
    vec = _VEC // 2 if backward else _VEC
    num_warps = max(1, min(_MAX_WARPS * _VEC // vec, block_b * block_d // (32 * vec)))
    return block_b, block_d, num_warps


def bytes_per_element(M: int, element_size: int = 4, *, backward: bool, draw: bool = True,
                      grads: Sequence[str] = ("z_J", "z", "kl_prior", "kl_experts")) -> int:
    """The DRAM bytes per (b, d) element of one launch: the ledger above for M experts, ``element_size``-byte
    inputs and outputs, drawn or given noise and, backward, the upstream gradients that are there (names of
    :class:`LatentStep` fields)."""
    s = element_size
    if not backward:
        return (2 * M + 3 + M) * s + (0 if draw else (M + 1) * s)
    n = (2 * M + 2 * M) * s  # mu, lv read; d mu, d lv written
    n += sum(s for g in ("mu_J", "lv_J", "z_J") if g in grads) + (M * s if "z" in grads else 0)
    if not draw and ("z_J" in grads or "z" in grads):
        n += (M + 1) * s
    return n


@triton.jit
def _log(x, FAST: tl.constexpr):
    """Natural log: ``lg2.approx`` (MUFU, 2 instructions) on a GPU in float32, else ``tl.log`` (libdevice's
    accurate ``logf`` is a ~15-instruction polynomial; the interpreter has no ``fast_logf``)."""
    if FAST:
        r = libdevice.fast_logf(x)
    else:
        r = tl.log(x)
    return r


@triton.jit
def _log_var(lv, FAST: tl.constexpr):
    """``log(exp(lv) + 1e-8)`` without overflow (a softplus about log 1e-8)."""
    return tl.maximum(lv, _LOG_FLOOR) + _log(1.0 + tl.exp(-tl.abs(lv - _LOG_FLOOR)), FAST)


@triton.jit
def _randn4x(seed, off, FAST: tl.constexpr):
    """Four standard normals per Philox counter (``tl.randn4x``'s Box-Muller); FAST uses the MUFU sin, cos
    and log (absolute error ~1e-6 for angles in [0, 2 pi)) instead of libdevice's, whose Payne-Hanek slow
    path for huge angles is never taken here but doubles the code."""
    if FAST:
        u0, u1, u2, u3 = tl.rand4x(seed, off)
        r0 = tl.sqrt(-2.0 * libdevice.fast_logf(tl.maximum(1.0e-7, u0)))
        r2 = tl.sqrt(-2.0 * libdevice.fast_logf(tl.maximum(1.0e-7, u2)))
        t1 = 6.283185307179586 * u1
        t3 = 6.283185307179586 * u3
        n0 = r0 * libdevice.fast_cosf(t1)
        n1 = r0 * libdevice.fast_sinf(t1)
        n2 = r2 * libdevice.fast_cosf(t3)
        n3 = r2 * libdevice.fast_sinf(t3)
    else:
        n0, n1, n2, n3 = tl.randn4x(seed, off)
    return n0, n1, n2, n3


@triton.jit
def _half_expm1(x):
    """``0.5 (exp(x) - 1)`` with no cancellation near 0 (degree-6 series for |x| < 1/8), finite up to
    x = 89.4 (``exp(x - ln 2)``: the half fits in float32 where exp(x) alone would not)."""
    p = x * (0.5 + x * (0.25 + x * (1.0 / 12 + x * (1.0 / 48 + x * (1.0 / 240 + x * (1.0 / 1440))))))
    return tl.where(tl.abs(x) < 0.125, p, tl.exp(x - 0.6931471805599453) - 0.5)


@triton.jit
def _half_exp_m1_mx(x):
    """``0.5 (exp(x) - 1 - x)`` (>= 0) with no cancellation near 0 (series for |x| < 1/8), finite up to 89.4."""
    p = x * x * (0.25 + x * (1.0 / 12 + x * (1.0 / 48 + x * (1.0 / 240 + x * (1.0 / 1440)))))
    return tl.where(tl.abs(x) < 0.125, p, tl.exp(x - 0.6931471805599453) - 0.5 - 0.5 * x)


@triton.jit
def _observed(w_ptr, m, offs_b, okb, ok, stride_wm, stride_wb, HAS_MASK: tl.constexpr):
    """[BLOCK_B, BLOCK_D] bool: entry (b, d) of expert m is in range and observed."""
    obs = ok
    if HAS_MASK:
        w = tl.load(w_ptr + m * stride_wm + offs_b * stride_wb, mask=okb, other=0) != 0
        obs = ok & w[:, None]
    return obs


@triton.jit
def _poe(mu_ptr, lv_ptr, w_ptr, off, ok, offs_b, okb, BD, stride_wm, stride_wb,
         M: tl.constexpr, HAS_MASK: tl.constexpr, CT: tl.constexpr, FAST: tl.constexpr):
    """Log-domain PoE of one tile: ``(mu_p, delta, mu_J, lv_J, a_p, inv_S, any_obs)`` (see the module doc)."""
    lv_min = tl.full(off.shape, float("inf"), CT)
    mu_p = tl.zeros(off.shape, CT)
    for m in tl.static_range(M):  # pass 1: the pivot (most precise observed expert)
        obs = _observed(w_ptr, m, offs_b, okb, ok, stride_wm, stride_wb, HAS_MASK)
        mu = tl.load(mu_ptr + m * BD + off, mask=obs, other=0.0).to(CT)
        lv = tl.load(lv_ptr + m * BD + off, mask=obs, other=float("inf")).to(CT)
        mu_p = tl.where(lv < lv_min, mu, mu_p)
        lv_min = tl.minimum(lv_min, lv)
    any_obs = lv_min < float("inf")
    a_p = _log_var(tl.where(any_obs, lv_min, 0.0), FAST)
    S = tl.zeros(off.shape, CT)
    Sd = tl.zeros(off.shape, CT)
    for m in tl.static_range(M):  # pass 2: sums of t_m = T_m / T_p <= 1
        obs = _observed(w_ptr, m, offs_b, okb, ok, stride_wm, stride_wb, HAS_MASK)
        mu = tl.load(mu_ptr + m * BD + off, mask=obs, other=0.0).to(CT)
        lv = tl.load(lv_ptr + m * BD + off, mask=obs, other=0.0).to(CT)
        t = tl.where(obs, tl.exp(a_p - _log_var(lv, FAST)), 0.0)
        S += t
        Sd += t * (mu - mu_p)
    S = tl.where(any_obs, S, 1.0)
    inv_S = 1.0 / S
    delta = Sd * inv_S
    mu_J = tl.where(any_obs, mu_p + delta, 0.0)
    lv_J = tl.where(any_obs, a_p - _log(S, FAST), 0.0)
    return mu_p, delta, mu_J, lv_J, a_p, inv_S, any_obs


@triton.jit
def _pick(n0, n1, n2, n3, j: tl.constexpr):
    """Normal ``j`` (0..3) of one ``randn4x`` draw."""
    if j == 0:
        r = n0
    elif j == 1:
        r = n1
    elif j == 2:
        r = n2
    else:
        r = n3
    return r


@triton.jit(do_not_specialize=["B"])
def _latent_step_fwd_kernel(
    mu_ptr, lv_ptr, w_ptr, epsJ_ptr, eps_ptr, seed_ptr,
    muJ_ptr, lvJ_ptr, zJ_ptr, z_ptr, kl0_ptr, klm_ptr,
    B, D, stride_wm, stride_wb,
    M: tl.constexpr, HAS_MASK: tl.constexpr, DRAW: tl.constexpr, CT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, FAST: tl.constexpr,
):
    """One program per BLOCK_B samples: loops over D in BLOCK_D chunks, the M experts unrolled per thread."""
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    okb = offs_b < B
    BD = B.to(tl.int64) * D
    seed = 0
    if DRAW:
        seed = tl.load(seed_ptr)
    offs_m = tl.arange(0, BLOCK_M)
    kl0_acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=CT)
    klm_acc = tl.zeros([BLOCK_M, BLOCK_B], dtype=CT)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        ok = okb[:, None] & (offs_d < D)[None, :]
        off = offs_b[:, None] * D + offs_d[None, :]
        mu_p, delta, mu_J, lv_J, a_p, inv_S, any_obs = _poe(mu_ptr, lv_ptr, w_ptr, off, ok, offs_b, okb, BD,
                                                            stride_wm, stride_wb, M, HAS_MASK, CT, FAST)
        if DRAW:
            n0, n1, n2, n3 = _randn4x(seed, off, FAST)
            eps_J = n0.to(CT)
        else:
            eps_J = tl.load(epsJ_ptr + off, mask=ok, other=0.0).to(CT)
        h_J = tl.exp(0.25 * lv_J)  # exp(lv_J / 2) in two halves: z_J fits wherever its value does
        z_J = mu_J + h_J * (h_J * eps_J)
        tl.store(muJ_ptr + off, mu_J.to(muJ_ptr.dtype.element_ty), mask=ok)
        tl.store(lvJ_ptr + off, lv_J.to(lvJ_ptr.dtype.element_ty), mask=ok)
        tl.store(zJ_ptr + off, z_J.to(zJ_ptr.dtype.element_ty), mask=ok)
        kl0_acc += tl.where(ok, _half_exp_m1_mx(lv_J) + 0.5 * mu_J * mu_J, 0.0)
        for m in tl.static_range(M):  # pass 3: z_m and KL_m
            if DRAW:
                if (m + 1) % 4 == 0:
                    n0, n1, n2, n3 = _randn4x(seed, off + ((m + 1) // 4) * BD, FAST)
                eps = _pick(n0, n1, n2, n3, (m + 1) % 4).to(CT)
            else:
                eps = tl.load(eps_ptr + m * BD + off, mask=ok, other=0.0).to(CT)
            obs = _observed(w_ptr, m, offs_b, okb, ok, stride_wm, stride_wb, HAS_MASK)
            mu = tl.load(mu_ptr + m * BD + off, mask=ok, other=0.0).to(CT)
            lv = tl.load(lv_ptr + m * BD + off, mask=ok, other=0.0).to(CT)
            h = tl.exp(0.25 * lv)
            z = mu + h * (h * eps)
            tl.store(z_ptr + m * BD + off, z.to(z_ptr.dtype.element_ty), mask=ok)
            mu_c = tl.where(obs, mu, 0.0)
            lv_c = tl.where(obs, lv, 0.0)
            q = ((mu_p - mu_c) + delta) * tl.exp(-0.5 * lv_c)
            term = tl.where(obs, _half_exp_m1_mx(lv_J - lv_c) + 0.5 * q * q, 0.0)
            klm_acc += tl.where(offs_m[:, None] == m, tl.sum(term, axis=1)[None, :], 0.0)
    tl.store(kl0_ptr + offs_b, tl.sum(kl0_acc, axis=1).to(kl0_ptr.dtype.element_ty), mask=okb)
    tl.store(klm_ptr + offs_m[:, None] * B + offs_b[None, :], klm_acc.to(klm_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & okb[None, :])


@triton.jit(do_not_specialize=["B"])
def _latent_step_bwd_kernel(
    mu_ptr, lv_ptr, w_ptr, epsJ_ptr, eps_ptr, seed_ptr,
    g_muJ_ptr, g_lvJ_ptr, g_zJ_ptr, g_z_ptr, g_kl0_ptr, g_klm_ptr,
    dmu_ptr, dlv_ptr,
    B, D, stride_wm, stride_wb,
    s_muJ_b, s_lvJ_b, s_zJ_b, s_z_m, s_z_b, s_kl0_b, s_klm_m, s_klm_b,
    s_muJ_d: tl.constexpr, s_lvJ_d: tl.constexpr, s_zJ_d: tl.constexpr, s_z_d: tl.constexpr,
    M: tl.constexpr, HAS_MASK: tl.constexpr, DRAW: tl.constexpr,
    HAS_GMUJ: tl.constexpr, HAS_GLVJ: tl.constexpr, HAS_GZJ: tl.constexpr, HAS_GZ: tl.constexpr,
    HAS_GKL0: tl.constexpr, HAS_GKLM: tl.constexpr, CT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, FAST: tl.constexpr,
):
    """One program per BLOCK_B samples; recomputes the PoE (and the noise where a z gradient needs it), writes
    d mu and d lv in one pass over D. Absent upstream gradients are compiled out (HAS_G* flags)."""
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    okb = offs_b < B
    BD = B.to(tl.int64) * D
    seed = 0
    if DRAW:
        seed = tl.load(seed_ptr)
    g_kl0 = tl.zeros([BLOCK_B], dtype=CT)
    if HAS_GKL0:
        g_kl0 = tl.load(g_kl0_ptr + offs_b * s_kl0_b, mask=okb, other=0.0).to(CT)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        offs_d64 = offs_d.to(tl.int64)
        ok = okb[:, None] & (offs_d < D)[None, :]
        off = offs_b[:, None] * D + offs_d[None, :]
        mu_p, delta, mu_J, lv_J, a_p, inv_S, any_obs = _poe(mu_ptr, lv_ptr, w_ptr, off, ok, offs_b, okb, BD,
                                                            stride_wm, stride_wb, M, HAS_MASK, CT, FAST)
        # the total gradient reaching mu_J and lv_J
        G_mu = tl.zeros([BLOCK_B, BLOCK_D], dtype=CT)
        G_lv = tl.zeros([BLOCK_B, BLOCK_D], dtype=CT)
        if HAS_GMUJ:
            G_mu += tl.load(g_muJ_ptr + offs_b[:, None] * s_muJ_b + offs_d64[None, :] * s_muJ_d, mask=ok,
                            other=0.0).to(CT)
        if HAS_GLVJ:
            G_lv += tl.load(g_lvJ_ptr + offs_b[:, None] * s_lvJ_b + offs_d64[None, :] * s_lvJ_d, mask=ok,
                            other=0.0).to(CT)
        if DRAW:
            if HAS_GZJ or HAS_GZ:
                n0, n1, n2, n3 = _randn4x(seed, off, FAST)
        if HAS_GZJ:
            if DRAW:
                eps_J = n0.to(CT)
            else:
                eps_J = tl.load(epsJ_ptr + off, mask=ok, other=0.0).to(CT)
            g_zJ = tl.load(g_zJ_ptr + offs_b[:, None] * s_zJ_b + offs_d64[None, :] * s_zJ_d, mask=ok,
                           other=0.0).to(CT)
            G_mu += g_zJ
            h_J = tl.exp(0.25 * lv_J)
            G_lv += (0.5 * g_zJ) * h_J * (h_J * eps_J)
        if HAS_GKL0:
            G_mu += g_kl0[:, None] * mu_J
            G_lv += g_kl0[:, None] * _half_expm1(lv_J)
        if HAS_GKLM:
            for m in tl.static_range(M):  # pass 3: the KL_m part of G (needs mu_J, lv_J)
                obs = _observed(w_ptr, m, offs_b, okb, ok, stride_wm, stride_wb, HAS_MASK)
                mu = tl.load(mu_ptr + m * BD + off, mask=obs, other=0.0).to(CT)
                lv = tl.load(lv_ptr + m * BD + off, mask=obs, other=0.0).to(CT)
                gk = tl.load(g_klm_ptr + m * s_klm_m + offs_b * s_klm_b, mask=okb, other=0.0).to(CT)[:, None]
                isd = tl.exp(-0.5 * lv)
                q = ((mu_p - mu) + delta) * isd
                G_mu += tl.where(obs, gk * q * isd, 0.0)
                G_lv += tl.where(obs, gk * _half_expm1(lv_J - lv), 0.0)
        G_mu = tl.where(any_obs, G_mu, 0.0)  # no observed modality: the joint is a constant
        G_lv = tl.where(any_obs, G_lv, 0.0)
        for m in tl.static_range(M):  # pass 4: d mu_m, d lv_m
            obs = _observed(w_ptr, m, offs_b, okb, ok, stride_wm, stride_wb, HAS_MASK)
            mu = tl.load(mu_ptr + m * BD + off, mask=ok, other=0.0).to(CT)
            lv = tl.load(lv_ptr + m * BD + off, mask=ok, other=0.0).to(CT)
            mu_c = tl.where(obs, mu, 0.0)
            lv_c = tl.where(obs, lv, 0.0)
            a = _log_var(lv_c, FAST)
            pi = tl.exp(a_p - a) * inv_S
            sig = tl.exp(lv_c - a)
            diff = (mu_p - mu_c) + delta
            dmu = G_mu * pi
            dlv = sig * pi * (G_lv + G_mu * diff)
            if HAS_GKLM:
                gk = tl.load(g_klm_ptr + m * s_klm_m + offs_b * s_klm_b, mask=okb, other=0.0).to(CT)[:, None]
                isd = tl.exp(-0.5 * lv_c)
                q = diff * isd
                dmu -= gk * q * isd
                dlv -= gk * (_half_expm1(lv_J - lv_c) + 0.5 * q * q)
            dmu = tl.where(obs, dmu, 0.0)
            dlv = tl.where(obs, dlv, 0.0)
            if HAS_GZ:  # z_m = mu_m + exp(lv_m / 2) eps_m, every m (a zero upstream gradient gives exactly 0)
                if DRAW:
                    if (m + 1) % 4 == 0:
                        n0, n1, n2, n3 = _randn4x(seed, off + ((m + 1) // 4) * BD, FAST)
                    eps = _pick(n0, n1, n2, n3, (m + 1) % 4).to(CT)
                else:
                    eps = tl.load(eps_ptr + m * BD + off, mask=ok, other=0.0).to(CT)
                g_z = tl.load(g_z_ptr + m * s_z_m + offs_b[:, None] * s_z_b + offs_d64[None, :] * s_z_d, mask=ok,
                              other=0.0).to(CT)
                dmu += g_z
                h = tl.exp(0.25 * lv)
                dlv += tl.where(g_z != 0.0, (0.5 * g_z) * h * (h * eps), 0.0)
            tl.store(dmu_ptr + m * BD + off, dmu.to(dmu_ptr.dtype.element_ty), mask=ok)
            tl.store(dlv_ptr + m * BD + off, dlv.to(dlv_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def _ct(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _fast(dtype: torch.dtype) -> bool:
    """The MUFU log/sin/cos (see :func:`_log`) on a GPU in float32 arithmetic; the interpreter lacks them."""
    return not _backend.INTERPRET and dtype != torch.float64


def _check_experts(M: int) -> None:
    if M < 1:
        raise ValueError("latent_step: expected at least one expert (M >= 1) in mu and lv of shape (M, B, D), got "
                         "M = 0; pass the encoders' outputs stacked along a first dimension of size M >= 1")


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
    _check_experts(M)
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
    block_b, block_d, num_warps = _tiles(B, D)
    with _backend.launch_guard():
        _latent_step_fwd_kernel[(triton.cdiv(B, block_b),)](
            mu, lv, w, eps_J, eps, seed,
            mu_J, lv_J, z_J, z, kl0, klm,
            B, D, swm, swb,
            M=M, HAS_MASK=mask is not None, DRAW=draw, CT=_ct(mu.dtype),
            BLOCK_B=block_b, BLOCK_D=block_d, BLOCK_M=triton.next_power_of_2(M), FAST=_fast(mu.dtype),
            **_options(num_warps),
        )
    return mu_J, lv_J, z_J, z, kl0, klm


def latent_step_backward(
    mu: Tensor, lv: Tensor, mask: Optional[Tensor], eps_J: Optional[Tensor], eps: Optional[Tensor],
    seed: Optional[Tensor],
    g_mu_J: Optional[Tensor], g_lv_J: Optional[Tensor], g_z_J: Optional[Tensor], g_z: Optional[Tensor],
    g_kl0: Optional[Tensor], g_klm: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """One launch: ``(d mu, d lv)`` from the upstream gradients of the six outputs, any of them None (absent:
    compiled out, never read) and any strides (expanded ones too)."""
    mu, lv = mu.contiguous(), lv.contiguous()
    M, B, D = mu.shape
    _check_experts(M)
    dmu = torch.empty_like(mu)
    dlv = torch.empty_like(lv)
    if mu.numel() == 0:
        return dmu, dlv
    w, swm, swb, draw, eps_J, eps, seed = _common(mu, mask, eps_J, eps, seed)
    block_b, block_d, num_warps = _tiles(B, D, backward=True)
    grads = (g_mu_J, g_lv_J, g_z_J, g_z, g_kl0, g_klm)
    ndims = (2, 2, 2, 3, 1, 2)
    ptrs = [mu if g is None else g for g in grads]
    st = [g.stride() if g is not None else (0,) * n for g, n in zip(grads, ndims)]
    # strides along d are constexprs (1, or 0 for an expanded gradient): contiguous loads vectorize
    strides = (st[0][0], st[1][0], st[2][0], st[3][0], st[3][1], st[4][0], st[5][0], st[5][1])
    d_strides = dict(s_muJ_d=st[0][1], s_lvJ_d=st[1][1], s_zJ_d=st[2][1], s_z_d=st[3][2])
    with _backend.launch_guard():
        _latent_step_bwd_kernel[(triton.cdiv(B, block_b),)](
            mu, lv, w, eps_J, eps, seed,
            *ptrs,
            dmu, dlv,
            B, D, swm, swb,
            *strides,
            M=M, HAS_MASK=mask is not None, DRAW=draw,
            HAS_GMUJ=g_mu_J is not None, HAS_GLVJ=g_lv_J is not None, HAS_GZJ=g_z_J is not None,
            HAS_GZ=g_z is not None, HAS_GKL0=g_kl0 is not None, HAS_GKLM=g_klm is not None,
            CT=_ct(mu.dtype), BLOCK_B=block_b, BLOCK_D=block_d, FAST=_fast(mu.dtype), **d_strides,
            **_options(num_warps),
        )
    return dmu, dlv


# The flags of the backward that a CRMVAE training step launches: the loss uses z_J, z and both KLs, never
# mu_J, lv_J (autograd passes None for those).
TRAIN_GRADS = ("z_J", "z", "kl_prior", "kl_experts")
ALL_GRADS = ("mu_J", "lv_J", "z_J", "z", "kl_prior", "kl_experts")
_GRAD_FLAGS = dict(mu_J="HAS_GMUJ", lv_J="HAS_GLVJ", z_J="HAS_GZJ", z="HAS_GZ", kl_prior="HAS_GKL0",
                   kl_experts="HAS_GKLM")


def specializations(M: int, B: int, D: int, dtype: str = "float32", *, mask: bool = True, draw: bool = True,
                    grads: Sequence[str] = TRAIN_GRADS) -> list:
    """The Triton specializations one forward + backward launches at (M, B, D): a list of dicts with ``name``,
    ``kernel``, ``signature``, ``attrs`` (the JIT's divisibility hints), ``constexprs``, ``num_warps``,
    ``options`` (the compile options of the launch: num_warps and the register cap), ``grid``
    (programs), ``elements`` (B*D),
    ``trips`` (iterations of the D loop) and ``bytes`` (DRAM bytes per element by the ledger). Used by
    :func:`compile_configs` and by the kernel report (:mod:`crmvae_fast.kernel_report`)."""
    io = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}[dtype]
    esize = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    kl = ("kl0_ptr", "klm_ptr", "g_kl0_ptr", "g_klm_ptr")
    block_b, block_d, _ = _tiles(B, D)

    def signature(kernel, const):
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

    common = dict(M=M, HAS_MASK=mask, DRAW=draw, CT=tl.float32, BLOCK_B=block_b, BLOCK_D=block_d, FAST=True)
    fwd = dict(common, BLOCK_M=triton.next_power_of_2(M))
    bwd = dict(common, **{flag: g in grads for g, flag in _GRAD_FLAGS.items()})
    bwd.update({n: int(g in grads) for g, n in (("mu_J", "s_muJ_d"), ("lv_J", "s_lvJ_d"), ("z_J", "s_zJ_d"),
                                                ("z", "s_z_d"))})
    tag = f"{dtype},M={M},B={B},D={D}{',mask' if mask else ''}{',draw' if draw else ',eps'}"
    # the integer arguments as the launchers pass them (contiguous mu, lv, mask and gradients; absent ones 0)
    ints = dict(D=D, stride_wm=B if mask else 0, stride_wb=1 if mask else 0, s_zJ_b=D, s_z_m=B * D, s_z_b=D,
                s_kl0_b=1, s_klm_m=B, s_klm_b=1, s_muJ_b=D, s_lvJ_b=D)
    for g, names in (("mu_J", ("s_muJ_b",)), ("lv_J", ("s_lvJ_b",)), ("z_J", ("s_zJ_b",)), ("z", ("s_z_m", "s_z_b")),
                     ("kl_prior", ("s_kl0_b",)), ("kl_experts", ("s_klm_m", "s_klm_b"))):
        if g not in grads:
            ints.update({n: 0 for n in names})

    def attrs(kernel, sig):
        """What the JIT infers at launch: 16-byte aligned pointers (torch's allocations are) and the integer
        arguments divisible by 16 (B is not specialized), as ``tt.divisibility`` hints."""
        return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
                if (sig[n].startswith("*")) or (n in ints and ints[n] % 16 == 0)}

    out = []
    for name, kernel, const, backward in (("_latent_step_fwd_kernel", _latent_step_fwd_kernel, fwd, False),
                                          ("_latent_step_bwd_kernel", _latent_step_bwd_kernel, bwd, True)):
        gtag = "" if not backward else ",g=" + "+".join(g for g in ALL_GRADS if g in grads)
        sig = signature(kernel, const)
        out.append(dict(name=f"{name}[{tag}{gtag}]", kernel=kernel, signature=sig, attrs=attrs(kernel, sig),
                        constexprs=const, num_warps=_tiles(B, D, backward)[2],
                        options=_options(_tiles(B, D, backward)[2]), grid=triton.cdiv(B, block_b),
                        elements=B * D,
                        block=(block_b, block_d), trips=triton.cdiv(D, block_d),
                        bytes=bytes_per_element(M, esize, backward=backward, draw=draw, grads=grads)))
    return out


def compile_configs() -> list:
    """The specializations to build for a GPU without one (``tests/test_kernels_compile.py``):
    ``(name, kernel, signature, constexprs, options)`` (options: the launch's compile options) for the model's
    float32 training step with a mask and drawn noise at M = 5, D = 512 (backward with the loss's gradients), the default latent_dim = 10 at B = 256,
    and a bfloat16 one with given noise, no mask and all six gradients at M = 16, D = 33."""
    specs = (specializations(5, 4096, 512, "float32")
             + specializations(3, 256, 10, "float32")
             + specializations(16, 64, 33, "bfloat16", mask=False, draw=False, grads=ALL_GRADS))
    return [(s["name"], s["kernel"], s["signature"], s["constexprs"], s["options"]) for s in specs]


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
    _check_experts(M)
    ct = compute_dtype(mu.dtype)
    mu_J = mu.new_empty((B, D))
    z = torch.empty_like(mu, memory_format=torch.contiguous_format)
    return mu_J, mu.new_empty((B, D)), mu.new_empty((B, D)), z, mu.new_empty((B,), dtype=ct), mu.new_empty((M, B), dtype=ct)


def _setup_context(ctx, inputs, output):
    mu, lv, mask, eps_J, eps, seed = inputs
    ctx.save_for_backward(mu, lv, mask, eps_J, eps, seed)
    ctx.set_materialize_grads(False)  # absent gradients stay None: the backward kernel compiles them out


def _backward(ctx, g_mu_J, g_lv_J, g_z_J, g_z, g_kl0, g_klm):
    mu, lv, mask, eps_J, eps, seed = ctx.saved_tensors
    if all(g is None for g in (g_mu_J, g_lv_J, g_z_J, g_z, g_kl0, g_klm)):
        return None, None, None, None, None, None
    dmu, dlv = torch.ops.crmvae_fast.latent_step_backward(
        mu, lv, mask, eps_J, eps, seed, g_mu_J, g_lv_J, g_z_J, g_z, g_kl0, g_klm
    )
    return dmu, dlv, None, None, None, None


@torch.library.custom_op("crmvae_fast::latent_step_backward", mutates_args=())
def _latent_step_backward_op(
    mu: Tensor, lv: Tensor, mask: Optional[Tensor], eps_J: Optional[Tensor], eps: Optional[Tensor],
    seed: Optional[Tensor], g_mu_J: Optional[Tensor], g_lv_J: Optional[Tensor], g_z_J: Optional[Tensor],
    g_z: Optional[Tensor], g_kl0: Optional[Tensor], g_klm: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """Backward of ``crmvae_fast::latent_step`` as its own opaque op (so compiled backward graphs keep it
    fused): ``(d mu, d lv)``; an upstream gradient that is None is absent (never read)."""
    return latent_step_backward(mu, lv, mask, eps_J, eps, seed, g_mu_J, g_lv_J, g_z_J, g_z, g_kl0, g_klm)


@_latent_step_backward_op.register_fake
def _(mu, lv, mask, eps_J, eps, seed, g_mu_J, g_lv_J, g_z_J, g_z, g_kl0, g_klm):
    return (torch.empty_like(mu, memory_format=torch.contiguous_format),
            torch.empty_like(lv, memory_format=torch.contiguous_format))


_latent_step_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------

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
    mu, lv, mask = check_experts("latent_step", mu, lv, mask)
    M, B, D = mu.shape
    if (eps_J is None) != (eps is None):
        raise ValueError("latent_step: give both eps_J and eps, or neither (then the noise is drawn)")
    if eps is not None:
        if not (isinstance(eps_J, Tensor) and isinstance(eps, Tensor) and eps_J.is_floating_point()
                and eps.is_floating_point()):
            raise TypeError(f"latent_step: expected eps_J and eps as floating tensors (standard normal noise), got "
                            f"{getattr(eps_J, 'dtype', type(eps_J).__name__)} and "
                            f"{getattr(eps, 'dtype', type(eps).__name__)}")
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
