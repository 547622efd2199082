"""What one grid barrier costs on this card, alone and in a reduction round as the kernels use it.

The barrier is the kernels' own ``grid_barrier``.

A read that needs more than one program pays one barrier per power iteration on chip and two
streaming (``kernels.py``), each followed by loads of every program's partials from L2. How much
of a small weight's time that is has only been inferred (bench/NOTES.md v18's open question, "is
the barrier itself ~1 us?"; v25 puts it at 1-1.5 us from 128x1152 against one-program reads).
This probe times it directly, as CUDA-graph replays of 20 launches of a kernel that does nothing
but ``R`` rounds, for ``R`` = 0, 1, 8, 32 and a grid of G = 1 .. one program per SM (a cooperative
launch, as the kernels' launcher makes it):

* ``barrier``: ``grid_barrier`` alone;
* ``round``: store a partial, ``grid_barrier``, load all G partials from L2 (``.cg``) and sum
  them: the kernels' pattern (phase R, the ON_CHIP combine), partials double-buffered so a round's
  stores never meet the previous round's loads.

The cost of a round is the slope over ``R``; ``R = 0`` is the launch alone. Results are checked:
each round makes every program's value the mean of the last round's plus 1, so a program that
read a stale partial (a barrier that let it through early) gets another sum; every round of
every launch counts such sums (one atomic per program at the end of a launch), and the last
launch's values and the semaphore at rest are checked too. (The ``barrier`` kind moves no data
between programs: it can show a hang or a semaphore left off its rest, not an early exit.)

    python -m bench.barrier_probe [--grids 1,2,18,66,132] [--out DIR]

Without CUDA (``TRITON_INTERPRET=1``) it checks one program's rounds (the interpreter runs
programs one after another: a barrier of more would deadlock) and says that times need a GPU.
"""

from __future__ import annotations

import time

import torch
import triton
import triton.language as tl

from sn_fused.ops import kernels
from sn_fused.ops import spectral_norm as ops_mod

from . import harness

ROUNDS = (0, 1, 8, 32)
DEVICE = "cuda"  # (tests run the GPU path's reporting on the CPU)
WARPS = 8  # the kernels' warps for 8192- and 16384-element tiles (``_num_warps``)


@triton.jit(do_not_specialize=["R"])  # (one binary for every R: R = 1 would be another)
def rounds_kernel(sem_ptr, part_ptr, out_ptr, err_ptr, R, READ_PARTIALS: tl.constexpr, BLOCK_P: tl.constexpr):
    """``R`` barriers (``READ_PARTIALS``: reduction rounds) of a grid; ``out[p]``: program ``p``'s
    value after them, ``(G - 1) / 2 + R`` for every program when ``R >= 1`` and the barriers hold.
    Reduction rounds also count, in ``*err``, every round of every launch whose sum came out
    other than expected (a partial read before its program stored it)."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    value = pid.to(tl.float32)
    bad = 0
    for i in range(R):
        if READ_PARTIALS:
            slot = part_ptr + (i % 2) * BLOCK_P  # (two slots: round i's stores, round i - 1's loads)
            tl.store(slot + pid, value)
            kernels.grid_barrier(sem_ptr)
            p = tl.arange(0, BLOCK_P)
            parts = tl.load(slot + p, mask=p < G, other=0.0, cache_modifier=".cg")
            value = tl.sum(parts, axis=0) / G + 1.0
            bad += (value != (G - 1) / 2 + (i + 1.0)).to(tl.int32)
        else:
            kernels.grid_barrier(sem_ptr)
            value = (G - 1) / 2 + (i + 1.0)
    tl.store(out_ptr + pid, value)
    if READ_PARTIALS:
        tl.atomic_add(err_ptr, bad)  # (once per program and launch, for every R alike)


def call(G: int, R: int, read_partials: bool, sem: torch.Tensor, part: torch.Tensor, out: torch.Tensor,
         err: torch.Tensor):
    """``(args, kwargs)`` of one launch of ``G`` programs and ``R`` rounds (cooperative, as the
    kernels' launcher makes a launch of more than one program): ``rounds_kernel[(G,)](*args,
    **kwargs)`` (``launch``; ``bench.sm90`` compiles the same for sm_90a)."""
    return (sem, part, out, err, R), dict(READ_PARTIALS=read_partials, BLOCK_P=triton.next_power_of_2(G),
                                          num_warps=WARPS, launch_cooperative_grid=G > 1)


def launch(G: int, R: int, read_partials: bool, sem: torch.Tensor, part: torch.Tensor, out: torch.Tensor,
           err: torch.Tensor):
    """One launch (``call``)."""
    args, kwargs = call(G, R, read_partials, sem, part, out, err)
    return rounds_kernel[(G,)](*args, **kwargs)


def expected(G: int, R: int) -> torch.Tensor:
    """Every program's value after ``R`` rounds (exact in float32 for these G and R)."""
    return torch.full((G,), (G - 1) / 2 + R) if R else torch.arange(G, dtype=torch.float32)


