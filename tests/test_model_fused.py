"""``CRMVAE(fast_kernels=True)`` against ``fast_kernels=False`` on the same noise, and the fused training step
under ``torch.compile(fullgraph=True)``. Without a GPU the kernels run through the Triton interpreter."""

import pytest
import torch

import crmvae_fast as cf
from crmvae_fast import _backend

pytestmark = pytest.mark.skipif(
    not _backend.triton_runs_on(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    reason="the fused path needs a GPU or TRITON_INTERPRET=1 set before import (tests/conftest.py sets it)",
)

DIMS = {"a": (5,), "b": (2, 3), "c": (4,)}


def make_models(dims, device, **kw):
    torch.manual_seed(0)
    cfg = cf.CRMVAEConfig(n_modalities=len(dims), latent_dim=3, input_dims=dims, **kw)
    eager = cf.CRMVAE(cfg, fast_kernels=False).to(device)
    fused = cf.CRMVAE(cf.CRMVAEConfig(n_modalities=len(dims), latent_dim=3, input_dims=dims, **kw),
                      fast_kernels=True).to(device)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def use_noise(model, eps_J, eps):
    """Make the model's latent step use the given noise (its eager twin or the fused op)."""
    step = cf.ops.latent_step if model.fast_kernels else cf.reference.latent_step
    model._latent_step = lambda mu, lv, mask: step(mu, lv, mask, eps_J, eps)


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(inputs)
    out.loss.backward()
    return out, {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("M", [1, 2, 3])
@pytest.mark.parametrize("incomplete", [False, True])
def test_fused_model_equals_eager_on_the_same_noise(M, incomplete, device):
    dims = dict(list(DIMS.items())[:M])
    eager, fused = make_models(dims, device, decoders_dist={"a": "normal", "b": "laplace", "c": "bernoulli"})
    B = 6
    g = torch.Generator().manual_seed(1)
    inputs = {"data": {m: torch.rand((B, *d), generator=g).round().to(device) for m, d in dims.items()}}
    if incomplete and M > 1:
        w = torch.rand(M, B, generator=g) > 0.4
        w[0, ~w.any(0)] = True
        inputs["masks"] = {m: w[i].to(device) for i, m in enumerate(dims)}
        for i, m in enumerate(dims):
            inputs["data"][m][~w[i].to(device)] = float("nan")
    eps_J = torch.randn(B, 3, generator=g).to(device)
    eps = torch.randn(M, B, 3, generator=g).to(device)
    use_noise(eager, eps_J, eps)
    use_noise(fused, eps_J, eps)
    o1, g1 = loss_and_grads(eager, inputs)
    o2, g2 = loss_and_grads(fused, inputs)
    torch.testing.assert_close(o2.loss, o1.loss, rtol=1e-5, atol=1e-5)
    for k in o1.metrics:
        torch.testing.assert_close(o2.metrics[k], o1.metrics[k], rtol=1e-5, atol=1e-5, msg=k)
    for k in g1:
        assert torch.isfinite(g2[k]).all(), k
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_fused_model_draws_reproducible_noise(device):
    _, fused = make_models(DIMS, device)
    inputs = {"data": {m: torch.rand((4, *d)).to(device) for m, d in DIMS.items()}}
    torch.manual_seed(3)
    l1 = fused(inputs).loss
    l2 = fused(inputs).loss
    torch.manual_seed(3)
    l3 = fused(inputs).loss
    assert l1.item() != l2.item()
    assert l1.item() == l3.item()


def test_fused_training_step_compiles_without_graph_breaks(device):
    """The whole forward and backward under ``torch.compile(fullgraph=True)``: the fused ops are opaque custom
    ops with fake implementations, and nothing in the step syncs or branches on data."""
    _, fused = make_models(DIMS, device, decoders_dist={"a": "normal", "b": "laplace", "c": "bernoulli"})
    B = 5
    w = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool, device=device)
    inputs = {"data": {m: torch.rand((B, *d)).round().to(device) for m, d in DIMS.items()},
              "masks": {m: w[i] for i, m in enumerate(DIMS)}}

    torch._dynamo.reset()
    # AOTAutograd traces the backward of the compiled forward into its own graph
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    torch.manual_seed(7)
    fused.zero_grad(set_to_none=True)
    loss_c = compiled(inputs).loss
    loss_c.backward()
    grads_c = [p.grad.clone() for p in fused.parameters()]
    torch.manual_seed(7)
    fused.zero_grad(set_to_none=True)
    loss_e = fused(inputs).loss
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_c, (p.grad for p in fused.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_step_has_no_graph_break_and_no_recompile(device):
    """New data, new masks and fresh noise at the same shapes reuse the one compiled graph; the step (with the
    fused likelihood and the concatenated decoding) has no graph break."""
    from torch._dynamo.utils import counters

    _, fused = make_models(DIMS, device, decoders_dist={"a": "normal", "b": "laplace", "c": "bernoulli"})
    B = 4

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        w = torch.rand(3, B, generator=g) > 0.3
        w[0] |= ~w.any(0)
        return {"data": {m: torch.rand((B, *d), generator=g).round().to(device) for m, d in DIMS.items()},
                "masks": {m: w[i].to(device) for i, m in enumerate(DIMS)}}

    torch._dynamo.reset()
    explained = torch._dynamo.explain(fused)(inputs(0))
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    losses = []
    for seed in range(3):
        fused.zero_grad(set_to_none=True)
        loss = compiled(inputs(seed)).loss
        loss.backward()
        losses.append(loss.item())
        assert all(torch.isfinite(p.grad).all() for p in fused.parameters())
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert len(set(losses)) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs (mode='reduce-overhead') need a GPU; this "
                    "machine has none (the CPU tests above cover graph breaks and recompiles)")
def test_reduce_overhead_compiled_step_replays_as_a_cuda_graph():
    """``torch.compile(mode="reduce-overhead", fullgraph=True)``: the step is captured once and replayed, each
    replay with fresh noise; its loss equals the uncompiled step's on the same seed."""
    from torch._dynamo.utils import counters

    _, model = make_models(DIMS, torch.device("cuda"), decoders_dist={"a": "normal", "b": "laplace", "c": "bernoulli"})
    w = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool, device="cuda")
    inputs = {"data": {m: torch.rand((4, *d), device="cuda").round() for m, d in DIMS.items()},
              "masks": {m: w[i] for i, m in enumerate(DIMS)}}
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    losses = []
    for _ in range(4):
        torch.compiler.cudagraph_mark_step_begin()
        model.zero_grad(set_to_none=True)
        loss = compiled(inputs).loss
        loss.backward()
        losses.append(loss.item())
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert len(set(losses)) == 4, "replays must draw fresh noise"
    torch.manual_seed(3)
    torch.compiler.cudagraph_mark_step_begin()
    l_c = compiled(inputs).loss.item()
    torch.manual_seed(3)
    l_e = model(inputs).loss.item()
    assert abs(l_c - l_e) <= 1e-4 * max(1.0, abs(l_e))


