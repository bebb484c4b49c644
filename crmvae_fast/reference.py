"""The eager latent math of CRMVAE, written for clarity.

This module is the twin of every fused op in :mod:`crmvae_fast.ops`: the model's ``fast_kernels=False`` path
runs it, the tests compare the fused kernels against it and the benchmarks time it as the "eager" provider.

Shapes: M modalities, B samples, D latent dimensions.

* ``mu``, ``lv``: (M, B, D) means and log-variances of the unimodal experts.
* ``mask``: (M, B) bool (True where modality m of sample b is observed) or None (all observed).

Arithmetic is float32 (float64 for float64 inputs); ``mu_J``, ``lv_J`` and the samples come back in the input
dtype, the KL terms and importance weights in the arithmetic dtype.

Masked entries are removed with selects (``torch.where``), never with multiplications by zero, so that NaN or
inf placeholders in a missing modality reach neither the outputs nor the gradients. A sample with no observed
modality gets the prior N(0, I) as its joint (``mu_J = 0``, ``lv_J = 0``): a finite, documented answer.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .common import VAR_FLOOR, LatentStep, compute_dtype  # noqa: F401  (re-exported)

def _full_mask(mask: Optional[Tensor], mu: Tensor) -> Tensor:
    if mask is None:
        return torch.ones(mu.shape[:2], dtype=torch.bool, device=mu.device)
    return mask if mask.dtype == torch.bool else mask != 0


def poe(mu: Tensor, lv: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Masked product of Gaussian experts, no prior expert, with MultiVae's variance floor.

    ``T_m = w_m / (exp(lv_m) + 1e-8)``, ``P = sum_m T_m``, ``mu_J = sum_m T_m mu_m / P``, ``lv_J = -log P``,
    computed in the log domain so that no observed expert is dropped (``exp(lv)`` overflows float32 from
    lv = 89): ``a_m = log(exp(lv_m) + 1e-8)`` (``logaddexp``), ``lv_J = -logsumexp_m(-a_m)``, and
    ``mu_J = sum_m softmax_m(-a_m) mu_m``. A sample with no observed expert gets the prior (0, 0).
    Returns ``(mu_J, lv_J)``, each (B, D) in the input dtype.
    """
    ct = compute_dtype(mu.dtype)
    w = _full_mask(mask, mu)[..., None]
    mu_c = torch.where(w, mu.to(ct), 0.0)
    lv_c = torch.where(w, lv.to(ct), 0.0)
    a = torch.logaddexp(lv_c, torch.full_like(lv_c, math.log(VAR_FLOOR)))  # log(exp(lv) + 1e-8)
    ok = w.any(0)
    # -a of a missing expert is -inf (weight 0); a sample with none observed gets finite stand-ins (all 0),
    # so no inf - inf reaches logsumexp or its gradient, and is then replaced by the prior
    neg_a = torch.where(w & ok, -a, torch.where(ok, -math.inf, 0.0))
    mu_J = torch.where(ok, (torch.softmax(neg_a, 0) * mu_c).sum(0), 0.0)
    lv_J = torch.where(ok, -torch.logsumexp(neg_a, 0), 0.0)
    return mu_J.to(mu.dtype), lv_J.to(mu.dtype)


def reparameterize(mu: Tensor, lv: Tensor, eps: Tensor) -> Tensor:
    """``z = mu + exp(lv / 2) * eps``, in the dtype of ``mu``."""
    ct = compute_dtype(mu.dtype)
    return (mu.to(ct) + torch.exp(0.5 * lv.to(ct)) * eps.to(ct)).to(mu.dtype)


def _half_exp_m1_mx(x: Tensor) -> Tensor:
    """``0.5 (exp(x) - 1 - x)`` (>= 0, the KL's variance term) with no cancellation near 0 (a series for
    |x| < 1/8) and finite while the half fits (``exp(x - ln 2)``: to x = 89.4 in float32). Each branch gets only
    the inputs it is taken for, so neither feeds an inf into the other's gradient."""
    small = x.abs() < 0.125
    xs = torch.where(small, x, 0.0)
    xl = torch.where(small, 1.0, x)
    series = xs * xs * (0.25 + xs * (1 / 12 + xs * (1 / 48 + xs * (1 / 240 + xs / 1440))))
    return torch.where(small, series, torch.exp(xl - math.log(2.0)) - 0.5 - 0.5 * xl)


