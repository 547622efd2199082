"""Tests of ``sn_fused.convert`` and the legacy state_dict loaders.

A small SNGAN-style discriminator (Conv2d, a ConvTranspose2d for ``dim=1``,
a Linear) is built with PyTorch's parametrization spectral norm, the legacy
hook one, or a mix, and converted. Runs with and without
``TRITON_INTERPRET=1``: with it the converted model goes through the real
Triton kernels (equal to fp32 rounding), without it through the pure-PyTorch
path (bitwise equal: same operations in the same order).
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations as P
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm as LegacySpectralNorm

import sn_fused
from conftest import list_forward_calls
from sn_fused.parametrizations import _SpectralNorm as FusedSN

# Set before sn_fused (hence Triton) is imported, like the library reads it.
FUSED = os.environ.get("TRITON_INTERPRET", "0") == "1"
TorchSN = P._SpectralNorm
legacy_sn = nn.utils.spectral_norm


def assert_same(actual, expected):
    """Bitwise on the PyTorch path; to fp32 rounding where the fused kernel sums in its own order."""
    if FUSED:
        torch.testing.assert_close(actual, expected, rtol=2e-5, atol=1e-6)
    else:
        assert torch.equal(actual, expected), (actual - expected).abs().max()


class _Scale(nn.Module):
    """A second parametrization, to check that convert leaves it alone."""

    def forward(self, x):
        return 2 * x


def _discriminator(sns, seed=0):
    """SNGAN-style D on 3x8x8 inputs; ``sns[i]`` wraps SN-able layer i (or ``None``: no SN)."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 16, 4, 2, 1),
              nn.ConvTranspose2d(16, 12, 3, 1, 1),  # dim=1: A is 12 x (16*3*3)
              nn.Conv2d(12, 16, 4, 2, 1), nn.Linear(16 * 2 * 2, 1)]
    layers = [sn(layer) if sn is not None else layer for sn, layer in zip(sns, layers)]
    act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
    return nn.Sequential(layers[0], act(), layers[1], act(), layers[2], act(), layers[3], nn.Flatten(),
                         layers[4])


SN_LAYERS = (0, 2, 4, 6, 8)  # indices of the five weight layers in the Sequential
ALL_PARAM = [P.spectral_norm] * 5
ALL_LEGACY = [legacy_sn] * 5


