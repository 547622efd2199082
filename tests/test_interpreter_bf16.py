"""tests/interpreter_bf16.py: the interpreter's bfloat16 conversions bit for bit against torch's and
exact arithmetic (a GPU's), through Triton kernels (``.to`` as the sn_fused kernels write it), and
arithmetic on bfloat16 refused.

Runs under ``TRITON_INTERPRET=1`` only (conftest installs the fix there); a GPU converts natively.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.errors import InterpreterError

import interpreter_bf16
from sn_fused.ops import INTERPRET
from sn_fused.ops import spectral_norm as ops

pytestmark = pytest.mark.skipif(not INTERPRET, reason="the Triton interpreter's bfloat16 (TRITON_INTERPRET=1)")


@triton.jit
def _convert(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, x + x)  # bfloat16 + bfloat16: computed on the bits without the fix


@triton.jit
def _convert_toward_zero(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(tl.bfloat16, fp_downcast_rounding="rtz"), mask=mask)


@triton.jit
def _plus(a, b):
    return a + b


@triton.jit
def _reduce(x_ptr, y_ptr, BLOCK: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, BLOCK))
    tl.store(y_ptr, tl.reduce(x, 0, _plus))


@triton.jit
def _sum(x_ptr, y_ptr, BLOCK: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, BLOCK))
    tl.store(y_ptr, tl.sum(x, axis=0))  # (in bfloat16 on a GPU: tl.sum does not widen it, tl.max does)


def _converted(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=dtype)
    _convert[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    return y


def _assert_bits(got: torch.Tensor, want: torch.Tensor):
    """Bit for bit, any NaN for a NaN (torch and the GPU choose their own NaN bits)."""
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    bad = (got.view(bits) != want.view(bits)) & ~nan
    assert not bad.any(), (f"{int(bad.sum())} differ, e.g. {want[bad][:4].tolist()} -> {got[bad][:4].tolist()}")


def test_installed():
    assert interpreter_bf16._installed and ops._INTERPRETER_BF16


def test_the_stock_interpreter_still_needs_it():
    """Triton's own conversions are still wrong (when this fails, Triton has fixed them: drop the
    fix, and let sn_fused take bfloat16 CPU weights without it)."""
    from triton.runtime.interpreter import TensorHandle
    up = interpreter_bf16.stock_cast_impl(None, TensorHandle(np.array([1], np.uint16), tl.bfloat16), tl.float32)
    down = interpreter_bf16.stock_cast_impl(None, TensorHandle(np.array([1 + 3 * 2**-9], np.float32), tl.float32),
                                            tl.bfloat16)
    assert (up.data[0], down.data[0]) == (0.0, 0x3F80)  # (exact: 2**-133 and 0x3F81, 1.0078125)
    assert interpreter_bf16.widen(np.array([1], np.uint16))[0] == 2.0**-133
    assert interpreter_bf16.narrow(np.array([1 + 3 * 2**-9], np.float32))[0] == 0x3F81


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_every_bfloat16_widens_exactly(dtype):
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    _assert_bits(_converted(x, dtype), x.to(dtype))


def test_float32_narrows_to_nearest_even():
    g = torch.Generator().manual_seed(torch.seed() % 2**63)
    random_bits = torch.randint(-2**31, 2**31, (30000,), dtype=torch.int64, generator=g).to(torch.int32)
    one = 0x3F800000
    special = [
        one + 0x8000,  # 1 + 2**-8: a tie, to the even 1.0
        one + 0x18000,  # 1 + 3 * 2**-8: a tie, to the even 1 + 2**-6
        one + 0xC000,  # 1 + 3 * 2**-9: above half, up (the stock interpreter truncates: 1.0)
        one + 0x7FFF, one + 0x8001,  # just below and above a tie
        0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF,  # the largest float32s: to Inf, at the tie to Inf, below
        0x7F800000, 0x7FC00000, 0x7FA00001, 0x00000001, 0x00008000, 0x00018000, 0x007FFFFF,  # Inf, NaNs, subnormals
        0x00800000, 0,
    ]
    special = torch.tensor(special + [b | -2**31 for b in special], dtype=torch.int64).to(torch.int32)
    x = torch.cat([random_bits, special]).view(torch.float32)
    _assert_bits(_converted(x, torch.bfloat16), x.to(torch.bfloat16))


def _nearest_even(x: float) -> int:
    """bfloat16 bits of ``x`` rounded to nearest even, from exact fractions (the oracle)."""
    sign = 0x8000 if math.copysign(1.0, x) < 0 else 0
    if math.isinf(x):
        return sign | 0x7F80
    bits = int(np.searchsorted(_POSITIVE, abs(x)))  # the first finite bfloat16 >= |x| (0x7F80: above all)
    if bits < 0x7F80 and _POSITIVE[bits] == abs(x):
        return sign | bits
    lo, hi = Fraction(float(_POSITIVE[bits - 1])), Fraction(2**128 if bits == 0x7F80 else float(_POSITIVE[bits]))
    below, above = Fraction(abs(x)) - lo, hi - Fraction(abs(x))  # (Inf: as the next step past the largest)
    return sign | (bits - 1 if below < above or (below == above and (bits - 1) % 2 == 0) else bits)


_POSITIVE = torch.arange(0, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).double().numpy()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_floats_narrow_to_nearest_even(dtype):
    """float64 and float16 to bfloat16, against exact arithmetic (float64: rounded once, which
    torch's conversion, through float32, does not always do)."""
    g = torch.Generator().manual_seed(torch.seed() % 2**63)
    x = (torch.randn(4096, dtype=torch.float64, generator=g)
         * torch.logspace(-40, 39, 4096, dtype=torch.float64)).to(dtype)
    x[:2] = torch.tensor([float("inf"), -0.0])
    want = torch.tensor([_nearest_even(v) for v in x.double().tolist()], dtype=torch.int32).to(torch.int16)
    _assert_bits(_converted(x, torch.bfloat16), want.view(torch.bfloat16))


@pytest.mark.parametrize("kernel", [_add, _reduce, _sum])
def test_arithmetic_on_bfloat16_bits_is_refused(kernel):
    x = torch.randn(16).to(torch.bfloat16)
    with pytest.raises(InterpreterError, match="TypeError.*on a bfloat16 operand|TypeError.*over bfloat16 values"):
        kernel[(1,)](x, torch.empty_like(x), BLOCK=16)


def test_shapes_kept():
    """0-d and n-d arrays in, the same shapes out (the interpreter's scalars and blocks)."""
    for shape in ((), (1,), (2, 3)):
        x = np.full(shape, 1 + 3 * 2**-9, np.float32)
        bits = interpreter_bf16.narrow(x)
        assert bits.shape == shape and bits.dtype == np.uint16 and (bits == 0x3F81).all()
        back = interpreter_bf16.widen(bits)
        assert back.shape == shape and back.dtype == np.float32 and (back == 1.0078125).all()


BF16_MAX = float(torch.finfo(torch.bfloat16).max)


def test_float64_narrows_once():
    """float64 -> bfloat16 rounds once (torch goes through float32 and can round twice): values
    just above a bfloat16 tie that float32 rounds onto the tie, and their exact ties."""
    one_and_half_ulp = 1 + 2**-8  # a tie between 1.0 and 1 + 2**-7 (bfloat16 keeps 7 bits)
    x = np.array([one_and_half_ulp + 2**-30, one_and_half_ulp, one_and_half_ulp - 2**-30,
                  -(one_and_half_ulp + 2**-30), 1e39, -1e39, 1e-50,
                  BF16_MAX + 0.75 * 2.0**120, BF16_MAX + 0.25 * 2.0**120])  # (its ulp: 2**120)
    want = np.array([0x3F81, 0x3F80, 0x3F80, 0xBF81, 0x7F80, 0xFF80, 0x0000, 0x7F80, 0x7F7F], np.uint16)
    assert torch.tensor(x[0]).to(torch.bfloat16).item() == 1.0  # (torch: twice, to the tie, then even)
    np.testing.assert_array_equal(interpreter_bf16.narrow(x), want)
    y = torch.empty(len(x), dtype=torch.bfloat16)
    _convert[(1,)](torch.from_numpy(x), y, len(x), BLOCK=16)
    np.testing.assert_array_equal(y.view(torch.uint16).numpy(), want)


def test_integers_narrow_once():
    """int32/int64 -> bfloat16 as cvt.rn.bf16.s32/s64: once, not through float32 (2**24 + 2**16 + 1:
    float32 rounds it onto a bfloat16 tie, which then goes to even, 2**24)."""
    x = torch.tensor([2**24 + 2**16 + 1, -(2**24 + 2**16 + 1), 2**24 + 2**16, 3, 0, 2**31 - 1])
    want = torch.tensor([16908288.0, -16908288.0, 16777216.0, 3.0, 0.0, 2.0**31]).to(torch.bfloat16)
    for dtype in (torch.int32, torch.int64):
        _assert_bits(_converted(x.to(dtype), torch.bfloat16), want)


@pytest.mark.parametrize("fp8", [torch.float8_e5m2, torch.float8_e4m3fn])
def test_fp8_to_and_from_bfloat16(fp8):
    """fp8 <-> bfloat16 (Triton's create_fp_to_fp): through exact float32, as Triton converts float32."""
    x = torch.tensor([1.0, 2.0, 0.5, -3.0, 0.0, 0.375]).to(fp8)
    _assert_bits(_converted(x, torch.bfloat16), x.to(torch.bfloat16))
    b = torch.tensor([1.0, 2.0, 0.5, -3.0, 0.0, 0.375], dtype=torch.bfloat16)
    assert torch.equal(_converted(b, fp8).float(), b.float())


def test_float32_narrows_toward_zero_when_asked():
    """``fp_downcast_rounding="rtz"`` (cvt.rz.bf16.f32): truncation, NaN stays NaN."""
    x = torch.tensor([1 + 3 * 2**-9, -(1 + 3 * 2**-9), 3.5e38, float("nan"), float("-inf"), 1e-40])
    y = torch.empty(len(x), dtype=torch.bfloat16)
    _convert_toward_zero[(1,)](x, y, len(x), BLOCK=8)
    want = (x.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)
    _assert_bits(y, want)
