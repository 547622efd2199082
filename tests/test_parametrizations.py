"""Side-by-side tests: ``sn_fused.spectral_norm`` vs ``torch.nn.utils.parametrizations.spectral_norm``.

Every test builds one module, deep-copies it, registers PyTorch's spectral
norm on one copy and sn_fused's on the other (``torch.manual_seed`` before
each registration, so both draw the same u, v), then drives both the same
way and compares.

The file runs in whichever mode the process is in:

* ``TRITON_INTERPRET=1`` (set before importing triton): float CPU weights go
  through the real Triton kernels in the interpreter (slow: sizes are tiny);
* otherwise CPU weights take the pure-PyTorch reference path, and, where a
  GPU is present, the ``cuda`` cases run the compiled kernels.

``test_expected_path`` checks which path a weight takes, so the comparisons
are known to exercise the kernels where they should.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import zlib
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as torch_sn

import sn_fused
from conftest import HALF_TOL, list_forward_calls
from sn_fused.ops import INTERPRET, fused_supported

sn = sn_fused.spectral_norm

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not INTERPRET else [])

# Tolerances. fp32: the kernels reduce in another order than cuBLAS/MKL, so
# results agree to a few ulps times the condition of the power iteration.
# float64: tight.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-11, atol=1e-12),
    torch.complex64: dict(rtol=1e-5, atol=1e-6),
}
# u and v are eigenvector estimates: rounding differences are amplified by
# 1 / (relative singular-value gap), so they get a looser absolute tolerance.
VEC_TOL = {
    torch.float32: dict(rtol=1e-4, atol=2e-5),
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.complex64: dict(rtol=1e-4, atol=2e-5),
    **HALF_TOL,
}


# --------------------------------------------------------------------------- modules


class Vec(nn.Module):
    """A module whose ``weight`` is a 1-D parameter."""

    def __init__(self, n: int, dtype=None, device=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, dtype=dtype, device=device))

    def forward(self, x):
        return x * self.weight


def _float_input(*shape):
    def make(dtype, device):
        return torch.randn(*shape, dtype=dtype, device=device)
    return make


def _index_input(num, *shape):
    def make(dtype, device):
        return torch.randint(0, num, shape, device=device)
    return make


# kind -> (module factory(dtype, device), input factory(dtype, device), spectral_norm kwargs)
KINDS = {
    "linear": (lambda dt, dev: nn.Linear(12, 8, dtype=dt, device=dev), _float_input(5, 12), {}),
    "linear_dim1": (lambda dt, dev: nn.Linear(12, 8, dtype=dt, device=dev), _float_input(5, 12), {"dim": 1}),
    "conv1d": (lambda dt, dev: nn.Conv1d(3, 6, 3, dtype=dt, device=dev), _float_input(2, 3, 10), {}),
    "conv2d": (lambda dt, dev: nn.Conv2d(3, 5, 3, dtype=dt, device=dev), _float_input(2, 3, 7, 7), {}),
    "conv2d_dim-1": (lambda dt, dev: nn.Conv2d(3, 5, 3, dtype=dt, device=dev), _float_input(2, 3, 7, 7),
                     {"dim": -1}),
    "conv3d": (lambda dt, dev: nn.Conv3d(2, 4, 2, dtype=dt, device=dev), _float_input(1, 2, 4, 4, 4), {}),
    "convtranspose2d": (lambda dt, dev: nn.ConvTranspose2d(4, 3, 3, dtype=dt, device=dev),
                        _float_input(2, 4, 5, 5), {}),
    "embedding": (lambda dt, dev: nn.Embedding(10, 6, dtype=dt, device=dev), _index_input(10, 3, 4), {}),
    "param1d": (lambda dt, dev: Vec(7, dtype=dt, device=dev), _float_input(3, 7), {}),
}
ALL_KINDS = list(KINDS)
# The kinds that have u, v (2-D or more weight).
MAT_KINDS = [k for k in ALL_KINDS if k != "param1d"]
# A smaller set for the slower tests.
FEW_KINDS = ["linear", "conv2d", "convtranspose2d", "param1d"]
# The kinds also run with n_power_iterations=3 (the interpreter is slow).
ITER3_KINDS = ["linear", "conv2d_dim-1", "conv3d", "convtranspose2d", "embedding"]


def kind_iters(kinds=ALL_KINDS, iter3=ITER3_KINDS):
    """``(kind, n_power_iterations)`` cases: every kind once, some with 3 iterations too."""
    return [(k, 1) for k in kinds] + [(k, 3) for k in iter3 if k in kinds]


# The Triton interpreter warns on every launch (numpy deprecation inside triton).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.fixture
def seed(request):
    """A seed of its own for every test (fresh random data, reproducible).

    ``SN_FUSED_TEST_SEED=k`` shifts every seed, to rerun the file on other data.
    """
    return zlib.crc32(request.node.nodeid.encode()) + 1000 * int(os.environ.get("SN_FUSED_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _no_tf32():
    """cuDNN convolutions default to TF32 on GPUs, which would swamp fp32 comparisons."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def make_pair(kind, seed, *, dtype=torch.float32, device="cpu", n_power_iterations=1, train=True,
              base=None, base2=None, **extra):
    """(PyTorch-SN module, sn_fused module, input factory), registered from the same seed.

    ``base``: the module to start from (default: a new one of ``kind``), deep-copied
    for each side; ``base2``: use ``base`` for PyTorch and ``base2`` for sn_fused as
    they are (deepcopy does not keep a non-dense parameter's strides).
    """
    factory, make_input, kwargs = KINDS[kind]
    kwargs = {**kwargs, **extra, "n_power_iterations": n_power_iterations}
    torch.manual_seed(seed)
    if base is None:
        base = factory(dtype, device)
    base.train(train)
    if base2 is None:
        ref = copy.deepcopy(base)
        ours = copy.deepcopy(base)
    else:
        ref, ours = base, base2.train(train)
    torch.manual_seed(seed + 1)
    torch_sn(ref, **kwargs)
    rng_ref = torch.get_rng_state()
    torch.manual_seed(seed + 1)
    out = sn(ours, **kwargs)
    assert out is ours
    # Same random draws, in the same number.
    assert torch.equal(torch.get_rng_state(), rng_ref)

    def make_x():
        return make_input(dtype, device)
    return ref, ours, make_x


def par(m, name="weight"):
    return getattr(m.parametrizations, name)[0]


def orig(m, name="weight"):
    return getattr(m.parametrizations, name).original


#: ``orig(m)``'s name in ``m.named_parameters()``: the key ``torch.func.functional_call`` takes.
ORIGINAL = "parametrizations.weight.original"


def random_like_weight(m, seed, dtype):
    """A fixed random tensor of ``orig(m)``'s shape on its device (a direction, a tangent), drawn
    from a generator of its own so that the global random stream is left alone."""
    w = orig(m)
    return torch.randn(w.shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(w.device)


def has_uv(m):
    return hasattr(par(m), "_u")


def assert_close(actual, expected, dtype=None, tol=None, scale=True, msg=""):
    """``rtol``/``atol`` closeness, atol relative to the scale of ``expected``."""
    dtype = dtype or expected.dtype
    t = dict((tol or TOL)[dtype])
    if scale:
        t["atol"] = t["atol"] * max(expected.detach().abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.detach(), expected.detach(), **t, msg=msg or None)


def assert_uv_close(ours, ref, dtype):
    if has_uv(ref):
        assert has_uv(ours)
        assert_close(par(ours)._u, par(ref)._u, dtype, VEC_TOL, scale=False)
        assert_close(par(ours)._v, par(ref)._v, dtype, VEC_TOL, scale=False)
    else:
        assert not has_uv(ours)


@torch.no_grad()
def scramble_uv(*modules):
    """Give every module the same fresh random unit u, v (far from converged).

    After the 15 warm-up iterations u, v may already be a fixed point in fp32,
    so that one more iteration changes nothing; from fresh vectors each
    iteration visibly moves them.
    """
    p0 = par(modules[0])
    if not hasattr(p0, "_u"):
        return
    u = F.normalize(torch.randn_like(p0._u), dim=0)
    v = F.normalize(torch.randn_like(p0._v), dim=0)
    for m in modules:
        par(m)._u.copy_(u)
        par(m)._v.copy_(v)


def assert_uv_differ(a, b, dtype=torch.float32):
    """The two modules' u, v are NOT within tolerance (they ran a different number of iterations)."""
    if has_uv(a):
        with pytest.raises(AssertionError):
            assert_uv_close(a, b, dtype)


def weight_matrix(w, dim):
    dim = dim % w.ndim
    if dim != 0:
        w = w.permute(dim, *(d for d in range(w.ndim) if d != dim))
    return w.flatten(1)


def torch_sigma(m):
    """sigma = u^H A v from PyTorch's u, v (after its read) and its original weight."""
    p = par(m)
    A = weight_matrix(orig(m).detach(), p.dim)
    return torch.vdot(p._u, torch.mv(A, p._v))


# --------------------------------------------------------------------------- which path


@pytest.mark.parametrize("device", DEVICES)
def test_expected_path(device, seed):
    """fp32/fp64 weights take the fused kernels on CUDA and under the interpreter, else the reference."""
    _, ours, _ = make_pair("conv2d", seed, device=device)
    expect_fused = device == "cuda" or INTERPRET
    assert fused_supported(orig(ours)) == expect_fused
    w = ours.weight
    name = w.grad_fn.name()  # (the Python Function's node, or the C++ read's: CppNode<...>)
    if expect_fused:
        assert "SpectralNormFunction" in name, name
    else:
        assert name == "DivBackward0", name
    # Complex weights always take the reference path.
    cplx = torch.randn(4, 3, dtype=torch.complex64, device=device)
    assert not fused_supported(cplx)


# --------------------------------------------------------------------------- registration


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind, n_iter", kind_iters())
def test_registration_same_uv(kind, train, n_iter, device, seed):
    ref, ours, _ = make_pair(kind, seed, device=device, n_power_iterations=n_iter, train=train)
    assert_uv_close(ours, ref, torch.float32)
    if has_uv(ref):
        # u and v are unit vectors.
        assert abs(par(ours)._u.norm().item() - 1) < 1e-5
        assert abs(par(ours)._v.norm().item() - 1) < 1e-5
        assert par(ours)._u.dtype == par(ref)._u.dtype
        assert par(ours)._u.shape == par(ref)._u.shape and par(ours)._v.shape == par(ref)._v.shape
    # Both parametrizations start in training mode (PyTorch's behaviour: a new
    # parametrization module is in training mode whatever the parent's mode).
    assert par(ours).training == par(ref).training
    # One read in the requested mode: same weight and u, v again.
    ref.train(train)
    ours.train(train)
    assert_close(ours.weight, ref.weight)
    assert_uv_close(ours, ref, torch.float32)


# --------------------------------------------------------------------------- training


def _loss(out, r):
    if out.is_complex():
        return (out * r.conj()).real.sum()
    return (out * r).sum()


def train_in_lockstep(ref, ours, make_x, dtype, steps=3):
    """SGD steps on both modules with the same inputs and output gradients: outputs, u, v,
    sigma (for a complex weight ours holds the real part of ``u^H A v``), every
    parameter's gradient and the updated weight agree at every step."""
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    for step in range(steps):
        x = make_x()
        out_ref = ref(x)
        out_ours = ours(x)
        assert_close(out_ours, out_ref, msg=f"output, step {step}")
        assert_uv_close(ours, ref, dtype)
        if has_uv(ref):
            assert_close(par(ours)._sigma, torch_sigma(ref).real, msg=f"sigma, step {step}")
        r = torch.randn_like(out_ref)
        opt_ref.zero_grad()
        opt_ours.zero_grad()
        _loss(out_ref, r).backward()
        _loss(out_ours, r).backward()
        assert_close(orig(ours).grad, orig(ref).grad, msg=f"grad, step {step}")
        for (n1, p1), (n2, p2) in zip(ours.named_parameters(), ref.named_parameters()):
            assert n1 == n2
            assert_close(p1.grad, p2.grad, msg=f"{n1}.grad, step {step}")
        opt_ref.step()
        opt_ours.step()
        assert_close(orig(ours), orig(ref), msg=f"weight after step {step}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kind, n_iter, dtype",
    [(k, n, torch.float32) for k, n in kind_iters()]
    + [(k, n, torch.float64) for k, n in kind_iters(["linear", "conv2d_dim-1", "convtranspose2d", "embedding"],
                                                    ["conv3d", "linear"])],
    ids=lambda p: {torch.float32: "f32", torch.float64: "f64"}.get(p, None),
)
def test_training_steps(kind, n_iter, dtype, device, seed):
    ref, ours, make_x = make_pair(kind, seed, dtype=dtype, device=device, n_power_iterations=n_iter)
    train_in_lockstep(ref, ours, make_x, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, memory_format", [("conv2d", torch.channels_last),
                                                 ("convtranspose2d", torch.channels_last),
                                                 ("conv3d", torch.channels_last_3d)])
