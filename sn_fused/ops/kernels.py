r"""Triton kernels for spectral normalization: one launch per forward read, one per backward.

Layout
------
``A`` (``M x N``) is the weight viewed as a matrix: row ``i`` is index ``i``
along ``dim``; column ``j`` is the row-major flat index over the other
dimensions. Nothing is copied: every tensor is addressed through its own
strides (``_offsets``), so ``dim != 0`` (ConvTranspose), channels-last and
sliced weights are read in place and the output keeps the weight's layout.
The kernels walk the columns in the weight's memory order where that needs
fewer strides (the launcher's ``_MatrixLayout``): a channels-last conv
weight's row is one contiguous run, so its tiles load as a contiguous
weight's do (16 bytes at a time, no integer division). Column "``j``" below is
a position of that walk; the workspace follows it, and only ``v`` (a buffer
in A's column order) maps a position to its own index (``v_c*``, ``VD*``,
``NCOL_V``; unit stride where the walk is A's order).

Work split (persistent grid of ``G`` co-resident programs)
---------------------------------------------------------
Program ``p`` owns the whole rows ``[p*M//G, (p+1)*M//G)`` of ``A`` (row
phases) and, of the column vectors (column phases), the ``p``-th of G runs of
whole 16-column blocks: ``[16*(p*B//G), 16*((p+1)*B//G))`` with ``B =
ceil(N/16)``, cut at N. Whole rows mean ``s = A v`` is complete inside a
program, so the only cross-program traffic is small: ``G`` partial norms and
a ``G x N`` table of partial ``A^T u`` sums.

Workspace (``ws``, accumulation dtype: fp32, or fp64 for fp64 weights; each
region starts on a 16-element boundary, ``N16 = 16*ceil(N/16)``, ``M16`` alike)::

    s      [M16]     s = A x                 (own rows only)
    t      [N16]     t = A^T u               (own columns, read by all after a barrier)
    t_part [G, N]    per-program A[own rows]^T s   (s not yet normalized)
    part_s [G]      per-program sum of s_i^2   (eval: sum of u_i s_i)
    part_t [G]      per-program sum of t_j^2
    part_nf[G]      per-program sum of (t_j - t_j): 0, or NaN if a t_j is not finite
    part_ts[G]      per-program sum of (t_j * 2^64)^2 (used when sum t_j^2 would underflow)
    flag   [1]      phase-by-phase mode only: whether the fallback was taken

(``part_nf`` and ``part_ts`` are summed only where ``part_t`` is not finite or tiny, which
their readers need; otherwise they hold 0 and a copy of ``part_t``: ``_rare_stats_needed``.)
ON_CHIP uses ``t_part`` and ``part_s`` only (and ``s``, ``flag`` phase by phase).

Training read, ``n`` power iterations (``|`` = grid barrier)::

    ST: s = A x (x = v, or t/dv of the previous iteration), part_s,
        t_part = A[own rows]^T s     (same load of A if ROW_IN_TILE, else a 2nd pass)
    | R: du = max(||s||, eps), u = s/du (own rows),
         t = (sum_p t_part) / du (own columns, fixed order), part_t
    | F: dv = max(||t||, eps), v = t/dv (own columns), sigma = ||t||^2 / dv,
         then ST of the next iteration, or the rescale W_sn = W / sigma.

``A^T u = A^T s / du``, so the transposed product needs no barrier after the
first one: two barriers per iteration; with one program none at all.
``sigma = u^T A v = (A^T u)^T v = t^T t / dv`` holds exactly, so sigma costs
no pass over ``A`` either.

Overflow fallback: ``A^T s`` can overflow where PyTorch's ``A^T u`` does not
(float32 entries ~1e20: ``||s||`` is Inf, so PyTorch's u is 0 and its t is 0,
while ``A^T s / du`` is Inf/Inf = NaN). When ``||t||^2`` is not finite, every
program (the decision is made from the same partials, so it is uniform) redoes
``t_part = A^T u`` with the stored u -- PyTorch's order -- behind two more
barriers. Weights whose products stay in range never take it. Two more
PyTorch-isms: a 1-element vector's norm is ``|x_0|``, not ``sqrt(x_0^2)``
(no overflow above ~1.8e19 in float32), and a tiny ``||t||^2`` is taken from a
2^64-scaled sum, so sigma does not underflow to 0 when the eps clamp has made
t tiny.

A on chip (``ON_CHIP``, small weights): when a program's rows fit in one
tile and the ``G x N`` table of partials is small (the launcher's
``_ON_CHIP_MAX_PARTIALS``), the tile is loaded once and kept in registers
for the whole read, and after the first barrier *every* program sums the
whole table (the same partials in the same order: the same bits in every
program)::

    ST: s = A x, t_p = A[own rows]^T s      (registers; partials stored)
    | every program: du, u = s/du (own rows), t = (sum_p t_p) / du (all columns),
      dv, v = t/dv (own columns), sigma; then the products of the next
      iteration (behind one more barrier: they overwrite the partials), or
      W_sn = A / sigma from the same registers.

One barrier per iteration instead of two, no round trips through the
workspace after it, and no second read of ``A``; one program (``G == 1``)
touches no workspace at all. Phase by phase, ON_CHIP runs ST, then R (all of
the above after the barrier, with s and A re-read), FIX_T and FIX_R (the
fallback, flagged by R), and the ST of the next iteration.

Memory plan: when a whole row fits in one tile (``N <= 16384``,
``ROW_IN_TILE``), ST loads each tile of ``A`` once and computes both products
from it, so a read costs ``n + 1`` passes over ``A`` plus one write of
``W_sn``; wider rows take a second pass in ST (``2n + 1``). Where a program's
rows fit one tile but the table is too large for ON_CHIP (``KEEP_A``), the
tile is loaded once before ST and kept in registers through the barriers:
one pass over ``A`` per read, whatever ``n``. Each pass runs in
the opposite direction of the one before, so the part of ``A`` still in L2
(or L1, for a program's own rows) is read first. The workspace is small next
to ``A`` (``G x N`` partials) and stays in L2.

Reductions are deterministic: every sum runs in a fixed order (no float
atomics), so the same inputs give bitwise-identical results run to run.

Phases and the interpreter
--------------------------
``PHASE = -1`` runs every phase in one launch with grid barriers (GPU).
``PHASE = k >= 0`` runs phase ``k`` only; the launcher then calls the kernel
once per phase. The Triton interpreter runs programs one after another, so a
spin barrier with more than one program would deadlock there: phase-by-phase
launches are how the multi-program logic (partials, fixed-order combines) is
tested on CPU with the very same source.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Phase ids of the forward kernel (PHASE constexpr). -1 = all, with barriers.
PHASE_ALL = -1
PHASE_ST = 0  # s = A v from the v buffer (+ t_part = A^T s when training); eval: sum u_i s_i
PHASE_R = 1  # u = s / du, t = sum of t_part / du, part_t
PHASE_F = 2  # training: v, sigma, then the next ST or the rescale; eval: sigma, rescale
PHASE_FIX_T = 3  # only if ||t||^2 is not finite: t_part = A^T u (PyTorch's order), flag
PHASE_FIX_R = 4  # only if flagged: t = sum of t_part, part_t

# Phase ids of the backward kernel.
PHASE_DOT = 0  # part = <G, W> over own rows
PHASE_GRAD = 1  # dW = (G - <G, W_sn> u v^T) / sigma


@triton.jit
def grid_barrier(sem_ptr):
    """Wait until every program of the grid has reached this barrier.

    Invariant: ``*sem`` (32 bits) is 0 or 0x80000000 whenever no program is
    inside a barrier. Each barrier adds exactly 0x80000000 in total (program 0
    adds ``0x80000000 - (G - 1)``, the others 1 each), so the top bit flips
    once per barrier and the low bits return to 0: the semaphore never needs
    a reset (CUDA-graph replay safe). A program leaves once the top bit
    differs from what its own arrival saw. A grid of one program touches no
    semaphore at all.

    Preconditions: all ``G`` programs are co-resident (cooperative launch,
    grid capped by the launcher), and no other grid uses the same semaphore
    at the same time. Stores before the barrier are released (``release``
    atomic after a CTA barrier); readers of other programs' data should load
    with ``cache_modifier=".cg"`` (L2, never a stale L1 line).
    """
    sem = sem_ptr.to(tl.pointer_type(tl.uint32), bitcast=True)
    tl.debug_barrier()  # the CTA's stores are done (and visible inside the CTA)
    n = tl.num_programs(0).to(tl.uint32)
    if n > 1:  # one program: the CTA barrier above is all it takes
        if tl.program_id(0) == 0:
            nb = 0x80000000 - (n - 1)
        else:
            nb = n * 0 + 1
        old = tl.atomic_add(sem, nb, sem="release")
        flipped = False
        while not flipped:
            cur = tl.atomic_add(sem, 0, sem="acquire")
            flipped = ((old ^ cur) & 0x80000000) != 0
        tl.debug_barrier()


@triton.jit
def _offsets(rows, cols, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL: tl.constexpr):
    """Element offsets of ``A[rows, cols]`` for a tensor with the given strides
    (``cols``: positions in the launcher's walk of the columns, ``_column_offsets``)."""
    return rows[:, None] * s_row + _column_offsets(cols, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL)[None, :]


@triton.jit
def _column_offsets(cols, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL: tl.constexpr):
    """Offsets of the columns ``cols`` in one row of a tensor, or in the vector ``v``.

    Column ``j`` is the row-major index over ``NCOL`` column dims (outermost
    first); ``D1..D3`` are the sizes of the inner ones. The host merges dims that
    are contiguous in every tensor, and walks them in the weight's memory order
    where that merges more (``_MatrixLayout``), so the common cases' tiles (Linear,
    Conv, channels-last Conv) have ``NCOL == 1`` and no integer division at all.
    ``v``, a buffer in A's column order, has its own strides over the same walk
    (``v_c*``, ``VD*``, ``NCOL_V``: 1 and unit stride where the walk is A's order;
    a channels-last conv's v takes 2, one ``//`` and one ``%`` per element of v).
    """
    if NCOL == 1:
        off_c = cols * s_c0
    elif NCOL == 2:
        off_c = (cols // D1) * s_c0 + (cols % D1) * s_c1
    elif NCOL == 3:
        r = cols // D2
        off_c = (r // D1) * s_c0 + (r % D1) * s_c1 + (cols % D2) * s_c2
    else:
        r3 = cols // D3
        r2 = r3 // D2
        off_c = (r2 // D1) * s_c0 + (r2 % D1) * s_c1 + (r3 % D2) * s_c2 + (cols % D3) * s_c3
    return off_c


@triton.jit
def _multiple_of(x, ALIGN: tl.constexpr):
    """``x`` (an integer argument the launcher found a multiple of ``ALIGN``), in a form that
    tells the compiler so: ``x // ALIGN * ALIGN``, the same value.

    Triton hints an integer argument's divisibility by 16 only, and ``tl.multiple_of`` on an
    argument is lost (it marks the op that defines a value; an argument has none). A row
    stride of 148 or 20 therefore left every element of a tile its own 4-byte load: a
    1536x148 backward's tile was 194 scalar loads, 255 registers and 68 bytes of spills per
    thread (ptxas sm_90a), against 32 16-byte loads, 182 registers and none with ``ALIGN`` 4.
    The compiler's axis analysis sees the product's divisibility; it costs two scalar
    instructions per argument.
    """
    if ALIGN > 1:
        x = x // ALIGN * ALIGN
    return x


@triton.jit
def _clamp(norm, eps):
    """``max(norm, eps)`` with NaN propagated, as ``Tensor.clamp_min`` does.

    eps arrives as fp64 and is rounded to the accumulation dtype here (exact for fp64 weights).
    """
    eps_acc = (tl.zeros_like(norm) + eps).to(norm.dtype)  # not norm * 0: Inf * 0 is NaN
    return tl.maximum(norm, eps_acc, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _vector_norm(parts, x0, n):
    """``(||x||, sum x_i^2)`` of an n-vector from its per-program partial sums of squares, as
    loaded (``_partials``), and its first entry ``x0``.

    A 1-element vector's norm is ``|x_0|``, as PyTorch's is: squaring it would overflow above
    ~1.8e19 (float32) and underflow below ~1e-19. (Loaded by the caller, with whatever else
    waits on nothing: each load placed after this block-wide sum would wait for it.)
    """
    sumsq = tl.sum(parts, axis=0)
    return _norm_of(sumsq, x0, n), sumsq


@triton.jit
def _norm_of(sumsq, x0, n):
    """``||x||`` of an n-vector from ``sum x_i^2`` and ``x_0``: ``|x_0|`` when n == 1.

    The square root rounds to nearest, as PyTorch's norm does (and the interpreter's numpy):
    ``tl.sqrt`` of float32 is ``sqrt.approx.ftz.f32`` on NVIDIA GPUs, which is off by up to an
    ulp and flushes a subnormal ``sum x_i^2`` to 0, so with ``eps = 0`` a tiny vector (entries
    ~1e-21) would get the norm 0 and ``x / 0`` where PyTorch's is finite. (Once per norm: free.)
    """
    if sumsq.dtype == tl.float32:
        root = tl.sqrt_rn(sumsq)
    else:
        root = tl.sqrt(sumsq)  # (float64: sqrt.rn.f64 already)
    return tl.where(n == 1, tl.abs(x0), root)


@triton.jit
def _padded(n):
    """``n`` rounded up to a multiple of 16: where workspace regions start and the bounds of a
    program's columns. Triton vectorizes a load or store only where it can prove 16-byte
    alignment (pointer, offsets and mask bounds; Triton knows an integer argument divisible by
    16 or not at all, and ``_multiple_of`` tells it of 2, 4 or 8); scalar accesses take 4x the
    memory instructions (one program of 1x8192 spent half its issue slots waiting on the LG
    queue, ncu). The partials table keeps row stride N: its rows are as aligned as N is
    (``ROW_ALIGN``: 24576x20's loads of it are 16 bytes wide), and padding them would only
    spread the table over more L2 sectors."""
    return tl.cdiv(n, 16) * 16


@triton.jit
def _not_finite(x):
    return (x - x) != 0  # Inf - Inf and NaN - NaN are NaN


@triton.jit
def _sum_partials(part_ptr, G, BLOCK_P: tl.constexpr):
    """Fixed-order sum of the G per-program partials (written by other programs)."""
    return tl.sum(_partials(part_ptr, G, BLOCK_P), axis=0)


@triton.jit
def _partials(part_ptr, G, BLOCK_P: tl.constexpr):
    """The G per-program partials, loaded (from L2: other programs wrote them), not summed."""
    offs = tl.arange(0, BLOCK_P)
    return tl.load(part_ptr + offs, mask=offs < G, other=0.0, cache_modifier=".cg")


@triton.jit
def _phase_matvecs(w_ptr, u_ptr, v_ptr, s_ptr, t_ptr, tpart_ptr, part_s_ptr, dv, a_kept,
                   pid, r0, r1, N, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3,
                   FROM_V: tl.constexpr, TRAINING: tl.constexpr, NCOL: tl.constexpr, NCOL_V: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_IN_TILE: tl.constexpr,
                   LOAD_STAGES: tl.constexpr, PREFETCH: tl.constexpr, KEEP_A: tl.constexpr):
    """Phase ST over own rows: ``s = A x``; training also ``t_part[p] = A[rows]^T s``.

    ``x = v`` (FROM_V) or ``x = t / dv`` of the previous iteration, rounded to
    v's dtype first: that is the ``v`` it stored, so each iteration sees what
    PyTorch would read. Writes ``s`` and the partial ``sum s_i^2``
    (training) or ``sum u_i s_i`` (eval: sigma = u^T A v, stored u and v).
    The transposed product uses ``s`` before normalization: ``A^T u = A^T s / du``
    and ``du`` is known only after the barrier. Whole-row tiles are loaded as the kernel's
    ``LOAD_STAGES`` and ``LOAD_PREFETCH`` (``PREFETCH`` here) say; with ``KEEP_A`` the program's
    rows are one tile, ``a_kept``, which the kernel has loaded (``_kept_tile``), and none is.
    """
    acc_t = s_ptr.dtype.element_ty
    part = tl.zeros([BLOCK_M], acc_t)
    if ROW_IN_TILE:
        # A whole row fits in one tile: each tile of A is loaded once and used for
        # both products (one pass over A), x and the t partial stay in registers.
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        if FROM_V:
            x = tl.load(v_ptr + _column_offsets(cols, v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3, NCOL_V), mask=cmask,
                        other=0.0).to(acc_t)
        else:
            t = tl.load(t_ptr + cols, mask=cmask, other=0.0, cache_modifier=".cg")
            x = (t / dv).to(v_ptr.dtype.element_ty).to(acc_t)
        t_acc = tl.zeros([BLOCK_N], acc_t)
        if KEEP_A:
            # (the loop below, run once over the same tile: the same sums, bit for bit)
            part, t_acc = _matvecs_step(a_kept.to(acc_t), x, r0, r1, u_ptr, s_ptr, part, t_acc, TRAINING, BLOCK_M)
        elif PREFETCH:
            # The next tile's loads are issued before this one is reduced (two tiles in registers),
            # so they are in flight across the block-wide sum instead of after it.
            tile = _row_tile(w_ptr, r0, r1, cols, cmask, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL, BLOCK_M)
            for r in range(r0, r1, BLOCK_M):
                tile_next = _row_tile(w_ptr, r + BLOCK_M, r1, cols, cmask, s_row, s_c0, s_c1, s_c2, s_c3,
                                      D1, D2, D3, NCOL, BLOCK_M)  # (all masked after the last)
                part, t_acc = _matvecs_step(tile.to(acc_t), x, r, r1, u_ptr, s_ptr, part, t_acc, TRAINING, BLOCK_M)
                tile = tile_next
        else:
            for r in tl.range(r0, r1, BLOCK_M, num_stages=LOAD_STAGES):
                a = _row_tile(w_ptr, r, r1, cols, cmask, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL, BLOCK_M)
                part, t_acc = _matvecs_step(a.to(acc_t), x, r, r1, u_ptr, s_ptr, part, t_acc, TRAINING, BLOCK_M)
        tl.store(part_s_ptr + pid, tl.sum(part, axis=0))
        if TRAINING:
            tl.store(tpart_ptr + pid * N + cols, t_acc, mask=cmask)
    else:
        # Rows wider than a tile: column blocks, and a second pass for the transposed product.
        for r in range(r0, r1, BLOCK_M):
            rows = r + tl.arange(0, BLOCK_M)
            rmask = rows < r1
            acc = tl.zeros([BLOCK_M, BLOCK_N], acc_t)
            for c in range(0, N, BLOCK_N):
                cols = c + tl.arange(0, BLOCK_N)
                cmask = cols < N
                a = tl.load(w_ptr + _offsets(rows, cols, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL),
                            mask=rmask[:, None] & cmask[None, :], other=0.0).to(acc_t)
                if FROM_V:
                    x = tl.load(v_ptr + _column_offsets(cols, v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3, NCOL_V),
                                mask=cmask, other=0.0).to(acc_t)
                else:
                    t = tl.load(t_ptr + cols, mask=cmask, other=0.0, cache_modifier=".cg")
                    x = (t / dv).to(v_ptr.dtype.element_ty).to(acc_t)
                acc += a * x[None, :]
            s = tl.sum(acc, axis=1)
            tl.store(s_ptr + rows, s, mask=rmask)
            if TRAINING:
                part += s * s
            else:
                part += tl.load(u_ptr + rows, mask=rmask, other=0.0).to(acc_t) * s
        tl.store(part_s_ptr + pid, tl.sum(part, axis=0))
        if TRAINING:
            _transposed_partial(w_ptr, s_ptr, tpart_ptr, pid, r0, r1, N, s_row, s_c0, s_c1, s_c2, s_c3,
                                D1, D2, D3, NCOL, BLOCK_M, BLOCK_N)


@triton.jit
def _row_tile(w_ptr, r, r1, cols, cmask, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL: tl.constexpr,
              BLOCK_M: tl.constexpr):
    """Rows ``[r, r + BLOCK_M)`` of A below ``r1``, whole (``cols``: all of a row), the weight's dtype."""
    rows = r + tl.arange(0, BLOCK_M)
    return tl.load(w_ptr + _offsets(rows, cols, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL),
                   mask=(rows < r1)[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _matvecs_step(a, x, r, r1, u_ptr, s_ptr, part, t_acc, TRAINING: tl.constexpr, BLOCK_M: tl.constexpr):
    """One whole-row tile ``a`` of phase ST (rows ``[r, r + BLOCK_M)`` below ``r1``): ``s = a x``
    stored; returns ``part`` plus ``sum s_i^2`` (eval: ``sum u_i s_i``) and ``t_acc`` plus
    ``a^T s`` (training)."""
    rows = r + tl.arange(0, BLOCK_M)
    rmask = rows < r1
    s = tl.sum(a * x[None, :], axis=1)
    tl.store(s_ptr + rows, s, mask=rmask)
    if TRAINING:
        part += s * s
        t_acc += tl.sum(a * s[:, None], axis=0)
    else:
        part += tl.load(u_ptr + rows, mask=rmask, other=0.0).to(a.dtype) * s
    return part, t_acc


@triton.jit
def _transposed_partial(w_ptr, x_ptr, tpart_ptr, pid, r0, r1, N, s_row, s_c0, s_c1, s_c2, s_c3,
                        D1, D2, D3, NCOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``t_part[p] = A[own rows]^T x[own rows]``: a pass over own rows, column block by block."""
    acc_t = tpart_ptr.dtype.element_ty
    tl.debug_barrier()  # x of own rows, stored by some threads, is read by others below
    n_cblocks = tl.cdiv(N, BLOCK_N)
    for i in range(n_cblocks):
        # Last-to-first: the columns just read are read again first.
        cols = (n_cblocks - 1 - i) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], acc_t)
        for r in range(r0, r1, BLOCK_M):
            rows = r + tl.arange(0, BLOCK_M)
            rmask = rows < r1
            a = tl.load(w_ptr + _offsets(rows, cols, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL),
                        mask=rmask[:, None] & cmask[None, :], other=0.0).to(acc_t)
            x = tl.load(x_ptr + rows, mask=rmask, other=0.0).to(acc_t)
            acc += a * x[:, None]
        tl.store(tpart_ptr + pid * N + cols, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _phase_reduce(u_ptr, u_saved_ptr, s_ptr, tpart_ptr, t_ptr, part_s_ptr, part_t_ptr, eps,
                  pid, G, r0, r1, c0, c1, M, N, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Phase R: ``u = s / du`` for own rows; ``t = (sum_q t_part[q]) / du`` for own columns.

    ``du = max(||s||, eps)``. The q-sum reads ``BLOCK_Q`` programs' partials
    per load (one ``[BLOCK_Q, BLOCK_C]`` tile): the loads of a step are
    independent, so a program waits ``cdiv(G, BLOCK_Q)`` L2 round trips, not
    ``G``. The sum still runs in a fixed order (tile tree, then steps in q
    order), so it is deterministic. Writes the partial ``sum t_j^2``.

    Every load that needs nothing loaded before it goes first: ``||s||``'s partials, the first
    block of s and the first step of t's column sums share one round trip. (Each sum is a
    block-wide reduction, with barriers the compiler does not move loads across: a load placed
    after one waits for it.)
    """
    s_first = _load_block(s_ptr, r0, r1, BLOCK_R)
    s_parts = _partials(part_s_ptr, G, BLOCK_P)
    s0 = tl.load(s_ptr, cache_modifier=".cg")
    sums_first = _first_column_sums(tpart_ptr, G, N, c0, c1, BLOCK_C, BLOCK_Q)
    du = _clamp(_vector_norm(s_parts, s0, M)[0], eps)
    # u is contiguous (the launcher's check): unit stride, one dim of columns (NCOL_O = 1).
    _store_normalized(s_first, s_ptr, u_ptr, u_saved_ptr, du, r0, r1, 1, 0, 0, 0, 1, 1, 1, BLOCK_R, 1)
    _combine_columns(sums_first, tpart_ptr, t_ptr, part_t_ptr, du, pid, G, c0, c1, N, BLOCK_C, BLOCK_Q)


@triton.jit
def _first_column_sums(tpart_ptr, G, N, c0, c1, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr):
    """``sum_q t_part[q]`` over a program's first block of own columns (``_combine_columns``)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    return _sum_columns(tpart_ptr, G, N, cols, cols < c1, BLOCK_C, BLOCK_Q)


@triton.jit
def _combine_columns(sums_first, tpart_ptr, t_ptr, part_t_ptr, du, pid, G, c0, c1, N,
                     BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr):
    """``t = (sum_q t_part[q]) / du`` for own columns (``sums_first``: the first block's sums,
    ``_first_column_sums``), and three partials: ``sum t_j^2``
    (at ``part_t_ptr[pid]``), the non-finite marker ``sum (t_j - t_j)`` (``[G + pid]``) and
    the scaled ``sum (t_j 2^64)^2`` (``[2G + pid]``).

    The last two are summed only where ``_rare_stats_needed`` says so for the first; otherwise
    stored as 0 (exact: a finite sum of squares has finite terms) and as the first (never read:
    the whole ``||t||^2`` is tiny only if every program's partial is). Each sum is a block-wide
    reduction: one instead of three in the common case, the same results."""
    acc_t = t_ptr.dtype.element_ty
    du = du.to(acc_t)
    part = tl.zeros([BLOCK_C], acc_t)
    nonfinite = tl.zeros([BLOCK_C], acc_t)
    scaled = tl.zeros([BLOCK_C], acc_t)
    sums = sums_first
    for c in range(c0, c1, BLOCK_C):
        cols = c + tl.arange(0, BLOCK_C)
        cmask = cols < c1
        if c > c0:
            sums = _sum_columns(tpart_ptr, G, N, cols, cmask, BLOCK_C, BLOCK_Q)
        t = sums / du
        tl.store(t_ptr + cols, t, mask=cmask)
        sq, nf, sq_up = _t_terms(t)
        part += sq
        nonfinite += nf
        scaled += sq_up
    part_sq = tl.sum(part, axis=0)
    part_nf = tl.zeros_like(part_sq)
    part_up = part_sq
    if _rare_stats_needed(part_sq):
        part_nf = tl.sum(nonfinite, axis=0)
        part_up = tl.sum(scaled, axis=0)
    tl.store(part_t_ptr + pid, part_sq)
    tl.store(part_t_ptr + G + pid, part_nf)
    tl.store(part_t_ptr + 2 * G + pid, part_up)


@triton.jit
def _t_terms(t):
    """Per element: ``t^2``, ``t - t`` (0, or NaN where t is not finite) and ``(t 2^64)^2``
    (which does not underflow where ``t^2`` does): summed, t's statistics."""
    t_up = t * 18446744073709551616.0  # 2^64, exact
    return t * t, t - t, t_up * t_up


@triton.jit
def _sum_columns(tpart_ptr, G, N, cols, cmask, BLOCK: tl.constexpr, BLOCK_Q: tl.constexpr):
    """``sum_q t_part[q, cols]`` over the G programs' partials, in a fixed order.

    Each step loads a ``[BLOCK_Q, BLOCK]`` tile of partials (independent loads: one L2
    round trip per step), sums it as a tree, and adds the steps in q order.
    """
    t = tl.zeros([BLOCK], tpart_ptr.dtype.element_ty)
    for q0 in range(0, G, BLOCK_Q):
        qs = q0 + tl.arange(0, BLOCK_Q)
        tile = tl.load(tpart_ptr + qs[:, None] * N + cols[None, :],
                       mask=(qs < G)[:, None] & cmask[None, :], other=0.0, cache_modifier=".cg")
        t += tl.sum(tile, axis=0)
    return t


@triton.jit
def _t_stats(part_t_ptr, t_ptr, G, N, BLOCK_P: tl.constexpr):
    """``(||t||, ||t||^2, ||2^64 t||^2, non-finite marker)`` from phase R's partials.

    One L2 round trip and one block-wide sum; the other two partials' sums only where
    ``_rare_stats_needed`` (their loads then another round trip; otherwise the marker is 0 and
    the scaled sum unread, as in ``_on_chip_t_stats``). The caller checks ``||t||^2`` for the
    overflow fallback with them, so phase F costs no extra round trip.
    """
    norm_t, tsq = _vector_norm(_partials(part_t_ptr, G, BLOCK_P), tl.load(t_ptr, cache_modifier=".cg"), N)
    nonfinite = tl.zeros_like(tsq)
    tsq_up = tsq
    if _rare_stats_needed(tsq):
        nonfinite = _sum_partials(part_t_ptr + G, G, BLOCK_P)
        tsq_up = _sum_partials(part_t_ptr + 2 * G, G, BLOCK_P)
    return norm_t, tsq, tsq_up, nonfinite


@triton.jit
def _phase_finish_iteration(t_first, t_ptr, v_ptr, v_saved_ptr, norm_t, tsq, tsq_up, nonfinite, eps, c0, c1,
                            N, v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3, BLOCK_C: tl.constexpr, NCOL_V: tl.constexpr):
    """Phase F: ``v = t / max(||t||, eps)`` for own columns (``t_first``: the first block of them,
    ``_load_block``, loaded before the statistics). Returns ``(sigma, dv)``."""
    sigma, dv = _sigma_and_dv(norm_t, tsq, tsq_up, nonfinite, eps, N)
    _store_normalized(t_first, t_ptr, v_ptr, v_saved_ptr, dv, c0, c1, v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3,
                      BLOCK_C, NCOL_V)
    return sigma, dv


@triton.jit
def _load_block(x_ptr, lo, hi, BLOCK: tl.constexpr):
    """``x[lo : lo + BLOCK]``, masked at ``hi``: a block of a program's own rows or columns.

    Phases R and F load the first one before the sum of partials that its normalization waits
    on, so the two loads share one round trip: a load placed after that sum (a block-wide
    reduction, with barriers the compiler does not move loads across) would wait for it and
    then for its own data.

    A plain load (not ``.cg``), after a grid barrier too: only this program wrote these elements,
    from its own SM, so its L1 holds no stale line of them. Should another program ever write
    them (a different split of rows or columns), this load must become ``.cg``
    (``tests/single_launch.py`` flags it).
    """
    offs = lo + tl.arange(0, BLOCK)
    return tl.load(x_ptr + offs, mask=offs < hi, other=0.0)


@triton.jit
def _store_normalized(x_first, x_ptr, out_ptr, saved_ptr, d, lo, hi, o_c0, o_c1, o_c2, o_c3, OD1, OD2, OD3,
                      BLOCK: tl.constexpr, NCOL_O: tl.constexpr):
    """``out[i] = saved[i] = x[i] / d`` for ``lo <= i < hi``, rounded to out's dtype (u or v);
    the first block from ``x_first`` (``_load_block``), any further ones loaded here. ``out``
    and ``saved`` are addressed through ``o_c*, OD*, NCOL_O`` (``_column_offsets``): v's layout
    over the walk of the columns, or a unit stride (u)."""
    _store_normalized_block(x_first, out_ptr, saved_ptr, d, lo, hi, o_c0, o_c1, o_c2, o_c3, OD1, OD2, OD3,
                            BLOCK, NCOL_O)
    for i in range(lo + BLOCK, hi, BLOCK):
        _store_normalized_block(_load_block(x_ptr, i, hi, BLOCK), out_ptr, saved_ptr, d, i, hi,
                                o_c0, o_c1, o_c2, o_c3, OD1, OD2, OD3, BLOCK, NCOL_O)


@triton.jit
def _store_normalized_block(x, out_ptr, saved_ptr, d, i, hi, o_c0, o_c1, o_c2, o_c3, OD1, OD2, OD3,
                            BLOCK: tl.constexpr, NCOL_O: tl.constexpr):
    offs = i + tl.arange(0, BLOCK)
    mask = offs < hi
    y = (x / d).to(out_ptr.dtype.element_ty)
    out_offs = _column_offsets(offs, o_c0, o_c1, o_c2, o_c3, OD1, OD2, OD3, NCOL_O)
    tl.store(out_ptr + out_offs, y, mask=mask)
    tl.store(saved_ptr + out_offs, y, mask=mask)


@triton.jit
def _tiny(tsq):
    """``||t||^2 < 2^-60``: its squares may have underflowed (``_sigma_and_dv``)."""
    return tsq < 8.673617379884035e-19


@triton.jit
def _rare_stats_needed(sq):
    """Whether a sum of ``t_j^2`` (all of t, or a program's part) needs its companions, the
    non-finite marker ``sum (t_j - t_j)`` and the scaled ``sum (t_j 2^64)^2``.

    ``_sigma_and_dv`` reads the marker only where ``||t||`` is infinite (so ``||t||^2`` is not
    finite) and the scaled sum only where ``||t||^2`` is tiny. A finite sum of squares has finite
    terms, so where it is finite the marker is exactly 0; and ``||t||^2`` is tiny only if every
    part of it is. So neither needs summing unless this holds: each is a block-wide reduction
    (shuffles, shared memory, barriers) on the read's critical path.
    """
    return _tiny(sq) | _not_finite(sq)


@triton.jit
def _sigma_and_dv(norm_t, tsq, tsq_up, nonfinite, eps, N):
    """``(sigma, dv)`` from t's statistics: ``dv = max(||t||, eps)``, ``v = t / dv``.

    ``sigma = u^T A v = t^T v = ||t||^2 / dv`` (no pass over A needed); for a
    1-element t, ``|t_0| * (|t_0| / dv)``, which does not square t_0. When
    ``||t||^2 < 2^-60`` the squares may have underflowed (float32: every
    ``|t_j| < 1e-19``, which the eps clamp produces), so sigma comes from the
    2^64-scaled sum instead; dv does not: PyTorch's norm underflows the same way,
    and its v (hence dv) is what the next iteration and autograd see. When
    ``||t||`` overflows (dv = Inf), PyTorch's v is ``t / Inf``: 0 where t is
    finite, so its sigma is 0 -- or NaN if some t_j is Inf/NaN: the non-finite
    marker.
    """
    down = 5.421010862427522e-20  # 2^-64, exact
    dv = _clamp(norm_t, eps)
    tiny = _tiny(tsq) & (N != 1) & (dv > 0)  # dv = 0 (eps = 0): 0/0 as PyTorch
    sigma = tl.where(N == 1, norm_t * (norm_t / dv), tsq / dv)
    sigma = tl.where(tiny, ((tsq_up / dv) * down) * down, sigma)
    return tl.where(_not_finite(dv) & (dv == dv), nonfinite, sigma), dv


@triton.jit
def _copy_vector(src_ptr, dst_ptr, lo, hi, BLOCK: tl.constexpr):
    for c in range(lo, hi, BLOCK):
        offs = c + tl.arange(0, BLOCK)
        mask = offs < hi
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _phase_rescale(w_ptr, out_ptr, sigma, sigma_ptr, sigma_buf_ptr, a_kept, pid, r0, r1, N,
                   s_row, s_c0, s_c1, s_c2, s_c3, o_row, o_c0, o_c1, o_c2, o_c3, D1, D2, D3,
                   NCOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
                   PREFETCH: tl.constexpr, KEEP_A: tl.constexpr):
    """``W_sn = W / sigma`` over own rows, and sigma's stores (``STAGES``, ``PREFETCH``: how the
    row loop's loads overlap, the kernel's ``RESCALE_STAGES`` and ``RESCALE_PREFETCH``).

    Order: the exact reverse of the last pass over A (phase ST ends on column
    block 0 -- the only one when ``ROW_IN_TILE`` -- and on its last rows), so
    the tiles still in L2 are read first. A is not read again in this launch
    and W_sn not at all, so both go through L2 with ``evict_first``: they do
    not push out the tiles of A that are still to be re-read. (Pipelined loads,
    ``STAGES > 1``, are ``cp.async``, which Triton emits without that hint;
    prefetched ones keep it.) With ``KEEP_A``, A is not read again at all: ``W_sn = a_kept / sigma``.
    """
    sigma_acc = _store_sigma(sigma, sigma_ptr, sigma_buf_ptr, out_ptr, pid)
    if KEEP_A:
        rows = r0 + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        _store_rescaled(out_ptr, a_kept, sigma_acc, rows, cols, (rows < r1)[:, None] & (cols < N)[None, :],
                        o_row, o_c0, o_c1, o_c2, o_c3, D1, D2, D3, NCOL)
    else:
        n_rblocks = tl.cdiv(r1 - r0, BLOCK_M)
        for c in range(0, N, BLOCK_N):
            cols = c + tl.arange(0, BLOCK_N)
            cmask = cols < N
            if PREFETCH:
                # The next tile's loads are issued before this one is divided and stored.
                a = _rescale_tile(w_ptr, 0, r0, r1, cols, cmask, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL,
                                  BLOCK_M)
                for j in range(n_rblocks):
                    a_next = _rescale_tile(w_ptr, j + 1, r0, r1, cols, cmask, s_row, s_c0, s_c1, s_c2, s_c3,
                                           D1, D2, D3, NCOL, BLOCK_M)  # (all masked after the last)
                    _store_rescaled_block(out_ptr, a, sigma_acc, j, r0, r1, cols, cmask, o_row, o_c0, o_c1, o_c2,
                                          o_c3, D1, D2, D3, NCOL, BLOCK_M)
                    a = a_next
            else:
                for j in tl.range(n_rblocks, num_stages=STAGES):
                    a = _rescale_tile(w_ptr, j, r0, r1, cols, cmask, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL,
                                      BLOCK_M)
                    _store_rescaled_block(out_ptr, a, sigma_acc, j, r0, r1, cols, cmask, o_row, o_c0, o_c1, o_c2,
                                          o_c3, D1, D2, D3, NCOL, BLOCK_M)


@triton.jit
def _rescale_rows(j, r0, r1, cmask, BLOCK_M: tl.constexpr):
    """The rescale's ``j``-th row block, counted from the last (``rows``, the tile's mask)."""
    rows = r1 - (j + 1) * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows, (rows >= r0)[:, None] & cmask[None, :]


@triton.jit
def _rescale_tile(w_ptr, j, r0, r1, cols, cmask, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """The tile of A the rescale's step ``j`` divides (read once more in this launch: ``evict_first``)."""
    rows, mask = _rescale_rows(j, r0, r1, cmask, BLOCK_M)
    return tl.load(w_ptr + _offsets(rows, cols, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL),
                   mask=mask, other=0.0, eviction_policy="evict_first")


@triton.jit
def _store_rescaled_block(out_ptr, a, sigma_acc, j, r0, r1, cols, cmask, o_row, o_c0, o_c1, o_c2, o_c3,
                          D1, D2, D3, NCOL: tl.constexpr, BLOCK_M: tl.constexpr):
    """``W_sn`` of the rescale's step ``j`` from its tile ``a``."""
    rows, mask = _rescale_rows(j, r0, r1, cmask, BLOCK_M)
    _store_rescaled(out_ptr, a, sigma_acc, rows, cols, mask, o_row, o_c0, o_c1, o_c2, o_c3, D1, D2, D3, NCOL)


@triton.jit
def _store_sigma(sigma, sigma_ptr, sigma_buf_ptr, out_ptr, pid):
    """Program 0 stores sigma (output and the module's buffer); returns the divisor of W.

    sigma is rounded to the weight's dtype first: PyTorch's sigma is a tensor
    of that dtype, and ``weight / sigma`` divides by the rounded value (NaN if
    it overflowed the dtype, see below).
    """
    sigma_w = sigma.to(out_ptr.dtype.element_ty)
    if pid == 0:
        tl.store(sigma_ptr, sigma_w)
        tl.store(sigma_buf_ptr, sigma_w)
    sigma_acc = sigma_w.to(sigma.dtype)
    # A finite sigma that rounds to Inf (float16 above 65504) would make W_sn a silent 0 (and
    # its gradient too). PyTorch's own float16 norms overflow before that (its u or v become
    # 0, sigma 0, W_sn +-Inf, NaN where W is 0): not finite either way. The kernel's norms
    # are float32 by design, so it reaches sigma itself; it answers NaN, never a silent 0.
    return tl.where(_not_finite(sigma_acc) & ~_not_finite(sigma), sigma_acc - sigma_acc, sigma_acc)


@triton.jit
def _store_rescaled(out_ptr, a, sigma_acc, rows, cols, mask, o_row, o_c0, o_c1, o_c2, o_c3, D1, D2, D3,
                    NCOL: tl.constexpr):
    """``W_sn[rows, cols] = a / sigma`` (``a``: that tile of W, in the weight's dtype)."""
    tl.store(out_ptr + _offsets(rows, cols, o_row, o_c0, o_c1, o_c2, o_c3, D1, D2, D3, NCOL),
             (a.to(sigma_acc.dtype) / sigma_acc).to(out_ptr.dtype.element_ty), mask=mask,
             eviction_policy="evict_first")


# --------------------------------------------------------------------------- A on chip
# ON_CHIP: a program's rows of A fit in one [BLOCK_M, BLOCK_N] tile, and the G x N table of
# partial A^T s sums is small enough for every program to read it whole. Then the tile is
# loaded once and kept in registers for the whole read (both products, the rescale, the
# overflow fallback), and after the one barrier every program sums the whole table itself:
# each holds all of t, so ||t||, v and sigma need no second barrier and no round trip through
# the workspace. One program (G == 1) touches no workspace at all.
#
# KEEP_A: the same tile where the table is too large for every program to read whole (G x N
# floats each, from L2). The read then runs the streaming phases (two barriers per iteration,
# each program combining its own columns), but loads its tile once and keeps it: phase ST's
# products of every iteration and the rescale take it from registers, so A is read once per
# read instead of n + 1 times. (The overflow fallback's A^T u, rarely taken, reads A again.)


@triton.jit
def _own_tile(w_ptr, r0, r1, N, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """ON_CHIP: all of a program's rows of A as one tile (weight dtype), its rows and columns."""
    rows = r0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < r1)[:, None] & (cols < N)[None, :]
    a = tl.load(w_ptr + _offsets(rows, cols, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL),
                mask=mask, other=0.0)
    return a, rows, cols, mask


@triton.jit
def _kept_tile(w_ptr, r0, r1, N, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOAD: tl.constexpr):
    """KEEP_A: a program's rows of A as one tile (``_own_tile``), loaded once by the streaming
    read and kept for its products and its rescale; a placeholder where not ``LOAD``."""
    a = tl.zeros([1, 1], w_ptr.dtype.element_ty)  # (never used: every use is behind KEEP_A)
    if LOAD:
        a = _own_tile(w_ptr, r0, r1, N, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL, BLOCK_M, BLOCK_N)[0]
    return a


@triton.jit
def _first_if_one(x, idx, n):
    """``x[idx == 0]`` as a scalar when ``n == 1`` (a 1-element vector's norm is ``|x_0|``), else 0.

    A branch, not ``tl.where``: the sum behind it is a block-wide reduction (shuffles, shared
    memory, barriers), paid on every read otherwise. (Triton makes an integer argument equal
    to 1 a constant, so the branch is resolved at compile time where it is taken.)
    """
    x0 = tl.full([], 0.0, x.dtype)
    if n == 1:
        x0 = tl.sum(tl.where(idx == 0, x, tl.zeros_like(x)), axis=0)
    return x0


@triton.jit
def _on_chip_u(s, sumsq, rows, r1, u_ptr, u_saved_ptr, eps, M):
    """``u = s / du`` for own rows (stored); returns ``(u, du)``. ``du = max(||s||, eps)``.

    Every program must get the same ``du`` (the fallback's branch and its barriers follow from
    it). With ``M == 1`` it comes from the program that owns row 0, so only while that is the
    whole grid: the launcher never gives a weight more programs than rows (``_launch_config``)."""
    du = _clamp(_norm_of(sumsq, _first_if_one(s, rows, M), M), eps)
    rmask = rows < r1
    # Masked rows are 0, not 0/du: du can be 0 (eps = 0), and the fallback's A^T u sums them.
    u = tl.where(rmask, s / du, tl.zeros_like(s)).to(u_ptr.dtype.element_ty)
    tl.store(u_ptr + rows, u, mask=rmask)
    tl.store(u_saved_ptr + rows, u, mask=rmask)
    return u, du


@triton.jit
def _on_chip_t_stats(t, cols, N):
    """``(||t||, ||t||^2, ||2^64 t||^2, non-finite marker)`` of a whole t held in registers
    (what ``_t_stats`` assembles from the programs' partials).

    Each sum over t is a block-wide reduction (shuffles, shared memory, barriers), on the
    read's critical path: the last two only where ``_rare_stats_needed``, so one reduction
    instead of three in the common case, the same results. (Separate ``tl.sum``s, not one
    three-operand ``tl.reduce``: the interpreter (CI) runs that as a Python loop per element,
    ~7x slower on a 1x4096 read, and sums in another order than ``tl.sum`` there.)
    """
    tsq = tl.sum(t * t, axis=0)  # (the first of _t_terms)
    tsq_up = tsq
    nonfinite = tl.zeros_like(tsq)
    if _rare_stats_needed(tsq):  # (a scalar: the same branch in every thread)
        sq, nf, sq_up = _t_terms(t)
        tsq_up = tl.sum(sq_up, axis=0)
        nonfinite = tl.sum(nf, axis=0)
    return _norm_of(tsq, _first_if_one(t, cols, N), N), tsq, tsq_up, nonfinite


@triton.jit
def _on_chip_v(t, norm_t, tsq, tsq_up, nonfinite, cols, c0, c1, N, v_ptr, v_saved_ptr, eps,
               v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3, NCOL_V: tl.constexpr):
    """``v = t / dv`` for own columns (stored). Returns ``(sigma, v as the next x)``."""
    sigma, dv = _sigma_and_dv(norm_t, tsq, tsq_up, nonfinite, eps, N)
    v = (t / dv).to(v_ptr.dtype.element_ty)
    own = (cols >= c0) & (cols < c1)
    v_offs = _column_offsets(cols, v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3, NCOL_V)
    tl.store(v_ptr + v_offs, v, mask=own)
    tl.store(v_saved_ptr + v_offs, v, mask=own)
    return sigma, v.to(t.dtype)


@triton.jit
def _read_on_chip(w_ptr, out_ptr, u_ptr, v_ptr, u_saved_ptr, v_saved_ptr, sigma_ptr, sigma_buf_ptr,
                  tpart_ws, part_s_ws, sem_ptr, pid, G, r0, r1, c0, c1, M, N, n_iters, eps,
                  s_row, s_c0, s_c1, s_c2, s_c3, o_row, o_c0, o_c1, o_c2, o_c3, D1, D2, D3,
                  v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3,
                  NCOL: tl.constexpr, NCOL_V: tl.constexpr, TRAINING: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    """A whole read (PHASE == -1) with A in registers: one barrier per iteration (none if G == 1).

    Training, per iteration::

        s = A x, t_p = A[own rows]^T s   (registers)
        | every program: sum s^2 and t = sum_p t_p over all columns (fixed order, the same
          bits in every program), du, u = s / du (own rows), t /= du, v = t / dv, sigma
        | (n > 1 only: the next products overwrite the partials others may still read)

    then ``W_sn = A / sigma`` from the same registers. The overflow fallback (``A^T u``
    in PyTorch's order) reuses the tile: two barriers, only when ``||t||^2`` is not finite.
    """
    acc_t = tpart_ws.dtype.element_ty
    a, rows, cols, mask = _own_tile(w_ptr, r0, r1, N, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL,
                                    BLOCK_M, BLOCK_N)
    cmask = cols < N
    x = tl.load(v_ptr + _column_offsets(cols, v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3, NCOL_V), mask=cmask,
                other=0.0).to(acc_t)
    if TRAINING:
        for it in range(n_iters):
            s = tl.sum(a.to(acc_t) * x[None, :], axis=1)
            t = tl.sum(a.to(acc_t) * s[:, None], axis=0)
            sumsq = tl.sum(s * s, axis=0)
            if G > 1:
                tl.store(part_s_ws + pid, sumsq)
                tl.store(tpart_ws + pid * N + cols, t, mask=cmask)
                grid_barrier(sem_ptr)
                # (both tables' loads before either sum, so they share one round trip, as in phase
                # R; the compiler orders them so by itself for some tiles, not for all)
                s_parts = _partials(part_s_ws, G, BLOCK_P)
                t = _sum_columns(tpart_ws, G, N, cols, cmask, BLOCK_N, BLOCK_Q)
                sumsq = tl.sum(s_parts, axis=0)
            u, du = _on_chip_u(s, sumsq, rows, r1, u_ptr, u_saved_ptr, eps, M)
            t = t / du
            norm_t, tsq, tsq_up, nonfinite = _on_chip_t_stats(t, cols, N)
            # Every program holds the same t (same partials, same order): all take this branch
            # or none, so its barriers cannot deadlock.
            if _not_finite(tsq):
                t = tl.sum(a.to(acc_t) * u.to(acc_t)[:, None], axis=0)
                if G > 1:
                    grid_barrier(sem_ptr)  # every program has read the partials above
                    tl.store(tpart_ws + pid * N + cols, t, mask=cmask)
                    grid_barrier(sem_ptr)
                    t = _sum_columns(tpart_ws, G, N, cols, cmask, BLOCK_N, BLOCK_Q)
                norm_t, tsq, tsq_up, nonfinite = _on_chip_t_stats(t, cols, N)
            sigma, x = _on_chip_v(t, norm_t, tsq, tsq_up, nonfinite, cols, c0, c1, N, v_ptr, v_saved_ptr, eps,
                                  v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3, NCOL_V)
            if it < n_iters - 1:
                if G > 1:
                    grid_barrier(sem_ptr)  # the next products overwrite partials others may still read
            else:
                _store_rescaled(out_ptr, a, _store_sigma(sigma, sigma_ptr, sigma_buf_ptr, out_ptr, pid),
                                rows, cols, mask, o_row, o_c0, o_c1, o_c2, o_c3, D1, D2, D3, NCOL)
    else:
        # Eval: sigma = u^T A v with the stored u, v; keep copies of both for autograd (before
        # the barrier: they wait for nothing, so their round trips overlap the wait).
        s = tl.sum(a.to(acc_t) * x[None, :], axis=1)
        sigma = tl.sum(tl.load(u_ptr + rows, mask=rows < r1, other=0.0).to(acc_t) * s, axis=0)
        _copy_vector(u_ptr, u_saved_ptr, r0, r1, BLOCK_M)
        _copy_vector(v_ptr, v_saved_ptr, c0, c1, BLOCK_N)
        if G > 1:
            tl.store(part_s_ws + pid, sigma)
            grid_barrier(sem_ptr)
            sigma = _sum_partials(part_s_ws, G, BLOCK_P)
        _store_rescaled(out_ptr, a, _store_sigma(sigma, sigma_ptr, sigma_buf_ptr, out_ptr, pid),
                        rows, cols, mask, o_row, o_c0, o_c1, o_c2, o_c3, D1, D2, D3, NCOL)


@triton.jit
def _on_chip_phase_r(w_ptr, out_ptr, u_ptr, v_ptr, u_saved_ptr, v_saved_ptr, sigma_ptr, sigma_buf_ptr,
                     s_ws, tpart_ws, part_s_ws, flag_ws, pid, G, r0, r1, c0, c1, M, N, eps, is_last,
                     s_row, s_c0, s_c1, s_c2, s_c3, o_row, o_c0, o_c1, o_c2, o_c3, D1, D2, D3,
                     v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3,
                     NCOL: tl.constexpr, NCOL_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, FIXED: tl.constexpr):
    """Phase-by-phase mode of ``_read_on_chip`` (the interpreter's multi-program test).

    PHASE_R (not ``FIXED``): what the single launch does after its barrier, with s and A
    re-read instead of kept; if ``||t||^2`` is not finite it only sets the flag, and
    PHASE_FIX_T writes ``A^T u``. PHASE_FIX_R (``FIXED``): if flagged, t is that sum.
    Then v, sigma, and on the last iteration the rescale.
    """
    a, rows, cols, mask = _own_tile(w_ptr, r0, r1, N, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL,
                                    BLOCK_M, BLOCK_N)
    cmask = cols < N
    t = _sum_columns(tpart_ws, G, N, cols, cmask, BLOCK_N, BLOCK_Q)
    if FIXED:
        norm_t, tsq, tsq_up, nonfinite = _on_chip_t_stats(t, cols, N)
        go = tl.load(flag_ws) != 0
    else:
        s = tl.load(s_ws + rows, mask=rows < r1, other=0.0)
        u, du = _on_chip_u(s, _sum_partials(part_s_ws, G, BLOCK_P), rows, r1, u_ptr, u_saved_ptr, eps, M)
        t = t / du
        norm_t, tsq, tsq_up, nonfinite = _on_chip_t_stats(t, cols, N)
        overflow = _not_finite(tsq)
        tl.store(flag_ws, overflow.to(flag_ws.dtype.element_ty))  # the same value from every program
        go = overflow == 0
    if go:
        sigma = _on_chip_v(t, norm_t, tsq, tsq_up, nonfinite, cols, c0, c1, N, v_ptr, v_saved_ptr, eps,
                           v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3, NCOL_V)[0]
        if is_last:
            _store_rescaled(out_ptr, a, _store_sigma(sigma, sigma_ptr, sigma_buf_ptr, out_ptr, pid),
                            rows, cols, mask, o_row, o_c0, o_c1, o_c2, o_c3, D1, D2, D3, NCOL)


@triton.jit
def spectral_norm_fwd_kernel(
    w_ptr, out_ptr, u_ptr, v_ptr, saved_ptr, sigma_buf_ptr,
    ws_ptr, sem_ptr, eps: tl.float64,
    M, N, n_iters, is_last,
    s_row, s_c0, s_c1, s_c2, s_c3,
    o_row, o_c0, o_c1, o_c2, o_c3,
    D1, D2, D3,
    v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3,
    NCOL: tl.constexpr, NCOL_V: tl.constexpr, TRAINING: tl.constexpr, PHASE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, ROW_IN_TILE: tl.constexpr, ON_CHIP: tl.constexpr,
    KEEP_A: tl.constexpr, LOAD_STAGES: tl.constexpr, RESCALE_STAGES: tl.constexpr,
    LOAD_PREFETCH: tl.constexpr, RESCALE_PREFETCH: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """One read of the spectral-normalized weight (see the module docstring).

    ``sem_ptr``: the module's two semaphores; the forward's barriers use ``sem[0]``
    (the whole tensor is passed, not a view: under ``torch.compile`` a mutated view of a
    buffer costs extra slice/scatter copies).

    Outputs: ``out = W / sigma`` (weight's strides), ``u``/``v`` updated in
    place (training), ``saved = [v_saved (N) | u_saved (M) | sigma]``: the u, v that sigma
    used and sigma, what autograd keeps for the backward (one buffer: one allocation and
    one saved tensor on the host; v first, so the backward's loads of v are as aligned as
    the buffer), and the module's ``sigma_buf`` (for logging).
    ``is_last`` is read only in phase-by-phase mode (PHASE == PHASE_F).
    ``ROW_IN_TILE`` (``BLOCK_N >= N``): phase ST reads each tile of A once.
    ``ON_CHIP``: each program's rows are one tile, kept in registers (``_read_on_chip``).
    ``KEEP_A``: the same tile, kept in registers through the streaming phases (``_kept_tile``).
    ``LOAD_STAGES``, ``RESCALE_STAGES``: phase ST's loop over whole-row tiles of A and the
    rescale's loop, as ``tl.range(..., num_stages=...)``. Above 1, Triton's software
    pipeliner loads the next ``stages - 1`` tiles into shared memory (``cp.async``, sm_80+)
    while a tile is used, so a program keeps loads in flight across the reduction of each row
    instead of waiting a full DRAM latency per tile (the launcher keeps the tiles within the
    device's shared memory). The rescale's pipelined loads lose their ``evict_first`` hint
    (``cp.async`` takes none from Triton), hence a knob of its own. 1: no pipelining, the code
    of a plain ``range`` (the launcher's default where A fits in L2; 3 where it does not).
    ``LOAD_PREFETCH``, ``RESCALE_PREFETCH`` (0 or 1; with a stage count of 1): the same
    overlap by hand, in registers: each step issues the next tile's loads
    before it uses its own, so two tiles are live (the launcher allows it where they fit) and
    the rescale's loads keep ``evict_first``. The interpreter runs every value alike.
    ``ROW_ALIGN``: a power of two (up to 8) that divides ``N`` and both row strides, where
    Triton cannot see it (``_multiple_of``), so rows start on vector boundaries; 1: none.
    """
    tl.static_assert(not KEEP_A or (ROW_IN_TILE and not ON_CHIP),
                     "KEEP_A keeps a program's whole rows in one tile of the streaming read")
    N = _multiple_of(N, ROW_ALIGN)
    s_row = _multiple_of(s_row, ROW_ALIGN)
    o_row = _multiple_of(o_row, ROW_ALIGN)
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    r0 = (pid * M) // G
    r1 = ((pid + 1) * M) // G
    c0 = (pid * tl.cdiv(N, 16)) // G * 16
    c1 = tl.minimum(((pid + 1) * tl.cdiv(N, 16)) // G * 16, N)
    v_saved_ptr = saved_ptr
    u_saved_ptr = saved_ptr + N
    sigma_ptr = u_saved_ptr + M
    s_ws = ws_ptr
    t_ws = ws_ptr + _padded(M)
    tpart_ws = t_ws + _padded(N)
    part_s_ws = tpart_ws + G * N
    part_t_ws = part_s_ws + G
    flag_ws = part_t_ws + 3 * G  # after part_nf, part_ts; phase-by-phase mode: PHASE_FIX_T's decision
    # eps as PyTorch's clamp_min uses it: a scalar of the norm's dtype, the weight's (a double
    # goes to half and bfloat16 through float, as c10 converts it). 1e-12 is 0 in float16, so
    # an all-zero float16 weight gives NaN u and v (0/0), as PyTorch's SN does.
    if w_ptr.dtype.element_ty != tl.float64:
        eps = tl.cast(tl.cast(tl.cast(eps, tl.float32), w_ptr.dtype.element_ty), tl.float64)
    one = eps * 0 + 1.0  # a runtime scalar of eps' type; unused as dv when FROM_V
    # The overflow fallback's A^T u pass reads column blocks of at most 256. It is rarely
    # taken, but BLOCK_N-wide tiles there (ROW_IN_TILE: up to 16384 columns) raise the
    # register count of the whole kernel: 223 per thread against 178 for 512x4608 as
    # launched on sm_90 (no spills either way: tests/test_compile_sm90.py).
    FIX_BLOCK_N: tl.constexpr = BLOCK_N if BLOCK_N <= 256 else 256

    if ON_CHIP and PHASE == -1:
        _read_on_chip(w_ptr, out_ptr, u_ptr, v_ptr, u_saved_ptr, v_saved_ptr, sigma_ptr, sigma_buf_ptr,
                      tpart_ws, part_s_ws, sem_ptr, pid, G, r0, r1, c0, c1, M, N, n_iters, eps,
                      s_row, s_c0, s_c1, s_c2, s_c3, o_row, o_c0, o_c1, o_c2, o_c3, D1, D2, D3,
                      v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3, NCOL, NCOL_V, TRAINING, BLOCK_M, BLOCK_N, BLOCK_P, BLOCK_Q)
    else:
        a_kept = _kept_tile(w_ptr, r0, r1, N, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL, BLOCK_M, BLOCK_N,
                            KEEP_A and (PHASE == -1 or PHASE == 0 or PHASE == 2))
        if PHASE == -1 or PHASE == 0:
            _phase_matvecs(w_ptr, u_ptr, v_ptr, s_ws, t_ws, tpart_ws, part_s_ws, one, a_kept, pid, r0, r1, N,
                           s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3,
                           True, TRAINING, NCOL, NCOL_V, BLOCK_M, BLOCK_N, ROW_IN_TILE, LOAD_STAGES, LOAD_PREFETCH,
                           KEEP_A)
        if TRAINING:
            if PHASE == -1:
                for it in range(n_iters):
                    grid_barrier(sem_ptr)
                    _phase_reduce(u_ptr, u_saved_ptr, s_ws, tpart_ws, t_ws, part_s_ws, part_t_ws, eps,
                                  pid, G, r0, r1, c0, c1, M, N, BLOCK_R, BLOCK_C, BLOCK_P, BLOCK_Q)
                    grid_barrier(sem_ptr)
                    t_first = _load_block(t_ws, c0, c1, BLOCK_C)
                    norm_t, tsq, tsq_up, nonfinite = _t_stats(part_t_ws, t_ws, G, N, BLOCK_P)
                    # Every program sees the same partials in the same order, so all take this
                    # branch or none: its barriers cannot deadlock.
                    if _not_finite(tsq):
                        _transposed_partial(w_ptr, u_ptr, tpart_ws, pid, r0, r1, N, s_row, s_c0, s_c1, s_c2,
                                            s_c3, D1, D2, D3, NCOL, BLOCK_M, FIX_BLOCK_N)
                        grid_barrier(sem_ptr)
                        sums_first = _first_column_sums(tpart_ws, G, N, c0, c1, BLOCK_C, BLOCK_Q)
                        _combine_columns(sums_first, tpart_ws, t_ws, part_t_ws, one, pid, G, c0, c1, N, BLOCK_C,
                                         BLOCK_Q)
                        grid_barrier(sem_ptr)
                        t_first = _load_block(t_ws, c0, c1, BLOCK_C)  # (t was just rewritten)
                        norm_t, tsq, tsq_up, nonfinite = _t_stats(part_t_ws, t_ws, G, N, BLOCK_P)
                    sigma, dv = _phase_finish_iteration(t_first, t_ws, v_ptr, v_saved_ptr, norm_t, tsq, tsq_up,
                                                        nonfinite, eps, c0, c1, N, v_c0, v_c1, v_c2, v_c3,
                                                        VD1, VD2, VD3, BLOCK_C, NCOL_V)
                    if it < n_iters - 1:
                        _phase_matvecs(w_ptr, u_ptr, v_ptr, s_ws, t_ws, tpart_ws, part_s_ws, dv, a_kept, pid, r0, r1, N,
                                       s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, v_c0, v_c1, v_c2, v_c3,
                                       VD1, VD2, VD3, False, TRAINING, NCOL, NCOL_V, BLOCK_M, BLOCK_N, ROW_IN_TILE, LOAD_STAGES,
                                       LOAD_PREFETCH, KEEP_A)
                    else:
                        _phase_rescale(w_ptr, out_ptr, sigma, sigma_ptr, sigma_buf_ptr, a_kept, pid, r0, r1, N,
                                       s_row, s_c0, s_c1, s_c2, s_c3, o_row, o_c0, o_c1, o_c2, o_c3,
                                       D1, D2, D3, NCOL, BLOCK_M, BLOCK_N, RESCALE_STAGES, RESCALE_PREFETCH, KEEP_A)
            elif ON_CHIP and (PHASE == 1 or PHASE == 4):
                # PHASE_R, or PHASE_FIX_R after a fallback: v, sigma (and the rescale)
                _on_chip_phase_r(w_ptr, out_ptr, u_ptr, v_ptr, u_saved_ptr, v_saved_ptr, sigma_ptr,
                                 sigma_buf_ptr, s_ws, tpart_ws, part_s_ws, flag_ws, pid, G, r0, r1, c0, c1,
                                 M, N, eps, is_last, s_row, s_c0, s_c1, s_c2, s_c3,
                                 o_row, o_c0, o_c1, o_c2, o_c3, D1, D2, D3, v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3,
                                 NCOL, NCOL_V, BLOCK_M, BLOCK_N, BLOCK_P, BLOCK_Q, PHASE == 4)
            elif PHASE == 1:
                _phase_reduce(u_ptr, u_saved_ptr, s_ws, tpart_ws, t_ws, part_s_ws, part_t_ws, eps,
                              pid, G, r0, r1, c0, c1, M, N, BLOCK_R, BLOCK_C, BLOCK_P, BLOCK_Q)
            elif PHASE == 3:
                if ON_CHIP:  # PHASE_R made the decision
                    overflow = tl.load(flag_ws) != 0
                else:
                    overflow = _not_finite(_sum_partials(part_t_ws, G, BLOCK_P))
                    tl.store(flag_ws, overflow.to(flag_ws.dtype.element_ty))  # the same from every program
                if overflow:
                    _transposed_partial(w_ptr, u_ptr, tpart_ws, pid, r0, r1, N, s_row, s_c0, s_c1, s_c2, s_c3,
                                        D1, D2, D3, NCOL, BLOCK_M, FIX_BLOCK_N)
            elif PHASE == 4:
                if tl.load(flag_ws) != 0:
                    sums_first = _first_column_sums(tpart_ws, G, N, c0, c1, BLOCK_C, BLOCK_Q)
                    _combine_columns(sums_first, tpart_ws, t_ws, part_t_ws, one, pid, G, c0, c1, N, BLOCK_C, BLOCK_Q)
            elif PHASE == 2:
                t_first = _load_block(t_ws, c0, c1, BLOCK_C)
                norm_t, tsq, tsq_up, nonfinite = _t_stats(part_t_ws, t_ws, G, N, BLOCK_P)
                sigma, dv = _phase_finish_iteration(t_first, t_ws, v_ptr, v_saved_ptr, norm_t, tsq, tsq_up,
                                                    nonfinite, eps, c0, c1, N, v_c0, v_c1, v_c2, v_c3,
                                                    VD1, VD2, VD3, BLOCK_C, NCOL_V)
                if is_last:
                    _phase_rescale(w_ptr, out_ptr, sigma, sigma_ptr, sigma_buf_ptr, a_kept, pid, r0, r1, N,
                                   s_row, s_c0, s_c1, s_c2, s_c3, o_row, o_c0, o_c1, o_c2, o_c3,
                                   D1, D2, D3, NCOL, BLOCK_M, BLOCK_N, RESCALE_STAGES, RESCALE_PREFETCH, KEEP_A)
                else:
                    _phase_matvecs(w_ptr, u_ptr, v_ptr, s_ws, t_ws, tpart_ws, part_s_ws, dv, a_kept, pid, r0, r1, N,
                                   s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, v_c0, v_c1, v_c2, v_c3,
                                   VD1, VD2, VD3, False, TRAINING, NCOL, NCOL_V, BLOCK_M, BLOCK_N, ROW_IN_TILE, LOAD_STAGES,
                                   LOAD_PREFETCH, KEEP_A)
        else:
            # Eval: sigma = u^T A v with the stored u, v; keep copies of both for autograd (before
            # the barrier: they wait for nothing, so their round trips overlap the wait).
            if PHASE == -1 or PHASE == 2:
                _copy_vector(u_ptr, u_saved_ptr, r0, r1, BLOCK_R)
                _copy_vector(v_ptr, v_saved_ptr, c0, c1, BLOCK_C)
            if PHASE == -1:
                grid_barrier(sem_ptr)
            if PHASE == -1 or PHASE == 2:
                sigma = _sum_partials(part_s_ws, G, BLOCK_P)
                _phase_rescale(w_ptr, out_ptr, sigma, sigma_ptr, sigma_buf_ptr, a_kept, pid, r0, r1, N,
                               s_row, s_c0, s_c1, s_c2, s_c3, o_row, o_c0, o_c1, o_c2, o_c3,
                               D1, D2, D3, NCOL, BLOCK_M, BLOCK_N, RESCALE_STAGES, RESCALE_PREFETCH, KEEP_A)


@triton.jit
def _grad_tile(g, inner, u, v, sigma):
    """``dW = (G - <G, W_sn> u v^T) / sigma`` on a tile (``inner = <G, W_sn>``)."""
    return (g - inner * u[:, None] * v[None, :]) / sigma


@triton.jit
def _grad_rows(saved_ptr, j, r0, r1, N, sigma, BLOCK_M: tl.constexpr):
    """The GRAD pass's ``j``-th row block, counted from the last: ``rows``, their mask and their
    ``u`` (``saved = [v | u | sigma]``) in ``sigma``'s accumulation dtype."""
    rows = r1 - (j + 1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows >= r0
    return rows, rmask, tl.load(saved_ptr + (N + rows), mask=rmask, other=0.0).to(sigma.dtype)


@triton.jit
def _grad_block(g_ptr, dw_ptr, saved_ptr, rows, rmask, u, cb, n_cblocks, N, inner, sigma,
                g_row, g_c0, g_c1, g_c2, g_c3, d_row, d_c0, d_c1, d_c2, d_c3, D1, D2, D3,
                v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3, NCOL: tl.constexpr, NCOL_V: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """The GRAD pass on one tile: rows ``rows`` (own rows' ``u``), the ``cb``-th column block
    counted from the last (the reverse of the dot pass). dW leaves L2 first (``evict_first``)."""
    acc_t = u.dtype
    cols = (n_cblocks - 1 - cb) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    v = tl.load(saved_ptr + _column_offsets(cols, v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3, NCOL_V), mask=cmask,
                other=0.0).to(acc_t)
    g = tl.load(g_ptr + _offsets(rows, cols, g_row, g_c0, g_c1, g_c2, g_c3, D1, D2, D3, NCOL),
                mask=mask, other=0.0).to(acc_t)
    dw = _grad_tile(g, inner, u, v, sigma)
    tl.store(dw_ptr + _offsets(rows, cols, d_row, d_c0, d_c1, d_c2, d_c3, D1, D2, D3, NCOL),
             dw.to(dw_ptr.dtype.element_ty), mask=mask, eviction_policy="evict_first")


@triton.jit
def spectral_norm_bwd_kernel(
    g_ptr, w_ptr, dw_ptr, saved_ptr, ws_ptr, sem_ptr,
    M, N,
    g_row, g_c0, g_c1, g_c2, g_c3,
    s_row, s_c0, s_c1, s_c2, s_c3,
    d_row, d_c0, d_c1, d_c2, d_c3,
    D1, D2, D3,
    v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3,
    NCOL: tl.constexpr, NCOL_V: tl.constexpr, PHASE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, ON_CHIP: tl.constexpr,
    GRAD_STAGES: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """``dW = (G - <G, W_sn> u v^T) / sigma`` with u, v, sigma the forward's (constants:
    ``saved = [v (N) | u (M) | sigma]``, as the forward kernel wrote it).

    ``<G, W_sn> = <G, W> / sigma``: one global reduction (partials in
    ``ws[0:G]``, fixed-order sum after the barrier), then one elementwise
    pass, last-to-first so the part of G still in L2 is read first. W is read
    once and dW written once, both ``evict_first`` so they leave L2 to G.
    Floor: read G and W, write dW; this kernel also re-reads G (from L2 as far as it holds).
    ``ON_CHIP`` (a program's rows in one tile): the single launch keeps its tile of G, u and v
    in registers across the barrier, so nothing is re-read; one program has no barrier and
    touches no workspace.
    ``GRAD_STAGES``: 1, the elementwise pass as two nested loops (row blocks, column blocks);
    above 1, one flat loop over the same tiles in the same order as ``tl.range(...,
    num_stages=GRAD_STAGES)``, whose loads of G Triton's pipeliner issues ``GRAD_STAGES - 1``
    tiles ahead into shared memory (a nested loop's pipeline would drain at every row block).
    The interpreter runs both alike.
    ``ROW_ALIGN``: as the forward's, over ``N`` and the three row strides.
    """
    N = _multiple_of(N, ROW_ALIGN)
    g_row = _multiple_of(g_row, ROW_ALIGN)
    s_row = _multiple_of(s_row, ROW_ALIGN)
    d_row = _multiple_of(d_row, ROW_ALIGN)
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    r0 = (pid * M) // G
    r1 = ((pid + 1) * M) // G
    # saved = [v | u | sigma]: u and sigma are addressed as saved_ptr + (offset), not through a
    # pointer made once (saved_ptr + N), which would hold two more registers across the loops
    # (a 4-byte spill in the streaming backward, ptxas sm_90, 512x4608).
    acc_t = ws_ptr.dtype.element_ty
    n_cblocks = tl.cdiv(N, BLOCK_N)
    if ON_CHIP and PHASE == -1:
        rows = r0 + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        rmask = rows < r1
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + _offsets(rows, cols, g_row, g_c0, g_c1, g_c2, g_c3, D1, D2, D3, NCOL),
                    mask=mask, other=0.0).to(acc_t)
        w = tl.load(w_ptr + _offsets(rows, cols, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL),
                    mask=mask, other=0.0).to(acc_t)
        u = tl.load(saved_ptr + (N + rows), mask=rmask, other=0.0).to(acc_t)
        v = tl.load(saved_ptr + _column_offsets(cols, v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3, NCOL_V), mask=cmask,
                    other=0.0).to(acc_t)
        sigma = tl.load(saved_ptr + (N + M)).to(acc_t)
        inner = tl.sum(tl.sum(g * w, axis=1), axis=0)  # the same sums as the streaming DOT phase
        if G > 1:
            tl.store(ws_ptr + pid, inner)
            grid_barrier(sem_ptr + 1)
            inner = _sum_partials(ws_ptr, G, BLOCK_P)
        dw = _grad_tile(g, inner / sigma, u, v, sigma)
        tl.store(dw_ptr + _offsets(rows, cols, d_row, d_c0, d_c1, d_c2, d_c3, D1, D2, D3, NCOL),
                 dw.to(dw_ptr.dtype.element_ty), mask=mask)
    if (PHASE == -1 and not ON_CHIP) or PHASE == 0:
        part = tl.zeros([BLOCK_M, BLOCK_N], acc_t)
        for r in range(r0, r1, BLOCK_M):
            rows = r + tl.arange(0, BLOCK_M)
            rmask = rows < r1
            for c in range(0, N, BLOCK_N):
                cols = c + tl.arange(0, BLOCK_N)
                mask = rmask[:, None] & (cols < N)[None, :]
                g = tl.load(g_ptr + _offsets(rows, cols, g_row, g_c0, g_c1, g_c2, g_c3, D1, D2, D3, NCOL),
                            mask=mask, other=0.0).to(acc_t)
                w = tl.load(w_ptr + _offsets(rows, cols, s_row, s_c0, s_c1, s_c2, s_c3, D1, D2, D3, NCOL),
                            mask=mask, other=0.0, eviction_policy="evict_first").to(acc_t)  # not re-read
                part += g * w
        tl.store(ws_ptr + pid, tl.sum(tl.sum(part, axis=1), axis=0))
    if PHASE == -1 and not ON_CHIP:
        grid_barrier(sem_ptr + 1)  # the backward's semaphore: sem[1]
    if (PHASE == -1 and not ON_CHIP) or PHASE == 1:
        sigma = tl.load(saved_ptr + (N + M)).to(acc_t)
        inner = _sum_partials(ws_ptr, G, BLOCK_P) / sigma
        n_rblocks = tl.cdiv(r1 - r0, BLOCK_M)
        # Rows last-to-first, columns last-to-first: the reverse of the dot pass.
        if GRAD_STAGES > 1:
            for k in tl.range(n_rblocks * n_cblocks, num_stages=GRAD_STAGES):
                j = k // n_cblocks
                rows, rmask, u = _grad_rows(saved_ptr, j, r0, r1, N, sigma, BLOCK_M)
                _grad_block(g_ptr, dw_ptr, saved_ptr, rows, rmask, u, k - j * n_cblocks, n_cblocks, N, inner,
                            sigma, g_row, g_c0, g_c1, g_c2, g_c3, d_row, d_c0, d_c1, d_c2, d_c3, D1, D2, D3,
                            v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3, NCOL, NCOL_V, BLOCK_N)
        else:
            for j in range(n_rblocks):
                rows, rmask, u = _grad_rows(saved_ptr, j, r0, r1, N, sigma, BLOCK_M)
                for i in range(n_cblocks):
                    _grad_block(g_ptr, dw_ptr, saved_ptr, rows, rmask, u, i, n_cblocks, N, inner, sigma,
                                g_row, g_c0, g_c1, g_c2, g_c3, d_row, d_c0, d_c1, d_c2, d_c3, D1, D2, D3,
                                v_c0, v_c1, v_c2, v_c3, VD1, VD2, VD3, NCOL, NCOL_V, BLOCK_N)
