#!/usr/bin/env bash
# The one command for a lent GPU (torch + triton preinstalled, no internet, this repo copied as-is, the package
# not installed: PYTHONPATH=repo). From the repo root:
#
#     bash benchmarks/run_gpu.sh
#
# Steps, in order, each under its own time limit in seconds. A step never runs into the minimum that the later
# steps need (doctor 45, pytest 60, kernels 15, ddp 15, bench 60, table 10), and the benchmark suite gets what is
# left of the TOTAL at its turn:
#
#   env       15   one nvidia-smi line, python/torch/triton versions
#   build    120   the C++/CUDA extension, in place (setup.py build_ext --inplace)
#   doctor    90   python -m crmvae_fast.doctor: every op against its eager twin on the GPU and the CPU, the
#                  model step in a CUDA graph and under torch.compile (first, so a broken install shows at once)
#   pytest   140   the test suite on the GPU (CI=true; pytest-xdist with 4 workers when it is installed)
#   kernels   40   benchmarks/measure_latent_kernels.py: the kernel report's launches timed
#   ddp       35   benchmarks/bench_ddp.py: training samples/s against the number of GPUs
#   bench   rest   python -m crmvae_fast bench, its --budget-s set from the time left
#   table     15   benchmarks/make_table.py
#
# TOTAL is CRMVAE_GPU_BUDGET_S (default 480 s: the GPU slot is 15 minutes including the machine's start-up).
# Everything goes to $OUT when it is set, else to benchmarks/results/, as at most 7 files (the slot returns 8):
#
#   summary.md      the steps (exit code, seconds, limit), the doctor summary, pytest's last lines, the tables
#   logs.tar.gz     every step's log: env.txt build.log doctor.log pytest.log kernels.txt bench_ddp.log
#                   ddp_scaling.jsonl bench.log table.md
#   doctor.json     doctor's verdict rows          kernels.jsonl   the measured kernel rows
#   results.jsonl   the suite's rows (results.jsonl.partial while it runs)          speedup.png  the plot
#
# It writes as it goes: rows land in their files as they are measured, and summary.md and logs.tar.gz are
# rewritten after every step, so a run cut short returns what it had done.
#
# CRMVAE_GPU_DRY_RUN=1 makes every step a tiny CPU version (no build, doctor on one op, one test, a smoke
# benchmark): tests/test_run_gpu.py runs it to check the files the script returns. PYTHON picks the interpreter.
set -u
cd "$(dirname "$0")/.."
REPO="$PWD"
DEST="${OUT:-$REPO/benchmarks/results}"
mkdir -p "$DEST"
LOGS="$(mktemp -d "${TMPDIR:-/tmp}/crmvae_run_gpu.XXXXXX")"
trap 'rm -rf "$LOGS"' EXIT
PY="${PYTHON:-$(command -v python3 || command -v python)}"
DRY="${CRMVAE_GPU_DRY_RUN:-0}"
TOTAL="${CRMVAE_GPU_BUDGET_S:-480}"
START=$(date +%s)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 CI=true MAX_JOBS="${MAX_JOBS:-16}"
export CRMVAE_FAST_NO_JIT=1   # the in-place build is the one build; a JIT build would redo it in every process

if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=0
    DOCTOR=(--device cpu --ops iw_logsumexp --no-model)
    PYTEST=(tests/test_doctor.py -q -p no:cacheprovider -k compare)
    BENCH=(--smoke --ops latent_step --providers eager --no-plot --quiet)
    SIZES=(--M 2 --B 64 --D 16)
    DDP=(--n-train 512)
else
    SIZES=()
    DDP=(--n-train 16384)
    DOCTOR=()
    PYTEST=(tests -q -p no:cacheprovider --maxfail=20)
    "$PY" -c "import xdist" 2>/dev/null && PYTEST+=(-n 4)
    BENCH=(--plot "$DEST/speedup.png")
fi

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[run_gpu $(elapsed)s] $*"; }
STEPS="| step | exit code | seconds | limit | log in logs.tar.gz |
|---|---|---|---|---|"

tail_of() { [ -f "$LOGS/$1" ] && tail -n "$2" "$LOGS/$1"; }

