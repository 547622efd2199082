"""The kernels compile for Hopper (sm_90) on a machine without a GPU.

The interpreter runs the Triton source as Python, so it accepts programs the
compiler rejects (mismatched types across branches, unsupported ops). Here the
real compiler lowers both kernels to a cubin for sm_90, in a subprocess without
``TRITON_INTERPRET`` (the interpreter replaces ``triton.jit`` at import time).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sn_fused.ops import kernels as K

    def signature(fn, pointers, constexprs):
        return {name: "constexpr" if name in constexprs else pointers.get(name, "fp32" if name == "eps" else "i32")
                for name in fn.arg_names}

    target = GPUTarget("cuda", 90, 32)
    fwd = {n: "*fp32" for n in ("w_ptr", "out_ptr", "u_ptr", "v_ptr", "saved_ptr", "sigma_buf_ptr", "ws_ptr")}
    fwd["sem_ptr"] = "*i32"
    bwd = {n: "*bf16" for n in ("g_ptr", "w_ptr", "dw_ptr", "saved_ptr")}
    bwd.update(ws_ptr="*fp32", sem_ptr="*i32")

    def fwd_case(**blocks):
        defaults = dict(NCOL=1, NCOL_V=1, TRAINING=True, PHASE=-1, KEEP_A=False, LOAD_STAGES=1, RESCALE_STAGES=1,
                        LOAD_PREFETCH=0, RESCALE_PREFETCH=0, ROW_ALIGN=1)
        return (K.spectral_norm_fwd_kernel, fwd, {**defaults, **blocks})

    def bwd_case(**blocks):
        return (K.spectral_norm_bwd_kernel, bwd, {**dict(NCOL_V=1, PHASE=-1, GRAD_STAGES=1, ROW_ALIGN=1), **blocks})

    cases = [  # streaming, KEEP_A and ON_CHIP, training and eval, strided (NCOL > 1) layouts
        fwd_case(BLOCK_M=16, BLOCK_N=512, BLOCK_R=16, BLOCK_C=128, BLOCK_P=128, BLOCK_Q=32, ROW_IN_TILE=False,
                 ON_CHIP=False),
        fwd_case(BLOCK_M=2, BLOCK_N=8192, BLOCK_R=8, BLOCK_C=64, BLOCK_P=256, BLOCK_Q=64, ROW_IN_TILE=True,
                 ON_CHIP=False),
        fwd_case(BLOCK_M=2, BLOCK_N=8192, BLOCK_R=8, BLOCK_C=64, BLOCK_P=256, BLOCK_Q=64, ROW_IN_TILE=True,
                 ON_CHIP=False, TRAINING=False, LOAD_STAGES=3, RESCALE_STAGES=2),
        fwd_case(BLOCK_M=4, BLOCK_N=4096, BLOCK_R=32, BLOCK_C=32, BLOCK_P=256, BLOCK_Q=256, ROW_IN_TILE=True,
                 ON_CHIP=False, LOAD_PREFETCH=1, RESCALE_PREFETCH=1),
        fwd_case(BLOCK_M=4, BLOCK_N=64, BLOCK_R=32, BLOCK_C=64, BLOCK_P=8, BLOCK_Q=8, ROW_IN_TILE=True,
                 ON_CHIP=False, NCOL=3, TRAINING=False),
        fwd_case(BLOCK_M=4, BLOCK_N=64, BLOCK_R=32, BLOCK_C=64, BLOCK_P=8, BLOCK_Q=8, ROW_IN_TILE=False,
                 ON_CHIP=False, NCOL_V=2),
        fwd_case(BLOCK_M=8, BLOCK_N=2048, BLOCK_R=8, BLOCK_C=16, BLOCK_P=256, BLOCK_Q=256, ROW_IN_TILE=True,
                 ON_CHIP=False, KEEP_A=True),
        fwd_case(BLOCK_M=16, BLOCK_N=64, BLOCK_R=16, BLOCK_C=16, BLOCK_P=8, BLOCK_Q=8, ROW_IN_TILE=True,
                 ON_CHIP=False, KEEP_A=True, NCOL=3, TRAINING=False),
        fwd_case(BLOCK_M=8, BLOCK_N=2048, BLOCK_R=8, BLOCK_C=64, BLOCK_P=32, BLOCK_Q=4, ROW_IN_TILE=True,
                 ON_CHIP=True),
        fwd_case(BLOCK_M=64, BLOCK_N=32, BLOCK_R=64, BLOCK_C=1, BLOCK_P=64, BLOCK_Q=64, ROW_IN_TILE=True,
                 ON_CHIP=True, NCOL=2, TRAINING=False),
        bwd_case(NCOL=2, BLOCK_M=8, BLOCK_N=256, BLOCK_P=64, ON_CHIP=False),
        bwd_case(NCOL=1, BLOCK_M=8, BLOCK_N=2048, BLOCK_P=32, ON_CHIP=True),
        bwd_case(NCOL=1, NCOL_V=4, BLOCK_M=8, BLOCK_N=256, BLOCK_P=64, ON_CHIP=False),
    ]
    for fn, pointers, constexprs in cases:
        src = ASTSource(fn, signature(fn, pointers, constexprs), constexprs)
        k = triton.compile(src, target=target, options=dict(num_warps=8, launch_cooperative_grid=True))
        assert len(k.asm["cubin"]) > 1000
        assert "atom" in k.asm["ptx"]  # the grid barrier is there
        # norms rounded to nearest: sqrt.approx.ftz.f32 flushes a subnormal sum of squares to 0
        # (eval reads take no norm)
        trains = fn is K.spectral_norm_fwd_kernel and constexprs["TRAINING"]
        assert "sqrt.approx" not in k.asm["ptx"] and ("sqrt.rn.f32" in k.asm["ptx"]) == trains
        print(fn.__name__, constexprs, "cubin bytes", len(k.asm["cubin"]))
    print("OK")
""")


