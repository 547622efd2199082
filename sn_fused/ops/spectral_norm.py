r"""The fused spectral-norm op: launchers, ``torch.library`` registration, autograd.

Layers, top to bottom::

    spectral_norm_fused(...)                 # what sn_fused.parametrizations calls
      -> _SpectralNormFunction (autograd)
       forward:  torch.ops.sn_fused.spectral_norm_forward  (torch.library.triton_op, one launch)
       backward: torch.ops.sn_fused.spectral_norm_backward (torch.library.triton_op, one launch)
           -> kernels.spectral_norm_fwd_kernel / spectral_norm_bwd_kernel

Eager reads of a layer skip the op layer (and, where ``sn_fused._C`` is built, the Python
``autograd.Function`` too: ``_spectral_norm_checked``, ``csrc/spectral_norm_read.cpp``) and call
the same launchers.

Memory plan per call: the output (``W_sn``, same strides as ``W``), the
``saved = [v | u | sigma]`` buffer that autograd keeps (the u, v that sigma used --
PyTorch clones u and v too -- and sigma, in one allocation), and an uninitialised
workspace (fp32, fp64 for fp64 weights) of ``M16 + N16 + G*(N + 4) + 1`` elements
(``X16``: X rounded up to 16) whose elements the kernel writes before it reads them -- none
for one ON_CHIP program (``_workspace``).
The grid-barrier semaphore is the caller's (one per module, see ``_SpectralNorm``), so two
modules never share one, and the barrier leaves it in a valid state
(0 or 0x80000000): no memset launch, CUDA-graph replay safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import operator
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd import forward_ad
from torch.fx.experimental.proxy_tensor import get_proxy_mode
from torch.library import triton_op, wrap_triton
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .. import reference
from . import kernels

_CPP_INTERFACE_VERSION = 6  # csrc/spectral_norm_read.cpp's INTERFACE_VERSION, which this file calls
try:  # the eager read in C++ (csrc/spectral_norm_read.cpp), built where the build imports torch: setup.py
    # (import_module: ``from .. import _C`` in a package still importing raises a plain ImportError)
    _cpp = importlib.import_module("sn_fused._C")
    if getattr(_cpp, "INTERFACE_VERSION", None) != _CPP_INTERFACE_VERSION:
        raise ImportError(f"built from another version of csrc/ (interface "
                          f"{getattr(_cpp, 'INTERFACE_VERSION', None)}, expected {_CPP_INTERFACE_VERSION})")
except ModuleNotFoundError:  # not built: eager reads go through the Python Function
    _cpp = None
except ImportError as error:  # built, but not for this torch (a C++ extension matches one build) or source
    warnings.warn(f"sn_fused: the compiled read sn_fused._C does not load ({error}); eager reads use the "
                  f"Python path (rebuild it: python -m sn_fused.build_cpp)")
    _cpp = None

__all__ = [
    "INTERPRET",
    "check_inputs",
    "check_semaphore",
    "check_sigma_buffer",
    "fused_supported",
    "new_semaphore",
    "spectral_norm_fused",
    "spectral_norm_forward_fused",
    "spectral_norm_backward_fused",
    "split_saved",
]

#: True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``
#: was set before Triton was imported). Then CPU tensors go through the kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Whether eager reads of layers go through the C++ read (``sn_fused._C``, where it is built;
#: ``SN_FUSED_CPP=0``: never). Same kernels, same numbers; less host time per read.
CPP_READS = _cpp is not None and os.environ.get("SN_FUSED_CPP", "1") != "0"
# Whether the interpreter's bfloat16 conversions are exact. Triton 3.6's are not (float32 to
# bfloat16 truncates where the GPU rounds to nearest even; bfloat16 subnormals widen to 0), so
# bfloat16 CPU weights take the reference path; tests/interpreter_bf16.py makes them exact for
# CI, which then runs the kernels' bfloat16 paths, and sets this.
_INTERPRETER_BF16 = False

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Weights of other types are tested for being wrapper subclasses (TwoTensor, DTensor, ...): a
# kernel cannot read them (their data lives in inner tensors), while the reference's torch ops
# dispatch through them as PyTorch's own spectral norm does. FakeTensor and FunctionalTensor
# (tracing) are not wrapper subclasses in this sense: they take the op.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_MAX_COL_DIMS = 4
_FLOAT_MAX = sys.float_info.max
_MAX_GRID = 1024  # programs; far above any GPU's co-resident count at one program per SM
# Launch tuning. Module globals so that bench/kernel_sweep.py can sweep them
# (call _clear_plans() after changing one); the defaults come from those sweeps.
# Below this many elements per program a program would mostly wait on barriers:
# small weights use fewer programs (cheaper barriers, fewer partials).
_MIN_ELEMENTS_PER_PROGRAM = int(os.environ.get("SN_FUSED_MIN_ELEMENTS_PER_PROGRAM", 8192))
_TILE_ELEMENTS = int(os.environ.get("SN_FUSED_TILE_ELEMENTS", 16384))  # of A per program per loop step
_MAX_ROW_IN_TILE = int(os.environ.get("SN_FUSED_MAX_ROW_IN_TILE", 16384))  # widest row read in one tile
# Streaming tiles (both kernels) of a weight whose tiles are loaded element by element
# (_addressed_per_element: each element carries its own 64-bit address) hold at most this many,
# 32 elements per thread at 8 warps, and the forward reads rows wider than this in column blocks.
# With the default tiles a 3x3 ConvTranspose weight (dim=1) spilled 348-680 bytes per read and
# 12 KB in 768x768's backward; none at this size (ptxas sm_90a, bench/NOTES.md v20). Not
# measured on a GPU.
_PER_ELEMENT_TILE_ELEMENTS = int(os.environ.get("SN_FUSED_PER_ELEMENT_TILE_ELEMENTS", 8192))
# Phase R sums the G programs' partials of its own columns in [BLOCK_Q, BLOCK_C] tiles of about
# this many elements, one dependent L2 round trip per tile (ON_CHIP: [BLOCK_Q, BLOCK_N]). Phases
# launched alone on an H200 (bench/NOTES.md v17), at 8192: phase R 1.8 us on 4096x4096 (one tile),
# 3.3 on 768x6912 (two), 6.1 on 1536x13824 (three), a launch's ~1.8 us taken off each. 16384 against
# 8192, forward reads on an H200 (v24): 512x4608 12.2 against 12.9-13.0 us, 768x6912 17.8 against
# 18.4-18.7, 1536x13824 72.5 against 73.6, 128x1152 6.4 against 6.3-6.6 (32768: 7.3); the other
# kernel-table shapes launch the same.
_PARTIALS_TILE_ELEMENTS = int(os.environ.get("SN_FUSED_PARTIALS_TILE_ELEMENTS", 16384))
# The backward streams G and W tile by tile (no row needs to be whole): tiles of this many
# elements per operand, at most _BWD_BLOCK_N columns wide. 32768/4096 was the fastest
# choice on the large shapes in both H100 backward sweeps (bench/NOTES.md, v4 and v5).
_BWD_TILE_ELEMENTS = int(os.environ.get("SN_FUSED_BWD_TILE_ELEMENTS", 32768))
_BWD_BLOCK_N = int(os.environ.get("SN_FUSED_BWD_BLOCK_N", 4096))
# The backward keeps a program's rows on chip (ON_CHIP) also where they are wider than
# _BWD_BLOCK_N, up to this (padded) width, if they fit one tile: 1x8192 (one program) then loads
# G and W once and stores dW, instead of two dot steps and two GRAD steps one after another
# (each waiting on its loads; bwd 5.4 us on an H200 against a goal of 4.0). The forward's
# ON_CHIP read of the same weight took 4.6 us against 6.7 streaming (H100, bench/NOTES.md v10).
# 0: only blocks up to _BWD_BLOCK_N wide (before session 17). Not yet measured on a GPU.
_BWD_ON_CHIP_MAX_ROW = int(os.environ.get("SN_FUSED_BWD_ON_CHIP_MAX_ROW", 8192))
# The backward's elementwise (GRAD) pass as one flat loop over its tiles with
# tl.range(..., num_stages=_GRAD_STAGES) (kernels.py GRAD_STAGES): above 1, G's tiles are loaded
# into shared memory that many minus one ahead. Its phase alone ran at 83-87 % of a copy's rate
# on an H200 (bench/NOTES.md v17). 1 (off: the nested loops) until a GPU run measures it; the
# launcher lowers a count whose tiles would not fit (32768-element fp32 tiles: 2 at most;
# ptxas sm_90a: 4 bytes of spills there, none with 16384-element tiles at 3).
_GRAD_STAGES = int(os.environ.get("SN_FUSED_GRAD_STAGES", 1))
# ON_CHIP launches (kernels.py: a program's rows kept in registers; the forward with one
# barrier per iteration) where each program's rows fit in one tile; the forward also needs the
# G x N table of partial sums, which every program then reads whole, to have at most
# _ON_CHIP_MAX_PARTIALS elements, and rows at most _ON_CHIP_MAX_ROW wide (padded to a power
# of two). SN_FUSED_ON_CHIP=0: never, nor KEEP_A below (the streaming kernels only).
_ON_CHIP = os.environ.get("SN_FUSED_ON_CHIP", "1") != "0"
_ON_CHIP_MAX_PARTIALS = int(os.environ.get("SN_FUSED_ON_CHIP_MAX_PARTIALS", 32768))
_ON_CHIP_MAX_ROW = int(os.environ.get("SN_FUSED_ON_CHIP_MAX_ROW", 8192))  # widest (padded) row on chip
# Where the rows fit but the table does not (G x N above _ON_CHIP_MAX_PARTIALS: 1000x1536,
# 256x8192, 512x2304, ... at 132 programs), the forward's streaming read still loads a
# program's tile once and keeps it in registers (KEEP_A in kernels.py): its rescale and the
# products of later iterations read no A, so A is read once per read instead of n + 1 times.
# Its outputs are bit for bit the streaming read's (the kernels' one tile per program is the
# streaming loop's only step; at the default _KEEP_A_MAX_ELEMENTS). 0: the streaming read there (what ran
# before session 25); _ON_CHIP_MAX_PARTIALS=0 gives KEEP_A also to ON_CHIP's weights (for the
# same-card A/B of the two combines). Not yet measured on a GPU.
_KEEP_A = int(os.environ.get("SN_FUSED_KEEP_A", 1))
# The largest tile KEEP_A keeps, in elements; 0: the streaming tile's size (_TILE_ELEMENTS). At
# 32768 it also takes weights whose rows take two streaming tiles: 512x4608 (4 rows of 8192 padded),
# 4096x1024, 1536x1536, 768x3456 at 132 programs (ptxas sm_90a, 512x4608 float32 at 8 warps: 255
# registers, no spills; at 16 warps 128 and ~60 bytes of spills; float64 tiles that large spill).
# Such tiles sum in another order than the streaming read's, so the bits move (by rounding).
# Weights whose tiles load element by element (_addressed_per_element) keep at most their
# streaming tile. 0 (off) until a GPU run measures it (`kernel_sweep --sweep-knobs _KEEP_A_MAX_ELEMENTS`).
_KEEP_A_MAX_ELEMENTS = int(os.environ.get("SN_FUSED_KEEP_A_MAX_ELEMENTS", 0))
_PROGRAMS_PER_SM = int(os.environ.get("SN_FUSED_PROGRAMS_PER_SM", 1))
# Programs a CPU launch (the interpreter) is planned for by default: 1, since the interpreter runs
# programs one after another and a grid barrier needs them all at once. More only to plan as a
# GPU would (tests/test_gpu.py's dry run: 132, an H100/H200); those launches run phase by phase.
_INTERPRETER_GRID_CAP = int(os.environ.get("SN_FUSED_INTERPRETER_GRID_CAP", 1))
_NUM_WARPS = int(os.environ.get("SN_FUSED_NUM_WARPS", 0))  # 0: by tile size
_NUM_STAGES = int(os.environ.get("SN_FUSED_NUM_STAGES", 0))  # 0: Triton's default
# Registers a thread may use (Triton's ``maxnreg``; 0: ptxas' own choice). Without a limit ptxas
# keeps room for a second CTA per SM, which these one-program-per-SM launches never use, and
# spills a few bytes to stay within it (bfloat16 read of 4096x4096: 128 registers and 32 bytes of
# stack; at 255: 165 and none; ptxas sm_90a, bench/NOTES.md v22). Capped where _PROGRAMS_PER_SM
# programs of the launch's warps would not fit an SM's 64K registers. Eager launches only: under
# torch.compile, wrap_triton does not take it as a launch option. 0 (off) until a GPU run
# measures it (`kernel_sweep --sweep-knobs _MAXNREG=255`).
_MAXNREG = int(os.environ.get("SN_FUSED_MAXNREG", 0))
# Tell the kernels the alignment of rows whose stride is a multiple of 2, 4 or 8 elements but not
# of 16 (_row_align; ptxas sm_90a: 16-byte loads of float32 rows of 148 and 20, 1536x148's on-chip
# backward from 68 bytes of spills to none, bench/NOTES.md v23). 0: not at all (every element of
# such rows its own load, and the backward's smaller tiles for them), for the same-card A/B
# (`kernel_sweep --sweep-knobs _ROW_ALIGN=0`); any other value is 1. Not yet measured on a GPU.
_ROW_ALIGN = int(os.environ.get("SN_FUSED_ROW_ALIGN", 1))
# The forward's streaming loops over A as tl.range(..., num_stages=...) (kernels.py,
# LOAD_STAGES for phase ST, RESCALE_STAGES for the rescale): above 1 the next tiles are loaded
# into shared memory while one is used. 0 (the default): _STAGES_BEYOND_L2 where A does not fit
# in the device's L2, else 1. Measured on an H200 (bench/NOTES.md v17, three runs, forward
# graph us, float32, L2 not flushed between reads): both at 3 take 1536x13824 from 80.0 to
# 75.1 and 4096x4096 from 57.3 to 54.9 (A 85 MB and 67 MB, both loops' loads from DRAM), leave
# 768x6912 (21 MB) at 19.9 and make 512x4608 (9 MB) slower, 14.0 -> 14.8 (there A came from
# L2 between reads; the pipeline's shared-memory round trip only adds). Each alone does less,
# or worse: phase ST's at 3, 78.2 on 1536x13824; the rescale's, 82.9. The threshold is L2's
# size because it falls between 21 and 67 MB: weights of 25-50 MB, 16-bit weights and a
# model whose other layers evict A between reads are not measured. The launcher lowers a value
# whose tiles would not fit the device's shared memory (_pipeline_stages). Sweep: `python -m
# bench.kernel_sweep --sweep --sweep-knobs _LOAD_STAGES+_RESCALE_STAGES` (1/1 is the unpipelined
# loop everywhere).
_LOAD_STAGES = int(os.environ.get("SN_FUSED_LOAD_STAGES", 0))
_RESCALE_STAGES = int(os.environ.get("SN_FUSED_RESCALE_STAGES", 0))
_STAGES_BEYOND_L2 = 3
# The same overlap by hand (LOAD_PREFETCH, RESCALE_PREFETCH in kernels.py): each step issues the
# next tile's loads before it uses its own, two tiles in registers instead of shared memory; the
# rescale's loads keep evict_first, which its pipelined ones lose (bench/NOTES.md v16). 1 turns
# one on where its two tiles fit in registers (_prefetch), with that loop's stage count 1; 0
# (off) until a GPU run measures them.
_LOAD_PREFETCH = int(os.environ.get("SN_FUSED_LOAD_PREFETCH", 0))
_RESCALE_PREFETCH = int(os.environ.get("SN_FUSED_RESCALE_PREFETCH", 0))


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _MatrixLayout:
    """How ``A = W.permute(dim, *others).flatten(1)`` is addressed in each tensor.

    The kernels walk A's columns in an order of their own: column ``p`` of the walk is
    the row-major index over the column dims taken in ``order`` (outermost first), which
    is either A's (the logical order) or the weight's memory order, where that merges
    into fewer strides (a channels-last conv weight: its rows are one contiguous run,
    ``(kh, kw, in)``, against three strides in A's ``(in, kh, kw)``). Rows are unchanged.
    Every tile of the weight, its output, the gradient and dW is addressed in the walk's
    order, as is the workspace; only the vector ``v`` (a buffer in A's column order)
    maps a walk position to its own index: ``v_sizes``, ``v_strides``.

    ``sizes`` are the walk's column dims after merging; ``strides[k]`` is
    ``(row_stride, c0, c1, c2, c3)`` of tensor k (unused dims have stride 0). ``v_sizes``
    and ``v_strides`` (``(c0, c1, c2, c3)``) are the same for ``v``: ``(N,)`` and
    ``(1, 0, 0, 0)`` when the walk is A's order.
    """

    M: int
    N: int
    sizes: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    v_sizes: tuple[int, ...]
    v_strides: tuple[int, ...]

    @property
    def inner_sizes(self) -> tuple[int, int, int]:
        """``D1, D2, D3``: sizes of column dims 1..3 (1 where absent)."""
        return _inner_sizes(self.sizes)

    @property
    def v_inner_sizes(self) -> tuple[int, int, int]:
        """``VD1, VD2, VD3``: ``inner_sizes`` of ``v``."""
        return _inner_sizes(self.v_sizes)


def _inner_sizes(sizes: tuple[int, ...]) -> tuple[int, int, int]:
    inner = list(sizes[1:]) + [1] * (_MAX_COL_DIMS - len(sizes))
    return inner[0], inner[1], inner[2]


def _merged(sizes: list[int], strides: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Dims merged where they are contiguous (``s[k-1] == s[k] * size[k]``) in every stride list."""
    sizes, strides = list(sizes), [list(s) for s in strides]
    for k in range(len(sizes) - 1, 0, -1):
        if all(s[k - 1] == s[k] * sizes[k] for s in strides):
            sizes[k - 1] *= sizes[k]
            del sizes[k]
            for s in strides:
                s[k - 1] = s[k]
                del s[k]
    return sizes, strides


def _matrix_layout(dim: int, *tensors: torch.Tensor, order_by: int = 0) -> _MatrixLayout | None:
    """The layout of A in ``tensors`` (the same shape), or None if more than 4 strides remain.

    The walk (``_MatrixLayout``) follows ``tensors[order_by]``'s memory order where that
    merges the columns into fewer strides than A's own order does, or into as many with an
    innermost stride of 1 where A's is not; A's order otherwise (then v is addressed as it is).
    """
    shape = tensors[0].shape
    others = [d for d in range(len(shape)) if d != dim]
    # Size-1 dims carry no offset; dropping them lets more dims merge.
    cols = [d for d in others if shape[d] != 1] or others[:1]
    v_stride, step = {}, 1  # v is row-major over A's columns
    for d in reversed(cols):
        v_stride[d] = step
        step *= shape[d]
    # (a stable sort: dims of equal stride, e.g. expanded ones, keep A's order)
    memory_order = sorted(cols, key=lambda d: -tensors[order_by].stride(d))
    best = None
    for order in [cols] + ([memory_order] if memory_order != cols else []):
        sizes, strides = _merged([shape[d] for d in order], [[t.stride(d) for d in order] for t in tensors])
        v_sizes, (v_strides,) = _merged([shape[d] for d in order], [[v_stride[d] for d in order]])
        if len(sizes) > _MAX_COL_DIMS or len(v_sizes) > _MAX_COL_DIMS:
            continue
        rank = (len(sizes), strides[order_by][-1] != 1)
        if best is None or rank < best[0]:
            best = (rank, sizes, strides, v_sizes, v_strides)
    if best is None:
        return None
    _, sizes, strides, v_sizes, v_strides = best
    pad = [0] * (_MAX_COL_DIMS - len(sizes))
    return _MatrixLayout(
        M=shape[dim],
        N=tensors[0].numel() // max(shape[dim], 1),
        sizes=tuple(sizes),
        strides=tuple(tuple([t.stride(dim)] + s + pad) for t, s in zip(tensors, strides)),
        v_sizes=tuple(v_sizes),
        v_strides=tuple(v_strides + [0] * (_MAX_COL_DIMS - len(v_sizes))),
    )


def _addressed_per_element(layout: _MatrixLayout) -> bool:
    """Whether some tensor's tiles are loaded element by element: its innermost column stride
    is not 1, or the innermost of several column dims is not a multiple of 16 long (the
    compiler sees contiguous runs only as far as Triton's divisibility hints reach). Each
    element then takes its own 64-bit address, where contiguous tiles take one per 16 bytes."""
    k = len(layout.sizes)
    return any(s[k] != 1 for s in layout.strides) or (k > 1 and layout.sizes[-1] % 16 != 0)


def _row_align(layout: _MatrixLayout) -> int:
    """The kernels' ``ROW_ALIGN``: the largest power of two below 16 that divides ``N`` and every
    tensor's row stride, where 16 does not; 1 where 16 does (Triton hints that itself) or none does.

    Triton hints an integer argument's divisibility by 16 only, so without it a row stride of
    148 (BigGAN G's conditional-BN linears) or 20 (its first linear, 24576x20) loads every
    element of a tile on its own; told 4, the kernels load float32 rows 16 bytes at a time
    (``kernels._multiple_of``). ``N`` counts because the tiles' column masks (``cols < N``)
    must be constant over a vector.
    """
    values = (layout.N, *(s[0] for s in layout.strides))
    if not _ROW_ALIGN or all(x % 16 == 0 for x in values):
        return 1
    align = 8
    while align > 1 and any(x % align for x in values):
        align //= 2
    return align


def _rows_misaligned(layout: _MatrixLayout, itemsize: int) -> bool:
    """Whether tiles spanning several rows load in pieces narrower than 16 bytes: some row stride
    is not a multiple of 16 elements and ``_row_align`` proves less than 16 bytes (a float32 row
    stride of 148 proves 4 elements, 16 bytes; of 6900 too; a bfloat16 one of 148, 8 bytes).
    Such rows are loaded element by element or nearly, though each row is one contiguous run."""
    return (layout.M > 1 and any(s[0] % 16 != 0 for s in layout.strides)
            and _row_align(layout) * itemsize < 16)


def _empty_like_weight(weight: torch.Tensor) -> torch.Tensor:
    """An output with the weight's strides where they are dense (as ``weight / sigma`` gives)."""
    return torch.empty_like(weight, memory_format=torch.preserve_format)


def fused_supported(weight: torch.Tensor, dim: int = 0) -> bool:
    """Whether the fused kernels can take this weight (else the reference path is used)."""
    return _why_not_fused(weight, dim) is None


def _why_not_fused(weight: torch.Tensor, dim: int) -> str | None:
    """Why the fused kernels cannot take this weight, or None where they can (``fused_supported``)."""
    # Called on every read of a layer's weight: the cheapest tests first (is_cuda, not
    # device.type, which builds a torch.device).
    dtype = weight.dtype
    if dtype not in _FUSED_DTYPES:
        return f"dtype {dtype}: the kernels take float16/bfloat16/float32/float64 weights"
    if not _plain_tensor(weight):
        # TwoTensor, DTensor, ...: no storage of their own to launch on; see _PLAIN_TENSOR_TYPES
        return f"a {type(weight).__name__} (a wrapper tensor subclass) has no storage of its own to launch on"
    if not weight.is_cuda:
        if not INTERPRET or weight.device.type != "cpu":
            return (f"a {weight.device.type} weight: the kernels run on CUDA tensors, and on CPU tensors "
                    f"under TRITON_INTERPRET=1")
        if dtype == torch.bfloat16 and not _INTERPRETER_BF16:
            return ("a bfloat16 CPU weight: Triton's interpreter does not convert bfloat16 as a GPU does "
                    "(float32 to bfloat16 truncates, subnormals widen to 0)")
    ndim = weight.ndim
    numel = weight.numel()
    if ndim < 2 or numel == 0:
        return f"shape {tuple(weight.shape)}: the kernels take non-empty weights of 2 or more dims"
    # (with the output the read allocates, whose strides may differ: a plan needs a walk of both;
    # the backward copies an incoming gradient that merges with neither into dW's strides)
    if ndim - 1 > _MAX_COL_DIMS and _matrix_layout(dim % ndim, weight, _empty_like_weight(
            torch.empty_strided(weight.shape, weight.stride(), device="meta"))) is None:
        return (f"strides {weight.stride()} with dim={dim}: the columns of its matrix view need more "
                f"than {_MAX_COL_DIMS} strides")
    # 32-bit offsets inside the kernels: the workspace indices (program * M, program * N,
    # with at most _MAX_GRID programs) must fit, and so must the largest element offset.
    M = weight.shape[dim]
    if max(M, numel // M) * _MAX_GRID >= 2**31:
        return f"a {M} x {numel // M} matrix: the kernels' 32-bit offsets do not reach its partial sums"
    if numel < 2**31 and weight.is_contiguous():  # the common case, without a loop over strides
        return None
    if sum((n - 1) * abs(st) for n, st in zip(weight.shape, weight.stride())) >= 2**31:
        return "elements 2**31 or more apart: the kernels' offsets are 32-bit"
    return None


def new_semaphore(device: torch.device | str | None = None) -> torch.Tensor:
    """Zeroed grid-barrier semaphores: ``[0]`` for the forward, ``[1]`` for the backward."""
    return torch.zeros(2, dtype=torch.int32, device=device)


# --------------------------------------------------------------------------- launch config


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _max_programs(device_index: int) -> int:
    """Co-resident programs: ``_PROGRAMS_PER_SM`` per SM.

    A spin barrier deadlocks if a program is not resident, so the launch is
    cooperative too: the driver refuses a grid that cannot be co-resident
    (an error, never a hang).
    """
    return _sm_count(device_index) * _PROGRAMS_PER_SM


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _padded(n: int) -> int:
    """``n`` rounded up to 16: the workspace's regions start on 16-element boundaries
    (kernels.py, ``_padded``)."""
    return _cdiv(n, 16) * 16


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# Rows at most this wide are "narrow": tuned when their loads did not vectorize (a row of 20
# float32 was not known 16-byte aligned, so a thread kept a 64-bit address per element of its
# tiles). Since session 22 rows aligned to 4 elements load as vectors (_row_align); the rules
# that use this (_default_grid's grid, the backward's tiles) are not re-measured since.
_NARROW_BLOCK_N = 64


def _num_warps(tile: int, block_n: int) -> int:
    """Warps for a loop step over ``tile`` elements of A (``SN_FUSED_NUM_WARPS`` overrides).

    Narrow 16384-element tiles get 16 warps: with 8, 64 elements and their addresses per
    thread spill (ptxas, sm_90: 24576x20 at 60 programs, ~1 KB per thread; the launcher now
    gives it 120 programs, whose 8192-element tiles do not spill at 8).
    """
    if _NUM_WARPS:
        return _NUM_WARPS
    if tile >= 16384 and block_n <= _NARROW_BLOCK_N:
        return 16
    return 8 if tile >= 4096 else (4 if tile >= 1024 else 2)


def _floor_power_of_2(n: int) -> int:
    """Largest power of two <= max(n, 1): block sizes from the (env-settable) tile knobs."""
    return 1 << (max(n, 1).bit_length() - 1)


@dataclass(frozen=True)
class _LaunchConfig:
    grid: int
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_R: int  # rows of the vector phases (own rows: u)
    BLOCK_C: int  # columns of the vector phases (own columns: t, v)
    BLOCK_P: int
    BLOCK_Q: int
    num_warps: int
    num_stages: int | None
    ROW_IN_TILE: bool
    ON_CHIP: bool
    # The forward's streaming read with a program's rows kept in registers (kernels.py KEEP_A):
    # where they fit one tile as ON_CHIP's do, but the G x N table is too large for ON_CHIP.
    KEEP_A: bool = False
    # Pipelined loads of the forward's loops over A (kernels.py): 1 here; _forward_plan sets
    # them from the knobs, the weight's element size and the device (_pipeline_stages).
    LOAD_STAGES: int = 1
    RESCALE_STAGES: int = 1
    # Loads one tile ahead in registers (kernels.py): 0 here; _forward_plan sets them from the
    # knobs where the tiles fit (_prefetch).
    LOAD_PREFETCH: int = 0
    RESCALE_PREFETCH: int = 0
    # The backward's GRAD pass pipelined (kernels.py): 1 here; _backward_plan sets it.
    GRAD_STAGES: int = 1

    @property
    def path(self) -> str:
        """How the launch holds A, by name: "on-chip" (ON_CHIP), "kept" (KEEP_A: the forward's
        streaming read with its tile kept) or "streaming"."""
        return "on-chip" if self.ON_CHIP else "kept" if self.KEEP_A else "streaming"


def _cuda_index(device: torch.device) -> int:
    """The index of a CUDA ``device`` (the current one for a bare ``cuda``), for per-device
    properties."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _default_grid(M: int, N: int, cap: int) -> int:
    """Programs for an M x N weight: one per ``_MIN_ELEMENTS_PER_PROGRAM`` elements, at most ``cap``.

    Narrow rows get one per half that: their loads did not vectorize, so a program took
    longer per element. 24576x20 on an H100: 120 programs 7.0 us against 60 programs 9.7 us
    per read; 128x1152 is fastest at the full 8192 (knob sweep, bench/NOTES.md v9). (Its rows
    load as vectors since session 22, ``_row_align``: not re-measured.)
    """
    per_program = _MIN_ELEMENTS_PER_PROGRAM
    if _next_power_of_2(N) <= _NARROW_BLOCK_N and M * N > per_program:
        # (a weight that fits one program keeps it: a second would add a grid barrier)
        per_program = max(per_program // 2, 1)
    return min(cap, _cdiv(M * N, per_program))


def _launch_config(M: int, N: int, device: torch.device, num_programs: int | None,
                   per_element: bool = False) -> _LaunchConfig:
    """Grid and tiles. The grid never exceeds the co-resident bound (a spin barrier needs it).
    ``per_element``: the tiles are loaded element by element (``_addressed_per_element``), so
    streaming ones are kept to ``_PER_ELEMENT_TILE_ELEMENTS``."""
    if num_programs is None:
        if device.type == "cuda":
            cap = min(_max_programs(_cuda_index(device)), _MAX_GRID)
        else:
            cap = _INTERPRETER_GRID_CAP  # interpreter: programs run one after another (1: no barrier)
        num_programs = _default_grid(M, N, cap)
    # (whole rows per program; the on-chip read also relies on it: with one row, its du comes
    # from the program that owns the row, kernels._on_chip_u)
    G = max(1, min(num_programs, M))
    # Tiles of ~_TILE_ELEMENTS. Rows up to _MAX_ROW_IN_TILE wide are read whole
    # (one pass over A for both products); wider ones in column blocks of a
    # program's few rows by >= 512 columns.
    rows = _next_power_of_2(_cdiv(M, G))
    # (a row loaded element by element, x and t's sums spill above 8192 wide: 680 bytes at 16384)
    row_in_tile = _next_power_of_2(N) <= (min(_MAX_ROW_IN_TILE, _PER_ELEMENT_TILE_ELEMENTS) if per_element
                                          else _MAX_ROW_IN_TILE)
    if row_in_tile:
        block_n = _next_power_of_2(N)
    else:
        block_n = _floor_power_of_2(max(min(512, _TILE_ELEMENTS // 4), _TILE_ELEMENTS // min(rows, 16)))
        if per_element:
            block_n = min(block_n, _floor_power_of_2(_PER_ELEMENT_TILE_ELEMENTS))
    block_m = min(rows, _floor_power_of_2(_TILE_ELEMENTS // block_n))
    # Vector phases: a program's own rows (u) and own columns (t, v), sized separately so a
    # tall or wide matrix does not drag masked lanes through the other loop.
    block_r = min(_next_power_of_2(_cdiv(M, G)), 4096)
    block_c = min(_next_power_of_2(16 * _cdiv(_cdiv(N, 16), G)), 4096)  # own columns: whole 16-blocks
    block_p = _next_power_of_2(G)
    # A program's rows in one tile, and a table of partials small enough for every program to
    # read whole: the read keeps its tile in registers (kernels.py, "A on chip").
    # Rows wider than 8192 stay streaming: a 16384-wide row, x and t spill at 8 warps (sm_90).
    # 1x8192 on an H100: 4.6 us per read on chip against 6.7 streaming, once its stores were
    # vectorized (8.3 against 7.8 before; bench/NOTES.md v9, v10).
    on_chip = (_ON_CHIP and row_in_tile and block_m == rows and block_n <= _ON_CHIP_MAX_ROW
               and G * N <= _ON_CHIP_MAX_PARTIALS)
    if per_element and not on_chip:  # (rows and column blocks are at most that wide: see above)
        block_m = min(block_m, _floor_power_of_2(_PER_ELEMENT_TILE_ELEMENTS // block_n))
    # The same tile with a larger table: the streaming read, A loaded once and kept (KEEP_A), a
    # tile of up to _KEEP_A_MAX_ELEMENTS (the streaming tile's, by default; element by element,
    # no more than that).
    keep_limit = block_m * block_n if per_element else (_KEEP_A_MAX_ELEMENTS or _TILE_ELEMENTS)
    keep_a = (_ON_CHIP and _KEEP_A and not on_chip and row_in_tile and block_n <= _ON_CHIP_MAX_ROW
              and rows * block_n <= keep_limit)
    if keep_a:
        block_m = rows
    # The G partials of a column are summed BLOCK_Q programs per load: [BLOCK_Q, BLOCK_C] tiles
    # of own columns (phase R), or [BLOCK_Q, BLOCK_N] tiles of all columns (ON_CHIP).
    block_q = min(block_p, _floor_power_of_2(_PARTIALS_TILE_ELEMENTS // (block_n if on_chip else block_c)))
    return _LaunchConfig(G, block_m, block_n, block_r, block_c, block_p, block_q,
                         _num_warps(block_m * block_n, block_n), _NUM_STAGES or None, row_in_tile, on_chip,
                         keep_a)


# Shared memory a program may take where no CUDA device is asked (the interpreter, which ignores
# it, and tests/test_compile_sm90.py, which compiles for an H100): an H100's per-block opt-in.
_H100_SHARED_PER_BLOCK = 227 * 1024
# What a kernel keeps in shared memory besides pipelined tiles (the forward's reductions: 4 KB on
# sm_90; the backward's GRAD pass also stages each tile's u, 32 bytes at 8 rows).
_SHARED_RESERVED = 8 * 1024


# L2 where no CUDA device is asked (the interpreter, tests/test_compile_sm90.py): an H100's.
_H100_L2_BYTES = 50 * 2**20


def _l2_bytes(device: torch.device) -> int:
    """Bytes of L2 cache of ``device`` (an H100's off CUDA)."""
    if device.type != "cuda":
        return _H100_L2_BYTES
    return _l2_cache_size(_cuda_index(device))


@functools.lru_cache(maxsize=None)
def _l2_cache_size(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).L2_cache_size


@functools.lru_cache(maxsize=None)
def _shared_memory(device_index: int) -> tuple[int, int]:
    """(per block opt-in, per SM) bytes of shared memory of a CUDA device."""
    props = torch.cuda.get_device_properties(device_index)
    per_block = getattr(props, "shared_memory_per_block_optin", _H100_SHARED_PER_BLOCK)
    return per_block, getattr(props, "shared_memory_per_multiprocessor", per_block)


def _pipeline_stages(requested: int, cfg: _LaunchConfig, itemsize: int, device: torch.device,
                     a_bytes: int) -> int:
    """Stages of a pipelined loop over the forward's ``[BLOCK_M, BLOCK_N]`` tiles of A: at most
    ``requested`` (0: ``_STAGES_BEYOND_L2`` where A's ``a_bytes`` exceed the device's L2, else 1),
    with its ``stages - 1`` tiles in the shared memory a program may take (the
    device's per-block limit, and its per-SM one split among ``_PROGRAMS_PER_SM``). Whole-row
    tiles only: there phase ST and the rescale reuse one buffer (fp32 at 3 stages: 128 KB).
    Column blocks keep 1: their three loops over A would take buffers of their own (256 KB at
    3 stages), so the kernel pipelines none of them but the rescale's, which this keeps off."""
    if requested == 0:
        requested = _STAGES_BEYOND_L2 if a_bytes > _l2_bytes(device) else 1
    if requested <= 1 or not cfg.ROW_IN_TILE or cfg.ON_CHIP or cfg.KEEP_A:  # they load their tile once
        return 1
    return _stages_that_fit(requested, cfg.BLOCK_M * cfg.BLOCK_N * itemsize, device)


def _stages_that_fit(requested: int, tile_bytes: int, device: torch.device) -> int:
    """At most ``requested`` stages of a pipelined loop over tiles of ``tile_bytes``: its
    ``stages - 1`` tiles in the shared memory a program may take (the device's per-block limit,
    and its per-SM one split among ``_PROGRAMS_PER_SM``), less ``_SHARED_RESERVED``."""
    if device.type == "cuda":
        per_block, per_sm = _shared_memory(_cuda_index(device))
        budget = min(per_block, per_sm // max(_PROGRAMS_PER_SM, 1))
    else:
        budget = _H100_SHARED_PER_BLOCK
    return max(1, min(requested, 1 + (budget - _SHARED_RESERVED) // tile_bytes))


# Registers per thread a prefetching loop may fill with the values that stay live across its
# steps (two tiles of A; phase ST also x and the t partial): what a thread can have (255, or
# its share of the SM's 65536 with more than 8 warps) less ~64 for addresses, masks and the
# reductions. From ptxas (sm_90a, tests/test_compile_sm90.py): phase ST prefetching 8192-wide
# rows (192 such registers) compiles at 254 without spills, 16384-wide ones (256) spill. Rows
# narrower than _PREFETCH_MIN_BLOCK_N are not prefetched: their tiles hold many rows, whose
# per-element addresses take the room (100-wide rows spilled ~2 KB; review of v16).
_PREFETCH_RESERVED_REGISTERS = 63
_PREFETCH_MIN_BLOCK_N = 1024


def _prefetch(requested: int, cfg: _LaunchConfig, itemsize: int, in_phase_st: bool) -> int:
    """1 where a forward loop over whole-row tiles loads one tile ahead in registers: asked for,
    streaming (ON_CHIP and KEEP_A load their tile once), rows at least ``_PREFETCH_MIN_BLOCK_N`` wide, and
    the loop's live values (32-bit registers: two tiles of A in the weight's dtype, phase ST's x
    and t partial in the accumulation dtype, float64 for float64 weights) within what a thread
    can hold less ``_PREFETCH_RESERVED_REGISTERS``."""
    if not requested or not cfg.ROW_IN_TILE or cfg.ON_CHIP or cfg.KEEP_A or cfg.BLOCK_N < _PREFETCH_MIN_BLOCK_N:
        return 0
    threads = 32 * cfg.num_warps
    budget = min(255, 65536 // threads) - _PREFETCH_RESERVED_REGISTERS
    words = max(itemsize, 4) // 4
    live = 2 * cfg.BLOCK_M * cfg.BLOCK_N * words + (2 * cfg.BLOCK_N * words if in_phase_st else 0)
    return int(live <= budget * threads)


# Compiled kernels by launch signature, for the eager fast path of ``_launch``.
_RUNNERS: dict = {}
# Prepared C++ reads (``_prepared_read``) made before the last ``_clear_plans`` are stale.
_PREPARED_GENERATION = 0
# Whether eager launches keep and reuse runners: on a GPU. (The interpreter has no compiled
# kernel to keep; bench/host_time.py turns it on there, with the launch itself stubbed out,
# to time this path's Python on a CPU.)
_KEEP_RUNNERS = not INTERPRET


def _hook_set(hook) -> bool:
    # Triton >= 3.4 keeps hooks in a HookChain that is never None: look inside.
    return hook is not None and bool(getattr(hook, "calls", True))


_RUNTIME_KNOBS = getattr(getattr(triton, "knobs", None), "runtime", None)  # Triton >= 3.4


def _launch_hooks_set() -> bool:
    runtime = _RUNTIME_KNOBS
    return runtime is not None and (_hook_set(runtime.launch_enter_hook)
                                    or _hook_set(runtime.launch_exit_hook))


def _direct_runner(compiled, grid: int, device_index: int):
    """``runner(args)``: launch ``compiled`` on ``grid`` programs, as Inductor launches its kernels.

    That is ``compiled.run(grid, 1, 1, stream, function, metadata, launch_metadata,
    enter_hook, exit_hook, *args)`` with no launch metadata and no hooks (``_launch`` uses a kept runner
    only while no launch hook is installed). Triton's own ``compiled[grid]`` runner also
    looks up the current device, builds launch metadata and calls both (empty) hook chains
    on every launch. The launch goes to the current stream of the weight's device, made the
    current device for it if it is not: the function was loaded on that device.
    """
    run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
    raw_stream = _raw_stream

    def runner(args):
        if _current_device() == device_index:
            run(grid, 1, 1, raw_stream(device_index), function, metadata, None, None, None, *args)
        else:
            with torch.cuda.device(device_index):
                run(grid, 1, 1, raw_stream(device_index), function, metadata, None, None, None, *args)
    return runner


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # (absent from CPU-only builds)
# torch.cuda.is_current_stream_capturing() less its wrapper (~1 us on an H200's host): the
# current device's current stream
_current_stream_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None)


def _current_device() -> int:
    return torch.cuda.current_device()


def _stream_capturing(device_index: int) -> bool:
    """Whether device ``device_index``'s current stream (where a read of a weight on that device
    launches) is capturing a CUDA graph. torch answers for the current device only, which a
    capture on another device's stream, or a weight on another device, can make another one."""
    if _current_device() == device_index:
        return _current_stream_capturing()
    with torch.cuda.device(device_index):
        return _current_stream_capturing()


def _real_eager_call(out: torch.Tensor) -> bool:
    """Whether a launch is a real eager call, from ``out``, an output its launcher just allocated:
    a plain ``torch.Tensor`` outside ``torch.compile``. Tracing allocates FakeTensors or
    FunctionalTensors instead (Dynamo, AOTAutograd, opcheck, make_fx), and a kept runner,
    a kept workspace or a launch option Inductor's launch does not take must not enter a trace."""
    return type(out) is torch.Tensor and not torch.compiler.is_compiling()


def _launch(kernel, grid: int, args: tuple, cfg: _LaunchConfig, cooperative: bool,
            n_tensors: int, key: tuple, out: torch.Tensor):
    """The one launch site of both kernels. ``args``: every kernel parameter, in order.
    Returns the kept runner that launched it (``runner(args)``), or None (none kept).

    ``kernel[grid](...)`` re-binds and re-specializes ~35 arguments on every
    call (tens of us of host time). In eager mode on a GPU the compiled kernel
    is kept instead and launched directly (``_direct_runner``). Its key is what
    Triton specializes on: ``key`` (the caller's plan -- device, shapes, strides,
    flags, so every integer argument -- and dtypes) plus the 16-byte alignment of
    the ``n_tensors`` tensor arguments. Under ``torch.compile`` (``wrap_triton``),
    in the interpreter or with launch hooks (profilers) installed, the ordinary path
    runs. ``out``: an output the launcher allocated (``_real_eager_call``).

    Eager launches run on ``out``'s device whatever the current device is, as
    PyTorch's ops do (Triton launches on the current one, and a Python op gets no
    device guard from the dispatcher). Compiled code sets its own guard.
    """
    eager = _real_eager_call(out)
    cached = _KEEP_RUNNERS and eager and not _launch_hooks_set()
    if cached:
        # The common case first, with nothing built that it does not use (~2 us less host time
        # per launch on a CPU, measured up to the runner call).
        key = key + tuple([a.data_ptr() % 16 == 0 for a in args[:n_tensors]])
        runner = _RUNNERS.get(key)
        if runner is not None:
            runner(args)
            return runner
    on_other_device = eager and out.device.type == "cuda" and out.device.index != _current_device()
    with torch.cuda.device(out.device.index) if on_other_device else contextlib.nullcontext():
        _launch_uncached(kernel, grid, args, cfg, cooperative, key if cached else None, out)
    return _RUNNERS.get(key) if cached else None


def _launch_options(cfg: _LaunchConfig, cooperative: bool, compiling: bool = False) -> dict:
    """The compile and launch options of a launch with config ``cfg`` (``kernel[grid](*args,
    **options)``); ``compiling``: launched from code torch.compile traces."""
    options = dict(num_warps=cfg.num_warps, launch_cooperative_grid=cooperative)
    if cfg.num_stages:
        options["num_stages"] = cfg.num_stages
    if _MAXNREG > 0 and not compiling and not INTERPRET:
        fits = 65536 // (32 * cfg.num_warps * max(_PROGRAMS_PER_SM, 1)) // 8 * 8  # (ptxas allocates by 8)
        maxnreg = min(_MAXNREG, fits, 255)
        if maxnreg >= 32:  # (below that, knobs no launch uses: ptxas' own choice)
            options["maxnreg"] = maxnreg
    return options


def _launch_uncached(kernel, grid: int, args: tuple, cfg: _LaunchConfig, cooperative: bool,
                     key: tuple | None, out: torch.Tensor) -> None:
    """``_launch`` through Triton's own entry points; keeps a runner under ``key`` (if any)."""
    if INTERPRET and cooperative and grid > 1:
        # The interpreter runs programs one after another: the first would spin forever.
        raise RuntimeError(f"spectral_norm: a single launch of {grid} programs with grid barriers "
                           f"deadlocks in the Triton interpreter; use phase_by_phase=True (the default)")
    if INTERPRET and isinstance(out, FakeTensor) and get_proxy_mode() is None:
        # A fake kernel (Dynamo's tracing, opcheck) only needs the outputs' metadata, which
        # the caller has allocated. On a GPU, wrap_triton's HOP skips the launch on fake
        # tensors; the interpreter's InterpretedFunction, which wrap_triton returns unwrapped,
        # would try to run the kernel on them. Not while a graph is being recorded (make_fx):
        # with no HOP to record, skipping would leave the kernel out of the graph. There, and
        # in functionalized tracing (FunctionalTensor: aot_eager, Inductor), the interpreter
        # still fails loudly.
        return
    # (in a trace, wrap_triton would take maxnreg for a kernel argument)
    options = _launch_options(cfg, cooperative, compiling=not _real_eager_call(out))
    if key is None:
        wrap_triton(kernel)[(grid,)](*args, **options)
        return
    compiled = kernel[(grid,)](*args, **options)  # compiles on first use
    if len(_RUNNERS) > 4096:  # a bound, not a policy: shapes in a model are few
        _RUNNERS.clear()
    _RUNNERS[key] = _direct_runner(compiled, grid, out.device.index)


def _workspace_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- forward op


def _forward_phases(training: bool, n_power_iterations: int, on_chip: bool) -> list[tuple[int, bool]]:
    """The (PHASE, is_last) launch sequence of the phase-by-phase mode (see kernels.py).

    ON_CHIP has no PHASE_F: its PHASE_R (or PHASE_FIX_R, after a fallback) finishes the
    iteration, and the next iteration starts with a PHASE_ST of its own.
    """
    if not training:
        return [(kernels.PHASE_ST, False), (kernels.PHASE_F, True)]
    phases = [(kernels.PHASE_ST, False)]
    for it in range(n_power_iterations):
        last = it == n_power_iterations - 1
        if on_chip:
            phases += [(kernels.PHASE_R, last), (kernels.PHASE_FIX_T, False), (kernels.PHASE_FIX_R, last)]
            phases += [] if last else [(kernels.PHASE_ST, False)]
        else:
            phases += [(kernels.PHASE_R, False), (kernels.PHASE_FIX_T, False), (kernels.PHASE_FIX_R, False),
                       (kernels.PHASE_F, last)]
    return phases


def _concrete(*int_tuples) -> tuple:
    """Sizes/strides as plain ints (a SymInt is specialized, with a guard, by ``int``)."""
    return tuple(tuple(int(x) for x in t) for t in int_tuples)


def _clear_plans() -> None:
    """Forget cached plans, compiled launchers and prepared reads (after a tuning knob changed)."""
    _forward_plan.cache_clear()
    _backward_plan.cache_clear()
    _RUNNERS.clear()
    _forget_prepared_reads()


def _forget_prepared_reads() -> None:
    """Make every layer prepare its C++ reads anew (they keep runners and plans)."""
    global _PREPARED_GENERATION
    _PREPARED_GENERATION += 1


@contextlib.contextmanager
def _launch_knobs(**values):
    """Set tuning knobs (this module's ``_NAME`` globals) for a block, then restore them.

    Cached plans and launchers are dropped on the way in and out, so every launch inside
    sees the new values and none after it keeps them. For sweeps and tests, not thread-safe.
    """
    saved = {name: globals()[name] for name in values}
    globals().update(values)
    _clear_plans()
    try:
        yield
    finally:
        globals().update(saved)
        _clear_plans()


@dataclass(frozen=True, eq=False)  # hashed by identity: a cheap key for _RUNNERS
class _Plan:
    """Everything about a launch that depends only on shapes, strides and flags (cached).

    Plans live in an LRU cache, and each ``_RUNNERS`` key holds its plan, so a
    plan's identity is never reused for another one while a runner refers to it.
    """

    cfg: _LaunchConfig
    ws_numel: int  # 0: the launch touches no workspace (see _workspace)
    # Per launch: the kernel's arguments after the tensors (and, forward, eps): sizes, strides,
    # flags, blocks. Built once here, so a launch only prepends what changes from call to call.
    launches: tuple
    # A cooperative launch (co-residency guaranteed by the driver) where the grid barrier is
    # used: one launch of several programs. One program never waits on another.
    cooperative: bool


@functools.lru_cache(maxsize=1024)
def _forward_plan(shape, w_stride, o_stride, dim, device, n_power_iterations, training,
                  num_programs, phase_by_phase, itemsize=4) -> _Plan:
    # No power iteration: u, v stay as they are and sigma = u^T A v, which is the eval read.
    training = _writes_uv(training, n_power_iterations)
    layout = _matrix_layout(dim, torch.empty_strided(shape, w_stride, device="meta"),
                            torch.empty_strided(shape, o_stride, device="meta"))
    cfg = _launch_config(layout.M, layout.N, device, num_programs, _addressed_per_element(layout))
    a_bytes = layout.M * layout.N * itemsize
    load_prefetch = _prefetch(_LOAD_PREFETCH, cfg, itemsize, in_phase_st=True)
    rescale_prefetch = _prefetch(_RESCALE_PREFETCH, cfg, itemsize, in_phase_st=False)
    cfg = dataclasses.replace(  # (a loop that prefetches is not pipelined as well)
        cfg, LOAD_STAGES=1 if load_prefetch else _pipeline_stages(_LOAD_STAGES, cfg, itemsize, device, a_bytes),
        RESCALE_STAGES=1 if rescale_prefetch else _pipeline_stages(_RESCALE_STAGES, cfg, itemsize, device, a_bytes),
        LOAD_PREFETCH=load_prefetch, RESCALE_PREFETCH=rescale_prefetch)
    if phase_by_phase is None:
        phase_by_phase = cfg.grid > 1 and device.type != "cuda"
    phases = (_forward_phases(training, n_power_iterations, cfg.ON_CHIP) if phase_by_phase
              else [(kernels.PHASE_ALL, True)])
    launches = tuple(
        (layout.M, layout.N, n_power_iterations, int(is_last), *layout.strides[0], *layout.strides[1],
         *layout.inner_sizes, *layout.v_strides, *layout.v_inner_sizes, len(layout.sizes), len(layout.v_sizes),
         training, phase, cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_R,
         cfg.BLOCK_C, cfg.BLOCK_P, cfg.BLOCK_Q, cfg.ROW_IN_TILE, cfg.ON_CHIP, cfg.KEEP_A, cfg.LOAD_STAGES,
         cfg.RESCALE_STAGES,
         cfg.LOAD_PREFETCH, cfg.RESCALE_PREFETCH, _row_align(layout))
        for phase, is_last in phases)
    # One ON_CHIP program in one launch keeps everything in registers: no workspace.
    ws_numel = 0 if cfg.ON_CHIP and cfg.grid == 1 and not phase_by_phase else \
        _padded(layout.M) + _padded(layout.N) + cfg.grid * (layout.N + 4) + 1
    return _Plan(cfg, ws_numel, launches, not phase_by_phase and cfg.grid > 1)


# Per (device, dtype): the workspace argument of launches that touch none (ws_numel == 0).
_NO_WORKSPACE: dict = {}
_NO_WORKSPACE_NUMEL = 16  # (tests make it large, to see a stray write)


def _workspace(plan: _Plan, out: torch.Tensor) -> torch.Tensor:
    """The launch's workspace (accumulation dtype: the kernels read their sums' type from it).

    ``out``: the output the launcher just allocated (weight's dtype and device). In a real
    eager call (``_real_eager_call``), a launch that touches no workspace (one ON_CHIP program: every sum stays in registers) then gets a tensor kept
    per device and dtype: one allocation less per read and per backward (host time of a
    layer's read on a CPU: -2 to -4 us; a CUDA ``torch.empty`` cost ~4 us on an H100's host).
    The kernels never read or write it (a test poisons it and checks both). Traced calls
    allocate as always: a kept tensor must not enter a traced graph, nor a fake one the cache
    (a mode that fakes ``torch.empty`` fakes ``out`` too, so a plain ``out`` means a plain workspace).
    """
    dtype = _workspace_dtype(out)
    if plan.ws_numel == 0 and _real_eager_call(out):
        return _kept_workspace(out.device, dtype)
    return torch.empty(max(plan.ws_numel, 1), dtype=dtype, device=out.device)


def _kept_workspace(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The workspace argument of eager launches that touch none, one per device and dtype."""
    key = (device, dtype)
    ws = _NO_WORKSPACE.get(key)
    if ws is None:
        ws = _NO_WORKSPACE[key] = torch.empty(_NO_WORKSPACE_NUMEL, dtype=dtype, device=device)
    return ws


def _launch_forward(weight, out, u, v, saved, sigma_buf, sem, dim,
                    n_power_iterations, eps, training, num_programs=None, phase_by_phase=None):
    try:
        plan = _forward_plan(weight.shape, weight.stride(), out.stride(), dim, weight.device,
                             n_power_iterations, training, num_programs, phase_by_phase, weight.element_size())
    except TypeError:  # symbolic sizes (tracing with dynamic shapes): specialize them
        plan = _forward_plan(*_concrete(weight.shape, weight.stride(), out.stride()), dim, weight.device,
                             n_power_iterations, training, num_programs, phase_by_phase, weight.element_size())
    # (an int eps is a float to the kernel: one compiled kernel for 0 and 0.0, and no integer
    # specialization of 1)
    head = (weight, out, u, v, saved, sigma_buf, _workspace(plan, out), sem, float(eps) if type(eps) is int else eps)
    for i, tail in enumerate(plan.launches):
        _launch(kernels.spectral_norm_fwd_kernel, plan.cfg.grid, head + tail, plan.cfg, plan.cooperative, 8,
                _forward_key(plan, i, weight, sigma_buf, sem), out)


def _forward_key(plan, i: int, weight, sigma_buf, sem) -> tuple:
    """The runner key (``_launch``) of the forward's ``i``-th launch of ``plan``: what Triton
    specializes on but the plan holds and the alignments ``_launch`` adds. The Python path and
    the C++ read (``_prepared_read``) both build it here, so they keep and share one runner."""
    return (plan, i, weight.dtype, sigma_buf.dtype, sem.dtype)


def _backward_key(plan, i: int, grad, weight, saved, sem) -> tuple:
    """``_forward_key`` of the backward kernel."""
    return (plan, i, grad.dtype, weight.dtype, saved.dtype, sem.dtype)


def _prepared_read(weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps, training):
    """A ``sn_fused._C.PreparedRead``: the launches of one eager read of these inputs (checked),
    and of its backward for an incoming gradient with W_sn's strides, with everything but the
    tensors built (``_prepared_launches``). Valid for inputs with the same signature
    (``_input_signature``) and ``training``, until ``_clear_plans``."""
    out_stride = _empty_like_weight(torch.empty_strided(weight.shape, weight.stride(), device="meta")).stride()
    plan = _forward_plan(weight.shape, weight.stride(), out_stride, dim, weight.device,
                         n_power_iterations, training, None, None, weight.element_size())
    # As _launch_forward: (weight, out, u, v, saved, sigma_buf, workspace, sem, eps, *tail).
    forward = _prepared_launches(
        kernels.spectral_norm_fwd_kernel, plan, weight, scalars=(eps,), n_tensors=8, ws_index=6, out_index=1,
        keys=[_forward_key(plan, i, weight, sigma_buf, sem) for i in range(len(plan.launches))])
    # As _launch_backward for a gradient with W_sn's strides: (grad, weight, dW, saved, workspace, sem, *tail);
    # grad and saved have the weight's dtype (the checks and the C++ node see to it).
    backward_plan = _backward_plan(weight.shape, out_stride, weight.stride(), out_stride, dim, weight.device,
                                   None, None, weight.element_size())
    backward = None if backward_plan is None else _prepared_launches(
        kernels.spectral_norm_bwd_kernel, backward_plan, weight, scalars=(), n_tensors=6, ws_index=4, out_index=2,
        keys=[_backward_key(backward_plan, i, weight, weight, weight, sem) for i in range(len(backward_plan.launches))])
    return _cpp.PreparedRead(saved_numel=u.shape[0] + v.shape[0] + 1,
                             writes_uv=_writes_uv(training, n_power_iterations), forward=forward, backward=backward,
                             weight_strides=list(weight.stride()), grad_strides=list(out_stride))


def _prepared_launches(kernel, plan: _Plan, weight, *, scalars: tuple, n_tensors: int, ws_index: int,
                       out_index: int, keys: list):
    """A ``sn_fused._C.PreparedLaunches`` of ``plan``: what ``_launch_forward`` /
    ``_launch_backward`` pass after the tensors (``scalars``, then each launch's tail), the
    workspace (kept, or its dtype to allocate ``plan.ws_numel`` like), and for each launch the
    ``_launch`` call that launches it and returns the runner it keeps: the C++ read calls that
    runner itself while the alignment of its tensors stays the same. ``n_tensors`` (the
    workspace at ``ws_index`` among them), ``out_index``, ``keys`` (one per launch): as the
    launcher passes them."""
    dtype = _workspace_dtype(weight)
    workspace = (_kept_workspace(weight.device, dtype) if plan.ws_numel == 0
                 else torch.empty(0, dtype=dtype, device=weight.device))
    launches = [functools.partial(_launch_prepared, kernel, plan, n_tensors, key, out_index) for key in keys]
    return _cpp.PreparedLaunches(ws_index=ws_index, ws_numel=plan.ws_numel, workspace=workspace, scalars=scalars,
                                 tails=list(plan.launches), launches=launches)


def _launch_prepared(kernel, plan: _Plan, n_tensors: int, key: tuple, out_index: int, args: tuple):
    """One launch of prepared launches (``args``: every kernel parameter), through ``_launch``."""
    return _launch(kernel, plan.cfg.grid, args, plan.cfg, plan.cooperative, n_tensors, key, args[out_index])


def _fast_launches_ok() -> bool:
    """Whether the C++ read may allocate and launch through kept runners now: no mode (a
    TorchDispatchMode -- FakeTensorMode, a FLOP counter -- or a TorchFunctionMode sees the Python
    path's allocations and launches, which C++ would hide), no Triton launch hooks (profilers: a
    kept runner calls none), no torch.func transform."""
    return not (_len_dispatch_stack() or _function_mode_enabled() or _launch_hooks_set()
                or _functorch_transforms_active())


@triton_op("sn_fused::spectral_norm_forward", mutates_args={"u", "v", "sigma_buf", "sem"})
def spectral_norm_forward(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                          sigma_buf: torch.Tensor, sem: torch.Tensor, dim: int,
                          n_power_iterations: int, eps: float, training: bool
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """One read: ``(W / sigma, saved)``, ``saved = [v_used | u_used | sigma]`` (what the
    backward op takes); u, v updated in place when training.

    ``sigma_buf`` (the module's logging buffer) receives sigma too.
    """
    dim = _check_forward_inputs(weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps, training)
    return _forward_unchecked(weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps, training)


# --------------------------------------------------------------------------- backward op


@functools.lru_cache(maxsize=1024)
def _backward_plan(shape, g_stride, w_stride, d_stride, dim, device, num_programs, phase_by_phase, itemsize=4):
    metas = [torch.empty_strided(shape, st, device="meta") for st in (g_stride, w_stride, d_stride)]
    layout = _matrix_layout(dim, *metas, order_by=1)  # (the walk of the forward's tiles, where G has W's strides)
    if layout is None:
        return None
    cfg = _launch_config(layout.M, layout.N, device, num_programs)
    # Same grid as the forward; tiles of its own: the forward's whole-row tiles (up to 16384
    # wide, for its one-load-two-products phase) only add registers here.
    whole_row = _next_power_of_2(layout.N)
    block_n = min(whole_row, _floor_power_of_2(_BWD_BLOCK_N))
    # The big default tile was measured fastest with _BWD_BLOCK_N-wide blocks (8 rows). With
    # narrower blocks it holds more rows per thread and spills (ptxas, sm_90: 4096x1024 ~6 KB
    # per thread), so those get 16384 elements, and narrow rows 8192 (16384 spill even with 16
    # warps).
    if block_n <= _NARROW_BLOCK_N:
        tile = min(_BWD_TILE_ELEMENTS, 8192)
    elif block_n < _BWD_BLOCK_N:
        tile = min(_BWD_TILE_ELEMENTS, 16384)
    else:
        tile = _BWD_TILE_ELEMENTS
    rows = _next_power_of_2(_cdiv(layout.M, cfg.grid))
    # (G and W of such a tile are live together: 16384 fp32 elements take 149 registers at 8 warps,
    # 512x4608's 4 x 8192 would spill; so would float64 ones, and columns addressed through
    # several strides (NCOL > 1: 84 bytes, fp32, a channels-last conv's before its columns were
    # walked in memory order); ptxas sm_90a)
    strided_columns = _addressed_per_element(layout)
    wide_fits = rows * whole_row <= min(tile, 16384) and itemsize <= 4 and not strided_columns
    # Rows not proven 16-byte aligned (a row stride of 6901; bfloat16 rows of 6900, which
    # _row_align proves 8 bytes) are loaded element by element or nearly, too: 768x6900's default
    # 8x4096 tiles spilled 2.2 KB per thread before its float32 rows were told 4-element aligned
    # (ptxas sm_90a, 255 registers), 8192-element ones none (163). (Their forward reads do not
    # spill at 8192-16384 elements, so _launch_config keeps its tiles; nor do 132x6901's wide
    # 2x8192 ones here.)
    per_element = strided_columns or _rows_misaligned(layout, itemsize)
    if _ON_CHIP and block_n < whole_row <= _BWD_ON_CHIP_MAX_ROW and wide_fits:
        block_n = whole_row  # the program's rows as one tile: ON_CHIP below
    block_m = min(rows, _floor_power_of_2(tile // block_n))
    # A program's rows in one tile: kept in registers across the barrier (kernels.py). Tiles
    # loaded element by element only up to 16384 elements: 768x3500's 8x4096, loaded so before
    # session 22, spilled 336-752 bytes, 1000x1000's 16x1024 none (ptxas sm_90a); beyond that
    # they stream.
    on_chip = (_ON_CHIP and block_m == rows and block_n >= layout.N
               and not (per_element and block_m * block_n > 16384))
    if per_element and not on_chip:
        block_m = min(block_m, _floor_power_of_2(_PER_ELEMENT_TILE_ELEMENTS // block_n))
    # (a stage holds a tile of G and its v: BLOCK_N more elements, fp32 at 32768-element tiles: 2)
    grad_stages = 1 if on_chip or _GRAD_STAGES <= 1 else _stages_that_fit(
        _GRAD_STAGES, (block_m + 1) * block_n * itemsize, device)
    cfg = dataclasses.replace(cfg, BLOCK_M=block_m, BLOCK_N=block_n, ON_CHIP=on_chip, KEEP_A=False,
                              num_warps=_num_warps(block_m * block_n, block_n), GRAD_STAGES=grad_stages)
    if phase_by_phase is None:
        phase_by_phase = cfg.grid > 1 and device.type != "cuda"
    phases = [kernels.PHASE_DOT, kernels.PHASE_GRAD] if phase_by_phase else [kernels.PHASE_ALL]
    launches = tuple(
        (layout.M, layout.N, *layout.strides[0], *layout.strides[1], *layout.strides[2], *layout.inner_sizes,
         *layout.v_strides, *layout.v_inner_sizes, len(layout.sizes), len(layout.v_sizes), phase, cfg.BLOCK_M,
         cfg.BLOCK_N, cfg.BLOCK_P, cfg.ON_CHIP, cfg.GRAD_STAGES, _row_align(layout))
        for phase in phases)
    # One ON_CHIP program in one launch sums in registers: no workspace.
    return _Plan(cfg, 0 if on_chip and cfg.grid == 1 and not phase_by_phase else cfg.grid, launches,
                 not phase_by_phase and cfg.grid > 1)


def _launch_backward(grad, weight, grad_weight, saved, sem, dim,
                     num_programs=None, phase_by_phase=None):
    itemsize = grad.element_size()  # (of G: the GRAD pass's pipelined tiles)
    try:
        plan = _backward_plan(grad.shape, grad.stride(), weight.stride(), grad_weight.stride(), dim,
                              weight.device, num_programs, phase_by_phase, itemsize)
    except TypeError:  # symbolic sizes (tracing with dynamic shapes): specialize them
        plan = _backward_plan(*_concrete(grad.shape, grad.stride(), weight.stride(), grad_weight.stride()),
                              dim, weight.device, num_programs, phase_by_phase, itemsize)
    if plan is None:  # a grad layout that does not merge with the weight's: copy it into dW's, which
        # does where the forward's output did (dW's strides are the output's: _empty_like_weight)
        grad = torch.empty_like(grad_weight).copy_(grad)
        plan = _backward_plan(*_concrete(grad.shape, grad.stride(), weight.stride(), grad_weight.stride()),
                              dim, weight.device, num_programs, phase_by_phase, itemsize)
    head = (grad, weight, grad_weight, saved, _workspace(plan, grad_weight), sem)
    for i, tail in enumerate(plan.launches):
        _launch(kernels.spectral_norm_bwd_kernel, plan.cfg.grid, head + tail, plan.cfg, plan.cooperative, 6,
                _backward_key(plan, i, grad, weight, saved, sem), grad_weight)


@triton_op("sn_fused::spectral_norm_backward", mutates_args={"sem"})
def spectral_norm_backward(grad: torch.Tensor, weight: torch.Tensor, saved: torch.Tensor,
                           sem: torch.Tensor, dim: int) -> torch.Tensor:
    """``dL/dW = (G - <G, W / sigma> u v^T) / sigma`` (``saved``: the forward op's).

    ``saved`` must be what the forward op returned for this weight and ``dim`` (the autograd
    Function passes exactly that). Its length, dtype, device and layout are checked; which
    of u and v it holds first cannot be: the same ``M + N + 1`` elements fit a transposed
    matrix (another ``dim`` of a 2-D weight). ``spectral_norm_backward_fused`` takes u and v
    apart and checks each.
    """
    dim = _check_backward_inputs(grad, weight, saved, sem, dim)
    if grad.requires_grad:
        # A compiled read's backward graph calls this op (torch.compile(backend="eager"); AOTAutograd
        # refuses double backward itself). Under backward(create_graph=True) its gradient would
        # have no grad_fn, and a second derivative would lose this term without a word; the eager
        # Function differentiates torch ops instead. (The op runs with grad mode off, so only
        # an incoming gradient that requires grad shows create_graph; one that does not, from
        # a loss linear in W_sn, still goes unnoticed.)
        raise RuntimeError("sn_fused::spectral_norm_backward has no derivative: double backward "
                           "(create_graph=True) through a torch.compile'd sn_fused read is not "
                           "supported (an eager read supports it)")
    return _backward_unchecked(grad, weight, saved, sem, dim)


class _SpectralNormFunction(torch.autograd.Function):
    """Autograd around the two ops.

    The forward op mutates u, v (in place, as PyTorch's power method does),
    and ``torch.library`` refuses ``register_autograd`` on mutating ops, so
    the pair is tied together here; Dynamo traces an autograd.Function
    fine, so ``torch.compile`` sees both ops. Eager calls skip the
    dispatcher and call the same launchers the ops call.

    ``apply(weight, state)``: everything but the weight comes in one tuple
    ``(u, v, sigma_buf, sem, dim, n_power_iterations, eps, training)``.
    ``Function.apply`` inspects each argument (and ``backward`` returns one
    gradient per argument); none of these needs a gradient, and packing them
    saves ~4 us of host time per read on a CPU. Dynamo traces through the tuple
    (tests/test_parametrizations.py: one graph, equal to eager bit for bit).
    """

    @staticmethod
    def forward(ctx, weight, state):
        u, v, sigma_buf, sem, dim, n_power_iterations, eps, training = state
        if torch.compiler.is_compiling():
            out, saved = torch.ops.sn_fused.spectral_norm_forward(
                weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps, training)
        else:  # eager: the op's launcher, without the dispatcher's per-call cost or a second check
            out, saved = _forward_unchecked(weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps, training)
        ctx.save_for_backward(weight, saved)
        ctx.sem = sem
        ctx.dim = dim
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, saved = ctx.saved_tensors
        if torch.compiler.is_compiling():
            grad_weight = torch.ops.sn_fused.spectral_norm_backward(grad_out, weight, saved, ctx.sem, ctx.dim)
        else:
            grad_weight = _eager_backward(grad_out, weight, saved, ctx.sem, ctx.dim)
        return grad_weight, None


def _eager_backward(grad, weight, saved, sem, dim):
    """The weight gradient of an eager read: of ``_SpectralNormFunction`` and of the C++ read's
    node (``csrc/spectral_norm_read.cpp`` calls it)."""
    if torch.is_grad_enabled() or _transformed(grad):
        # backward(create_graph=True): the gradient must be differentiable; batched gradients
        # (is_grads_batched=True, jacobian(vectorize=True)): grad is vmapped, which a
        # kernel cannot read. Torch ops do both.
        return _backward_differentiable(grad, weight, saved, dim)
    # grad has the output's shape, dtype and device: autograd checked it
    return _backward_unchecked(grad, weight, saved, sem, dim)


if _cpp is not None:
    _cpp.set_callbacks(_eager_backward, _fast_launches_ok)


def _backward_differentiable(grad, weight, saved, dim):
    r"""The weight gradient as torch ops of ``grad`` and ``weight``, for autograd to differentiate
    again: double backward (Hessian-vector products, meta-learning), which PyTorch's SN supports;
    and for vmap to batch (``grad`` batched: ``is_grads_batched=True``, ``jacobian(vectorize=True)``).

    The backward kernel's output has no ``grad_fn``: a second ``torch.autograd.grad`` through it
    would fail, or, where the loss has other paths to the weight, silently drop this one. So
    under ``create_graph=True`` (the engine then runs ``backward`` with grad mode on) the same
    closed form runs as torch ops instead, at torch's speed. ``sigma`` is recomputed from the
    weight, ``sigma = u^T A v`` with the saved u, v as constants, not read from ``saved``:
    that is the function of ``W`` PyTorch's SN differentiates, and the second derivative needs
    its dependence on ``W``:

    .. math::
        \frac{\partial L}{\partial W} = \frac{G - \langle G, W \rangle / \sigma(W)\; u v^T}{\sigma(W)},
        \qquad \sigma(W) = u^T A v
    """
    weight_mat = reference.reshape_weight_to_matrix(weight, dim)
    u, v, _ = split_saved(saved, *weight_mat.shape)
    sigma = torch.vdot(u, torch.mv(weight_mat, v))
    return reference.spectral_norm_backward_reference(grad, weight, u, v, sigma, dim)


# --------------------------------------------------------------------------- entry points


def spectral_norm_fused(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                        sigma_buf: torch.Tensor, sem: torch.Tensor, *, dim: int = 0,
                        n_power_iterations: int = 1, eps: float = 1e-12,
                        training: bool = True, weight_checked: bool = False) -> torch.Tensor:
    """``W / sigma`` through one kernel launch (see ``reference.spectral_norm_reference``).

    Inputs are checked here, once, before autograd records anything; the
    eager forward and backward behind it launch without checking again.
    ``weight_checked=True``: the caller has just found ``fused_supported(weight, dim)``
    with ``dim`` in ``[0, weight.ndim)`` (the layer does, to choose this path over the
    reference), so what that covers is not checked again; transforms (``torch.func``,
    forward-mode AD), u, v, the buffers and the arguments still are.
    """
    dim = _check_forward_inputs(weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps, training,
                                weight_checked)
    return _spectral_norm_checked(weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps, training)


def _spectral_norm_checked(weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps, training,
                           prepared: list | None = None):
    """``spectral_norm_fused`` past its checks (``dim`` normalized): what the layer calls
    when the same inputs passed them before (``_input_signature``).

    ``prepared``: ``[eval, training]``, the caller's prepared C++ reads (``(generation,
    PreparedRead)`` or None) kept with these inputs' signature, where the C++ read keeps its
    prepared launches from read to read.
    """
    state = (u, v, sigma_buf, sem, dim, n_power_iterations, eps, training)
    if torch.compiler.is_compiling() or _is_functorch_wrapped(weight):
        # What Dynamo traces (whatever the grad mode: traced calls keep the op); and what unwraps
        # a weight that is a "dead" functorch wrapper, a tensor that outlived its transform
        # (torch.func.grad): it has no storage for a kernel to read.
        return _SpectralNormFunction.apply(weight, state)
    # Whether autograd records this read (inside inference_mode() it records nothing, whatever
    # the grad mode says; not asked while Dynamo traces, which cannot trace the question).
    record = torch.is_grad_enabled() and weight.requires_grad and not torch.is_inference_mode_enabled()
    if prepared is not None and CPP_READS and type(weight) in _PLAIN_TENSOR_TYPES and _fast_launches_ok():
        # The C++ read: same launches, ~12 us less host time per read and ~16 per backward (CPU).
        # Not for a torch.Tensor subclass weight: its W_sn would come back a plain tensor.
        entry = prepared[1 if training else 0]
        if entry is None or entry[0] != _PREPARED_GENERATION:
            entry = prepared[1 if training else 0] = (_PREPARED_GENERATION, _prepared_read(
                weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps, training))
        if record:
            return _cpp.read(entry[1], weight, u, v, sigma_buf, sem, dim)
        return _cpp.forward(entry[1], weight, u, v, sigma_buf, sem)
    if not record:
        # Nothing to record (no_grad reads, e.g. sampling or evaluation): skip autograd.Function,
        # ~10 us of host time per read.
        return _forward_unchecked(weight, *state)[0]
    return _apply_spectral_norm_function(weight, state)


# ``Function.apply`` without its Python wrapper (~4 us of host time per read on a CPU), which
# serves torch.func: it tests for active functorch transforms (under them the checks refuse the
# fused path, so none is active here) and unwraps its direct tensor arguments where they are
# dead functorch wrappers (here only the weight can be: the rest come in the ``state`` tuple,
# which it does not look into; ``_spectral_norm_checked`` sends such a weight to the wrapper).
# What is left is the C method the wrapper ends in, its ``super().apply``.
try:
    _apply_spectral_norm_function = torch._C._FunctionBase.__dict__["apply"].__get__(None, _SpectralNormFunction)
except (AttributeError, KeyError):  # a torch without it: the wrapper, then
    _apply_spectral_norm_function = _SpectralNormFunction.apply
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_increment_version = torch._C._increment_version  # (torch.autograd.graph.increment_version, less its wrapper)
_len_dispatch_stack = torch._C._len_torch_dispatch_stack
_functorch_transforms_active = torch._C._are_functorch_transforms_active
_function_mode_enabled = torch._C._is_torch_function_mode_enabled


class _InputSignature(tuple):
    """``_input_signature`` of a layer's checked read, with ``matches`` as the C++ one has."""

    __slots__ = ()

    def matches(self, weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps) -> bool:
        try:
            return self == _input_signature(weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps)
        except AttributeError:  # a buffer that is not a tensor
            return False


def _read_signature(weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps):
    """The signature a layer keeps with its checked read (see ``_input_signature``): an
    ``sn_fused._C.ReadSignature`` where the C++ read is on and the five tensors are of the plain
    types (its ``matches`` builds no Python object: ~2 us less host time per read on a CPU), else
    an ``_InputSignature``; None where a buffer is not a tensor (the checks say what is wrong)."""
    if CPP_READS and type(weight) in _PLAIN_TENSOR_TYPES and type(u) in _PLAIN_TENSOR_TYPES \
            and type(v) in _PLAIN_TENSOR_TYPES and type(sigma_buf) in _PLAIN_TENSOR_TYPES \
            and type(sem) in _PLAIN_TENSOR_TYPES:
        return _cpp.ReadSignature(weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps)
    try:
        return _InputSignature(_input_signature(weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps))
    except AttributeError:
        return None


def _input_signature(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, sigma_buf: torch.Tensor,
                     sem: torch.Tensor, dim, n_power_iterations, eps) -> tuple:
    """Everything ``fused_supported`` and the checks look at: inputs with equal signatures pass
    or fail them alike.

    Type, shape, strides, dtype and device of each tensor; type and value of each other argument
    (``True == 1`` and ``1.0 == 1``, but the checks refuse a bool or float count); whether u, v,
    sigma_buf or sem is an inference tensor (whether a read may write one depends on inference
    mode, see ``_check_in_place_update``; the layer remakes its own buffers); whether u or v
    requires grad; the addresses of u, v, sigma_buf and sem (what overlaps what in memory:
    ``_vectors_error``, ``_check_apart``). Not the weight's address, which FSDP's re-gathered
    parameters change read after read: a weight cannot come to overlap u or v without being made
    a view of their memory. The layer keeps the signature of its last checked read and skips the
    checks while it holds: ~15 us less host time per read, measured on a CPU with the launch
    stubbed out; the signature itself costs ~3.
    """
    return (type(weight), weight.shape, weight.stride(), weight.dtype, weight.device,
            type(u), u.shape, u.stride(), u.dtype, u.device, type(v), v.shape, v.stride(), v.dtype, v.device,
            u.is_inference() or v.is_inference() or sigma_buf.is_inference() or sem.is_inference(),
            u.requires_grad, v.requires_grad, _address(u), _address(v), _address(sigma_buf), _address(sem),
            type(sigma_buf), sigma_buf.shape, sigma_buf.dtype, sigma_buf.device,
            type(sem), sem.shape, sem.stride(), sem.dtype, sem.device,
            type(dim), dim, type(n_power_iterations), n_power_iterations, type(eps), eps)


def _address(t: torch.Tensor) -> int | None:
    """``t.data_ptr()`` of a tensor with memory a kernel reads or writes, else None: a fake one
    (FakeTensor, FunctionalTensor: tracing, or a memory estimator running the model under
    FakeTensorMode), a wrapper subclass, one without storage (a functorch wrapper that
    outlived its transform). Not while Dynamo traces, which cannot trace ``data_ptr``: callers
    that Dynamo may trace ask ``is_compiling()`` first."""
    if type(t) in _PLAIN_TENSOR_TYPES or (_plain_tensor(t) and not isinstance(t, FakeTensor)):
        try:
            return t.data_ptr()
        except RuntimeError:  # "Cannot access data pointer of Tensor that doesn't have storage"
            return None
    return None


def check_inputs(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, *, dim: int,
                 n_power_iterations: int = 1, eps: float = 1e-12) -> int:
    """Raise a clear error, before any launch, for inputs the fused kernels must not see.

    Returns ``dim`` in ``[0, weight.ndim)``: the launchers take it from here.
    """
    dim = _check_weight(weight, dim)
    _check_vectors_and_args(weight, u, v, dim, n_power_iterations, eps)
    return dim


def _check_weight(weight: torch.Tensor, dim: int) -> int:
    """``check_inputs`` for the weight alone; returns ``dim`` normalized."""
    if not isinstance(weight, torch.Tensor) or weight.dtype not in _FUSED_DTYPES:
        raise TypeError(f"spectral_norm: the fused kernels take float16/bfloat16/float32/float64 "
                        f"weights, got {getattr(weight, 'dtype', type(weight))}")
    _check_not_transformed(weight)
    if weight.ndim < 2:
        raise ValueError(f"spectral_norm: the fused kernels take weights with 2 or more dims, "
                         f"got shape {tuple(weight.shape)}")
    if type(dim) is not int:
        # Any integer Python's indexing takes (numpy's, torch's), but not a bool, as torch's ops.
        if isinstance(dim, bool) or not hasattr(type(dim), "__index__"):
            raise TypeError(f"spectral_norm: dim must be an int, got {type(dim).__name__}")
        dim = operator.index(dim)
    if not -weight.ndim <= dim < weight.ndim:
        raise IndexError(f"Dimension out of range (expected to be in range of "
                         f"[-{weight.ndim}, {weight.ndim - 1}] but got {dim})")
    if weight.numel() == 0:
        raise ValueError(f"spectral_norm: weight of shape {tuple(weight.shape)} is empty")
    if not fused_supported(weight, dim):
        raise RuntimeError(f"spectral_norm: no fused kernel for this weight ({_why_not_fused(weight, dim)}); "
                           f"sn_fused.reference.spectral_norm_reference takes it")
    return dim % weight.ndim


def _check_not_transformed(weight: torch.Tensor) -> None:
    """Refuse a weight under ``torch.func`` transforms or forward-mode AD (``_check_weight``'s;
    also where ``fused_supported`` has been asked already, which does not look at them).

    Not while Dynamo traces: it cannot trace these tests (a ``torch.compile(fullgraph=True)``
    of the op would break on them), and it handles torch.func around compiled code itself."""
    if torch.compiler.is_compiling():
        return
    if _transformed(weight):
        # A kernel cannot read a vmap-batched tensor, and the autograd.Function has no functorch
        # rules; the reference's torch ops run under the transforms as PyTorch's SN does.
        raise RuntimeError("spectral_norm: the fused kernels do not run under torch.func transforms "
                           "(grad, vmap, jacrev, ...); sn_fused.spectral_norm layers run PyTorch's ops "
                           "there, and so does sn_fused.reference.spectral_norm_reference")
    if forward_ad._current_level >= 0 and forward_ad.unpack_dual(weight).tangent is not None:
        raise RuntimeError("spectral_norm: the fused kernels have no forward-mode AD (the weight is a "
                           "dual tensor); sn_fused.spectral_norm layers run PyTorch's ops under "
                           "forward_ad.dual_level(), and so does sn_fused.reference.spectral_norm_reference")


def _check_vectors_and_args(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int,
                            n_power_iterations, eps) -> None:
    """``check_inputs`` past the weight: u, v, n_power_iterations, eps (``dim`` normalized)."""
    error = _vectors_error(weight, u, v, dim)
    if error is not None:
        raise error
    # 0 is a read: PyTorch's SN refuses it when registered, but a layer whose attribute is set
    # to 0 afterwards reads sigma from the stored u, v (its power method's loop runs 0 times).
    if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int) or n_power_iterations < 0:
        raise ValueError("Expected n_power_iterations to be non-negative (0: no power iteration), but "
                         f"got n_power_iterations={n_power_iterations}")
    # A bool is no eps here, as it is no count above (the layer reads PyTorch's True as 1.0).
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"Expected eps to be a real number, but got {type(eps).__name__}")
    # (not math.isfinite: Dynamo cannot call it on the SymFloat that dynamic=True makes of eps;
    # an int beyond float's range would reach the kernel as one it cannot take)
    if not -_FLOAT_MAX <= eps <= _FLOAT_MAX or eps < 0:
        raise ValueError(f"Expected eps to be a finite non-negative number, but got eps={eps}")


def _vectors_error(weight: torch.Tensor, u, v, dim: int) -> Exception | None:
    """What the checks raise for u and v of this weight (``dim`` normalized), or None if the
    kernels can take them: contiguous vectors of ``A``'s height and width, of the weight's
    dtype and device. (The layer reads through PyTorch's ops where they cannot.)"""
    m = weight.shape[dim]
    for name, vec, length in (("u", u, m), ("v", v, weight.numel() // m)):
        if not isinstance(vec, torch.Tensor):
            return TypeError(f"spectral_norm: {name} must be a tensor, got {type(vec).__name__}")
        if not _plain_tensor(vec):
            return TypeError(f"spectral_norm: the fused kernels cannot read {name} of type "
                             f"{type(vec).__name__} (a wrapper tensor subclass) for a {type(weight).__name__} "
                             f"weight")
        if vec.ndim != 1 or vec.shape[0] != length:
            return ValueError(f"spectral_norm: {name} has shape {tuple(vec.shape)}, expected ({length},)")
        if vec.dtype != weight.dtype:
            return TypeError(f"spectral_norm: {name} has dtype {vec.dtype}, the weight {weight.dtype}")
        if vec.device != weight.device:
            return RuntimeError(f"spectral_norm: {name} is on {vec.device}, the weight on {weight.device}")
        if vec.stride(0) != 1:
            return ValueError(f"spectral_norm: {name} must be contiguous")
        if vec.requires_grad:
            # PyTorch's SN differentiates sigma with respect to a u or v that requires grad; the
            # kernels take both as constants (and write them in place).
            return ValueError(f"spectral_norm: the fused kernels take {name} as a constant, but it "
                              f"requires grad")
    spans = {name: _memory_span(t) for name, t in (("u", u), ("v", v), ("the weight", weight))}
    for a, b in (("u", "v"), ("u", "the weight"), ("v", "the weight")):
        if _overlap(spans[a], spans[b]):
            # PyTorch's in-place updates, one after the other, see each other's writes there;
            # the kernels read all of A, u and v before they write any.
            return ValueError(f"spectral_norm: the fused kernels need u, v and the weight apart in "
                              f"memory, but {a} overlaps {b}")
    return None


def _memory_span(t: torch.Tensor) -> tuple | None:
    """``(device, first byte address, last + 1)`` of ``t``'s elements, for ``_overlap``; None
    where there is no memory to compare: an empty tensor, a meta one, and where ``_address``
    has none (tracing)."""
    if torch.compiler.is_compiling():
        return None
    numel = t.numel()
    ptr = _address(t)
    if numel == 0 or not ptr:  # (a meta tensor's data_ptr() is 0)
        return None
    # (torch has no negative strides)
    last = numel - 1 if t.is_contiguous() else sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.device, ptr, ptr + (last + 1) * t.element_size()


def _overlap(a: tuple | None, b: tuple | None) -> bool:
    """Whether two ``_memory_span``s meet: tensors that may share memory. Conservative: two
    that interleave without sharing an element count too (torch's own test for in-place ops
    gives up on them instead), which sends such u, v to PyTorch's ops in a layer."""
    return a is not None and b is not None and a[1] < b[2] and b[1] < a[2] and a[0] == b[0]


def check_semaphore(sem: torch.Tensor, weight: torch.Tensor) -> None:
    """The grid-barrier semaphores: ``new_semaphore()``'s int32[2] on the weight's device.

    The forward's barriers use ``sem[0]``, the backward's ``sem[1]``; anything shorter
    would be written out of bounds.
    """
    if not _is_semaphore(sem, weight.device):
        raise ValueError(f"spectral_norm: sem must be a contiguous int32 tensor of 2 elements on "
                         f"{weight.device} (new_semaphore()), got {_describe(sem)}")
    _check_in_place_update(sem)  # a barrier counts on it (and resets it)


def _is_semaphore(sem, device: torch.device) -> bool:
    """Whether ``sem`` can be the kernels' semaphores on ``device`` (``check_semaphore``)."""
    return (_plain_tensor(sem) and sem.dtype == torch.int32 and sem.ndim == 1 and sem.shape[0] >= 2
            and sem.stride(0) == 1 and sem.device == device)


def check_sigma_buffer(sigma_buf: torch.Tensor, weight: torch.Tensor) -> None:
    """The logging buffer sigma is also written to: one floating-point element on the weight's
    device (any floating dtype: the kernel rounds sigma to it)."""
    if (not _plain_tensor(sigma_buf) or sigma_buf.numel() != 1
            or not sigma_buf.is_floating_point() or sigma_buf.device != weight.device):
        raise ValueError(f"spectral_norm: sigma_buf must be a 1-element floating-point tensor on "
                         f"{weight.device}, got {_describe(sigma_buf)}")
    _check_in_place_update(sigma_buf)


def _plain_tensor(x) -> bool:
    """A tensor with storage of its own (not a wrapper subclass such as DTensor)."""
    return isinstance(x, torch.Tensor) and (type(x) in _PLAIN_TENSOR_TYPES or not is_traceable_wrapper_subclass(x))


def _describe(x) -> str:
    """``dtype shape on device`` of a bad tensor argument (or its type, if it is none)."""
    return f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))} on {getattr(x, 'device', None)}"


def _check_forward_inputs(weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps, training,
                          weight_checked: bool = False) -> int:
    """Every check of a forward launch (but the weight's ``fused_supported`` ones, if
    ``weight_checked``); returns ``dim`` normalized."""
    if weight_checked:
        _check_not_transformed(weight)
        dim %= weight.ndim  # the layer's is normalized already; a caller's negative dim must be too
        _check_vectors_and_args(weight, u, v, dim, n_power_iterations, eps)
    else:
        dim = check_inputs(weight, u, v, dim=dim, n_power_iterations=n_power_iterations, eps=eps)
    check_semaphore(sem, weight)
    check_sigma_buffer(sigma_buf, weight)
    _check_apart((("sem", sem), ("sigma_buf", sigma_buf)), (("weight", weight), ("u", u), ("v", v)))
    if _writes_uv(training, n_power_iterations):  # (no iteration: u and v are only read)
        _check_in_place_update(u, v)
    return dim


def _check_apart(written: tuple, read: tuple) -> None:
    """Refuse a tensor a kernel writes that overlaps, in memory, another one it writes or
    reads (``(name, tensor)`` pairs): the semaphore and ``sigma_buf`` (u, v and the weight:
    ``_vectors_error``). What it only reads may overlap (a gradient that is the weight)."""
    spans = [(name, _memory_span(t)) for name, t in written + read]
    for i in range(len(written)):
        for other, span in spans[i + 1:]:
            if _overlap(spans[i][1], span):
                raise ValueError(f"spectral_norm: {spans[i][0]} overlaps {other} in memory, and the "
                                 f"kernel writes into {spans[i][0]}")


# torch's own words (c10/core/TensorImpl, check_inplace) for an in-place op on an inference tensor.
_INFERENCE_IN_PLACE = ("Inplace update to inference tensor outside InferenceMode is not allowed."
                       "You can make a clone to get a normal tensor before doing inplace update."
                       "See https://github.com/pytorch/rfcs/pull/17 for more details.")


def _check_in_place_update(*tensors: torch.Tensor) -> None:
    """Refuse to write into an inference tensor outside ``torch.inference_mode()``, as torch does
    for any in-place op: u and v of a training read (PyTorch's SN updates them with
    ``F.normalize(..., out=u)``, which raises this error), the semaphore and ``sigma_buf``.

    A kernel writes through raw pointers, where torch's dispatcher does not look. (Not while
    Dynamo traces: compiled code takes its tensors' inference-ness from the trace.)"""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_inference():  # (not a tensor: the checks say so)
            raise RuntimeError(_INFERENCE_IN_PLACE)


def _check_backward_inputs(grad, weight, saved, sem, dim) -> int:
    """Every check of a backward launch (the op's: ``saved`` is the forward op's buffer);
    returns ``dim`` normalized."""
    dim = _check_weight(weight, dim)
    M = weight.shape[dim]
    length = weight.numel() // M + M + 1
    if (not isinstance(saved, torch.Tensor) or saved.ndim != 1 or saved.shape[0] != length
            or saved.stride(0) != 1 or saved.dtype != weight.dtype or saved.device != weight.device):
        raise ValueError(f"spectral_norm backward: saved must be the forward's [v | u | sigma] buffer: "
                         f"contiguous, ({length},), {weight.dtype} on {weight.device}; got {_describe(saved)}")
    check_semaphore(sem, weight)
    _check_grad(grad, weight)
    _check_apart((("sem", sem),), (("weight", weight), ("grad", grad), ("saved", saved)))
    return dim


def _transformed(t: torch.Tensor) -> bool:
    """Whether ``t`` comes under a transform whose tensors a kernel cannot read: ``torch.func``
    (grad, vmap, jacrev, ...), or autograd's own vmap of batched gradients
    (``is_grads_batched=True``, ``jacobian(vectorize=True)``)."""
    return torch._C._are_functorch_transforms_active() or torch._C._functorch.is_legacy_batchedtensor(t)


def _check_grad(grad, weight) -> None:
    if _transformed(grad):
        raise RuntimeError("spectral_norm backward: the fused kernel cannot read a batched gradient "
                           "(is_grads_batched=True, torch.func); the autograd Function runs torch ops "
                           "for those")
    if (not _plain_tensor(grad) or grad.shape != weight.shape or grad.dtype != weight.dtype
            or grad.device != weight.device):
        raise ValueError(f"spectral_norm backward: grad ({_describe(grad)}) must match the weight "
                         f"({_describe(weight)})")


def split_saved(saved: torch.Tensor, M: int, N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u, v, sigma)``: views of a forward's ``saved = [v (N) | u (M) | sigma]`` buffer."""
    v, u, sigma = saved.split([N, M, 1])
    return u, v, sigma.view(())


def _pack_saved(u: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The ``[v | u | sigma]`` buffer the backward kernel reads: the one that ``u``, ``v`` and
    ``sigma`` are views of when they come from ``spectral_norm_forward_fused`` (no copy),
    else a new one (each already checked: contiguous, of the weight's dtype and device)."""
    base = v._base
    if base is not None and u._base is base and sigma._base is base and base.ndim == 1 \
            and base.stride(0) == 1 and base.numel() == v.numel() + u.numel() + 1:
        start, size = base.data_ptr(), base.element_size()
        if (v.data_ptr(), u.data_ptr(), sigma.data_ptr()) == (
                start, start + v.numel() * size, start + (v.numel() + u.numel()) * size):
            return base
    return torch.cat([v, u, sigma.reshape(1)])


def spectral_norm_forward_fused(weight, u, v, sigma_buf, sem, *, dim=0, n_power_iterations=1,
                                eps=1e-12, training=True, **launch):
    """The forward launcher: allocates the outputs, launches, returns ``(W_sn, u, v, sigma)``:
    the u, v that sigma used and sigma (views of the one buffer autograd would keep, see
    ``split_saved``).

    ``launch`` may force ``num_programs`` / ``phase_by_phase`` (tests).
    """
    dim = _check_forward_inputs(weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps, training)
    out, saved = _forward_unchecked(weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps, training,
                                    **launch)
    return (out, *split_saved(saved, u.shape[0], v.shape[0]))


def _forward_unchecked(weight, u, v, sigma_buf, sem, dim, n_power_iterations, eps, training, **launch):
    """Allocate the outputs and launch; the inputs passed ``check_inputs`` (``dim`` normalized).

    Returns ``(W_sn, saved)``.
    """
    out = _empty_like_weight(weight)
    saved = torch.empty(u.shape[0] + v.shape[0] + 1, dtype=weight.dtype, device=weight.device)
    _launch_forward(weight, out, u, v, saved, sigma_buf, sem, dim, n_power_iterations, eps, training, **launch)
    if not torch.compiler.is_compiling() and _address(out) is not None:  # a real eager call (not a fake tensor)
        # The kernel wrote these through raw pointers: their version counters must say so, as an
        # in-place op's do, or a backward that saved one before this read would use the new values
        # without a word (autograd's "modified by an inplace operation" error, as PyTorch's SN
        # gives). Not the semaphore, which the barriers leave as they found it (and whose version
        # the layer reads as "torch code wrote it"). (The op's dispatcher bumps what it declares.)
        _increment_version((u, v, sigma_buf) if _writes_uv(training, n_power_iterations) else (sigma_buf,))
    return out, saved


def _writes_uv(training: bool, n_power_iterations: int) -> bool:
    """Whether a read writes u and v: training, with power iterations."""
    return training and n_power_iterations > 0


def spectral_norm_backward_fused(grad, weight, u, v, sigma, sem, *, dim=0, **launch):
    """The backward launcher, with the forward's u, v, sigma (``launch`` may force
    num_programs / phase_by_phase)."""
    dim = check_inputs(weight, u, v, dim=dim)
    check_semaphore(sem, weight)
    _check_grad(grad, weight)
    if not _plain_tensor(sigma) or sigma.numel() != 1 or sigma.dtype != weight.dtype \
            or sigma.device != weight.device:
        raise ValueError(f"spectral_norm backward: sigma must be a 1-element {weight.dtype} tensor on "
                         f"{weight.device}, got {_describe(sigma)}")
    _check_apart((("sem", sem),), (("weight", weight), ("grad", grad), ("u", u), ("v", v), ("sigma", sigma)))
    return _backward_unchecked(grad, weight, _pack_saved(u, v, sigma), sem, dim, **launch)


def _backward_unchecked(grad, weight, saved, sem, dim, **launch):
    """Allocate dW and launch; the inputs were checked (``dim`` normalized)."""
    grad_weight = _empty_like_weight(weight)
    _launch_backward(grad, weight, grad_weight, saved, sem, dim, **launch)
    return grad_weight