refresh() {   # summary.md and logs.tar.gz from what is there now; each written beside, then moved in place
    {
        echo "# benchmarks/run_gpu.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)$([ "$DRY" = 1 ] && echo ' (DRY RUN: tiny CPU steps)')"
        echo
        echo "commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown), $(elapsed) s of $TOTAL s"
        echo
        echo '```'; tail_of env.txt 5; echo '```'
        echo
        echo "$STEPS"
        echo
        echo "## doctor"; echo '```'; grep -E "FAIL|^doctor:" "$LOGS/doctor.log" 2>/dev/null | tail -n 40; echo '```'
        echo "## pytest"; echo '```'; tail_of pytest.log 5; echo '```'
        echo "## kernels"; echo '```'; tail_of kernels.txt 8; echo '```'
        echo "## ddp"; tail_of bench_ddp.log 8
        echo; echo "## benchmark table"; tail_of table.md 60
    } > "$DEST/summary.md.tmp"
    mv -f "$DEST/summary.md.tmp" "$DEST/summary.md"
    cp "$DEST/summary.md" "$LOGS/summary.md"
    tar -czf "$DEST/logs.tar.gz.tmp" -C "$LOGS" . && mv -f "$DEST/logs.tar.gz.tmp" "$DEST/logs.tar.gz"
}

# step NAME LIMIT RESERVE LOG COMMAND...: run COMMAND with its output in LOGS/LOG, for at most LIMIT seconds and
# never into the RESERVE seconds that the later steps need; then refresh the summary and the archive.
step() {
    local name=$1 limit=$2 reserve=$3 log=$4; shift 4
    local left=$(( TOTAL - $(elapsed) - reserve ))
    [ "$left" -lt "$limit" ] && limit=$left
    local t0 rc
    t0=$(date +%s)
    if [ "$limit" -lt 5 ]; then
        echo "skipped: no time left in the ${TOTAL} s budget" > "$LOGS/$log"; rc=skipped; limit=-
    else
        say "$name (limit ${limit} s)"
        timeout -s INT -k 10 "$limit" "$@" > "$LOGS/$log" 2>&1
        rc=$?
        [ "$rc" = 124 ] && echo "[run_gpu] $name hit its ${limit} s limit" >> "$LOGS/$log"
    fi
    STEPS="$STEPS
| $name | $rc | $(( $(date +%s) - t0 )) | $limit | $log |"
    say "$name: exit code $rc (124: hit the limit)"
    refresh
}

say "output folder: $DEST"
step env 15 265 env.txt bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv,noheader 2>&1 || echo 'nvidia-smi failed'; \"$PY\" -c \"import sys, torch, triton; print('python', \
sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', \
torch.cuda.is_available() and torch.cuda.get_device_name())\""
cat "$LOGS/env.txt"

if [ "$DRY" = 1 ]; then
    step build 120 205 build.log echo "dry run: the extension is not rebuilt"
else
    step build 120 205 build.log "$PY" setup.py build_ext --inplace --force --build-temp "${TMPDIR:-/tmp}/crmvae_fast_build"
fi
# a built extension is required from here on (a missing one is an error, not a silent eager fallback)
grep -q "^| build | 0 |" <<< "$STEPS" && [ "$DRY" != 1 ] && export CRMVAE_FAST_REQUIRE_EXT=1

step doctor 90 160 doctor.log "$PY" -m crmvae_fast.doctor ${DOCTOR[@]+"${DOCTOR[@]}"} --json "$DEST/doctor.json"
grep -E "^doctor:|^note:" "$LOGS/doctor.log"

step pytest 140 100 pytest.log "$PY" -m pytest "${PYTEST[@]}"
tail -n 3 "$LOGS/pytest.log"

step kernels 40 85 kernels.txt "$PY" benchmarks/measure_latent_kernels.py --json "$DEST/kernels.jsonl" \
    ${SIZES[@]+"${SIZES[@]}"}
step ddp 35 70 bench_ddp.log "$PY" benchmarks/bench_ddp.py --json "$LOGS/ddp_scaling.jsonl" --epochs 2 \
    --budget-s 25 "${DDP[@]}"

LEFT=$(( TOTAL - $(elapsed) - 20 ))
step bench "$LEFT" 20 bench.log "$PY" -m crmvae_fast bench --json "$DEST/results.jsonl" \
    --budget-s $(( LEFT > 90 ? LEFT - 60 : LEFT / 2 )) "${BENCH[@]}"
if [ -f "$DEST/results.jsonl.partial" ]; then   # cut short: keep the rows it measured
    cat "$DEST/results.jsonl.partial" >> "$DEST/results.jsonl" && rm -f "$DEST/results.jsonl.partial"
    say "the suite was cut short: its partial rows were appended to results.jsonl"
fi

step table 15 0 table.md "$PY" benchmarks/make_table.py "$DEST/results.jsonl"
cat "$LOGS/table.md"
say "done: $(ls "$DEST" | tr '\n' ' ')"
