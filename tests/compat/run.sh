#!/usr/bin/env bash
# Runs the kernel, model and extension tests of crmvae_fast under another torch (and the triton it pulls):
#
#     bash tests/compat/run.sh TORCH_VERSION [--quick]
#
# 1. a venv at ${CRMVAE_COMPAT_DIR:-/tmp/crmvae_compat}/torch-TORCH_VERSION (kept and reused: it is a cache;
#    CRMVAE_COMPAT_FRESH=1 makes it anew) with torch==TORCH_VERSION from the package index, the torchvision of
#    that torch (multivae==1.0.3 needs one) and the test extras;
# 2. a copy of this checkout (tracked and untracked, not ignored, files) beside it, where the C++ extension is
#    built in place against that torch (CPU build: no GPU here);
# 3. where the system nvcc's CUDA major differs from the torch wheel's (torch.version.cuda), nvcc and the runtime
#    headers of the wheel's CUDA major from the package index (nvidia-cuda-nvcc-cuXX, nvidia-cuda-runtime-cuXX),
#    so the CUDA source of the extension is compiled by the CUDA it would be built with;
# 4. pytest with CI=true and CRMVAE_FAST_REQUIRE_EXT=1: the Triton kernels through the interpreter, their sm_80 /
#    sm_90 compiles and the kernel report, the extension (CPU, and the nvcc compile of its CUDA source), the model
#    on the fused path. --quick (the CI job) runs a smaller selection that still runs every kernel through the
#    interpreter and the fused model.
#
# Prints one line `torch X triton Y python Z: N passed, M failed, S skipped (reasons)` last; exits non-zero when
# a test failed or errored or a step before the tests failed. Extra pip options (e.g. PIP_CONFIG_FILE=/dev/null
# for a torch above a machine's pip cap) come from the environment. CRMVAE_COMPAT_PYTHON picks the interpreter
# of the venv (default python3).
set -euo pipefail

usage() { echo "usage: bash tests/compat/run.sh TORCH_VERSION [--quick]   (e.g. 2.11.0)" >&2; exit 2; }