def skip_without_ptxas() -> None:
    """Skip where the Triton wheel ships no ptxas (the spill checks need its report)."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton wheel ships no ptxas")


def run_compiler_script(script: str) -> None:
    """Run ``script`` in a subprocess with the real compiler (no interpreter); it must print OK."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr


def test_kernels_compile_for_sm90():
    run_compiler_script(SCRIPT)


# What the scripts below share (bench/sm90.py): the launcher's own launches of a weight on a
# 132-SM card, captured, compiled for sm_90a as Triton compiles them, and ptxas' report.
COMPILE_HELPERS = textwrap.dedent("""
    import re
    import torch
    from bench.sm90 import (captured_launches, compile_call, compile_launch, forward_launch, global_loads, launch_of,
                            ptxas_usage, spill_bytes)
    from sn_fused.ops import spectral_norm as snm
""")


SPILL_SCRIPT = COMPILE_HELPERS + textwrap.dedent("""
    def vector_loads(launch):
        # (the binary, its 16-byte global loads, and a thread's share of one [BLOCK_M, BLOCK_N]
        # tile of A in 16-byte loads)
        compiled, cfg = compile_launch(*launch), launch[2]
        return compiled, global_loads(compiled)[0], cfg.BLOCK_M * cfg.BLOCK_N // (32 * cfg.num_warps) // 4

    # The grid the launcher gives each weight on a 132-SM card (small ones get fewer programs);
    # the first four take the forward's ON_CHIP path, 1000x1536 and 256x8192 the streaming one with
    # their tiles kept (KEEP_A; the backward: ON_CHIP), the others the streaming one; the weights
    # larger than an H100's L2 (1536x13824, 4096x4096) with both loops over A pipelined (3 stages).
    for M, N in [(128, 1152), (24576, 20), (1, 4096), (1, 8192), (512, 4608), (1536, 13824), (1000, 1536),
                 (4096, 1024), (4096, 4096), (256, 8192)]:
        w = torch.randn(M, N)
        grid = snm._default_grid(M, N, 132)
        cfg = snm._launch_config(M, N, w.device, grid)
        on_chip = cfg.ON_CHIP
        pair = [launch_of(w, 0, "training"), launch_of(w, 0, "backward")]
        stages = (pair[0][2].LOAD_STAGES, pair[0][2].RESCALE_STAGES)
        assert stages == ((3, 3) if M * N * 4 > 50 * 2**20 else (1, 1)), (M, N, stages)
        spills = [spill_bytes(*launch) for launch in pair]
        print(f"{M}x{N} ({grid} programs, on_chip={on_chip}/{pair[1][2].ON_CHIP}, keep_a={cfg.KEEP_A}) spill bytes "
              f"(stores, loads): forward {spills[0]}, backward {spills[1]}")
        assert on_chip == ((M, N) in [(128, 1152), (24576, 20), (1, 4096), (1, 8192)]), (M, N, on_chip)
        assert cfg.KEEP_A == ((M, N) in [(1000, 1536), (256, 8192)]), (M, N, cfg.KEEP_A)
        assert pair[0][2].KEEP_A == cfg.KEEP_A
        bwd_on_chip = pair[1][2].ON_CHIP
        assert bwd_on_chip == ((M, N) in [(128, 1152), (24576, 20), (1, 4096), (1, 8192), (256, 8192),
                                          (1000, 1536)]), (M, N, bwd_on_chip)
        assert spills == [[0, 0], [0, 0]], f"{M}x{N}: {spills}"

    # KEEP_A loads a program's tile once: its binary has one tile's loads of A fewer than the
    # streaming read's (the rescale's), which no CPU test of values can see (the bits are the same).
    for training in (True, False):
        loads = {}
        for keep in (1, 0):
            with snm._launch_knobs(_KEEP_A=keep):
                launch = forward_launch(1000, 1536, torch.float32, training)
                assert launch[2].KEEP_A == bool(keep)
                _, loads[keep], tile = vector_loads(launch)
        print(f"1000x1536 training={training}: 16-byte loads {loads[1]} kept, {loads[0]} streaming (a tile: {tile})")
        assert loads[0] - loads[1] == tile, (training, loads, tile)

    # Channels-last conv weights (3x3, SNGAN's and BigGAN's widths): the launcher walks their
    # columns in the weight's memory order, where a row is one contiguous run (_MatrixLayout), so
    # their tiles load 16 bytes at a time and nothing spills. (In A's column order, three strides:
    # training reads spilled 104-472 bytes, eval reads up to 348, the backward of 768x768x3x3 12 KB;
    # and the tiles' loads were 4-byte ones.) Only v maps walk positions to its own
    # indices: eval reads, which hold v's tile across their one pass, keep a few bytes of it
    # outside the loops (8-12 bytes; 105 registers and none in A's order for a contiguous weight).
    for shape in [(64, 64, 3, 3), (256, 512, 3, 3), (768, 768, 3, 3)]:
        w = torch.randn(*shape).to(memory_format=torch.channels_last)
        for kind in ("training", "eval", "backward"):
            launch = launch_of(w, 0, kind)
            cfg = launch.cfg
            compiled, vector, tile_loads = vector_loads(launch)  # (scalar loads before)
            spills = ptxas_usage(compiled).spills
            print(f"channels-last {shape} {kind} (on_chip={cfg.ON_CHIP}): spill bytes {spills}, "
                  f"{vector} 16-byte loads (a tile: {tile_loads})")
            assert vector >= tile_loads, (shape, kind, vector, tile_loads)
            assert spills == [0, 0] or (kind == "eval" and max(spills) <= 16), (shape, kind, spills)

    # Weights whose tiles still load element by element (_addressed_per_element): a 3x3
    # ConvTranspose's rows along dim=1 (runs of 9) stream in tiles of _PER_ELEMENT_TILE_ELEMENTS,
    # rows wider than that in column blocks (1024x512x3x3: 9216 wide), and do not spill. (With the
    # default tiles: 348-680 bytes per read, 12236 in 768x768x3x3's backward.)
    for shape in [(768, 768, 3, 3), (1024, 512, 3, 3)]:
        w = torch.randn(*shape)
        for kind in ("training", "eval", "backward"):
            kernel, args, cfg, coop = launch_of(w, 1, kind)
            spills = spill_bytes(kernel, args, cfg, coop)
            print(f"ConvTranspose {shape} dim=1 {kind}: tiles {cfg.BLOCK_M}x{cfg.BLOCK_N}, spill bytes {spills}")
            assert cfg.BLOCK_M * cfg.BLOCK_N <= snm._PER_ELEMENT_TILE_ELEMENTS and not cfg.ON_CHIP, cfg
            assert spills == [0, 0], (shape, kind, spills)

    # Rows whose stride is not a multiple of 16 elements: Triton hints divisibility by 16 only, so
    # the launcher tells the kernels the power of two that divides N and the row strides
    # (ROW_ALIGN, kernels._multiple_of). float32 rows aligned to 4 elements (BigGAN G's 24576x20
    # and 1536x148, 768x6900) then load 16 bytes at a time, keep the tiles of aligned weights and
    # do not spill. (Without it every element of a tile took its own 4-byte load, and 1536x148's
    # on-chip backward spilled 68/68 bytes at 255 registers.)
    for M, N in [(24576, 20), (1536, 148), (768, 6900)]:
        for kind in ("training", "backward"):
            launch = launch_of(torch.randn(M, N), 0, kind)
            cfg, args = launch.cfg, launch.args
            compiled, vector, tile_loads = vector_loads(launch)
            spills = ptxas_usage(compiled).spills
            print(f"{M}x{N} {kind} (ROW_ALIGN {args[-1]}): tiles {cfg.BLOCK_M}x{cfg.BLOCK_N}, on_chip={cfg.ON_CHIP}, "
                  f"{vector} 16-byte loads (a tile: {tile_loads}), spill bytes {spills}")
            assert args[-1] == 4 and vector >= tile_loads and spills == [0, 0], (M, N, kind, vector, spills)

    # Rows proven aligned to less than 16 bytes (an odd stride; bfloat16 rows of 6900: 4 elements,
    # 8 bytes) load element by element or nearly. Their backward streams in tiles of
    # _PER_ELEMENT_TILE_ELEMENTS and is on chip only up to 16384 elements: no spills. (Session 21:
    # 768x6900's streamed 8x4096 tiles spilled 2176/1156 bytes, 768x3500's on-chip 8x4096 ones
    # 336/640, both loaded element by element.)
    for M, N, dtype in [(768, 6901, torch.float32), (768, 3501, torch.float32), (768, 6900, torch.bfloat16)]:
        kernel, args, cfg, coop = launch_of(torch.randn(M, N, dtype=dtype), 0, "backward")
        spills = spill_bytes(kernel, args, cfg, coop)
        print(f"{M}x{N} {dtype} backward (rows not 16-byte aligned): tiles {cfg.BLOCK_M}x{cfg.BLOCK_N}, "
              f"spill bytes {spills}")
        assert cfg.BLOCK_M * cfg.BLOCK_N <= snm._PER_ELEMENT_TILE_ELEMENTS and not cfg.ON_CHIP, cfg
        assert spills == [0, 0], (M, N, spills)

    # _MAXNREG (off by default until measured): the limit reaches ptxas, which then uses the
    # registers it otherwise keeps for a second CTA per SM: a bfloat16 read of 4096x4096 spills 36/40
    # bytes at the 128 registers ptxas picks alone, none at 255 (printed, the default not checked).
    for knob in (0, 255):
        with snm._launch_knobs(_MAXNREG=knob):
            launch = forward_launch(4096, 4096, torch.bfloat16, True)
            compiled = compile_launch(*launch)
            ptx, spills = compiled.asm["ptx"], ptxas_usage(compiled).spills
        print(f"4096x4096 bfloat16 training read, _MAXNREG={knob}: spill bytes {spills}")
        assert (".maxnreg 255" in ptx) == (knob == 255), knob
        assert spills == [0, 0] or knob == 0, spills

    # Vector accesses: with N a multiple of 16, the workspace regions and each program's run of
    # columns start on 16-element boundaries, so every per-element store of a one-program read
    # is 16 bytes wide; only single values (partials, sigma, u of one row) stay scalar. (With
    # regions at offsets M and M + N and columns from p*N//G: 109 scalar stores streaming, 133
    # on chip.)
    for on_chip in (True, False):
        with snm._launch_knobs(_ON_CHIP=on_chip):
            w, u, v = torch.randn(1, 8192), torch.randn(1), torch.randn(8192)
            with captured_launches() as launches:
                snm._launch_forward(w, torch.empty_like(w), u, v, torch.ones(8194), torch.empty(()),
                                    snm.new_semaphore(), 0, 1, 1e-12, True, num_programs=1, phase_by_phase=False)
            assert launches[0].cfg.ON_CHIP == on_chip
            ptx = compile_launch(*launches[0]).asm["ptx"].splitlines()
            scalar = [l for l in ptx if "st.global" in l and ".v4." not in l and ".v2." not in l]
            vector = [l for l in ptx if "st.global" in l and ".v4." in l]
            print(f"1x8192 forward (on_chip={on_chip}): {len(scalar)} scalar, {len(vector)} 16-byte stores")
            assert len(scalar) <= 16 and len(vector) >= 24, (on_chip, len(scalar), len(vector))

    # _LOAD_STAGES / _RESCALE_STAGES > 1 (by default 3 where A does not fit in L2, see the launched
    # kernels below; asked for here on weights of any size): phase ST's loops over A
    # and the rescale's are software-pipelined (cp.async into shared memory, (stages - 1) tiles of
    # A), each with its own count (the TTIR's counted loops in order: phase ST, the rescale; the
    # overflow fallback's transposed pass is a plain loop, never pipelined), within an H100's
    # 227 KB of shared memory per program and without spills. float64 tiles take twice the bytes: the launcher
    # gives them fewer stages. (float64, the gradcheck dtype, spills on 13824-wide rows at any
    # stage count: 868 bytes of stores at 1 stage, 752 at 2; its spills are not checked.)
    with snm._launch_knobs(_LOAD_STAGES=3):  # column blocks (rows over 16384) keep 1: 256 KB at 3
        assert snm._forward_plan((64, 20000), (20000, 1), (20000, 1), 0, torch.device("cpu"), 1, True, 2,
                                 False).cfg.LOAD_STAGES == 1
    for (M, N), stages, dtype, want in [((1536, 13824), 3, torch.float32, 3), ((1536, 13824), 4, torch.float32, 4),
                                        ((512, 4608), 3, torch.float32, 3), ((4096, 1024), 3, torch.float32, 3),
                                        ((1536, 13824), 4, torch.float64, 2), ((4096, 4096), 4, torch.bfloat16, 4)]:
        for training in (True, False):
            with snm._launch_knobs(_LOAD_STAGES=stages, _RESCALE_STAGES=2):
                kernel, args, cfg, coop = forward_launch(M, N, dtype, training)
                assert not cfg.ON_CHIP and (cfg.LOAD_STAGES, cfg.RESCALE_STAGES) == (want, 2), cfg
                k = compile_launch(kernel, args, cfg, coop)
                loops = [int(x) for x in re.findall(r"tt.num_stages = (\\d+)", k.asm["ttir"])]
                assert loops == [want, 2], (M, N, dtype, training, loops)
                copies = k.asm["ptx"].count("cp.async.cg.shared.global")
                shared = k.metadata.shared
                spills = ptxas_usage(k).spills if training else [0, 0]
            print(f"{M}x{N} {dtype} forward (training={training}), stages {want}/2: {copies} cp.async, "
                  f"{shared} B shared, spill bytes {spills}")
            assert copies > 0 and shared <= 227 * 1024, (M, N, dtype, stages, copies, shared)
            assert spills == [0, 0] or dtype == torch.float64, (M, N, dtype, stages, spills)

    # _LOAD_PREFETCH / _RESCALE_PREFETCH (off by default until measured): where the launcher lets a
    # loop load one tile ahead in registers (_prefetch: phase ST up to 8192-wide rows, the rescale
    # on all of these), the binary compiles (16-bit tiles too: a loop-carried tile of the weight's
    # dtype once clashed with float32 code of the column-block path), does not spill on the shapes
    # the sweep measures, and its loads are plain ones (no cp.async: the rescale's keep evict_first;
    # both stage counts at 1, so a loop the launcher does not let prefetch is a plain one too).
    # (ptxas sometimes settles at 128 registers and spills a few bytes outside the loops, e.g. 64x4096,
    # as it does for some default launches too: not checked here.)
    for (M, N), dtype, training, want in [((4096, 1024), torch.float32, True, (1, 1)),
                                          ((768, 6912), torch.float32, True, (1, 1)),
                                          ((1000, 1536), torch.float32, True, (1, 1)),
                                          ((1536, 13824), torch.float32, True, (0, 1)),
                                          ((4096, 4096), torch.float32, True, (1, 1)),
                                          ((4096, 4096), torch.bfloat16, True, (1, 1)),
                                          ((768, 6912), torch.float16, False, (1, 1))]:
        with snm._launch_knobs(_LOAD_PREFETCH=1, _RESCALE_PREFETCH=1, _LOAD_STAGES=1, _RESCALE_STAGES=1, _KEEP_A=0):
            kernel, args, cfg, coop = forward_launch(M, N, dtype, training)
            assert (cfg.LOAD_PREFETCH, cfg.RESCALE_PREFETCH) == want and cfg.LOAD_STAGES == cfg.RESCALE_STAGES == 1
            compiled = compile_launch(kernel, args, cfg, coop)
            ptx, spills = compiled.asm["ptx"], ptxas_usage(compiled).spills
        print(f"{M}x{N} {dtype} forward (training={training}), prefetch {want}: spill bytes {spills}")
        assert spills == [0, 0] and "cp.async" not in ptx and "L1::evict_first" in ptx, (M, N, dtype, spills)

    # _GRAD_STAGES > 1 (off by default until measured): the backward's GRAD pass as one flat loop,
    # pipelined (cp.async of G's tiles into shared memory; the dot pass's loops stay plain), within
    # an H100's 227 KB. 16384-element tiles at 3 stages do not spill; the default 32768-element
    # tiles fit 2 stages and spill 4 bytes (printed, not checked).
    for (M, N), tile, want in [((1536, 13824), 16384, 3), ((4096, 4096), 16384, 3), ((1536, 13824), 32768, 2)]:
        with snm._launch_knobs(_GRAD_STAGES=3, _BWD_TILE_ELEMENTS=tile):
            kernel, args, cfg, coop = launch_of(torch.randn(M, N), 0, "backward")
            assert cfg.GRAD_STAGES == want and not cfg.ON_CHIP, cfg
            k = compile_launch(kernel, args, cfg, coop)
            loops = [int(x) for x in re.findall(r"tt.num_stages = (\\d+)", k.asm["ttir"])]
            copies, shared = k.asm["ptx"].count("cp.async.cg.shared.global"), k.metadata.shared
            spills = ptxas_usage(k).spills
        print(f"{M}x{N} backward, {tile}-element tiles, GRAD_STAGES {want}: loops {loops}, {copies} cp.async, "
              f"{shared} B shared, spill bytes {spills}")
        assert loops == [want] and copies > 0 and shared <= 227 * 1024, (M, N, tile, loops, copies, shared)
        assert spills == [0, 0] or tile == 32768, (M, N, tile, spills)
    print("OK")
""")


