"""The interpreted kernels are safe across threads (issue 9; its saving and loading tests live in
test_persistence.py). Each test here failed before its fix (noted in its docstring)."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import crmvae_fast as cf
from crmvae_fast import _backend, ops
from crmvae_fast.nn import ModelOutput

DIMS = {"a": (4,), "b": (3,)}


class Encoder(nn.Module):
    """A custom encoder."""

    def __init__(self, n_in, latent=2):
        super().__init__()
        self.lin = nn.Linear(n_in, 2 * latent)

    def forward(self, x):
        mu, lv = self.lin(x).chunk(2, dim=-1)
        return ModelOutput(embedding=mu, log_covariance=lv)


def make_model(fast=False):
    torch.manual_seed(0)
    cfg = cf.CRMVAEConfig(n_modalities=2, latent_dim=2, input_dims=DIMS)
    return cf.CRMVAE(cfg, encoders={m: Encoder(d[0]) for m, d in DIMS.items()}, fast_kernels=fast)


def make_inputs(B=3):
    g = torch.Generator().manual_seed(1)
    return {"data": {m: torch.rand((B, *d), generator=g) for m, d in DIMS.items()}}


# ------------------------------------------------------------------------------------------ thread safety
needs_interpreter = pytest.mark.skipif(
    not _backend.INTERPRET,
    reason="tests the Triton interpreter's lock; TRITON_INTERPRET is not 1 here (a GPU runs real kernels)",
)


def _step(seed):
    """ops.latent_step forward and backward on fixed inputs and noise: every output and both gradients."""
    g = torch.Generator().manual_seed(seed)
    M, B, D = 3, 5, 7
    mu = torch.randn(M, B, D, generator=g, requires_grad=True)
    lv = torch.randn(M, B, D, generator=g).requires_grad_()
    mask = torch.rand(M, B, generator=g) > 0.3
    mask[0] = True
    eps_J, eps = torch.randn(B, D, generator=g), torch.randn(M, B, D, generator=g)
    out = ops.latent_step(mu, lv, mask, eps_J, eps)
    loss = sum((t.float() * (i + 1)).sum() for i, t in enumerate(out))
    loss.backward()
    return [t.detach() for t in out] + [mu.grad, lv.grad]


def _run_in_threads(fn, seeds, n_threads=2):
    barrier = threading.Barrier(n_threads)

    def worker(chunk):
        barrier.wait()
        return [fn(s) for s in chunk]

    chunks = [seeds[i::n_threads] for i in range(n_threads)]
    with ThreadPoolExecutor(n_threads) as pool:
        results = [f.result() for f in [pool.submit(worker, c) for c in chunks]]
    out = {}
    for chunk, res in zip(chunks, results):
        out.update(zip(chunk, res))
    return out


def _threads_match_sequential(fn, seeds):
    want = {s: fn(s) for s in seeds}
    got = _run_in_threads(fn, seeds)
    for s in seeds:
        for a, b in zip(got[s], want[s]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_interpreter
def test_latent_step_in_two_threads_matches_sequential_runs():
    """Before the lock: two threads interpreting kernels at once broke each other (the interpreter patches
    global state). With ``_backend.launch_guard`` they give exactly the sequential results."""
    _threads_match_sequential(_step, list(range(8)))


@needs_interpreter
def test_fused_model_steps_in_two_threads_match_sequential_runs():
    """Whole fused forward passes in two threads: their noise-free outputs (the KL metrics) equal the
    sequential ones (the noise comes from the shared generator, so z depends on the interleaving)."""
    model = make_model(fast=True)

    def fn(seed):
        inputs = make_inputs(B=3 + seed % 3)
        out = model(inputs)
        return [out.metrics[k].detach() for k in sorted(out.metrics) if k.startswith(("kl_", "joint"))]

    _threads_match_sequential(fn, list(range(6)))


class _LockSpy:
    """Stands in for a Triton kernel: records, at each launch, whether this thread holds the interpreter lock."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.seen.append(_backend._INTERPRETER_LOCK._is_owned())
            return launch(*args, **kwargs)

        return run


@needs_interpreter
def test_every_kernel_launch_holds_the_interpreter_lock(monkeypatch):
    """What makes the thread tests above pass, checked without relying on a race showing: every Triton kernel of
    every op (``crmvae_fast.kernels``) is launched with the interpreter lock held by the launching thread. (With
    the lock off, two threads interpreting at once failed 4 runs out of 4 when this was written, but a race is
    not certain to show on every run, so that is not a test.)"""
    import importlib
    import pkgutil

    import crmvae_fast.kernels as pkg

    seen = []
    patched = 0
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name in [n for n in vars(mod) if n.endswith("_kernel")]:
            monkeypatch.setattr(mod, name, _LockSpy(getattr(mod, name), seen))
            patched += 1
    assert patched >= 6, patched  # latent step, poe and likelihood: a forward and a backward kernel each
    _step(0)
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(3, 4, 5, generator=g, requires_grad=True)
    lv = torch.randn(3, 4, 5, generator=g, requires_grad=True)
    mu_J, lv_J = ops.poe(mu, lv)
    (mu_J.sum() + lv_J.sum()).backward()
    recon = torch.randn(4, 6, generator=g, requires_grad=True)
    ops.likelihood(recon, torch.randn(4, 6, generator=g), "normal").sum().backward()
    assert len(seen) == 6 and all(seen), seen
