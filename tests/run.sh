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
#     switched off (SN_FUSED_CPP=0): the Python read path that installs without it get;
#  4. runs the kernel and layer suites through the interpreter on the newest torch and Triton
#     pip installs here (.ci/env.sh's NEWEST_STACK, in .venv-newest), with sn_fused._C built
#     against that torch in a copy of the tree: what a user who upgrades gets. Skipped with
#     SN_FUSED_PYTHON (a GPU machine's own stack) or SN_FUSED_NEWEST=0.
# Long fuzz runs: SN_FUSED_SLOW=1 bash tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/env.sh

echo "== 1/4: kernels through the Triton interpreter (TRITON_INTERPRET=1)"
# (tests/test_gpu.py runs dry there: its tests that need no CUDA of their own, on weights up to
# 300k elements, planned for a 132-SM card and run phase by phase)
TRITON_INTERPRET=1 SN_FUSED_GPU_DRY_RUN="${SN_FUSED_GPU_DRY_RUN:-1}" \
  SN_FUSED_GPU_DRY_MAX_ELEMENTS="${SN_FUSED_GPU_DRY_MAX_ELEMENTS:-300000}" \
  "$VPY" -m pytest tests -p no:cacheprovider "$@"

echo "== 2/4: the pure-PyTorch fallback path (no interpreter)"
"$VPY" -m pytest tests/test_parametrizations.py tests/test_parametrizations_stateful.py tests/test_convert.py \
  tests/test_distributed.py tests/test_failure_modes.py -p no:cacheprovider "$@"

if [ "${SN_FUSED_REQUIRE_CPP:-0}" = "1" ]; then
  echo "== 3/4: layers through the kernels, Python read path (TRITON_INTERPRET=1 SN_FUSED_CPP=0)"
  TRITON_INTERPRET=1 SN_FUSED_CPP=0 "$VPY" -m pytest tests/test_parametrizations.py \
    tests/test_parametrizations_stateful.py tests/test_failure_modes.py -p no:cacheprovider "$@"
else
  echo "== 3/4: skipped (sn_fused._C not built: stage 1 read layers through the Python path)"
fi

if [ -n "${SN_FUSED_PYTHON:-}" ] || [ "${SN_FUSED_NEWEST:-1}" = "0" ]; then
  echo "== 4/4: skipped (the newest torch and Triton: SN_FUSED_PYTHON or SN_FUSED_NEWEST=0)"
else
  echo "== 4/4: kernels and layers on the newest torch and Triton here (${NEWEST_STACK[*]}; TRITON_INTERPRET=1)"
  venv_with .venv-newest "${NEWEST_STACK[@]}" pytest hypothesis pytest-benchmark pytest-xdist
  NPY=$PWD/.venv-newest/bin/python
  # A copy of the tree, so that its sn_fused._C (built against this torch) leaves the one above
  # in place. Two workers: the suites below take ~6 min on one core.
  copy=$(mktemp -d)
  trap 'rm -rf "$copy"' EXIT
  cp -r sn_fused csrc tests bench setup.py pyproject.toml "$copy"/
  rm -f "$copy"/sn_fused/_C*.so
  (
    cd "$copy"
    if [ "${SN_FUSED_BUILD_CPP:-1}" != "0" ]; then  # (as above: a failed build stops the run)
      if ! SN_FUSED_BUILD_CPP=1 "$NPY" setup.py -q build_ext --inplace >build.log 2>&1; then
        cat build.log
        echo "error: building sn_fused._C against ${NEWEST_STACK[0]} failed" >&2
        exit 1
      fi
    fi
    "$NPY" -c 'import torch, triton; print(f"torch {torch.__version__}  triton {triton.__version__}")'
    TRITON_INTERPRET=1 PYTHONPATH="$copy" "$NPY" -m pytest -n 2 \
      tests/test_ops.py tests/test_interpreter_bf16.py tests/test_single_launch.py tests/test_compile_sm90.py \
      tests/test_parametrizations.py tests/test_parametrizations_stateful.py tests/test_failure_modes.py \
      tests/test_cpp_read.py tests/test_convert.py -p no:cacheprovider "$@"
  )
fi
