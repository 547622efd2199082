#!/usr/bin/env bash
# The prepared GPU check: GPU tests + kernel table + quick benchmark, in ONE call.
#
#   SN_FUSED_COMMIT=<sha> bash bench/gpu_check.sh [final|dev]     (repo root, on the lent GPU)
#
#   final (default): GPU tests, per-shape kernel table + host-time profile, `python -m bench --quick` (~5 min)
#   dev:             the same plus the launch-knob sweep
#   bench:           GPU tests and `python -m bench --quick` only (when device time is short)
# Logs and results go to $OUT (the device tool brings them back), else ./gpu_out.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET
mode=${1:-final}
status=0

{
  date -u +"%Y-%m-%d %H:%M UTC"
  echo "commit ${SN_FUSED_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

echo "== GPU tests"
timeout 150 python3 -m pytest tests/test_gpu.py tests/test_ops.py -q -x -n 8 --timeout=150 \
  -p no:cacheprovider -o log_level=WARNING 2>&1 | grep -v "^DEBUG" | tee "$OUT/gpu_tests.log" || status=1

if [ "$mode" != bench ]; then
echo "== kernel table"
extra=()
if [ "$mode" = dev ]; then extra=(--sweep --profile); else extra=(--profile); fi
timeout 200 python3 -m bench.kernel_sweep --out "$OUT" "${extra[@]}" 2>&1 | tee "$OUT/kernel_sweep.log" || status=1
fi

echo "== python -m bench --quick"
timeout 185 python3 -m bench --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
