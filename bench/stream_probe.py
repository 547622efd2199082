"""How fast can a grid of one program per SM stream a weight? The ceiling of the kernels' passes.

The kernels' passes over A run in a persistent grid of at most one program per SM (a grid
barrier needs every program co-resident; ``kernels.py``), each program owning a band of whole
rows. On an H200 those passes ran at 3.2-3.6 TB/s alone where a torch copy moves 4.25
(``kernel_sweep --phases``, bench/NOTES.md v17): the forward's rescale (read A, write W_sn)
3.45 TB/s, its phase ST (read A) 3.24, the backward's GRAD pass (read G, write dW) 3.56. Issue
#3's goals for the two weights beyond L2 (1536x13824, 4096x4096) need more than that. This
probe asks whether the grid's shape is the limit or the passes' code: it times the plainest
form of each pass, alone, on the same card, as the kernels would launch it and with one knob
changed at a time, next to torch's own kernels over the same bytes.

    python -m bench.stream_probe [--shapes MxN,...] [--out DIR]

Passes (float32, contiguous ``M x N``):

* ``scale``: ``out = w * scale`` (the rescale, the GRAD pass less its rank-1 term); bytes: A read
  and written once. torch: ``torch.mul(w, scale, out=out)`` and ``out.copy_(w)``.
* ``rowdot``: ``s = A x`` (phase ST's first product, without ``A^T s``); bytes: A read once.
  torch: ``torch.mv``.

Launches, one knob from ``base`` at a time (``base`` = as the kernels launch a streaming pass
beyond L2: one program per SM, each its band of rows, 16384-element tiles with rows up to 16384
wide in one tile, so 13824 is padded to 16384 columns; ``kernels``' warps for that tile, loads
pipelined 3 deep through ``tl.range(num_stages=3)``):

* ``grid``: 4096-element tiles, 4 warps, unpipelined, one tile per program (the row sums: one
  row block each), many programs per SM and many waves, as torch's kernels run: Triton's own
  ceiling;
* ``strided``: row block ``i`` to program ``i % G`` (all programs sweep A together) instead of bands;
* ``2/SM``: two programs per SM, each small enough for both to be co-resident (as the kernels
  would need them): unpipelined, or half the tile;
* warps, tile size (half, double), column block (``bn``: an eighth, less padding of 13824's
  columns), pipeline depth, ``evict_first`` (scale only);
* ``TMA``: tiles loaded (and, scaled, stored) through TMA descriptors, Hopper's bulk copies into
  shared memory, ``[16..64 x 256]`` boxes 3 to 8 deep; the scale's tiles strided over the
  programs, the row sums' row blocks of at most M / G rows.

Times: CUDA-graph replays of 20 launches (``kernel_sweep.graph_time_us``), L2 flushed before
each replay; the rate is over the bytes the pass must move. Without CUDA (``TRITON_INTERPRET=1``)
it checks every launch's result against torch on small matrices and says that rates need a GPU.
"""

from __future__ import annotations

import time

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sn_fused.ops import INTERPRET

from . import harness

SHAPES = [(1536, 13824), (4096, 4096)]  # beyond L2: what DRAM gives a pass
TILE = 16384  # elements per program per loop step, as the kernels' streaming passes (_TILE_ELEMENTS)
STAGES = 3  # the kernels' pipelined loads beyond L2 (_STAGES_BEYOND_L2)
DEVICE = "cuda"  # (tests run the GPU path's reporting on CPU tensors)
SHARED_BYTES = 200 * 1024  # pipelined tiles of A a program may keep (an H100/H200 block: 227 KB)


@triton.jit
def _tile(k, n_cblocks, r0, r1, first, every, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N, ORDER: tl.constexpr):
    """Rows, columns, mask and column block of loop step ``k`` (``_steps``): row block ``first +
    j * every`` from ``r0`` (``j = k // n_cblocks``, below ``r1``), column blocks fastest; with
    ``ORDER`` 2, tile ``first + k * every`` of all of A's tiles instead."""
    if ORDER == 2:
        t = first + k * every
        rb = t // n_cblocks
        cb = t - rb * n_cblocks
    else:
        j = k // n_cblocks
        cb = k - j * n_cblocks
        rb = first + j * every
    rows = r0 + rb * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < r1)[:, None] & (cols < N)[None, :]
    return rows, cols, mask, cb


