"""The kernels' single launch -- what a GPU runs: one launch per read, grid barriers between its
phases -- on a CPU (``tests/single_launch.py``: each program on a thread, handed the token at
barriers). Each read and backward is compared bit for bit with the phase-by-phase launches that the
rest of the CPU suite checks against the float64 reference, and no program may read what another
wrote without a barrier between them (nor overwrite what another may still read, nor load it past
L1), or pass a different number of barriers.

CI runs a fixed set of weights, launch knobs and grids; ``SN_FUSED_SLOW=1`` runs every combination
(~900 launches; it found nothing in session 24's audit, bench/NOTES.md v25).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from conftest import fused_device_or_skip, path_taken
from sn_fused import ops
from sn_fused.ops import kernels
from sn_fused.ops import spectral_norm as snm

device = fused_device_or_skip()
if device != "cpu":
    pytest.skip("the interpreter's single launch (a GPU runs the real one: tests/test_gpu.py)",
                allow_module_level=True)

import single_launch  # noqa: E402  (imports Triton's interpreter)

SLOW = bool(os.environ.get("SN_FUSED_SLOW"))


def _weights():
    """(name, weight, dim): shapes and values that take each branch of the kernels."""
    g = torch.Generator().manual_seed(3)
    overflow_row = torch.randn(7, 300, generator=g)
    overflow_row[3] = 3e25  # (A^T s overflows where PyTorch's A^T u does not: the fallback)
    overflow_narrow = torch.randn(7, 5, generator=g)
    overflow_narrow[3] = 3e25
    inf_partials = torch.zeros(3, 48)  # (finite partials of ||t||^2 whose total is Inf)
    inf_partials[0, 0] = inf_partials[0, 16] = inf_partials[0, 32] = 1.5e19
    inf_partials[0, 1], inf_partials[1, 2], inf_partials[2, 5] = 1.0, 0.5, 0.25
    return [
        ("9x300", torch.randn(9, 300, generator=g), 0),
        ("7x40", torch.randn(7, 40, generator=g), 0),
        ("overflow 7x300", overflow_row, 0),
        ("overflow 7x5", overflow_narrow, 0),
        ("inf t", torch.tensor([[3e38, 1.0, 2.0], [3e38, 1.0, -1.0], [1.0, 2.0, 3.0]]), 0),
        ("inf total", inf_partials, 0),
        ("tiny", (1e-25 * torch.randn(5, 7, generator=g, dtype=torch.float64)).float(), 0),
        ("fp16 6x33", torch.randn(6, 33, generator=g).half(), 0),
        ("bf16 6x148", torch.randn(6, 148, generator=g).bfloat16(), 0),  # (rows of 8-byte alignment)
        ("fp64 5x20", torch.randn(5, 20, generator=g, dtype=torch.float64), 0),
        ("convT channels-last", torch.randn(8, 6, 3, 3, generator=g).contiguous(memory_format=torch.channels_last), 1),
        ("conv channels-last", torch.randn(6, 4, 3, 3, generator=g).contiguous(memory_format=torch.channels_last), 0),
        ("wide 2x9000", torch.randn(2, 9000, generator=g), 0),
        ("tall 8200x3", torch.randn(8200, 3, generator=g), 0),
    ]


#: Launch knobs (``snm._launch_knobs``) that take the kernels' paths: on chip, streaming with the tile
#: kept (KEEP_A, given to every weight whose rows fit), streaming with whole rows in a tile, rows over
#: column blocks, loads a tile ahead, partials summed in many steps.
KNOBS = {
    "on chip": {},
    "kept": dict(_ON_CHIP_MAX_PARTIALS=0),
    "streaming": dict(_ON_CHIP=False),
    "column blocks": dict(_ON_CHIP=False, _MAX_ROW_IN_TILE=16, _TILE_ELEMENTS=64),
    "prefetch": dict(_ON_CHIP=False, _LOAD_PREFETCH=1, _RESCALE_PREFETCH=1, _PREFETCH_MIN_BLOCK_N=1),
    "partials in steps": dict(_ON_CHIP=False, _PARTIALS_TILE_ELEMENTS=16),
}
#: (training, n_power_iterations): a read of each kind.
READS = [(True, 1), (True, 2), (True, 3), (False, 1)]
GRIDS = (2, 3, 5)
#: CI's share (~1 min): every weight but the slowest on chip and streaming, the other knobs on a few
#: (column blocks of 64 elements take the interpreter 5-25 s on the wider weights).
CI = {
    "on chip": ("9x300", "overflow 7x300", "overflow 7x5", "inf t", "inf total", "tiny", "fp16 6x33",
                "bf16 6x148", "convT channels-last", "wide 2x9000"),
    "kept": ("9x300", "overflow 7x300", "inf t", "inf total", "tiny", "fp64 5x20", "bf16 6x148",
             "conv channels-last", "tall 8200x3"),
    "streaming": ("9x300", "overflow 7x300", "overflow 7x5", "inf t", "inf total", "tiny", "fp16 6x33",
                  "bf16 6x148", "convT channels-last", "wide 2x9000"),
    "column blocks": ("7x40", "overflow 7x5", "inf total", "fp16 6x33", "bf16 6x148", "convT channels-last"),
    "prefetch": ("9x300",),
    "partials in steps": ("9x300", "inf t"),
}


def _keeps_a(w, dim, knobs, G) -> bool:
    """Whether the launcher's plan keeps the tile (KEEP_A) under these knobs."""
    with snm._launch_knobs(**KNOBS[knobs]):
        return path_taken(w, dim, G) == "kept"


