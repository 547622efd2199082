"""``python -m bench.sm90``, the scan of every default launch's sm_90a binary (registers, spills;
``tests/test_compile_sm90.py`` uses the same helpers for its checks): it runs on a CPU-only machine,
prints a row per launch with ptxas' numbers, and refuses the interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_compile_sm90 import on_budgeted_triton, run_compiler_script, skip_without_ptxas

ROOT = Path(__file__).resolve().parents[1]


def _run(args, interpret):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "bench.sm90", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_scan_prints_each_launch_with_ptxas_numbers():
    skip_without_ptxas()
    # The ConvTranspose group (one 512x256x4x4 weight read along dim=1) and a made-up weight whose
    # rows are not 16-element aligned: 2 weights x 3 launches.
    proc = _run(["--groups", "conv_transpose", "--dtypes", "float32", "--extra", "40x100", "--jobs", "1"], False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+x\d+", line)]
    assert [(r[0], r[1]) for r in rows] == [("512x256x4x4", "1")] * 3 + [("40x100", "0")] * 3, out
    assert {r[3] for r in rows} == {"training", "eval", "backward"}, out
    for r in rows:
        loads, regs, spills, in_loops = r[-4], int(r[-3]), r[-2], int(r[-1])
        assert 16 <= regs <= 255 and re.fullmatch(r"\d+/\d+", spills) and in_loops >= 0, r
        assert re.fullmatch(r"\d+/\d+", loads) and (in_loops == 0 or spills != "0/0"), r
    # (40x100's float32 rows are 4-element aligned: its tiles load 16 bytes at a time)
    assert all(int(r[-4].split("/")[0]) > 0 for r in rows[3:]), out
    assert re.search(r"# \d+ of 6 launches spill, \d+ of them inside loops", out), out


def test_scan_prints_only_the_spilling_launches_when_asked():
    """``--spilling``: the rows of the whole scan that spill, and only those. On Triton 3.6, of a
    bfloat16 4096x4096's three launches only the training read spills (36/40 bytes at the 128
    registers ptxas picks; bench/NOTES.md v22); Triton 3.9's spills none of them."""
    skip_without_ptxas()
    scans = {}
    for args in ([], ["--spilling"]):
        proc = _run(["--groups", "large", "--dtypes", "bfloat16", "--jobs", "1", *args], False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [line.split() for line in proc.stdout.splitlines() if re.match(r"\s+\d+x\d+", line)]
        scans[bool(args)] = [(r[0], r[3], r[-2]) for r in rows], proc.stdout
    (every, _), (spilling, out) = scans[False], scans[True]
    assert len(every) == 3 and spilling == [r for r in every if r[2] != "0/0"], (every, out)
    assert f"# {len(spilling)} of 3 launches spill" in out, out
    if on_budgeted_triton():
        assert [r[:2] for r in spilling] == [("4096x4096", "training")], out


def test_local_accesses_in_loops_counts_the_spills_in_a_loop():
    """The scan's last column. 768x6901's backward in 8x4096 tiles loaded element by element (the
    plan before session 21, brought back by a knob) spills inside its tile loops (768x6900's
    did, before session 22 told the kernels its rows are 4-element aligned: 145 STL + 145 LDL per
    step of the dot pass, 14 + 14 in the GRAD pass); its default 2x4096 tiles spill nowhere."""
    skip_without_ptxas()
    run_compiler_script(textwrap.dedent("""
        import torch
        from bench import sm90
        from sn_fused.ops import spectral_norm as snm
        w = torch.empty(768, 6901)
        for knobs, tiles in (({}, (2, 4096)), (dict(_PER_ELEMENT_TILE_ELEMENTS=32768), (8, 4096))):
            with snm._launch_knobs(**knobs):
                launch = sm90.launch_of(w, 0, "backward")
                compiled = sm90.compile_launch(*launch)
            n = sm90.local_accesses_in_loops(compiled)
            print(tiles, sm90.ptxas_usage(compiled), n)
            assert (launch.cfg.BLOCK_M, launch.cfg.BLOCK_N) == tiles, launch.cfg
            assert n == 0 if not knobs else n > 200, n
        print("OK")
    """))


def test_scan_refuses_the_interpreter():
    proc = _run(["--groups", "conv_transpose", "--jobs", "1"], True)
    assert proc.returncode != 0 and "unset TRITON_INTERPRET" in proc.stderr, proc.stderr[-2000:]
