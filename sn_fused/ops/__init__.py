"""Fused kernels and the ops around them (``torch.library``), apart from the nn layer."""

from .spectral_norm import (  # noqa: F401
    INTERPRET,
    check_inputs,
    check_semaphore,
    check_sigma_buffer,
    fused_supported,
    new_semaphore,
    spectral_norm_backward_fused,
    spectral_norm_forward_fused,
    spectral_norm_fused,
    split_saved,
)