def test_backend_info_names_the_live_paths():
    info = cf.backend_info()
    for key in ("triton", "interpreter", "extension"):
        assert key in info
    assert info["interpreter"] == _backend.INTERPRET
    if not torch.cuda.is_available():
        assert info["latent_step"]["cpu"] == "triton-interpreter"
        assert "triton" in info["reasons"] or info["interpreter"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU; this machine has none")
def test_training_step_captures_in_a_cuda_graph_and_replays_fresh_noise():
    _, model = make_models(DIMS, torch.device("cuda"))
    w = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool, device="cuda")
    static = {"data": {m: torch.rand((4, *d), device="cuda") for m, d in DIMS.items()},
              "masks": {m: w[i] for i, m in enumerate(DIMS)}}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            model(static).loss.backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = model(static).loss
        static_loss.backward()
    graph.replay()
    l1 = static_loss.clone()
    graph.replay()
    l2 = static_loss.clone()
    torch.cuda.synchronize()
    assert torch.isfinite(l1) and torch.isfinite(l2)
    assert l1.item() != l2.item(), "graph replays must draw fresh noise"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fused"])
def test_autocast_bfloat16_step_is_finite_and_close_to_float32(fast, device):
    """Under autocast the encoders hand bfloat16 means and log-variances to the latent step, which computes in
    float32 and returns the KL terms in float32."""
    eager, fused = make_models(DIMS, device)
    model = fused if fast else eager
    B = 8
    inputs = {"data": {m: torch.rand((B, *d)).to(device) for m, d in DIMS.items()},
              "masks": {m: torch.tensor([1, 1, 0, 1, 1, 1, 1, 0], dtype=torch.bool).to(device) if m == "b"
                        else torch.ones(B, dtype=torch.bool, device=device) for m in DIMS}}
    g = torch.Generator().manual_seed(2)
    eps_J, eps = torch.randn(B, 3, generator=g).to(device), torch.randn(3, B, 3, generator=g).to(device)
    use_noise(model, eps_J, eps)
    ref = model(inputs)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(inputs)
    assert out.metrics["joint_divergence"].dtype == torch.float32
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(out.loss.float(), ref.loss, rtol=5e-2, atol=5e-2)
