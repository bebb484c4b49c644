#!/usr/bin/env bash
# Run our kernels and the planted bugs under triton-viz's sanitizer (tests/sanitizer/test_triton_viz.py).
#
# triton-viz 3.0 (its only release) does not import with triton >= 3.7, so this makes its own venv with the
# newest triton it supports, 3.6.0, and numpy < 2.4 (triton 3.6's interpreter needs it). The venv sees the
# system's site-packages for torch and the test dependencies: the sanitizer only needs triton's interpreter,
# and torch merely holds the CPU tensors (checked with torch 2.14.1; pip warns that this torch wants triton 3.8).
#
#   tests/sanitizer/run_triton_viz.sh [pytest args]     venv: $TRITON_VIZ_VENV, default .venv-triton-viz
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${TRITON_VIZ_VENV:-.venv-triton-viz}"
if [ ! -x "$VENV/bin/python" ]; then
    python -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install -q "triton==3.6.0" "triton-viz==3.0" "numpy==2.3.5"
"$VENV/bin/python" -c "import triton, triton_viz, torch; print('triton', triton.__version__, 'triton-viz', \
triton_viz.__version__, 'torch', torch.__version__)"
export TRITON_INTERPRET=1
exec "$VENV/bin/python" -m pytest tests/sanitizer/test_triton_viz.py -q -rxs "$@"
