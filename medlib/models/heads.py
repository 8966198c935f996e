"""Task heads on top of :class:`~medlib.models.backbones.Backbone` features.

Classification: :class:`LinearHead` (the linear probe) and :class:`MLPHead` (Lange & Shekel 2024's
CLS -> LayerNorm -> Linear(D, 256) -> ReLU -> Linear(256, n)).
Segmentation (Baharoon et al. 2023): :class:`LinearSegHead` (1x1 conv on the last block's normalised
patch grid, bilinear upsampling) and :class:`UNetDecoder` (the last 5 blocks' grids, 4
up-blocks); :class:`SegmentationModel` joins a backbone and one of them. :class:`UNet` is
the plain from-scratch U-Net baseline, which reads the image itself.

Segmentation heads take a list of grids (oldest block first, as ``Backbone.features(x,
n_last)["grids"]``) and the output size, and return logits (B, n_classes, H, W).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone

Size = int | tuple[int, int] | torch.Size


def _pair(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    if len(size) != 2:
        raise ValueError(f"out_size must be an int or (H, W), got {tuple(size)}.")
    return (int(size[0]), int(size[1]))


def _as_grid_list(grids: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    items = [grids] if isinstance(grids, torch.Tensor) else list(grids)
    for i, grid in enumerate(items):
        if grid.ndim != 4:
            raise ValueError(f"grid {i} must be (B, C, h, w); got shape {tuple(grid.shape)}.")
    return items


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class LinearHead(nn.Module):
    """A linear layer on features (B, in_dim) -> logits (B, n_out); DINOv2's init (N(0, 0.01), zero bias)."""

    def __init__(self, in_dim: int, n_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, n_out)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_out)."""
        return self.linear(x)


class MLPHead(nn.Module):
    """Seed 001's fine-tuning head: LayerNorm -> Linear(in_dim, hidden) -> ReLU -> Linear(hidden, n_out)."""

    def __init__(self, in_dim: int, n_out: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_out)."""
        return self.net(x)


class LinearSegHead(nn.Module):
    """1x1 conv on the last block's patch grid (B, D, h, w), then bilinear upsampling to the image size."""

    n_grids = 1

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, n_classes, kernel_size=1)

    def forward(self, grids: torch.Tensor | Sequence[torch.Tensor], out_size: Size) -> torch.Tensor:
        """Logits (B, n_classes, H, W) from a grid or a list of grids (the last one is used)."""
        grid = _as_grid_list(grids)[-1]
        return _resize(self.conv(grid), _pair(out_size))


def conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    """3x3 conv (no bias) -> BatchNorm -> ReLU, the unit of every U-Net block."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True))


class _DecoderUpBlock(nn.Module):
    """Transposed conv (k2, s2) on x; conv3x3+BN+ReLU on the skip, then resized to match; concat; conv3x3+BN+ReLU.

    The skip conv runs at the skip's own resolution before the bilinear resize (our assumption: for a
    ViT every skip is the coarse patch grid, so convolving after upsampling would cost up to 256x more).
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)
        self.skip = conv_bn_relu(skip_ch, out_ch)
        self.fuse = conv_bn_relu(2 * out_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        skip = _resize(self.skip(skip), tuple(x.shape[-2:]))
        return self.fuse(torch.cat([x, skip], dim=1))


class UNetDecoder(nn.Module):
    """Seed 002's U-Net-style decoder on the last 5 blocks' grids (last = bottleneck, the 4 before = skips).

    Four up-blocks (each doubles the resolution) take the bottleneck from ``in_channels`` to
    ``channels`` (default D/2, D/4, D/8, D/8 - the paper gives D -> D/2 -> D/4 -> D/8 -> classes;
    the 4th block keeping D/8 is our assumption); the deepest skip (block -2) joins the first
    up-block, the shallowest (block -5) the last. A final 1x1 conv gives the classes and a
    bilinear resize the image size. ``in_channels`` is D for a ViT, or 5 per-grid channel
    counts (bottleneck last) for CNN stages.
    """

    n_grids = 5

    def __init__(self, in_channels: int | Sequence[int], n_classes: int,
                 channels: Sequence[int] | None = None) -> None:
        super().__init__()
        chans = [int(in_channels)] * self.n_grids if isinstance(in_channels, int) else [int(c) for c in in_channels]
        if len(chans) != self.n_grids:
            raise ValueError(f"UNetDecoder needs {self.n_grids} input channel counts (one per grid), got {chans}.")
        width = chans[-1]
        channels = list(channels) if channels is not None else [max(width // d, 1) for d in (2, 4, 8, 8)]
        if len(channels) != 4 or min(channels) < 1:
            raise ValueError(f"UNetDecoder channels must be 4 positive ints (one per up-block), got {channels}.")
        skips = chans[-2::-1]  # block -2 first, block -5 last
        ins = [width] + channels[:-1]
        self.blocks = nn.ModuleList(_DecoderUpBlock(i, s, o) for i, s, o in zip(ins, skips, channels))
        self.classifier = nn.Conv2d(channels[-1], n_classes, kernel_size=1)

    def forward(self, grids: Sequence[torch.Tensor], out_size: Size) -> torch.Tensor:
        """Logits (B, n_classes, H, W) from the last 5 grids (oldest first)."""
        grids = _as_grid_list(grids)
        if len(grids) < self.n_grids:
            raise ValueError(f"UNetDecoder needs the last {self.n_grids} grids; got {len(grids)}. "
                             f"Call Backbone.features(x, n_last={self.n_grids}).")
        grids = grids[-self.n_grids:]
        x = grids[-1]
        for block, skip in zip(self.blocks, grids[-2::-1]):
            x = block(x, skip)
        return _resize(self.classifier(x), _pair(out_size))


class SegmentationModel(nn.Module):
    """A backbone and a segmentation head (LinearSegHead / UNetDecoder): images -> logits at image size."""

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        if not hasattr(head, "n_grids"):
            raise ValueError(f"{type(head).__name__} is not a grid head: it needs an `n_grids` attribute "
                             "(use LinearSegHead or UNetDecoder).")
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes, H, W) for images (B, 3, H, W)."""
        grids = self.backbone.features(x, n_last=self.head.n_grids)["grids"]
        return self.head(grids, out_size=tuple(x.shape[-2:]))


class _DoubleConv(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(conv_bn_relu(in_ch, out_ch), conv_bn_relu(out_ch, out_ch))


class UNet(nn.Module):
    """The plain U-Net baseline, trained from scratch (Ronneberger et al. 2015), sized by ``base`` and ``depth``.

    Encoder: double conv, then ``depth`` times (max-pool, double conv, channels x2); decoder:
    transposed conv, concat with the encoder map (resized if an odd size lost a pixel),
    double conv; a 1x1 conv gives the classes. Any input size works.
    """

    def __init__(self, n_classes: int, in_ch: int = 3, base: int = 16, depth: int = 4) -> None:
        super().__init__()
        if depth < 1 or base < 1:
            raise ValueError(f"UNet needs depth >= 1 and base >= 1, got depth={depth}, base={base}.")
        widths = [base * 2 ** i for i in range(depth + 1)]
        self.stem = _DoubleConv(in_ch, widths[0])
        self.down = nn.ModuleList(_DoubleConv(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                for i in reversed(range(depth)))
        self.fuse = nn.ModuleList(_DoubleConv(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.classifier = nn.Conv2d(widths[0], n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes, H, W) for images (B, in_ch, H, W)."""
        size = tuple(x.shape[-2:])
        x = self.stem(x)
        skips = []
        for block in self.down:
            skips.append(x)
            x = block(F.max_pool2d(x, 2, ceil_mode=True))
        for up, fuse, skip in zip(self.up, self.fuse, reversed(skips)):
            x = _resize(up(x), tuple(skip.shape[-2:]))
            x = fuse(torch.cat([x, skip], dim=1))
        return _resize(self.classifier(x), size)
