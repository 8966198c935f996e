"""Classification and segmentation heads: shapes at several sizes, gradient flow, tiny overfit runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medlib.models.backbones import create_backbone
from medlib.models.heads import LinearHead, LinearSegHead, MLPHead, SegmentationModel, UNet, UNetDecoder


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fit(model: nn.Module, inputs: tuple, target: torch.Tensor, steps: int, lr: float = 1e-2) -> tuple[float, float]:
    """Train on one fixed batch; return (first loss, last loss)."""
    torch.manual_seed(0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(*inputs), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


def test_linear_head_shape_and_init():
    torch.manual_seed(0)
    head = LinearHead(384, 5)
    assert head(torch.randn(4, 384)).shape == (4, 5)
    assert torch.count_nonzero(head.linear.bias) == 0
    assert 0.008 < head.linear.weight.std().item() < 0.012


def test_mlp_head_is_seed_001_layout():
    head = MLPHead(384, 1)
    layers = list(head.net)
    assert [type(m) for m in layers] == [nn.LayerNorm, nn.Linear, nn.ReLU, nn.Linear]
    assert (layers[1].in_features, layers[1].out_features, layers[3].out_features) == (384, 256, 1)
    assert head(torch.randn(3, 384)).shape == (3, 1)


@pytest.mark.parametrize("size", [32, 48, 64])
def test_linear_seg_head_on_backbone(size):
    model = SegmentationModel(create_backbone("random-vit-smoke"), LinearSegHead(48, 3))
    assert model(torch.randn(2, 3, size, size)).shape == (2, 3, size, size)


@pytest.mark.parametrize("size", [32, 48, 64])
def test_unet_decoder_on_vit_grids(size):
    backbone = create_backbone("random-vit-tiny")  # 6 blocks: 5 grids available
    decoder = UNetDecoder(192, n_classes=4)
    assert [b.up.out_channels for b in decoder.blocks] == [96, 48, 24, 24]
    model = SegmentationModel(backbone, decoder)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 4, size, size)


def test_unet_decoder_on_cnn_stages():
    backbone = create_backbone("efficientnet-lite0.in1k")
    decoder = UNetDecoder([16, 24, 40, 112, 320], n_classes=2, channels=(64, 32, 16, 16))
    assert SegmentationModel(backbone, decoder)(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_unet_decoder_pairs_deepest_skip_with_first_block():
    decoder = UNetDecoder([8, 16, 24, 32, 40], n_classes=2)
    assert [b.skip[0].in_channels for b in decoder.blocks] == [32, 24, 16, 8]
    assert decoder.blocks[0].up.in_channels == 40


def test_seg_head_input_errors():
    decoder = UNetDecoder(16, n_classes=2)
    with pytest.raises(ValueError, match="needs the last 5 grids; got 2"):
        decoder([torch.randn(1, 16, 4, 4)] * 2, out_size=32)
    with pytest.raises(ValueError, match=r"must be \(B, C, h, w\)"):
        LinearSegHead(16, 2)(torch.randn(16, 4, 4), out_size=32)
    with pytest.raises(ValueError, match="4 positive ints"):
        UNetDecoder(16, n_classes=2, channels=(8, 4))
    with pytest.raises(ValueError, match="not a grid head"):
        SegmentationModel(create_backbone("random-vit-smoke"), LinearHead(48, 2))


def test_gradients_reach_decoder_and_backbone():
    model = SegmentationModel(create_backbone("random-vit-tiny").train(), UNetDecoder(192, n_classes=3))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    for name, param in model.named_parameters():
        if name.startswith("backbone.model.blocks.0.") or name.startswith("head."):
            assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("size", [32, 33, 64])
def test_plain_unet_shapes(size):
    assert UNet(n_classes=3, base=4, depth=3)(torch.randn(2, 3, size, size)).shape == (2, 3, size, size)


def test_plain_unet_validates_arguments():
    with pytest.raises(ValueError, match="depth >= 1"):
        UNet(n_classes=2, depth=0)


def _blob_target(size: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose bright square is class 1 (a learnable, image-dependent mask)."""
    images = torch.randn(batch, 3, size, size, generator=_gen()) * 0.1
    target = torch.zeros(batch, size, size, dtype=torch.long)
    for i in range(batch):
        r0 = 4 + 6 * i
        images[i, :, r0:r0 + 10, r0:r0 + 10] += 1.0
        target[i, r0:r0 + 10, r0:r0 + 10] = 1
    return images, target


def test_overfit_unet_decoder_on_fixed_grids():
    torch.manual_seed(0)
    grids = [torch.randn(2, 32, 4, 4, generator=_gen(i)) for i in range(5)]
    _, target = _blob_target(32)
    first, last = _fit(_AtSize(UNetDecoder(32, n_classes=2), 32), (grids,), target, steps=30)
    assert last < 0.5 * first


class _AtSize(nn.Module):
    """A grid head called at a fixed output size, so _fit can call it with the grids only."""

    def __init__(self, head: nn.Module, size: int) -> None:
        super().__init__()
        self.head, self.size = head, size

    def forward(self, grids):
        return self.head(grids, out_size=self.size)


def test_overfit_linear_seg_head_with_backbone():
    torch.manual_seed(0)
    images, target = _blob_target(32)
    model = SegmentationModel(create_backbone("random-vit-smoke"), LinearSegHead(48, 2))
    first, last = _fit(model, (images,), target, steps=25)
    assert last < 0.7 * first


def test_overfit_plain_unet():
    torch.manual_seed(0)
    images, target = _blob_target(32)
    first, last = _fit(UNet(n_classes=2, base=4, depth=2), (images,), target, steps=30)
    assert last < 0.5 * first
