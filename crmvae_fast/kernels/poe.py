"""Product of Gaussian experts in the log domain, masked, with an optional N(0, I) prior expert, over one set of
experts or over S subsets of them in one launch.

Eager twin: :func:`crmvae_fast.reference.poe_experts`. This file holds, side by side, the Triton kernels, their
launchers (:func:`poe_forward`, :func:`poe_backward`), the torch custom ops ``crmvae_fast::poe`` and
``crmvae_fast::poe_backward`` (fake + autograd registered) and the public function :func:`poe`.

Math (per sample b and latent dim d; the set of experts of subset s is ``E_s(b) = {m : subsets[s, m] and
mask[m, b]}``, plus the prior expert (mu = 0, lv = 0) when ``prior_expert``; f is ``var_floor``)::

    l_m   = -log(exp(lv_m) + f)          the log precision, as -logaddexp(lv_m, log f); l_m = -lv_m when f = 0
    L     = logsumexp_{m in E_s} l_m     the log of the joint precision (max-shifted, so no expert underflows)
    a_m   = exp(l_m - L)                 the share of expert m (softmax over E_s)
    mu_J  = sum_{m in E_s} a_m mu_m      (the prior expert adds its share to L, nothing to the mean)
    lv_J  = -L

MultiVae's ``poe(mus, logvars)`` (MVTCAE, MoPoE; T_m = 1 / (exp(lv_m) + 1e-8)) is the default ``f = 1e-8``:
the same numbers, but an expert with exp(lv_m) past float32's range (lv_m > 88) is kept instead of dropped and
the result stays finite. MultiVae's ``stable_poe`` over the experts and N(0, I) (MVAE) is ``prior_expert=True,
f = 0``. An empty set (no observed expert of the subset and no prior expert) gives the prior N(0, I):
``mu_J = lv_J = 0``, and no gradient flows through it.

Derivatives (g_mu, g_lv the upstream gradients of mu_J, lv_J of subset s; dl/dlv = -sigma(lv_m - log f), the
share of exp(lv_m) in exp(lv_m) + f, or -1 when f = 0)::

    d mu_m  = sum_s [m in E_s] g_mu a_m
    d l_m   =        [m in E_s] a_m (g_mu (mu_m - mu_J) - g_lv)
    d lv_m  = sum_s  -sigma(lv_m - log f) d l_m

Masked entries are removed with selects (``tl.where``), so NaN/inf placeholders in a missing expert reach no
output and no gradient (their gradient is exactly 0).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _backend, reference
from ..common import VAR_FLOOR, TensorOrList, check_experts

__all__ = ["poe", "poe_forward", "poe_backward"]

# ---------------------------------------------------------------------------------------------------------------
# Bytes moved per (b, d) element, float32, M experts, S products (S = 1 without subsets; the (M, B) mask and the
# (S, M) subsets are O(M B), negligible next to O(M B D)):
#
#   forward   reads mu, lv 8M      writes mu_J, lv_J 8S                 total 8M + 8S    (M = 5, S = 31: 288 B)
#   backward  reads mu, lv 8M, g_mu, g_lv 8S    writes d mu, d lv 8M    total 16M + 8S   (M = 5, S = 31: 328 B)
#
# Eager MoPoE-style code (one MultiVae ``poe`` per subset) reads each expert once per subset that holds it
# (all non-empty subsets of M = 5: sum_s |s| = M 2^(M-1) = 80 expert reads, 640 B of mu, lv per (b, d), before
# its intermediates); here each mu_m, lv_m and mask entry is read once per pass: one program owns one sample b and one D-chunk, holds all M experts in a [BLOCK_M, BLOCK_D] tile and loops
# over the S subsets in registers. Saved for backward: only the inputs; mu_J, lv_J and L are recomputed (the
# backward reads mu, lv anyway, and saving them would cost 8S B written + 8S B read).
# One launch forward, one launch backward.
# ---------------------------------------------------------------------------------------------------------------

# One fixed config, no autotuning: a program holds a [BLOCK_M, BLOCK_D] tile with BLOCK_D = 32 * num_warps, so
# each thread owns one d and all M experts of it and the sums over experts (max, sum of shares, mean) stay in
# the thread: no shared memory, no barrier, no shuffle inside the subset loop. ptxas for sm_90 at M = 5, D = 512
# (BLOCK_D = 128, 4 warps): 52 registers forward, 116 backward, no spills; at M = 16: 80 and 198, no spills.
# The 4-elements-per-thread layout of latent_step (BLOCK_D = 128 on 8 warps) put the experts on different warps
# here: 12 barriers and shared-memory round trips per forward program, and a static SASS count per element a
# thread owns of 126 (504 / 4) against 100 (800 / 8) with this layout.
_MAX_WARPS = 4


def _blocks(M: int, D: int) -> tuple[int, int, int]:
    """BLOCK_M, BLOCK_D and num_warps for an (M, ., D) problem: one d per thread, every expert in that thread."""
    block_m = triton.next_power_of_2(max(M, 1))
    num_warps = max(1, min(_MAX_WARPS, triton.next_power_of_2(max(D, 1)) // 32))
    return block_m, 32 * num_warps, num_warps


@triton.jit
def _log_precision(lv, log_floor, HAS_FLOOR: tl.constexpr):
    """l = -log(exp(lv) + exp(log_floor)) = -logaddexp(lv, log_floor), and dl/dlv = -sigmoid(lv - log_floor)."""
    if HAS_FLOOR:
        t = lv - log_floor
        e = tl.exp(-tl.abs(t))  # in (0, 1]: no overflow at any lv
        ell = -(tl.maximum(lv, log_floor) + tl.log(1.0 + e))
        dl = -tl.where(t > 0, 1.0 / (1.0 + e), e / (1.0 + e))
    else:
        ell = -lv
        dl = tl.full(lv.shape, -1.0, lv.dtype)
    return ell, dl


@triton.jit
def _product(ell, mu, sel, prior_ell, PRIOR: tl.constexpr):
    """The product over the selected rows of one tile: (share a [BLOCK_M, BLOCK_D], mu_J, lv_J, ok [BLOCK_D])."""
    ell_s = tl.where(sel, ell, float("-inf"))
    mx = tl.max(ell_s, axis=0)
    if PRIOR:
        mx = tl.maximum(mx, prior_ell)
    ok = mx > float("-inf")
    mx = tl.where(ok, mx, 0.0)
    p = tl.where(sel, tl.exp(ell_s - mx[None, :]), 0.0)
    tot = tl.sum(p, axis=0)
    if PRIOR:
        tot += tl.exp(prior_ell - mx)
    tot = tl.where(ok, tot, 1.0)
    inv = 1.0 / tot
    a = p * inv[None, :]
    mu_J = tl.where(ok, tl.sum(tl.where(sel, a * mu, 0.0), axis=0), 0.0)
    lv_J = tl.where(ok, -(mx + tl.log(tot)), 0.0)
    return a, mu_J, lv_J, ok


@triton.jit
def _load_experts(mu_ptr, lv_ptr, w_ptr, M, B, D, stride_wm, stride_wb, HAS_MASK: tl.constexpr, CT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b, chunk)'s tile: its offsets and masks, and the M experts of the chunk, masked entries zeroed
    by a select (placeholders never reach the math): ``(b, offs_d, okd, offs_m64, okm, BD, ok2, obs, offs, mu,
    lv)``."""
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    okd = offs_d < D
    offs_m = tl.arange(0, BLOCK_M)
    offs_m64 = offs_m.to(tl.int64)
    okm = offs_m < M
    BD = B.to(tl.int64) * D
    if HAS_MASK:
        w = tl.load(w_ptr + offs_m64 * stride_wm + b * stride_wb, mask=okm, other=0) != 0
    else:
        w = okm
    w = w & okm
    ok2 = okm[:, None] & okd[None, :]
    obs = w[:, None] & ok2
    offs = offs_m64[:, None] * BD + b * D + offs_d[None, :]
    mu = tl.load(mu_ptr + offs, mask=ok2, other=0.0).to(CT)
    lv = tl.load(lv_ptr + offs, mask=ok2, other=0.0).to(CT)
    return b, offs_d, okd, offs_m64, okm, BD, ok2, obs, offs, tl.where(obs, mu, 0.0), tl.where(obs, lv, 0.0)


