"""Fused ops of crmvae_fast, each registered as a torch custom op; the eager twins live in
:mod:`crmvae_fast.reference`."""

from .latent_step import latent_step
from .iw_logsumexp import iw_lse_init, iw_lse_update, iw_lse_finalize

__all__ = ["latent_step", "iw_lse_init", "iw_lse_update", "iw_lse_finalize"]
