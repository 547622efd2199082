"""Host time of a layer read with the kernel launches stubbed out (CPU mode, any machine).

On a GPU, ``python -m bench.kernel_sweep --profile`` times whole eager reads. Without
one, this times what the host does around the launches -- parametrize, the layer, the
checks, the allocations, autograd -- next to what any per-layer design pays:

* **sn_fused**: ``m.weight`` of an ``sn_fused.spectral_norm`` Linear(16, 8) under
  ``TRITON_INTERPRET=1`` (CPU tensors take the fused path), down the GPU's eager launch
  path (``_launch`` keeps a runner per launch signature and reuses it) with the kept
  runner a no-op: the launcher's Python is timed, the runner's CUDA calls (current
  device and stream, the driver launch) are not;
* **floor**: the same Linear with torch's parametrize around a one-input
  ``autograd.Function`` that only allocates its output (and its gradient), read
  through sn_fused's fast getter (``parametrizations._install_fast_read``, which
  serves any single parametrization) -- and once more through torch's own getter,
  which is what that getter costs;
* **no SN**: a view of a plain weight.

Where the C++ read (``sn_fused._C``) is built, the sn_fused rows take it, as layers do, and
each comes again as ", Python path" with it switched off (``ops.spectral_norm.CPP_READS``).

"+ backward" adds ``torch.autograd.backward`` of the read (the gradient accumulates in
``.grad``). Each number is the minimum over interleaved rounds, so a busy machine shows
as spread, not as a shift of one row. A real read adds the launch itself (~7 us per
tiny kernel on an H100's host, ``kernel_sweep --profile``).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable
from unittest import mock

ROUNDS = 40
CALLS = 200  # per round and row


def _floor_module(fast_read: bool):
    import torch
    from torch import nn
    from torch.nn.utils import parametrize

    from sn_fused.parametrizations import _install_fast_read

    class _Alloc(torch.autograd.Function):
        @staticmethod
        def forward(ctx, weight):
            return torch.empty_like(weight)

        @staticmethod
        def backward(ctx, grad):
            return torch.empty_like(grad)

    class _Floor(nn.Module):
        def forward(self, weight):
            return _Alloc.apply(weight)

    module = parametrize.register_parametrization(nn.Linear(16, 8, bias=False), "weight", _Floor())
    if fast_read:
        _install_fast_read(module, "weight")
    return module


def _rows() -> dict[str, Callable[[], Any]]:
    import torch
    from torch import nn

    import sn_fused
    from bench.harness import python_read
    from sn_fused.ops import spectral_norm as ops_mod

    with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
        torch.manual_seed(0)
        fused = sn_fused.spectral_norm(nn.Linear(16, 8, bias=False))
        torch.manual_seed(0)
        # (its own layer: the signature it keeps is the one made without the C++ read)
        fused_py = python_read(lambda: sn_fused.spectral_norm(nn.Linear(16, 8, bias=False)))()
        floor = _floor_module(fast_read=True)
        floor_torch_getter = _floor_module(fast_read=False)
        plain = nn.Linear(16, 8, bias=False)
        grad = torch.randn(8, 16)

    def reads(layer):
        def no_grad_read():
            with torch.no_grad():
                return layer.weight

        return {
            "sn_fused read": lambda: layer.weight,
            "sn_fused read + backward": lambda: torch.autograd.backward(layer.weight, grad),
            "sn_fused read, no_grad": no_grad_read,
        }

    rows = reads(fused)
    if ops_mod.CPP_READS:
        rows.update({f"{name}, Python path": python_read(read) for name, read in reads(fused_py).items()})
    return rows | {
        "floor read": lambda: floor.weight,
        "floor read + backward": lambda: torch.autograd.backward(floor.weight, grad),
        "floor read, torch's getter": lambda: floor_torch_getter.weight,
        "no SN: view + backward": lambda: torch.autograd.backward(plain.weight.view_as(plain.weight), grad),
    }


@contextlib.contextmanager
def stubbed_launches():
    """Reads inside go down the GPU's eager launch path (``_launch`` keeps a runner per launch
    signature) with every kept runner a no-op; yields ``[n]``, the count of runner calls (the
    reads took that path). Needs ``TRITON_INTERPRET=1``: CPU weights take the fused path then."""
    from sn_fused.ops import INTERPRET

    if not INTERPRET:
        raise RuntimeError("host_time needs TRITON_INTERPRET=1 (CPU weights take the fused path then)")
    with kept_runners() as runs:
        yield runs


@contextlib.contextmanager
def kept_runners(launch: Callable | None = None):
    """``_launch`` keeps a runner per launch signature, as on a GPU, on any device: the first
    launch of a signature makes it, later ones call it. A runner (and that first launch) calls
    ``launch(kernel, grid, cfg, cooperative, args)``, or nothing when ``launch`` is None (the
    launch stubbed out). Yields ``[n]``, the count of kept-runner calls. The runners, and the
    prepared C++ reads that keep them, are gone after the block."""
    from sn_fused.ops import spectral_norm as ops_mod

    runs = [0]

    def keep_runner(kernel, grid, args, cfg, cooperative, key, out):
        def runner(args):
            runs[0] += 1
            if launch is not None:
                launch(kernel, grid, cfg, cooperative, args)
        if key is not None:  # (None: a call the GPU does not keep a runner for either)
            ops_mod._RUNNERS[key] = runner
        if launch is not None:
            launch(kernel, grid, cfg, cooperative, args)

    ops_mod._forget_prepared_reads()
    try:
        with mock.patch.object(ops_mod, "_KEEP_RUNNERS", True), \
                mock.patch.object(ops_mod, "_launch_uncached", keep_runner), \
                mock.patch.dict(ops_mod._RUNNERS, clear=True):  # (the kept runners go with it)
            yield runs
    finally:
        ops_mod._forget_prepared_reads()


def time_rows(rows: dict[str, Callable[[], Any]], rounds: int = ROUNDS, calls: int = CALLS) -> dict[str, list[float]]:
    """``{row: [us per call, one per round]}``: each row warmed up (plans, caches, the first
    checked read), then ``calls`` calls per row per round, the rows interleaved."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    for fn in rows.values():
        for _ in range(calls):
            fn()
    for _ in range(rounds):
        for name, fn in rows.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls * 1e6)
    return times