@triton.jit(do_not_specialize=["B", "S"])
def _poe_fwd_kernel(
    mu_ptr, lv_ptr, w_ptr, sub_ptr, muJ_ptr, lvJ_ptr,
    M, B, D, S, stride_wm, stride_wb, stride_ss, stride_sm, log_floor, prior_ell,
    HAS_MASK: tl.constexpr, HAS_SUBSETS: tl.constexpr, HAS_FLOOR: tl.constexpr, PRIOR: tl.constexpr,
    CT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (b, chunk): loads the M experts of one D-chunk once, writes the S products of that chunk."""
    b, offs_d, okd, offs_m64, okm, BD, ok2, obs, offs, mu, lv = _load_experts(
        mu_ptr, lv_ptr, w_ptr, M, B, D, stride_wm, stride_wb, HAS_MASK, CT, BLOCK_M, BLOCK_D)
    ell, dl = _log_precision(lv, log_floor, HAS_FLOOR)
    pl = prior_ell
    out = b * D + offs_d
    for s in range(0, S):
        if HAS_SUBSETS:
            ins = tl.load(sub_ptr + s * stride_ss + offs_m64 * stride_sm, mask=okm, other=0) != 0
            sel = obs & ins[:, None]
        else:
            sel = obs
        a, mu_J, lv_J, ok = _product(ell, mu, sel, pl, PRIOR)
        tl.store(muJ_ptr + s * BD + out, mu_J.to(muJ_ptr.dtype.element_ty), mask=okd)
        tl.store(lvJ_ptr + s * BD + out, lv_J.to(lvJ_ptr.dtype.element_ty), mask=okd)


@triton.jit(do_not_specialize=["B", "S"])
def _poe_bwd_kernel(
    mu_ptr, lv_ptr, w_ptr, sub_ptr, g_mu_ptr, g_lv_ptr, dmu_ptr, dlv_ptr,
    M, B, D, S, stride_wm, stride_wb, stride_ss, stride_sm,
    s_gm_s, s_gm_b, s_gm_d, s_gl_s, s_gl_b, s_gl_d, log_floor, prior_ell,
    HAS_MASK: tl.constexpr, HAS_SUBSETS: tl.constexpr, HAS_FLOOR: tl.constexpr, PRIOR: tl.constexpr,
    CT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (b, chunk): recomputes each of the S products and sums their gradients into d mu, d lv."""
    b, offs_d, okd, offs_m64, okm, BD, ok2, obs, offs, mu, lv = _load_experts(
        mu_ptr, lv_ptr, w_ptr, M, B, D, stride_wm, stride_wb, HAS_MASK, CT, BLOCK_M, BLOCK_D)
    offs_d64 = offs_d.to(tl.int64)
    ell, dl = _log_precision(lv, log_floor, HAS_FLOOR)
    pl = prior_ell
    dmu = tl.zeros([BLOCK_M, BLOCK_D], dtype=CT)
    dell = tl.zeros([BLOCK_M, BLOCK_D], dtype=CT)
    for s in range(0, S):
        if HAS_SUBSETS:
            ins = tl.load(sub_ptr + s * stride_ss + offs_m64 * stride_sm, mask=okm, other=0) != 0
            sel = obs & ins[:, None]
        else:
            sel = obs
        a, mu_J, lv_J, ok = _product(ell, mu, sel, pl, PRIOR)
        s64 = b * 0 + s  # int64 (b is), also under the interpreter where s is a Python int
        g_mu = tl.load(g_mu_ptr + s64 * s_gm_s + b * s_gm_b + offs_d64 * s_gm_d, mask=okd, other=0.0).to(CT)
        g_lv = tl.load(g_lv_ptr + s64 * s_gl_s + b * s_gl_b + offs_d64 * s_gl_d, mask=okd, other=0.0).to(CT)
        g_mu = tl.where(ok, g_mu, 0.0)  # an empty product is a constant
        g_lv = tl.where(ok, g_lv, 0.0)
        dmu += tl.where(sel, a * g_mu[None, :], 0.0)
        dell += tl.where(sel, a * (g_mu[None, :] * (mu - mu_J[None, :]) - g_lv[None, :]), 0.0)
    dlv = tl.where(obs, dl * dell, 0.0)
    dmu = tl.where(obs, dmu, 0.0)
    tl.store(dmu_ptr + offs, dmu.to(dmu_ptr.dtype.element_ty), mask=ok2)
    tl.store(dlv_ptr + offs, dlv.to(dlv_ptr.dtype.element_ty), mask=ok2)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def _ct(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _scalars(var_floor: float, prior_expert: bool) -> tuple[bool, float, float]:
    """``(has_floor, log_floor, prior_ell)``: the floor's log and the prior expert's log precision -log(1 + f)."""
    has_floor = var_floor > 0
    return has_floor, (math.log(var_floor) if has_floor else 0.0), -math.log1p(var_floor)


def _flags(mu: Tensor, mask: Optional[Tensor], subsets: Optional[Tensor]):
    """The mask and subsets as bytes (no copy for bool) and their strides, with stand-ins when absent."""
    if mask is None:
        w, swm, swb = mu, 0, 0
    else:
        w = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        swm, swb = w.stride()
    if subsets is None:
        sub, sss, ssm, S = mu, 0, 0, 1
    else:
        sub = subsets.view(torch.uint8) if subsets.dtype == torch.bool else subsets
        (sss, ssm), S = sub.stride(), sub.shape[0]
    return w, swm, swb, sub, sss, ssm, S


def _out_shape(mu: Tensor, subsets: Optional[Tensor]) -> tuple[int, ...]:
    M, B, D = mu.shape
    return (B, D) if subsets is None else (subsets.shape[0], B, D)


def poe_forward(mu: Tensor, lv: Tensor, mask: Optional[Tensor], subsets: Optional[Tensor], prior_expert: bool,
                var_floor: float) -> tuple[Tensor, Tensor]:
    """One launch: ``(mu_J, lv_J)``, (B, D) each, or (S, B, D) with ``subsets``, from (M, B, D) ``mu``, ``lv``."""
    mu, lv = mu.contiguous(), lv.contiguous()
    M, B, D = mu.shape
    mu_J = torch.empty(_out_shape(mu, subsets), dtype=mu.dtype, device=mu.device)
    lv_J = torch.empty_like(mu_J)
    if mu_J.numel() == 0:
        return mu_J, lv_J
    if M == 0:  # no expert: the prior expert alone, N(0, 1 + f), or the empty product, N(0, I)
        mu_J.zero_()
        lv_J.fill_(math.log1p(var_floor) if prior_expert else 0.0)
        return mu_J, lv_J
    w, swm, swb, sub, sss, ssm, S = _flags(mu, mask, subsets)
    has_floor, log_floor, prior_ell = _scalars(var_floor, prior_expert)
    block_m, block_d, num_warps = _blocks(M, D)
    with _backend.launch_guard():
        _poe_fwd_kernel[(B, triton.cdiv(D, block_d))](
            mu, lv, w, sub, mu_J, lv_J,
            M, B, D, S, swm, swb, sss, ssm, log_floor, prior_ell,
            HAS_MASK=mask is not None, HAS_SUBSETS=subsets is not None, HAS_FLOOR=has_floor,
            PRIOR=bool(prior_expert), CT=_ct(mu.dtype), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )
    return mu_J, lv_J


def _strides3(g: Tensor) -> tuple[int, int, int]:
    return (0, *g.stride()) if g.dim() == 2 else tuple(g.stride())


def poe_backward(mu: Tensor, lv: Tensor, mask: Optional[Tensor], subsets: Optional[Tensor], prior_expert: bool,
                 var_floor: float, g_mu_J: Tensor, g_lv_J: Tensor) -> tuple[Tensor, Tensor]:
    """One launch: ``(d mu, d lv)``, (M, B, D), from the gradients of ``mu_J`` and ``lv_J`` (any strides)."""
    mu, lv = mu.contiguous(), lv.contiguous()
    M, B, D = mu.shape
    dmu = torch.empty_like(mu)
    dlv = torch.empty_like(lv)
    if mu.numel() == 0:
        return dmu, dlv
    w, swm, swb, sub, sss, ssm, S = _flags(mu, mask, subsets)
    if S == 0:
        return dmu.zero_(), dlv.zero_()
    has_floor, log_floor, prior_ell = _scalars(var_floor, prior_expert)
    block_m, block_d, num_warps = _blocks(M, D)
    with _backend.launch_guard():
        _poe_bwd_kernel[(B, triton.cdiv(D, block_d))](
            mu, lv, w, sub, g_mu_J, g_lv_J, dmu, dlv,
            M, B, D, S, swm, swb, sss, ssm,
            *_strides3(g_mu_J), *_strides3(g_lv_J), log_floor, prior_ell,
            HAS_MASK=mask is not None, HAS_SUBSETS=subsets is not None, HAS_FLOOR=has_floor,
            PRIOR=bool(prior_expert), CT=_ct(mu.dtype), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
        )
    return dmu, dlv


def compile_configs() -> list:
    """The specializations to build for a GPU without one (``tests/test_kernels_compile.py``):
    ``(name, kernel, signature, constexprs, options)`` (options: the launch's compile options) for MoPoE's case (float32, mask, subsets, f = 1e-8,
    M = 5, D = 512) and MVAE's (bfloat16, no mask, no subsets, the prior expert, f = 0, M = 3, D = 33)."""
    const = ("HAS_MASK", "HAS_SUBSETS", "HAS_FLOOR", "PRIOR", "CT", "BLOCK_M", "BLOCK_D")

    def signature(kernel, io):
        sig = {}
        for name in kernel.arg_names:
            if name in const:
                sig[name] = "constexpr"
            elif name in ("w_ptr", "sub_ptr"):
                sig[name] = "*u8"
            elif name.endswith("_ptr"):
                sig[name] = io
            elif name in ("log_floor", "prior_ell"):
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        return sig

    out = []
    for io, flags, (M, D) in (
        ("*fp32", dict(HAS_MASK=True, HAS_SUBSETS=True, HAS_FLOOR=True, PRIOR=False), (5, 512)),
        ("*bf16", dict(HAS_MASK=False, HAS_SUBSETS=False, HAS_FLOOR=False, PRIOR=True), (3, 33)),
    ):
        block_m, block_d, num_warps = _blocks(M, D)
        for name, kernel in (("_poe_fwd_kernel", _poe_fwd_kernel), ("_poe_bwd_kernel", _poe_bwd_kernel)):
            constexprs = dict(flags, CT=tl.float32, BLOCK_M=block_m, BLOCK_D=block_d)
            out.append((f"{name}[{io[1:]},M={M},D={D}]", kernel, signature(kernel, io), constexprs,
                        {"num_warps": num_warps}))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, fake + autograd registered
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("crmvae_fast::poe", mutates_args=())
def _poe_op(mu: Tensor, lv: Tensor, mask: Optional[Tensor], subsets: Optional[Tensor], prior_expert: bool,
            var_floor: float) -> tuple[Tensor, Tensor]:
    """``(mu_J, lv_J)``. ``mu``, ``lv`` (M, B, D); ``mask`` (M, B) bool or None; ``subsets`` (S, M) bool or None
    (then the outputs are (B, D), else (S, B, D))."""
    return poe_forward(mu, lv, mask, subsets, prior_expert, var_floor)


@_poe_op.register_fake
def _(mu, lv, mask, subsets, prior_expert, var_floor):
    shape = _out_shape(mu, subsets)
    return mu.new_empty(shape), mu.new_empty(shape)


def _setup_context(ctx, inputs, output):
    mu, lv, mask, subsets, prior_expert, var_floor = inputs
    ctx.save_for_backward(mu, lv, mask, subsets)
    ctx.prior_expert, ctx.var_floor = prior_expert, var_floor


def _backward(ctx, g_mu_J, g_lv_J):
    mu, lv, mask, subsets = ctx.saved_tensors
    shape = _out_shape(mu, subsets)
    # autograd materializes absent gradients as zeros; these stand-ins only cover a caller that passes None
    if g_mu_J is None:
        g_mu_J = mu.new_zeros(()).expand(shape)
    if g_lv_J is None:
        g_lv_J = mu.new_zeros(()).expand(shape)
    dmu, dlv = torch.ops.crmvae_fast.poe_backward(mu, lv, mask, subsets, ctx.prior_expert, ctx.var_floor,
                                                  g_mu_J, g_lv_J)
    return dmu, dlv, None, None, None, None


@torch.library.custom_op("crmvae_fast::poe_backward", mutates_args=())
def _poe_backward_op(mu: Tensor, lv: Tensor, mask: Optional[Tensor], subsets: Optional[Tensor],
                     prior_expert: bool, var_floor: float, g_mu_J: Tensor, g_lv_J: Tensor) -> tuple[Tensor, Tensor]:
    """Backward of ``crmvae_fast::poe`` as its own opaque op (so compiled backward graphs keep it fused)."""
    return poe_backward(mu, lv, mask, subsets, prior_expert, var_floor, g_mu_J, g_lv_J)


@_poe_backward_op.register_fake
def _(mu, lv, mask, subsets, prior_expert, var_floor, g_mu_J, g_lv_J):
    return (torch.empty_like(mu, memory_format=torch.contiguous_format),
            torch.empty_like(lv, memory_format=torch.contiguous_format))


_poe_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------

def poe(
    mu: TensorOrList,
    lv: TensorOrList,
    mask: Optional[Tensor] = None,
    *,
    prior_expert: bool = False,
    var_floor: float = VAR_FLOOR,
    subsets: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Product of Gaussian experts, log domain, fused forward and backward (eager twin:
    :func:`reference.poe_experts`).

    ``mu``, ``lv``: (M, B, D) tensors or lists of M (B, D) tensors (means and log-variances of the experts).
    ``mask``: (M, B) bool or float (nonzero = observed) or None; a masked expert is left out as if absent, and
    its entries may hold anything (NaN included). ``prior_expert``: add the N(0, I) expert. ``var_floor``: f in
    the expert precision 1 / (exp(lv) + f), at least 0. ``subsets``: (S, M) bool or None; row s selects the
    experts of product s, and all S products come from one launch.

    The defaults give MultiVae's ``poe`` (MVTCAE, MoPoE); ``prior_expert=True, var_floor=0`` gives its
    ``stable_poe`` with the N(0, I) expert (MVAE). Returns ``(mu_J, lv_J)``: (B, D) each, or (S, B, D) with
    ``subsets``, in the input dtype (arithmetic in float32, float64 for float64). An empty product (no observed
    expert selected and no prior expert) is N(0, I): ``mu_J = lv_J = 0``. Tensors the Triton kernels cannot take
    (CPU without ``TRITON_INTERPRET=1``) go through the eager twin instead.
    """
    mu, lv, mask = check_experts("poe", mu, lv, mask)
    M, B, D = mu.shape
    if subsets is not None:
        if not isinstance(subsets, Tensor):
            raise TypeError(f"poe: expected subsets as an (S, M) bool tensor or None, got {type(subsets).__name__}")
        if subsets.dim() != 2 or subsets.shape[1] != M:
            raise ValueError(f"poe: expected subsets of shape (S, M) with M = {M} (one row of flags per product), "
                             f"got {tuple(subsets.shape)}")
        if subsets.device != mu.device:
            raise ValueError(f"poe: subsets is on {subsets.device} but mu is on {mu.device}; move it to "
                             f"{mu.device}")
        if subsets.dtype != torch.bool:
            if subsets.is_complex():
                raise TypeError(f"poe: expected bool subsets, got {subsets.dtype}")
            subsets = subsets != 0
    if isinstance(var_floor, bool) or not isinstance(var_floor, numbers.Real):
        raise TypeError(f"poe: expected var_floor as a number >= 0, got {var_floor!r}")
    var_floor = float(var_floor)
    if not (math.isfinite(var_floor) and var_floor >= 0):
        raise ValueError(f"poe: expected a finite var_floor >= 0, got {var_floor}")
    if not (isinstance(prior_expert, numbers.Integral) or type(prior_expert).__name__ in ("bool", "bool_")) or \
            isinstance(prior_expert, Tensor) or prior_expert not in (0, 1):
        raise TypeError(f"poe: expected prior_expert as a bool, got {prior_expert!r}")
    prior_expert = bool(prior_expert)

    if not _backend.triton_runs_on(mu.device):
        return reference.poe_experts(mu, lv, mask, prior_expert=prior_expert, var_floor=var_floor,
                                     subsets=subsets)
    return tuple(torch.ops.crmvae_fast.poe(mu, lv, mask, subsets, prior_expert, var_floor))
