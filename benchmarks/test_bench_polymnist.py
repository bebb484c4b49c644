"""A PolyMNIST-shaped training step (issue 11): 5 modalities of 3x28x28 images, MultiVae's conv architectures
(``EncoderConvMMNIST``, ``DecoderConvMMNIST``), laplace decoders (scale 0.75), latent 512, B = 256, 20 % of
modalities missing. Forward + backward + Adam step, timed with pytest-benchmark, for MultiVae, eager
(``fast_kernels=False``), fused and (on a GPU) fused under ``torch.compile(mode="reduce-overhead")``; the
launch count and modelled bytes of one forward + backward (:mod:`crmvae_fast.counts`) go into ``extra_info``.

Standalone on purpose (it builds its own models and does not go through ``crmvae_fast.bench``):
``python -m pytest benchmarks/test_bench_polymnist.py``. On a CPU one step takes seconds: few rounds.
"""

import copy
import warnings

import pytest
import torch

from crmvae_fast import counts

multivae = pytest.importorskip("multivae", reason="the PolyMNIST case uses MultiVae's conv architectures")
from multivae.data.datasets.base import IncompleteDataset  # noqa: E402
from multivae.models import CRMVAE as MVCRMVAE  # noqa: E402
from multivae.models import CRMVAEConfig as MVConfig  # noqa: E402
from multivae.models.base import BaseAEConfig  # noqa: E402
from multivae.models.nn.mmnist import DecoderConvMMNIST, EncoderConvMMNIST  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
M, SHAPE, LATENT, B, MISSING = 5, (3, 28, 28), 512, 256, 0.2
ROUNDS = (20, 3) if DEVICE.type == "cuda" else (3, 1)


def _setup(provider):
    import crmvae_fast as cf

    names = [f"m{i}" for i in range(M)]
    kw = dict(n_modalities=M, latent_dim=LATENT, input_dims={m: SHAPE for m in names},
              decoders_dist={m: "laplace" for m in names}, decoder_dist_params={m: {"scale": 0.75} for m in names})
    torch.manual_seed(0)
    arch = BaseAEConfig(input_dim=SHAPE, latent_dim=LATENT)
    encs = {m: EncoderConvMMNIST(arch) for m in names}
    decs = {m: DecoderConvMMNIST(arch) for m in names}
    g = torch.Generator().manual_seed(1)
    data = {m: torch.rand(B, *SHAPE, generator=g).to(DEVICE) for m in names}
    w = torch.rand(M, B, generator=g) >= MISSING
    w[0] |= ~w.any(0)
    masks = {m: w[i].to(DEVICE) for i, m in enumerate(names)}
    if provider == "multivae":
        model = MVCRMVAE(MVConfig(**copy.deepcopy(kw)), encoders=encs, decoders=decs).to(DEVICE)
        return model, model, IncompleteDataset(data, masks)
    model = cf.CRMVAE(cf.CRMVAEConfig(**copy.deepcopy(kw)), encoders=encs, decoders=decs,
                      fast_kernels=provider != "eager").to(DEVICE)
    step_model = model
    if provider == "compile":
        torch._dynamo.reset()
        step_model = torch.compile(model, mode="reduce-overhead", fullgraph=True, dynamic=False)
    return model, step_model, {"data": data, "masks": masks}


@pytest.mark.parametrize("provider", ["multivae", "eager", "fused", "compile"])
def test_polymnist_train_step(benchmark, provider):
    if provider == "compile" and DEVICE.type != "cuda":
        pytest.skip("compile (CUDA graphs, mode='reduce-overhead') is measured on a GPU only: an inductor build of "
                    "the conv model takes minutes on a CPU and the CUDA-graph part does not exist there")
    model, step_model, inputs = _setup(provider)
    if provider != "compile":
        c = counts.count_step(model, inputs)
        benchmark.extra_info.update(launches=c.launches, aten=c.aten, triton=c.triton, mb_moved=c.bytes / 1e6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, **({"fused": True} if provider == "compile" else {}))

    def step():
        if provider == "compile":
            torch.compiler.cudagraph_mark_step_begin()
        opt.zero_grad(set_to_none=True)
        loss = step_model(inputs).loss
        loss.backward()
        opt.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return loss

    rounds, warmup = ROUNDS
    loss = benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup + (2 if provider == "compile" else 0))
    benchmark.extra_info.update(provider=provider, device=str(DEVICE), M=M, B=B, D=LATENT)
    assert torch.isfinite(loss)
