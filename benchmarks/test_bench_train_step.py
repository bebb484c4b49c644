"""A whole training step (forward + backward + Adam step) of the default MLP model: fast_kernels=False
(eager), fast_kernels=True (fused) and torch.compile of the eager model."""

import pytest

from crmvae_fast import bench


@pytest.mark.parametrize("provider", ["eager", "fused", "compile"])
@pytest.mark.parametrize("size", bench.FULL_SIZES, ids=bench.size_id)
def test_train_step(run_bench, size, provider):
    M, B, D = size
    run_bench(bench.Case("train_step", "step", M, B, D, params={"features": bench.TRAIN_FEATURES}), provider)
