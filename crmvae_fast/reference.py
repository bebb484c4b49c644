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

    ``T_m = w_m / (exp(lv_m) + 1e-8)``, ``P = sum_m T_m``, ``mu_J = sum_m T_m mu_m / P``, ``lv_J = -log P``.
    Returns ``(mu_J, lv_J)``, each (B, D) in the input dtype.
    """
    ct = compute_dtype(mu.dtype)
    w = _full_mask(mask, mu)[..., None]
    mu_c = torch.where(w, mu.to(ct), 0.0)
    lv_c = torch.where(w, lv.to(ct), 0.0)
    T = torch.where(w, 1.0 / (torch.exp(lv_c) + VAR_FLOOR), 0.0)
    P = T.sum(0)
    ok = P > 0
    P_safe = torch.where(ok, P, 1.0)
    mu_J = torch.where(ok, (T * mu_c).sum(0) / P_safe, 0.0)
    lv_J = torch.where(ok, -torch.log(P_safe), 0.0)
    return mu_J.to(mu.dtype), lv_J.to(mu.dtype)


def reparameterize(mu: Tensor, lv: Tensor, eps: Tensor) -> Tensor:
    """``z = mu + exp(lv / 2) * eps``, in the dtype of ``mu``."""
    ct = compute_dtype(mu.dtype)
    return (mu.to(ct) + torch.exp(0.5 * lv.to(ct)) * eps.to(ct)).to(mu.dtype)


def kl_prior(mu_J: Tensor, lv_J: Tensor) -> Tensor:
    """``KL(N(mu_J, exp(lv_J)) || N(0, I))`` summed over the last dim: (B,) in the arithmetic dtype."""
    ct = compute_dtype(mu_J.dtype)
    mu_J, lv_J = mu_J.to(ct), lv_J.to(ct)
    return 0.5 * (-lv_J + torch.exp(lv_J) + mu_J**2 - 1.0).sum(-1)


def kl_to_experts(mu_J: Tensor, lv_J: Tensor, mu: Tensor, lv: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """``KL(q(z|X) || q(z|x_m))`` for every expert m, zero where m is not observed: (M, B)."""
    ct = compute_dtype(mu.dtype)
    w = _full_mask(mask, mu)
    wd = w[..., None]
    mu_m = torch.where(wd, mu.to(ct), 0.0)
    lv_m = torch.where(wd, lv.to(ct), 0.0)
    mu_J, lv_J = mu_J.to(ct)[None], lv_J.to(ct)[None]
    kl = 0.5 * (lv_m - lv_J + torch.exp(lv_J - lv_m) + (mu_J - mu_m) ** 2 / torch.exp(lv_m) - 1.0).sum(-1)
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


def neg_log_likelihood(recon: Tensor, target: Tensor, dist, mask: Optional[Tensor] = None, scale: float = 1.0,
                       rescale: float = 1.0, inner: int = 1) -> Tensor:
    """``-rescale * sum_features log p(target | recon)`` per recon row, zero where masked (eager twin of
    ``ops.likelihood``): MultiVae's ``recon_log_probs`` for ``dist`` ("normal", "laplace" with ``scale``,
    "bernoulli" on logits, "categorical", or a callable), summed over every dim after the first.

    ``recon`` (R, *event), ``target`` (N, *event): recon row r is scored against target row ``(r // inner) % N``.
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
