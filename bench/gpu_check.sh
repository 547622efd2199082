#!/usr/bin/env bash
# The prepared GPU check: GPU tests + a quick benchmark, in ONE call of a few minutes.
#
#   bash bench/gpu_check.sh [quick|sweep|full]      (on the lent H100/H200, repo root)
#
# Writes logs and results under $OUT (the device tool fetches them), else ./gpu_out.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET
mode=${1:-quick}
status=0

{
  date -u +"%Y-%m-%d %H:%M UTC"
  git rev-parse HEAD 2>/dev/null || echo "commit unknown"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

echo "== GPU tests"
timeout 300 python3 -m pytest tests/test_gpu.py -q -x -n 8 --timeout=150 -p no:cacheprovider \
  2>&1 | tee "$OUT/gpu_tests.log" || status=1

echo "== kernel sweep"
sweep_args=()
[ "$mode" = sweep ] && sweep_args=(--sweep)
timeout 240 python3 -m bench.kernel_sweep --out "$OUT" "${sweep_args[@]}" 2>&1 | tee "$OUT/kernel_sweep.log" || status=1

if [ "$mode" = full ] || [ "$mode" = quick ] && [ -f bench/__main__.py ]; then
  echo "== python -m bench --quick"
  timeout 200 python3 -m bench --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log" || status=1
fi
exit $status
