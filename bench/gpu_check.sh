#!/usr/bin/env bash
# The prepared GPU check: GPU tests + kernel table + quick benchmark, in ONE call.
#
#   SN_FUSED_COMMIT=<sha> bash bench/gpu_check.sh [final|kernels|dev|bench|tests]   (repo root, on the lent GPU)
#
#   final (default): GPU tests, per-shape kernel table with its extras (below) and ncu,
#                    `python -m bench --quick` (~9-10 min with the default extras, a guess)
#   kernels:         `final` without `python -m bench --quick` (~2 min less): kernel work, when the
#                    steps' numbers of the last call still hold for the host path
#   dev:             GPU tests, kernel table, every knob of the launch-knob sweep, the backward
#                    and ON_CHIP sweeps, host profile (instead of the default extras), bench --quick
#   bench:           GPU tests and `python -m bench --quick` only (when device time is short)
#   tests:           the GPU tests only, both reads (~150 s on an H200 in session 16, with the C++
#                    build): what a session whose device time is too short for `kernels` still runs
#
# Optional, same call:
#   SN_FUSED_BASELINE=DIR    also time sn_fused from DIR (a copy of an older checkout's sn_fused/
#                            and bench/, e.g. `mkdir ab && git archive SHA sn_fused bench | tar -x -C
#                            ab`: an untracked folder travels to the device) in a kernel table of its
#                            own (graph times), before this commit's: a same-card A/B of a kernel change
#   SN_FUSED_SWEEP_ARGS="…"  the kernel table's extra parts (unset: the host profile and the
#                            phases launched alone, --phases, then the KEEP_A sweep and a short knob
#                            sweep as sections of their own; set, "" included, those sections and
#                            the later sweeps are left out; final and kernels modes). Measured before and left out to make room:
#                            --eager-ab (session 14: 7.0-8.6x PyTorch through the C++ read),
#                            --bwd-sweep (sessions 3-9), --compile-probe (session 14),
#                            --on-chip-sweep (sessions 8, 9), --sweep of the loads over A (16)
#   SN_FUSED_BUDGET_S=560    the seconds this script may take (each section gets what is left, less
#                            what the sections after it need, and is skipped below 30 s)
#   SN_FUSED_EXTRA_BENCH="…" one more `python -m bench` run with these arguments (e.g. the steps
#                            the quick profile leaves out), results in extra/; at most 240 s
#                            (the 6 BigGAN compile/reduce-overhead steps took ~150 s of compile
#                            warm-up alone on an H100; each step prints its warm-up when it ends,
#                            and each (model, mode) group its ms/step once its steps are timed)
#
# It builds sn_fused._C (in the background, during the GPU tests) and runs tests/test_cpp_read.py
# and tests/test_gpu.py through it, and asks Nsight Compute (where installed) for the DRAM bytes of
# one forward read and one backward of 1536x13824 and 4096x4096.
# Sizes seen on an H200 (2026-11-27, session 16, `kernels` with the sweep of the loads over A,
# 3 shapes x 10 variants, and four ncu runs): 250 s in all, plus ~30 s to start the machine; the
# GPU tests with the C++ build ~150 s of it. On an H100 (session 14, `final` with a baseline):
# 438 s, --quick 117 s of it. Each section prints the time it starts. `kernels` now runs, in this
# order (times are guesses where not measured): the GPU tests ~150 s, the stream and barrier
# probes ~60, the kernel table with --phases and the profile ~80-100, the KEEP_A sweep (4 shapes,
# ~12 variants) ~100, the sweep of warps, partials, stages and registers (3 shapes x 7 entries)
# with what is left of ~240, then the cold, channels-last, misaligned, half-programs and wide-rows
# tables and ncu: each later section skips itself, or is cut, when time runs short, so those
# last ones run only in a second call. Run it with timeout_s 590; with SN_FUSED_BASELINE (its
# table ~60-120 s, first) the sweeps get what is left; `final` (+2 min) only with a shorter
# SN_FUSED_SWEEP_ARGS, and it leaves a baseline only ~50 s.
#
# Logs are written straight to $OUT (so a killed run still returns them); the benchmark's
# JSON/MD/PNG go to a scratch dir, and everything is packed into ONE archive,
# $OUT/gpu_results.tgz, at exit (the device tool brings back at most 8 files).
# Without $OUT, ./gpu_out.
set -uo pipefail
OUT=${OUT:-gpu_out}
W=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET
mode=${1:-final}
case "$mode" in  # a mistyped mode must not run another one: a call is ~10 minutes of a scarce GPU
  final|kernels|dev|bench|tests) ;;
  *) echo "gpu_check.sh: unknown mode '$mode' (final, kernels, dev, bench or tests)" >&2; exit 2 ;;
