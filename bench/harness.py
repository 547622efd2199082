"""The one measurement harness: timers, implementations, per-layer and whole-step cases.

Everything ``python -m bench`` and ``bench/test_bench_layers.py`` measure is built here
(layers, steps, implementations from the same seeds). The timers differ: ``python -m bench``
times with the functions below; pytest-benchmark times its own rounds of back-to-back calls
(graph modes: a one-read graph replayed, L2 warm), for saved-run comparisons only.

Timers (see ``BENCHMARKS.md`` for the reasoning):

* :func:`time_eager` -- host-inclusive wall time: ``n`` back-to-back calls
  between two ``synchronize()`` calls, timed with ``perf_counter``; the median
  over rounds of the per-call mean. This is what a Python training loop pays
  (launch overhead included). L2 is not flushed. Training steps that are
  compared (no SN / PyTorch / sn_fused) are timed in interleaved rounds
  (:func:`time_eager_interleaved`).
* :func:`time_graph` -- pure GPU time: ``reads`` calls captured in one
  ``torch.cuda.CUDAGraph``, replays timed by ``triton.testing.do_bench``
  (median, CUDA events, L2 flushed before every replay).
* :func:`count_launches` -- CUDA kernels per call, from ``torch.profiler``.
* :func:`copy_bandwidth` -- bytes read + written per second of a large
  device-to-device copy, the bar for the memory floors.

Implementations of one spectral-norm read (``IMPLS``): ``sn_fused``,
``torch_param`` (``torch.nn.utils.parametrizations.spectral_norm``),
``torch_legacy`` (``torch.nn.utils.spectral_norm``: the forward pre-hook is
called directly, as ``module(x)`` would call it, then ``module.weight`` is
read), and ``torch.compile`` of the PyTorch / sn_fused reads.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.utils.parametrizations as torch_parametrizations
from torch import nn

import sn_fused

from . import models
from .shapes import Layer

__all__ = [
    "DTYPES", "IMPLS", "IMPL_LABELS", "LayerBench", "Budget",
    "sync", "python_read", "time_eager", "time_eager_interleaved", "time_graph", "capture_graph", "count_launches",
    "copy_bandwidth",
    "build_layer", "measure_layer", "build_step", "warm_up_step", "time_steps", "error_text", "floors_us",
    "release_memory",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

IMPLS = ("sn_fused", "torch_param", "torch_legacy", "torch_compile", "sn_fused_compile")
IMPL_LABELS = {
    "sn_fused": "sn_fused",
    "torch_param": "PyTorch",
    "torch_legacy": "PyTorch legacy hook",
    "torch_compile": "torch.compile(PyTorch)",
    "sn_fused_compile": "torch.compile(sn_fused)",
}
#: spectral_norm functions by implementation, for whole models (steps).
SN_FUNCTIONS: dict[str, Callable[..., nn.Module] | None] = {
    "none": None,
    "torch_param": torch_parametrizations.spectral_norm,
    "sn_fused": sn_fused.spectral_norm,
}


@dataclass(frozen=True)
class Budget:
    """How long each measurement may take."""

    eager_s: float = 0.1          # per eager measurement, all rounds together
    rounds: int = 5               # eager rounds (median over them)
    bench_warmup_ms: float = 10   # triton.testing.do_bench warmup
    bench_rep_ms: float = 50      # triton.testing.do_bench rep
    graph_reads: int = 1          # reads captured per CUDA graph (L2 flushed per replay)
    step_s: float = 1.0           # per training-step measurement
    step_rounds: int = 5          # rounds of the step measurement
    step_warmup: int | None = None  # warm-up steps; None: per mode (WARMUP_STEPS)
    launches: bool = True         # count kernels with torch.profiler


# --------------------------------------------------------------------------- timers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def python_read(call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` with sn_fused's C++ read (``sn_fused._C``) switched off, as under SN_FUSED_CPP=0:
    the Python read path, timed in the same process as the C++ one."""
    from sn_fused.ops import spectral_norm as ops_mod

    def python_path_call():
        on, ops_mod.CPP_READS = ops_mod.CPP_READS, False
        try:
            return call()
        finally:
            ops_mod.CPP_READS = on
    return python_path_call