@triton.jit
def _load_tile(w, rows, cols, mask, N, TMA: tl.constexpr, EVICT_FIRST: tl.constexpr):
    """A tile of A: through a pointer (masked), or a TMA descriptor (``TMA``: one bulk copy into
    shared memory per tile, zeros beyond A's edges; ``rows``/``cols`` start on a block)."""
    if TMA:
        return w.load([tl.min(rows, axis=0), tl.min(cols, axis=0)])
    elif EVICT_FIRST:
        return tl.load(w + rows[:, None] * N + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
    else:
        return tl.load(w + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _steps(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ORDER: tl.constexpr):
    """This program's loop: (steps, r0, r1, first, every, column blocks). ``ORDER`` 0, bands: the
    rows ``[p*M//G, (p+1)*M//G)``, one row block after another (the kernels' split). 1: row blocks
    ``p, p + G, ...`` of all of A, a row block's column blocks in one program (``rowdot`` sums
    them). 2: tiles ``p, p + G, ...`` of all of A (``scale`` only), so every program has work
    even where row blocks are fewer than programs."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    n_cblocks = tl.cdiv(N, BLOCK_N)
    if ORDER == 2:
        r0, r1, first, every = 0, M, pid, G
        steps = tl.maximum(tl.cdiv(tl.cdiv(M, BLOCK_M) * n_cblocks - pid, G), 0)
    elif ORDER == 1:
        r0, r1, first, every = 0, M, pid, G
        steps = tl.maximum(tl.cdiv(tl.cdiv(M, BLOCK_M) - pid, G), 0) * n_cblocks
    else:
        r0 = (pid * M) // G
        r1 = ((pid + 1) * M) // G
        first, every = 0, 1
        steps = tl.cdiv(r1 - r0, BLOCK_M) * n_cblocks
    return steps, r0, r1, first, every, n_cblocks


@triton.jit
def scale_kernel(w, out, scale, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 STAGES: tl.constexpr, ORDER: tl.constexpr, EVICT_FIRST: tl.constexpr, TMA: tl.constexpr):
    """``out = w * scale`` over a contiguous ``M x N`` matrix (the rescale's memory traffic).
    ``w``, ``out``: pointers, or TMA descriptors of ``[BLOCK_M, BLOCK_N]`` blocks (``TMA``)."""
    steps, r0, r1, first, every, n_cblocks = _steps(M, N, BLOCK_M, BLOCK_N, ORDER)
    for k in tl.range(steps, num_stages=STAGES):
        rows, cols, mask, _ = _tile(k, n_cblocks, r0, r1, first, every, BLOCK_M, BLOCK_N, N, ORDER)
        a = _load_tile(w, rows, cols, mask, N, TMA, EVICT_FIRST)
        if TMA:
            out.store([tl.min(rows, axis=0), tl.min(cols, axis=0)], a * scale)
        else:
            tl.store(out + rows[:, None] * N + cols[None, :], a * scale, mask=mask)


@triton.jit
def rowdot_kernel(w, x_ptr, s_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  STAGES: tl.constexpr, ORDER: tl.constexpr, ROW_IN_TILE: tl.constexpr, TMA: tl.constexpr):
    """``s = A x`` over a contiguous ``M x N`` matrix (phase ST's loads of A, one product). One flat
    loop over the tiles, so the pipeline does not drain at each row block; a row block's sum is
    stored at its last column block. ``ROW_IN_TILE`` (``N <= BLOCK_N``): x is loaded once, as
    phase ST loads it (in the loop it would be pipelined too, a second tile of shared memory).
    ``w``: a pointer, or a TMA descriptor (``TMA``)."""
    tl.static_assert(ORDER != 2, "a row block's sums need all its column blocks in one program")
    steps, r0, r1, first, every, n_cblocks = _steps(M, N, BLOCK_M, BLOCK_N, ORDER)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if ROW_IN_TILE:
        x_row = tl.load(x_ptr + tl.arange(0, BLOCK_N), mask=tl.arange(0, BLOCK_N) < N, other=0.0)
    for k in tl.range(steps, num_stages=STAGES):
        rows, cols, mask, cb = _tile(k, n_cblocks, r0, r1, first, every, BLOCK_M, BLOCK_N, N, ORDER)
        a = _load_tile(w, rows, cols, mask, N, TMA, False)
        if ROW_IN_TILE:
            x = x_row
        else:
            x = tl.load(x_ptr + cols, mask=cols < N, other=0.0)
        acc = tl.where(cb == 0, 0.0, acc) + a * x[None, :]
        # (the column block compared as a block: Triton 3.9's interpreter refuses a block mask
        # and-ed with a 0-d one inside a loop, "mask has unsupported dtype")
        tl.store(s_ptr + rows, tl.sum(acc, axis=1), mask=(rows < r1) & (cb + 0 * rows == n_cblocks - 1))


def launches(M: int, N: int, programs_per_sm_grid: int, tile: int | None = None, stages: int = STAGES) -> list[dict]:
    """The launches to time: ``base`` as the kernels launch a streaming pass, then one knob changed
    at a time. ``programs_per_sm_grid``: the grid of one program per SM (the SM count). Each
    launch names the ``passes`` it times (``scale``, ``rowdot``) and the programs that get work
    (``active``)."""
    from sn_fused.ops import spectral_norm as ops_mod

    tile = tile or TILE
    bn = min(ops_mod._next_power_of_2(N), tile)
    base = dict(name="base", G=programs_per_sm_grid, bm=max(tile // bn, 1), bn=bn, warps=ops_mod._num_warps(tile, bn),
                stages=stages, order=0, evict=False, maxnreg=0, tma=False, passes=("scale", "rowdot"))
    rows = [base]

    def variant(name, per_sm=1, **knobs):
        cfg = {**base, **knobs, "name": name}
        # Pipelined tiles beyond shared memory: fewer stages, as the launcher lowers them
        # (_stages_that_fit; a stage count s keeps s - 1 tiles of A, and of x where a row spans
        # several column blocks, in shared memory), for ``per_sm`` programs on an SM.
        while cfg["stages"] > 1 and (cfg["stages"] - 1) * (cfg["bm"] + 1) * cfg["bn"] * 4 > SHARED_BYTES // per_sm:
            cfg["stages"] -= 1
        if all(any(cfg[k] != r[k] for k in cfg if k not in ("name", "active")) for r in rows):
            rows.append(cfg)

    # Triton's own ceiling: 4096-element tiles, 4 warps, no pipeline, one tile per program (the
    # row sums: one row block each), many programs per SM and many waves, as torch's kernels run.
    small = dict(bm=max(4096 // bn, 1), bn=min(bn, 4096), warps=4, stages=1)
    variant("grid (1 tile each)", G=triton.cdiv(M, small["bm"]) * triton.cdiv(N, small["bn"]), order=2,
            passes=("scale",), **small)
    variant("grid (1 row block each)", G=triton.cdiv(M, small["bm"]), order=1, passes=("rowdot",), **small)
    variant("strided", order=1)
    # Two programs per SM, co-resident (the kernels' grid barrier needs it): registers capped at
    # half an SM's (ptxas sm_90a, 8 warps, unpipelined 16384-element tiles: ~104-120 registers
    # for the scale, 144-181 for the row sums, which then spill), shared memory at half an SM's.
    two = dict(G=2 * base["G"], maxnreg=65536 // (2 * 32 * base["warps"]), per_sm=2)
    variant("2/SM, stages 1", stages=1, **two)
    variant("2/SM strided, stages 1", stages=1, order=1, **two)
    variant(f"2/SM, tile {tile // 2}", bm=max(tile // 2 // bn, 1), bn=min(bn, tile // 2), **two)
    for w in (4, 16):
        variant(f"warps {w}", warps=w)
    for t in (tile // 2, tile * 2):
        variant(f"tile {t}", bm=max(t // bn, 1), bn=min(bn, t))
    variant(f"bn {max(bn // 8, 1)}", bm=tile // max(bn // 8, 1), bn=max(bn // 8, 1))
    for s in (1, 2, 4):
        variant(f"stages {s}", stages=s)
    variant("evict_first", evict=True, passes=("scale",))
    variant("evict_first, stages 1", evict=True, stages=1, passes=("scale",))
    # Tiles through TMA (Hopper's bulk copies into shared memory; a box is at most 256 per
    # dimension, rows must be 16-byte aligned). A box may cross a band's end, so no bands: the
    # scale's tiles strided over the programs, the row sums' row blocks, in boxes of at most
    # M / G rows so that every program has some. TMA zero-fills beyond A's edges.
    if N * 4 % 16 == 0:
        box_n = min(256, tile)
        for bm, stages_ in ((16, 4), (32, 3), (64, 3), (16, 8)):
            bm = max(1, min(bm, tile // box_n))
            tma = dict(tma=True, bn=box_n, stages=stages_, warps=ops_mod._num_warps(bm * box_n, box_n))
            variant(f"TMA [{bm}x{box_n}] s{stages_}", bm=bm, order=2, passes=("scale",), **tma)
            rows_bm = max(1, min(bm, ops_mod._floor_power_of_2(M // base["G"])))
            variant(f"TMA [{rows_bm}x{box_n}] s{stages_}", bm=rows_bm, order=1, passes=("rowdot",), **tma)
    for cfg in rows:
        cfg["active"] = active_programs(cfg, M, N)
    return rows


def active_programs(cfg: dict, M: int, N: int) -> int:
    """How many of a launch's programs get work (``_steps``)."""
    if cfg["order"] == 0:
        return min(cfg["G"], M)
    blocks = triton.cdiv(M, cfg["bm"]) * (triton.cdiv(N, cfg["bn"]) if cfg["order"] == 2 else 1)
    return min(cfg["G"], blocks)


def call(kernel: str, cfg: dict, w: torch.Tensor, out: torch.Tensor, x: torch.Tensor):
    """``(jit function, args, kwargs)`` of one launch of ``kernel`` ("scale" or "rowdot") with
    ``cfg`` (``launches``): ``fn[(cfg["G"],)](*args, **kwargs)`` (``run``; ``bench.sm90`` compiles
    the same for sm_90a)."""
    M, N = w.shape
    kwargs = dict(BLOCK_M=cfg["bm"], BLOCK_N=cfg["bn"], STAGES=cfg["stages"], ORDER=cfg["order"],
                  TMA=cfg["tma"], num_warps=cfg["warps"], **({"maxnreg": cfg["maxnreg"]} if cfg["maxnreg"] else {}))
    if cfg["tma"]:
        w = TensorDescriptor.from_tensor(w, [cfg["bm"], cfg["bn"]])
        if kernel == "scale":
            out = TensorDescriptor.from_tensor(out, [cfg["bm"], cfg["bn"]])
    if kernel == "scale":
        return scale_kernel, (w, out, 0.5, M, N), dict(EVICT_FIRST=cfg["evict"], **kwargs)
    return rowdot_kernel, (w, x, out, M, N), dict(ROW_IN_TILE=N <= cfg["bn"], **kwargs)


def run(kernel: str, cfg: dict, w: torch.Tensor, out: torch.Tensor, x: torch.Tensor):
    """One launch (``call``); returns what Triton's launch returns (on a GPU, the compiled kernel)."""
    fn, args, kwargs = call(kernel, cfg, w, out, x)
    return fn[(cfg["G"],)](*args, **kwargs)


def check(shapes=((37, 50), (5, 300), (64, 64)), grid: int = 3) -> int:
    """Every launch of ``launches`` against torch on small matrices (interpreter or GPU): the scale
    bit for bit, the row sums to float32 rounding, into outputs poisoned with NaN. Small tiles so
    that bands, strides and masks all show. Returns the number of passes checked."""
    device = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
    checked = 0
    for M, N in shapes:
        w = torch.randn(M, N, device=device)
        x = torch.randn(N, device=device)
        ref = (w.double() @ x.double()).float()
        for cfg in launches(M, N, grid, tile=64, stages=2):
            for kernel in cfg["passes"]:
                out = torch.full((M, N) if kernel == "scale" else (M,), float("nan"), device=device)
                run(kernel, cfg, w, out, x)
                assert _right(kernel, out, w, ref, 1e-5), (M, N, kernel, cfg)
                checked += 1
    return checked


def _right(kernel: str, out: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, rtol: float) -> bool:
    """A pass's result: the scale bit for bit, the row sums (``ref``: float64's, rounded) to ``rtol``."""
    if kernel == "scale":
        return torch.equal(out, w * 0.5)
    return torch.allclose(out, ref, rtol=rtol, atol=10 * rtol * w.shape[1] ** 0.5)


def programs_per_sm(compiled, num_warps: int, props) -> int:
    """How many programs of ``compiled`` an SM holds at once (registers, shared memory): below
    ``G / SMs``, a grid of G runs in waves, and the kernels' barrier could not wait on it."""
    threads = 32 * num_warps
    # (an H100's or H200's where torch's properties lack one)
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    shared_per_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    max_threads = getattr(props, "max_threads_per_multi_processor", 2048)
    by_regs = regs // max(compiled.n_regs * threads, 1)
    shared = compiled.metadata.shared
    by_shared = shared_per_sm // shared if shared else by_regs
    return min(by_regs, by_shared, max_threads // threads)


def probe(shapes=SHAPES) -> list[dict]:
    from bench.kernel_sweep import copy_bandwidth, graph_time_us

    bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())  # (stubbed by tests)
    sms = props.multi_processor_count
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"copy bandwidth {bw / 1e12:.2f} TB/s  {sms} SMs  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("# graph us per launch (20 per graph, L2 flushed before each replay) [TB/s over the bytes the pass "
          "must move, % of the copy's]; launch: G programs, [bm x bn] tiles, warps, stages; registers per "
          "thread, shared memory, programs an SM holds at once")
    results = []
    for M, N in shapes:
        torch.manual_seed(0)
        w = torch.randn(M, N, device=DEVICE)
        x = torch.randn(N, device=DEVICE)
        ref = torch.mv(w.double(), x.double()).float()
        outs = {"scale": torch.empty_like(w), "rowdot": torch.empty(M, device=DEVICE)}
        moved = {"scale": 2 * w.numel() * 4, "rowdot": w.numel() * 4}

        def line(kernel, name, fn, cfg=None, checked=True):
            out = outs[kernel].fill_(float("nan"))  # (what the timed launches leave unwritten shows)
            try:
                t = graph_time_us(fn)
            except Exception as exc:  # (a launch the card refuses: too many registers or shared memory)
                print(f"  {kernel:<6} {name:<24} failed: {harness.error_text(exc).splitlines()[0][:120]}")
                return
            right = _right(kernel, out, w, ref, 1e-4) if checked else None
            rate = moved[kernel] / (t * 1e-6)
            what = ""
            if cfg:
                compiled = run(kernel, cfg, w, out, x)
                held = programs_per_sm(compiled, cfg["warps"], props)
                what = (f"G={cfg['G']} ({cfg['active']} with work) [{cfg['bm']}x{cfg['bn']}] w{cfg['warps']} "
                        f"s{cfg['stages']}" + ("", " row blocks strided", " tiles strided")[cfg["order"]]
                        + (" evict_first" if cfg["evict"] else "")
                        + (f" maxnreg {cfg['maxnreg']}" if cfg["maxnreg"] else "") + (" TMA" if cfg["tma"] else "")
                        + f"; {compiled.n_regs} regs, {compiled.metadata.shared // 1024} KB, {held}/SM")
                cfg = {**cfg, "regs": compiled.n_regs, "shared": compiled.metadata.shared, "per_sm": held}
            print(f"  {kernel:<6} {name:<24} {t:7.1f} us [{rate / 1e12:.2f} TB/s, {100 * rate / bw:3.0f} %]  {what}"
                  + ("  WRONG RESULT" if right is False else ""), flush=True)
            results.append(dict(M=M, N=N, pass_=kernel, name=name, us=t, tbs=rate / 1e12, right=right, cfg=cfg))

        print(f"{M}x{N} ({w.numel() * 4 / 2**20:.0f} MiB)")
        line("scale", "torch.mul", lambda: torch.mul(w, 0.5, out=outs["scale"]))
        line("rowdot", "torch.mv", lambda: torch.mv(w, x, out=outs["rowdot"]))
        for kernel in ("scale", "rowdot"):
            for cfg in launches(M, N, sms):
                if kernel in cfg["passes"]:
                    line(kernel, cfg["name"], lambda cfg=cfg, kernel=kernel: run(kernel, cfg, w, outs[kernel], x), cfg)
        line("scale", "torch copy_", lambda: outs["scale"].copy_(w), checked=False)  # (the bytes of a scale)
        del w, x, outs
        torch.cuda.empty_cache()
    return results


def main() -> None:
    ap = harness.probe_parser(__doc__, "stream_probe")
    ap.add_argument("--shapes", default=None, metavar="MxN,...",
                    help="default %s" % ",".join(f"{m}x{n}" for m, n in SHAPES))
    args = ap.parse_args()
    if harness.checked_without_gpu(check, "both passes against torch", "the rates need"):
        return
    shapes = ([tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES)
    results = probe(shapes)
    harness.save_json(results, args.out, "stream_probe.json")


if __name__ == "__main__":
    main()