def _cases():
    for (name, w, dim), knobs, G in itertools.product(_weights(), KNOBS, GRIDS):
        if G > w.shape[dim] or (knobs == "kept" and not _keeps_a(w, dim, knobs, G)):
            continue  # (rows beyond one tile: the streaming read, as "streaming" runs it)
        if SLOW or (name in CI[knobs] and G == min(_CI_GRID[knobs], w.shape[dim])):
            yield pytest.param(w, dim, knobs, G, id=f"{name}-{knobs}-G{G}")


_CI_GRID = {knobs: 2 if knobs == "on chip" else 3 for knobs in KNOBS}


def test_ci_runs_every_weight_it_names():
    """Each weight of CI's share runs under its knobs (none dropped because its path changed)."""
    ids = {p.id for p in _cases()}
    weights = {name: w.shape[dim] for name, w, dim in _weights()}
    missing = [(name, knobs) for knobs, names in CI.items() for name in names
               if f"{name}-{knobs}-G{min(_CI_GRID[knobs], weights[name])}" not in ids]
    assert missing == []


def _assert_same(a: torch.Tensor, b: torch.Tensor, *what) -> None:
    """Bit for bit (no tolerance), NaNs where the other has them, Infs where it has the same Inf."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _read(w, dim, u, v, n, training, G, phase_by_phase):
    u, v = u.clone(), v.clone()
    sigma_buf = torch.full((), float("nan"), dtype=w.dtype)
    out, us, vs, sigma = ops.spectral_norm_forward_fused(
        w, u, v, sigma_buf, ops.new_semaphore("cpu"), dim=dim, n_power_iterations=n, eps=1e-12, training=training,
        num_programs=G, phase_by_phase=phase_by_phase)
    return dict(out=out, u=u, v=v, us=us, vs=vs, sigma=sigma, sigma_buf=sigma_buf)


def _backward(g, w, r, dim, G, phase_by_phase):
    return ops.spectral_norm_backward_fused(g, w, r["us"], r["vs"], r["sigma"], ops.new_semaphore("cpu"), dim=dim,
                                            num_programs=G, phase_by_phase=phase_by_phase)


def _vectors(w, dim, G):
    M = w.shape[dim]
    gen = torch.Generator().manual_seed(G)
    u = F.normalize(torch.randn(M, generator=gen, dtype=torch.float64), dim=0).to(w.dtype)
    v = F.normalize(torch.randn(w.numel() // M, generator=gen, dtype=torch.float64), dim=0).to(w.dtype)
    return u, v, torch.randn(w.shape, generator=gen).to(w.dtype)


@pytest.mark.parametrize("w,dim,knobs,G", list(_cases()))
def test_single_launch_as_the_phases(w, dim, knobs, G):
    u, v, g = _vectors(w, dim, G)
    if w.shape == (3, 3):  # "inf t": v whose t = A^T s is not finite (the fallback in every iteration)
        v = torch.tensor([1e-30, 0.6, 0.8])
    if w.shape == (5, 7):  # "tiny": s below eps, so the clamp and the 2^64-scaled sums
        v = (1e20 * torch.randn(7, generator=torch.Generator().manual_seed(G), dtype=torch.float64)).float()
    assert _keeps_a(w, dim, knobs, G) == (knobs == "kept")  # ("kept" cases are filtered on it; the others not)
    with snm._launch_knobs(**KNOBS[knobs]):
        for training, n in READS:
            with single_launch.single_launch(seed=G * 10 + n) as recorder:
                one = _read(w, dim, u, v, n, training, G, False)
                dw_one = _backward(g, w, one, dim, G, False) if n <= 2 else None
            phases = _read(w, dim, u, v, n, training, G, True)
            what = (training, n)
            assert recorder.findings == [], (what, recorder.findings[:5])
            # every launch of more than one program ran as one, and its programs passed the same barriers
            assert recorder.barriers and all(len(set(b)) == 1 and len(b) == G for b in recorder.barriers), (
                what, recorder.barriers)
            for k in one:
                _assert_same(one[k], phases[k], what, k)
            if dw_one is not None:
                _assert_same(dw_one, _backward(g, w, phases, dim, G, True), what, "dw")


def test_a_barrier_one_program_skips_is_found():
    """The detector: one program that does not wait at its first barrier reads partials the others
    have not written yet, or passes fewer barriers (a hang on a GPU)."""
    w = torch.randn(9, 300)
    u, v, _ = _vectors(w, 0, 3)
    with snm._launch_knobs(_ON_CHIP=False), single_launch.single_launch(seed=1) as recorder:
        barrier = kernels.grid_barrier
        skipped = []

        def barrier_skipped_once_by_program_1(sem_ptr):
            if recorder._grid.current == 1 and not skipped:
                skipped.append(1)
                return
            barrier(sem_ptr)

        kernels.grid_barrier = barrier_skipped_once_by_program_1
        _read(w, 0, u, v, 1, True, 3, False)
    assert {f.kind for f in recorder.findings} & {"RAW", "WAR", "HANG", "UNINIT"}, recorder.findings


@triton.jit
def _partials_through_l1(part_ptr, G, BLOCK_P: tl.constexpr):
    p = tl.arange(0, BLOCK_P)
    return tl.load(part_ptr + p, mask=p < G, other=0.0)  # (no .cg: may read a stale L1 line)


def test_a_plain_load_of_other_programs_partials_is_found(monkeypatch):
    w = torch.randn(9, 300)
    u, v, _ = _vectors(w, 0, 3)
    monkeypatch.setattr(kernels, "_partials", _partials_through_l1)
    with snm._launch_knobs(_ON_CHIP=False), single_launch.single_launch(seed=1) as recorder:
        _read(w, 0, u, v, 1, True, 3, False)
    assert any(f.kind == "L1" and f.buffer == "ws_ptr" for f in recorder.findings), recorder.findings


def test_the_interpreter_is_as_it_was_after():
    """Outside the context the launcher refuses a single launch of more than one program again
    (the interpreter would deadlock on its barrier), and loads are not logged."""
    w = torch.randn(9, 300)
    u, v, _ = _vectors(w, 0, 3)
    with single_launch.single_launch():
        pass
    with pytest.raises(RuntimeError, match="deadlocks in the Triton interpreter"):
        _read(w, 0, u, v, 1, True, 3, False)