# The Triton whose binaries the spill budgets below describe: the one the GPU machines run and
# .ci/env.sh pins. Another release lowers the same source to other code (Triton 3.8's ptxas spills
# 4 bytes in 1x4096's forward and 8 in a channels-last backward's loop), so there the test says
# so and skips; `python -m bench.sm90 --spilling` shows that release's spills whole.
SPILL_BUDGET_TRITON = "3.6"


def on_budgeted_triton() -> bool:
    """Whether the installed Triton is ``SPILL_BUDGET_TRITON`` (any patch release)."""
    import triton

    return triton.__version__.startswith(SPILL_BUDGET_TRITON + ".")


def skip_unless_budgeted_triton() -> None:
    import triton

    if not on_budgeted_triton():
        pytest.skip(f"spill budgets are Triton {SPILL_BUDGET_TRITON}'s (the GPU machines' and CI's pin); "
                    f"this is Triton {triton.__version__}: see python -m bench.sm90 --spilling")


def test_launched_kernels_do_not_spill_on_sm90():
    """The forward and backward binaries the launcher would run on a 132-SM Hopper keep every
    value in registers (ptxas reports 0 spill bytes) on small, large, wide and tall weights.
    A spill would put local-memory traffic into loops that are meant to be bound by A alone.
    Compiled with the pinned Triton's own ptxas; needs no GPU."""
    skip_without_ptxas()
    skip_unless_budgeted_triton()
    run_compiler_script(SPILL_SCRIPT)


