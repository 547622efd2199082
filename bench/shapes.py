"""The weights the benchmark normalizes: real GAN layers (``shared/DESIGN.md`` §3, §4).

A :class:`Layer` is a module spec (``Conv2d(128, 128, 3)``, ``Linear(8192, 1)``,
...), because what spectral norm sees depends on the module: ``A`` is
``out x in*kh*kw`` for a conv, and ``out x in*kh*kw`` of the *transposed*
weight (``dim=1``) for a ConvTranspose. Tables list each model's tensors with
their multiplicity, so per-model totals can be computed from per-layer times.

``select`` merges the tables a run asks for, removes duplicates (the same
module spec in two tables is measured once, tagged with both groups) and
applies the ``--shapes`` filter.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

__all__ = ["Layer", "TABLES", "QUICK_GROUPS", "FULL_GROUPS", "COMPILE_SHAPES_QUICK",
           "COMPILE_SHAPES_FULL", "CPU_SHAPES", "select", "find"]


@dataclass(frozen=True)
class Layer:
    """A module whose ``weight`` gets spectral norm.

    ``kind``: ``conv2d`` / ``convT2d`` (args ``in, out, k``), ``linear``
    (``in, out``) or ``embedding`` (``num, dim``).
    """

    kind: str
    args: tuple[int, ...]
    groups: tuple[str, ...] = field(default=(), compare=False)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        a = self.args
        if self.kind == "conv2d":
            return (a[1], a[0], a[2], a[2])
        if self.kind == "convT2d":
            return (a[0], a[1], a[2], a[2])
        if self.kind == "linear":
            return (a[1], a[0])
        if self.kind == "embedding":
            return (a[0], a[1])
        raise ValueError(f"unknown layer kind {self.kind!r}")

    @property
    def dim(self) -> int:
        """The dim spectral norm treats as rows (PyTorch's default for the module)."""
        return 1 if self.kind == "convT2d" else 0

    @property
    def M(self) -> int:
        return self.weight_shape[self.dim]

    @property
    def N(self) -> int:
        return self.numel // self.M

    @property
    def numel(self) -> int:
        n = 1
        for s in self.weight_shape:
            n *= s
        return n

    @property
    def name(self) -> str:
        """``MxN``, with a ``T`` suffix for a transposed conv (``dim=1``)."""
        return f"{self.M}x{self.N}" + ("T" if self.kind == "convT2d" else "")

    @property
    def label(self) -> str:
        cls = {"conv2d": "Conv2d", "convT2d": "ConvTranspose2d", "linear": "Linear",
               "embedding": "Embedding"}[self.kind]
        return f"{cls}({', '.join(map(str, self.args))})"

    def make(self, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
        """A fresh module (default PyTorch init, drawn from the global generator)."""
        a, kw = self.args, dict(device=device, dtype=dtype)
        if self.kind == "conv2d":
            return nn.Conv2d(a[0], a[1], a[2], padding=a[2] // 2, **kw)
        if self.kind == "convT2d":
            return nn.ConvTranspose2d(a[0], a[1], a[2], **kw)
        if self.kind == "linear":
            return nn.Linear(a[0], a[1], **kw)
        if self.kind == "embedding":
            return nn.Embedding(a[0], a[1], **kw)
        raise ValueError(f"unknown layer kind {self.kind!r}")


def _conv(cin: int, cout: int, k: int) -> Layer:
    return Layer("conv2d", (cin, cout, k))


# (layer, how many tensors of that shape the model normalizes)
TABLES: dict[str, list[tuple[Layer, int]]] = {
    # SNGAN CIFAR-10 ResNet D, ch=128: 11 tensors.
    "sngan_resnet": [
        (_conv(3, 128, 3), 1), (_conv(128, 128, 3), 7), (_conv(3, 128, 1), 1),
        (_conv(128, 128, 1), 1), (Layer("linear", (128, 1)), 1),
    ],
    # SNGAN standard CNN D: 8 tensors.
    "sngan_cnn": [
        (_conv(3, 64, 3), 1), (_conv(64, 64, 4), 1), (_conv(64, 128, 3), 1),
        (_conv(128, 128, 4), 1), (_conv(128, 256, 3), 1), (_conv(256, 256, 4), 1),
        (_conv(256, 512, 3), 1), (Layer("linear", (8192, 1)), 1),
    ],
    # BigGAN-128 D, ch=96: 23 tensors.
    "biggan128_d": [
        (_conv(3, 96, 3), 1), (_conv(96, 96, 3), 1), (_conv(3, 96, 1), 1),
        (_conv(96, 192, 3), 1), (_conv(192, 192, 3), 1), (_conv(96, 192, 1), 1),
        (_conv(192, 384, 3), 1), (_conv(384, 384, 3), 1), (_conv(192, 384, 1), 1),
        (_conv(384, 768, 3), 1), (_conv(768, 768, 3), 1), (_conv(384, 768, 1), 1),
        (_conv(768, 1536, 3), 1), (_conv(1536, 1536, 3), 3), (_conv(768, 1536, 1), 1),
        (_conv(96, 12, 1), 2), (_conv(96, 48, 1), 1), (_conv(48, 96, 1), 1),
        (Layer("linear", (1536, 1)), 1), (Layer("embedding", (1000, 1536)), 1),
    ],
    # BigGAN-128 G, ch=96 (BigGAN-PyTorch's G_ch=96, shared_dim=128, dim_z=120 in 6 chunks of 20):
    # 41 tensors. The first linear (z chunk -> 4x4x1536), per GBlock in -> out: conv1, conv2,
    # the 1x1 shortcut and four conditional-BN linears (gain and bias of bn1 (in) and bn2 (out),
    # each from the shared class embedding and a z chunk: 148 wide); self-attention at 64x64
    # (theta, phi, g, o; g's shape is block 5's shortcut's); the output conv.
    "biggan128_g": [
        (Layer("linear", (20, 24576)), 1),
        (_conv(1536, 1536, 3), 2), (_conv(1536, 1536, 1), 1),
        (_conv(1536, 768, 3), 1), (_conv(768, 768, 3), 1), (_conv(1536, 768, 1), 1),
        (_conv(768, 384, 3), 1), (_conv(384, 384, 3), 1), (_conv(768, 384, 1), 1),
        (_conv(384, 192, 3), 1), (_conv(192, 192, 3), 1), (_conv(384, 192, 1), 1),
        (_conv(192, 96, 3), 1), (_conv(96, 96, 3), 1), (_conv(192, 96, 1), 2),
        (_conv(192, 24, 1), 2), (_conv(96, 192, 1), 1), (_conv(96, 3, 3), 1),
        (Layer("linear", (148, 1536)), 6), (Layer("linear", (148, 768)), 4),
        (Layer("linear", (148, 384)), 4), (Layer("linear", (148, 192)), 4),
        (Layer("linear", (148, 96)), 2),
    ],
    # DCGAN-style generator layer: dim=1, A is 256 x 8192.
    "conv_transpose": [(Layer("convT2d", (512, 256, 4)), 1)],
    # A large square weight.
    "large": [(Layer("linear", (4096, 4096)), 1)],
    # The shapes of the baseline table (DESIGN.md §4).
    "table4": [
        (_conv(3, 64, 3), 1), (_conv(128, 128, 3), 1), (_conv(512, 512, 3), 1),
        (_conv(768, 768, 3), 1), (_conv(1536, 1536, 3), 1), (Layer("linear", (4096, 4096)), 1),
        (Layer("linear", (8192, 1)), 1),
    ],
}

QUICK_GROUPS = ("table4", "sngan_resnet")
FULL_GROUPS = tuple(TABLES)
# torch.compile costs seconds per case: the compiled variants run on a subset.
COMPILE_SHAPES_QUICK = ("128x1152", "1536x13824")
COMPILE_SHAPES_FULL = ("64x27", "128x1152", "512x4608", "768x6912", "1536x13824", "4096x4096",
                       "1x8192", "256x8192T")
# CPU mode: small shapes only (the CPU paths are timed for reference, not tuned).
CPU_SHAPES = ("64x27", "128x1152", "128x128", "1x128", "256x8192T")


def _matches(layer: Layer, patterns: list[str]) -> bool:
    keys = (layer.name.lower(), layer.label.lower(), *layer.groups)
    return any(p == layer.name.lower() or any(p in k for k in keys) for p in patterns)


def select(groups: tuple[str, ...] | list[str], patterns: str | None = None) -> list[Layer]:
    """The layers of ``groups`` (deduplicated, in table order), filtered by ``patterns``.

    ``patterns``: comma-separated; a layer is kept if a pattern equals its
    name (``128x1152``) or is a substring of its name, label
    (``conv2d(128, 128, 3)``) or one of its groups (``biggan``).
    """
    merged: dict[Layer, Layer] = {}
    for group in groups:
        if group not in TABLES:
            raise KeyError(f"unknown shape group {group!r}; known: {', '.join(TABLES)}")
        for layer, _count in TABLES[group]:
            seen = merged.get(layer)
            tags = (seen.groups if seen else ()) + (group,)
            merged[layer] = replace(layer, groups=tags)
    layers = list(merged.values())
    if patterns:
        wanted = [p.strip().lower() for p in patterns.split(",") if p.strip()]
        layers = [layer for layer in layers if _matches(layer, wanted)]
    return layers


def find(name: str) -> Layer:
    """The layer called ``name`` (``MxN`` or ``MxNT``) in any table."""
    for table in TABLES.values():
        for layer, _count in table:
            if layer.name == name:
                return layer
    raise KeyError(name)
