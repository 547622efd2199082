"""Kernel-level sweep on a GPU: sn_fused vs PyTorch SN per shape, against the memory floor.

A quick companion of ``python -m bench`` for kernel work: for each (M, N) it times
the forward read and the backward as CUDA-graph replays (pure GPU time) and as
eager host-inclusive calls, and sn_fused's backward kernel alone (graph), and prints the
floor from the copy bandwidth measured in the same run. ``--sweep`` also tries launch-config
variants (elements per program, pipelined loads) so tuning decisions come from measurements. ``--eager-ab`` times the eager reads
of issue #3's eager goal (the SNGAN ResNet D's shapes) in interleaved rounds.

    python -m bench.kernel_sweep [--sweep] [--bwd-sweep] [--on-chip-sweep] [--profile]
                                 [--compile-probe] [--eager-ab] [--graph-only] [--no-torch] [--no-table]
                                 [--sweep-shapes MxN,...] [--sweep-knobs NAME[=V/V...],...] [--reads MxN]
                                 [--phases [MxN,...]] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import torch
import triton

import sn_fused
from sn_fused.ops import spectral_norm as ops_mod

SHAPES = [(64, 27), (128, 1152), (512, 4608), (768, 6912), (1536, 13824), (4096, 4096), (1, 8192),
          (24576, 20), (1000, 1536)]


def cuda_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def copy_bandwidth() -> float:
    """Bytes read + written per second of a large device-to-device copy."""
    x = torch.empty(256 * 2**20, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    copy_bandwidth.last = 2 * x.numel() * 4 / (ms * 1e-3)
    return copy_bandwidth.last


#: Reads per captured graph (``--reads-per-graph``; None: 20, 10 for a read + backward). do_bench
#: flushes L2 before each replay, so with 1 every read starts from a cold L2: what a weight that
#: fits in L2 costs when other layers ran in between (the default replays keep it warm).
READS_PER_GRAPH = None


def graph_time_us(fn, reps_per_graph=20) -> float:
    """Median GPU time of one ``fn()`` from replays of a graph holding ``reps_per_graph`` calls
    (``READS_PER_GRAPH`` where set)."""
    reps_per_graph = READS_PER_GRAPH or reps_per_graph
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps_per_graph):
            fn()
    ms = triton.testing.do_bench(g.replay, warmup=10, rep=100, return_mode="median")
    return ms * 1e3 / reps_per_graph


def eager_time_us(fn, iters=200) -> float:
    """Host-inclusive time per call of a back-to-back eager loop (what a Python loop pays)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / iters * 1e6)
    return sorted(times)[len(times) // 2]


#: ``--channels-last``: the table's layers are 3x3 convolutions (``N`` = 9 x in-channels) with
#: channels-last weights, whose columns the kernels walk in memory order (bench/NOTES.md v20).
CHANNELS_LAST = False


def layer(M, N, impl, device="cuda"):
    """An ``M x N`` weight with PyTorch's or sn_fused's SN: a Linear, or a channels-last 3x3
    Conv2d where ``CHANNELS_LAST`` is set (the same matrix, its columns in another order)."""
    torch.manual_seed(0)
    if CHANNELS_LAST:
        if N % 9:
            raise ValueError(f"--channels-last takes 3x3 conv weights: N = {N} is not 9 x in-channels")
        module = torch.nn.Conv2d(N // 9, M, 3, bias=False).to(device, memory_format=torch.channels_last)
    else:
        module = torch.nn.Linear(N, M, bias=False).to(device)
    with torch.no_grad():
        module.weight.normal_()
    if impl == "sn_fused":
        return sn_fused.spectral_norm(module)
    return torch.nn.utils.parametrizations.spectral_norm(module)


def backward_alone_us(m, g) -> float:
    """Graph time of sn_fused's backward kernel alone (the op, not autograd) for layer ``m``'s
    weight and an incoming gradient ``g``: what issue #3's backward goal is about (floor: read G
    and W, write dW)."""
    p = m.parametrizations.weight[0]
    w = m.parametrizations.weight.original.detach()
    _, us, vs, sigma = ops_mod.spectral_norm_forward_fused(w, p._u, p._v, p._sigma, p._sem)
    return graph_time_us(lambda: ops_mod.spectral_norm_backward_fused(g, w, us, vs, sigma, p._sem))


def measure(M, N, impl, graph_only=False):
    m = layer(M, N, impl)
    g = torch.randn_like(m.parametrizations.weight.original)  # (the weight's shape and strides)

    def fwd():
        return m.weight

    def fwd_bwd():
        m.weight.backward(g)

    nan = float("nan")
    return dict(
        fwd_graph=graph_time_us(fwd),
        fwd_eager=nan if graph_only else eager_time_us(fwd),
        fwdbwd_graph=graph_time_us(fwd_bwd, reps_per_graph=10),
        fwdbwd_eager=nan if graph_only else eager_time_us(fwd_bwd, iters=100),
        bwd_graph=backward_alone_us(m, g) if impl == "sn_fused" else nan,
    )


KNOBS = dict(_PROGRAMS_PER_SM=(2, 4), _NUM_WARPS=(4, 16), _NUM_STAGES=(1, 4), _TILE_ELEMENTS=(4096, 8192, 32768),
             _MIN_ELEMENTS_PER_PROGRAM=(2048, 4096, 16384, 32768), _LOAD_STAGES=(1, 2, 3, 4), _RESCALE_STAGES=(1, 2, 3),
             _LOAD_PREFETCH=(1,), _RESCALE_PREFETCH=(1,), _PARTIALS_TILE_ELEMENTS=(8192, 32768))
# Knobs changed together: "A+B" with value tuples.
# (stages: 0, the default, pipelines both loops where A does not fit in L2; 1/1 pipelines none)
KNOBS["_LOAD_STAGES+_RESCALE_STAGES"] = ((1, 1), (3, 3))
KNOBS["_LOAD_PREFETCH+_RESCALE_PREFETCH"] = ((1, 1),)
# (16 warps in both kernels: the backward's default 32768-element tiles spill 76 bytes there,
# 16384-element ones none; ptxas sm_90a, 768x6912, 1536x13824, 4096x4096)
KNOBS["_NUM_WARPS+_BWD_TILE_ELEMENTS"] = ((16, 16384),)
# (the backward's GRAD pass pipelined: 32768-element fp32 tiles fit 2 stages, 16384 ones 3)
KNOBS["_GRAD_STAGES"] = (2,)
KNOBS["_GRAD_STAGES+_BWD_TILE_ELEMENTS"] = ((3, 16384),)
# (0: the backward streams rows wider than _BWD_BLOCK_N, as before session 17; 1x8192, 256x8192)
KNOBS["_BWD_ON_CHIP_MAX_ROW"] = (0,)
# (ptxas free to use 255 registers, where it otherwise keeps room for a second CTA per SM: 286 of
# the 336 default launches of bench/shapes.py's layers compile differently, 10 of the 12 that
# spilled do not; `SN_FUSED_MAXNREG=255 python -m bench.sm90`)
KNOBS["_MAXNREG"] = (255,)
# Rows aligned to 2-8 elements, not 16 (BigGAN G's 24576x20 and Cx148): told to the kernels by
# default (16-byte loads), or not, as before session 22 (session 22; differs on such weights only).
KNOBS["_ROW_ALIGN"] = (0,)
# A program's tile kept in registers through the streaming read where the table of partials is too
# large for ON_CHIP (KEEP_A, session 25: 1000x1536, 256x8192, ...), or re-read by the rescale as
# before (0); and KEEP_A also where ON_CHIP runs (_ON_CHIP_MAX_PARTIALS=0: two barriers and each
# program combining its own columns, against one barrier and every program reading the whole table).
KNOBS["_KEEP_A"] = (0,)
KNOBS["_ON_CHIP_MAX_PARTIALS"] = (0,)
# (tiles of twice the streaming tile kept: 512x4608's 4 x 8192, 1536x1536's 16 x 2048; not the default)
KNOBS["_KEEP_A_MAX_ELEMENTS"] = (32768,)
SWEEP_SHAPES = [(128, 1152), (768, 6912), (1536, 13824), (4096, 4096)]


def first_read_error(m) -> float:
    """Max relative error of the layer's first read against the float64 reference (same u, v)."""
    from sn_fused.reference import spectral_norm_reference

    p = m.parametrizations.weight[0]
    w = m.parametrizations.weight.original.detach()
    want, _ = spectral_norm_reference(w.double(), p._u.double().clone(), p._v.double().clone())
    got = m.weight.detach().double()
    return ((got - want).abs().max() / want.abs().max()).item()


def _plans(M: int, N: int):
    """The plans of ``layer(M, N, "sn_fused")``'s training read (float32) and backward."""
    dev = cuda_device()
    return (ops_mod._forward_plan((M, N), (N, 1), (N, 1), 0, dev, 1, True, None, None, 4),
            ops_mod._backward_plan((M, N), (N, 1), (N, 1), (N, 1), 0, dev, None, None, 4))


def launched_config(M: int, N: int):
    """The launch config of a training read of ``layer(M, N, "sn_fused")`` (float32) as launched:
    the plan's, where the knobs' loads over A are lowered or refused to what fits."""
    return _plans(M, N)[0].cfg


def launched_plans(M: int, N: int):
    """(forward config, backward config) of ``layer(M, N, "sn_fused")``'s read and backward as
    launched: the plans', where the knobs are lowered or refused to what fits."""
    return tuple(plan.cfg for plan in _plans(M, N))


# How a layer loads its tiles as launched (launched_loads), as the sweeps' lines print it.
LOADS_LEGEND = ("G, the forward's path (on-chip, kept, streaming), sLOAD/RESCALE_STAGES pLOAD/RESCALE_PREFETCH "
                "qBLOCK_Q gGRAD_STAGES as launched")


def launched_loads(fwd, bwd) -> str:
    """How a layer with these launched (forward, backward) configs (``launched_plans``) loads
    its tiles: the forward's path (ON_CHIP, KEEP_A or neither), ``sLOAD/RESCALE_STAGES
    pLOAD/RESCALE_PREFETCH qBLOCK_Q`` of the forward (Q: phase R's partials per step),
    ``gGRAD_STAGES`` of the backward."""
    return (f"{fwd.path} s{fwd.LOAD_STAGES}/{fwd.RESCALE_STAGES} p{fwd.LOAD_PREFETCH}/{fwd.RESCALE_PREFETCH} "
            f"q{fwd.BLOCK_Q} g{bwd.GRAD_STAGES}")


def knob_sweep(shapes=SWEEP_SHAPES, knobs=KNOBS):
    """Forward graph time, and the backward kernel's alone, per shape with one launch knob
    changed at a time from the defaults (some knobs set both kernels: ``_NUM_WARPS``).

    Each variant's first read is also checked against the float64 reference (``err`` above
    1e-5 is flagged), so a faster variant is known to compute the same thing. The defaults
    are timed first and again last: the spread of the two is the drift of the run. A variant
    whose launches (both kernels' configs, compile options and arguments as launched) are the
    defaults' is not timed again:
    it prints ``=default`` (a knob the launcher refused or lowered, or one that changes nothing
    on that shape). One line per entry, as it finishes (a run cut short keeps what it timed).
    """
    defaults = {name: getattr(ops_mod, name) for knob in knobs for name in knob.split("+")}
    results = []
    print(f"# knob sweep: fwd/bwd graph us [{LOADS_LEGEND}] (one knob changed from the defaults {defaults})")
    nan = float("nan")

    def launched(M, N):  # (both configs, the compile options they launch with, where only _MAXNREG
        # shows, and the arguments after the tensors of each launch, where only _ROW_ALIGN shows)
        plans = _plans(M, N)
        configs = tuple(plan.cfg for plan in plans)
        return configs, [ops_mod._launch_options(cfg, True) for cfg in configs], [plan.launches for plan in plans]

    for M, N in shapes:
        default_launch = launched(M, N)
        for knob, values in [("default", (None,))] + list(knobs.items()) + [("default", (None,))]:
            for val in values:
                names, vals = knob.split("+"), val if "+" in knob else (val,)
                label = "+".join(name.strip("_") for name in names)  # (not cut: _RESCALE_STAGES, _RESCALE_PREFETCH)
                with ops_mod._launch_knobs(**({} if knob == "default" else dict(zip(names, vals)))):
                    launch = launched(M, N)
                    plans = launch[0]
                    grid, loads = plans[0].grid, launched_loads(*plans)
                    same = knob != "default" and launch == default_launch
                    t = tb = err = nan
                    if not same:
                        try:
                            m = layer(M, N, "sn_fused")
                            err = first_read_error(m)
                            t = graph_time_us(lambda: m.weight)
                            tb = backward_alone_us(m, torch.randn(M, N, device=cuda_device()))
                        except Exception as e:  # e.g. a grid too large for a cooperative launch
                            print(f"  {M}x{N} {label}={val}: {type(e).__name__}: {str(e)[:100]}")
                results.append(dict(M=M, N=N, knob=knob, value=val, grid=grid, loads=loads, fwd_graph_us=t,
                                    bwd_graph_us=tb, rel_err=err, same_as_default=same))
                flag = "" if err <= 1e-5 else f" ERR {err:.1e}"  # (NaN: the variant raised, or read NaN)
                timed = "=default" if same else f"{t:.1f}/{tb:.1f}"
                print(f"{M:>5}x{N:<6} {label}={val}:{timed}[{grid} {loads}]{flag}", flush=True)
    return results


PHASE_SHAPES = [(768, 6912), (1536, 13824), (4096, 4096)]


def phase_times(shapes=PHASE_SHAPES):
    """Where the time of one launch goes: graph time of each phase of a training read (n = 1) and
    of a backward launched alone, as the interpreter runs them (``phase_by_phase``, kernels.py's
    ``PHASE_*``), next to the one launch they make together (grid barriers instead of launch
    boundaries). A phase alone pays a launch (~2 us in a graph) and no barrier. Rates: phase ST
    reads A (bytes / time); the forward's last phase F rescales (reads A, writes W_sn); the
    backward's DOT reads G and W, GRAD reads G and writes dW."""
    fwd_names = {getattr(ops_mod.kernels, n): n[6:] for n in ("PHASE_ST", "PHASE_R", "PHASE_F", "PHASE_FIX_T",
                                                              "PHASE_FIX_R")}
    bwd_names = {ops_mod.kernels.PHASE_DOT: "DOT", ops_mod.kernels.PHASE_GRAD: "GRAD"}
    results = []
    print(f"# phases alone: [{LOADS_LEGEND}], graph us of each launch of the phase-by-phase mode [TB/s over "
          "the bytes it must move], then the one launch")
    for M, N in shapes:
        dev = cuda_device()
        torch.manual_seed(0)
        w, g = torch.randn(M, N, device=dev), torch.randn(M, N, device=dev)
        u, v = (torch.nn.functional.normalize(torch.randn(n, device=dev), dim=0) for n in (M, N))
        out, dw, saved = torch.empty_like(w), torch.empty_like(w), torch.empty(M + N + 1, device=dev)
        sigma_buf, sem = torch.empty((), device=dev), ops_mod.new_semaphore(dev)
        a_bytes = M * N * 4
        plans = launched_plans(M, N)
        cfg, loads = plans[0], launched_loads(*plans)
        line = [f"[{cfg.grid} {loads}]"]
        for kind, names, call in (
                ("fwd", fwd_names, lambda pbp: ops_mod._launch_forward(w, out, u, v, saved, sigma_buf, sem, 0, 1,
                                                                        1e-12, True, phase_by_phase=pbp)),
                ("bwd", bwd_names, lambda pbp: ops_mod._launch_backward(g, w, dw, saved, sem, 0,
                                                                         phase_by_phase=pbp))):
            launches, launch = [], ops_mod._launch
            ops_mod._launch = lambda *a: launches.append(a) or launch(*a)
            try:
                call(True)
            finally:
                ops_mod._launch = launch
            # (the phases in launch order, as the plans list them)
            order = ([p for p, _ in ops_mod._forward_phases(True, 1, cfg.ON_CHIP)] if kind == "fwd"
                     else [ops_mod.kernels.PHASE_DOT, ops_mod.kernels.PHASE_GRAD])
            assert len(order) == len(launches), (kind, order, len(launches))
            times = []
            for i, (a, phase) in enumerate(zip(launches, order)):
                name = names[phase]
                t = graph_time_us(lambda a=a: launch(*a))
                last_f = kind == "fwd" and name == "F" and i == len(launches) - 1
                moved = {"ST": a_bytes, "DOT": 2 * a_bytes, "GRAD": 2 * a_bytes}.get(name, 2 * a_bytes if last_f else 0)
                rate = f"[{moved / (t * 1e-6) / 1e12:.2f}]" if moved else ""
                times.append(dict(phase=name, us=t))
                line.append(f"{kind}.{name}:{t:.1f}{rate}")
            one = graph_time_us(lambda: call(False))
            line.append(f"{kind} sum {sum(x['us'] for x in times):.1f} one launch {one:.1f} |")
            results.append(dict(M=M, N=N, kind=kind, grid=cfg.grid, loads=loads, phases=times, one_launch_us=one))
        print(f"{M:>5}x{N:<6} " + " ".join(line), flush=True)
    return results


BWD_KNOBS = [(32768, 4096), (16384, 4096), (8192, 2048), (32768, 8192), (16384, 16384)]  # (_BWD_TILE_ELEMENTS, _BWD_BLOCK_N)
BWD_SWEEP_SHAPES = [(128, 1152), (768, 6912), (1536, 13824), (4096, 4096)]


def bwd_sweep():
    """Backward kernel alone (graph time) per backward tile shape; the last row is the forward's tiles."""
    defaults = (ops_mod._BWD_TILE_ELEMENTS, ops_mod._BWD_BLOCK_N)
    results = []
    print("# backward sweep: bwd graph us per (tile elements, max BLOCK_N); defaults %s" % (defaults,))
    for M, N in BWD_SWEEP_SHAPES:
        m = layer(M, N, "sn_fused")
        g = torch.randn(M, N, device="cuda")
        line = []
        for tile, bn in BWD_KNOBS:
            with ops_mod._launch_knobs(_BWD_TILE_ELEMENTS=tile, _BWD_BLOCK_N=bn):
                t = backward_alone_us(m, g)
            results.append(dict(M=M, N=N, tile=tile, block_n=bn, bwd_graph_us=t))
            line.append(f"{tile}/{bn}:{t:.1f}")
        floor_b = 3 * M * N * 4 / copy_bandwidth.last * 1e6
        print(f"{M:>5}x{N:<6} floor {floor_b:6.1f} | " + " ".join(line), flush=True)
    return results


# ON_CHIP (kernels.py) against the streaming path on the weights small enough for it, and with
# the partials limit raised, to find where every program reading the whole table stops paying.
ON_CHIP_KNOBS = [("streaming", dict(_ON_CHIP=False)), ("default", {}), ("kept", dict(_ON_CHIP_MAX_PARTIALS=0)),
                 ("limit 2^20", dict(_ON_CHIP_MAX_PARTIALS=2**20)), ("rows 4096", dict(_ON_CHIP_MAX_ROW=4096))]
ON_CHIP_SHAPES = [(64, 27), (128, 27), (1, 128), (1, 8192), (128, 128), (128, 1152), (24576, 20), (4096, 64),
                  (256, 2304), (1000, 1536)]


def on_chip_sweep():
    """Forward graph time (and fwd+bwd) per path: streaming, default, KEEP_A, a high partials limit."""
    results = []
    print("# ON_CHIP sweep: fwd graph us (f+b graph us) [G, forward on_chip, keep_a] per variant; partials limit "
          f"(default {ops_mod._ON_CHIP_MAX_PARTIALS})")
    for M, N in ON_CHIP_SHAPES:
        line, seen = [], set()
        for name, knobs in ON_CHIP_KNOBS:
            with ops_mod._launch_knobs(**knobs):
                cfg = ops_mod._launch_config(M, N, cuda_device(), None)
                key = (cfg, ops_mod._ON_CHIP)  # the forward's plan; the backward's follows _ON_CHIP
                if key in seen:  # the same launches as a variant already timed
                    continue
                seen.add(key)
                r = measure(M, N, "sn_fused", graph_only=True)
            results.append(dict(M=M, N=N, path=name, grid=cfg.grid, on_chip=cfg.ON_CHIP, keep_a=cfg.KEEP_A,
                                fwd_graph_us=r["fwd_graph"], fwdbwd_graph_us=r["fwdbwd_graph"]))
            line.append(f"{name}: {r['fwd_graph']:.1f} ({r['fwdbwd_graph']:.1f}) "
                        f"[{cfg.grid}, {int(cfg.ON_CHIP)}, {int(cfg.KEEP_A)}]")
        print(f"{M:>5}x{N:<6} " + " | ".join(line), flush=True)
    return results


def compile_probe(M=128, N=1152):
    """Host-inclusive time of one read under ``torch.compile`` (default mode, no CUDA graphs).

    Compares the shipped path (the ``triton_op``, which Inductor launches as a user-defined
    Triton kernel) with the same launcher behind an opaque ``custom_op`` (Inductor calls it
    as an extern op), and prints a profiler table of the shipped path: what a compiled
    step pays per SN read beyond the kernel.
    """
    from torch.profiler import ProfilerActivity, profile

    m = layer(M, N, "sn_fused")
    p = m.parametrizations.weight[0]
    w = m.parametrizations.weight.original.detach()
    u, v, sb, sem = p._u, p._v, p._sigma, p._sem

    # W_sn only: the launcher's u, v, sigma are views of one buffer, and a custom_op's
    # outputs may not alias each other.
    @torch.library.custom_op("sn_fused_probe::forward", mutates_args={"u", "v", "sigma_buf", "sem"})
    def probe(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, sigma_buf: torch.Tensor,
              sem: torch.Tensor) -> torch.Tensor:
        return ops_mod.spectral_norm_forward_fused(weight, u, v, sigma_buf, sem)[0]

    @probe.register_fake
    def _(weight, u, v, sigma_buf, sem):
        return torch.empty_like(weight)

    cases = {
        "eager launcher": lambda: ops_mod.spectral_norm_forward_fused(w, u, v, sb, sem)[0],
        "compiled triton_op (shipped)": torch.compile(
            lambda: torch.ops.sn_fused.spectral_norm_forward(w, u, v, sb, sem, 0, 1, 1e-12, True)[0],
            fullgraph=True),
        "compiled custom_op (probe)": torch.compile(lambda: probe(w, u, v, sb, sem), fullgraph=True),
        "eager m.weight": lambda: m.weight,
        "compiled m.weight": torch.compile(lambda: m.weight, fullgraph=True),
    }
    print(f"# compile probe {M}x{N}: host-inclusive us per read")
    for name, fn in cases.items():
        print(f"  {name:30s} {eager_time_us(fn):8.1f} us", flush=True)
    fn = cases["compiled triton_op (shipped)"]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


#: The SNGAN ResNet D's 11 normalized tensors (CIFAR, ch 128; ../shared/DESIGN.md §3): the
#: shapes of issue #3's eager goal (>= 6x PyTorch's SN).
SNGAN_RESNET_D = [(128, 27)] + [(128, 1152)] * 7 + [(128, 3), (128, 128), (1, 128)]


def eager_ab(shapes=SNGAN_RESNET_D, budget_s=0.4, rounds=9, device="cuda"):
    """Eager reads (host included) of sn_fused and PyTorch's SN in interleaved rounds.

    The table's eager columns time each layer in its own back-to-back loop, one after the
    other; on a busy host they swing up to 2x between runs of the same code. Here every row
    of a shape is timed in the same rounds (``harness.time_eager_interleaved``: median over
    ``rounds``, each round visiting every row, starting one later each time), so a drift of
    the host hits all of them alike. Rows: sn_fused as a user gets it (the C++ read where
    ``sn_fused._C`` is built), sn_fused through the Python read (a layer of its own, made and
    read with ``CPP_READS`` off), and PyTorch's parametrization; a read, and a read plus
    backward. The last line reads every tensor of the whole D once (``shapes``, repeats
    included). Returns the rows.
    """
    from bench.harness import python_read, time_eager_interleaved

    dev = torch.device(device)
    impls = ["sn_fused"] + (["sn_fused, Python read"] if ops_mod.CPP_READS else []) + ["PyTorch"]

    def make(M, N, impl):
        if impl == "sn_fused, Python read":
            return python_read(lambda: layer(M, N, "sn_fused", device))()
        return layer(M, N, "sn_fused" if impl == "sn_fused" else "torch", device)

    def calls(layers, impl):
        grads = [torch.randn(m.weight.shape, device=dev) for m in layers]

        def fwd():
            for m in layers:
                m.weight

        def fwd_bwd():
            for m, g in zip(layers, grads):
                m.weight.backward(g)
        return (python_read(fwd), python_read(fwd_bwd)) if impl == "sn_fused, Python read" else (fwd, fwd_bwd)

    groups = [(f"{M}x{N}", [(M, N)]) for M, N in dict.fromkeys(shapes)]
    if len(shapes) > 1:
        groups.append((f"all {len(shapes)}", list(shapes)))
    print(f"# eager A/B, interleaved rounds (median of {rounds}), host-inclusive us; "
          f"x = PyTorch / row; C++ read built and on: {ops_mod.CPP_READS}")
    print(f"{'shapes':>12} {'':>4} | " + " | ".join(f"{name:>22}" for name in impls))
    rows = []
    for name, group in groups:
        fns = {impl: calls([make(M, N, impl) for M, N in group], impl) for impl in impls}
        for j, what in enumerate(("fwd", "f+b")):
            us = time_eager_interleaved([fns[impl][j] for impl in impls], dev, budget_s, rounds)
            us = dict(zip(impls, (t * 1e6 for t in us)))
            rows.append(dict(shapes=name, what=what, us=us))
            cells = [f"{us[impl]:10.1f} ({us['PyTorch'] / us[impl]:5.2f}x)" if impl != "PyTorch"
                     else f"{us[impl]:22.1f}" for impl in impls]
            print(f"{name:>12} {what:>4} | " + " | ".join(f"{c:>22}" for c in cells), flush=True)
    return rows


def host_profile(M=128, N=1152):
    """Where the eager host time of one read goes: layer, launcher, raw launch."""
    import cProfile
    import pstats

    m = layer(M, N, "sn_fused")
    p = m.parametrizations.weight[0]
    w = m.parametrizations.weight.original
    for _ in range(5):
        m.weight
    print(f"# host profile {M}x{N}: launch hooks set: {ops_mod._launch_hooks_set()}, "
          f"cached runners: {len(ops_mod._RUNNERS)}")
    print(f"  m.weight                      {eager_time_us(lambda: m.weight):8.1f} us")
    with torch.no_grad():
        print(f"  m.weight (no_grad)            {eager_time_us(lambda: m.weight):8.1f} us")
    print(f"  spectral_norm_forward_fused   "
          f"{eager_time_us(lambda: ops_mod.spectral_norm_forward_fused(w, p._u, p._v, p._sigma, p._sem)):8.1f} us")
    print(f"  torch.empty x5                "
          f"{eager_time_us(lambda: [torch.empty(16, device='cuda') for _ in range(5)]):8.1f} us")
    print(f"  torch.add_ (one tiny kernel)  {eager_time_us(lambda: p._sigma.add_(0)):8.1f} us")
    key, runner = next(iter(ops_mod._RUNNERS.items()))
    print(f"  (runner key has {len(key)} entries)")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(300):
        m.weight
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(18)


def print_compiled(kernel) -> None:
    """Registers, spills and shared memory of each compiled variant of a Triton kernel."""
    for cache in getattr(kernel, "device_caches", {}).values():
        for compiled in cache[0].values():
            md = compiled.metadata
            print(f"  compiled: {getattr(compiled, 'n_regs', '?')} registers, {getattr(compiled, 'n_spills', '?')} "
                  f"spills, {getattr(md, 'shared', '?')} B shared, {getattr(md, 'num_warps', '?')} warps")


def parse_knobs(text: str) -> dict:
    """``--sweep-knobs``: ``"_LOAD_STAGES,_TILE_ELEMENTS=32768/8192"`` -> each knob with the values
    given after ``=`` (``/``-separated ints), else with its values in ``KNOBS``."""
    knobs = {}
    for item in text.split(","):
        name, _, values = item.partition("=")
        if not values:
            if name not in KNOBS:
                raise SystemExit(f"--sweep-knobs: {name!r} is not one of {', '.join(KNOBS)} (or give NAME=V/V)")
            knobs[name] = KNOBS[name]
        elif not (re.fullmatch(r"_[A-Z_]+", name) and type(getattr(ops_mod, name, None)) is int):
            raise SystemExit(f"--sweep-knobs: values after '=' need one integer launch knob of "
                             f"sn_fused.ops.spectral_norm (_NAME), got {name!r}")
        else:
            knobs[name] = tuple(int(v) for v in values.split("/"))
    return knobs


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"128x1152,1x8192"`` -> ``[(128, 1152), (1, 8192)]``."""
    return [tuple(int(x) for x in item.split("x")) for item in text.split(",") if item]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="launch knobs, one at a time (forward graph time)")
    ap.add_argument("--sweep-shapes", default=None, metavar="MxN,...",
                    help="shapes of --sweep (default %s)" % ",".join(f"{m}x{n}" for m, n in SWEEP_SHAPES))
    ap.add_argument("--sweep-knobs", default=None, metavar="NAME[=V/V...],...",
                    help="knobs of --sweep, each with its values in KNOBS or those given (default all: %s)"
                    % ",".join(KNOBS))
    ap.add_argument("--table-shapes", default=None, metavar="MxN,...",
                    help="the per-shape table's shapes (default %s)" % ",".join(f"{m}x{n}" for m, n in SHAPES))
    ap.add_argument("--reads-per-graph", type=int, default=None, metavar="N",
                    help="reads (or reads + backwards) per captured graph; L2 is flushed before each replay, "
                         "so 1 times every read from a cold L2 (default 20, 10 with the backward: L2 warm)")
    ap.add_argument("--channels-last", action="store_true",
                    help="the table's weights as channels-last 3x3 conv weights (N = 9 x in-channels)")
    ap.add_argument("--reads", default=None, metavar="MxN",
                    help="only build one MxN layer (one read) and read it, then its backward, 3 times "
                         "(a target for ncu: --launch-skip 5 on both kernels profiles the third of each)")
    ap.add_argument("--phases", default=None, metavar="MxN,...",
                    help="graph time of each phase of a read and a backward launched alone, against the one "
                         "launch (default shapes %s)" % ",".join(f"{m}x{n}" for m, n in PHASE_SHAPES), nargs="?",
                    const=",".join(f"{m}x{n}" for m, n in PHASE_SHAPES))
    ap.add_argument("--profile", action="store_true", help="break down the eager host time")
    ap.add_argument("--out", default=None)
    ap.add_argument("--compile-probe", action="store_true", help="host cost of a read under torch.compile")
    ap.add_argument("--bwd-sweep", action="store_true", help="backward tile shapes")
    ap.add_argument("--on-chip-sweep", action="store_true",
                    help="ON_CHIP vs streaming forward on small weights")
    ap.add_argument("--no-table", action="store_true", help="skip the per-shape table (sweeps/probes only)")
    ap.add_argument("--graph-only", action="store_true", help="skip the eager (host-inclusive) timings")
    ap.add_argument("--eager-ab", action="store_true",
                    help="eager reads of the SNGAN ResNet D's shapes, sn_fused (C++ and Python read) and "
                         "PyTorch in interleaved rounds")
    ap.add_argument("--no-torch", action="store_true",
                    help="time sn_fused only (e.g. an older checkout, for a same-card A/B)")
    args = ap.parse_args()
    if args.reads:
        M, N = parse_shapes(args.reads)[0]
        m = layer(M, N, "sn_fused")
        g = torch.randn(M, N, device=cuda_device())
        for _ in range(3):
            m.weight.backward(g)
        torch.cuda.synchronize()
        print(f"# {M}x{N}: {launched_config(M, N)}")  # (with the SN_FUSED_* knobs of the run)
        print_compiled(ops_mod.kernels.spectral_norm_fwd_kernel)
        print_compiled(ops_mod.kernels.spectral_norm_bwd_kernel)
        return
    knobs = (KNOBS if not args.sweep_knobs else parse_knobs(args.sweep_knobs)) if args.sweep else None  # (fail fast)
    global READS_PER_GRAPH, CHANNELS_LAST
    READS_PER_GRAPH = args.reads_per_graph
    CHANNELS_LAST = args.channels_last
    bw = copy_bandwidth()
    dev = torch.cuda.get_device_name()
    print(f"# {dev}  torch {torch.__version__}  triton {triton.__version__}  "
          f"copy bandwidth {bw / 1e12:.2f} TB/s  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  "
          f"reads per graph {READS_PER_GRAPH or '20 (10 with the backward)'}, L2 flushed before each replay"
          + (", channels-last 3x3 conv weights" if CHANNELS_LAST else ""))
    rows = []
    shapes = [] if args.no_table else parse_shapes(args.table_shapes) if args.table_shapes else SHAPES
    hdr = (f"{'shape':>12} {'floor':>6} | {'SNF fwd':>8} {'x floor':>7} {'PT fwd':>7} | {'SNF eager':>9} "
           f"{'PT eager':>8} {'speedup':>7} | {'SNF f+b':>8} {'PT f+b':>7} | {'SNF f+b eager':>13} "
           f"{'PT f+b eager':>12} | {'SNF bwd':>7} {'x floor':>7}")
    if shapes:
        print(hdr)
    for M, N in shapes:
        floor_f = 2 * M * N * 4 / bw * 1e6
        snf = measure(M, N, "sn_fused", args.graph_only)
        nan = float("nan")
        pt = (dict(fwd_graph=nan, fwd_eager=nan, fwdbwd_graph=nan, fwdbwd_eager=nan, bwd_graph=nan) if args.no_torch
              else measure(M, N, "torch", args.graph_only))
        rows.append(dict(M=M, N=N, floor_fwd_us=floor_f, floor_bwd_us=1.5 * floor_f, sn_fused=snf, torch=pt))
        print(f"{M:>5}x{N:<6} {floor_f:6.1f} | {snf['fwd_graph']:8.1f} {snf['fwd_graph'] / max(floor_f, 1e-9):7.1f} "
              f"{pt['fwd_graph']:7.1f} | {snf['fwd_eager']:9.1f} {pt['fwd_eager']:8.1f} "
              f"{pt['fwd_eager'] / snf['fwd_eager']:7.1f} | {snf['fwdbwd_graph']:8.1f} {pt['fwdbwd_graph']:7.1f} | "
              f"{snf['fwdbwd_eager']:13.1f} {pt['fwdbwd_eager']:12.1f} | {snf['bwd_graph']:7.1f} "
              f"{snf['bwd_graph'] / max(1.5 * floor_f, 1e-9):7.1f}", flush=True)
    sweep = []

    def save():  # after each part: a run cut short (a device call's time limit) keeps what it measured
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "kernel_sweep.json"), "w") as f:
                json.dump(dict(device=dev, torch=torch.__version__, triton=triton.__version__,
                               copy_bandwidth=bw, reads_per_graph=READS_PER_GRAPH, channels_last=CHANNELS_LAST,
                               rows=rows, sweep=sweep),
                          f, indent=1)

    save()
    parts = [(args.eager_ab, lambda: [dict(eager_ab=eager_ab())]),
             (args.phases, lambda: phase_times(parse_shapes(args.phases))),
             (args.sweep, lambda: knob_sweep(parse_shapes(args.sweep_shapes) if args.sweep_shapes else SWEEP_SHAPES,
                                             knobs)),
             (args.bwd_sweep, bwd_sweep), (args.on_chip_sweep, on_chip_sweep)]
    for wanted, part in parts:
        if wanted:
            sweep += part()
            save()
    if args.profile:
        host_profile()
    if args.compile_probe:
        compile_probe()


if __name__ == "__main__":
    main()
