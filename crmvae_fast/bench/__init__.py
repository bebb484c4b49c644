"""The benchmark library shared by ``crmvae-fast bench`` and the pytest-benchmark files in ``benchmarks/``.

* :mod:`~crmvae_fast.bench.cases`: one ``BenchSpec`` per benchmarked op (its modes, sizes, providers, inputs,
  bytes formula, baselines), registered in ``SPECS``; the list every other part loops over.
* :mod:`~crmvae_fast.bench.timing`: CUDA events with warm-up and an L2 flush before each call on a GPU
  (``triton.testing.do_bench`` style), ``time.perf_counter`` on a CPU; median and 20/80 % quantiles.
* :mod:`~crmvae_fast.bench.environment`: device, versions and commit of a run; where rows go by default
  (``./crmvae_fast_bench/results.jsonl`` in the working directory, or ``$CRMVAE_BENCH_JSON``).
* :mod:`~crmvae_fast.bench.report`: the rows (:data:`ROW_KEYS`), speed-ups against each op's baseline (never
  between two rows that ran the same backend), the JSON-lines file, the table and the plot.
* :mod:`~crmvae_fast.bench.runner`: skip reasons, building, timing and a whole run.

Rows report the median and the 20/80 % quantiles in ms, the peak memory (``torch.cuda.max_memory_allocated`` on
a GPU; None on a CPU, where tracemalloc does not see torch's allocations), the fewest bytes the op must move
and, on a GPU, the achieved bandwidth against the card's measured device-to-device copy bandwidth.
"""

from .cases import (  # noqa: F401
    COUNT_MAX_INTERP_ELEMS, COUNT_SMALL_B, CPU_MAX_LATENT_ELEMS, CPU_MAX_TRAIN_ROWS, CPU_QUICK_COMPILE_SIZE, FULL_B,
    FULL_D, FULL_M, FULL_SIZES,
    GPU_COMPILE_TRAIN_SIZES, GPU_MULTIVAE_NLL_POINTS, LATENT_BYTES_FORMULA, MODES, NLL_FEATURES, NLL_LATENT, NLL_M,
    OPS, PROVIDERS, SPECS, TARGET, TRAIN_FEATURES, BenchSpec, Case, Skip, counts_batch, latent_inputs,
    latent_step_bytes, op_bench, register_bench, size_id, suite_cases,
)
from .environment import (  # noqa: F401
    DEFAULT_RESULTS, compile_unavailable, default_device, default_results_path, device_name, dtype_of, environment,
    multivae_unavailable, package_version,
)
from .report import (  # noqa: F401
    FIGURE_KEYS, ROW_KEYS, append_rows, attach_speedups, backend_of, figures_cell, format_table, make_row, plot,
    read_rows,
)
from .runner import build, run_case, run_suite, skip_reason  # noqa: F401
from .timing import copy_bandwidth_gbps, peak_memory_mb, pytest_timer, summarize, time_fn  # noqa: F401