LOAD_ORDER_SCRIPT = COMPILE_HELPERS + textwrap.dedent("""
    # The memory operations of a binary in program order: P (plain global load), C (a `.cg` load,
    # of what other programs wrote), S (global store), B (CTA barrier: a block-wide sum has
    # them), A (the grid barrier's acquire load, which ends its spin).
    def tokens(ptx):
        out = []
        for line in ptx.splitlines():
            op = line.split()[1] if line.strip().startswith("@") else (line.split() or [""])[0]
            if op.startswith("ld.global"):
                out.append("A" if ".acquire" in op else "C" if ".cg" in op else "P")
            elif op.startswith("st.global"):
                out.append("S")
            elif op.startswith("bar.sync"):
                out.append("B")
        return "".join(out)

    def after_barrier(seq, k):
        # The loads issued after the k-th grid barrier (its own CTA barriers skipped) before the
        # first block-wide sum of the phase waits: all of them share one round trip.
        rest = seq.split("A")[k + 1].lstrip("B")
        return rest.split("B")[0]

    def forward_ptx(M, N, training):
        return compile_launch(*forward_launch(M, N, torch.float32, training)).asm["ptx"]

    # Streaming training read (512x4608): after the first barrier (phase R) the first block of s
    # (P) and the first step of t's column partials (C, 8 vector loads) go with ||s||'s partials;
    # after the second (phase F) the first block of t (P) with t's partials. Eval (512x4608): the
    # copies of u and v are made before the barrier, so nothing but sigma's partials is loaded
    # between it and the rescale's loads of A. ON_CHIP (24576x20): the partials of ||s|| and of t
    # in one batch, every load of the phase (5, 16-byte ones with ROW_ALIGN; 17 scalar ones
    # before it). Before session 17: "C", "C", "CP", 1 load. (Phase R's C: ||s||'s
    # partials, s[0], 8 vector loads of t's partials; phase F's: t's partials and t[0], which the
    # norm of a 1-element t reads.)
    seq = tokens(forward_ptx(512, 4608, True))
    r, f = after_barrier(seq, 0), after_barrier(seq, 1)
    print("512x4608 training: phase R", r, "phase F", f)
    assert "P" in r and r.count("C") >= 10 and "P" in f and f.count("C") >= 2, (r, f)
    seq = tokens(forward_ptx(512, 4608, False))
    between = seq.split("A")[1].lstrip("B")
    print("512x4608 eval: after the barrier", between[:12])
    assert "P" not in between.split("S")[0] and seq.split("A")[0].count("S") > 2, between
    seq = tokens(forward_ptx(24576, 20, True))
    phase = seq.split("A")[1]  # (up to the overflow fallback's barrier)
    print("24576x20 training (ON_CHIP): after the barrier", after_barrier(seq, 0), "of", phase.count("C"), "loads")
    assert after_barrier(seq, 0).count("C") == phase.count("C") >= 5, (after_barrier(seq, 0), phase)
    print("OK")
""")


