"""sn_fused: fused spectral normalization for PyTorch.

Public API (mirrors ``torch.nn.utils.parametrizations``):

* :func:`spectral_norm` -- the drop-in parametrization.
* :func:`convert` -- swap every PyTorch spectral norm in a model for sn_fused.

Layers, by name: ``sn_fused.parametrizations`` (nn-facing) ->
``sn_fused.ops`` (torch.library ops, autograd, launchers) ->
``sn_fused.ops.kernels`` (Triton) ; ``sn_fused.reference`` is the
pure-PyTorch oracle.
"""

from . import ops, reference  # noqa: F401
from .parametrizations import spectral_norm
from .convert import convert, convert_state_dict, load_legacy_state_dict

__all__ = ["spectral_norm", "convert", "convert_state_dict", "load_legacy_state_dict", "ops", "reference"]
__version__ = "0.1.0"
