"""The C++ eager read (``sn_fused._C``, ``csrc/spectral_norm_read.cpp``) against the Python path.

A layer's eager reads go through the C++ read where it is built (``ops.spectral_norm.CPP_READS``);
the Python path (``_SpectralNormFunction``) is the same kernels through the same launchers. So
the two must agree bit for bit: W_sn, u, v, sigma, gradients. Under ``TRITON_INTERPRET=1`` the
kernels run in Triton's interpreter, and the C++ read launches through ``_launch`` on every
read (the interpreter keeps no runner); ``interpreter_runners`` makes ``_launch`` keep one per
launch signature that runs the interpreter, so that the C++ read's own launch path -- its
argument tuple handed to a kept runner, its alignment key -- runs real kernels too.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import subprocess
import sys
import zlib
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sn_fused
from bench import host_time
from conftest import cuda_kernel_names, fused_device_or_skip, two_tensor
from sn_fused import reference
from sn_fused.ops import kernels
from sn_fused.ops import spectral_norm as snm

device = fused_device_or_skip()

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
]
needs_cpp = pytest.mark.skipif(not snm.CPP_READS, reason="sn_fused._C is not built (SN_FUSED_BUILD_CPP=1 "
                               "python setup.py build_ext --inplace), or switched off (SN_FUSED_CPP=0)")


def test_built_where_required():
    """tests/run.sh builds the extension (.ci/env.sh) and says so: then it must load and be on,
    or the suite would pass on the Python path alone without a word."""
    if os.environ.get("SN_FUSED_REQUIRE_CPP") != "1":
        pytest.skip("sn_fused._C not required here (tests/run.sh requires it where it built it)")
    assert snm._cpp is not None, "sn_fused._C was built but does not import"
    assert snm.CPP_READS or os.environ.get("SN_FUSED_CPP") == "0"


@contextlib.contextmanager
def python_path():
    with mock.patch.object(snm, "CPP_READS", False):
        yield


# name: (module, spectral_norm's keyword arguments)
LAYERS = {
    "linear": lambda: (torch.nn.Linear(13, 7, bias=False), {}),
    "conv_transpose": lambda: (torch.nn.ConvTranspose2d(5, 4, 3, bias=False), {"dim": 1}),
    # a non-contiguous weight, read through its strides
    "channels_last": lambda: (torch.nn.Conv2d(3, 6, 3, bias=False).to(memory_format=torch.channels_last), {}),
    # several programs on the interpreter: several launches per read
    "wide": lambda: (torch.nn.Linear(640, 40, bias=False), {}),
}


def make_twins(kind, gen, dtype=torch.float32, n_power_iterations=1):
    """Two equal sn_fused layers (weight, u and v drawn from ``gen``), one for each path."""
    module, kwargs = LAYERS[kind]()
    with torch.no_grad():
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen, dtype=torch.float64))
    module = module.to(device=device, dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
        ours = sn_fused.spectral_norm(module, n_power_iterations=n_power_iterations, **kwargs)
    return ours, copy.deepcopy(ours)


def state(m):
    p = m.parametrizations.weight[0]
    return p._u.clone(), p._v.clone(), p._sigma.clone()


def read_steps(m, grads, train=True):
    """Reads with their backward, one per incoming gradient; what each left behind."""
    m.train(train)
    out = []
    for g in grads:
        w = m.weight
        w.backward(g)
        out.append((w.detach().clone(), *state(m), m.parametrizations.weight.original.grad.clone(),
                    w.grad_fn.name()))
    return out


def assert_equal_steps(cpp, python):
    for step, (a, b) in enumerate(zip(cpp, python)):
        for name, x, y in zip(("W_sn", "u", "v", "sigma", "grad"), a[:5], b[:5]):
            assert torch.equal(x, y), f"step {step}: {name} differs"
    assert all("CppNode<sn_fused::SpectralNormFunction>" in s[5] for s in cpp), [s[5] for s in cpp]
    assert all(s[5] == "_SpectralNormFunctionBackward" for s in python), [s[5] for s in python]


# Each small layer in each dtype (bfloat16 on a CPU too: tests/interpreter_bf16.py); the
# several-program one in float32.
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
READ_CASES = [(kind, dtype) for kind in ("linear", "conv_transpose", "channels_last")
              for dtype in DTYPES] + [("wide", torch.float32)]


@needs_cpp
@pytest.mark.parametrize("kind, dtype", READ_CASES, ids=[f"{k}-{str(d)[6:]}" for k, d in READ_CASES])
@pytest.mark.parametrize("train", [True, False])
def test_read_matches_python_path_bit_for_bit(kind, dtype, train, gen):
    """Three reads with backward: W_sn, u, v, sigma and the accumulated gradient equal the
    Python path's bit for bit (the reads after registration's take the C++ read: its node)."""
    cpp_layer, py_layer = make_twins(kind, gen, dtype, n_power_iterations=2)
    shape = cpp_layer.parametrizations.weight.original.shape
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype) for _ in range(3)]
    cpp = read_steps(cpp_layer, grads, train)
    with python_path():
        python = read_steps(py_layer, grads, train)
    assert_equal_steps(cpp, python)


@contextlib.contextmanager
def interpreter_runners():
    """``_launch`` keeps a runner per launch signature, as on a GPU, that launches through
    Triton's own entry point (the interpreter's, on a CPU; ``host_time.kept_runners``); yields
    ``(launch_calls, runner_calls)``, counts of the calls of ``_launch`` and of the runners."""
    launch_calls = [0]
    launch = snm._launch

    def counted_launch(*args, **kwargs):
        launch_calls[0] += 1
        return launch(*args, **kwargs)

    def triton_launch(kernel, grid, cfg, cooperative, args):
        kernel[(grid,)](*args, num_warps=cfg.num_warps, launch_cooperative_grid=cooperative)

    with host_time.kept_runners(triton_launch) as runner_calls, mock.patch.object(snm, "_launch", counted_launch):
        yield launch_calls, runner_calls


@needs_cpp
@pytest.mark.parametrize("kind", ["linear", "channels_last", "wide"])
def test_kept_runners_launch_from_cpp(kind, gen):
    """With kept runners (the GPU's eager path) the C++ read and its backward call them
    themselves after their first launch: no ``_launch`` call, one runner call per launch; the
    same numbers as the Python path with the same runners. A weight of another 16-byte
    alignment goes through ``_launch`` once (Triton specializes on it), then its own runners.
    (channels_last: the incoming gradients are contiguous, not W_sn's strides: the node's
    backward calls the Python one, which keeps its own runners.)"""
    cpp_layer, py_layer = make_twins(kind, gen)
    original = cpp_layer.parametrizations.weight.original
    grads = [torch.randn(original.shape, generator=gen).to(device) for _ in range(4)]
    stride = original.stride()
    n_forward = len(snm._forward_plan(original.shape, stride, stride, 0, original.device, 1, True, None,
                                      None).launches)
    n_backward = len(snm._backward_plan(original.shape, stride, stride, stride, 0, original.device, None,
                                        None).launches)
    prepared_backward = kind != "channels_last"
    with interpreter_runners() as (launch_calls, runner_calls):
        cpp = read_steps(cpp_layer, grads[:1])
        assert (launch_calls[0], runner_calls[0]) == (n_forward + n_backward, 0)
        cpp += read_steps(cpp_layer, grads[1:2])
        # (the Python backward calls _launch, which calls the runner it keeps)
        assert launch_calls[0] == n_forward + n_backward + (0 if prepared_backward else n_backward)
        assert runner_calls[0] == n_forward + n_backward
        with torch.no_grad():  # a weight at another alignment: same values, storage 4 bytes on
            moved = torch.empty(original.numel() + 1, device=device)[1:]
            moved = moved.as_strided(original.shape, stride).copy_(original)
            assert moved.data_ptr() % 16 != 0
            original.data = moved
        launches, runs = launch_calls[0], runner_calls[0]
        cpp += read_steps(cpp_layer, grads[2:4])
        assert launch_calls[0] - launches == n_forward + n_backward * (1 if prepared_backward else 2)
        assert runner_calls[0] - runs == n_forward + n_backward
        with python_path():
            py_original = py_layer.parametrizations.weight.original
            python = read_steps(py_layer, grads[:2])
            with torch.no_grad():
                moved = torch.empty(original.numel() + 1, device=device)[1:]
                py_original.data = moved.as_strided(original.shape, stride).copy_(py_original)
            python += read_steps(py_layer, grads[2:4])
    assert_equal_steps(cpp, python)


@needs_cpp
@pytest.mark.parametrize("kind", ["linear", "wide"])
def test_python_path_and_cpp_read_share_runners(kind, gen):
    """The C++ read keys its launches as the Python path does (``_forward_key``,
    ``_backward_key``): after the Python path's read and backward, a C++ read and backward of
    the same layer find every runner kept and keep none of their own."""
    layer = make_twins(kind, gen)[0]
    original = layer.parametrizations.weight.original
    grads = [torch.randn(original.shape, generator=gen).to(device) for _ in range(2)]
    with interpreter_runners() as (launch_calls, runner_calls):
        with python_path():
            read_steps(layer, grads[:1])
        kept = dict(snm._RUNNERS)
        assert kept and runner_calls[0] == 0
        steps = read_steps(layer, grads[1:])
        assert "CppNode" in steps[0][5]
        assert snm._RUNNERS == kept
        assert runner_calls[0] == len(kept)  # each launch of the C++ read and backward ran a kept one


def _signature_inputs():
    return dict(weight=torch.nn.Parameter(torch.randn(5, 6)), u=torch.randn(5), v=torch.randn(6),
                sigma_buf=torch.zeros(()), sem=torch.zeros(2, dtype=torch.int32), dim=0, n_power_iterations=1,
                eps=1e-12)


def _inference(t):
    with torch.inference_mode():
        return t.clone()


NAN_EPS = float("nan")
# name: (change of the inputs, whether the signature still matches)
SIGNATURE_CHANGES = {
    "another_weight_alike": (lambda a: a.update(weight=torch.nn.Parameter(torch.zeros(5, 6))), True),
    "weight_shape": (lambda a: a.update(weight=torch.nn.Parameter(torch.zeros(6, 5))), False),
    "weight_strides": (lambda a: a.update(weight=torch.nn.Parameter(torch.zeros(6, 5).t())), False),
    "weight_dtype": (lambda a: a.update(weight=torch.nn.Parameter(torch.zeros(5, 6, dtype=torch.float64))), False),
    "weight_device": (lambda a: a.update(weight=torch.nn.Parameter(torch.zeros(5, 6, device="meta"))), False),
    "weight_plain_tensor": (lambda a: a.update(weight=a["weight"].detach()), False),
    "weight_subclass": (lambda a: a.update(weight=two_tensor(a["weight"].detach())), False),
    # (not the weight's address, above: FSDP's re-gathered parameters move every read)
    "u_another_alike": (lambda a: a.update(u=a["u"].clone()), False),  # the same but for its address
    "v_another_alike": (lambda a: a.update(v=a["v"].clone()), False),
    "sigma_another_alike": (lambda a: a.update(sigma_buf=a["sigma_buf"].clone()), False),
    "sem_another_alike": (lambda a: a.update(sem=a["sem"].clone()), False),
    "u_requires_grad": (lambda a: a["u"].requires_grad_(), False),
    "v_requires_grad": (lambda a: a["v"].requires_grad_(), False),
    "sigma_requires_grad": (lambda a: a["sigma_buf"].requires_grad_(), True),  # (only written)
    "u_length": (lambda a: a.update(u=torch.zeros(6)), False),
    "u_strides": (lambda a: a.update(u=torch.zeros(10)[::2]), False),
    "u_dtype": (lambda a: a.update(u=a["u"].double()), False),
    "u_inference": (lambda a: a.update(u=_inference(a["u"])), False),
    "v_inference": (lambda a: a.update(v=_inference(a["v"])), False),
    "v_resized_in_place": (lambda a: a["v"].resize_(7), False),
    "sigma_inference": (lambda a: a.update(sigma_buf=_inference(a["sigma_buf"])), False),
    "sem_inference": (lambda a: a.update(sem=_inference(a["sem"])), False),
    "v_none": (lambda a: a.update(v=None), False),
    "sigma_shape": (lambda a: a.update(sigma_buf=torch.zeros(1)), False),
    "sigma_dtype": (lambda a: a.update(sigma_buf=torch.zeros((), dtype=torch.float64)), False),
    "sem_dtype": (lambda a: a.update(sem=torch.zeros(2, dtype=torch.int64)), False),
    "sem_strides": (lambda a: a.update(sem=torch.zeros(4, dtype=torch.int32)[::2]), False),
    "sem_none": (lambda a: a.update(sem=None), False),
    "dim_value": (lambda a: a.update(dim=1), False),
    "dim_negative": (lambda a: a.update(dim=-2), False),
    "dim_bool": (lambda a: a.update(dim=False), False),  # == 0, another type
    "n_value": (lambda a: a.update(n_power_iterations=2), False),
    "n_float": (lambda a: a.update(n_power_iterations=1.0), False),
    "n_tensor": (lambda a: a.update(n_power_iterations=torch.tensor(1)), False),
    "eps_value": (lambda a: a.update(eps=1e-11), False),
    "eps_int": (lambda a: a.update(eps=0), False),
    "eps_nan_other_object": (lambda a: a.update(eps=float("nan")), False),
}


@needs_cpp
@pytest.mark.parametrize("change", list(SIGNATURE_CHANGES))
def test_read_signature_matches_as_the_python_signature(change):
    """``_C.ReadSignature.matches`` (the layer's check-skipping test on the C++ read) says what
    comparing ``_input_signature`` tuples says, for a change of each part: the same inputs, or
    weights alike, match; another type, shape, stride, dtype, device, inference-ness, count or
    eps does not, nor another u, v, sigma_buf or sem alike (their addresses: what overlaps what)
    or a u or v that requires grad; a buffer that is not a tensor does not (the checks then say
    what is wrong)."""
    for eps in (1e-12, NAN_EPS):  # a NaN eps matches itself (the same object), as in a tuple
        base = {**_signature_inputs(), "eps": eps}
        cpp, python = snm._cpp.ReadSignature(**base), snm._InputSignature(snm._input_signature(**base))
        assert cpp.matches(**base) and python.matches(**base)
        inputs = dict(base)
        edit, expected = SIGNATURE_CHANGES[change]
        edit(inputs)
        assert python.matches(**inputs) == expected, "the Python signature"
        assert cpp.matches(**inputs) == expected, "the C++ signature"


@needs_cpp
def test_no_grad_read(gen):
    """A read with nothing to record takes the C++ read too: no grad_fn, the recorded read's
    numbers."""
    a, b = make_twins("linear", gen)
    with torch.no_grad(), mock.patch.object(snm._cpp, "forward", side_effect=snm._cpp.forward) as forward:
        out = a.weight
    assert forward.call_count == 1
    assert out.grad_fn is None and not out.requires_grad
    ref = b.weight  # (a deep copy's first read takes the checked path: the Python one)
    assert torch.equal(out, ref.detach())
    assert all(torch.equal(x, y) for x, y in zip(state(a), state(b)))


@needs_cpp
def test_plans_cleared_prepare_again(gen):
    """``_clear_plans`` (a tuning knob changed) makes layers prepare their reads anew: the
    prepared launches hold a plan."""
    m, _ = make_twins("linear", gen)
    m.weight
    with mock.patch.object(snm, "_prepared_read", side_effect=snm._prepared_read) as prepare:
        m.weight
        assert prepare.call_count == 0
        snm._clear_plans()
        m.weight
        m.weight
        assert prepare.call_count == 1
        m.eval()
        m.weight
        assert prepare.call_count == 2  # eval reads are another launch


@needs_cpp
def test_copies_check_and_prepare_their_own(gen):
    """A deep copy keeps neither the checked signature (a C++ ReadSignature, which neither copies
    nor pickles) nor the prepared launches (which hold the original's runners): its first read
    is checked, its next one prepares its own, and it reads as the Python path does. So does a
    pickle of the parametrization (torch pickles no parametrized module whole)."""
    m, _ = make_twins("linear", gen)
    m.weight
    m.weight
    p = m.parametrizations.weight[0]
    assert type(p._checked_read[0]) is snm._cpp.ReadSignature
    assert p._checked_read[2][1] is not None
    assert pickle.loads(pickle.dumps(p))._checked_read is None
    twin = copy.deepcopy(m)
    q = twin.parametrizations.weight[0]
    assert q._checked_read is None and p._checked_read is not None  # (the original keeps its own)
    expected = copy.deepcopy(m)
    with python_path():
        ref = [expected.weight for _ in range(2)]
    assert all(torch.equal(twin.weight, r) for r in ref)
    assert type(q._checked_read[0]) is snm._cpp.ReadSignature and q._checked_read[2][1] is not None
    assert all(torch.equal(x, y) for x, y in zip(state(twin), state(expected)))


@needs_cpp
def test_double_backward_and_batched_gradients(gen):
    """The node's backward calls the Python path's (``_eager_backward``): a gradient penalty
    (create_graph=True, then a second backward) and batched gradients agree with it."""
    results = []
    a, b = make_twins("linear", gen)
    shape = a.parametrizations.weight.original.shape
    g = torch.randn(shape, generator=gen).to(device)
    batch = torch.randn((3, *shape), generator=gen).to(device)
    for m, ctx in ((a, contextlib.nullcontext()), (b, python_path())):
        with ctx:
            w0 = m.parametrizations.weight.original
            w = m.weight
            (dw,) = torch.autograd.grad(w, w0, g, create_graph=True)
            (ddw,) = torch.autograd.grad(dw.square().sum(), w0)
            w = m.weight
            (batched,) = torch.autograd.grad(w, w0, batch, is_grads_batched=True)
            results.append((dw.detach(), ddw, batched, w.grad_fn.name()))
    assert "CppNode" in results[0][3] and "CppNode" not in results[1][3]
    for x, y in zip(results[0][:3], results[1][:3]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@needs_cpp
def test_gradcheck_float64(gen):
    """``gradcheck`` of the C++ read itself (``_C.read`` with its prepared launches), in eval
    mode: W / (u^T W v) with u, v fixed. (A training read's u, v move with W, which its
    gradient takes as constants, as PyTorch's does: no function of W to check it against.)"""
    weight = torch.randn(6, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    u0 = torch.nn.functional.normalize(torch.randn(6, generator=gen, dtype=torch.float64), dim=0).to(device)
    v0 = torch.nn.functional.normalize(torch.randn(5, generator=gen, dtype=torch.float64), dim=0).to(device)
    u, v = u0.clone(), v0.clone()
    sigma_buf, sem = torch.zeros((), dtype=torch.float64, device=device), snm.new_semaphore(device)
    prepared = snm._prepared_read(weight, u, v, sigma_buf, sem, 0, 1, 1e-12, False)

    def read(w):
        return snm._cpp.read(prepared, w, u, v, sigma_buf, sem, 0)

    out = read(weight)
    assert "CppNode" in out.grad_fn.name()
    expected, _ = reference.spectral_norm_reference(weight.detach(), u0, v0, training=False)
    torch.testing.assert_close(out.detach(), expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(read, (weight,))
    assert torch.equal(u, u0) and torch.equal(v, v0)  # an eval read leaves them


class _PassThrough(TorchDispatchMode):
    """A dispatch mode that only runs each op (and lists it)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def backward_callback(fn):
    """The node's Python backward (``ops._eager_backward``) replaced by ``fn`` for a block."""
    snm._cpp.set_callbacks(fn, snm._fast_launches_ok)
    try:
        yield
    finally:
        snm._cpp.set_callbacks(snm._eager_backward, snm._fast_launches_ok)


@needs_cpp
def test_backward_takes_prepared_launches_or_calls_python(gen):
    """The node's backward launches itself for a gradient with W_sn's strides (autograd's
    usual), and calls ``ops._eager_backward`` for any other (here ``sum()``'s expanded one),
    under a dispatch mode or launch hooks, and with grad mode on (create_graph=True): each
    gives the Python path's gradient bit for bit."""
    cpp_layer, py_layer = make_twins("linear", gen)
    original = cpp_layer.parametrizations.weight.original
    g = torch.randn(original.shape, generator=gen).to(device)
    called = []

    def counted(*args):
        called.append(args[0].stride())
        return snm._eager_backward(*args)

    cases = [("contiguous", lambda w: w.backward(g), contextlib.nullcontext, False),
             ("expanded", lambda w: w.sum().backward(), contextlib.nullcontext, True),
             ("dispatch mode", lambda w: w.backward(g), _PassThrough, True),
             ("launch hooks", lambda w: w.backward(g), lambda: mock.patch.object(snm, "_launch_hooks_set", lambda: True),
              True),
             ("create_graph", lambda w: w.backward(g, create_graph=True), contextlib.nullcontext, True)]
    for name, backward, during_backward, python in cases:
        for m in (cpp_layer, py_layer):
            m.parametrizations.weight.original.grad = None
        w = cpp_layer.weight
        with backward_callback(counted), during_backward():
            backward(w)
        assert len(called) == python, name
        called.clear()
        with python_path():
            backward(py_layer.weight)
        assert torch.equal(original.grad, py_layer.parametrizations.weight.original.grad), name
        assert all(torch.equal(x, y) for x, y in zip(state(cpp_layer), state(py_layer))), name


@needs_cpp
def test_backward_error_keeps_its_type(gen):
    """An error raised in the node's Python backward reaches ``backward()``'s caller as itself."""
    m, _ = make_twins("linear", gen)
    w = m.weight

    def fails(*args):
        raise ValueError("from the backward")
    with backward_callback(fails), pytest.raises(ValueError, match="from the backward"):
        w.sum().backward()  # (an expanded gradient: the Python backward's)
    m.weight.sum().backward()  # and back to the real one


@needs_cpp
def test_inplace_change_of_the_weight_is_caught(gen):
    """The node saves the weight as autograd's saved variable: a change in place is caught."""
    m, _ = make_twins("linear", gen)
    w = m.weight
    with torch.no_grad():
        m.parametrizations.weight.original.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        w.sum().backward()


@needs_cpp
def test_dispatch_modes_and_launch_hooks_take_the_python_path(gen):
    """Under a TorchDispatchMode (FakeTensorMode, FLOP counters...) or with Triton launch hooks
    (profilers) a read goes through the Python path, which leaves them to ``_launch``: a kept
    runner would hand a fake tensor to the driver, or skip the hooks."""
    m, twin = make_twins("linear", gen)
    m.weight
    with _PassThrough() as mode:
        w = m.weight
    assert w.grad_fn.name() == "_SpectralNormFunctionBackward" and mode.ops
    with mock.patch.object(snm, "_launch_hooks_set", lambda: True):
        w = m.weight
    assert w.grad_fn.name() == "_SpectralNormFunctionBackward"
    assert "CppNode" in m.weight.grad_fn.name()
    with python_path():
        for _ in range(4):  # registration's read, then the four above, one per read
            twin.weight
    assert torch.equal(m.weight, twin.weight)  # (and a fifth on each)
    assert all(torch.equal(x, y) for x, y in zip(state(m), state(twin)))


def _sn_launches(fn):
    """The sn_fused kernels ``fn()`` launches, in order, as "fwd" / "bwd". On CUDA the C++ read
    launches through kept runners (``_direct_runner``), which ``JITFunction.run`` never sees, and
    a Triton launch hook would switch the C++ read off (``_fast_launches_ok``): the profiler
    counts the kernels that ran. The interpreter keeps no runner: every launch goes through ``run``."""
    if device == "cuda":
        return ["fwd" if "fwd" in n else "bwd" for n in cuda_kernel_names(fn) if "spectral_norm" in n]
    runs = []
    fwd, bwd = kernels.spectral_norm_fwd_kernel, kernels.spectral_norm_bwd_kernel
    original_fwd, original_bwd = fwd.run, bwd.run
    with mock.patch.object(fwd, "run", side_effect=lambda *a, **k: runs.append("fwd") or original_fwd(*a, **k)), \
            mock.patch.object(bwd, "run", side_effect=lambda *a, **k: runs.append("bwd") or original_bwd(*a, **k)):
        fn()
    return runs


@needs_cpp
def test_one_launch_per_read_and_per_backward(gen):
    """Issue #3's count, on the C++ read: one forward launch per read, one backward launch."""
    m, _ = make_twins("linear", gen)
    out = []
    assert _sn_launches(lambda: out.append(m.weight)) == ["fwd"]
    assert "CppNode" in out[0].grad_fn.name()  # the read above was the C++ read's
    assert _sn_launches(lambda: out[0].sum().backward()) == ["bwd"]


def test_switched_off_by_environment():
    """``SN_FUSED_CPP=0``: reads stay on the Python path even where the extension is built."""
    code = "from sn_fused.ops import spectral_norm as s; print(s.CPP_READS, s._cpp is not None)"
    env = dict(os.environ, SN_FUSED_CPP="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "False", out


def _pack_contiguous():
    """A saved-tensor hook that gives each saved tensor back contiguous (as
    ``save_on_cpu(pin_memory=True)`` does): a weight saved channels-last comes back with
    other strides."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(memory_format=torch.contiguous_format),
                                                    lambda t: t)


@needs_cpp
@pytest.mark.parametrize("case", ["saved-tensor hook", "memory format changed"])
def test_backward_of_a_weight_with_other_strides(case, gen):
    """The prepared backward was planned for the weight's strides at read time: a weight that
    comes back from autograd with others (a saved-tensor hook that repacks it; ``.data`` set by
    ``Module.to(memory_format=...)`` between read and backward) goes to the Python backward,
    which plans for what it gets: the Python path's gradient, bit for bit. (Found in review:
    the prepared launch read it with the old strides.)"""
    results = []
    for path in ("cpp", "python"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(case.encode()))
            conv = torch.nn.Conv2d(3, 6, 3, bias=False).to(device=device, memory_format=torch.channels_last)
            m = sn_fused.spectral_norm(conv)
        m.weight
        with python_path() if path == "python" else contextlib.nullcontext():
            if case == "saved-tensor hook":
                with _pack_contiguous():
                    w = m.weight
                g = torch.ones_like(w)  # (keeps W_sn's channels-last strides)
            else:
                w = m.weight
                g = torch.ones_like(w)
                m.to(memory_format=torch.contiguous_format)
            assert g.stride() == w.stride()
            w.backward(g)
        results.append(m.parametrizations.weight.original.grad)
    assert torch.equal(results[0], results[1])


@needs_cpp
def test_compiled_autograd(gen):
    """A backward under compiled autograd runs the node as an opaque call: its saved data must
    be what compiled autograd can collect (ints and tensors; found in review: a capsule failed
    with "unhashable type"). The Python path's gradient, bit for bit."""
    from torch._dynamo import compiled_autograd

    cpp_layer, py_layer = make_twins("linear", gen)
    grads = []
    for m, ctx in ((cpp_layer, contextlib.nullcontext()), (py_layer, python_path())):
        with ctx:
            w = m.weight
            scale = torch.arange(w.numel(), dtype=w.dtype, device=device).view(w.shape)
            with compiled_autograd._enable(torch.compile(backend="eager")):
                (w * scale).sum().backward()
        grads.append(m.parametrizations.weight.original.grad)
        torch._dynamo.reset()
    assert torch.equal(grads[0], grads[1])


@needs_cpp
def test_node_has_one_input_like_the_python_function(gen):
    """The node's inputs are the weight's alone (u, v, sigma and the semaphore need no
    gradient): one next function, and a post-hook that returns one gradient works. (Found in
    review: they were node inputs too, five of them.)"""
    cpp_layer, py_layer = make_twins("linear", gen)
    grads = []
    for m, ctx in ((cpp_layer, contextlib.nullcontext()), (py_layer, python_path())):
        with ctx:
            w = m.weight
            assert len(w.grad_fn.next_functions) == 1
            w.grad_fn.register_hook(lambda grad_inputs, grad_outputs: (grad_inputs[0] * 2,))
            w.backward(torch.ones_like(w))
        grads.append(m.parametrizations.weight.original.grad)
    assert torch.equal(grads[0], grads[1])


class _Subclass(torch.Tensor):
    pass


@needs_cpp
def test_tensor_subclass_weight_keeps_its_type(gen):
    """A plain torch.Tensor subclass weight reads through the Python path every time: its W_sn is
    of its class, as ``torch.empty_like`` makes it (found in review: from the second read on, the
    C++ read gave a plain tensor)."""
    m, _ = make_twins("linear", gen)
    parametrization = m.parametrizations.weight[0]
    w = m.parametrizations.weight.original.detach().as_subclass(_Subclass).requires_grad_()
    for _ in range(3):
        out = parametrization(w)
        assert type(out) is _Subclass and out.grad_fn.name() == "_SpectralNormFunctionBackward"


class _FunctionPassThrough(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@needs_cpp
def test_torch_function_mode_takes_the_python_path(gen):
    """Under a TorchFunctionMode a read goes through the Python path, whose allocations the mode
    sees (the C++ read's it would not)."""
    m, _ = make_twins("linear", gen)
    m.weight
    with _FunctionPassThrough():
        w = m.weight
    assert w.grad_fn.name() == "_SpectralNormFunctionBackward"


def test_import_without_the_extension_is_silent(tmp_path):
    """Where ``sn_fused._C`` is not built (the default ``pip install .``) importing sn_fused says
    nothing and reads go through the Python path. (Found in review: ``from .. import _C`` inside
    the importing package raised a plain ImportError, which was reported as a broken build.)"""
    import shutil

    shutil.copytree(os.path.dirname(sn_fused.__file__), tmp_path / "sn_fused",
                    ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    # (Without an editable install's finder, which would find the checkout's sn_fused._C by name.)
    code = ("import sys, warnings; warnings.simplefilter('error'); sys.path.insert(0, sys.argv[1]); "
            "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', type(f).__module__)"
            ".startswith('__editable__')]; "
            "from sn_fused.ops import spectral_norm as s; print(s.CPP_READS, s._cpp, s.__file__)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "None", str(tmp_path / "sn_fused" / "ops" / "spectral_norm.py")], out
