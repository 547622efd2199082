"""``bench/kernel_sweep.py``'s interleaved eager A/B (``--eager-ab``, run on a GPU by
``bench/gpu_check.sh``): on CPU tensors through the interpreter it times every row, reads each
layer through the path its row names, and leaves the C++ read switched as it was."""

from __future__ import annotations

from unittest import mock

import pytest

from conftest import fused_device_or_skip
from sn_fused.ops import spectral_norm as snm

device = fused_device_or_skip()


def test_eager_ab_times_every_row_through_its_read_path():
    from bench import kernel_sweep
    from sn_fused import parametrizations

    cpp_reads = snm.CPP_READS
    seen = []  # CPP_READS as each sn_fused read's op saw it
    checked = parametrizations._spectral_norm_checked  # where a layer's read decides: C++ or Python

    def spy(*args, **kwargs):
        seen.append(snm.CPP_READS)
        return checked(*args, **kwargs)

    with mock.patch.object(parametrizations, "_spectral_norm_checked", side_effect=spy):
        rows = kernel_sweep.eager_ab(shapes=[(3, 5), (3, 5), (1, 4)], budget_s=0.01, rounds=2, device=device)
    impls = ["sn_fused"] + (["sn_fused, Python read"] if cpp_reads else []) + ["PyTorch"]
    # Two distinct shapes and the whole list (3 tensors), each as fwd and f+b.
    assert [(r["shapes"], r["what"]) for r in rows] == [
        (s, w) for s in ("3x5", "1x4", "all 3") for w in ("fwd", "f+b")]
    assert all(list(r["us"]) == impls and all(t > 0 for t in r["us"].values()) for r in rows)
    assert snm.CPP_READS == cpp_reads
    # Each timed call reads 1 or 3 layers; 6 rows x 2 rounds at least, per read path.
    if cpp_reads:
        assert seen.count(False) >= 12 and seen.count(True) >= 12, seen
    else:
        assert seen.count(False) >= 12 and True not in seen, seen


