"""Fused ops of crmvae_fast, each registered as a torch custom op. Implementations: one module per op in
:mod:`crmvae_fast.kernels`; eager twins: :mod:`crmvae_fast.reference`."""

from ..kernels.iw_logsumexp import iw_lse_finalize, iw_lse_init, iw_lse_update
from ..kernels.latent_step import latent_step
from ..kernels.likelihood import likelihood
from ..kernels.poe import poe

__all__ = ["latent_step", "poe", "likelihood", "iw_lse_init", "iw_lse_update", "iw_lse_finalize"]
