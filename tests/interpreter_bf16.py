r"""bfloat16 in Triton's interpreter, made exact, so CI runs the kernels' bfloat16 paths on a CPU.

Triton 3.6's interpreter stores a bfloat16 as its 16 bits (a numpy ``uint16``) and converts it
in ``InterpreterBuilder.cast_impl``, with three faults a GPU does not have:

* float32 -> bfloat16 truncates the mantissa (``cast_impl`` passes no rounding mode to
  ``_convert_float``; its "RTNE" would round half up without carrying into the exponent), where
  the GPU's ``cvt.rn.bf16.f32``, and torch, round to nearest even: ``1 + 3 * 2**-9`` gives
  1.0 instead of 1.0078125;
* bfloat16 -> float32 loses subnormals (``0x0001`` gives 0.0 instead of 2**-133), where the GPU
  widens every bfloat16 exactly (its bits, shifted left by 16);
* any other conversion from or to bfloat16 (to float64, from an integer) reads or writes the
  16 bits as an integer's value.

And arithmetic, comparisons and reductions on bfloat16 operands run on the ``uint16`` bits.
(So does a bfloat16 scalar used as a Python ``bool`` or index, which this leaves alone: the
interpreter patches those per launch, and the kernels use none.)

``install()`` replaces the conversions with exact ones (widening: the bits shifted; narrowing:
rounded to nearest even once, as the GPU does; fp8 through exact float32) and makes every
operation that would read a bfloat16 operand's bits as a number (arithmetic, compares, fma, dot,
reductions and scans, atomics but compare-and-swap) raise ``TypeError`` -- loads, stores, selects,
reshapes, ``abs`` and the like move the bits as a GPU does -- so a kernel that computed in
bfloat16 inside (rather than accumulating in float32, which sn_fused's kernels promise) fails
loudly here instead of computing on integers. It then lets sn_fused launch bfloat16 CPU weights
(``spectral_norm._INTERPRETER_BF16``), which it otherwise sends to the reference path.
``tests/conftest.py`` installs it under ``TRITON_INTERPRET=1``;
``tests/test_interpreter_bf16.py`` checks the conversions through Triton kernels against torch's
and exact arithmetic: all 65536 bfloat16 values, float32 ties, overflow, subnormals and NaN,
float64/float16/integer/fp8 sources, round-toward-zero.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter

# Operations that move bfloat16 bits without reading them as numbers (or build addresses and
# indices): left as Triton has them.
_BIT_MOVES = frozenset({
    "create_load", "create_store", "create_masked_load", "create_masked_store", "create_bitcast",
    "create_select", "create_splat", "create_unsplat", "create_broadcast", "create_expand_dims",
    "create_reshape", "create_trans", "create_cat", "create_join", "create_split", "create_gather",
    "create_make_range", "create_addptr", "create_int_to_ptr", "create_ptr_to_int",
    "create_get_program_id", "create_get_num_programs", "create_barrier", "create_assume",
    "create_print", "create_assert", "create_make_block_ptr", "create_advance",
    "create_tensor_pointer_load", "create_tensor_pointer_store", "create_descriptor_load",
    "create_descriptor_store", "create_descriptor_gather", "create_descriptor_scatter",
    "create_fabs",  # (clears the sign bit, as a GPU's abs does)
    "create_atomic_cas",  # (compares bits, as the GPU's compare-and-swap does)
})
# Conversions: replaced below (fp_ext, fp_trunc, si_to_fp, ... all call cast_impl).
_CASTS = frozenset({"create_fp_to_fp", "create_si_to_fp", "create_ui_to_fp", "create_fp_to_si",
                    "create_fp_to_ui", "create_fp_ext", "create_fp_trunc", "create_int_cast"})

_installed = False
#: Triton's own conversion (``cast_impl``), kept for the test that it still needs this fix.
stock_cast_impl = interpreter.InterpreterBuilder.cast_impl


def widen(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values (their 16 bits) as float32, exactly: the bits shifted left by 16."""
    return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


def narrow(values: np.ndarray) -> np.ndarray:
    """Float or integer values as bfloat16 bits, rounded to nearest even once (the GPU's
    ``cvt.rn.bf16.{f32,f64,s32,...}``; integers beyond 2**53 excepted)."""
    values = np.asarray(values)
    if values.dtype.kind != "f":
        values = values.astype(np.float64)  # (exact up to 2**53)
    if values.dtype == np.float64:
        values = _to_float32_rounded_to_odd(values)
    flat = np.ascontiguousarray(values.reshape(-1))  # (a 0-d array keeps its shape below)
    # (torch's float32 -> bfloat16 rounds to nearest even; from float64 it would round twice)
    return torch.from_numpy(flat).to(torch.bfloat16).view(torch.uint16).numpy().reshape(values.shape)