def time_eager(fn: Callable[[], Any], device: torch.device, budget_s: float, rounds: int = 5,
               warmup: int = 2) -> float:
    """Seconds per call, host included: median over ``rounds`` of back-to-back loops.

    The loop length comes from a calibration (1, 4, 16... calls until a loop
    takes a tenth of a round), so slow calls (a training step) cost few extra
    calls and fast ones (a read) get loops of thousands.
    """
    return time_eager_interleaved([fn], device, budget_s, rounds, warmup)[0]


def time_eager_interleaved(fns: list[Callable[[], Any]], device: torch.device, budget_s: float,
                           rounds: int = 5, warmup: int = 2) -> list[float]:
    """:func:`time_eager` of several calls at once, rounds interleaved (A B C, A B C, ...).

    Each call gets ``budget_s``. A drift in clocks or host load during the
    measurement then hits every call alike, instead of whichever ran last:
    what a comparison of training steps (no SN vs PyTorch vs sn_fused) needs.
    """
    target = budget_s / rounds
    loops = []
    for fn in fns:
        for _ in range(warmup):
            fn()
        k = 1
        while True:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= target / 10 or k >= 4096:
                break
            k *= 4
        loops.append(max(1, min(100_000, int(target / max(elapsed / k, 1e-7)))))
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for k in range(len(fns)):
            i = (k + r) % len(fns)  # each round starts one later: no call is always first
            fn, n, out = fns[i], loops[i], samples[i]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync(device)
            out.append((time.perf_counter() - t0) / n)
    return [statistics.median(x) for x in samples]


def capture_graph(fn: Callable[[], Any], reads: int = 1, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """``reads`` calls of ``fn`` in one CUDA graph (warmed up on a side stream first)."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reads):
            fn()
    torch.cuda.synchronize()
    return graph


def time_graph(fn: Callable[[], Any], budget: Budget) -> float:
    """Seconds of GPU time per call, from CUDA-graph replays (``do_bench`` median, L2 flushed)."""
    import triton.testing

    graph = capture_graph(fn, budget.graph_reads)
    try:
        ms = triton.testing.do_bench(graph.replay, warmup=budget.bench_warmup_ms,
                                     rep=budget.bench_rep_ms, return_mode="median")
    finally:
        del graph
    return ms * 1e-3 / budget.graph_reads


def count_launches(fn: Callable[[], Any], iters: int = 3) -> dict[str, float] | None:
    """CUDA kernels (and memcpy/memset) per call of ``fn``, from ``torch.profiler``.

    Device events are classified by ``activity_type`` where the profiler has it,
    else by name; GPU-side user annotations (named like a CPU-side range) are
    not counted. ``None`` when the profiler saw no device activity at all.
    """
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    events = list(prof.events())
    cpu_names = {e.name for e in events if e.device_type != torch.autograd.DeviceType.CUDA}
    counts = {"kernels": 0, "memcpy": 0, "memset": 0}
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kind = str(getattr(e, "activity_type", None) or "").lower()
        name = e.name.lower()
        if "memcpy" in kind or name.startswith("memcpy"):
            counts["memcpy"] += 1
        elif "memset" in kind or name.startswith("memset"):
            counts["memset"] += 1
        elif kind == "kernel" or (not kind and e.name not in cpu_names):
            counts["kernels"] += 1
    if not any(counts.values()):
        return None
    return {k: v / iters for k, v in counts.items()}


def copy_bandwidth(device: torch.device, nbytes: int = 512 * 2**20) -> float:
    """Bytes read + written per second by ``dst.copy_(src)`` of ``nbytes``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        import triton.testing

        seconds = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200,
                                          return_mode="median") * 1e-3
    else:
        seconds = time_eager(lambda: dst.copy_(src), device, 0.2, rounds=3)
    del src, dst
    return 2 * nbytes / seconds


def floors_us(layer: Layer, dtype: torch.dtype, bandwidth: float) -> tuple[float, float]:
    """Memory floors (µs): forward reads W and writes W_sn; fwd+bwd adds read G, W, write dW."""
    nbytes = layer.numel * torch.empty((), dtype=dtype).element_size()
    return 2 * nbytes / bandwidth * 1e6, 5 * nbytes / bandwidth * 1e6


