#!/usr/bin/env bash
# The test command (README): a fresh CPU-only machine needs nothing else.
#
#   bash tests/run.sh [pytest args...]
#
# Installs what it needs into .venv (.ci/env.sh; SN_FUSED_PYTHON=... uses a ready Python), then
#  1. runs the whole suite with TRITON_INTERPRET=1: CPU tensors go through the
#     real Triton kernels in Triton's interpreter (GPU tests run dry, tests/test_gpu.py);
#  2. runs the nn-level suites again without the interpreter: the pure-PyTorch
#     fallback path that CPU users get;
#  3. where the C++ read (sn_fused._C) was built, which is the default (stage 1 then reads
#     layers through it), runs the layer suites through the kernels once more with it
#     switched off (SN_FUSED_CPP=0): the Python read path that installs without it get.
# Long fuzz runs: SN_FUSED_SLOW=1 bash tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/env.sh

echo "== 1/3: kernels through the Triton interpreter (TRITON_INTERPRET=1)"
# (tests/test_gpu.py runs dry there: its tests that need no CUDA of their own, on weights up to
# 300k elements, planned for a 132-SM card and run phase by phase)
TRITON_INTERPRET=1 SN_FUSED_GPU_DRY_RUN="${SN_FUSED_GPU_DRY_RUN:-1}" \
  SN_FUSED_GPU_DRY_MAX_ELEMENTS="${SN_FUSED_GPU_DRY_MAX_ELEMENTS:-300000}" \
  "$VPY" -m pytest tests -p no:cacheprovider "$@"

echo "== 2/3: the pure-PyTorch fallback path (no interpreter)"
"$VPY" -m pytest tests/test_parametrizations.py tests/test_parametrizations_stateful.py tests/test_convert.py \
  tests/test_distributed.py tests/test_failure_modes.py -p no:cacheprovider "$@"

if [ "${SN_FUSED_REQUIRE_CPP:-0}" = "1" ]; then
  echo "== 3/3: layers through the kernels, Python read path (TRITON_INTERPRET=1 SN_FUSED_CPP=0)"
  TRITON_INTERPRET=1 SN_FUSED_CPP=0 "$VPY" -m pytest tests/test_parametrizations.py \
    tests/test_parametrizations_stateful.py tests/test_failure_modes.py -p no:cacheprovider "$@"
else
  echo "== 3/3: skipped (sn_fused._C not built: stage 1 read layers through the Python path)"
fi