def test_training_steps_channels_last(kind, memory_format, device, seed):
    """A model moved to channels-last (``model.to(memory_format=...)``, the usual recipe for
    tensor-core convolutions), its inputs too: the conv weights' columns are walked in their
    memory order (v through its own strides), the ConvTranspose's are strided (rows along
    dim=1 have stride 1); trained in lockstep with PyTorch's SN."""
    ref, ours, make_x = make_pair(kind, seed, device=device)
    ref, ours = (m.to(memory_format=memory_format) for m in (ref, ours))
    w = orig(ours)
    assert w.is_contiguous(memory_format=memory_format) and not w.is_contiguous()
    train_in_lockstep(ref, ours, lambda: make_x().contiguous(memory_format=memory_format), torch.float32)
    assert orig(ours).is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, n_iter", kind_iters())
def test_eval_mode(kind, n_iter, device, seed):
    ref, ours, make_x = make_pair(kind, seed, device=device, n_power_iterations=n_iter)
    # Move u, v a bit in training mode first, so eval uses trained state.
    ref.weight, ours.weight
    ref.eval()
    ours.eval()
    if has_uv(ours):
        u0, v0 = par(ours)._u.clone(), par(ours)._v.clone()
    x = make_x()
    for _ in range(2):
        w = ours.weight
        assert_close(w, ref.weight)
        assert_close(ours(x), ref(x))
        if has_uv(ours):
            # No update in eval mode: bit-for-bit the same buffers.
            assert torch.equal(par(ours)._u, u0) and torch.equal(par(ours)._v, v0)
            # W / (u^T A v) with the stored u, v.
            A = weight_matrix(orig(ours).detach(), par(ours).dim)
            sigma = torch.vdot(u0, torch.mv(A, v0))
            assert_close(w, orig(ours).detach() / sigma)
            assert_close(par(ours)._sigma, sigma)
        else:
            assert_close(w, F.normalize(orig(ours).detach(), dim=0))
    # Back to training: updates again, like PyTorch.
    scramble_uv(ref, ours)
    before = copy.deepcopy(ours)
    ref.train()
    ours.train()
    assert_close(ours.weight, ref.weight)
    assert_uv_close(ours, ref, torch.float32)
    assert_uv_differ(ours, before)


# --------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_state_dict_roundtrip(kind, device, seed):
    ref, ours, make_x = make_pair(kind, seed, device=device)
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ours.keys()) == list(sd_ref.keys())
    if has_uv(ref):
        assert "parametrizations.weight.0._u" in sd_ours
        assert "parametrizations.weight.0._v" in sd_ours
    assert not any("_sigma" in k or "_sem" in k for k in sd_ours)
    for k in sd_ref:
        assert sd_ours[k].shape == sd_ref[k].shape and sd_ours[k].dtype == sd_ref[k].dtype, k

    # Train a PyTorch model and a differently seeded sn_fused model apart, then swap states.
    ref2, _, _ = make_pair(kind, seed + 7, device=device)
    _, ours2, _ = make_pair(kind, seed + 11, device=device)
    for m in (ref2, ours2):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        out = m(make_x())
        _loss(out, torch.randn_like(out)).backward()
        opt.step()

    # PyTorch's state into sn_fused, and sn_fused's state into PyTorch.
    ours.load_state_dict(ref2.state_dict(), strict=True)
    ref.load_state_dict(ours2.state_dict(), strict=True)
    for k, val in ref2.state_dict().items():
        assert torch.equal(ours.state_dict()[k], val), k
    for k, val in ours2.state_dict().items():
        assert torch.equal(ref.state_dict()[k], val), k
    x = make_x()
    for a, b in ((ours, ref2), (ref, ours2)):
        a.eval()
        b.eval()
        assert_close(a(x), b(x))
        a.train()
        b.train()
        assert_close(a(x), b(x))
        assert_uv_close(a, b, torch.float32)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind, n_iter", kind_iters())
def test_weight_gradient(kind, n_iter, train, device, seed):
    ref, ours, _ = make_pair(kind, seed, device=device, n_power_iterations=n_iter)
    ref.train(train)
    ours.train(train)
    w_ref, w_ours = ref.weight, ours.weight
    assert_close(w_ours, w_ref)
    g = torch.randn_like(w_ref)
    (gw_ref,) = torch.autograd.grad(w_ref, orig(ref), g)
    (gw_ours,) = torch.autograd.grad(w_ours, orig(ours), g)
    assert_close(gw_ours, gw_ref)
    assert gw_ours.shape == gw_ref.shape and gw_ours.dtype == gw_ref.dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["linear", "conv2d", "convtranspose2d"])
def test_gradient_penalty(kind, device, seed):
    """WGAN-GP / R1: the penalty on the input gradient (``create_graph=True``) trains the
    weights through the layer's read as with PyTorch's SN: every parameter's gradient of
    ``out + ||d out / d x||^2`` agrees (the double backward runs through the convolution or
    linear; the spectral norm's own backward once)."""
    ref, ours, make_x = make_pair(kind, seed, device=device)
    x = make_x()
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        out = m(xi).square().sum()
        grad_x, = torch.autograd.grad(out, xi, create_graph=True)
        (out + grad_x.square().sum()).backward()
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert_close(a.grad, b.grad, msg=name)
    assert_uv_close(ours, ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["linear", "conv2d_dim-1", "convtranspose2d"])
def test_double_backward_through_the_weight(kind, dtype, device, seed):
    """Second derivatives in the weight (a Hessian-vector product: meta-learning, curvature
    penalties): ``create_graph=True`` makes the weight gradient differentiable, and its
    gradient agrees with PyTorch's SN (training mode: u, v constants of the read)."""
    ref, ours, make_x = make_pair(kind, seed, dtype=dtype, device=device)
    x = make_x()
    direction = random_like_weight(ref, seed, dtype)
    grads, hvps = [], []
    for m in (ref, ours):
        w = orig(m)
        grad_w, = torch.autograd.grad(m(x).square().sum(), w, create_graph=True)
        hvp, = torch.autograd.grad((grad_w * direction).sum(), w)
        grads.append(grad_w)
        hvps.append(hvp)
    assert_close(grads[1], grads[0], msg="first derivative")
    assert_close(hvps[1], hvps[0], msg="Hessian-vector product")
    assert_uv_close(ours, ref, dtype)


def _func_transform(case, m, x):
    """Run one ``torch.func`` use of module ``m`` on input ``x``; returns its result."""
    from torch.func import functional_call, grad, jacrev, vmap

    params = {k: p.detach() for k, p in m.named_parameters()}

    def loss(p, x):
        return functional_call(m, p, (x,)).square().sum()

    if case == "grad":
        return grad(loss)(params, x)[ORIGINAL]
    if case == "per_sample_grad":  # Opacus-style: vmap over the batch of grad over the parameters
        return vmap(grad(loss), in_dims=(None, 0))(params, x.unsqueeze(1))[ORIGINAL]
    if case == "jacrev":
        return jacrev(lambda w: functional_call(m, {**params, ORIGINAL: w}, (x,)))(params[ORIGINAL])
    if case == "vmap_input":  # the weight read inside vmap, not batched
        return vmap(lambda xi: functional_call(m, params, (xi.unsqueeze(0),)))(x)
    if case == "vmap_weights":  # model ensembling: one weight per vmapped member
        stacked = {k: torch.stack([p, 2 * p]) for k, p in params.items()}
        return vmap(lambda p: functional_call(m, p, (x,)))(stacked)
    raise AssertionError(case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", ["grad", "per_sample_grad", "jacrev", "vmap_input", "vmap_weights"])
@pytest.mark.parametrize("kind", ["linear", "conv2d_dim-1"])
def test_torch_func_transforms(kind, case, train, device, seed):
    """``torch.func`` (grad, per-sample gradients, jacrev, vmap) over sn_fused layers gives what it
    gives over PyTorch's SN: the same numbers and the same u, v updates, or the same error
    (vmap over the weights in training mode: the in-place power method cannot be batched);
    ``_sigma`` logs the read's sigma."""
    ref, ours, make_x = make_pair(kind, seed, dtype=torch.float64, device=device, train=train)
    x = make_x()
    try:
        want = _func_transform(case, ref, x)
    except RuntimeError as error:
        assert case == "vmap_weights" and train, error  # the one use PyTorch's SN refuses
        with pytest.raises(RuntimeError, match=str(error).splitlines()[0][:40]):
            _func_transform(case, ours, x)
        return
    par(ours)._sigma.fill_(float("nan"))  # registration logged one already: this read must write it
    got = _func_transform(case, ours, x)
    assert_close(got, want, msg=case)
    assert_uv_close(ours, ref, torch.float64)
    if case == "vmap_weights":  # one sigma per ensemble member: _sigma is not written
        assert par(ours)._sigma.isnan()
    else:
        assert_close(par(ours)._sigma, torch_sigma(ref), msg="_sigma")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["grad", "vmap_input", "jvp"])
def test_torch_func_transforms_compiled(case, device, seed):
    """The same under ``torch.compile(fullgraph=True)`` (Dynamo traces the transforms; eval mode,
    where PyTorch's SN supports them all): PyTorch's numbers, one graph, no break (found in
    review: the check for transforms sat behind the compiling test, so the fused op was
    traced under them and failed)."""
    from torch.func import functional_call, grad, jvp, vmap

    ref, ours, make_x = make_pair("conv2d_dim-1", seed, dtype=torch.float64, device=device, train=False)
    x = make_x()

    def run(m):
        params = {k: p.detach() for k, p in m.named_parameters()}

        def read(w, x):
            return functional_call(m, {**params, ORIGINAL: w}, (x,))

        def f(w, x):
            if case == "grad":
                return grad(lambda w: read(w, x).square().sum())(w)
            if case == "vmap_input":
                return vmap(lambda xi: read(w, xi.unsqueeze(0)))(x)
            return jvp(lambda w: read(w, x), (w,), (torch.ones_like(w),))[1]

        recorder = _GraphRecorder()
        out = torch.compile(f, backend=recorder, fullgraph=True)(params[ORIGINAL], x)
        assert len(recorder.graphs) == 1
        return out

    assert_close(run(ours), run(ref), msg=case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["linear", "convtranspose2d"])
