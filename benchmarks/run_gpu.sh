#!/usr/bin/env bash
# The one command for a lent GPU (torch + triton preinstalled, no internet, this repo copied as-is, the package
# not installed). From the repo root:
#
#     bash benchmarks/run_gpu.sh
#
# It builds the C++/CUDA extension in place, runs the test suite on the GPU (python -m pytest tests -x -q), then
# the full benchmark suite (python -m crmvae_fast bench), all within 10 minutes (each step has a time limit; the
# suite gets what is left and records the cases it had no time for as skipped). Outputs go to $OUT when it is
# set, else to benchmarks/results/:
#
#   nvidia-smi.txt   one nvidia-smi line (card, driver, memory, clocks) and the torch/triton versions
#   build.log        the extension build          pytest.log   the test run
#   info.txt         crmvae-fast info             bench.log    the suite's log and table
#   results.jsonl    the suite's JSON rows        speedup.png  speed-up against size
#   table.md         the README table (benchmarks/make_table.py)
#   kernels.txt      the kernel report (crmvae-fast kernels, modelled) and the same latent-step launches timed
#   kernels.jsonl    those measured rows, each with its modelled figures (benchmarks/measure_latent_kernels.py)
set -u
cd "$(dirname "$0")/.."
REPO="$PWD"
DEST="${OUT:-$REPO/benchmarks/results}"
mkdir -p "$DEST"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-16}"
TOTAL=${CRMVAE_GPU_BUDGET_S:-585}   # seconds for the whole script (a 10-minute slot, minus a margin)
START=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
say() { echo "[run_gpu $(( $(date +%s) - START ))s] $*"; }

say "output folder: $DEST"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader 2>&1 \
    || echo "nvidia-smi failed"
  python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1
} | tee "$DEST/nvidia-smi.txt"

say "building the extension in place (limit 200 s)"
timeout 200 python setup.py build_ext --inplace --force --build-temp "${TMPDIR:-/tmp}/crmvae_fast_build" \
    > "$DEST/build.log" 2>&1
say "build exit code $? (log: build.log; without a build the package JIT-builds or falls back to eager)"

python -m crmvae_fast info > "$DEST/info.txt" 2>&1
cat "$DEST/info.txt"

T=$(( $(left) - 300 )); [ "$T" -gt 240 ] && T=240; [ "$T" -lt 60 ] && T=60
say "tests on the GPU (limit ${T} s)"
timeout "$T" python -m pytest tests -x -q -p no:cacheprovider > "$DEST/pytest.log" 2>&1
RC=$?
tail -n 5 "$DEST/pytest.log"
say "pytest exit code $RC (124 = hit the time limit)"

say "kernel report and the same latent-step kernels measured (limit 90 s)"
timeout 90 python benchmarks/measure_latent_kernels.py --json "$DEST/kernels.jsonl" > "$DEST/kernels.txt" 2>&1
say "kernels exit code $? (log: kernels.txt)"
tail -n 4 "$DEST/kernels.txt"

timeout 90 python benchmarks/bench_ddp.py --json "$DEST/ddp_scaling.jsonl" --budget-s 80 > "$DEST/bench_ddp.log" 2>&1; say "bench_ddp (training samples/s against the number of GPUs) exit code $? (log: bench_ddp.log)"
T=$(( $(left) - 20 ))
B=$(( T - 75 )); [ "$B" -lt 30 ] && B=30
say "benchmark suite (limit ${T} s, new cases start until ${B} s)"
timeout "$T" python -m crmvae_fast bench --json "$DEST/results.jsonl" --plot "$DEST/speedup.png" \
    --budget-s "$B" > "$DEST/bench.log" 2>&1
say "bench exit code $? (log: bench.log)"
if [ -f "$DEST/results.jsonl.partial" ]; then   # killed half-way: keep what was measured
    cat "$DEST/results.jsonl.partial" >> "$DEST/results.jsonl" && rm -f "$DEST/results.jsonl.partial"
    say "the suite was cut short: its partial rows were appended to results.jsonl"
fi
python benchmarks/make_table.py "$DEST/results.jsonl" > "$DEST/table.md" 2>&1
cat "$DEST/table.md"
say "done"