# The whole script is one function, read before it runs: editing the file during a run does not change that run.
main() {

    [ $# -ge 1 ] || usage
    TORCH_VERSION=$1; shift
    QUICK=0
    for arg in "$@"; do
        case $arg in
            --quick) QUICK=1 ;;
            *) usage ;;
        esac
    done
    [[ $TORCH_VERSION =~ ^2\.([0-9]+)\.[0-9]+$ ]] || { echo "run.sh: expected a torch version like 2.11.0, got '$TORCH_VERSION'" >&2; exit 2; }
    TORCHVISION="0.$(( BASH_REMATCH[1] + 15 )).*"  # torchvision 0.(N+15) goes with torch 2.N

    ROOT=$(cd "$(dirname "$0")/../.." && pwd)
    BASE=${CRMVAE_COMPAT_DIR:-/tmp/crmvae_compat}
    VENV=$BASE/torch-$TORCH_VERSION
    SRC=$VENV/src
    LOG=$VENV/logs
    PY=$VENV/bin/python
    start=$(date +%s)

    if [ "${CRMVAE_COMPAT_FRESH:-0}" = 1 ] || [ ! -f "$VENV/.installed" ]; then
        rm -rf "$VENV"
        mkdir -p "$BASE"
        "${CRMVAE_COMPAT_PYTHON:-python3}" -m venv "$VENV"
        mkdir -p "$LOG"
        echo "[compat] installing torch==$TORCH_VERSION torchvision==$TORCHVISION into $VENV"
        "$PY" -m pip install -q --upgrade pip setuptools wheel >"$LOG/pip.log" 2>&1
        local deps=("multivae==1.0.3" pytest hypothesis scipy numpy packaging pybind11 ninja)
        if ! "$PY" -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION" "${deps[@]}" \
                >>"$LOG/pip.log" 2>&1; then
            # a torch newer than any torchvision release (torchvision pins its torch): the newest torchvision
            # without its dependencies, recorded in the venv and said in the summary
            echo "[compat] no torchvision==$TORCHVISION for torch $TORCH_VERSION: the newest one, --no-deps"
            if ! { "$PY" -m pip install -q "torch==$TORCH_VERSION" >>"$LOG/pip.log" 2>&1 &&
                   "$PY" -m pip install -q --no-deps torchvision >>"$LOG/pip.log" 2>&1 &&
                   "$PY" -m pip install -q "torch==$TORCH_VERSION" "${deps[@]}" >>"$LOG/pip.log" 2>&1; }; then
                tail -20 "$LOG/pip.log" >&2
                echo "torch $TORCH_VERSION: install failed (see $LOG/pip.log)"
                exit 1
            fi
            echo "torchvision installed --no-deps (none released for torch $TORCH_VERSION)" >"$VENV/.note"
        fi
        touch "$VENV/.installed"
    fi
    mkdir -p "$LOG"
    read -r TV TRV PYV CUDAV < <("$PY" -c "import sys, torch, triton; print(torch.__version__, triton.__version__, \
    '%d.%d.%d' % sys.version_info[:3], torch.version.cuda)")
    local NOTE=""
    [ -f "$VENV/.note" ] && NOTE="; $(cat "$VENV/.note")"
    echo "[compat] torch $TV triton $TRV python $PYV (CUDA $CUDAV wheel), installed in $(( $(date +%s) - start )) s$NOTE"

    # A fresh copy of the checkout: the extension is built there, against this torch, never in the checkout itself.
    rm -rf "$SRC"
    mkdir -p "$SRC"
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SRC")
    echo "[compat] building the C++ extension in place"
    if ! (cd "$SRC" && "$PY" setup.py build_ext --inplace >"$LOG/build.log" 2>&1); then
        tail -30 "$LOG/build.log" >&2
        echo "torch $TV triton $TRV python $PYV: extension build failed (see $LOG/build.log)"
        exit 1
    fi

    # nvcc of the wheel's CUDA major (torch compiles extensions only with a matching one)
    NVCC_NOTE=""
    want=${CUDAV%%.*}
    have=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\..*/\1/p' || true)
    if [ "$CUDAV" = None ]; then
        NVCC_NOTE="no CUDA in this torch build: the CUDA source is not compiled"
    elif [ "$have" != "$want" ]; then
        CUDA_DIR=$VENV/cuda-$want
        if [ ! -x "$CUDA_DIR/bin/nvcc" ]; then
            echo "[compat] system nvcc is CUDA ${have:-absent}, torch's is $CUDAV: nvcc $want from the package index"
            if "$PY" -m pip install -q "nvidia-cuda-nvcc-cu$want==$CUDAV.*" "nvidia-cuda-runtime-cu$want==$CUDAV.*" \
                    >>"$LOG/pip.log" 2>&1; then
                site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
                rm -rf "$CUDA_DIR" && mkdir -p "$CUDA_DIR"
                for d in "$site"/nvidia/cuda_nvcc/*/ "$site"/nvidia/cuda_runtime/*/; do
                    [ "$(basename "$d")" = __pycache__ ] && continue
                    mkdir -p "$CUDA_DIR/$(basename "$d")"
                    cp -rsf "$d". "$CUDA_DIR/$(basename "$d")"/
                done
                [ -d "$CUDA_DIR/lib" ] && [ ! -e "$CUDA_DIR/lib64" ] && ln -s lib "$CUDA_DIR/lib64"
            fi
        fi
        if [ -x "$CUDA_DIR/bin/nvcc" ]; then
            export PATH=$CUDA_DIR/bin:$PATH CUDA_HOME=$CUDA_DIR
            NVCC_NOTE="nvcc $($CUDA_DIR/bin/nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p') from nvidia-cuda-nvcc-cu$want"
        else
            NVCC_NOTE="no nvcc for CUDA $want (system nvcc is ${have:-absent}; nvidia-cuda-nvcc-cu$want==$CUDAV.* did not install or has no bin/nvcc): the CUDA source is not compiled"
        fi
    else
        NVCC_NOTE="system nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"
    fi
    echo "[compat] CUDA source: $NVCC_NOTE"

    if [ $QUICK = 1 ]; then
        # every Triton kernel (latent step, poe, likelihood) forward and backward through the interpreter, the
        # extension, the model on the fused path against the eager one, the sm_80/sm_90 compile of every kernel
        SELECT=(tests/test_latent_step.py tests/test_kernels_compile.py tests/test_kernel_report.py
            tests/test_iw_logsumexp.py tests/test_versions.py
                "tests/test_poe.py::test_matches_multivae" "tests/test_poe.py::test_subsets_match_multivae"
                "tests/test_likelihood.py::test_matches_the_eager_twin_with_masks_and_nan_placeholders"
                "tests/test_model_fused.py::test_fused_model_equals_eager_on_the_same_noise"
                "tests/test_model_fused.py::test_fused_training_step_compiles_without_graph_breaks"
                tests/test_extension_build.py)
    else
        # the kernels (interpreter, sm_80/sm_90 compiles, kernel report), the extension, the model and its
        # distributed / MultiVae workflows; not the CLI, benchmark-count, wheel and reliability files (version-free)
        SELECT=(tests/test_latent_step.py tests/test_poe.py tests/test_likelihood.py tests/test_iw_logsumexp.py
                tests/test_joint_nll_block.py tests/test_kernels_compile.py tests/test_kernel_report.py
                tests/test_extension_build.py tests/test_model.py tests/test_model_fused.py
                tests/test_model_vs_multivae.py tests/test_multivae_workflow.py tests/test_distributed.py
                tests/test_versions.py)
    fi
    echo "[compat] pytest ${SELECT[*]}"
    set +e
    (cd "$SRC" && CI=true CRMVAE_FAST_REQUIRE_EXT=1 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$LOG/junit.xml" \
        "${SELECT[@]}" >"$LOG/pytest.log" 2>&1)
    rc=$?
    set -e
    tail -25 "$LOG/pytest.log"
    SUMMARY=$("$PY" - "$LOG/junit.xml" <<'PYEOF'
import collections, sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception as exc:  # pytest died before writing its report
    print(f"no test report ({exc.__class__.__name__})")
    sys.exit()
n = collections.Counter()
reasons = collections.Counter()
for case in root.iter("testcase"):
    kinds = [c.tag for c in case]
    if "failure" in kinds or "error" in kinds:
        n["failed"] += 1
    elif "skipped" in kinds:
        n["skipped"] += 1
        msg = case.find("skipped").get("message", "")
        reasons[msg.strip()[:120]] += 1
    else:
        n["passed"] += 1
why = "; ".join(f"{k} x{v}" for k, v in reasons.most_common())
print(f"{n['passed']} passed, {n['failed']} failed, {n['skipped']} skipped" + (f" ({why})" if why else ""))
PYEOF
    )
    echo "[compat] $(( $(date +%s) - start )) s in all; CUDA source: $NVCC_NOTE; logs in $LOG"
    echo "torch $TV triton $TRV python $PYV: $SUMMARY$NOTE"
    [ $rc = 0 ]
}

main "$@"