def probe_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The argument parser of a probe module (``bench/*_probe.py``): its docstring's first line,
    and ``--out DIR`` for its ``name.json``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", default=None, help=f"write {name}.json there")
    return ap


def checked_without_gpu(check: Callable[[], int], what: str, needs: str) -> bool:
    """A probe's CPU mode: without a CUDA GPU (or under ``TRITON_INTERPRET``), run ``check`` (the
    probe's launches against their expected results, through the interpreter) and say so, and
    that ``needs`` a GPU; True then. False on a GPU, where the probe times."""
    from sn_fused.ops import INTERPRET

    if torch.cuda.is_available() and not INTERPRET:
        return False
    if not INTERPRET:  # (Triton has no driver for CPU tensors: only its interpreter runs them)
        print(f"# no CUDA GPU, and TRITON_INTERPRET=1 not set: nothing checked; {needs} a GPU")
        return True
    print(f"# no CUDA GPU: checked {check()} launches of {what} (Triton interpreter); {needs} a GPU")
    return True


def save_json(obj: Any, out_dir: str | None, name: str) -> str | None:
    """``obj`` as indented JSON in ``out_dir/name`` (the folder made if missing); nothing
    without ``out_dir``. Returns the path written."""
    if not out_dir:
        return None
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    return path


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_compiler() -> None:
    """Forget compiled code (a fresh code cache per layer case, or per (model, mode) group of
    training steps: no reuse between them)."""
    torch.compiler.reset()


# --------------------------------------------------------------------------- per-layer cases


@dataclass
class LayerBench:
    """One spectral-normalized weight, ready to time."""

    layer: Layer
    impl: str
    dtype: torch.dtype
    n_power_iterations: int
    module: nn.Module
    param: torch.Tensor            # the leaf the gradient flows to
    read: Callable[[], torch.Tensor]
    grad_out: torch.Tensor

    def fwd(self) -> torch.Tensor:
        """One training-mode read of the normalized weight."""
        return self.read()

    def fwd_bwd(self) -> tuple[torch.Tensor, ...]:
        """Read, then backpropagate ``grad_out`` (same as ``w.backward(g)``, no accumulation)."""
        return torch.autograd.grad(self.read(), self.param, self.grad_out)


def _legacy_hook(module: nn.Module):
    from torch.nn.utils.spectral_norm import SpectralNorm

    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, SpectralNorm):
            return hook
    raise RuntimeError("no legacy SpectralNorm hook on the module")


def build_layer(layer: Layer, impl: str, *, dtype: torch.dtype, device: torch.device,
                n_power_iterations: int = 1, seed: int = 0) -> LayerBench:
    """The module of ``layer`` with ``impl``'s spectral norm, in training mode.

    The same ``seed`` gives every implementation the same weight, and the two
    parametrizations (which draw u, v the same way) the same u and v.
    """
    torch.manual_seed(seed)
    module = layer.make(device, dtype).train()
    torch.manual_seed(seed + 1)
    n = n_power_iterations
    if impl in ("sn_fused", "sn_fused_compile"):
        sn_fused.spectral_norm(module, n_power_iterations=n)
        param = module.parametrizations.weight.original
        read = lambda: module.weight  # noqa: E731
    elif impl in ("torch_param", "torch_compile"):
        torch_parametrizations.spectral_norm(module, n_power_iterations=n)
        param = module.parametrizations.weight.original
        read = lambda: module.weight  # noqa: E731
    elif impl == "torch_legacy":
        torch.nn.utils.spectral_norm(module, n_power_iterations=n)
        hook, param = _legacy_hook(module), module.weight_orig

        def read() -> torch.Tensor:
            hook(module, ())  # exactly what module(x) runs before forward
            return module.weight
    else:
        raise KeyError(f"unknown implementation {impl!r}; known: {', '.join(IMPLS)}")
    if impl.endswith("_compile"):
        read = torch.compile(read)
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    grad_out = torch.randn(layer.weight_shape, generator=gen, device=device, dtype=dtype)
    return LayerBench(layer, impl, dtype, n, module, param, read, grad_out)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def measure_layer(bench: LayerBench, device: torch.device, budget: Budget, bandwidth: float | None,
                  reference_out: torch.Tensor | None = None
                  ) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Every number of one (layer, impl, dtype, n): a flat dict (one JSON row).

    Also returns the first read's output (``None`` if it failed), so the
    caller can compare implementations: ``rel_err_vs_torch`` is the relative
    error of this first read against ``reference_out`` (PyTorch's first read).
    A measurement that raises is recorded under ``errors``; the others still run.
    """
    first: list[torch.Tensor] = []
    layer = bench.layer
    row: dict[str, Any] = dict(
        shape=layer.name, label=layer.label, groups=list(layer.groups), M=layer.M, N=layer.N,
        numel=layer.numel, dtype=DTYPE_NAMES[bench.dtype], n=bench.n_power_iterations,
        impl=bench.impl, errors={})

    def attempt(key: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 -- recorded, the run goes on
            row["errors"][key] = error_text(exc)
            return None

    def warm_up() -> float:
        t0 = time.perf_counter()
        out = bench.fwd()
        bench.fwd_bwd()
        sync(device)
        if reference_out is not None:
            row["rel_err_vs_torch"] = _rel_err(out, reference_out)
        first.append(out.detach())
        return time.perf_counter() - t0

    row["warmup_s"] = attempt("warmup", warm_up)
    if row["warmup_s"] is None:
        return row, None
    eager = lambda fn: time_eager(fn, device, budget.eager_s, budget.rounds) * 1e6  # noqa: E731
    row["eager_fwd_us"] = attempt("eager_fwd", lambda: eager(bench.fwd))
    row["eager_fwdbwd_us"] = attempt("eager_fwdbwd", lambda: eager(bench.fwd_bwd))
    if device.type == "cuda":
        row["graph_fwd_us"] = attempt("graph_fwd", lambda: time_graph(bench.fwd, budget) * 1e6)
        if bench.impl == "torch_legacy":
            # Seen on an H200 (torch 2.11): capturing the legacy hook's read + backward
            # invalidates the capture, and every later capture/RNG use in the process then
            # fails ("Offset increment outside graph capture"): not measured.
            row["graph_fwdbwd_us"] = None
        else:
            row["graph_fwdbwd_us"] = attempt("graph_fwdbwd", lambda: time_graph(bench.fwd_bwd, budget) * 1e6)
        if budget.launches:
            fwd = attempt("launches_fwd", lambda: count_launches(bench.fwd))
            both = attempt("launches_fwdbwd", lambda: count_launches(bench.fwd_bwd))
            row["launches_fwd"] = fwd["kernels"] if fwd else None
            row["launches_bwd"] = both["kernels"] - fwd["kernels"] if fwd and both else None
            row["memcpy_memset_fwdbwd"] = both["memcpy"] + both["memset"] if both else None
    if bandwidth:
        floor_f, floor_fb = floors_us(layer, bench.dtype, bandwidth)
        row["floor_fwd_us"], row["floor_fwdbwd_us"] = floor_f, floor_fb
        for mode in ("eager", "graph"):
            for what, floor in (("fwd", floor_f), ("fwdbwd", floor_fb)):
                t = row.get(f"{mode}_{what}_us")
                row[f"pct_floor_{mode}_{what}"] = 100 * floor / t if t else None
    if not row["errors"]:
        del row["errors"]
    return row, first[0]


# --------------------------------------------------------------------------- whole training steps


STEP_MODES = ("eager", "compile", "reduce-overhead")
WARMUP_STEPS = {"eager": 3, "compile": 3, "reduce-overhead": 6}


@dataclass
class StepBench:
    model_name: str
    sn: str
    mode: str
    n_power_iterations: int
    batch: int
    step: Callable[[], None]


def build_step(model_name: str, sn: str, mode: str, device: torch.device, n_power_iterations: int = 1,
               batch: int | None = None, seed: int = 0) -> StepBench:
    """One D training step (hinge loss fwd + bwd + Adam step) of ``model_name``.

    ``sn``: ``none`` / ``torch_param`` / ``sn_fused``. ``mode``: ``eager``,
    ``compile`` (``torch.compile`` of model + loss) or ``reduce-overhead``
    (the same with ``mode="reduce-overhead"``, CUDA graphs). The optimizer
    step stays eager in every mode. Same seed, same initial weights.
    """
    ctor, default_batch = models.MODELS[model_name]
    batch = batch or default_batch
    torch.manual_seed(seed)
    with torch.device(device):
        model = ctor()
    models.apply_spectral_norm(model, SN_FUNCTIONS[sn], n_power_iterations)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.0, 0.9))
    res = model.resolution
    x = torch.randn(batch, 3, res, res, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device) if model.num_classes else None

    def loss_fn(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return models.hinge_loss(model, x, y)

    if mode != "eager":
        for t in (x, y):
            if t is not None:
                with contextlib.suppress(Exception):
                    torch._dynamo.mark_static_address(t)
        # Every case compiles this same code object (one cache entry per model): the steps of
        # a (model, mode) group live side by side, so Dynamo's default limit of 8 entries must
        # not send a large group back to eager without a word.
        with contextlib.suppress(AttributeError):
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        loss_fn = torch.compile(loss_fn, mode=None if mode == "compile" else mode)
    mark_step = torch.compiler.cudagraph_mark_step_begin if mode == "reduce-overhead" else None

    def step() -> None:
        if mark_step is not None:
            mark_step()
        opt.zero_grad(set_to_none=True)
        loss_fn(x, y).backward()
        opt.step()

    return StepBench(model_name, sn, mode, n_power_iterations, batch, step)


def _dynamo_counters() -> dict[str, int]:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001
        return {}
    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0)),
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
    }


def warm_up_step(bench: StepBench, device: torch.device, budget: Budget) -> dict[str, Any]:
    """The first steps (compilation included): a row with the warm-up time, or the error.

    Compiled modes also record the graph breaks, cudagraph skips and graphs of the warm-up.
    """
    row: dict[str, Any] = dict(model=bench.model_name, sn=bench.sn, mode=bench.mode,
                               n=bench.n_power_iterations, batch=bench.batch)
    before = _dynamo_counters()
    try:
        t0 = time.perf_counter()
        bench.step()
        sync(device)
        row["first_step_s"] = time.perf_counter() - t0
        warmup = budget.step_warmup if budget.step_warmup is not None else WARMUP_STEPS[bench.mode]
        for _ in range(warmup - 1):
            bench.step()
        sync(device)
        row["warmup_s"] = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 -- recorded, the run goes on
        row["error"] = error_text(exc)
    after = _dynamo_counters()
    if bench.mode != "eager" and after:
        row.update({k: after[k] - before.get(k, 0) for k in after})
    return row


def time_steps(benches: list[StepBench], rows: list[dict[str, Any]], device: torch.device,
               budget: Budget) -> None:
    """Host-inclusive ms per step into each row (``step_ms``), the steps timed in interleaved
    rounds (:func:`time_eager_interleaved`): no-SN and SN steps see the same machine state,
    so their ratio -- SN's overhead -- does not take in a drift between them."""
    try:
        seconds = time_eager_interleaved([b.step for b in benches], device, budget.step_s,
                                         rounds=budget.step_rounds, warmup=0)
    except Exception:  # noqa: BLE001 -- one step failed: time each alone, so the others still count
        for bench, row in zip(benches, rows):
            try:
                row["step_ms"] = time_eager(bench.step, device, budget.step_s, rounds=budget.step_rounds,
                                            warmup=0) * 1e3
                row["timing"] = "alone (an interleaved round failed)"
            except Exception as exc:  # noqa: BLE001 -- recorded, the run goes on
                row["error"] = error_text(exc)
        return
    for row, sec in zip(rows, seconds):
        row["step_ms"] = sec * 1e3
        row["timing"] = "interleaved"


def error_text(exc: BaseException) -> str:
    """How a failed case is recorded in the results (type and message, at most 500 characters)."""
    return f"{type(exc).__name__}: {exc}"[:500]


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
