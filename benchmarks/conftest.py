"""pytest-benchmark set-up for the suite in this folder (``python -m pytest benchmarks``).

The cases, providers, inputs and rows come from :mod:`crmvae_fast.bench`, the library behind
``crmvae-fast bench``; here pytest-benchmark's ``benchmark.pedantic`` does the timing (each call followed by a
synchronize on a GPU) and every measured case is also appended as a JSON row to
``benchmarks/results/results.jsonl`` (or ``$CRMVAE_BENCH_JSON``). A case that cannot run here is skipped with
its reason (shown by ``-rs``, on by default through ``-ra``).

Unlike ``tests/``, nothing sets ``TRITON_INTERPRET`` here: on a CPU the fused provider times the real CPU path
(the eager fallback of the latent step, the C++ extension of the NLL).
"""

import os

import pytest
import torch

from crmvae_fast import bench

DEVICE = bench.default_device()
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "results.jsonl")
# The sweep is bench.FULL_SIZES; the sizes a device cannot take quickly are skipped by bench.skip_reason.
#: pytest-benchmark rounds: many for the (fast) latent step, few for whole steps and the NLL.
ROUNDS = {"latent_step": (20, 3), "train_step": (5, 1), "joint_nll": (3, 0)}


@pytest.fixture(scope="session")
def bench_env():
    return bench.environment(DEVICE, source="pytest")


@pytest.fixture(scope="session")
def results_path():
    """``$CRMVAE_BENCH_JSON``, else this repository's ``benchmarks/results/results.jsonl``, named explicitly (the
    library's own default is the working directory, never the checkout)."""
    return os.environ.get("CRMVAE_BENCH_JSON") or RESULTS


@pytest.fixture
def run_bench(benchmark, bench_env, results_path):
    """``run_bench(case, provider) -> row``: time one case with pytest-benchmark, append its row."""

    def run(case: bench.Case, provider: str) -> dict:
        reason = bench.skip_reason(case, provider, DEVICE)
        if reason:
            pytest.skip(reason)
        rounds, warmup = ROUNDS[case.op]
        row = bench.run_case(case, provider, DEVICE, bench_env, log=None,
                             timer=bench.pytest_timer(benchmark, DEVICE, rounds=rounds, warmup_rounds=warmup))
        if row["skipped"]:
            pytest.skip(row["skipped"])
        benchmark.extra_info.update({k: row[k] for k in ("op", "mode", "provider", "backend", "M", "B", "D",
                                                         "median_ms", "q20_ms", "q80_ms", "peak_mem_mb", "bytes",
                                                         "gbps", "bw_fraction", "note")})
        if row["median_ms"] is not None:  # None under --benchmark-disable
            bench.append_rows([row], results_path)
        return row

    return run


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    yield
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