def measure(rounds: int = ROUNDS, calls: int = CALLS) -> dict[str, Any]:
    """``{"us": {row: min us per call}, "spread": {row: median / min}, "kept_runner_calls": n, ...}``."""
    with stubbed_launches() as runs:  # runs: calls of the kept runners (the eager launch path)
        times = time_rows(_rows(), rounds, calls)
    best = {name: min(ts) for name, ts in times.items()}
    spread = {name: sorted(ts)[len(ts) // 2] / best[name] for name, ts in times.items()}
    return dict(us=best, spread=spread, rounds=rounds, calls=calls, kept_runner_calls=runs[0],
                what="host us per call, kernel launches stubbed out at the kept runner; min over interleaved rounds")


def format_lines(result: dict[str, Any]) -> list[str]:
    """``measure()``'s result as text lines (or its ``{"error": ...}``, as one line)."""
    if "error" in result:
        return [f"Host time per layer read: not measured ({result['error']})"]
    us = result["us"]
    lines = [f"Host time per layer read, kernel launches stubbed out (min of {result['rounds']} rounds; "
             f"median/min up to {max(result['spread'].values()):.2f}):"]
    lines += [f"  {name:<38} {value:7.1f} us" for name, value in us.items()]
    lines.append(f"  sn_fused over the floor: {us['sn_fused read'] - us['floor read']:.1f} us per read, "
                 f"{us['sn_fused read + backward'] - us['floor read + backward']:.1f} us with its backward")
    return lines