esac
status=0
# The time this script may take (a device call allows 590 s; the tool kills at its limit, which
# skips the EXIT trap that packs the archive). Later sections get the time left, less what the
# ones after them need, and a section with too little left is skipped and says so.
budget=${SN_FUSED_BUDGET_S:-560}
left() { echo $((budget - SECONDS)); }
within() {  # within SECONDS_WANTED RESERVE: the timeout for a section (0: skip it)
  local t=$(( $(left) - $2 )); [ "$t" -gt "$1" ] && t=$1; [ "$t" -lt 30 ] && t=0; echo "$t"; }
reserve() {  # reserve KERNELS FINAL: what the sections after this one need, by mode (final adds --quick)
  if [ "$mode" = kernels ]; then echo "$1"; else echo "$2"; fi; }
pack() { cp "$OUT"/*.log "$OUT"/env.txt "$W"/ 2>/dev/null; tar -czf "$OUT/gpu_results.tgz" -C "$W" . ; }
trap pack EXIT

{
  date -u +"%Y-%m-%d %H:%M UTC"
  echo "commit ${SN_FUSED_COMMIT:-unknown}  baseline ${SN_FUSED_BASELINE:-none}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

# The C++ read (sn_fused._C, csrc/) builds against this machine's torch in the background (one
# core, ~1-2 min) while the kernel tests run on the Python read path; it is moved into place in
# one rename, so no test process can import half a file. Everything after the wait takes it.
rm -f sn_fused/_C.*.so
( SN_FUSED_BUILD_CPP=1 timeout 300 python3 setup.py -q build_ext -b "$W/cpp" -t "$W/cpp_tmp" \
    && so=$(ls "$W"/cpp/sn_fused/_C.*.so) && cp "$so" "sn_fused/.tmp_C.so" \
    && mv "sn_fused/.tmp_C.so" "sn_fused/$(basename "$so")" ) > "$W/build_cpp.log" 2>&1 &
build_pid=$!

echo "== GPU tests $(date +%T)"
timeout 200 python3 -m pytest tests/test_gpu.py tests/test_ops.py -q -n 8 --timeout=150 \
  -p no:cacheprovider -o log_level=WARNING 2>&1 | grep -v "^DEBUG" | tee "$OUT/gpu_tests.log" || status=1
echo "== sn_fused._C build $(date +%T)"
# Its log stays in the archive; the build's last lines go to gpu_tests.log (the device tool brings
# back at most 8 files, and $OUT holds 8 without a log of its own).
wait $build_pid || status=1
{ tail -5 "$W/build_cpp.log"
  python3 -c "from sn_fused.ops import spectral_norm as s; print('C++ read:', s.CPP_READS)"; } 2>&1 | tee -a "$OUT/gpu_tests.log"
# The GPU tests again, now through the C++ read (CUDA graphs, streams, compile parity, ...).
timeout 150 python3 -m pytest tests/test_cpp_read.py tests/test_gpu.py -q -n 8 --timeout=120 -p no:cacheprovider \
  -o log_level=WARNING 2>&1 | grep -v "^DEBUG" | tee -a "$OUT/gpu_tests.log" || status=1
# The layer's corners on CUDA: double backward, torch.func, forward AD, export, compile, jit.trace,
# the semaphore after to_empty() and after torch code wrote into it.
timeout 120 python3 -m pytest tests/test_parametrizations.py -q -n 8 --timeout=100 -p no:cacheprovider \
  -k "double_backward or torch_func or forward_mode_ad or torch_export or fullgraph or gradient_penalty or semaphore_written or meta_init or jit_trace" \
  -o log_level=WARNING 2>&1 | grep -v "^DEBUG" | tee -a "$OUT/gpu_tests.log" || status=1

if [ "$mode" != bench ] && [ "$mode" != tests ]; then
  : > "$OUT/kernel_sweep.log"  # (the probes and the table append to it)
  # First the two probes (session 24; ~1 min in all, a guess): they ask what the knobs tried since
  # session 3 could not tell apart (bench/NOTES.md v25), so they go before the table's sweep.
  # The ceiling of a pass over A in the kernels' grid (one program per SM, a band of rows each)
  # against a full grid, TMA and torch's kernels, on the two weights beyond L2 (bench/stream_probe.py;
  # the passes ran at 3.2-3.6 TB/s against a copy's 4.25 on an H200, NOTES v17). Appended to the
  # table's log (the device tool brings back at most 8 files).
  t=$(within 100 "$(reserve 250 400)")
  if [ "$mode" != dev ] && [ "$t" != 0 ]; then
    echo "== stream probe: the grid's ceiling on a pass over A $(date +%T)"
    timeout "$t" python3 -m bench.stream_probe --out "$W/stream_probe" 2>&1 | tee -a "$OUT/kernel_sweep.log" || status=1
  fi
  # What one grid barrier costs, alone and as a reduction round (bench/barrier_probe.py; NOTES v18's
  # open question, v25's estimate 1-1.5 us). ~20-30 s, a guess. Appended to the same log.
  t=$(within 45 "$(reserve 250 400)")
  if [ "$mode" != dev ] && [ "$t" != 0 ]; then
    echo "== barrier probe: one grid barrier, one reduction round $(date +%T)"
    timeout "$t" python3 -m bench.barrier_probe --out "$W/barrier_probe" 2>&1 | tee -a "$OUT/kernel_sweep.log" || status=1
  fi
  echo "== kernel table $(date +%T)"
  # Where the time of each launch goes (--phases: each phase of a read and of a backward launched
  # alone, against the one launch; bench/NOTES.md v17) and the host profile; the sweeps follow in
  # sections of their own, most wanted first, so a short call still times the defaults.
  # shellcheck disable=SC2206
  extra=(${SN_FUSED_SWEEP_ARGS---profile --phases})
  [ "$mode" = dev ] && extra=(--sweep --bwd-sweep --on-chip-sweep --profile)
  if [ -n "${SN_FUSED_BASELINE:-}" ]; then
    # The kernel table of an older checkout's sn_fused (graph times, sn_fused only), first, so the
    # sweeps below give way to it: a same-card A/B of a kernel change (the table below is this
    # commit's).
    echo "== kernel table, baseline $SN_FUSED_BASELINE (sn_fused only, graph) $(date +%T)"
    t=$(within 120 "$(reserve 200 360)")
    if [ "$t" = 0 ]; then echo "skipped: $(left) s left" | tee "$OUT/kernel_sweep-baseline.log"
    else (cd "$SN_FUSED_BASELINE" && timeout "$t" python3 -m bench.kernel_sweep --no-torch --graph-only) 2>&1 \
      | tee "$OUT/kernel_sweep-baseline.log" || status=1; fi
  fi
  # (reserve: the KEEP_A sweep and ncu below, and --quick in final mode; ~80-100 s for the table
  # with --phases and the profile, a guess from session 16's)
  t=$(within 300 "$(reserve 150 310)")
  [ "$t" = 0 ] && echo "== kernel table skipped: $(left) s left" | tee -a "$OUT/kernel_sweep.log"
  [ "$t" != 0 ] && { timeout "$t" python3 -m bench.kernel_sweep --out "$W" "${extra[@]}" 2>&1 \
    | tee -a "$OUT/kernel_sweep.log" || status=1; }
  # A program's tile kept in registers through the streaming read (KEEP_A, session 25; the default
  # where the rows fit one tile but the table of partials is too large for ON_CHIP: 1000x1536,
  # 256x8192, 512x2304, 128x2048) against the rescale re-reading A as before (_KEEP_A=0); tiles of
  # twice the streaming tile kept (_KEEP_A_MAX_ELEMENTS=32768: 512x4608's 4 x 8192, not the
  # default); and on 128x1152 against ON_CHIP (_ON_CHIP_MAX_PARTIALS=0 gives it KEEP_A: two
  # barriers and a column each, against one barrier and the whole 18 x 1152 table read by every
  # program). Not yet timed. (~12 variants timed, ~5-8 s each, a guess.)
  t=$(within 120 "$(reserve 60 220)")
  if [ -z "${SN_FUSED_SWEEP_ARGS+set}" ] && [ "$mode" != dev ] && [ "$t" != 0 ]; then
    echo "== kernel sweep: tiles kept through the streaming read (KEEP_A) $(date +%T)"
    timeout "$t" python3 -m bench.kernel_sweep --no-table --sweep \
      --sweep-knobs _KEEP_A,_ON_CHIP_MAX_PARTIALS,_KEEP_A_MAX_ELEMENTS --sweep-shapes 1000x1536,256x8192,512x4608,128x1152 \
      --out "$W/keep_a" 2>&1 | tee -a "$OUT/kernel_sweep.log" || status=1
  fi
  # The next sweep (forward and backward alone per variant) on the weights whose phases were timed:
  # 16 warps per program (with the backward's tiles at 16384 elements: both kernels compile without
  # spills, ptxas sm_90a; more warps to issue the loads of phase ST, the rescale and the backward's
  # passes, which ran at 76-87 % of a copy's rate), phase R's partials in one step on 1536x13824
  # (_PARTIALS_TILE_ELEMENTS 32768; 16384, two steps, is the default since session 23: -0.6 to -1.1
  # us), the backward's GRAD pass pipelined (_GRAD_STAGES: 2 with its 32768-element tiles, 3 with
  # 16384), phase ST 4 stages deep and ptxas free to use 255 registers (_MAXNREG: it keeps room for
  # a second CTA per SM otherwise; session 21). Measured before and left out: the pipelined loads
  # against none (1/1) and the other variants of the loads over A (session 16, three runs on an
  # H200). Each entry compiles its variant of both kernels (~5 s) and times both; a sweep cut short
  # keeps the lines it printed.
  t=$(within 240 "$(reserve 60 220)")
  if [ -z "${SN_FUSED_SWEEP_ARGS+set}" ] && [ "$mode" != dev ] && [ "$t" != 0 ]; then
    echo "== kernel sweep: warps, partials, GRAD stages, load stages, registers $(date +%T)"
    timeout "$t" python3 -m bench.kernel_sweep --no-table --sweep \
      --sweep-knobs _NUM_WARPS=16,_NUM_WARPS+_BWD_TILE_ELEMENTS,_PARTIALS_TILE_ELEMENTS=32768,_GRAD_STAGES,_GRAD_STAGES+_BWD_TILE_ELEMENTS,_LOAD_STAGES=4,_MAXNREG \
      --sweep-shapes 768x6912,1536x13824,4096x4096 --out "$W/sweep" 2>&1 | tee -a "$OUT/kernel_sweep.log" || status=1
  fi
  # The weights that fit in L2 with L2 flushed before every read (the table above replays 20 reads
  # with L2 warm, where they can beat the DRAM floor: bench/NOTES.md v19): issue #3's goals judged
  # on cold reads too. sn_fused only, graph times.
  t=$(within 60 "$(reserve 90 250)")
  if [ "$mode" != dev ] && [ "$t" != 0 ]; then
    echo "== kernel table, L2 flushed before every read (sn_fused, graph) $(date +%T)"
    timeout "$t" python3 -m bench.kernel_sweep --no-torch --graph-only --reads-per-graph 1 \
      --table-shapes 64x27,128x1152,512x4608,768x6912,1x8192,24576x20,1000x1536 --out "$W/cold" 2>&1 \
      | tee "$OUT/kernel_sweep-cold.log" || status=1
  fi
  # ab_table SECONDS NAME KERNEL_SWEEP_ARGS...: a kernel table of this commit's kernels, then with
  # SN_FUSED_BASELINE the baseline's through this commit's kernel_sweep.py (run as a script from
  # the baseline's folder: an older kernel_sweep.py may lack the options), half the time each.
  # Appended to the L2-flushed table's log: the device tool brings back at most 8 files, and
  # `final` mode writes 8 with it.
  ab_table() {
    local t=$1 name=$2 repo=$PWD failed=0
    shift 2
    timeout $((t / 2)) python3 -m bench.kernel_sweep "$@" --out "$W/$name" || failed=1
    if [ -n "${SN_FUSED_BASELINE:-}" ]; then
      echo "# baseline $SN_FUSED_BASELINE: its sn_fused, this commit's bench/kernel_sweep.py"
      (cd "$SN_FUSED_BASELINE" && PYTHONPATH=. timeout $((t / 2)) python3 "$repo/bench/kernel_sweep.py" "$@") \
        || failed=1
    fi
    [ "$failed" = 0 ]
  }
  # Channels-last 3x3 conv weights (session 19: their columns walked in memory order, one stride,
  # instead of A's three; ptxas sm_90a: training reads' spills of 104-472 bytes and 12 KB in
  # 768x768x3x3's backward gone, eval reads' 348 down to 8-12, the tiles' loads 16 bytes wide
  # instead of 4). The table above has the same matrices contiguous.
  t=$(within 100 "$(reserve 60 220)")
  if [ "$mode" != dev ] && [ "$t" != 0 ]; then
    echo "== kernel table, channels-last 3x3 conv weights (sn_fused, graph) $(date +%T)"
    ab_table "$t" channels_last --no-torch --graph-only --channels-last --table-shapes 512x4608,768x6912,1536x13824 \
      2>&1 | tee -a "$OUT/kernel_sweep-cold.log" || status=1
  fi
  # Rows not 16-element aligned. Odd strides (768x6901, 768x3501; session 21): their backward
  # streams 2x4096 tiles where the default 8x4096 ones spilled 2.2 KB per thread streaming and
  # 336-752 bytes on chip (ptxas sm_90a). Strides of 4k (768x6900, 768x3500, BigGAN G's 1536x148;
  # session 22): the kernels are told (ROW_ALIGN), so they load 16 bytes at a time with the
  # aligned weights' tiles. Compare with the aligned 768x6912 and 768x3456 of the main table.
  t=$(within 80 "$(reserve 60 220)")
  if [ "$mode" != dev ] && [ "$t" != 0 ]; then
    echo "== kernel table, rows not 16-element aligned (sn_fused, graph) $(date +%T)"
    ab_table "$t" misaligned --no-torch --graph-only --table-shapes 768x6901,768x3501,768x6900,768x3500,1536x148 \
      2>&1 | tee -a "$OUT/kernel_sweep-cold.log" || status=1
  fi
  # Rows told 4-element aligned (ROW_ALIGN, measured on in session 23: 24576x20 5.9/4.7 us forward/
  # backward against 6.5/5.6 off, 1536x148 7.3/5.1 against 8.6/8.7): half the programs now that
  # their loads vectorize: 24576x20 60 instead of 120 (_default_grid gives narrow rows twice the
  # programs because their loads did not vectorize), 1536x148 14 instead of 28.
  t=$(within 90 "$(reserve 60 200)")
  if [ -z "${SN_FUSED_SWEEP_ARGS+set}" ] && [ "$mode" != dev ] && [ "$t" != 0 ]; then
    echo "== kernel sweep: half the programs on 4-element aligned rows $(date +%T)"
    timeout "$t" python3 -m bench.kernel_sweep --no-table --sweep --sweep-knobs _MIN_ELEMENTS_PER_PROGRAM=16384 \
      --sweep-shapes 24576x20,1536x148 --out "$W/half_programs" 2>&1 | tee -a "$OUT/kernel_sweep.log" || status=1
  fi
  t=$(within 150 "$(reserve 60 220)")
  if [ -z "${SN_FUSED_SWEEP_ARGS+set}" ] && [ "$mode" != dev ] && [ "$t" != 0 ]; then
    # The backward's rows wider than its blocks on chip (session 17's default; 1x8192's backward
    # 5.4 -> 2.8 us against 20e8c06 in session 23) against streaming (_BWD_ON_CHIP_MAX_ROW=0) on the
    # two weights where they differ, 1x8192 and 256x8192 (untimed). Appended to the same log.
    echo "== kernel sweep: the backward's wide rows $(date +%T)"
    timeout "$t" python3 -m bench.kernel_sweep --no-table --sweep --sweep-knobs _BWD_ON_CHIP_MAX_ROW \
      --sweep-shapes 256x8192,1x8192 --out "$W/bwd_rows" 2>&1 | tee -a "$OUT/kernel_sweep.log" || status=1
  fi
  # DRAM bytes and L2 hit rate of one forward read (floor: A read once, W_sn written once) and of
  # one backward (floor: G and W read once, dW written once), the third of each in --reads: where
  # the time goes, bytes or rate (bench/NOTES.md v14-v16); and what the warps wait on (stall
  # reasons: long scoreboard = global loads, barrier = the block-wide sums; v15's latency model).
  if command -v ncu >/dev/null; then
    echo "== ncu: DRAM bytes of one forward read and one backward of the large weights $(date +%T)"
    # (session 14, forward: 1536x13824 1.73x A's bytes read at 2.2 TB/s; 4096x4096 1.57x)
    # (the group runs in a subshell, piped into tee: its exit status carries a failure out)
    { failed=0
      # shape[:knobs of the run, as SN_FUSED_... environment variables]
      # (session 16 counted the unpipelined loads' and the rescale prefetch's; now the defaults)
      for s in 1536x13824 4096x4096; do
        [ "$(within 75 "$(reserve 5 190)")" = 0 ] && { echo "# $s skipped: $(left) s left"; continue; }
        IFS=: read -r shape knobs <<< "$s"
        echo "# $shape ${knobs:-(defaults)}"
        # --reads: the registration's read, then forward, backward, three times; skipping 5
        # launches of either kernel leaves the third of each (tests/test_bench_kernel_sweep.py).
        # shellcheck disable=SC2046
        env $(tr , ' ' <<< "$knobs") timeout 75 ncu --clock-control none \
          --kernel-name regex:spectral_norm_ --launch-skip 5 --launch-count 2 \
          --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,gpu__time_duration.sum \
          --section WarpStateStats python3 -m bench.kernel_sweep --reads "$shape" || failed=1
      done
      [ "$failed" = 0 ]; } 2>&1 | tee "$OUT/ncu_dram.log"; [ "${PIPESTATUS[0]}" = 0 ] || status=1
  fi
fi

if [ "$mode" != kernels ] && [ "$mode" != tests ]; then
  echo "== python -m bench --quick $(date +%T)"
  t=$(within 185 5)
  if [ "$t" = 0 ]; then echo "skipped: $(left) s left" | tee "$OUT/bench.log"
  else timeout "$t" python3 -m bench --quick --out "$W" 2>&1 | tee "$OUT/bench.log" || status=1; fi
fi
if [ -n "${SN_FUSED_EXTRA_BENCH:-}" ]; then
  echo "== python -m bench $SN_FUSED_EXTRA_BENCH"
  # shellcheck disable=SC2086
  timeout 240 python3 -m bench $SN_FUSED_EXTRA_BENCH --out "$W/extra" 2>&1 | tee "$OUT/bench-extra.log" || status=1
fi
exit $status
