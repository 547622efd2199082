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

* ``grid``: one program per row block (no persistence, many waves, as torch's kernels): Triton's
  own ceiling;
* ``strided``: row block ``i`` to program ``i % G`` (all programs sweep A together) instead of bands;
* ``2/SM``: two programs per SM, each small enough for both to be co-resident (as the kernels
  would need them): unpipelined, or half the tile;
* warps, tile size (half, double), column block (``bn``: an eighth, less padding of 13824's
  columns), pipeline depth, ``evict_first`` (scale only);
* ``TMA``: tiles loaded (and, scaled, stored) through TMA descriptors, Hopper's bulk copies into
  shared memory, ``[16..64 x 256]`` boxes 3 to 8 deep, row blocks strided.

Times: CUDA-graph replays of 20 launches (``kernel_sweep.graph_time_us``), L2 flushed before
each replay; the rate is over the bytes the pass must move. Without CUDA (``TRITON_INTERPRET=1``)
it checks every launch's result against torch on small matrices and says that rates need a GPU.
"""

from __future__ import annotations

import os
import time

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import harness

SHAPES = [(1536, 13824), (4096, 4096)]  # beyond L2: what DRAM gives a pass
TILE = 16384  # elements per program per loop step, as the kernels' streaming passes (_TILE_ELEMENTS)
STAGES = 3  # the kernels' pipelined loads beyond L2 (_STAGES_BEYOND_L2)
DEVICE = "cuda"  # (tests run the GPU path's reporting on CPU tensors)
SHARED_BYTES = 200 * 1024  # pipelined tiles of A a program may keep (an H100/H200 block: 227 KB)


@triton.jit
def _tile(k, n_cblocks, r0, r1, first, every, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N):
    """Rows, columns, mask and column block of loop step ``k``: row block ``first + j * every``
    from ``r0`` (``j = k // n_cblocks``, below ``r1``), column blocks fastest."""
    j = k // n_cblocks
    cb = k - j * n_cblocks
    rows = r0 + (first + j * every) * BLOCK_M + tl.arange(0, BLOCK_M)
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
def _steps(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STRIDED: tl.constexpr):
    """This program's loop: (steps, r0, r1, first, every, column blocks). Bands: the rows
    ``[p*M//G, (p+1)*M//G)``, one row block after another (the kernels' split). Strided: row
    blocks ``p, p + G, ...`` of all of A, so the grid sweeps A together. A row block's column
    blocks stay in one program (``rowdot`` sums them)."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    n_cblocks = tl.cdiv(N, BLOCK_N)
    if STRIDED:
        r0, r1, first, every = 0, M, pid, G
        n_rblocks = tl.maximum(tl.cdiv(tl.cdiv(M, BLOCK_M) - pid, G), 0)
    else:
        r0 = (pid * M) // G
        r1 = ((pid + 1) * M) // G
        first, every = 0, 1
        n_rblocks = tl.cdiv(r1 - r0, BLOCK_M)
    return n_rblocks * n_cblocks, r0, r1, first, every, n_cblocks


@triton.jit
def scale_kernel(w, out, scale, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 STAGES: tl.constexpr, STRIDED: tl.constexpr, EVICT_FIRST: tl.constexpr, TMA: tl.constexpr):
    """``out = w * scale`` over a contiguous ``M x N`` matrix (the rescale's memory traffic).
    ``w``, ``out``: pointers, or TMA descriptors of ``[BLOCK_M, BLOCK_N]`` blocks (``TMA``)."""
    steps, r0, r1, first, every, n_cblocks = _steps(M, N, BLOCK_M, BLOCK_N, STRIDED)
    for k in tl.range(steps, num_stages=STAGES):
        rows, cols, mask, _ = _tile(k, n_cblocks, r0, r1, first, every, BLOCK_M, BLOCK_N, N)
        a = _load_tile(w, rows, cols, mask, N, TMA, EVICT_FIRST)
        if TMA:
            out.store([tl.min(rows, axis=0), tl.min(cols, axis=0)], a * scale)
        else:
            tl.store(out + rows[:, None] * N + cols[None, :], a * scale, mask=mask)


@triton.jit
def rowdot_kernel(w, x_ptr, s_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  STAGES: tl.constexpr, STRIDED: tl.constexpr, ROW_IN_TILE: tl.constexpr, TMA: tl.constexpr):
    """``s = A x`` over a contiguous ``M x N`` matrix (phase ST's loads of A, one product). One flat
    loop over the tiles, so the pipeline does not drain at each row block; a row block's sum is
    stored at its last column block. ``ROW_IN_TILE`` (``N <= BLOCK_N``): x is loaded once, as
    phase ST loads it (in the loop it would be pipelined too, a second tile of shared memory).
    ``w``: a pointer, or a TMA descriptor (``TMA``)."""
    steps, r0, r1, first, every, n_cblocks = _steps(M, N, BLOCK_M, BLOCK_N, STRIDED)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if ROW_IN_TILE:
        x_row = tl.load(x_ptr + tl.arange(0, BLOCK_N), mask=tl.arange(0, BLOCK_N) < N, other=0.0)
    for k in tl.range(steps, num_stages=STAGES):
        rows, cols, mask, cb = _tile(k, n_cblocks, r0, r1, first, every, BLOCK_M, BLOCK_N, N)
        a = _load_tile(w, rows, cols, mask, N, TMA, False)
        if ROW_IN_TILE:
            x = x_row
        else:
            x = tl.load(x_ptr + cols, mask=cols < N, other=0.0)
        acc = tl.where(cb == 0, 0.0, acc) + a * x[None, :]
        tl.store(s_ptr + rows, tl.sum(acc, axis=1), mask=(rows < r1) & (cb == n_cblocks - 1))


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def launches(M: int, N: int, programs_per_sm_grid: int, tile: int | None = None, stages: int = STAGES) -> list[dict]:
    """The launches to time: ``base`` as the kernels launch a streaming pass, then one knob changed
    at a time. ``programs_per_sm_grid``: the grid of one program per SM (the SM count)."""
    from sn_fused.ops import spectral_norm as ops_mod

    tile = tile or TILE
    bn = min(_next_power_of_2(N), tile)
    base = dict(name="base", G=programs_per_sm_grid, bm=max(tile // bn, 1), bn=bn,
                warps=ops_mod._num_warps(tile, bn), stages=stages, strided=False, evict=False, maxnreg=0, tma=False)
    rows = [base]

    def variant(name, **knobs):
        cfg = {**base, **knobs, "name": name}
        # Pipelined tiles beyond shared memory: fewer stages, as the launcher lowers them
        # (_stages_that_fit; a stage count s keeps s - 1 tiles of A in shared memory).
        while cfg["stages"] > 1 and (cfg["stages"] - 1) * cfg["bm"] * cfg["bn"] * 4 > SHARED_BYTES:
            cfg["stages"] -= 1
        if all(any(cfg[k] != r[k] for k in cfg if k != "name") for r in rows):
            rows.append(cfg)

    variant("grid (1 row block each)", G=triton.cdiv(M, base["bm"]), strided=True)
    variant("strided", strided=True)
    # Two programs per SM, co-resident (the kernels' grid barrier needs it): registers and shared
    # memory for both. Registers capped at half an SM's (ptxas sm_90a, 8 warps, unpipelined
    # 16384-element tiles: 112-116 registers for the scale, 144-181 for the row sums); tiles of
    # 8192 elements 3 deep take 64 KB of shared memory each where the row fits (4096 wide).
    two = dict(G=2 * base["G"], maxnreg=65536 // (2 * 32 * base["warps"]))
    variant("2/SM, stages 1", stages=1, **two)
    variant("2/SM strided, stages 1", stages=1, strided=True, **two)
    variant(f"2/SM, tile {tile // 2}", bm=max(tile // 2 // bn, 1), bn=min(bn, tile // 2), **two)
    for w in (4, 16):
        variant(f"warps {w}", warps=w)
    for t in (tile // 2, tile * 2):
        variant(f"tile {t}", bm=max(t // bn, 1), bn=min(bn, t))
    variant(f"bn {max(bn // 8, 1)}", bm=tile // max(bn // 8, 1), bn=max(bn // 8, 1))
    for s in (1, 2, 4):
        variant(f"stages {s}", stages=s)
    variant("evict_first", evict=True)
    variant("evict_first, stages 1", evict=True, stages=1)
    # Tiles through TMA (Hopper's bulk copies into shared memory; a box is at most 256 per dimension,
    # rows must be 16-byte aligned), row blocks strided (a block may cross a band's end), so
    # A's edges are the only masks, and TMA zero-fills beyond them.
    if N * 4 % 16 == 0:
        box_n = min(256, tile)
        for bm, stages_ in ((16, 4), (32, 3), (64, 3), (16, 8)):
            bm = max(1, min(bm, tile // box_n))
            variant(f"TMA [{bm}x{box_n}] s{stages_}", tma=True, strided=True, bm=bm, bn=box_n, stages=stages_,
                    warps=ops_mod._num_warps(bm * box_n, box_n))
    return rows


def call(kernel: str, cfg: dict, w: torch.Tensor, out: torch.Tensor, x: torch.Tensor):
    """``(jit function, args, kwargs)`` of one launch of ``kernel`` ("scale" or "rowdot") with
    ``cfg`` (``launches``): ``fn[(cfg["G"],)](*args, **kwargs)`` (``run``; ``bench.sm90`` compiles
    the same for sm_90a)."""
    M, N = w.shape
    kwargs = dict(BLOCK_M=cfg["bm"], BLOCK_N=cfg["bn"], STAGES=cfg["stages"], STRIDED=cfg["strided"],
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
    bit for bit, the row sums to float32 rounding. Small tiles so that bands, strides and masks
    all show. Returns the number of launches checked."""
    device = "cuda" if torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET") else "cpu"
    checked = 0
    for M, N in shapes:
        w = torch.randn(M, N, device=device)
        x = torch.randn(N, device=device)
        for cfg in launches(M, N, grid, tile=64, stages=2):
            out = torch.full_like(w, float("nan"))
            run("scale", cfg, w, out, x)
            assert torch.equal(out, w * 0.5), (M, N, cfg)
            s = torch.full((M,), float("nan"), device=device)
            run("rowdot", cfg, w, s, x)
            ref = (w.double() @ x.double()).float()
            assert torch.allclose(s, ref, rtol=1e-5, atol=1e-4 * N ** 0.5), (M, N, cfg, (s - ref).abs().max())
            checked += 1
    return checked


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
        out = torch.empty_like(w)
        x = torch.randn(N, device=DEVICE)
        s = torch.empty(M, device=DEVICE)
        moved = {"scale": 2 * w.numel() * 4, "rowdot": w.numel() * 4}

        def line(kernel, name, fn, cfg=None):
            try:
                t = graph_time_us(fn)
            except Exception as exc:  # (a launch the card refuses: too many registers or shared memory)
                print(f"  {kernel:<6} {name:<24} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                return
            rate = moved[kernel] / (t * 1e-6)
            what = ""
            if cfg:
                compiled = run(kernel, cfg, w, out if kernel == "scale" else s, x)
                held = programs_per_sm(compiled, cfg["warps"], props)
                what = (f"G={cfg['G']} [{cfg['bm']}x{cfg['bn']}] w{cfg['warps']} s{cfg['stages']}"
                        + (" strided" if cfg["strided"] else "") + (" evict_first" if cfg["evict"] else "")
                        + (f" maxnreg {cfg['maxnreg']}" if cfg["maxnreg"] else "") + (" TMA" if cfg["tma"] else "")
                        + f"; {compiled.n_regs} regs, {compiled.metadata.shared // 1024} KB, {held}/SM")
                cfg = {**cfg, "regs": compiled.n_regs, "shared": compiled.metadata.shared, "per_sm": held}
            print(f"  {kernel:<6} {name:<24} {t:7.1f} us [{rate / 1e12:.2f} TB/s, {100 * rate / bw:3.0f} %]  {what}",
                  flush=True)
            results.append(dict(M=M, N=N, pass_=kernel, name=name, us=t, tbs=rate / 1e12, cfg=cfg))

        print(f"{M}x{N} ({w.numel() * 4 / 2**20:.0f} MiB)")
        line("scale", "torch.mul", lambda: torch.mul(w, 0.5, out=out))
        line("scale", "torch copy_", lambda: out.copy_(w))
        for cfg in launches(M, N, sms):
            line("scale", cfg["name"], lambda cfg=cfg: run("scale", cfg, w, out, x), cfg)
            # (the result, once per launch: a fast wrong kernel would say nothing)
            if not torch.equal(out, w * 0.5):
                print(f"  scale  {cfg['name']}: WRONG RESULT")
        line("rowdot", "torch.mv", lambda: torch.mv(w, x, out=s))
        ref = torch.mv(w.double(), x.double()).float()
        for cfg in launches(M, N, sms):
            if cfg["evict"]:
                continue
            line("rowdot", cfg["name"], lambda cfg=cfg: run("rowdot", cfg, w, s, x), cfg)
            if not torch.allclose(s, ref, rtol=1e-4, atol=1e-3 * N ** 0.5):
                print(f"  rowdot {cfg['name']}: WRONG RESULT")
        del w, out, x, s
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