def _input():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _trained(model, x, steps=2):
    """A few training calls, so u and v are not fresh from registration."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    return model


def _eval_out(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def _fused_sns(model):
    return [p for m in model.modules() if parametrize.is_parametrized(m)
            for plist in m.parametrizations.values() for p in plist if isinstance(p, FusedSN)]


def _list_forwards(model, x) -> int:
    """How many weights a forward of ``model`` read through torch's ``ParametrizationList.forward``
    (sn_fused's fast read skips it where it is the only parametrization of its weight)."""
    with list_forward_calls() as counted:
        model(x)
    return counted.call_count


def _no_torch_sn_left(model):
    for m in model.modules():
        assert not any(isinstance(h, LegacySpectralNorm) for h in m._forward_pre_hooks.values())
        assert not m._state_dict_hooks and not m._load_state_dict_pre_hooks
        assert not any(n.endswith(("_orig", "_u", "_v")) for n, _ in m.named_parameters(recurse=False))
        assert not any(n.endswith(("_u", "_v")) and n not in ("_u", "_v")  # legacy <name>_u
                       for n, _ in m.named_buffers(recurse=False))
        if parametrize.is_parametrized(m):
            assert not any(isinstance(p, TorchSN) for plist in m.parametrizations.values() for p in plist)


# --------------------------------------------------------------------------- (a) parametrization form


def test_convert_parametrization_form():
    x = _input()
    model = _trained(_discriminator(ALL_PARAM), x)
    twin = copy.deepcopy(model)
    before = _eval_out(model, x)
    keys = list(model.state_dict())
    state = {k: t.clone() for k, t in model.state_dict().items()}
    params = list(model.parameters())
    old = [model[i].parametrizations.weight[0] for i in SN_LAYERS]

    rng = torch.get_rng_state()
    assert sn_fused.convert(model) is model
    assert torch.equal(torch.get_rng_state(), rng)  # no draw
    _no_torch_sn_left(model)
    # Same state, no iteration, same hyper-parameters; the ConvTranspose keeps dim=1.
    for i, p_old in zip(SN_LAYERS, old):
        p = model[i].parametrizations.weight[0]
        assert type(p) is FusedSN and not p.training
        assert (p.dim, p.eps, p.n_power_iterations) == (p_old.dim, p_old.eps, p_old.n_power_iterations)
        assert p._u is p_old._u and p._v is p_old._v
        assert p._sigma.isnan() and p._sem.eq(0).all()
    assert model[4].parametrizations.weight[0].dim == 1
    assert model[4].parametrizations.weight[0]._u.shape == (12,)
    # state_dict: same keys, same values; optimizer-facing parameters are the same objects.
    assert list(model.state_dict()) == keys
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())
    assert all(a is b for a, b in zip(model.parameters(), params))

    assert_same(_eval_out(model, x), before)
    assert not any(p._sigma.isnan() for p in _fused_sns(model))  # sn_fused's read ran
    assert _list_forwards(model, x) == 0  # the fast read, installed

    # Training mode: the next read matches an unconverted PyTorch twin, forward and backward.
    model.train()
    twin.train()
    out, out_twin = model(x), twin(x)
    assert_same(out, out_twin)
    out.square().sum().backward()
    out_twin.square().sum().backward()
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert_same(a.grad, b.grad)
    for (n, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert_same(a, b)


def test_convert_keeps_hooks_on_the_parametrization():
    """Hooks registered on PyTorch's ``_SpectralNorm`` (a forward hook that logs each read's
    output, say) run on the sn_fused one that replaces it, and the handles that registering
    them returned still remove them (found in review: they were dropped without a word)."""
    x = _input()
    model = _discriminator(ALL_PARAM)
    p = model[0].parametrizations.weight[0]
    shape = model[0].parametrizations.weight.original.shape
    seen = []
    handles = [p.register_forward_pre_hook(lambda mod, args: seen.append(("pre", type(mod)))),
               p.register_forward_hook(lambda mod, args, out: seen.append(("post", type(mod), out.shape)))]
    sn_fused.convert(model)
    assert type(model[0].parametrizations.weight[0]) is FusedSN
    model(x)
    assert seen == [("pre", FusedSN), ("post", FusedSN, shape)]
    for h in handles:
        h.remove()
    seen.clear()
    model(x)
    assert seen == [] and _list_forwards(model, x) == 0  # no hooks left: the fast read again


# --------------------------------------------------------------------------- (b) legacy hook form


def test_convert_legacy_form():
    x = _input()
    model = _trained(_discriminator(ALL_LEGACY), x)
    legacy_sd = model.state_dict()
    # PyTorch's parametrization SN holding the same state: what the converted model must follow.
    twin = _discriminator(ALL_PARAM, seed=123)
    twin.load_state_dict(sn_fused.convert_state_dict(legacy_sd), strict=True)
    before = _eval_out(model, x)
    origs = [model[i].weight_orig for i in SN_LAYERS]
    uvs = [(model[i].weight_u, model[i].weight_v) for i in SN_LAYERS]

    rng = torch.get_rng_state()
    sn_fused.convert(model)
    assert torch.equal(torch.get_rng_state(), rng)
    _no_torch_sn_left(model)
    for i, orig, (u, v) in zip(SN_LAYERS, origs, uvs):
        m = model[i]
        assert m.parametrizations.weight.original is orig  # same Parameter: optimizers keep working
        p = m.parametrizations.weight[0]
        assert type(p) is FusedSN and p._u is u and p._v is v
        assert not m.parametrizations.weight.unsafe
        assert "weight" not in m.__dict__ and "weight_orig" not in m._parameters
    assert model[4].parametrizations.weight[0].dim == 1
    assert list(model.state_dict()) == list(twin.state_dict())

    assert_same(_eval_out(model, x), before)
    assert _list_forwards(model, x) == 0

    model.train()
    twin.train()
    with torch.no_grad():
        assert_same(model(x), twin(x))
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert_same(a, b)


# --------------------------------------------------------------------------- (c) mix


def test_convert_mixed():
    def param_after_scale(layer):
        # SN is the second parametrization of this weight: index 1 must be swapped, index 0 kept.
        parametrize.register_parametrization(layer, "weight", _Scale())
        return P.spectral_norm(layer)

    x = _input()
    model = _trained(_discriminator([legacy_sn, None, P.spectral_norm, param_after_scale, legacy_sn]), x)
    before = _eval_out(model, x)
    scale = model[6].parametrizations.weight[0]
    plain_weight = model[2].weight

    sn_fused.convert(model)
    _no_torch_sn_left(model)
    assert len(_fused_sns(model)) == 4
    assert model[6].parametrizations.weight[0] is scale
    assert type(model[6].parametrizations.weight[1]) is FusedSN
    assert type(model[2]) is nn.Conv2d and model[2].weight is plain_weight  # no SN: untouched
    assert model[4].parametrizations.weight[0].dim == 1
    assert_same(_eval_out(model, x), before)
    assert _list_forwards(model, x) == 1  # the stacked weight, through torch's getter


# --------------------------------------------------------------------------- legacy checkpoints


def test_load_legacy_state_dict():
    x = _input()
    legacy = _trained(_discriminator(ALL_LEGACY), x)
    legacy_sd = legacy.state_dict()
    assert legacy_sd._metadata["0"]["spectral_norm"] == {"weight.version": 1}
    expected = _eval_out(legacy, x)

    model = _discriminator([sn_fused.spectral_norm] * 5, seed=7)
    result = sn_fused.load_legacy_state_dict(model, legacy_sd)  # strict
    assert not result.missing_keys and not result.unexpected_keys
    assert_same(_eval_out(model, x), expected)
    assert torch.equal(model[4].parametrizations.weight[0]._u, legacy_sd["4.weight_u"])

    # The model-free mapping: PyTorch's names, strict load, input untouched.
    mapped = sn_fused.convert_state_dict(legacy_sd)
    assert list(mapped) == list(model.state_dict())
    assert "4.weight_orig" in legacy_sd and mapped["4.parametrizations.weight.0._v"] is legacy_sd["4.weight_v"]
    assert "spectral_norm" not in mapped._metadata["0"]
    assert legacy_sd._metadata["0"]["spectral_norm"] == {"weight.version": 1}
    model2 = _discriminator([sn_fused.spectral_norm] * 5, seed=8)
    model2.load_state_dict(mapped, strict=True)
    # ...and without metadata (hand-made dicts), as PyTorch's own hook accepts them.
    model2.load_state_dict(sn_fused.convert_state_dict(dict(legacy_sd)), strict=True)
    assert_same(_eval_out(model2, x), expected)


def test_load_legacy_state_dict_version_0():
    """PyTorch < 1.0 checkpoints store W_SN and no v; v is recovered as PyTorch's load hook does."""
    x = torch.randn(2, 16, 4, 4)
    legacy = legacy_sn(nn.ConvTranspose2d(16, 12, 3, 1, 1))
    legacy(x)  # one training call: u = normalize(W v), weight = W / sigma
    sd = legacy.state_dict()
    old = OrderedDict((k, v) for k, v in sd.items() if k != "weight_v")
    old["weight"] = legacy.weight.detach().clone()
    old._metadata = copy.deepcopy(sd._metadata)
    old._metadata[""]["spectral_norm"]["weight.version"] = 0

    reloaded = legacy_sn(nn.ConvTranspose2d(16, 12, 3, 1, 1))
    reloaded.load_state_dict(old)  # PyTorch's hook solves for v
    model = P.spectral_norm(nn.ConvTranspose2d(16, 12, 3, 1, 1))
    mapped = sn_fused.convert_state_dict(old, model)
    assert list(mapped) == list(model.state_dict())
    assert torch.equal(mapped["parametrizations.weight.0._v"], reloaded.weight_v)
    model.load_state_dict(mapped, strict=True)
    with pytest.raises(ValueError, match="version-0"):
        sn_fused.convert_state_dict(old)  # dim unknown without a model

    # No metadata, a stale v and the stored W_SN: PyTorch's hook takes the version-0 path too.
    stale = OrderedDict(old, weight_v=torch.randn(16 * 9))
    reloaded.load_state_dict(stale)
    mapped = sn_fused.convert_state_dict(stale, model)
    assert list(mapped) == list(model.state_dict())
    assert torch.equal(mapped["parametrizations.weight.0._v"], reloaded.weight_v)


def test_load_legacy_state_dict_refuses_sn_after_another_parametrization():
    legacy_sd = legacy_sn(nn.Linear(4, 3)).state_dict()
    model = parametrize.register_parametrization(nn.Linear(4, 3), "weight", _Scale())
    sn_fused.spectral_norm(model)
    with pytest.raises(ValueError, match="parametrization 1"):
        sn_fused.load_legacy_state_dict(model, legacy_sd)


def test_convert_one_dimensional_weight():
    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5))

        def forward(self, x):
            return x * self.weight

    x = torch.randn(3, 5)
    for sn in (P.spectral_norm, legacy_sn):
        torch.manual_seed(0)
        m = _trained(sn(Gain()), x, steps=1)
        before = _eval_out(m, x)
        legacy_sd = m.state_dict()
        sn_fused.convert(m)
        p = m.parametrizations.weight[0]
        assert type(p) is FusedSN and not hasattr(p, "_u")
        assert list(m.state_dict()) == ["parametrizations.weight.original"]
        # Parametrization form: F.normalize both sides. Legacy: u^T A v after a training call is
        # ||w|| up to rounding (see convert's note).
        torch.testing.assert_close(_eval_out(m, x), before, rtol=1e-6, atol=0)
        if sn is legacy_sn:
            m.load_state_dict(sn_fused.convert_state_dict(legacy_sd), strict=True)


