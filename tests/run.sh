#!/usr/bin/env bash
# The test command (README): a fresh CPU-only machine needs nothing else.
#
#   bash tests/run.sh [pytest args...]
#
# Installs what it needs into .venv (.ci/env.sh; SN_FUSED_PYTHON=... uses a ready Python), then
#  1. runs the whole suite with TRITON_INTERPRET=1: CPU tensors go through the
#     real Triton kernels in Triton's interpreter (GPU tests skip without CUDA);
#  2. runs the nn-level suites again without the interpreter: the pure-PyTorch
#     fallback path that CPU users get.
# Long fuzz runs: SN_FUSED_SLOW=1 bash tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/env.sh

echo "== 1/2: kernels through the Triton interpreter (TRITON_INTERPRET=1)"
TRITON_INTERPRET=1 "$VPY" -m pytest tests -p no:cacheprovider "$@"

echo "== 2/2: the pure-PyTorch fallback path (no interpreter)"
"$VPY" -m pytest tests/test_parametrizations.py tests/test_convert.py tests/test_distributed.py \
  tests/test_failure_modes.py -p no:cacheprovider "$@"