def _to_float32_rounded_to_odd(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounded to odd: an inexact result is the truncation with its last bit set,
    so rounding it again to nearest even, to bfloat16's 8 bits, rounds as once from float64."""
    f = x.astype(np.float32)
    back = f.astype(np.float64)
    inexact = (back != x) & np.isfinite(x)
    bits = f.view(np.uint32)
    bits = np.where(inexact & (np.abs(back) > np.abs(x)), bits - np.uint32(1), bits)  # toward zero
    return np.where(inexact, bits | np.uint32(1), bits).astype(np.uint32).view(np.float32)


def _narrowable(ty) -> bool:
    """Whether numpy holds ``ty``'s values as numbers (not the bits of a type it lacks, as fp8's)."""
    return ty.is_int() or ty in (tl.float16, tl.float32, tl.float64)


def _cast(original):
    @functools.wraps(original)
    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if src_ty == tl.bfloat16 and dst_ty == tl.bfloat16:
            return interpreter.TensorHandle(np.asarray(src.data).copy(), dst_ty)
        if src_ty == tl.bfloat16:  # exactly to float32, then as Triton converts float32
            return original(self, interpreter.TensorHandle(widen(src.data), tl.float32), dst_type)
        if dst_ty == tl.bfloat16:
            if not _narrowable(src_ty):  # (Triton sends fp8 through create_fp_to_fp)
                raise NotImplementedError(f"{src_ty} -> bfloat16 through cast_impl")
            return interpreter.TensorHandle(narrow(src.data), dst_ty)
        return original(self, src, dst_type)
    return cast_impl


def _fp_to_fp(original):
    """Triton's conversions to and from fp8, and those with a rounding mode asked for."""
    @functools.wraps(original)
    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if tl.bfloat16 not in (src_ty, dst_ty):
            return original(self, src, dst_type, rounding_mode)
        if src_ty == tl.bfloat16 and not _narrowable(dst_ty):  # to fp8: exactly to float32 first
            return original(self, interpreter.TensorHandle(widen(src.data), tl.float32), dst_type, rounding_mode)
        if not _narrowable(src_ty) and src_ty != tl.bfloat16:  # from fp8: exactly to float32 first
            src = original(self, src, tl.float32, None)
            return interpreter.TensorHandle(narrow(src.data), dst_ty)
        if rounding_mode == interpreter._ir.ROUNDING_MODE.RTZ and src_ty == tl.float32:
            bits = np.asarray(src.data).view(np.uint32)  # truncated: toward zero; NaN kept quiet
            out = np.where(np.isnan(src.data), np.uint32(0x7FC0), bits >> np.uint32(16)).astype(np.uint16)
            return interpreter.TensorHandle(out, dst_ty)
        if rounding_mode not in (None, interpreter._ir.ROUNDING_MODE.RTNE) and dst_ty == tl.bfloat16:
            raise NotImplementedError(f"{src_ty} -> bfloat16 with rounding {rounding_mode}")
        return self.cast_impl(src, dst_type)
    return create_fp_to_fp


def _refuse_bf16(name, original):
    @functools.wraps(original)
    def op(self, *args, **kwargs):
        for a in (*args, *kwargs.values()):
            if isinstance(a, interpreter.TensorHandle) and a.dtype.scalar == tl.bfloat16:
                raise TypeError(f"{name} on a bfloat16 operand: Triton's interpreter would compute on "
                                f"its 16 bits as an integer (tests/interpreter_bf16.py)")
        return original(self, *args, **kwargs)
    return op


def _refuse_bf16_reduce(original):
    @functools.wraps(original)
    def apply(self, input):
        for a in (input if isinstance(input, tuple) else (input,)):
            if isinstance(a, tl.core.tensor) and a.dtype.scalar == tl.bfloat16:
                raise TypeError("a reduction or scan over bfloat16 values: Triton's interpreter would "
                                "sum their 16 bits as integers (tests/interpreter_bf16.py)")
        return original(self, input)
    return apply


def install() -> None:
    """Make the interpreter's bfloat16 exact (conversions) or loud (anything else), once per
    process, and let sn_fused launch bfloat16 CPU weights."""
    global _installed
    if _installed:
        return
    builder = interpreter.InterpreterBuilder
    for name in dir(builder):
        if name.startswith("create_") and name not in _BIT_MOVES and name not in _CASTS:
            setattr(builder, name, _refuse_bf16(name, getattr(builder, name)))
    builder.cast_impl = _cast(builder.cast_impl)
    builder.create_fp_to_fp = _fp_to_fp(builder.create_fp_to_fp)
    interpreter.ReduceScanOpInterface.apply = _refuse_bf16_reduce(interpreter.ReduceScanOpInterface.apply)
    from sn_fused.ops import spectral_norm
    spectral_norm._INTERPRETER_BF16 = True
    _installed = True
