"""The fused latent step (PoE, M + 1 samples, every KL) against its eager twin and torch.compile of it:
forward, backward and both, M in {2, 5}, D in {32, 512}, B in {256, 4096, 65536}."""

import pytest

from crmvae_fast import bench


@pytest.mark.parametrize("provider", ["eager", "fused", "compile"])
@pytest.mark.parametrize("mode", bench.MODES["latent_step"])
@pytest.mark.parametrize("size", bench.FULL_SIZES, ids=bench.size_id)
def test_latent_step(run_bench, size, mode, provider):
    M, B, D = size
    run_bench(bench.Case("latent_step", mode, M, B, D), provider)
