"""Discriminators for the whole-training-step benchmark.

* :class:`SNGANResNetD` -- the standard SNGAN CIFAR-10 ResNet discriminator
  (Miyato et al. 2018; as in ``pfnet-research/sngan_projection`` and
  ``mimicry``): OptimizedDisBlock(3, 128) + 3 DisBlocks (the first one
  downsampling) + ReLU + global sum pooling + Linear(128, 1). 11 weights
  get spectral norm: 128x27, 7x 128x1152, 128x3, 128x128, 1x128.

* :class:`BigGAN128D` -- shaped like BigGAN-128's discriminator (Brock et al.
  2019, ``ajbrock/BigGAN-PyTorch`` arch 128, ``D_ch=96``, ``D_wide``):
  residual down blocks 3->96->192->384->768->1536 then 1536->1536 (no
  downsampling), self-attention after the first block (64x64), ReLU, sum
  pooling, Linear(1536, 1) plus a projection embedding of 1000 classes.
  23 weights get spectral norm (shapes in ``shapes.TABLES["biggan128_d"]``).
  Simplifications: PyTorch default init (BigGAN uses orthogonal init), the
  library's spectral norm instead of BigGAN's own ``SN`` layers (eps 1e-12
  instead of 1e-8, one singular value), no fp16 / EMA / G; the step is one D
  update on a real batch with the hinge loss.

:func:`apply_spectral_norm` puts one spectral norm implementation on every
Conv/Linear/Embedding weight of a model.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SNGANResNetD", "BigGAN128D", "MODELS", "apply_spectral_norm", "hinge_loss"]


# --------------------------------------------------------------------------- SNGAN ResNet D


class OptimizedDisBlock(nn.Module):
    """First block: conv-relu-conv-pool, shortcut pool-conv1x1 (no pre-activation)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.c_sc = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(self.c2(F.relu(self.c1(x))), 2)
        return h + self.c_sc(F.avg_pool2d(x, 2))


class DisBlock(nn.Module):
    """Pre-activation residual block; 1x1 shortcut when channels change or it downsamples."""

    def __init__(self, cin: int, cout: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = downsample
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.learnable_sc = cin != cout or downsample
        self.c_sc = nn.Conv2d(cin, cout, 1) if self.learnable_sc else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(F.relu(self.c1(F.relu(x))))
        sc = self.c_sc(x) if self.c_sc is not None else x
        if self.downsample:
            h, sc = F.avg_pool2d(h, 2), F.avg_pool2d(sc, 2)
        return h + sc


class SNGANResNetD(nn.Module):
    """SNGAN CIFAR ResNet discriminator (32x32 input, ch=128)."""

    num_classes = 0
    resolution = 32

    def __init__(self, ch: int = 128) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            OptimizedDisBlock(3, ch),
            DisBlock(ch, ch, downsample=True),
            DisBlock(ch, ch, downsample=False),
            DisBlock(ch, ch, downsample=False),
        )
        self.l5 = nn.Linear(ch, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))
        return self.l5(h)


# --------------------------------------------------------------------------- BigGAN-128 D


class Attention(nn.Module):
    """BigGAN's self-attention (SAGAN): theta/phi at ch/8, g at ch/2, 2x2 max-pooled keys."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.ch = ch
        self.theta = nn.Conv2d(ch, ch // 8, 1, bias=False)
        self.phi = nn.Conv2d(ch, ch // 8, 1, bias=False)
        self.g = nn.Conv2d(ch, ch // 2, 1, bias=False)
        self.o = nn.Conv2d(ch // 2, ch, 1, bias=False)
        self.gamma = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        theta = self.theta(x).view(b, self.ch // 8, h * w)
        phi = F.max_pool2d(self.phi(x), 2).view(b, self.ch // 8, h * w // 4)
        g = F.max_pool2d(self.g(x), 2).view(b, self.ch // 2, h * w // 4)
        beta = F.softmax(torch.bmm(theta.transpose(1, 2), phi), dim=-1)
        o = self.o(torch.bmm(g, beta.transpose(1, 2)).view(b, self.ch // 2, h, w))
        return x + self.gamma * o


class BigGANDBlock(nn.Module):
    """BigGAN D block (wide): [relu] conv3x3 relu conv3x3 [avgpool] + shortcut conv1x1."""

    def __init__(self, cin: int, cout: int, preactivation: bool, downsample: bool) -> None:
        super().__init__()
        self.preactivation = preactivation
        self.downsample = downsample
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.learnable_sc = cin != cout or downsample
        self.conv_sc = nn.Conv2d(cin, cout, 1) if self.learnable_sc else None

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.preactivation:
            if self.conv_sc is not None:
                x = self.conv_sc(x)
            return F.avg_pool2d(x, 2) if self.downsample else x
        if self.downsample:
            x = F.avg_pool2d(x, 2)
        return self.conv_sc(x) if self.conv_sc is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        return h + self.shortcut(x)


class BigGAN128D(nn.Module):
    """BigGAN-128-shaped projection discriminator (128x128 input, ch=96, 1000 classes)."""

    num_classes = 1000
    resolution = 128

    def __init__(self, ch: int = 96, num_classes: int = 1000, attention: bool = True) -> None:
        super().__init__()
        cins = [3, ch, 2 * ch, 4 * ch, 8 * ch, 16 * ch]
        couts = [ch, 2 * ch, 4 * ch, 8 * ch, 16 * ch, 16 * ch]
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(cins, couts)):
            blocks.append(BigGANDBlock(cin, cout, preactivation=i > 0, downsample=i < 5))
            if i == 0 and attention:  # output of block 0 is 64x64
                blocks.append(Attention(cout))
        self.blocks = nn.Sequential(*blocks)
        self.linear = nn.Linear(16 * ch, 1)
        self.embed = nn.Embedding(num_classes, 16 * ch)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))
        out = self.linear(h)
        if y is not None:
            out = out + (self.embed(y) * h).sum(dim=1, keepdim=True)
        return out


#: name -> (constructor, batch size); the batch and input size of the benchmark.
MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "sngan_resnet_d": (SNGANResNetD, 64),
    "biggan128_d": (BigGAN128D, 16),
}


# --------------------------------------------------------------------------- helpers


def sn_targets(model: nn.Module) -> list[nn.Module]:
    """Every module whose ``weight`` gets spectral norm (convs, linears, embeddings)."""
    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)
    return [m for m in model.modules() if isinstance(m, kinds)]


def apply_spectral_norm(model: nn.Module, sn: Callable[..., nn.Module] | None,
                        n_power_iterations: int = 1) -> nn.Module:
    """Apply ``sn(module, n_power_iterations=...)`` to every target; ``None``: leave as is."""
    if sn is not None:
        for module in sn_targets(model):
            sn(module, n_power_iterations=n_power_iterations)
    return model


def hinge_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """The D hinge loss on a real batch: ``mean(relu(1 - D(x, y)))``."""
    return F.relu(1.0 - model(x, y)).mean()
