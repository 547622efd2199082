#!/usr/bin/env bash
# The main job (README): the benchmark / demo. Works on a fresh machine.
#
#   bash bench/run.sh [--quick] [--out DIR] ...     (arguments go to `python -m bench`)
#
# With a GPU: sn_fused vs PyTorch's spectral norm per layer and per training step,
# against the memory floor. Without one: the kernels checked against the float64
# reference through Triton's interpreter, the CPU paths timed, and a clear note
# that GPU numbers need a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/env.sh
"$VPY" -m bench "$@"