def test_loads_after_a_grid_barrier_share_one_round_trip():
    """After a grid barrier, every load of the phase that waits on nothing loaded before it is
    issued before the phase's first block-wide sum (whose CTA barriers the compiler does not move
    loads across): one L2 round trip instead of two or three in a row on the read's critical
    path (session 17; not yet timed on a GPU). Checked in the sm_90a PTX of the launcher's own
    launches, so a change of the kernels or of Triton that serializes them again fails here."""
    run_compiler_script(LOAD_ORDER_SCRIPT)


PROBES_SCRIPT = COMPILE_HELPERS + textwrap.dedent("""
    from bench import barrier_probe, sm90, stream_probe

    # The probes' GPU launches (bench/stream_probe.py, bench/barrier_probe.py), compiled for
    # sm_90a as their GPU call will compile them: each fits an SM's shared memory (a launch the
    # card refuses would print "failed" instead of a rate), two-per-SM launches fit twice
    # (registers and shared memory: else they would time waves, not co-resident programs), the
    # launches as the kernels make them (base) and through TMA spill nothing, and TMA launches do
    # use bulk tensor copies.
    for M, N in stream_probe.SHAPES:
        w, x = torch.empty(M, N, device="meta"), torch.empty(N, device="meta")
        for cfg in stream_probe.launches(M, N, 132):
            if not (cfg["name"] == "base" or cfg["tma"] or cfg["name"].startswith("2/SM")):
                continue  # (the rest: knobs of these; bench/NOTES.md v25 lists their resources)
            for kernel in cfg["passes"]:
                out = torch.empty(M, N, device="meta") if kernel == "scale" else torch.empty(M, device="meta")
                compiled = compile_call(*stream_probe.call(kernel, cfg, w, out, x))
                usage, shared = ptxas_usage(compiled), compiled.metadata.shared
                bulk = compiled.asm["ptx"].count("cp.async.bulk.tensor")
                print(f"{M}x{N} {kernel} {cfg['name']}: {usage.registers} registers, spills {usage.spills}, "
                      f"{shared} B shared, {bulk} bulk copies")
                assert shared <= 227 * 1024, (M, N, kernel, cfg, shared)
                assert bool(bulk) == cfg["tma"], (M, N, kernel, cfg, bulk)
                if cfg["name"] == "base" or cfg["tma"]:
                    assert usage.spills == [0, 0], (M, N, kernel, cfg, usage)
                if cfg["name"].startswith("2/SM"):
                    assert 2 * shared <= 228 * 1024 and 2 * usage.registers * 32 * cfg["warps"] <= 65536, (
                        M, N, kernel, cfg, shared, usage)
    sem, part, out, err = (torch.empty(n, dtype=d, device="meta") for n, d in (
        (2, torch.int32), (256, torch.float32), (132, torch.float32), (1, torch.int32)))
    for read_partials in (False, True):
        compiled = compile_call(barrier_probe.rounds_kernel,
                                *barrier_probe.call(132, 32, read_partials, sem, part, out, err))
        ptx = compiled.asm["ptx"]
        print("barrier probe, partials" if read_partials else "barrier probe", ptxas_usage(compiled))
        assert "atom.global.gpu.release.add" in ptx and "ld.global.gpu.acquire" in ptx
        assert ("ld.global.cg" in ptx) == read_partials
    print("OK")
""")


def test_probes_compile_for_sm90():
    """The probes a GPU call runs (``bench/stream_probe.py``, ``bench/barrier_probe.py``) compile
    for Hopper, within an SM's shared memory, their base and TMA launches without spills."""
    skip_without_ptxas()
    run_compiler_script(PROBES_SCRIPT)
