"""Fused decoder likelihood: ``-sum_features log p(x | recon) * rescale``, masked by a select, in one pass.

Eager twin: :func:`crmvae_fast.reference.neg_log_likelihood` (MultiVae's ``recon_log_probs``, then a sum and a
select). This file holds, side by side, the Triton kernels, their launchers (:func:`likelihood_forward`,
:func:`likelihood_backward`), the torch custom ops ``crmvae_fast::likelihood`` and
``crmvae_fast::likelihood_backward`` (fake + autograd registered) and the public function :func:`likelihood`.

Rows: ``recon`` is (R, *event) and ``target`` (N, *event) with R a multiple of N; recon row r is scored against
target row ``t(r) = (r // inner) % N``. ``inner = 1`` covers the training step, where the decoder ran once on
``[z_J; z_m]`` (2B rows against B targets); ``inner = k`` covers the joint NLL, where the k samples of a point
are adjacent (n*k rows against n targets). ``mask`` (N,) removes target rows with a select, so NaN or inf
placeholders in a missing modality reach neither the output nor the gradient.

Per element (y = recon, x = target, s = ``scale``; the features of a row are seen as G groups of C classes,
C = the last event dim for ``categorical`` and 1 otherwise)::

    normal       log p = -(x - y)^2 / (2 s^2) - log s - log sqrt(2 pi)     d/dy = (x - y) / s^2
    laplace      log p = -|x - y| / s - log(2 s)                           d/dy = sign(x - y) / s
    bernoulli    log p = x y - max(y, 0) - log(1 + exp(-|y|))   (logits)   d/dy = x - sigmoid(y)
    categorical  log p = x * log_softmax(y + 1e-6) over C       (MultiVae)  d/dy = x - softmax(y) * sum_C x

    out[r] = where(mask[t(r)], -rescale * sum_features log p, 0)            (float32; float64 for float64)
    d recon[r] = where(mask[t(r)], -rescale * g[r] * d log p / dy, 0)     (recon's dtype)

``target`` gets a gradient when it requires one (data that requires grad, as on the eager path), computed in
the autograd wrapper with torch ops from ``d recon`` (normal, laplace) or from recon (bernoulli, categorical).

Bytes per recon element (float32): forward reads recon and target (8 B; the target row is re-read from cache
when rows share it), writes 4 B per row; backward reads recon and target (8 B) and writes d recon (4 B).
Nothing is saved for backward but the op's inputs. One launch forward, one launch backward, per modality.
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
from ..common import compute_dtype
from ..inputs import as_count

__all__ = ["likelihood", "likelihood_forward", "likelihood_backward", "KINDS"]

#: The decoder distributions the kernels compute, with the integer the kernels take.
KINDS = {"normal": 0, "laplace": 1, "bernoulli": 2, "categorical": 3}
#: MultiVae's ``cross_entropy`` adds this to the logits before the log-softmax.
CATEGORICAL_EPS = 1e-6

# A program holds a [BLOCK_G, BLOCK_C] tile of at most _TILE elements (4 per thread).
_TILE = 1024
_ELEMS_PER_THREAD = 4


def _blocks(G: int, C: int) -> tuple[int, int, int]:
    """BLOCK_G, BLOCK_C and num_warps for rows of G groups of C classes."""
    block_c = triton.next_power_of_2(max(C, 1))
    block_g = max(1, min(triton.next_power_of_2(max(G, 1)), _TILE // block_c))
    num_warps = max(1, min(8, block_g * block_c // (32 * _ELEMS_PER_THREAD)))
    return block_g, block_c, num_warps


@triton.jit
def _tile_log_prob(y, x, ok, okg, scale, log_norm, KIND: tl.constexpr, EPS: tl.constexpr):
    """log p(x | y) of a [BLOCK_G, BLOCK_C] tile (garbage where ``ok`` is False: the caller selects)."""
    if KIND == 0:  # normal
        d = x - y
        lp = -(d * d) / (2.0 * scale * scale) - log_norm
    elif KIND == 1:  # laplace
        lp = -tl.abs(x - y) / scale - log_norm
    elif KIND == 2:  # bernoulli on logits
        lp = x * y - tl.maximum(y, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(y)))
    else:  # categorical: x * log_softmax(y + eps) along the classes
        ye = tl.where(ok, y + EPS, float("-inf"))
        mx = tl.where(okg, tl.max(ye, axis=1), 0.0)
        se = tl.sum(tl.where(ok, tl.exp(ye - mx[:, None]), 0.0), axis=1)
        lse = mx + tl.log(tl.where(okg, se, 1.0))
        lp = x * (y + EPS - lse[:, None])
    return lp


@triton.jit
def _tile_dlog_prob(y, x, ok, okg, scale, KIND: tl.constexpr, EPS: tl.constexpr):
    """d log p(x | y) / d y of a [BLOCK_G, BLOCK_C] tile."""
    if KIND == 0:
        g = (x - y) / (scale * scale)
    elif KIND == 1:
        d = x - y
        g = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)) / scale
    elif KIND == 2:
        g = x - 1.0 / (1.0 + tl.exp(-y))
    else:
        ye = tl.where(ok, y + EPS, float("-inf"))
        mx = tl.where(okg, tl.max(ye, axis=1), 0.0)
        e = tl.where(ok, tl.exp(ye - mx[:, None]), 0.0)
        se = tl.where(okg, tl.sum(e, axis=1), 1.0)
        sx = tl.sum(tl.where(ok, x, 0.0), axis=1)
        g = x - e / se[:, None] * sx[:, None]
    return g


@triton.jit(do_not_specialize=["N", "INNER"])
def _likelihood_fwd_kernel(
    recon_ptr, target_ptr, w_ptr, out_ptr,
    G, C, N, INNER, scale, log_norm, rescale,
    KIND: tl.constexpr, HAS_MASK: tl.constexpr, CT: tl.constexpr, EPS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per recon row r: loops over its G groups in BLOCK_G chunks."""
    r = tl.program_id(0).to(tl.int64)
    t = (r // INNER) % N
    F = G.to(tl.int64) * C
    offs_c = tl.arange(0, BLOCK_C)
    okc = offs_c < C
    acc = tl.zeros([BLOCK_G, BLOCK_C], dtype=CT)
    for g0 in range(0, G, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        okg = offs_g < G
        ok = okg[:, None] & okc[None, :]
        offs = offs_g.to(tl.int64)[:, None] * C + offs_c[None, :]
        y = tl.load(recon_ptr + r * F + offs, mask=ok, other=0.0).to(CT)
        x = tl.load(target_ptr + t * F + offs, mask=ok, other=0.0).to(CT)
        lp = _tile_log_prob(y, x, ok, okg, scale, log_norm, KIND, EPS)
        acc += tl.where(ok, lp, 0.0)
    total = -tl.sum(tl.sum(acc, axis=1), axis=0) * rescale
    if HAS_MASK:
        total = tl.where(tl.load(w_ptr + t) != 0, total, 0.0)
    tl.store(out_ptr + r, total.to(out_ptr.dtype.element_ty))


@triton.jit(do_not_specialize=["N", "INNER"])
def _likelihood_bwd_kernel(
    recon_ptr, target_ptr, w_ptr, g_ptr, drecon_ptr,
    G, C, N, INNER, stride_g, scale, rescale,
    KIND: tl.constexpr, HAS_MASK: tl.constexpr, CT: tl.constexpr, EPS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per recon row r: d recon[r] = -rescale g[r] d log p / d recon, zero for masked rows."""
    r = tl.program_id(0).to(tl.int64)
    t = (r // INNER) % N
    F = G.to(tl.int64) * C
    coef = -rescale * tl.load(g_ptr + r * stride_g).to(CT)
    keep = True
    if HAS_MASK:
        keep = tl.load(w_ptr + t) != 0
    offs_c = tl.arange(0, BLOCK_C)
    okc = offs_c < C
    for g0 in range(0, G, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        okg = offs_g < G
        ok = okg[:, None] & okc[None, :]
        offs = offs_g.to(tl.int64)[:, None] * C + offs_c[None, :]
        y = tl.load(recon_ptr + r * F + offs, mask=ok, other=0.0).to(CT)
        x = tl.load(target_ptr + t * F + offs, mask=ok, other=0.0).to(CT)
        dy = coef * _tile_dlog_prob(y, x, ok, okg, scale, KIND, EPS)
        if HAS_MASK:
            dy = tl.where(keep, dy, 0.0)
        tl.store(drecon_ptr + r * F + offs, dy.to(drecon_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def _ct(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _geometry(recon: Tensor, target: Tensor, kind: int) -> tuple[int, int, int, int]:
    """(R, N, G, C): rows, target rows, groups and classes per row."""
    R, N = recon.shape[0], target.shape[0]
    F = recon[0].numel() if R > 0 else math.prod(recon.shape[1:])
    C = recon.shape[-1] if (kind == KINDS["categorical"] and recon.dim() > 1) else 1
    G = F // C if C > 0 else 0
    return R, N, G, C


def _log_norm(kind: int, scale: float) -> float:
    if kind == 0:
        return math.log(scale) + math.log(math.sqrt(2 * math.pi))
    if kind == 1:
        return math.log(2 * scale)
    return 0.0


def _mask_bytes(mask: Optional[Tensor], like: Tensor) -> Tensor:
    """The (N,) mask as the kernels read it, ``w_ptr + t``: contiguous (a strided or expanded mask, e.g. one
    column of an (N, M) matrix, would be read past its elements), bytes for bool."""
    if mask is None:
        return like
    return (mask.view(torch.uint8) if mask.dtype == torch.bool else mask).contiguous()


def likelihood_forward(recon: Tensor, target: Tensor, mask: Optional[Tensor], kind: int, scale: float,
                       rescale: float, inner: int) -> Tensor:
    """One launch: the (R,) masked ``-rescale * sum_features log p(target[t(r)] | recon[r])``."""
    recon, target = recon.contiguous(), target.contiguous()
    R, N, G, C = _geometry(recon, target, kind)
    out = torch.empty((R,), dtype=compute_dtype(recon.dtype), device=recon.device)
    if R == 0:
        return out
    if G * C == 0:
        return out.zero_()
    block_g, block_c, num_warps = _blocks(G, C)
    with _backend.launch_guard():
        _likelihood_fwd_kernel[(R,)](
            recon, target, _mask_bytes(mask, recon), out,
            G, C, N, inner, float(scale), float(_log_norm(kind, scale)), float(rescale),
            KIND=kind, HAS_MASK=mask is not None, CT=_ct(recon.dtype), EPS=CATEGORICAL_EPS,
            BLOCK_G=block_g, BLOCK_C=block_c, num_warps=num_warps,
        )
    return out


def likelihood_backward(g: Tensor, recon: Tensor, target: Tensor, mask: Optional[Tensor], kind: int,
                        scale: float, rescale: float, inner: int) -> Tensor:
    """One launch: d recon (recon's shape and dtype) from the (R,) upstream gradient ``g`` (any stride)."""
    recon, target = recon.contiguous(), target.contiguous()
    R, N, G, C = _geometry(recon, target, kind)
    drecon = torch.empty_like(recon)
    if recon.numel() == 0:
        return drecon
    block_g, block_c, num_warps = _blocks(G, C)
    with _backend.launch_guard():
        _likelihood_bwd_kernel[(R,)](
            recon, target, _mask_bytes(mask, recon), g, drecon,
            G, C, N, inner, g.stride(0), float(scale), float(rescale),
            KIND=kind, HAS_MASK=mask is not None, CT=_ct(recon.dtype), EPS=CATEGORICAL_EPS,
            BLOCK_G=block_g, BLOCK_C=block_c, num_warps=num_warps,
        )
    return drecon


def compile_configs() -> list:
    """The specializations to build for a GPU without one (``tests/test_kernels_compile.py``):
    ``(name, kernel, signature, constexprs, options)`` (options: the launch's compile options) for every distribution in float32 with a mask at 64
    features (the default model), bernoulli at 784 features, and categorical over 10 classes in bfloat16."""

    def signature(kernel, io):
        sig = {}
        for name in kernel.arg_names:
            if name in ("KIND", "HAS_MASK", "CT", "EPS", "BLOCK_G", "BLOCK_C"):
                sig[name] = "constexpr"
            elif name == "w_ptr":
                sig[name] = "*u8"
            elif name == "out_ptr":
                sig[name] = "*fp32"
            elif name in ("recon_ptr", "drecon_ptr"):
                sig[name] = io
            elif name.endswith("_ptr"):
                sig[name] = "*fp32"
            elif name in ("scale", "log_norm", "rescale"):
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        return sig

    out = []
    cases = [(k, "*fp32", 64, 1) for k in ("normal", "laplace", "bernoulli")]
    cases += [("bernoulli", "*fp32", 784, 1), ("categorical", "*bf16", 30, 10)]
    for dist, io, F, C in cases:
        block_g, block_c, num_warps = _blocks(F // C, C)
        for name, kernel in (("_likelihood_fwd_kernel", _likelihood_fwd_kernel),
                             ("_likelihood_bwd_kernel", _likelihood_bwd_kernel)):
            constexprs = dict(KIND=KINDS[dist], HAS_MASK=True, CT=tl.float32, EPS=CATEGORICAL_EPS,
                              BLOCK_G=block_g, BLOCK_C=block_c)
            out.append((f"{name}[{dist},{io[1:]},F={F}]", kernel, signature(kernel, io), constexprs,
                        {"num_warps": num_warps}))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, fake + autograd registered
# ---------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("crmvae_fast::likelihood", mutates_args=())
def _likelihood_op(recon: Tensor, target: Tensor, mask: Optional[Tensor], kind: int, scale: float,
                   rescale: float, inner: int) -> Tensor:
    """(R,) masked ``-rescale * sum_features log p(target[(r // inner) % N] | recon[r])``."""
    return likelihood_forward(recon, target, mask, kind, scale, rescale, inner)


@_likelihood_op.register_fake
def _(recon, target, mask, kind, scale, rescale, inner):
    return recon.new_empty((recon.shape[0],), dtype=compute_dtype(recon.dtype))


@torch.library.custom_op("crmvae_fast::likelihood_backward", mutates_args=())
def _likelihood_backward_op(g: Tensor, recon: Tensor, target: Tensor, mask: Optional[Tensor], kind: int,
                            scale: float, rescale: float, inner: int) -> Tensor:
    """Backward of ``crmvae_fast::likelihood`` as its own opaque op: d recon."""
    return likelihood_backward(g, recon, target, mask, kind, scale, rescale, inner)


@_likelihood_backward_op.register_fake
def _(g, recon, target, mask, kind, scale, rescale, inner):
    return torch.empty_like(recon, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    recon, target, mask, kind, scale, rescale, inner = inputs
    ctx.save_for_backward(recon, target, mask)
    ctx.args = (kind, scale, rescale, inner)


def _backward(ctx, g):
    recon, target, mask = ctx.saved_tensors
    drecon = torch.ops.crmvae_fast.likelihood_backward(g, recon, target, mask, *ctx.args)
    dtarget = _target_grad(g, drecon, recon, target, mask, *ctx.args) if ctx.needs_input_grad[1] else None
    return (drecon if ctx.needs_input_grad[0] else None), dtarget, None, None, None, None, None


def _target_grad(g, drecon, recon, target, mask, kind, scale, rescale, inner):
    """d target: per recon row r, ``-rescale g[r] d log p / d x``, summed into target row ``(r // inner) % N``.
    Eager torch ops, run only when the target requires grad (data that requires grad, as on the eager path).
    ``d log p / d x`` is ``-(d log p / d y)`` for normal and laplace (so the row's term is minus ``drecon``,
    already zero where masked), ``y`` for bernoulli and ``log_softmax(y + eps)`` for categorical."""
    R, N = recon.shape[0], target.shape[0]
    ct = compute_dtype(recon.dtype)
    rows = (torch.arange(R, device=recon.device) // inner) % max(N, 1)
    if kind in (KINDS["normal"], KINDS["laplace"]):
        per_row = -drecon.to(ct)
    else:
        y = recon.to(ct)
        dlp = y if kind == KINDS["bernoulli"] else torch.log_softmax(y + CATEGORICAL_EPS, dim=-1)
        per_row = (-rescale * g.to(ct)).reshape(R, *[1] * (recon.dim() - 1)) * dlp
        if mask is not None:
            keep = mask[rows].reshape(R, *[1] * (recon.dim() - 1))
            per_row = torch.where(keep, per_row, torch.zeros((), dtype=ct, device=recon.device))
    dtarget = torch.zeros(target.shape, dtype=ct, device=target.device).index_add_(0, rows, per_row)
    return dtarget.to(target.dtype)


_likelihood_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------


def likelihood(
    recon: Tensor,
    target: Tensor,
    dist: str,
    mask: Optional[Tensor] = None,
    scale: float = 1.0,
    rescale: float = 1.0,
    inner: int = 1,
) -> Tensor:
    """``-rescale * sum_features log p(target | recon)`` per recon row, zero where masked, fused (eager twin:
    :func:`reference.neg_log_likelihood`).

    ``recon`` ``(R, *event)`` float; ``target`` ``(N, *event)``, R a multiple of N, row r scored against target row
    ``(r // inner) % N``; ``dist`` one of ``normal``, ``laplace`` (both with ``scale``), ``bernoulli`` (recon are
    logits), ``categorical`` (classes along the last dim, MultiVae's ``cross_entropy``); ``mask`` (N,) bool or
    float (nonzero = observed) or None. Returns (R,) float32 (float64 for float64 recon). Differentiable in
    ``recon`` and, when it is floating and requires grad, ``target``. ``scale`` and ``rescale``: finite numbers,
    ``scale > 0``. Tensors the Triton kernels cannot take (CPU without ``TRITON_INTERPRET=1``) go through the
    eager twin.
    """
    if not isinstance(dist, str) or dist not in KINDS:
        raise ValueError(f"likelihood: expected dist in {sorted(KINDS)}, got {dist!r}; use the eager "
                         "reference.neg_log_likelihood (or the model's eager path) for a custom distribution")
    if not isinstance(recon, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"likelihood: expected recon and target tensors, got {type(recon).__name__} and "
                        f"{type(target).__name__}")
    if recon.dim() < 1 or target.dim() != recon.dim() or target.shape[1:] != recon.shape[1:]:
        raise ValueError(f"likelihood: expected recon (R, *event) and target (N, *event) with the same event "
                         f"shape, got {tuple(recon.shape)} and {tuple(target.shape)}")
    if not recon.is_floating_point():
        raise TypeError(f"likelihood: expected a floating recon, got {recon.dtype}")
    R, N = recon.shape[0], target.shape[0]
    inner = as_count(inner, "likelihood: inner", "; recon row r is scored against target row (r // inner) % N")
    if (N == 0 and R > 0) or (N > 0 and R % N != 0):
        raise ValueError(f"likelihood: expected recon rows R = {R} to be a multiple of the target rows N = {N}; "
                         "repeat the target or pass the matching inner")
    for name, v in (("scale", scale), ("rescale", rescale)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"likelihood: expected {name} as a number, got {v!r}")
        if not math.isfinite(v):
            raise ValueError(f"likelihood: expected a finite {name}, got {v!r}")
    if not scale > 0:
        raise ValueError(f"likelihood: expected scale > 0, got {scale}; a scale of 0 or below has no density")
    if target.is_complex():
        raise TypeError(f"likelihood: expected a real target, got {target.dtype}")
    if target.device != recon.device:
        raise ValueError(f"likelihood: recon is on {recon.device} but target is on {target.device}")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.is_complex():
            raise TypeError(f"likelihood: expected mask as an (N,) bool or float tensor or None, got "
                            f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != (N,):
            raise ValueError(f"likelihood: expected mask of shape (N,) = {(N,)}, got {tuple(mask.shape)}")
        if mask.device != recon.device:
            raise ValueError(f"likelihood: mask is on {mask.device} but recon is on {recon.device}")
        if mask.dtype != torch.bool:
            mask = mask != 0
    if not target.is_floating_point():
        target = target.to(recon.dtype)
    if not _backend.triton_runs_on(recon.device):
        return reference.neg_log_likelihood(recon, target, dist, mask, scale, rescale, inner)
    return torch.ops.crmvae_fast.likelihood(recon, target, mask, KINDS[dist], float(scale), float(rescale),
                                            int(inner))