def test_forward_mode_ad(kind, train, device, seed):
    """Forward-mode AD (a dual weight in ``forward_ad.dual_level()``): the output's tangent is
    PyTorch's SN's (eval), or the same error (training: PyTorch's power method writes u, v
    through out= ops, which have no forward AD). Never an output silently without tangent."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call

    ref, ours, make_x = make_pair(kind, seed, dtype=torch.float64, device=device, train=train)
    x = make_x()
    tangent = random_like_weight(ref, seed, torch.float64)

    def jvp(m):
        with fwAD.dual_level():
            params = {k: p.detach() for k, p in m.named_parameters()}
            out = functional_call(m, {**params, ORIGINAL: fwAD.make_dual(params[ORIGINAL], tangent)}, (x,))
            primal, out_tangent = fwAD.unpack_dual(out)
            assert out_tangent is not None
            return primal, out_tangent

    try:
        want = jvp(ref)
    except NotImplementedError as error:
        assert train, error
        with pytest.raises(NotImplementedError, match="forward AD"):
            jvp(ours)
        return
    par(ours)._sigma.fill_(float("nan"))
    got = jvp(ours)
    assert_close(got[0], want[0], msg="primal")
    assert_close(got[1], want[1], msg="tangent")
    assert_close(par(ours)._sigma, torch_sigma(ref), msg="_sigma (the primal's, no tangent)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, n_iter", kind_iters())
def test_two_forwards_one_backward(kind, n_iter, device, seed):
    """loss = D(x1).mean() - D(x2).mean(): u, v change between the forwards; backward still works."""
    ref, ours, make_x = make_pair(kind, seed, device=device, n_power_iterations=n_iter)
    x1, x2 = make_x(), make_x()
    real_ref, fake_ref = ref(x1), ref(x2)
    real, fake = ours(x1), ours(x2)
    assert_close(real, real_ref)
    assert_close(fake, fake_ref)
    loss_ref = real_ref.mean() - fake_ref.mean()
    loss_ours = real.mean() - fake.mean()
    # The difference cancels: the tolerance is relative to the terms.
    scale = max(real_ref.mean().abs().item(), fake_ref.mean().abs().item())
    torch.testing.assert_close(loss_ours, loss_ref, rtol=0, atol=1e-5 * scale)
    loss_ref.backward()
    loss_ours.backward()
    assert_uv_close(ours, ref, torch.float32)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), ref.named_parameters()):
        assert n1 == n2
        assert p1.grad is not None, n1
        assert_close(p1.grad, p2.grad, msg=n1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kind, layout",
    [(k, "plain") for k in ("linear", "conv2d", "conv2d_dim-1", "convtranspose2d", "conv3d", "embedding",
                            "param1d")]
    + [("linear", "transposed"), ("conv2d", "transposed"), ("conv2d", "channels_last")],
)
def test_gradcheck_float64(kind, layout, device, seed):
    """gradcheck of the parametrization (eval mode: u, v frozen, so the function is deterministic)."""
    torch.manual_seed(seed)
    # Tiny weights keep gradcheck cheap under the interpreter.
    f64 = dict(dtype=torch.float64, device=device)
    base = {
        "linear": lambda: nn.Linear(4, 3, **f64),
        "conv2d": lambda: nn.Conv2d(2, 2, 2, **f64),
        "conv2d_dim-1": lambda: nn.Conv2d(2, 2, 2, **f64),
        "conv3d": lambda: nn.Conv3d(1, 2, 2, **f64),
        "convtranspose2d": lambda: nn.ConvTranspose2d(3, 2, 2, **f64),
        "embedding": lambda: nn.Embedding(4, 3, **f64),
        "param1d": lambda: Vec(6, **f64),
    }[kind]()
    ref, ours, _ = make_pair(kind, seed, dtype=torch.float64, device=device, base=base)
    p_ours, p_ref = par(ours).eval(), par(ref).eval()
    w = orig(ours).detach().clone()
    if layout == "transposed":
        w = w.transpose(0, 1).contiguous().transpose(0, 1)
        assert not w.is_contiguous()
    elif layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
        assert not w.is_contiguous()
    w.requires_grad_(True)
    if has_uv(ours):
        u0, v0 = par(ours)._u.clone(), par(ours)._v.clone()
    # The same function as PyTorch's, tightly.
    assert_close(p_ours(w), p_ref(w))
    # Full Jacobians for two cases, random projections (fast_mode) for the rest.
    fast = (kind, layout) not in (("linear", "plain"), ("conv2d", "channels_last"))
    assert torch.autograd.gradcheck(p_ours, (w,), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=fast)
    # Batched gradients (vmap over grad_outputs) and forward-mode AD, as gradcheck checks them
    # for torch's own ops: the Function's torch-ops backward, the layer's reference read.
    assert torch.autograd.gradcheck(p_ours, (w,), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True,
                                    check_batched_grad=True, check_forward_ad=True)
    if has_uv(ours):
        # gradcheck's many evaluations (eval mode) left the buffers alone.
        assert torch.equal(par(ours)._u, u0) and torch.equal(par(ours)._v, v0)


# --------------------------------------------------------------------------- parametrize.cached


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, n_iter",
                         kind_iters(FEW_KINDS + ["conv1d", "embedding"], ["linear", "convtranspose2d"]))
def test_cached_one_iteration_per_block(kind, n_iter, device, seed):
    ref, ours, make_x = make_pair(kind, seed, device=device, n_power_iterations=n_iter)
    scramble_uv(ref, ours)
    once_ref = copy.deepcopy(ref)
    once_ref.weight  # a single read outside cached()
    x = make_x()
    with parametrize.cached():
        w1_ref, w2_ref = ref.weight, ref.weight
        w1, w2 = ours.weight, ours.weight
        assert w1 is w2 and w1_ref is w2_ref
        out_ref = ref(x) + ref(x)
        out_ours = ours(x) + ours(x)
    assert_close(w1, w1_ref)
    assert_uv_close(ours, ref, torch.float32)
    # Two reads (and two forwards) inside cached() == one read: one power iteration.
    assert_uv_close(ours, once_ref, torch.float32)
    assert_close(out_ours, out_ref)
    r = torch.randn_like(out_ref)
    _loss(out_ref, r).backward()
    _loss(out_ours, r).backward()
    assert_close(orig(ours).grad, orig(ref).grad)
    # A new block iterates again.
    with parametrize.cached():
        ref.weight, ours.weight
    assert_uv_close(ours, ref, torch.float32)
    assert_uv_differ(ours, once_ref)


# --------------------------------------------------------------------------- the fast read


class _Double(nn.Module):
    """A second parametrization to stack with spectral norm."""

    def forward(self, x):
        return 2 * x


_READ_CASES = {
    # name: (setup(module, hook_calls) -> context manager of the read, torch's getter expected)
    "plain": (lambda m, calls: contextlib.nullcontext(), False),
    "cached": (lambda m, calls: parametrize.cached(), True),
    "stacked_after": (lambda m, calls: (parametrize.register_parametrization(m, "weight", _Double()),
                                        contextlib.nullcontext())[1], True),
    "list_forward_hook": (lambda m, calls: (m.parametrizations.weight.register_forward_hook(
        lambda mod, args, out: calls.append("fwd") or 3 * out), contextlib.nullcontext())[1], True),
    "list_forward_pre_hook": (lambda m, calls: (m.parametrizations.weight.register_forward_pre_hook(
        lambda mod, args: calls.append("pre")), contextlib.nullcontext())[1], True),
    "global_forward_hook": (lambda m, calls: _global_forward_hook(calls), True),
    "list_compiled": (lambda m, calls: _fake_compiled_call(m.parametrizations.weight, calls), True),
    "list_instance_forward": (lambda m, calls: _wrap_instance_forward(m.parametrizations.weight, calls), True),
    "jit_tracing": (lambda m, calls: mock.patch.object(torch._C, "_get_tracing_state", lambda: object()),
                    True),
    # The parametrization's own hooks need no fallback: the fast read calls it through
    # Module.__call__ then.
    "sn_forward_hook": (lambda m, calls: (m.parametrizations.weight[0].register_forward_hook(
        lambda mod, args, out: calls.append("sn") or 3 * out), contextlib.nullcontext())[1], False),
}


@contextlib.contextmanager
def _global_forward_hook(calls):
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: calls.append(type(mod).__name__))
    try:
        yield
    finally:
        handle.remove()


def _wrap_instance_forward(plist, calls):
    """A ``forward`` set on the list instance, as accelerate's ``add_hook_to_module`` does (its
    offloading hooks move ``original`` in and out of ``meta`` around it)."""
    def forward(*args, **kwargs):
        calls.append("instance forward")
        return type(plist).forward(plist, *args, **kwargs)

    plist.forward = forward
    return contextlib.nullcontext()


def _fake_compiled_call(plist, calls):
    """What ``plist.compile()`` leaves behind (``Module.__call__`` then calls it), minus Dynamo."""
    call_impl = plist._call_impl

    def compiled(*args, **kwargs):
        calls.append("compiled")
        return call_impl(*args, **kwargs)

    plist._compiled_call_impl = compiled
    return contextlib.nullcontext()


@pytest.mark.parametrize("case", list(_READ_CASES))
def test_fast_read_only_where_torch_getter_is_the_same_call(case, seed):
    """``module.weight`` skips torch's ParametrizationList.forward only where that changes nothing.

    Every case is set up on both modules alike; then each read must give PyTorch's weight,
    u and v, run the same hooks, and go through torch's getter exactly where the case says.
    """
    ref, ours, make_x = make_pair("conv2d", seed)
    scramble_uv(ref, ours)
    setup, torch_getter = _READ_CASES[case]
    ref_hooks, our_hooks = [], []
    ref_ctx, our_ctx = setup(ref, ref_hooks), setup(ours, our_hooks)
    with list_forward_calls() as calls:
        with ref_ctx:
            w_ref = ref.weight
        n_ref = calls.call_count
        with our_ctx:
            w_ours = ours.weight
        n_ours = calls.call_count - n_ref
    assert n_ref == 1
    assert n_ours == (1 if torch_getter else 0)
    assert our_hooks == ref_hooks
    if "hook" in case or "compiled" in case or "instance" in case:
        assert our_hooks, "the case's hook did not run"
    assert_close(w_ours, w_ref)
    assert_uv_close(ours, ref, torch.float32)
    x = make_x()  # and a training step through the fast (or torch's) read
    out_ref = ref(x)
    r = torch.randn_like(out_ref)
    _loss(out_ref, r).backward()
    _loss(ours(x), r).backward()
    assert_close(orig(ours).grad, orig(ref).grad)
    assert_uv_close(ours, ref, torch.float32)


def test_fast_read_installed_on_this_torch():
    """The fast read asks torch's private state (hooks, caching, tracing flags), looked up once at
    import; where a torch release moves one of those names (``_FAST_READ_MISSING``), the layers
    keep torch's getter -- correct, ~15 us more host time a read. This test is how an upgrade of
    the pinned torch finds out. (torch 2.14 made the fx tracing flag a thread-local: before the
    lookup, every read there failed with "object has no attribute 'weight'".)"""
    from sn_fused import parametrizations as sn_parametrizations

    assert sn_parametrizations._FAST_READ_MISSING == ()
    m = sn(nn.Linear(4, 3))
    assert getattr(type(m).weight.fget, "_sn_fused_torch_getter", None) is not None
    with list_forward_calls() as calls:
        m.weight
    assert calls.call_count == 0


@pytest.mark.parametrize("register", ["spectral_norm", "convert"])
def test_torch_getter_where_this_torch_lacks_what_the_fast_read_asks(monkeypatch, register, seed):
    """A torch without one of the fast read's private names: registration (and ``convert``)
    leave torch's getter in place, and the layer reads and trains as PyTorch's SN does."""
    from sn_fused import parametrizations as sn_parametrizations

    monkeypatch.setattr(sn_parametrizations, "_FAST_READ_MISSING", ("torch.nn.utils.parametrize._cache_enabled",))
    if register == "spectral_norm":
        ref, ours, make_x = make_pair("conv2d", seed)
    else:
        ref, _, make_x = make_pair("conv2d", seed)
        ours = sn_fused.convert(copy.deepcopy(ref))
    assert not hasattr(type(ours).weight.fget, "_sn_fused_torch_getter")
    scramble_uv(ref, ours)
    for step in range(2):
        with list_forward_calls() as calls:
            w_ours = ours.weight
        assert calls.call_count == 1
        assert_close(w_ours, ref.weight)
        assert_uv_close(ours, ref, torch.float32)
        x = make_x()
        out_ref = ref(x)
        r = torch.randn_like(out_ref)
        _loss(out_ref, r).backward()
        _loss(ours(x), r).backward()
        assert_close(orig(ours).grad, orig(ref).grad, msg=f"step {step}")
        assert_uv_close(ours, ref, torch.float32)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fx_symbolic_trace_records_the_parametrization(train, seed):
    """``torch.fx.symbolic_trace`` (also behind torchvision's feature extractors and FX
    quantization) records the ParametrizationList as a module call, as with PyTorch's SN: the
    traced module reads the weight anew on every call (found in review: the fast read went
    round the tracer's patched ``Module.__call__`` and froze the weight into a constant)."""
    ref, ours, make_x = make_pair("linear", seed, train=train)
    traced_ref, traced = torch.fx.symbolic_trace(ref), torch.fx.symbolic_trace(ours)
    nodes = [(n.op, n.target) for n in traced.graph.nodes]
    assert nodes == [(n.op, n.target) for n in traced_ref.graph.nodes]
    assert ("call_module", "parametrizations.weight") in nodes
    for step in range(2):
        x = make_x()
        out_ref = traced_ref(x)
        out = traced(x)
        assert_close(out, out_ref, msg=f"step {step}")
        assert_uv_close(ours, ref, torch.float32)
        r = torch.randn_like(out_ref)
        _loss(out_ref, r).backward()
        _loss(out, r).backward()
        assert_close(orig(ours).grad, orig(ref).grad, msg=f"step {step}")
        with torch.no_grad():  # a new weight: the traced module must follow it
            orig(ref).mul_(1.5)
            orig(ours).mul_(1.5)


# --------------------------------------------------------------------------- remove_parametrizations


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("leave", [True, False], ids=["leave", "restore"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_remove_parametrizations(kind, leave, device, seed):
    ref, ours, make_x = make_pair(kind, seed, device=device)
    w_orig = orig(ours).detach().clone()
    parametrize.remove_parametrizations(ref, "weight", leave_parametrized=leave)
    parametrize.remove_parametrizations(ours, "weight", leave_parametrized=leave)
    assert not parametrize.is_parametrized(ours)
    assert isinstance(ours.weight, nn.Parameter)
    assert set(dict(ours.named_buffers())) == set(dict(ref.named_buffers()))
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert_close(ours.weight, ref.weight)
    if not leave:
        assert torch.equal(ours.weight, w_orig)
    else:
        assert not torch.allclose(ours.weight, w_orig)
    x = make_x()
    assert_close(ours(x), ref(x))


# --------------------------------------------------------------------------- copy / pickle


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", FEW_KINDS)
def test_deepcopy_independent(kind, device, seed):
    ref, ours, make_x = make_pair(kind, seed, device=device)
    ours_copy = copy.deepcopy(ours)
    ref_copy = copy.deepcopy(ref)
    assert type(par(ours_copy)) is type(par(ours))
    for (n1, b1), (n2, b2) in zip(ours_copy.named_buffers(), ours.named_buffers()):
        assert n1 == n2
        assert torch.equal(b1, b2) or (b1.isnan().all() and b2.isnan().all()), n1
        assert b1.data_ptr() != b2.data_ptr(), n1
    assert orig(ours_copy).data_ptr() != orig(ours).data_ptr()
    snapshot = {k: v.clone() for k, v in ours.state_dict().items()}
    # Train the copy: the original is untouched.
    opt = torch.optim.SGD(ours_copy.parameters(), lr=0.5)
    opt_ref = torch.optim.SGD(ref_copy.parameters(), lr=0.5)
    for _ in range(2):
        x = make_x()
        out, out_ref = ours_copy(x), ref_copy(x)
        r = torch.randn_like(out_ref)
        opt.zero_grad()
        opt_ref.zero_grad()
        _loss(out, r).backward()
        _loss(out_ref, r).backward()
        opt.step()
        opt_ref.step()
    for k, val in ours.state_dict().items():
        assert torch.equal(val, snapshot[k]), k
    assert orig(ours).grad is None
    # The copy behaves like PyTorch's copy.
    assert_close(orig(ours_copy), orig(ref_copy))
    assert_uv_close(ours_copy, ref_copy, torch.float32)
    # And the original still matches PyTorch's original.
    assert_close(ours.weight, ref.weight)


@pytest.mark.parametrize("kind", ["linear", "param1d"])
def test_pickle_raises_like_pytorch(kind, seed):
    ref, ours, _ = make_pair(kind, seed)
    with pytest.raises(Exception) as exc_ref:
        pickle.dumps(ref)
    with pytest.raises(Exception) as exc_ours:
        pickle.dumps(ours)
    assert exc_ours.type is exc_ref.type
    assert str(exc_ours.value) == str(exc_ref.value)
    # state_dict is the supported route, and it pickles.
    sd = pickle.loads(pickle.dumps(ours.state_dict()))
    assert list(sd) == list(ref.state_dict())


# --------------------------------------------------------------------------- argument errors


def _assert_untouched(m, name="weight"):
    assert not parametrize.is_parametrized(m)
    assert isinstance(getattr(m, name), torch.Tensor)


@pytest.mark.parametrize(
    "make, kwargs",
    [
        (lambda: nn.Linear(4, 3), {"dim": 2}),
        (lambda: nn.Linear(4, 3), {"dim": -3}),
        (lambda: nn.Conv2d(2, 3, 3), {"dim": 4}),
        (lambda: nn.Conv2d(2, 3, 3), {"dim": -5}),
        (lambda: Vec(5), {"dim": 1}),
    ],
)
def test_dim_out_of_range(make, kwargs):
    m1, m2 = make(), make()
    with pytest.raises(IndexError):
        torch_sn(m1, **kwargs)
    with pytest.raises(IndexError):
        sn(m2, **kwargs)
    _assert_untouched(m2)


@pytest.mark.parametrize("n", [0, -1, -3])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_n_power_iterations_not_positive(kind, n):
    m1, m2 = KINDS[kind][0](None, "cpu"), KINDS[kind][0](None, "cpu")
    with pytest.raises(ValueError):
        torch_sn(m1, n_power_iterations=n)
    with pytest.raises(ValueError):
        sn(m2, n_power_iterations=n)
    _assert_untouched(m2)


@pytest.mark.parametrize("n", [0, -1, -3])
@pytest.mark.parametrize("kind", ["linear", "conv2d_dim-1"])
def test_n_power_iterations_set_to_zero_or_less_after_registration(kind, n, seed):
    """Refused at registration, but PyTorch reads a layer whose attribute is set to 0 later, or
    below (its ``range(n)`` is empty): u, v stay, sigma = u^T A v from them. Values, u, v and
    gradients as PyTorch's, training and eval (found in review: the kernel path refused a
    negative count)."""
    ref, ours, make_x = make_pair(kind, seed)
    scramble_uv(ref, ours)
    u0 = par(ours)._u.clone()
    for m in (ref, ours):
        par(m).n_power_iterations = n
    for train in (True, False, True):
        for m in (ref, ours):
            m.train(train)
            m.zero_grad()
        x = make_x()
        out_ref, out = ref(x), ours(x)
        assert_close(out, out_ref)
        out_ref.square().sum().backward()
        out.square().sum().backward()
        assert_close(orig(ours).grad, orig(ref).grad)
        assert_uv_close(ours, ref, torch.float32)
        assert torch.equal(par(ours)._u, u0), "no power iteration: u must not move"
    assert_close(par(ours)._sigma, torch_sigma(ref))


@pytest.mark.parametrize("name", ["weights", "nothere", "bias_"])
def test_missing_name(name):
    m1, m2 = nn.Linear(4, 3), nn.Linear(4, 3)
    with pytest.raises(ValueError):
        torch_sn(m1, name=name)
    with pytest.raises(ValueError):
        sn(m2, name=name)
    _assert_untouched(m2)


@pytest.mark.parametrize("eps", [-1e-12, -1.0, float("nan"), float("inf"), float("-inf")])
def test_bad_eps_refused(eps):
    # PyTorch accepts these (and yields NaN/Inf weights or worse); sn_fused refuses them.
    torch_sn(nn.Linear(4, 3), eps=eps)
    m = nn.Linear(4, 3)
    with pytest.raises(ValueError):
        sn(m, eps=eps)
    _assert_untouched(m)


@pytest.mark.parametrize("eps", ["1e-12", None, [1e-12]])
def test_eps_not_a_real_number_type_error(eps):
    with pytest.raises(TypeError):  # PyTorch's clamp_min, in the power iterations of its registration
        torch_sn(nn.Linear(4, 3), eps=eps)
    m = nn.Linear(4, 3)
    with pytest.raises(TypeError, match="eps to be a real number"):
        sn(m, eps=eps)
    _assert_untouched(m)


EMPTY_WEIGHTS = {
    "linear_no_outputs": lambda: nn.Linear(4, 0),
    "linear_no_inputs": lambda: nn.Linear(0, 3),
    "conv_no_inputs": lambda: nn.Conv2d(0, 3, 3),
    "conv_transpose_no_outputs": lambda: nn.ConvTranspose2d(2, 0, 3),  # dim=1
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(EMPTY_WEIGHTS))
def test_empty_weight_reads_as_pytorch(case, device, seed):
    """A weight with no elements (a zero-width layer, as pruning or a configuration can make)
    registers and reads as in PyTorch's SN: the same u, v, an empty W_sn with the weight's
    strides, sigma 0, the same state_dict and gradient. It takes PyTorch's ops (nothing to read)."""
    torch.manual_seed(seed)
    ref = torch_sn(EMPTY_WEIGHTS[case]().to(device))
    torch.manual_seed(seed)
    ours = sn(EMPTY_WEIGHTS[case]().to(device))
    assert not fused_supported(orig(ours), par(ours).dim)
    for train in (True, False, True):
        ref.train(train)
        ours.train(train)
        w_ours, w_ref = ours.weight, ref.weight
        assert w_ours.shape == w_ref.shape and w_ours.stride() == w_ref.stride()
        w_ours.sum().backward()
        w_ref.sum().backward()
        assert torch.equal(orig(ours).grad, orig(ref).grad)
        assert_uv_close(ours, ref, torch.float32)
        assert par(ours)._sigma.item() == 0.0
    assert list(ours.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("eps", [0.0, 1e-12, 1e-3, 1])
def test_good_eps_accepted(eps, seed):
    ref, ours, make_x = make_pair("linear", seed, eps=eps)
    assert par(ours).eps == eps
    assert_close(ours.weight, ref.weight)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("ndim", [1, 2])
def test_integer_weight_error_as_pytorch(dtype, ndim):
    """A RuntimeError where PyTorch's SN raises one (a NotImplementedError from its normal_, or a
    RuntimeError from its first norm: both are RuntimeErrors), with a message of its own."""
    m, ref = nn.Module(), nn.Module()
    shape = (4,) if ndim == 1 else (4, 3)
    m.weight = nn.Parameter(torch.ones(shape, dtype=dtype), requires_grad=False)
    ref.weight = nn.Parameter(torch.ones(shape, dtype=dtype), requires_grad=False)
    with pytest.raises(RuntimeError):
        torch_sn(ref)
    with pytest.raises(RuntimeError, match="floating point or complex weight"):
        sn(m)
    _assert_untouched(m)


def test_non_weight_name_and_buffer(seed):
    """``name=`` picks another tensor; PyTorch also accepts a buffer."""
    torch.manual_seed(seed)
    base = nn.Module()
    base.register_buffer("w", torch.randn(6, 5))
    base.kernel = nn.Parameter(torch.randn(3, 4, 2))
    ref, ours = copy.deepcopy(base), copy.deepcopy(base)
    for name, dim in (("w", None), ("kernel", 1)):
        torch.manual_seed(seed + 1)
        torch_sn(ref, name=name, dim=dim)
        torch.manual_seed(seed + 1)
        sn(ours, name=name, dim=dim)
        assert_close(getattr(ours, name), getattr(ref, name))
        assert_close(par(ours, name)._u, par(ref, name)._u, tol=VEC_TOL, scale=False)
    assert list(ours.state_dict()) == list(ref.state_dict())


# --------------------------------------------------------------------------- layout


def _layout_module(kind, layout, seed, device):
    torch.manual_seed(seed)
    base = KINDS[kind][0](torch.float32, device)
    if layout == "channels_last":
        base = base.to(memory_format=torch.channels_last)
        assert not base.weight.is_contiguous()
    elif layout == "transposed":
        # A parameter made from a transposed tensor (non-contiguous, dense).
        w = base.weight.detach()
        base.weight = nn.Parameter(w.transpose(0, 1).contiguous().transpose(0, 1))
        assert not base.weight.is_contiguous()
    elif layout == "strided":
        # A non-dense view (every other column of a wider tensor).
        w = base.weight.detach()
        wide = torch.zeros(w.shape[0], 2 * w.shape[1], *w.shape[2:], device=device)
        wide[:, ::2] = w
        base.weight = nn.Parameter(wide[:, ::2])
        assert not base.weight.is_contiguous()
    return base


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kind, layout",
    [
        ("linear", "plain"), ("linear", "transposed"), ("linear", "strided"),
        ("linear_dim1", "transposed"),
        ("conv1d", "plain"), ("conv2d", "plain"), ("conv2d", "channels_last"),
        ("conv2d", "transposed"), ("conv2d", "strided"), ("conv2d_dim-1", "channels_last"),
        ("conv3d", "plain"), ("convtranspose2d", "plain"), ("convtranspose2d", "channels_last"),
        ("embedding", "plain"), ("embedding", "transposed"), ("param1d", "plain"),
    ],
)
def test_output_layout(kind, layout, device, seed):
    base = _layout_module(kind, layout, seed, device)
    base2 = _layout_module(kind, layout, seed, device)
    strides = base.weight.stride()
    ref, ours, make_x = make_pair(kind, seed, device=device, base=base, base2=base2)
    w0 = orig(ours)
    assert w0.stride() == orig(ref).stride() == strides  # registration kept the layout
    for train in (True, False):
        ref.train(train)
        ours.train(train)
        w_ref, w = ref.weight, ours.weight
        assert w.shape == w0.shape and w.dtype == w0.dtype
        assert w.stride() == w_ref.stride(), (w.stride(), w_ref.stride())
        if layout != "strided":  # a dense weight keeps its strides exactly
            assert w.stride() == w0.stride()
        assert_close(w, w_ref)
        assert_uv_close(ours, ref, torch.float32)
        g = torch.randn_like(w_ref)
        (gw_ref,) = torch.autograd.grad(w_ref, orig(ref), g)
        (gw,) = torch.autograd.grad(w, orig(ours), g)
        assert_close(gw, gw_ref)
        x = make_x()
        assert_close(ours(x), ref(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_output_dtype(dtype, device, seed):
    ref, ours, _ = make_pair("conv2d", seed, dtype=dtype, device=device)
    assert par(ours)._u.dtype == dtype and par(ours)._v.dtype == dtype
    w = ours.weight
    assert w.dtype == dtype
    assert_close(w, ref.weight)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "convtranspose2d"])
def test_half_weights_read_as_pytorch(kind, dtype, device, seed):
    """float16 and bfloat16 layers (bfloat16 through the kernels on a CPU too, under the
    interpreter: tests/interpreter_bf16.py): u, v, the weight and its gradient in the layer's
    dtype, near PyTorch's, over three training reads and an eval read."""
    ref, ours, _ = make_pair(kind, seed, dtype=dtype, device=device)
    if INTERPRET and device == "cpu":
        assert fused_supported(orig(ours))  # (the kernels, not the reference path)
    for train in (True, True, True, False):
        ref.train(train), ours.train(train)
        w_ref, w = ref.weight, ours.weight
        assert w.dtype == dtype and par(ours)._u.dtype == dtype and par(ours)._v.dtype == dtype
        assert_close(w, w_ref, tol=HALF_TOL)
        assert_uv_close(ours, ref, dtype)
        g = torch.randn(w.shape, dtype=torch.float64, device=device).to(dtype)
        (gw,) = torch.autograd.grad(w, orig(ours), g)
        (gw_ref,) = torch.autograd.grad(w_ref, orig(ref), g)
        assert gw.dtype == dtype
        assert_close(gw, gw_ref, tol=HALF_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_keeps_the_weights_dtype_and_values(device, seed):
    """Under ``torch.autocast`` the read is the one outside it, bit for bit: float32 weight, u, v
    (PyTorch's own SN runs its matvecs in the autocast dtype on CUDA); the layer's op autocasts."""
    _, ours, make_x = make_pair("linear", seed, device=device)
    twin = copy.deepcopy(ours)
    x = make_x()
    lower = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=lower):
        w, y = ours.weight, ours(x)  # (two training reads)
    w_ref, y_ref = twin.weight, twin(x)
    assert w.dtype == torch.float32 and torch.equal(w, w_ref)
    assert torch.equal(par(ours)._u, par(twin)._u) and torch.equal(par(ours)._v, par(twin)._v)
    assert y.dtype == lower
    assert_close(y, y_ref.to(lower), tol=HALF_TOL)


# --------------------------------------------------------------------------- sigma buffer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, n_iter", kind_iters(MAT_KINDS))
def test_sigma_buffer(kind, n_iter, device, seed):
    ref, ours, _ = make_pair(kind, seed, device=device, n_power_iterations=n_iter)
    p = par(ours)
    assert "_sigma" in dict(p.named_buffers())
    assert not any(k.endswith("_sigma") for k in ours.state_dict())
    # After registration (one training read): PyTorch's sigma from its u, v.
    assert_close(p._sigma, torch_sigma(ref))
    for train in (True, False, True):
        ref.train(train)
        ours.train(train)
        w_ref, w = ref.weight, ours.weight
        sigma = torch_sigma(ref)
        assert_close(p._sigma, sigma)
        # And W_sn = W / sigma with it.
        assert_close(w, orig(ours).detach() / p._sigma)
        assert p._sigma.shape == () and p._sigma.dtype == w.dtype
        assert p._sigma.device == w.device


# --------------------------------------------------------------------------- complex


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_iter", [1, 3])
def test_complex_linear(n_iter, device, seed):
    torch.manual_seed(seed)
    base = nn.Linear(6, 4, dtype=torch.complex64, device=device)
    ref, ours, _ = make_pair("linear", seed, dtype=torch.complex64, device=device,
                             n_power_iterations=n_iter, base=base)
    assert par(ours)._u.dtype == torch.complex64
    assert_uv_close(ours, ref, torch.complex64)
    assert par(ours)._sigma.dtype == torch.float32
    train_in_lockstep(ref, ours, lambda: torch.randn(5, 6, dtype=torch.complex64, device=device),
                      torch.complex64)
    ref.eval()
    ours.eval()
    assert_close(ours.weight, ref.weight)


@pytest.mark.parametrize("device", DEVICES)
def test_wrapper_subclass_weight(device, seed):
    """A weight that is a wrapper tensor subclass (here ``TwoTensor``; DTensor is one too) has
    no storage of its own for a kernel: it takes the reference path, whose torch ops dispatch
    through the subclass as in PyTorch's spectral norm, and trains like it."""
    from torch.testing._internal.two_tensor import TwoTensor

    torch.manual_seed(seed)
    base = nn.Linear(6, 4, device=device)
    w = base.weight.detach()
    base.weight = nn.Parameter(TwoTensor(w.clone(), 2 * w))
    assert not fused_supported(base.weight, 0)
    ref, ours, _ = make_pair("linear", seed, device=device, base=base)
    assert type(par(ours)._u) is TwoTensor
    train_in_lockstep(ref, ours, lambda: TwoTensor(*[torch.randn(5, 6, device=device)] * 2), torch.float32)
    with torch.no_grad():
        assert_close(ours.weight.b, ref.weight.b)  # both halves, not only what assert_close compares


@pytest.mark.parametrize("device", DEVICES)
def test_plain_weight_after_wrapper_subclass_weight(device, seed):
    """A layer born with a wrapper-subclass weight (its ``_sigma`` is one too) that then loads a
    plain checkpoint with ``assign=True`` (the non-persistent ``_sigma`` stays as it was):
    reads make the buffer anew and take the fused path where there is one (found in review: the
    kernel got the leftover TwoTensor ``_sigma``)."""
    from torch.testing._internal.two_tensor import TwoTensor

    torch.manual_seed(seed)
    base = nn.Linear(6, 4, device=device)
    plain_state = {k: t.detach().clone() for k, t in base.state_dict().items()}
    base.weight = nn.Parameter(TwoTensor(base.weight.detach().clone(), base.weight.detach().clone()))
    ref, ours, _ = make_pair("linear", seed, device=device, base=base)
    assert type(par(ours)._sigma) is TwoTensor
    for m in (ref, ours):
        state = {**plain_state, "parametrizations.weight.original": plain_state["weight"]}
        del state["weight"]
        state.update({k: t.a.clone() for k, t in m.state_dict().items() if k.endswith(("_u", "_v"))})
        m.load_state_dict(state, assign=True)
    assert type(orig(ours)) is nn.Parameter and type(par(ours)._u) is torch.Tensor
    train_in_lockstep(ref, ours, lambda: torch.randn(5, 6, device=device), torch.float32)
    if fused_supported(orig(ours), 0):  # (the reference path just copies sigma into the old buffer)
        assert type(par(ours)._sigma) is torch.Tensor


# --------------------------------------------------------------------------- misc semantics


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_buffer_update(device, seed):
    """u and v are updated in place (DataParallel replica 0 relies on shared storage)."""
    ref, ours, _ = make_pair("conv2d", seed, device=device)
    scramble_uv(ref, ours)
    p = par(ours)
    u, v = p._u, p._v
    ptr_u, ptr_v = u.data_ptr(), v.data_ptr()
    before = copy.deepcopy(ours)
    ours.weight
    ref.weight
    assert p._u is u and p._v is v
    assert p._u.data_ptr() == ptr_u and p._v.data_ptr() == ptr_v
    assert_uv_differ(ours, before)
    assert_uv_close(ours, ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_iterates_once_per_read(device, seed):
    ref, ours, _ = make_pair("linear", seed, device=device, n_power_iterations=1)
    scramble_uv(ref, ours)
    for reads in range(1, 4):
        ref.weight
        ours.weight
        assert_uv_close(ours, ref, torch.float32)
    # Reading PyTorch's once more makes them differ: the count is what is compared.
    ref.weight
    assert_uv_differ(ours, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_module_to_double_after_registration(device, seed):
    """``.double()`` after registration converts u, v, sigma, and both still agree."""
    ref, ours, make_x = make_pair("conv2d", seed, device=device)
    ref.double()
    ours.double()
    assert par(ours)._u.dtype == torch.float64 and par(ours)._sigma.dtype == torch.float64
    x = make_x().double()
    assert_close(ours(x), ref(x), dtype=torch.float32)  # buffers came from fp32
    assert_uv_close(ours, ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_module_to_with_swapped_params(device, seed):
    """``torch.__future__.set_swap_module_params_on_conversion(True)``: ``.to()`` swaps the
    parameter's contents into the same object (``torch.utils.swap_tensors``) instead of assigning
    ``.data``. Reads after ``.double()`` and after a move to channels-last (where the layer's
    checked signature sees a new dtype and new strides in the same tensor) agree with PyTorch's SN,
    weights, u, v and gradients. (The parameter is the same object without the flag too, and the
    test passes there as well: it checks reads after a swap, not that one happened.)"""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        ref, ours, make_x = make_pair("conv2d", seed, device=device)
        for m in (ref, ours):  # a checked read before the swaps
            m(make_x()).sum().backward()
        original = orig(ours)
        for convert in (lambda m: m.double(), lambda m: m.to(memory_format=torch.channels_last)):
            for m in (ref, ours):
                convert(m)
                m.zero_grad()
            assert orig(ours) is original and orig(ours).dtype == torch.float64
            x = make_x().double()
            out_ref, out = ref(x), ours(x)
            assert_close(out, out_ref, dtype=torch.float32)  # (u, v and grads came from fp32)
            assert_uv_close(ours, ref, torch.float32)
            out_ref.square().sum().backward()
            out.square().sum().backward()
            assert_close(orig(ours).grad, orig(ref).grad, dtype=torch.float32)
        assert orig(ours).stride() == orig(ref).stride() and orig(ours).stride()[1] == 1  # channels-last
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)


@pytest.mark.parametrize("device", DEVICES)
def test_meta_init_then_to_empty(device, seed):
    """Deferred init (a model built on the meta device, ``to_empty``, then initialized by the user,
    as FSDP and big-model loaders do): the same outputs as PyTorch's SN, and the grid-barrier
    semaphore back at rest (0). ``to_empty`` leaves buffers uninitialized, which would break the
    barrier's invariant on a GPU; the poison below stands in for that memory."""
    models = []
    for register in (torch_sn, sn):
        with torch.device("meta"):
            models.append(register(nn.Conv2d(3, 5, 3)))
    ref, ours = models
    poisoned = {"n": 0}

    def to_empty_poisoned(t):  # to_empty(), with int32 memory that happens to hold garbage
        out = torch.empty_like(t, device=device)
        if out.dtype == torch.int32:
            poisoned["n"] += 1
            out.fill_(0x1234567)
        return out

    for m in (ref, ours):
        m._apply(to_empty_poisoned)
        torch.manual_seed(seed)
        with torch.no_grad():  # the user's init, the same for both
            orig(m).normal_()
            m.bias.zero_()
            par(m)._u.copy_(F.normalize(torch.randn(par(m)._u.shape), dim=0))
            par(m)._v.copy_(F.normalize(torch.randn(par(m)._v.shape), dim=0))
    assert poisoned["n"] == 1  # ours has the one int32 buffer
    assert torch.equal(par(ours)._sem, torch.zeros(2, dtype=torch.int32, device=device))
    x = torch.randn(2, 3, 6, 6, device=device)
    assert_close(ours(x), ref(x))
    assert_uv_close(ours, ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["ema_use_buffers", "fill", "type_float64"])
def test_semaphore_written_by_torch_code_is_made_anew(how, device, seed):
    """Tools that walk every buffer write into ``_sem`` too: ``AveragedModel(use_buffers=True)``
    averages it (an EMA of 0 and 0x80000000 is garbage to the grid barrier: on a GPU a
    multi-program read would leave a barrier early and be silently wrong), ``Module.type()``
    casts it to float. The next read makes a semaphore at rest, and reads give PyTorch's
    numbers (found in review: after ``.type(torch.float64)`` every read raised)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ref, ours, make_x = make_pair("conv2d", seed, device=device)
    x = make_x()
    if how == "ema_use_buffers":
        averaged = [AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
                    for m in (ref, ours)]
        for rest in (0, -(2**31)):  # the first update copies, the second averages
            par(ours)._sem.fill_(rest)  # 0x80000000: where an odd number of barriers leaves it
            for a, m in zip(averaged, (ref, ours)):
                a.update_parameters(m)
        ref, ours = averaged[0].module, averaged[1].module
        assert par(ours)._sem.any()  # the EMA of 0 and 0x80000000: not a rest state
    elif how == "fill":
        par(ours)._sem.fill_(0x1234567)
    else:
        ref.type(torch.float64)
        ours.type(torch.float64)
        x = x.double()
    fused = fused_supported(orig(ours), 0)  # the reference path does not use the semaphore
    for step in range(2):
        assert_close(ours(x), ref(x), dtype=torch.float32, msg=f"step {step}")  # fp32 buffers, cast or not
        assert_uv_close(ours, ref, torch.float32)
        sem = par(ours)._sem
        assert sem.dtype == torch.int32 and (not sem.any() or not fused), sem


ARGUMENT_TYPES = {  # what PyTorch's SN takes besides Python ints and floats (range(n), clamp_min(eps))
    "n_numpy_int": dict(n_power_iterations=np.int64(2)),
    "n_bool": dict(n_power_iterations=True),
    "n_tensor": dict(n_power_iterations=torch.tensor(2)),
    "eps_numpy_float32": dict(eps=np.float32(1e-3)),
    "eps_numpy_float64": dict(eps=np.float64(1e-3)),
    "eps_int": dict(eps=0),
    "eps_tensor": dict(eps=torch.tensor(1e-3)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(ARGUMENT_TYPES))
def test_argument_types_pytorch_takes(case, device, seed):
    """``n_power_iterations`` and ``eps`` of the types PyTorch's SN takes read as there, train and
    eval, also after the argument changes (found in review: numpy scalars and tensors were
    refused on the kernel path, so a model that ran on a CPU failed on a GPU)."""
    ref, ours, make_x = make_pair("conv2d", seed, device=device, **ARGUMENT_TYPES[case])
    x = make_x()
    for step in range(3):
        if step == 2:  # a new value of the same type
            for m in (ref, ours):
                for name, value in ARGUMENT_TYPES[case].items():
                    setattr(par(m), name, value * 2)
        ref.train(step != 1)
        ours.train(step != 1)
        assert_close(ours(x), ref(x), msg=f"step {step}")
        assert_uv_close(ours, ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["_u", "_v"])
def test_strided_vectors_read_as_pytorch(name, device, seed):
    """A non-contiguous u or v (``load_state_dict(assign=True)`` of slices, say) reads as in
    PyTorch's SN, train and eval, the strided buffer updated in place (found in review: the
    kernel path refused it, "u must be contiguous", where PyTorch reads it)."""
    ref, ours, make_x = make_pair("conv2d", seed, device=device)
    for m in (ref, ours):
        vec = getattr(par(m), name)
        strided = torch.zeros(2 * vec.numel(), device=device)[::2]
        strided.copy_(vec)
        setattr(par(m), name, strided)
    x = make_x()
    for step in range(3):
        ref.train(step != 1)
        ours.train(step != 1)
        assert_close(ours(x), ref(x), msg=f"step {step}")
        assert_uv_close(ours, ref, torch.float32)
        assert getattr(par(ours), name).stride() == (2,)


@pytest.mark.parametrize("device", DEVICES)
def test_float_count_is_pytorchs_type_error(device, seed):
    """``n_power_iterations=2.0``: PyTorch's ``range(2.0)`` raises at the registration read, a
    TypeError; so does ours (it was a ValueError on the kernel path)."""
    for register in (torch_sn, sn):
        with pytest.raises(TypeError, match="'float' object cannot be interpreted as an integer"):
            register(nn.Linear(7, 5, device=device), n_power_iterations=2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["deepcopy", "made_inside", "to_empty_inside"])
def test_inference_mode(how, device, seed):
    """Layers deep-copied (an EMA or eval copy), made, or ``to_empty``-ed inside
    ``torch.inference_mode()`` read there, in training and eval mode, and afterwards (eval) outside
    it, as PyTorch's SN does (found in review: the first read of a deep copy inside the block
    raised "Inference tensors do not track version counter": the copy's semaphore was made
    anew there, an inference tensor). The layer's own buffers stay normal tensors."""
    ref, ours, make_x = make_pair("conv2d", seed, device=device)
    x = make_x()
    with torch.inference_mode():
        if how == "deepcopy":
            ref, ours = copy.deepcopy(ref), copy.deepcopy(ours)
        elif how == "made_inside":
            pair = make_pair("conv2d", seed, device=device)
            ref, ours = pair[0], pair[1]
        else:
            for m in (ref, ours):
                m.to_empty(device=device)
                torch.manual_seed(seed)
                orig(m).normal_()
                m.bias.zero_()
                par(m)._u.copy_(F.normalize(torch.randn(par(m)._u.shape), dim=0))
                par(m)._v.copy_(F.normalize(torch.randn(par(m)._v.shape), dim=0))
        for train in (True, False):
            ref.train(train)
            ours.train(train)
            assert_close(ours(x), ref(x), msg=f"inside, train={train}")
            assert_uv_close(ours, ref, torch.float32)
    assert not par(ours)._sem.is_inference() or not fused_supported(orig(ours), 0)  # (unused there)
    with torch.no_grad():  # (u, v and the weight made inside the block are inference tensors, in
        # PyTorch's SN too: a training read would update them in place, which torch refuses)
        assert_close(ours(x), ref(x), msg="after the block")
    assert not par(ours)._sigma.is_inference() and not par(ours)._sigma.isnan()  # a normal tensor, logged


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("how", ["made_inside", "deepcopy", "assigned_inside"])
def test_inference_tensor_uv_training_read_outside_raises(how, grad, device, seed):
    """u and v that are inference tensors (the layer made or deep-copied inside
    ``torch.inference_mode()``, or buffers assigned there) cannot be updated outside the block:
    a training read there raises torch's in-place error, as PyTorch's SN does, with or without
    grad, and leaves them as they were (PyTorch's has updated u by then). Also after training
    reads inside the block, whose checked read the layer keeps, flagged (the kernels wrote them
    silently before), and after a checked read outside with normal buffers (assigned_inside:
    the same shapes, so only the signature's inference flag tells the difference). Eval reads
    outside still work, and skip the checks; so does a training read with no iteration (u and
    v are only read: PyTorch's loop runs no time)."""
    ref, ours, make_x = make_pair("conv2d", seed, device=device)
    x = make_x()
    if how == "assigned_inside":
        for m in (ref, ours):
            m(x)
            m(x)
    with torch.inference_mode():
        if how == "deepcopy":
            ref, ours = copy.deepcopy(ref), copy.deepcopy(ours)
        elif how == "made_inside":
            ref, ours = make_pair("conv2d", seed, device=device)[:2]
        else:
            for m in (ref, ours):
                par(m)._u, par(m)._v = par(m)._u.clone(), par(m)._v.clone()
        for m in (ref, ours):
            m(x)
            m(x)
    assert par(ours)._u.is_inference() and par(ours)._v.is_inference()
    assert_uv_close(ours, ref, torch.float32)
    for m in (ref, ours):
        u, v = par(m)._u.clone(), par(m)._v.clone()
        for _ in range(2):
            with torch.set_grad_enabled(grad), pytest.raises(
                    RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
                m(x)
        if m is ours:
            assert torch.equal(par(m)._u, u) and torch.equal(par(m)._v, v)
        else:  # PyTorch's F.normalize(..., out=u) has written u when torch raises: undone
            with torch.inference_mode():
                par(m)._u.copy_(u)
    for m in (ref, ours):
        m.eval()
    with torch.no_grad():
        assert_close(ours(x), ref(x))
        if fused_supported(orig(ours), 0):  # (the kernels' path keeps its checked read)
            assert par(ours)._checked_read is not None and par(ours)._checked_read[3]
            with mock.patch.object(sn_fused.parametrizations, "fused_supported") as checks:
                assert_close(ours(x), ref(x))
            checks.assert_not_called()
        for m in (ref, ours):
            m.train()
            par(m).n_power_iterations = 0
        assert_close(ours(x), ref(x))


@pytest.mark.parametrize("device", DEVICES)
def test_inference_mode_read_with_grad_enabled(device, seed):
    """Inside ``torch.inference_mode()`` autograd records nothing, even under
    ``torch.enable_grad()``: a read there gives an inference tensor that does not require grad,
    as PyTorch's SN does (found in review: the fused path tried to save the weight for backward
    and raised "Inference tensors cannot be saved for backward")."""
    ref, ours, make_x = make_pair("conv2d", seed, device=device)
    ref.weight, ref.weight, ours.weight, ours.weight  # (a checked read kept: the next ones take the fast path)
    with torch.inference_mode(), torch.enable_grad():
        for train in (True, False):
            ref.train(train)
            ours.train(train)
            w_ref, w = ref.weight, ours.weight
            assert w.is_inference() and not w.requires_grad and w_ref.is_inference()
            assert_close(w, w_ref, msg=f"train={train}")


@pytest.mark.parametrize("device", DEVICES)
def test_inference_sigma_buffer_assigned_after_checked_reads(device, seed):
    """A ``_sigma`` (or ``_sem``) buffer replaced by an inference tensor after the layer kept
    its checked read: the next read outside inference mode is checked again, which makes the
    layer's own buffer a normal tensor again (found in review: the kept read wrote sigma into
    the inference tensor, where the op refuses to)."""
    ref, ours, make_x = make_pair("conv2d", seed, device=device)
    x = make_x()
    for name in ("_sigma", "_sem"):
        for _ in range(2):
            assert_close(ours(x), ref(x))
        with torch.inference_mode():
            setattr(par(ours), name, getattr(par(ours), name).clone())
        assert getattr(par(ours), name).is_inference()
        assert_close(ours(x), ref(x), msg=name)
        assert not getattr(par(ours), name).is_inference(), name
    assert not par(ours)._sigma.isnan()


def test_pickle_of_an_earlier_layer_with_its_checked_read(seed):
    """A parametrization pickled by an earlier sn_fused kept its checked read in its state, its
    signature a plain tuple: loaded, the layer checks its inputs again and reads as before
    (found in review: its first read raised "'tuple' object has no attribute 'matches'",
    which parametrize's property turns into "no attribute 'weight'")."""
    ref, ours, make_x = make_pair("conv2d", seed)
    x = make_x()
    assert_close(ours(x), ref(x))
    p = par(ours)
    signature = sn_fused.ops.spectral_norm._input_signature(
        orig(ours), p._u, p._v, p._sigma, p._sem, p.dim, p.n_power_iterations, p.eps)
    p._checked_read = (tuple(signature), (0, 1, p.eps), [None, None])  # the form of 6e5ca67
    with mock.patch.object(type(p), "__getstate__", nn.Module.__getstate__):  # (which kept it)
        data = pickle.dumps(p)
    ours.parametrizations.weight[0] = pickle.loads(data)
    assert par(ours)._checked_read is None or par(ours)._checked_read[0] != signature
    for _ in range(2):
        assert_close(ours(x), ref(x))


@pytest.mark.parametrize("device", DEVICES)
def test_jit_trace(device, seed):
    """``torch.jit.trace`` of an eval-mode model (the usual way to trace for serving): the traced
    module gives PyTorch's numbers, and follows later changes of the weight (found in review:
    tracing failed with "no attribute 'weight'"). Traced reads run torch ops: the tracer records
    nothing else."""
    ref, ours, make_x = make_pair("conv2d", seed, device=device, train=False)
    x = make_x()
    traced = [torch.jit.trace(m, (x,), check_trace=False) for m in (ref, ours)]
    assert_close(traced[1](x), traced[0](x))
    for m in (ref, ours):
        with torch.no_grad():
            orig(m).mul_(2).add_(0.1)
    assert_close(traced[1](x), traced[0](x), msg="after a weight update")


# --------------------------------------------------------------------------- torch.compile


class _GraphRecorder:
    """A ``torch.compile`` backend that keeps each graph Dynamo captures and runs it as is.

    No AOTAutograd and no Inductor: those need the triton_kernel_wrapper HOP, which the
    interpreter has not got (tests/test_ops.py, CPU_OPCHECK_UTILS); ``tests/test_gpu.py``
    compiles with Inductor on a GPU. What this checks on every machine is Dynamo's side:
    the layer, the autograd.Function and the ops trace as one graph, and running that graph
    gives the eager numbers.
    """

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def targets(self):
        """Every call target in the captured graphs and their subgraphs (autograd.Function
        bodies are subgraphs of an ``autograd_function_apply`` node)."""
        return {node.target for gm in self.graphs for sub in gm.modules()
                if isinstance(sub, torch.fx.GraphModule) for node in sub.graph.nodes
                if node.op == "call_function"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train, n_iter, dynamic", [(True, 1, False), (True, 2, False), (False, 1, False),
                                                    (True, 1, True)],
                         ids=["train-n1", "train-n2", "eval", "train-n1-dynamic"])
def test_torch_compile_fullgraph_traces_one_graph(train, n_iter, dynamic, device, seed):
    """``torch.compile(fullgraph=True)``: no graph break, and the same numbers as eager --
    outputs, every gradient, and u, v, sigma after each step, bit for bit (the same kernels
    run on the same inputs). ``dynamic=True``: the batch size changes every step, one graph
    serves them all (found in review: ``math.isfinite`` on the symbolic eps broke the graph)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        sn(nn.Conv2d(3, 4, 3, padding=1, device=device), n_power_iterations=n_iter), nn.LeakyReLU(0.1),
        sn(nn.ConvTranspose2d(4, 2, 2, stride=2, device=device), n_power_iterations=n_iter),  # dim=1
        nn.Flatten(), sn(nn.Linear(2 * 10 * 10, 3, device=device), n_power_iterations=n_iter),
    ).train(train)
    twin = copy.deepcopy(model)
    recorder = _GraphRecorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True, dynamic=dynamic)
    for step in range(3):
        x = torch.randn(2 + step * dynamic, 3, 5, 5, device=device)
        out, expected = compiled(x), twin(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=0, msg=f"step {step}")
        out.square().sum().backward()
        expected.square().sum().backward()
        for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=f"step {step}: {name}")
        for (name, a), (_, b) in zip(model.named_buffers(), twin.named_buffers()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"step {step}: {name}")
    assert len(recorder.graphs) == 1  # one graph for the three steps: no break, no recompile
    model(x), compiled(x)  # eager and compiled reads of the same layers, alternating
    assert len(recorder.graphs) == 1
    fused = fused_supported(orig(model[0]), 0)
    ops = {torch.ops.sn_fused.spectral_norm_forward, torch.ops.sn_fused.spectral_norm_backward}
    assert (ops <= recorder.targets()) == fused, recorder.targets()


class _Tagged(torch.Tensor):
    """A torch.Tensor subclass that is no wrapper (a tag, as libraries make them): W_sn is one too."""


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad_mode", ["grad", "no_grad"])
@pytest.mark.parametrize("weight_type", ["parameter", "subclass"])
def test_read_tells_autograd_it_wrote_u_and_v(train, grad_mode, weight_type, device, seed):
    """A training read writes u and v in place: a backward that saved one of them before the read
    then fails with autograd's in-place error, as with PyTorch's SN, whichever read path ran (the
    first read is the checked one, the next ones the C++ read where it is built; a weight of a
    Tensor subclass always takes the Python one); an eval read leaves them alone and the
    backward runs. (Found in review: the kernels' writes left the version counters alone, and
    such a backward silently used the new u.)"""
    ref, ours, make_x = make_pair("linear", seed, device=device)
    if weight_type == "subclass":
        for m in (ref, ours):
            m.parametrizations.weight.original = nn.Parameter(orig(m).detach().as_subclass(_Tagged))
    for step in range(3):
        errors = []
        for m in (ref, ours):
            m.train(train)
            w = torch.randn(par(m)._u.shape[0], device=device, requires_grad=True)
            y = (w * par(m)._u).sum() + (w.sum() * par(m)._v).sum()  # (mul saves u and v for w's gradient)
            with torch.no_grad() if grad_mode == "no_grad" else contextlib.nullcontext():
                m.weight
            try:
                y.backward()
                errors.append(None)
            except RuntimeError as e:
                errors.append(str(e))
        assert (errors[1] is None) == (errors[0] is None) == (not train), (step, errors)
        assert train == ("modified by an inplace operation" in str(errors[1])), errors[1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["eps_numpy_float64", "eps_tensor", "n_numpy_int", "n_tensor"])
def test_torch_compile_takes_the_argument_types_pytorch_takes(case, device, seed):
    """A compiled model whose SN has an eps or count of a type PyTorch's SN takes (a numpy scalar,
    a one-element tensor) runs with PyTorch's numbers (found in review: Dynamo traces them as an
    array or a tensor, which the op's float and int refused; the layer reads through PyTorch's
    ops there). ``fullgraph=True`` but for the counts, whose ``range(n)`` breaks PyTorch's graph too."""
    ref, ours, make_x = make_pair("conv2d", seed, device=device, **ARGUMENT_TYPES[case])
    fullgraph = case.startswith("eps")
    compiled = {m: torch.compile(m, backend=_GraphRecorder(), fullgraph=fullgraph) for m in (ref, ours)}
    for step in range(3):
        for m in (ref, ours):
            m.train(step != 1)
        x = make_x()
        assert_close(compiled[ours](x), compiled[ref](x), msg=f"step {step}")
        assert_uv_close(ours, ref, torch.float32)
        assert_close(par(ours)._sigma, torch_sigma(ref), msg=f"step {step}: sigma")


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_and_eager_reads_keep_one_semaphore(device, seed):
    """Compiled and eager reads of one layer, alternating (a compiled training step, eager
    sampling): the compiled op bumps the semaphore's version (it declares it written), and the
    next eager read puts it at rest in place -- the same tensor at the same address, which a CUDA
    graph holds as a static input -- instead of making a new one (found in review: a new one each
    time). The numbers are eager's."""
    torch.manual_seed(seed)
    m = sn(nn.Linear(6, 4, device=device))
    twin = copy.deepcopy(m)
    compiled = torch.compile(m, backend=_GraphRecorder(), fullgraph=True)
    sem = par(m)._sem
    address = sem.data_ptr()
    for step in range(3):
        x = torch.randn(2, 6, device=device)
        assert_close(compiled(x), twin(x), msg=f"step {step}, compiled")
        assert_close(m(x), twin(x), msg=f"step {step}, eager")
        assert par(m)._sem is sem and sem.data_ptr() == address and not sem.any()


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_double_backward_is_an_error(device, seed):
    """A second derivative in the weight through a ``torch.compile``'d read (Dynamo alone; with
    AOTAutograd torch itself refuses double backward): where the fused op runs, an error
    saying so, never a Hessian-vector product without the SN term (found in review: with
    another path from the loss to the weight it came back as that path's term alone);
    on the reference path, PyTorch's numbers."""
    ref, ours, make_x = make_pair("linear", seed, dtype=torch.float64, device=device)
    x = make_x()
    direction = random_like_weight(ref, seed, torch.float64)

    def hvp(m):
        compiled = torch.compile(m, backend=_GraphRecorder(), fullgraph=True)
        w = orig(m)
        loss = compiled(x).square().sum() + w.pow(3).sum()  # a second path to the weight
        grad_w, = torch.autograd.grad(loss, w, create_graph=True)
        return torch.autograd.grad((grad_w * direction).sum(), w)[0]

    want = hvp(ref)
    if fused_supported(orig(ours), 0):
        with pytest.raises(RuntimeError, match="double backward"):
            hvp(ours)
    else:
        assert_close(hvp(ours), want)


@contextlib.contextmanager
def _reference_launchers():
    """Replace the two launchers with the float reference, writing the same outputs.

    AOTAutograd (functionalization, the joint graph) cannot run the interpreter's kernels
    (no HOP on CPU); with these stand-ins it traces everything around them: the autograd
    Function, its packed arguments, the ops' in-place mutations of u, v, sigma_buf.
    """
    from sn_fused import reference
    from sn_fused.ops import spectral_norm as ops_mod

    def forward(weight, out, u, v, saved, sigma_buf, sem, dim, n_power_iterations, eps, training, **launch):
        u_saved, v_saved, sigma = ops_mod.split_saved(saved, u.numel(), v.numel())
        u_new, v_new = u.clone(), v.clone()
        w_sn, s = reference.spectral_norm_reference(weight, u_new, v_new, dim=dim, eps=eps, training=training,
                                                    n_power_iterations=n_power_iterations)
        for dst, src in ((out, w_sn), (u_saved, u_new), (v_saved, v_new), (sigma, s), (sigma_buf, s)):
            dst.copy_(src)
        if training:
            u.copy_(u_new)
            v.copy_(v_new)

    def backward(grad, weight, grad_weight, saved, sem, dim, **launch):
        M = weight.shape[dim]
        u, v, sigma = ops_mod.split_saved(saved, M, weight.numel() // M)
        grad_weight.copy_(reference.spectral_norm_backward_reference(grad, weight, u, v, sigma, dim))

    with mock.patch.object(ops_mod, "_launch_forward", forward), \
            mock.patch.object(ops_mod, "_launch_backward", backward):
        yield


@pytest.mark.skipif(not INTERPRET, reason="CPU weights take the fused path (the autograd Function) "
                                          "only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("train, n_iter", [(True, 1), (True, 2), (False, 1)], ids=["train-n1", "train-n2", "eval"])
def test_torch_compile_aot_autograd_around_the_launchers(train, n_iter, seed):
    """``torch.compile`` through AOTAutograd (the part Inductor builds on), on CPU: with the
    launchers replaced by the reference (``_reference_launchers``), the compiled model's
    outputs, gradients and u, v, sigma equal eager's over three steps, from one forward and
    one backward graph. On a GPU the kernels themselves are compiled (tests/test_gpu.py)."""
    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func

    torch.manual_seed(seed)
    model = nn.Sequential(
        sn(nn.Conv2d(3, 4, 3, padding=1), n_power_iterations=n_iter), nn.LeakyReLU(0.1),
        sn(nn.ConvTranspose2d(4, 2, 2, stride=2), n_power_iterations=n_iter),  # dim=1
        nn.Flatten(), sn(nn.Linear(2 * 10 * 10, 3), n_power_iterations=n_iter),
    ).train(train)
    twin = copy.deepcopy(model)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    with _reference_launchers():
        for step in range(3):
            x = torch.randn(2, 3, 5, 5)
            out, expected = compiled(x), twin(x)
            torch.testing.assert_close(out, expected, msg=f"step {step}")
            out.square().sum().backward()
            expected.square().sum().backward()
            for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
                torch.testing.assert_close(a.grad, b.grad, msg=f"step {step}: {name}")
            for (name, a), (_, b) in zip(model.named_buffers(), twin.named_buffers()):
                torch.testing.assert_close(a, b, equal_nan=True, msg=f"step {step}: {name}")
    assert len(graphs) == 2  # one forward, one backward graph for all steps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_torch_export(train, device, seed):
    """``torch.export.export`` of a model with sn_fused layers (a generator exported for
    serving, say): the exported program holds one forward op per layer where the kernels
    run, and its module gives the eager outputs and, in training mode, the eager u, v
    updates (export lifts the buffer mutations into the program), step after step. It runs
    forward only: a backward through it is an error (PyTorch's SN exports torch ops, which
    autograd can differentiate)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        sn(nn.Conv2d(3, 4, 3, padding=1, device=device)), nn.LeakyReLU(0.1),
        sn(nn.ConvTranspose2d(4, 2, 2, stride=2, device=device)),  # dim=1
    ).train(train)
    for layer in (model[0], model[2]):
        scramble_uv(layer)  # far from converged: each training read visibly moves u, v
    twin = copy.deepcopy(model)
    start = {name: b.clone() for name, b in twin.named_buffers()}
    x = torch.randn(2, 3, 5, 5, device=device)
    program = torch.export.export(model, (x,))
    exported = program.module()
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    fused = fused_supported(orig(model[0]), 0)
    assert targets.count(torch.ops.sn_fused.spectral_norm_forward.default) == (2 if fused else 0), targets
    for step in range(2):
        x = torch.randn(2, 3, 5, 5, device=device)
        torch.testing.assert_close(exported(x), twin(x), msg=f"step {step}")
        buffers = dict(exported.named_buffers())
        for name, b in twin.named_buffers():
            if name.endswith(("_u", "_v")):
                torch.testing.assert_close(buffers[name], b, msg=f"step {step}: {name}")
                assert torch.equal(b, start[name]) != train, f"step {step}: {name} moved in eval, or not in training"
    # Forward only where the fused op is in the program (it mutates u, v, so torch.library takes
    # no autograd formula for it; the layer's autograd.Function is not exported): a loud error.
    out = exported(x).sum()
    if fused:
        with pytest.raises(RuntimeError, match="autograd"):
            out.backward()
    else:
        out.backward()
        assert all(p.grad is not None for p in exported.parameters())


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_make_fx_of_a_layer_never_drops_the_kernel(grad, seed):
    """``make_fx`` (fake tensors, no Dynamo) of a model with an sn_fused layer: its graph
    holds the SN read, or tracing fails loudly -- never a graph that leaves the kernel out.
    (Under the interpreter there is no HOP to record the kernel, so the launcher must not
    skip it while a graph is recorded; found in review.)"""
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(seed)
    m = sn(nn.Linear(8, 6, bias=False)).eval()
    state = {k: v.detach().clone() for k, v in [*m.named_parameters(), *m.named_buffers()]}
    x = torch.randn(3, 8)

    def f(state, x):
        return torch.func.functional_call(m, state, (x,))

    expected = f(state, x)
    with torch.set_grad_enabled(grad):
        try:
            graph = make_fx(f, tracing_mode="fake")(state, x)
        except RuntimeError:
            assert INTERPRET and fused_supported(orig(m), 0)  # loud, and only where no HOP exists
            return
    torch.testing.assert_close(graph(state, x), expected)


# ---------------------------------------------------------------------------------------------
# One layer read on several CUDA streams: a semaphore per stream (_SpectralNorm._stream_semaphore).
# A CPU has no streams: the current stream is played by a value the test sets.


@pytest.fixture
def fake_streams(monkeypatch):
    """``ops.spectral_norm._raw_stream`` answers the calling thread's ``stream`` (1 by default) and
    ``ops.spectral_norm._stream_capturing`` its ``capturing`` (False)."""
    import threading

    from sn_fused.ops import spectral_norm as snm

    state = threading.local()
    monkeypatch.setattr(snm, "_raw_stream", lambda index: getattr(state, "stream", 1))
    monkeypatch.setattr(snm, "_stream_capturing", lambda index: getattr(state, "capturing", False))
    return state


def test_stream_capturing_asks_the_weights_device(monkeypatch):
    """``_stream_capturing(i)`` answers for device ``i``'s current stream, where a read of a weight
    on device ``i`` launches, whatever the current device (torch's answer is the current
    device's): a capture on device 1 seen from device 0, and none on device 0 seen from device 1."""
    from sn_fused.ops import spectral_norm as snm

    current, capturing = {"device": 0}, {1}

    @contextlib.contextmanager
    def device(index):
        before, current["device"] = current["device"], index
        try:
            yield
        finally:
            current["device"] = before

    monkeypatch.setattr(snm, "_current_device", lambda: current["device"])
    monkeypatch.setattr(snm, "_current_stream_capturing", lambda: current["device"] in capturing)
    monkeypatch.setattr(torch.cuda, "device", device)
    assert snm._stream_capturing(1) and not snm._stream_capturing(0) and current["device"] == 0
    current["device"] = 1
    assert snm._stream_capturing(1) and not snm._stream_capturing(0) and current["device"] == 1


def test_stream_semaphore(fake_streams, monkeypatch):
    """``_sem`` on the stream that read first outside a capture, and in captures; one semaphore
    of the layer's own per other stream, at rest, on the weight's device, a normal tensor even
    in inference mode, and at most ``_MAX_STREAM_SEMS`` of them; copies, pickles and moves start
    without, casts keep them; a weight on another device than ``_sem`` counts as a move."""
    from sn_fused import parametrizations as pz

    m = sn_fused.spectral_norm(nn.Linear(8, 4))  # (its registration's read on a CPU: no stream)
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)  # (as CUDA tensors on device 0)
    p = m.parametrizations.weight[0]
    sem, w = p._sem, m.parametrizations.weight.original
    fake_streams.stream, fake_streams.capturing = 5, True  # (a first read inside a capture)
    assert p._stream_semaphore(sem, w, 0) is sem and p._sem_stream is None
    fake_streams.stream, fake_streams.capturing = 7, False
    assert p._stream_semaphore(sem, w, 0) is sem and p._sem_stream == 7
    assert p._stream_semaphore(sem, w, 0) is sem
    fake_streams.stream = 9
    own = p._stream_semaphore(sem, w, 0)
    assert own is not sem and own.dtype == torch.int32 and own.tolist() == [0, 0] and own.device == w.device
    assert p._stream_semaphore(sem, w, 0) is own
    fake_streams.stream = 7
    assert p._stream_semaphore(sem, w, 0) is sem
    fake_streams.stream, fake_streams.capturing = 11, True
    assert p._stream_semaphore(sem, w, 0) is sem and (0, 11) not in p._stream_sems
    fake_streams.capturing = False
    with torch.inference_mode():
        assert not p._stream_semaphore(sem, w, 0).is_inference()
    assert sorted(p._stream_sems) == [(0, 9), (0, 11)]
    for q in (copy.deepcopy(m).parametrizations.weight[0], pickle.loads(pickle.dumps(p))):
        assert q._sem_stream is None and q._stream_sems is None
        assert q._stream_semaphore(q._sem, w, 0) is q._sem  # (stream 11 reads first here)
    m.float()  # a cast: the same stream keeps _sem, the others theirs, and _sem is not written
    assert p._sem_stream == 7 and sorted(p._stream_sems) == [(0, 9), (0, 11)] and p._sem is sem
    monkeypatch.setattr(pz, "_MAX_STREAM_SEMS", 2)
    fake_streams.stream = 12
    assert p._stream_semaphore(sem, w, 0) is not sem and list(p._stream_sems) == [(0, 12)]
    # The weight on device 1, _sem on device 0 (load_state_dict(assign=True) moves no buffer):
    # _sem is for the read to remake there, and the streams start anew.
    assert p._stream_semaphore(sem, w, 1) is sem and p._sem_stream is None and p._stream_sems is None
    p._sem_stream, p._stream_sems = 7, {(0, 9): own}
    m.to("meta")  # moved
    assert p._sem_stream is None and p._stream_sems is None


def test_apply_writes_only_a_new_semaphore():
    """``_apply`` zeroes ``_sem`` where it is a new tensor (``to_empty``, a move) and leaves the
    same one alone (a cast: another stream's launch may be using it); a write that ``fn`` makes
    into it in place shows in its version, which the next read on its stream puts right."""
    m = sn_fused.spectral_norm(nn.Linear(8, 4))
    p = m.parametrizations.weight[0]
    sem = p._sem
    sem.fill_(-(2**31))  # (a rest state: where an odd number of barriers leaves it)
    version = sem._version
    m.half()
    assert p._sem is sem and sem.tolist() == [-(2**31)] * 2 and sem._version == version
    m._apply(lambda t: t.fill_(7) if t.dtype == torch.int32 else t)  # torch code writing it in place
    assert p._sem is sem and sem._version != p._sem_version
    m.to_empty(device="cpu")
    assert p._sem is not sem and p._sem.tolist() == [0, 0] and p._sem._version == p._sem_version


def test_stream_semaphore_first_reads_from_many_threads(fake_streams, monkeypatch):
    """Threads that read a new layer at once, each on its own stream: exactly one takes ``_sem``."""
    import threading

    m = sn_fused.spectral_norm(nn.Linear(8, 4))  # (its registration's read on a CPU: no stream)
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)  # (as CUDA tensors on device 0)
    p = m.parametrizations.weight[0]
    n = 8
    start, got = threading.Barrier(n), [None] * n

    def first_read(i):
        fake_streams.stream = 100 + i
        start.wait()
        got[i] = p._stream_semaphore(p._sem, m.parametrizations.weight.original, 0)

    threads = [threading.Thread(target=first_read, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [g is p._sem for g in got].count(True) == 1
    assert len({id(g) for g in got}) == n
    assert got[p._sem_stream - 100] is p._sem


@pytest.mark.skipif(not INTERPRET, reason="CPU weights take the kernels only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("cpp", [True, False], ids=["cpp_read", "python_read"])
@pytest.mark.parametrize("training", [True, False])
def test_reads_on_two_streams_launch_with_their_own_semaphores(fake_streams, monkeypatch, training, cpp):
    """A layer's reads and backwards, alternating between two streams, checked and (the second)
    unchecked: every launch of a read on the first stream, and of its backward, gets ``_sem``;
    on the second stream, that stream's own semaphore; the numbers are those of a twin read on
    one stream. Torch code writing ``_sem`` (as a compiled read does) is put right only by a
    read on ``_sem``'s stream: from the other, a ``zero_`` could land inside a launch of it."""
    from sn_fused import parametrizations as pz
    from sn_fused.ops import kernels
    from sn_fused.ops import spectral_norm as snm

    if cpp and not snm.CPP_READS:
        pytest.skip("sn_fused._C is not built, or switched off")
    monkeypatch.setattr(snm, "CPP_READS", cpp)
    torch.manual_seed(0)
    m = sn_fused.spectral_norm(nn.Linear(24, 12)).train(training)
    twin = copy.deepcopy(m)
    expected = []
    for _ in range(6):
        w = twin.weight
        w.backward(torch.ones_like(w))
        expected.append(w.detach().clone())

    entered = []  # the layer's calls into the op layer: (which, semaphore)
    for name in ("spectral_norm_fused", "_spectral_norm_checked"):
        read = getattr(pz, name)

        def spy(weight, u, v, sigma_buf, sem, *args, read=read, name=name, **kwargs):
            entered.append((name, sem))
            return read(weight, u, v, sigma_buf, sem, *args, **kwargs)

        monkeypatch.setattr(pz, name, spy)
    launched = []  # every kernel launch, from Python or from the C++ read: (forward?, semaphore)
    launch = snm._launch

    def launch_spy(kernel, grid, args, *rest):
        forward = kernel is kernels.spectral_norm_fwd_kernel
        launched.append((forward, args[7] if forward else args[5]))
        return launch(kernel, grid, args, *rest)

    monkeypatch.setattr(snm, "_launch", launch_spy)
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)  # (as a CUDA weight's)
    p = m.parametrizations.weight[0]
    sem = p._sem
    for i in range(6):
        fake_streams.stream = 1 + i % 2
        if i == 1:
            p._checked_read = None  # (registration's read was checked: this one is not)
        if i == 3:
            torch.autograd.graph.increment_version(sem)  # torch code wrote _sem
        del launched[:]
        w = m.weight
        w.backward(torch.ones_like(w))
        expected_sem = sem if i % 2 == 0 else p._stream_sems[(0, 2)]
        assert launched and {f for f, _ in launched} == {True, False}, i
        assert all(s is expected_sem for _, s in launched), i
        assert torch.equal(w, expected[i]), i
        if i == 3:  # from stream 2: not put right (not zeroed, not at rest by its version)
            assert p._sem_version != sem._version
    assert p._sem_version == sem._version and p._sem is sem  # put right by read 4, on stream 1
    assert p._sem_stream == 1 and list(p._stream_sems) == [(0, 2)]
    # (read 3, on stream 2, checked: its own semaphore need not wait for _sem to be put right)
    assert [name for name, _ in entered] == ["_spectral_norm_checked", "spectral_norm_fused",
                                             "_spectral_norm_checked", "_spectral_norm_checked",
                                             "spectral_norm_fused", "_spectral_norm_checked"]
    assert all(s is (sem if i % 2 == 0 else p._stream_sems[(0, 2)]) for i, (_, s) in enumerate(entered))
    assert torch.equal(m.parametrizations.weight.original.grad, twin.parametrizations.weight.original.grad)
