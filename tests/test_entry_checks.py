"""Every public entry checks its input before any work (issue 16, the part on inputs, outputs and memory).

Each finding of the issue has a test here that failed before the fix (said in its docstring); the hypothesis
fuzz at the end calls every public entry with malformed arguments and accepts only ``ValueError``/``TypeError``
with a message. The configuration's own checks are in ``tests/test_config.py``.
"""

import pytest
import torch

import crmvae_fast as cf
from crmvae_fast import _backend

FAST = [pytest.param(False, id="eager"), pytest.param(True, id="fused")]
DIMS = {"a": (4,), "b": (2, 3)}
NAMES = list(DIMS)
B, D = 3, 2

needs_kernels = pytest.mark.skipif(
    not _backend.triton_runs_on(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    reason="the fused path needs a GPU or TRITON_INTERPRET=1 set before import (tests/conftest.py sets it)",
)


def make_model(fast, dims=DIMS, **kw):
    torch.manual_seed(0)
    return cf.CRMVAE(cf.CRMVAEConfig(n_modalities=len(dims), latent_dim=D, input_dims=dims, **kw), fast_kernels=fast)


def make_data(n=B, dims=DIMS, seed=1):
    """0/1 data: exact in every dtype, so a cast changes no number."""
    g = torch.Generator().manual_seed(seed)
    return {m: torch.rand((n, *d), generator=g).round() for m, d in dims.items()}


def seeded(fn, seed=5):
    torch.manual_seed(seed)
    return fn()


# -------------------------------------------------------------------------------------- 12. memory
def _largest_draw(monkeypatch, fn):
    """The most standard normal values drawn at once by ``fn`` (every draw goes through Tensor.normal_)."""
    most = [0]
    normal_ = torch.Tensor.normal_

    def spy(self, *args, **kwargs):
        most[0] = max(most[0], self.numel())
        return normal_(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "normal_", spy)
    fn()
    monkeypatch.setattr(torch.Tensor, "normal_", normal_)
    return most[0]


@pytest.mark.parametrize("fast", FAST)
def test_joint_nll_draws_do_not_grow_with_the_number_of_points(fast, monkeypatch):
    """Before: the eager compute_joint_nll drew all K x n samples at once (the peak grew ~96 MB from n = 64 to
    512 at K = 200, latent 128). Now both paths draw (and decode) at most their row budget of latents at once,
    whatever n: the largest draw is the same for n = 64 and n = 512."""
    from crmvae_fast import model as model_module

    monkeypatch.setattr(model_module, "NLL_MAX_ROWS_CPU", 64)
    model = make_model(fast)
    sizes = [_largest_draw(monkeypatch, lambda: model.compute_joint_nll({"data": make_data(n)}, K=20))
             for n in (64, 512)]
    assert sizes[0] == sizes[1] <= 64 * D, sizes


def test_eager_joint_nll_in_slices_is_multivaes_draw_for_draw(monkeypatch):
    """The eager path draws MultiVae's (K, n, D) standard normals in slices of a few rows (here 4 latents, so
    slices end mid-point and mid-sample) and still gives MultiVae's number on the same seed."""
    mv_models = pytest.importorskip("multivae.models", reason="MultiVae 1.0.3 is the outside witness")
    from multivae.data.datasets.base import MultimodalBaseDataset

    from crmvae_fast import model as model_module

    kw = dict(n_modalities=2, latent_dim=3, input_dims=DIMS, decoders_dist={"a": "laplace", "b": "bernoulli"})
    torch.manual_seed(0)
    mv = mv_models.CRMVAE(mv_models.CRMVAEConfig(**kw))
    ours = cf.CRMVAE(cf.CRMVAEConfig(**kw), fast_kernels=False)
    ours.load_state_dict(mv.state_dict())
    data = make_data(5)
    want = seeded(lambda: mv.compute_joint_nll(MultimodalBaseDataset(data), K=13, batch_size_K=4), 21)
    for rows in (1, 4, 50):
        monkeypatch.setattr(model_module, "NLL_MAX_ROWS_CPU", rows)
        got = seeded(lambda: ours.compute_joint_nll({"data": data}, K=13, batch_size_K=4), 21)
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("total,rows", [(15, 16), (33, 16), (1000, 48), (4099, 256)])
def test_cpu_generator_slices_give_the_numbers_of_one_draw(dtype, total, rows):
    """What the eager NLL relies on: on the CPU, consecutive draws of whole blocks of 16 values, the last at least
    16 values (or the whole draw), give the numbers of one draw of them all."""
    whole = seeded(lambda: torch.empty(total, dtype=dtype).normal_())
    bounds = list(range(0, total, rows)) + [total]
    if len(bounds) > 2 and total - bounds[-2] < 16:
        del bounds[-2]
    torch.manual_seed(5)
    parts = [torch.empty(b - a, dtype=dtype).normal_() for a, b in zip(bounds[:-1], bounds[1:])]
    assert torch.equal(torch.cat(parts), whole)
