#!/usr/bin/env bash
# Where the forward kernel's time goes on the latency-bound shapes: ONE device call, ~4-5 min.
#
#   SN_FUSED_COMMIT=<sha> bash bench/gpu_probe.sh        (repo root, on the lent GPU)
#
# 1. Nsight Compute on one forward read per shape (launch stats, occupancy, speed of light,
#    warp stall reasons), plus Triton's register/spill counts of each compiled variant.
#    (The large weights' DRAM bytes per read: bench/gpu_check.sh.)
# 2. `python -m bench.kernel_sweep --compile-probe`: host cost of a compiled read.
# 3. The launch-knob sweep on those shapes (forward graph time, one knob at a time, each
#    variant's first read checked against the float64 reference).
#
# Optional: SN_FUSED_NCU_SHAPES / SN_FUSED_SWEEP_SHAPES (MxN lists) override the shapes.
# Complements bench/gpu_check.sh (tests + tables), which should run first on a new commit.
# Logs go straight to $OUT (a killed run still returns them); without $OUT, ./gpu_out.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET
status=0
{
  date -u +"%Y-%m-%d %H:%M UTC"
  echo "commit ${SN_FUSED_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  ncu --version | tail -1
} 2>&1 | tee "$OUT/env.txt"

echo "== ncu: one warm forward read per shape (--launch-skip 2; --clock-control none leaves the clocks alone)"
for s in ${SN_FUSED_NCU_SHAPES:-128x1152 1x8192 24576x20 512x4608}; do
  echo "==== $s"
  timeout 45 ncu --clock-control none --kernel-name regex:spectral_norm_fwd --launch-skip 2 --launch-count 1 \
    --section LaunchStats --section Occupancy --section SpeedOfLight --section WarpStateStats \
    --section MemoryWorkloadAnalysis python3 -m bench.kernel_sweep --reads "$s" || status=1
done 2>&1 | tee "$OUT/ncu.log"

echo "== compile probe"
timeout 60 python3 -m bench.kernel_sweep --no-table --compile-probe 2>&1 | tee "$OUT/compile_probe.log" || status=1

echo "== knob sweep"
timeout 200 python3 -m bench.kernel_sweep --no-table --sweep \
  --sweep-shapes "${SN_FUSED_SWEEP_SHAPES:-128x1152,1x8192,24576x20,512x4608,1000x1536,64x27}" \
  --out "$OUT" 2>&1 | tee "$OUT/knob_sweep.log" || status=1
exit $status