# --------------------------------------------------------------------------- no-ops


def test_convert_without_spectral_norm_changes_nothing():
    x = _input()
    model = _discriminator([None] * 5)
    model.eval()
    before = _eval_out(model, x)
    classes = [type(m) for m in model.modules()]
    state = model.state_dict()
    assert sn_fused.convert(model) is model
    assert [type(m) for m in model.modules()] == classes
    assert all(not parametrize.is_parametrized(m) for m in model.modules())
    assert list(model.state_dict()) == list(state)
    assert all(a.data_ptr() == b.data_ptr() and torch.equal(a, b)
               for a, b in zip(model.state_dict().values(), state.values()))
    assert torch.equal(_eval_out(model, x), before)


def test_convert_is_idempotent():
    model = _discriminator([legacy_sn, P.spectral_norm, sn_fused.spectral_norm, None, legacy_sn])
    sn_fused.convert(model)
    sns = _fused_sns(model)
    classes = [type(m) for m in model.modules()]
    state = model.state_dict()
    assert sn_fused.convert(model) is model
    assert _fused_sns(model) == sns and all(a is b for a, b in zip(_fused_sns(model), sns))
    assert [type(m) for m in model.modules()] == classes
    assert list(model.state_dict()) == list(state)
    assert all(a.data_ptr() == b.data_ptr() and torch.equal(a, b)
               for a, b in zip(model.state_dict().values(), state.values()))