def buffers(G: int, device) -> tuple[torch.Tensor, ...]:
    """The semaphore (the kernels' own, zeroed), two slots of partials, the output (NaN: an
    unwritten value shows), the count of wrong rounds."""
    part = torch.zeros(2 * triton.next_power_of_2(G), device=device)
    out = torch.full((G,), float("nan"), device=device)
    return ops_mod.new_semaphore(device), part, out, torch.zeros(1, dtype=torch.int32, device=device)


def wrong(G: int, R: int, sem: torch.Tensor, out: torch.Tensor, err: torch.Tensor) -> str | None:
    """What is wrong after launches of ``G`` programs and ``R`` rounds: the last launch's values,
    a wrong round of any launch, the semaphore not at rest (``grid_barrier``'s invariant)."""
    if not torch.equal(out.cpu(), expected(G, R)):
        return f"values {out.tolist()[:4]}"
    if err.item():
        return f"{err.item()} wrong rounds"
    if sem.tolist()[0] not in (0, -2**31):
        return f"semaphore {sem.tolist()}"
    return None


def check(device="cpu", grids=(1,)) -> int:
    """Every round count of both kinds (``wrong``); returns the launches checked."""
    checked = 0
    for G in grids:
        for read_partials in (False, True):
            for R in ROUNDS:
                sem, part, out, err = buffers(G, device)
                launch(G, R, read_partials, sem, part, out, err)
                problem = wrong(G, R, sem, out, err)
                assert problem is None, (G, R, read_partials, problem)
                checked += 1
    return checked


def probe(grids) -> list[dict]:
    from bench.kernel_sweep import graph_time_us

    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# graph us per launch (20 per graph) of R rounds, {WARPS} warps per program; per round: the "
          "slope from R = 0 to the largest R")
    results = []
    for G in grids:
        for read_partials in (False, True):
            kind = "round" if read_partials else "barrier"
            times = {}
            try:
                for R in ROUNDS:
                    sem, part, out, err = buffers(G, DEVICE)
                    times[R] = graph_time_us(lambda R=R: launch(G, R, read_partials, sem, part, out, err))
                    problem = wrong(G, R, sem, out, err)
                    if problem:
                        print(f"  G={G} {kind} R={R}: WRONG RESULT: {problem}")
            except Exception as exc:  # (a grid the card cannot hold at once: the cooperative launch refuses it)
                print(f"  G={G:<4} {kind:<8} failed: {harness.error_text(exc).splitlines()[0][:120]}")
                continue
            slope = (times[ROUNDS[-1]] - times[0]) / ROUNDS[-1]
            print(f"  G={G:<4} {kind:<8} " + "  ".join(f"R={R}: {t:6.2f}" for R, t in times.items())
                  + f"   per {kind}: {slope:.2f} us", flush=True)
            results.append(dict(G=G, kind=kind, us=times, per_round_us=slope))
    return results


def main() -> None:
    ap = harness.probe_parser(__doc__, "barrier_probe")
    ap.add_argument("--grids", default=None, metavar="G,...",
                    help="grid sizes (default: 1, 2, 18, half the SMs, every SM)")
    args = ap.parse_args()
    if harness.checked_without_gpu(check, "one program against their expected values", "the times need"):
        return
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    grids = ([int(g) for g in args.grids.split(",")] if args.grids
             else sorted({1, 2, 18, sms // 2, sms}))  # (18: 128x1152's read)
    results = probe(grids)
    harness.save_json(results, args.out, "barrier_probe.json")


if __name__ == "__main__":
    main()