def test_knob_sweep_sets_each_knob_then_the_defaults_again(monkeypatch, capsys):
    """``--sweep``: each variant runs with its knob (or, for "A+B", its knobs) set and the others
    at their defaults, the defaults first and last, and every knob is restored after; a variant
    whose launches are the defaults' (here: stage counts on a weight read on chip, which
    pipelines nothing) is not timed again and says so. Timing and layers are stubbed: this checks
    the sweep's bookkeeping, which a GPU run cannot afford to find wrong."""
    import torch

    from bench import kernel_sweep

    def state():
        return snm._LOAD_STAGES, snm._RESCALE_STAGES, snm._TILE_ELEMENTS

    seen, seen_bwd = [], []  # (the backward is timed with the variant's knobs set too)
    monkeypatch.setattr(kernel_sweep, "cuda_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(kernel_sweep, "layer", lambda M, N, impl: seen.append(state()))
    monkeypatch.setattr(kernel_sweep, "first_read_error", lambda m: 0.0)
    monkeypatch.setattr(kernel_sweep, "graph_time_us", lambda fn: 1.0)
    monkeypatch.setattr(kernel_sweep, "backward_alone_us", lambda m, g: seen_bwd.append(state()) or 2.0)
    names = ["_LOAD_STAGES", "_RESCALE_STAGES", "_LOAD_STAGES+_RESCALE_STAGES"]
    monkeypatch.setattr(snm, "_LOAD_STAGES", 0)  # the defaults, whatever the environment says
    monkeypatch.setattr(snm, "_RESCALE_STAGES", 0)
    monkeypatch.setattr(snm, "_TILE_ELEMENTS", 16384)
    before = (0, 0, 16384)
    knobs = {name: kernel_sweep.KNOBS[name] for name in names}
    knobs["_TILE_ELEMENTS"] = (64,)  # one row per tile: streaming, a launch of its own
    rows = kernel_sweep.knob_sweep([(16, 64)], knobs)
    assert seen == seen_bwd == [before, (0, 0, 64), before]
    assert [(r["knob"], r["value"], r["same_as_default"]) for r in rows] == (
        [("default", None, False)] + [("_LOAD_STAGES", v, True) for v in (1, 2, 3, 4)]
        + [("_RESCALE_STAGES", v, True) for v in (1, 2, 3)]
        + [("_LOAD_STAGES+_RESCALE_STAGES", v, True) for v in ((1, 1), (3, 3))]
        + [("_TILE_ELEMENTS", 64, False), ("default", None, False)])
    assert state() == before
    # Each row says what the launcher made of its knobs: a 16x64 weight is read on chip, which
    # pipelines nothing, so every stage variant launched the defaults' loads (and says so); with
    # one row per tile it is read streaming.
    assert {(r["knob"] == "_TILE_ELEMENTS", r["loads"]) for r in rows} == {
        (False, "on-chip s1/1 p0/0 q1 g1"), (True, "streaming s1/1 p0/0 q1 g1")}
    timed = [r for r in rows if not r["same_as_default"]]
    assert {(r["fwd_graph_us"], r["bwd_graph_us"]) for r in timed} == {(1.0, 2.0)}
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == len(rows) and sum("=default[" in line for line in lines) == 9, lines
    assert lines[-2].startswith("   16x64     TILE_ELEMENTS=64:1.0/2.0["), lines[-2]


def test_knob_sweep_times_a_knob_of_the_compile_options(monkeypatch, capsys):
    """``_MAXNREG`` leaves both configs as they are and changes only the compile options they are
    launched with (on a GPU; the interpreter takes none, so it is patched off here): the sweep
    must time it, not take it for the defaults."""
    import torch

    from bench import kernel_sweep

    seen = []
    monkeypatch.setattr(kernel_sweep, "cuda_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(kernel_sweep, "layer", lambda M, N, impl: seen.append(snm._MAXNREG))
    monkeypatch.setattr(kernel_sweep, "first_read_error", lambda m: 0.0)
    monkeypatch.setattr(kernel_sweep, "graph_time_us", lambda fn: 1.0)
    monkeypatch.setattr(kernel_sweep, "backward_alone_us", lambda m, g: 2.0)
    monkeypatch.setattr(snm, "INTERPRET", False)
    monkeypatch.setattr(snm, "_MAXNREG", 0)
    rows = kernel_sweep.knob_sweep([(16, 64)], {"_MAXNREG": kernel_sweep.KNOBS["_MAXNREG"]})
    assert [(r["knob"], r["value"], r["same_as_default"]) for r in rows] == [
        ("default", None, False), ("_MAXNREG", 255, False), ("default", None, False)]
    assert seen == [0, 255, 0] and snm._MAXNREG == 0
    assert "MAXNREG=255:1.0/2.0[" in capsys.readouterr().out


def test_knob_sweep_times_a_knob_of_the_launch_arguments(monkeypatch, capsys):
    """``_ROW_ALIGN=0`` leaves a 24x20 weight's configs and compile options as they are and
    changes only the launches' last argument (``ROW_ALIGN`` 4 -> 1): the sweep must time it;
    on a 16x64 weight (aligned rows) it changes nothing and is not timed."""
    import torch

    from bench import kernel_sweep

    seen = []
    monkeypatch.setattr(kernel_sweep, "cuda_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(kernel_sweep, "layer", lambda M, N, impl: seen.append((M, N, snm._ROW_ALIGN)))
    monkeypatch.setattr(kernel_sweep, "first_read_error", lambda m: 0.0)
    monkeypatch.setattr(kernel_sweep, "graph_time_us", lambda fn: 1.0)
    monkeypatch.setattr(kernel_sweep, "backward_alone_us", lambda m, g: 2.0)
    configs = {}
    for value in (1, 0):
        with snm._launch_knobs(_ROW_ALIGN=value):
            configs[value] = kernel_sweep.launched_plans(24, 20)
    assert configs[0] == configs[1]  # (what the sweep compared before session 22)
    rows = kernel_sweep.knob_sweep([(24, 20), (16, 64)], {"_ROW_ALIGN": kernel_sweep.KNOBS["_ROW_ALIGN"]})
    assert [(r["N"], r["knob"], r["same_as_default"]) for r in rows] == [
        (20, "default", False), (20, "_ROW_ALIGN", False), (20, "default", False),
        (64, "default", False), (64, "_ROW_ALIGN", True), (64, "default", False)]
    assert seen == [(24, 20, 1), (24, 20, 0), (24, 20, 1), (16, 64, 1), (16, 64, 1)] and snm._ROW_ALIGN == 1
    assert "ROW_ALIGN=0:1.0/2.0[" in capsys.readouterr().out


def test_knob_sweep_times_the_kept_tile_against_its_alternatives(monkeypatch, capsys):
    """``gpu_check.sh``'s KEEP_A sweep: ``_ON_CHIP_MAX_PARTIALS=0`` moves a weight read ON_CHIP to
    KEEP_A, and ``_KEEP_A=0`` a KEEP_A weight to the streaming read (here a program per row: 16 x
    4096's table is beyond ON_CHIP's limit), each timed and labelled with its path; a knob that
    changes nothing on a weight (``_KEEP_A=0`` where ON_CHIP reads it) is not."""
    import torch

    from bench import kernel_sweep

    paths = []
    monkeypatch.setattr(kernel_sweep, "cuda_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(snm, "_default_grid", lambda M, N, cap: M)
    monkeypatch.setattr(kernel_sweep, "layer", lambda M, N, impl: paths.append(kernel_sweep.launched_loads(
        *kernel_sweep.launched_plans(M, N)).split()[0]))
    monkeypatch.setattr(kernel_sweep, "first_read_error", lambda m: 0.0)
    monkeypatch.setattr(kernel_sweep, "graph_time_us", lambda fn: 1.0)
    monkeypatch.setattr(kernel_sweep, "backward_alone_us", lambda m, g: 2.0)
    knobs = {name: kernel_sweep.KNOBS[name] for name in ("_KEEP_A", "_ON_CHIP_MAX_PARTIALS")}
    rows = kernel_sweep.knob_sweep([(16, 64), (16, 4096)], knobs)
    assert [(r["N"], r["knob"], r["same_as_default"]) for r in rows] == [
        (64, "default", False), (64, "_KEEP_A", True), (64, "_ON_CHIP_MAX_PARTIALS", False), (64, "default", False),
        (4096, "default", False), (4096, "_KEEP_A", False), (4096, "_ON_CHIP_MAX_PARTIALS", True),
        (4096, "default", False)]
    assert paths == ["on-chip", "kept", "on-chip", "kept", "streaming", "kept"]
    out = capsys.readouterr().out
    assert "KEEP_A=0:1.0/2.0[16 streaming " in out and "ON_CHIP_MAX_PARTIALS=0:1.0/2.0[16 kept " in out, out


def test_measure_times_the_backward_alone_for_sn_fused(monkeypatch):
    """The kernel table's row: forward, forward + backward, and (sn_fused only) the backward
    kernel alone, each timed on the calls it names. Timers are stubbed to call once (the
    interpreter runs the kernels); the backward op must run on the layer's own saved vectors."""
    from bench import kernel_sweep
    from sn_fused import ops

    calls = []
    backward = ops.spectral_norm_backward_fused

    def timer(fn, *args, **kwargs):
        fn()
        return 1.0

    monkeypatch.setattr(kernel_sweep, "graph_time_us", timer)
    monkeypatch.setattr(kernel_sweep, "eager_time_us", timer)
    layer = kernel_sweep.layer
    monkeypatch.setattr(kernel_sweep, "layer", lambda M, N, impl: layer(M, N, impl, device))
    monkeypatch.setattr(kernel_sweep.ops_mod, "spectral_norm_backward_fused",
                        lambda *a, **k: calls.append(a[0].shape) or backward(*a, **k))
    fused = kernel_sweep.measure(6, 10, "sn_fused")
    plain = kernel_sweep.measure(6, 10, "torch")
    assert set(fused) == set(plain) == {"fwd_graph", "fwd_eager", "fwdbwd_graph", "fwdbwd_eager", "bwd_graph"}
    assert fused["bwd_graph"] == 1.0 and plain["bwd_graph"] != plain["bwd_graph"]  # NaN: PyTorch has no such op
    assert calls == [(6, 10)]


def test_sweep_knobs_take_their_own_values_or_those_given():
    """``--sweep-knobs``: a name alone sweeps its ``KNOBS`` values; ``NAME=V/V`` those given (a
    launch knob of ``sn_fused.ops``, one at a time); a misspelled knob is an error, not a sweep of
    the defaults under another name."""
    import pytest

    from bench import kernel_sweep

    assert kernel_sweep.parse_knobs("_LOAD_STAGES,_TILE_ELEMENTS=32768,_MIN_ELEMENTS_PER_PROGRAM=4096/2048") == {
        "_LOAD_STAGES": kernel_sweep.KNOBS["_LOAD_STAGES"], "_TILE_ELEMENTS": (32768,),
        "_MIN_ELEMENTS_PER_PROGRAM": (4096, 2048)}
    assert kernel_sweep.parse_knobs("_LOAD_STAGES+_RESCALE_STAGES") == {
        "_LOAD_STAGES+_RESCALE_STAGES": ((1, 1), (3, 3))}
    # A misspelled or unknown knob, a pair with values, a module global that is no integer knob
    # (``_launch_knobs`` would set any of them), an empty name.
    for bad in ("_TILE_ELEMENT=32768", "_LOAD_STAGES+_RESCALE_STAGES=3", "_NO_SUCH_KNOB", "_launch=1",
                "CPP_READS=0", "_ON_CHIP=0", "_LOAD_STAGES,"):
        with pytest.raises(SystemExit, match="--sweep-knobs"):
            kernel_sweep.parse_knobs(bad)


def test_gpu_check_sweeps_parse():
    """Every ``--sweep-knobs`` and ``--sweep-shapes``/``--table-shapes`` that ``gpu_check.sh`` passes
    parses here: a misspelled knob would end its section on the GPU, where a call is scarce."""
    import re
    from pathlib import Path

    from bench import kernel_sweep

    script = (Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh").read_text()
    knobs = re.findall(r"--sweep-knobs (\S+)", script)
    shapes = re.findall(r"--(?:sweep|table)-shapes (\S+)", script)
    assert len(knobs) >= 4 and len(shapes) >= 6, (knobs, shapes)
    for text in knobs:
        assert kernel_sweep.parse_knobs(text), text
    for text in shapes:
        parsed = kernel_sweep.parse_shapes(text)
        assert parsed and all(len(shape) == 2 and min(shape) > 0 for shape in parsed), text
    assert "_KEEP_A,_ON_CHIP_MAX_PARTIALS,_KEEP_A_MAX_ELEMENTS" in knobs


def test_reads_runs_forward_and_backward_three_times_each(monkeypatch, capsys):
    """``--reads MxN``, the target of ``gpu_check.sh``'s Nsight Compute runs: the layer's
    registration reads once, then forward, backward, three times over; the launches that
    ``gpu_check.sh``'s ``--launch-skip``/``--launch-count`` select (both kernels' names match its
    filter) must be the third forward and the third backward."""
    import re
    import sys
    from pathlib import Path

    import torch

    from bench import kernel_sweep

    names = []
    launch = snm._launch

    def spy(kernel, *args, **kwargs):
        names.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        return launch(kernel, *args, **kwargs)

    layer = kernel_sweep.layer
    monkeypatch.setattr(snm, "_launch", spy)
    monkeypatch.setattr(kernel_sweep, "cuda_device", lambda: torch.device(device))
    monkeypatch.setattr(kernel_sweep, "layer", lambda M, N, impl: layer(M, N, impl, device))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(sys, "argv", ["kernel_sweep", "--reads", "6x10"])
    kernel_sweep.main()
    assert names == ["spectral_norm_fwd_kernel"] + ["spectral_norm_fwd_kernel", "spectral_norm_bwd_kernel"] * 3, names
    script = (Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh").read_text()
    (pattern, skip, count), = re.findall(r"--kernel-name regex:(\S+) --launch-skip (\d+) --launch-count (\d+)", script)
    assert all(re.search(pattern, name) for name in names)
    assert names[int(skip):int(skip) + int(count)] == ["spectral_norm_fwd_kernel", "spectral_norm_bwd_kernel"]
    assert len(names) == int(skip) + int(count)  # the third of each: nothing after them
    assert capsys.readouterr().out.startswith("# 6x10: _LaunchConfig(")


def test_phase_times_time_each_phase_alone_then_the_one_launch(monkeypatch, capsys):
    """``--phases``: each timed call of a phase launches that phase's launch alone (the plan's
    phase-by-phase sequence, in order: a read's, then a backward's), then the one launch of each
    is timed; the line names every phase."""
    import torch

    from bench import kernel_sweep

    launched, timed = [], []
    launch = snm._launch

    def spy(kernel, *args):
        launched.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        return launch(kernel, *args)

    def timer(fn):
        before = len(launched)
        fn()
        timed.append(launched[before:])
        return 1.0

    monkeypatch.setattr(snm, "_launch", spy)
    monkeypatch.setattr(kernel_sweep, "cuda_device", lambda: torch.device(device))
    monkeypatch.setattr(kernel_sweep, "graph_time_us", timer)
    M, N = 6, 10
    results = kernel_sweep.phase_times([(M, N)])
    cfg = kernel_sweep.launched_config(M, N)
    assert cfg.grid == 1  # (the interpreter runs one launch of several programs only phase by phase)
    fwd = [p for p, _ in snm._forward_phases(True, 1, cfg.ON_CHIP)]
    names = {snm.kernels.PHASE_ST: "ST", snm.kernels.PHASE_R: "R", snm.kernels.PHASE_F: "F",
             snm.kernels.PHASE_FIX_T: "FIX_T", snm.kernels.PHASE_FIX_R: "FIX_R"}
    assert [r["kind"] for r in results] == ["fwd", "bwd"]
    assert cfg.ON_CHIP
    assert {r["loads"] for r in results} == {f"on-chip s{cfg.LOAD_STAGES}/{cfg.RESCALE_STAGES} p0/0 q{cfg.BLOCK_Q} g1"}
    assert [x["phase"] for x in results[0]["phases"]] == [names[p] for p in fwd]
    assert [x["phase"] for x in results[1]["phases"]] == ["DOT", "GRAD"]
    one = [["spectral_norm_fwd_kernel"]] * (len(fwd) + 1) + [["spectral_norm_bwd_kernel"]] * 3
    assert timed == one, timed
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.split()[1:4] == ["[1", "on-chip", f"s{cfg.LOAD_STAGES}/{cfg.RESCALE_STAGES}"], line
    assert all(f"fwd.{names[p]}:1.0" in line for p in fwd) and "bwd.DOT:1.0" in line and "bwd.GRAD:1.0" in line
    assert "fwd sum %.1f one launch 1.0" % len(fwd) in line and "bwd sum 2.0 one launch 1.0" in line


def test_reads_per_graph_sets_the_reads_each_replay_times(monkeypatch):
    """``--reads-per-graph`` (``READS_PER_GRAPH``): the captured graph holds that many calls and the
    time is per call; unset, each caller's count (20 reads, 10 with the backward). With 1, the L2
    flush before each replay makes every read a cold one (gpu_check's L2-flushed table)."""
    import contextlib

    import triton

    from bench import kernel_sweep

    cuda = kernel_sweep.torch.cuda
    for name, stub in (("Stream", lambda: mock.MagicMock()), ("current_stream", lambda: mock.MagicMock()),
                       ("stream", lambda s: contextlib.nullcontext()), ("CUDAGraph", lambda: mock.MagicMock()),
                       ("graph", lambda g: contextlib.nullcontext())):
        monkeypatch.setattr(cuda, name, stub)
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: 1.0)  # ms per replay
    for setting, want_calls in ((None, 10), (1, 1), (4, 4)):
        monkeypatch.setattr(kernel_sweep, "READS_PER_GRAPH", setting)
        calls = []
        us = kernel_sweep.graph_time_us(lambda: calls.append(1), reps_per_graph=10)
        assert len(calls) - 3 == want_calls  # (3 warm-up calls before the capture)
        assert us == 1e3 / want_calls


def test_channels_last_layers_are_the_same_matrix_in_memory_order(monkeypatch):
    """``--channels-last`` (``CHANNELS_LAST``): the table's M x N layer is a 3x3 Conv2d with N / 9
    input channels and a channels-last weight, for sn_fused and PyTorch alike; an N that is not
    9 x in-channels is refused. Unset: the Linear as before."""
    import torch

    from bench import kernel_sweep

    monkeypatch.setattr(kernel_sweep, "CHANNELS_LAST", True)
    for impl in ("sn_fused", "torch"):
        m = kernel_sweep.layer(4, 18, impl, device="cpu")
        w = m.parametrizations.weight.original
        assert isinstance(m, torch.nn.Conv2d) and w.shape == (4, 2, 3, 3)
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
        assert m.weight.shape == w.shape
    with pytest.raises(ValueError, match="N = 20 is not 9 x in-channels"):
        kernel_sweep.layer(4, 20, "sn_fused", device="cpu")
    monkeypatch.setattr(kernel_sweep, "CHANNELS_LAST", False)
    assert kernel_sweep.layer(4, 20, "sn_fused", device="cpu").weight.shape == (4, 20)
