r"""Move models and checkpoints from PyTorch's spectral norm to sn_fused's.

PyTorch has shipped two spectral norms:

* the parametrization, :func:`torch.nn.utils.parametrizations.spectral_norm`
  (``module.parametrizations.<name>[i]`` is a ``_SpectralNorm``; state_dict
  keys ``<name>`` -> ``parametrizations.<name>.original``,
  ``parametrizations.<name>.<i>._u``, ``parametrizations.<name>.<i>._v``);
* the legacy hook, :func:`torch.nn.utils.spectral_norm` (a forward pre-hook
  ``SpectralNorm`` plus state_dict hooks; keys ``<name>_orig``,
  ``<name>_u``, ``<name>_v`` and ``metadata["spectral_norm"]["<name>.version"]``).

:func:`convert` swaps both, in place, for :func:`sn_fused.spectral_norm`;
:func:`convert_state_dict` / :func:`load_legacy_state_dict` bring legacy
checkpoints to the parametrization key layout, which PyTorch itself has no
converter for.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, TypeVar

import torch
from torch import Tensor
from torch.nn import Module
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm as _TorchSpectralNorm
# The module, not the function of the same name that ``torch.nn.utils`` exports.
from torch.nn.utils.spectral_norm import SpectralNorm as _LegacySpectralNorm
from torch.nn.utils.spectral_norm import SpectralNormLoadStateDictPreHook as _LegacyLoadStateDictPreHook
from torch.nn.utils.spectral_norm import SpectralNormStateDictHook as _LegacyStateDictHook

from .parametrizations import _install_fast_read, _new_layer_semaphore, _new_sigma_buffer, _SpectralNorm, _check_eps

__all__ = ["convert", "convert_state_dict", "load_legacy_state_dict"]

T_module = TypeVar("T_module", bound=Module)

# --------------------------------------------------------------------------- helpers


def _fused_from_state(weight: Tensor, u: Tensor | None, v: Tensor | None, *, dim: int, eps: float,
                      n_power_iterations: int, training: bool) -> _SpectralNorm:
    r"""An ``sn_fused`` ``_SpectralNorm`` holding the given state, as if it had been trained.

    ``_SpectralNorm.__init__`` draws u and v from the global generator and runs
    15 power iterations; here neither happens: the module is built empty and
    given ``u`` and ``v`` (the very tensors, so nothing else sharing their
    storage loses track of them). The non-persistent buffers are made as
    ``__init__`` makes them: ``_sigma`` NaN until the first read, ``_sem`` zeros.
    ``weight`` only provides ndim, dtype and device; it is not read.
    """
    # Same refusal as _SpectralNorm.__init__, which this bypasses so as not to draw from the RNG.
    _check_eps(eps)
    ndim = weight.ndim
    if dim >= ndim or dim < -ndim:
        raise IndexError(
            "Dimension out of range (expected to be in range of "
            f"[-{ndim}, {ndim - 1}] but got {dim})"
        )
    sn = _SpectralNorm.__new__(_SpectralNorm)
    Module.__init__(sn)
    sn.dim = dim if dim >= 0 else dim + ndim
    sn.eps = eps
    if ndim > 1:
        if n_power_iterations <= 0:
            raise ValueError(
                "Expected n_power_iterations to be positive, but "
                f"got n_power_iterations={n_power_iterations}"
            )
        sn.n_power_iterations = n_power_iterations
        sn.register_buffer("_u", u)
        sn.register_buffer("_v", v)
        sn.register_buffer("_sigma", _new_sigma_buffer(weight, weight.real.dtype), persistent=False)
        sn.register_buffer("_sem", _new_layer_semaphore(weight.device), persistent=False)
    sn.train(training)
    return sn


def _is_legacy_load_hook(hook: Any) -> bool:
    # Module._register_load_state_dict_pre_hook wraps hooks in a _WrappedHook
    # (``.hook``); PyTorch's own remove_spectral_norm misses that and leaves the
    # load hook behind, so look through the wrapper.
    return isinstance(hook, _LegacyLoadStateDictPreHook) or isinstance(
        getattr(hook, "hook", None), _LegacyLoadStateDictPreHook)


def _convert_legacy(module: Module, fn: _LegacySpectralNorm, hook_id: int) -> None:
    """Replace one legacy ``SpectralNorm`` hook of ``module`` by an sn_fused parametrization."""
    name = fn.name
    weight = module._parameters[name + "_orig"]
    u = module._buffers[name + "_u"]
    v = module._buffers[name + "_v"]
    # Built first: if the state is refused, the module is left untouched. For a
    # 1-D weight the parametrization normalizes exactly and keeps no u, v.
    uv = (u, v) if weight.ndim > 1 else (None, None)
    sn = _fused_from_state(weight, *uv, dim=fn.dim, eps=fn.eps,
                           n_power_iterations=fn.n_power_iterations, training=module.training)

    # Hooks, as torch.nn.utils.remove_spectral_norm removes them (plus the
    # wrapped load hook it misses).
    del module._forward_pre_hooks[hook_id]
    for extra in ("_forward_pre_hooks_with_kwargs", "_forward_pre_hooks_always_called"):
        getattr(module, extra, {}).pop(hook_id, None)
    for k, hook in list(module._state_dict_hooks.items()):
        if isinstance(hook, _LegacyStateDictHook) and hook.fn is fn:
            del module._state_dict_hooks[k]
    for k, hook in list(module._load_state_dict_pre_hooks.items()):
        if _is_legacy_load_hook(hook) and getattr(hook, "hook", hook).fn is fn:
            del module._load_state_dict_pre_hooks[k]

    # Attributes. ``module.<name>`` is a plain attribute holding the last
    # computed weight (it has to go before a parameter of that name can exist).
    module.__dict__.pop(name, None)
    del module._parameters[name + "_orig"]
    del module._buffers[name + "_u"]
    del module._buffers[name + "_v"]
    # The same Parameter object becomes ``parametrizations.<name>.original``:
    # optimizers built on the legacy model keep updating the right tensor.
    module.register_parameter(name, weight)
    # unsafe=True: registration would otherwise read the weight once, which in
    # training mode runs a power iteration. right_inverse (identity) still runs.
    parametrize.register_parametrization(module, name, sn, unsafe=True)
    # ...and then leave the list as sn_fused.spectral_norm would (safe checks on assignment).
    module.parametrizations[name].unsafe = False
    _install_fast_read(module, name)


def _convert_parametrizations(module: Module) -> None:
    """Replace every PyTorch ``_SpectralNorm`` in ``module.parametrizations`` in place."""
    for name, plist in module.parametrizations.items():
        for i, p in enumerate(plist):
            if not isinstance(p, _TorchSpectralNorm):
                continue
            # The parametrization's input is the output of the ones before it; for
            # its shape/dtype/device it is enough to know that they preserve them
            # (register_parametrization checks that unless unsafe) -- so read the
            # original, never the parametrized tensor (that would iterate).
            weight = plist.original
            if not isinstance(weight, Tensor):  # right_inverse returned a tuple upstream
                raise NotImplementedError(
                    f"cannot convert spectral_norm of '{name}': its ParametrizationList "
                    "holds several originals")
            if weight.ndim > 1:
                sn = _fused_from_state(weight, p._u, p._v, dim=p.dim, eps=p.eps,
                                       n_power_iterations=p.n_power_iterations, training=p.training)
            else:
                sn = _fused_from_state(weight, None, None, dim=p.dim, eps=p.eps,
                                       n_power_iterations=1, training=p.training)
            _carry_module_hooks(p, sn)
            plist[i] = sn  # ModuleList.__setitem__: the other entries stay as they are
            _install_fast_read(module, name)


# Module.__init__'s hook registries. A hook registered on PyTorch's _SpectralNorm (to log each
# read's output, say) runs on the sn_fused one that replaces it.
_MODULE_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                      "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                      "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
                      "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _carry_module_hooks(src: Module, dst: Module) -> None:
    """Give ``dst`` the hooks registered on ``src``: the very registries, so the handles that
    registration returned still remove them (a ``RemovableHandle`` refers to its registry)."""
    for attr in _MODULE_HOOK_DICTS:
        if attr in src.__dict__:
            dst.__dict__[attr] = src.__dict__[attr]
    if "_is_full_backward_hook" in src.__dict__:
        dst.__dict__["_is_full_backward_hook"] = src.__dict__["_is_full_backward_hook"]


# --------------------------------------------------------------------------- convert


def convert(model: T_module) -> T_module:
    r"""Swap, in place, every PyTorch spectral norm in ``model`` for sn_fused's.

    Both of PyTorch's forms are found in ``model`` and all its submodules:

    * **Parametrization** (:func:`torch.nn.utils.parametrizations.spectral_norm`):
      each ``_SpectralNorm`` in ``module.parametrizations.<name>`` is replaced,
      at the same position, by :class:`sn_fused.parametrizations._SpectralNorm`
      with the same ``dim``, ``eps``, ``n_power_iterations`` and the same
      ``_u``, ``_v`` tensors, and the hooks registered on it (their handles
      still remove them). Other parametrizations of the same tensor, the
      ``original`` parameter and the state_dict keys are untouched.
    * **Legacy hook** (:func:`torch.nn.utils.spectral_norm`): the forward
      pre-hook and state_dict hooks are removed, as are ``<name>_orig``,
      ``<name>_u``, ``<name>_v`` and the plain attribute ``<name>``; then
      sn_fused's parametrization is registered with
      ``original = <name>_orig`` (the same ``Parameter`` object, so existing
      optimizers keep working), ``_u = <name>_u``, ``_v = <name>_v``, same
      ``dim``, ``eps`` and ``n_power_iterations``. The state_dict keys become
      ``parametrizations.<name>.original``, ``parametrizations.<name>.0._u``
      and ``parametrizations.<name>.0._v``.

    Nothing is drawn from the random generator, no power iteration runs and
    the weight is not read: u and v are exactly what they were.

    Semantics after conversion are those of the parametrization, for both forms.
    In evaluation mode both forms compute

    .. math::
        \sigma = u^\top A v, \qquad W_{SN} = W / \sigma

    from the stored u, v, so eval outputs do not change: bitwise where the
    pure-PyTorch path runs (CPU without ``TRITON_INTERPRET=1``: it performs
    PyTorch's operations in PyTorch's order), and to fp32 rounding where the
    fused kernel runs (it sums :math:`u^\top A v` in its own tiled order, so
    :math:`\sigma` may differ in the last bits). In training mode the next
    read gives what PyTorch's parametrization would give from the same state.
    For a converted **legacy** module that is a change of schedule: the legacy
    hook iterates once per module *call*, v first,

    .. math::
        v \leftarrow \mathrm{normalize}(A^\top u), \quad u \leftarrow \mathrm{normalize}(A v),

    while the parametrization iterates once per *read* of ``module.<name>``
    (once per block inside :func:`torch.nn.utils.parametrize.cached`), u first,

    .. math::
        u \leftarrow \mathrm{normalize}(A v), \quad v \leftarrow \mathrm{normalize}(A^\top u).

    Since the legacy hook leaves :math:`u = \mathrm{normalize}(A v)` after each
    training call, the first converted update of u is a repeat (to rounding);
    trajectories then match PyTorch's parametrization, not the legacy hook.

    .. note::
        A legacy spectral norm of a **1-D** weight computes :math:`u^\top A v`
        with :math:`A` an ``M x 1`` matrix; the parametrization (PyTorch's and
        sn_fused's) computes ``F.normalize(weight)`` exactly and has no u, v.
        Converting such a module drops ``<name>_u``/``<name>_v``, and its
        output changes by the power-iteration error (nothing after a training
        call, to rounding; arbitrarily before the first one).

    Args:
        model (nn.Module): the model; modified in place.

    Returns:
        ``model``. Converting twice changes nothing the second time; modules
        without spectral norm are left alone.

    Raises:
        ValueError: if a spectral norm has a negative or non-finite ``eps``
            (PyTorch accepts it and produces NaN/Inf; sn_fused refuses it).
            That spectral norm is left as it was; ones converted before it
            stay converted.
        TypeError: likewise, if its ``eps`` is not a real number.

    Example::

        >>> D = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(20, 40)),
        ...                   nn.utils.spectral_norm(nn.Conv2d(3, 8, 3)))
        >>> D = sn_fused.convert(D)
        >>> type(D[0].parametrizations.weight[0]).__module__
        'sn_fused.parametrizations'
        >>> sorted(D[1].state_dict())
        ['bias', 'parametrizations.weight.0._u', 'parametrizations.weight.0._v', 'parametrizations.weight.original']
    """
    # Snapshot first: conversion registers new submodules (ParametrizationLists).
    for module in list(model.modules()):
        if isinstance(module, (_SpectralNorm, _TorchSpectralNorm)):
            continue
        legacy = [(k, hook) for k, hook in module._forward_pre_hooks.items()
                  if isinstance(hook, _LegacySpectralNorm)]
        for hook_id, fn in legacy:
            _convert_legacy(module, fn, hook_id)
        if parametrize.is_parametrized(module):
            _convert_parametrizations(module)
    return model


# --------------------------------------------------------------------------- state_dict


def _split(key: str) -> tuple[str, str]:
    """``"a.b.weight"`` -> ``("a.b.", "weight")``."""
    head, dot, tail = key.rpartition(".")
    return head + dot, tail


def _legacy_version(metadata: Mapping[str, Any] | None, prefix: str, name: str) -> int | None:
    # The legacy state_dict hook writes metadata[module]["spectral_norm"]["<name>.version"].
    if metadata is None:
        return None
    local = metadata.get(prefix[:-1], {})
    return local.get("spectral_norm", {}).get(name + ".version", None)


def _solve_v(state_dict: Mapping[str, Tensor], base: str, dim: int) -> Tensor:
    r"""v for a version-0 entry (``<name>``, ``<name>_orig``, ``<name>_u``, no ``<name>_v``).

    What ``SpectralNormLoadStateDictPreHook`` does: with
    :math:`\sigma = \mathrm{mean}(W_{orig} / W)`, solve :math:`W_{orig} x = u`
    (pseudo-inverse) and rescale x so that :math:`u^\top W_{orig} v = \sigma`.
    """
    fn = _LegacySpectralNorm(_split(base)[1], dim=dim)
    with torch.no_grad():
        weight_orig = state_dict[base + "_orig"]
        sigma = (weight_orig / state_dict[base]).mean()
        weight_mat = fn.reshape_weight_to_matrix(weight_orig)
        return fn._solve_v_and_rescale(weight_mat, state_dict[base + "_u"], sigma)


def _targets_from_model(model: Module) -> dict[str, tuple[int, int, bool]]:
    """``{"<module prefix><name>": (index, dim, has_uv)}`` for each spectral norm in ``model``."""
    targets = {}
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        prefix = mod_name + "." if mod_name else ""
        for name, plist in module.parametrizations.items():
            for i, p in enumerate(plist):
                if isinstance(p, (_SpectralNorm, _TorchSpectralNorm)):
                    targets[prefix + name] = (i, p.dim, hasattr(p, "_u"))
    return targets


def convert_state_dict(state_dict: Mapping[str, Any], model: Module | None = None) -> OrderedDict:
    r"""Map a legacy spectral-norm ``state_dict`` to the parametrization key layout.

    For each legacy spectral norm ``<prefix><name>``::

        <prefix><name>_orig -> <prefix>parametrizations.<name>.original
        <prefix><name>_u    -> <prefix>parametrizations.<name>.0._u
        <prefix><name>_v    -> <prefix>parametrizations.<name>.0._v

    which are the keys of both :func:`sn_fused.spectral_norm` and
    :func:`torch.nn.utils.parametrizations.spectral_norm`, so
    ``model.load_state_dict(convert_state_dict(sd))`` works with
    ``strict=True`` on either. Other keys, and their order, are kept; values
    are the same tensors (not copied). The ``"spectral_norm"`` version entries
    of the mapped names are dropped from ``state_dict._metadata``.

    Entries are recognised as PyTorch's load hook recognises them: the triple
    ``_orig``/``_u``/``_v`` (version 1, with or without metadata), or, for
    checkpoints of PyTorch < 1.0 (version 0: ``<name>``, ``<name>_orig``,
    ``<name>_u``, no ``_v``), v is recovered from the stored
    :math:`W_{SN} = W / \sigma` exactly as PyTorch's hook does; that needs
    ``dim``, so version-0 entries need ``model``. For a 1-D weight the
    parametrization has no buffers, and ``_u``/``_v`` are dropped.

    Args:
        state_dict (dict): a state_dict saved from a model using
            :func:`torch.nn.utils.spectral_norm`. Not modified.
        model (nn.Module, optional): the parametrized model it is meant for.
            If given, only the spectral norms this model has are mapped, to
            the index each has in its ``ParametrizationList``, with its
            ``dim``; legacy-looking keys of other modules are left alone (a
            strict load then reports them). Default: ``None``: every legacy
            triple is mapped, to index ``0``.

    Returns:
        A new ``OrderedDict`` (with ``_metadata``).

    Raises:
        ValueError: for a version-0 entry without ``model``, or if in
            ``model`` the spectral norm is not the first parametrization of
            its tensor (``original`` would then be the input of another
            parametrization, not the legacy ``<name>_orig``).
    """
    metadata = getattr(state_dict, "_metadata", None)
    targets = _targets_from_model(model) if model is not None else None

    renamed: dict[str, str | None] = {}  # old key -> new key (None: drop)
    solved_v: dict[str, tuple[str, Tensor]] = {}  # old u key -> (new v key, v) for version 0
    done: list[tuple[str, str]] = []
    for key in state_dict:
        if not key.endswith("_orig"):
            continue
        base = key[: -len("_orig")]
        prefix, name = _split(base)
        if targets is not None:
            if base not in targets:
                continue
            index, dim, has_uv = targets[base]
            if index != 0:
                raise ValueError(
                    f"spectral_norm of '{base}' is parametrization {index} of its tensor; "
                    "a legacy checkpoint can only be loaded where it is the first")
        else:
            index, dim, has_uv = 0, None, state_dict[key].ndim > 1
        if base + "_u" not in state_dict:
            continue
        version = _legacy_version(metadata, prefix, name)
        if base + "_v" in state_dict and (version is not None and version >= 1
                                          or version is None and base not in state_dict):
            v_key = base + "_v"
        elif base in state_dict and (version is None or version < 1):
            if has_uv and dim is None:
                raise ValueError(
                    f"'{base}' is a version-0 legacy spectral_norm entry (no '{base}_v'); "
                    "recovering v needs its dim: pass model=")
            v_key = None
            renamed[base] = None  # the stored W_SN: PyTorch's hook pops it too
            if base + "_v" in state_dict:
                renamed[base + "_v"] = None  # ...and overwrites any stored v with the solved one
            if has_uv:
                solved_v[base + "_u"] = (f"{prefix}parametrizations.{name}.{index}._v",
                                         _solve_v(state_dict, base, dim))
        else:
            continue
        new = f"{prefix}parametrizations.{name}"
        renamed[key] = new + ".original"
        renamed[base + "_u"] = f"{new}.{index}._u" if has_uv else None
        if v_key is not None:
            renamed[v_key] = f"{new}.{index}._v" if has_uv else None
        done.append((prefix, name))

    out: OrderedDict = OrderedDict()
    for key, value in state_dict.items():
        if key not in renamed:
            out[key] = value
            continue
        new_key = renamed[key]
        if new_key is not None:
            out[new_key] = value
        if key in solved_v:
            v_key, v = solved_v[key]
            out[v_key] = v

    if metadata is not None:
        new_metadata = OrderedDict((k, dict(v)) for k, v in metadata.items())
        for prefix, name in done:
            local = new_metadata.get(prefix[:-1])
            if local is None or "spectral_norm" not in local:
                continue
            versions = {k: v for k, v in local["spectral_norm"].items() if k != name + ".version"}
            if versions:
                local["spectral_norm"] = versions
            else:
                del local["spectral_norm"]
        out._metadata = new_metadata  # type: ignore[attr-defined]
    return out


def load_legacy_state_dict(model: Module, state_dict: Mapping[str, Any], strict: bool = True,
                           assign: bool = False):
    r"""Load a legacy spectral-norm checkpoint into a parametrized model.

    ``model.load_state_dict(convert_state_dict(state_dict, model), strict, assign)``:
    ``model`` uses :func:`sn_fused.spectral_norm` (or PyTorch's
    parametrization, or has been through :func:`convert`); ``state_dict`` was
    saved from the same architecture with :func:`torch.nn.utils.spectral_norm`.
    The loaded u, v are the legacy ones, so eval outputs equal the legacy
    model's (see :func:`convert` for the precision and the training schedule).

    Args:
        model (nn.Module): the parametrized model.
        state_dict (dict): the legacy state_dict. Not modified.
        strict (bool, optional): as in :meth:`~torch.nn.Module.load_state_dict`.
            Default: ``True``.
        assign (bool, optional): as in :meth:`~torch.nn.Module.load_state_dict`.
            Default: ``False``.

    Returns:
        ``NamedTuple`` with ``missing_keys`` and ``unexpected_keys``, as
        :meth:`~torch.nn.Module.load_state_dict` returns.
    """
    return model.load_state_dict(convert_state_dict(state_dict, model), strict=strict, assign=assign)