@pytest.mark.parametrize("form", ["parametrization", "legacy"])
@pytest.mark.parametrize("eps", [np.float32(1e-3), torch.tensor(1e-3), 0])
def test_convert_takes_the_eps_types_spectral_norm_takes(form, eps):
    """An eps of a type PyTorch's SN (and sn_fused.spectral_norm) takes -- a numpy scalar, a
    one-element tensor, an int -- converts, and reads as before (found in review: convert
    refused all but Python ints and floats)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    (P.spectral_norm if form == "parametrization" else legacy_sn)(model[0], eps=eps)
    x = torch.randn(2, 6)
    before = _eval_out(model, x)
    sn_fused.convert(model)
    assert len(_fused_sns(model)) == 1 and _fused_sns(model)[0].eps is eps
    torch.testing.assert_close(_eval_out(model, x), before)


@pytest.mark.parametrize("eps, error", [(-1e-3, ValueError), (float("inf"), ValueError), ("1e-3", TypeError)])
def test_convert_refuses_an_eps_spectral_norm_refuses(eps, error):
    """A negative, non-finite or non-numeric eps (PyTorch's SN takes the first two and gives
    NaN/Inf weights) is refused as ``sn_fused.spectral_norm`` refuses it; that SN is left as it was."""
    model = nn.Sequential(nn.Linear(6, 4))
    P.spectral_norm(model[0])
    model[0].parametrizations.weight[0].eps = eps  # (PyTorch's registration would fail on a str)
    with pytest.raises(error, match="eps"):
        sn_fused.convert(model)
    assert isinstance(model[0].parametrizations.weight[0], TorchSN)