def kl_prior(mu_J: Tensor, lv_J: Tensor) -> Tensor:
    """``KL(N(mu_J, exp(lv_J)) || N(0, I))`` summed over the last dim: (B,) in the arithmetic dtype.
    ``0.5 sum_d (-lv_J + exp(lv_J) + mu_J^2 - 1)``, its variance part as ``exp(x) - 1 - x`` without cancellation."""
    ct = compute_dtype(mu_J.dtype)
    mu_J, lv_J = mu_J.to(ct), lv_J.to(ct)
    return (_half_exp_m1_mx(lv_J) + 0.5 * mu_J**2).sum(-1)


def kl_to_experts(mu_J: Tensor, lv_J: Tensor, mu: Tensor, lv: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """``KL(q(z|X) || q(z|x_m))`` for every expert m, zero where m is not observed: (M, B).
    ``0.5 sum_d (lv_m - lv_J + exp(lv_J - lv_m) + (mu_J - mu_m)^2 / exp(lv_m) - 1)``, computed as
    ``0.5 sum_d (f(lv_J - lv_m) + ((mu_J - mu_m) exp(-lv_m / 2))^2)`` with ``f(x) = exp(x) - 1 - x``, which
    neither cancels near lv_J = lv_m nor overflows ``1 / exp(lv_m)`` first."""
    ct = compute_dtype(mu.dtype)
    w = _full_mask(mask, mu)
    wd = w[..., None]
    mu_m = torch.where(wd, mu.to(ct), 0.0)
    lv_m = torch.where(wd, lv.to(ct), 0.0)
    mu_J, lv_J = mu_J.to(ct)[None], lv_J.to(ct)[None]
    kl = (_half_exp_m1_mx(lv_J - lv_m) + 0.5 * ((mu_J - mu_m) * torch.exp(-0.5 * lv_m)) ** 2).sum(-1)
    return torch.where(w, kl, 0.0)


def draw_noise(mu: Tensor) -> tuple[Tensor, Tensor]:
    """Standard normal ``(eps_J, eps)`` for :func:`latent_step`, (B, D) and (M, B, D), drawn with MultiVae's calls
    in MultiVae's order (the joint first, then one (B, D) draw per modality), so a seeded eager run reproduces
    MultiVae's samples. The one place the eager noise is drawn."""
    eps_J = torch.empty_like(mu[0]).normal_()
    eps = torch.stack([torch.empty_like(mu[i]).normal_() for i in range(mu.shape[0])])
    return eps_J, eps


def latent_step(
    mu: Tensor, lv: Tensor, mask: Optional[Tensor], eps_J: Tensor, eps: Tensor
) -> LatentStep:
    """The whole latent computation of a CRMVAE training step (eager twin of ``ops.latent_step``).

    ``eps_J`` (B, D) and ``eps`` (M, B, D) are standard normal noise.
    """
    mu_J, lv_J = poe(mu, lv, mask)
    z_J = reparameterize(mu_J, lv_J, eps_J)
    z = reparameterize(mu, lv, eps)
    return LatentStep(mu_J, lv_J, z_J, z, kl_prior(mu_J, lv_J), kl_to_experts(mu_J, lv_J, mu, lv, mask))


def importance_log_weights(log_px: Tensor, z: Tensor, mu_J: Tensor, lv_J: Tensor) -> Tensor:
    """``log w_k = log p(X | z_k) + log N(z_k; 0, I) - log N(z_k; mu_J, exp(lv_J))``.

    ``log_px`` (n, K), ``z`` (n, K, D), ``mu_J`` and ``lv_J`` (n, D). Returns (n, K).
    The ``-D/2 log(2 pi)`` constants of the two Gaussians cancel and are left out.
    """
    ct = compute_dtype(z.dtype)
    z = z.to(ct)
    mu_J, lv_J = mu_J.to(ct)[:, None], lv_J.to(ct)[:, None]
    log_pz = -0.5 * (z**2).sum(-1)
    log_qz = -0.5 * (lv_J + (z - mu_J) ** 2 / torch.exp(lv_J)).sum(-1)
    return log_px.to(ct) + log_pz - log_qz


def iw_logsumexp(log_w: Tensor) -> Tensor:
    """``logsumexp_k log_w[:, k] - log K``: the importance-weighted log-likelihood of each point, (n,)."""
    return torch.logsumexp(log_w, dim=-1) - math.log(log_w.shape[-1])


def poe_experts(
    mu: Tensor,
    lv: Tensor,
    mask: Optional[Tensor] = None,
    *,
    prior_expert: bool = False,
    var_floor: float = VAR_FLOOR,
    subsets: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Product of Gaussian experts in the log domain (eager twin of ``ops.poe``).

    ``l_m = -log(exp(lv_m) + var_floor)`` (``-logaddexp``, so no expert underflows), ``L = logsumexp_m l_m`` over
    the observed experts (``mask`` (M, B)) of each subset (``subsets`` (S, M) bool, or all experts), plus
    ``l_0 = -log(1 + var_floor)`` of the N(0, I) expert when ``prior_expert``; ``mu_J = sum_m exp(l_m - L) mu_m``,
    ``lv_J = -L``. An empty product is N(0, I) (``mu_J = lv_J = 0``). Returns ``(mu_J, lv_J)``, (B, D) each or
    (S, B, D) with ``subsets``, in the input dtype.
    """
    ct = compute_dtype(mu.dtype)
    w = _full_mask(mask, mu)  # (M, B)
    sel = w[None] if subsets is None else (subsets != 0)[:, :, None] & w[None]  # (S, M, B)
    sel = sel[..., None]  # (S, M, B, 1)
    mu_c = torch.where(w[..., None], mu.to(ct), 0.0)
    lv_c = torch.where(w[..., None], lv.to(ct), 0.0)
    if var_floor > 0:
        ell = -torch.logaddexp(lv_c, torch.tensor(math.log(var_floor), dtype=ct, device=mu.device))
    else:
        ell = -lv_c
    ell = torch.where(sel, ell[None], -math.inf)  # (S, M, B, D)
    mx = ell.amax(1)
    if prior_expert:
        mx = torch.clamp(mx, min=-math.log1p(var_floor))
    ok = mx > -math.inf
    mx = torch.where(ok, mx, 0.0).detach()  # L does not depend on the shift
    p = torch.where(sel, torch.exp(ell - mx[:, None]), 0.0)
    tot = p.sum(1)
    if prior_expert:
        tot = tot + torch.exp(-math.log1p(var_floor) - mx)
    tot = torch.where(ok, tot, 1.0)
    mu_J = torch.where(ok, (p * mu_c[None]).sum(1) / tot, 0.0)
    lv_J = torch.where(ok, -(mx + torch.log(tot)), 0.0)
    if subsets is None:
        mu_J, lv_J = mu_J[0], lv_J[0]
    return mu_J.to(mu.dtype), lv_J.to(mu.dtype)


def neg_log_likelihood(recon: Tensor, target: Tensor, dist, mask: Optional[Tensor] = None, scale: float = 1.0,
                       rescale: float = 1.0, inner: int = 1) -> Tensor:
    """``-rescale * sum_features log p(target | recon)`` per recon row, zero where masked (eager twin of
    ``ops.likelihood``): MultiVae's ``recon_log_probs`` for ``dist`` ("normal", "laplace" with ``scale``,
    "bernoulli" on logits, "categorical", or a callable), summed over every dim after the first.

    ``recon`` ``(R, *event)``, ``target`` ``(N, *event)``: recon row r is scored against target row
    ``(r // inner) % N``.
    ``mask`` (N,) bool or None. Returns (R,) in the arithmetic dtype.
    """
    from .likelihoods import make_log_prob

    ct = compute_dtype(recon.dtype)
    R, N = recon.shape[0], target.shape[0]
    log_prob = make_log_prob(dist, {"scale": scale})
    event = recon.shape[1:]
    if mask is not None:  # placeholders of missing rows (NaN, inf) must not reach the gradient: a select
        mask = mask if mask.dtype == torch.bool else mask != 0
        target = torch.where(mask.reshape(N, *[1] * len(event)), target, torch.zeros((), dtype=target.dtype,
                                                                                       device=target.device))
    if N > 0 and R % (N * inner) == 0:  # broadcast the targets: no (R, *event) copy of them
        c = R // (N * inner)
        lp = log_prob(recon.to(ct).reshape(c, N, inner, *event), target.to(ct)[None, :, None])
        rows = torch.arange(N, device=recon.device)[None, :, None].expand(c, N, inner).reshape(R)
    else:
        rows = (torch.arange(R, device=recon.device) // inner) % max(N, 1)
        lp = log_prob(recon.to(ct), target[rows].to(ct))
    r = -lp.reshape(R, -1).sum(-1) * rescale
    if mask is not None:
        r = torch.where(mask[rows], r, torch.zeros((), dtype=r.dtype, device=r.device))
    return r
