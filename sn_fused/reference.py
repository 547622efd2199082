r"""Pure-PyTorch spectral normalization: the oracle.

Every function here follows ``torch/nn/utils/parametrizations.py``
(``_SpectralNorm``) operation for operation, so that

* the tests compare the fused Triton kernels with it (in float64), and
* the layer falls back to it where the kernels cannot run (CPU tensors without
  ``TRITON_INTERPRET=1``, complex weights, more than 5 dimensions).

Notation (see ``../shared/DESIGN.md`` §1): ``A`` is the weight reshaped to an
``M x N`` matrix by moving ``dim`` to the front and flattening the rest;
``normalize(x) = x / max(||x||_2, eps)``. One training-mode read is::

    repeat n_power_iterations times:   # no_grad, u and v updated in place
        u = normalize(A v)
        v = normalize(A^H u)
    sigma = u^H A v                    # u, v are constants for autograd
    W_sn = W / sigma
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "reshape_weight_to_matrix",
    "matrix_to_weight_shape",
    "power_method_",
    "spectral_norm_reference",
    "spectral_norm_backward_reference",
]


def reshape_weight_to_matrix(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """``A = W.permute(dim, *others).flatten(1)`` (a view where possible)."""
    if weight.ndim <= 1:
        raise AssertionError(f"Expected weight to have more than 1 dimension, got {weight.ndim}")
    if dim != 0:
        weight = weight.permute(dim, *(d for d in range(weight.dim()) if d != dim))
    return weight.flatten(1)


@torch.no_grad()
def power_method_(weight_mat: torch.Tensor, u: torch.Tensor | None, v: torch.Tensor,
                  n_power_iterations: int, eps: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Run ``n_power_iterations`` of the power method, updating ``u`` and ``v`` IN PLACE.

    In place matters: ``DataParallel`` replica 0 shares the buffers' storage
    with the parallelized module, so an assignment would lose the update.
    Note the old ``u`` is never read: ``u = normalize(A v)``.

    Returns ``(u, v)`` as PyTorch's ``_power_method`` assigns them back to its buffers
    (``self._u = F.normalize(..., out=self._u)``): the same tensors, resized (with torch's
    warning) where their shape was not ``A``'s, or new ones where a buffer was None.
    """
    for _ in range(n_power_iterations):
        u = F.normalize(torch.mv(weight_mat, v), dim=0, eps=eps, out=u)
        v = F.normalize(torch.mv(weight_mat.H, u), dim=0, eps=eps, out=v)
    return u, v


def spectral_norm_reference(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, *,
                            dim: int = 0, n_power_iterations: int = 1, eps: float = 1e-12,
                            training: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One read of the spectral-normalized weight, exactly as PyTorch computes it.

    Returns ``(weight / sigma, sigma)``. In training mode ``u`` and ``v`` are
    updated in place first. ``u``/``v`` are cloned before ``sigma`` so that two
    forwards before one backward (``D(real) - D(fake)``) still work.
    """
    weight_mat = reshape_weight_to_matrix(weight, dim)
    if training:
        u, v = power_method_(weight_mat, u, v, n_power_iterations, eps)
    u = u.clone(memory_format=torch.contiguous_format)
    v = v.clone(memory_format=torch.contiguous_format)
    sigma = torch.vdot(u, torch.mv(weight_mat, v))
    return weight / sigma, sigma


def spectral_norm_backward_reference(grad: torch.Tensor, weight: torch.Tensor, u: torch.Tensor,
                                     v: torch.Tensor, sigma: torch.Tensor, dim: int) -> torch.Tensor:
    r"""Closed form of the weight gradient (real weights), u, v, sigma constants:

    .. math::
        \frac{\partial L}{\partial W} = \frac{G - \langle G, W_{sn}\rangle\, u v^T}{\sigma},
        \qquad W_{sn} = W / \sigma

    This is what the fused backward kernel computes. Only ``u v^T`` is reshaped (to ``W``'s
    shape): ``G`` and ``W`` take elementwise ops and a sum, so the formula also runs on a
    vmap-batched ``G`` (``is_grads_batched=True``), whose reshapes vmap cannot always batch.
    """
    inner = (grad * weight).sum() / sigma
    uv = matrix_to_weight_shape(torch.outer(u, v), weight, dim)
    return (grad - inner * uv) / sigma


def matrix_to_weight_shape(mat: torch.Tensor, weight: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of :func:`reshape_weight_to_matrix`: an ``M x N`` matrix back in ``weight``'s shape."""
    others = [d for d in range(weight.ndim) if d != dim]
    permuted_shape = [weight.shape[dim]] + [weight.shape[d] for d in others]
    inverse = [0] * weight.ndim
    for position, d in enumerate([dim] + others):
        inverse[d] = position
    return mat.reshape(permuted_shape).permute(inverse)
