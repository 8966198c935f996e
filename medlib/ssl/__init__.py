"""Self-supervised pre-training with the DINOv2 recipe (DINO + iBOT + KoLeo): pieces in ``dino``, loop in ``train``."""

from .dino import (
    DINOHead, DINOModel, MultiCropAugment, TeacherCentering, dino_loss, ibot_loss, interpolate_pos_embed, koleo_loss,
    load_backbone_weights, sample_masks, sinkhorn_knopp, vit_tokens,
)
from .train import SSLResult, train_ssl

__all__ = [
    "DINOHead", "DINOModel", "MultiCropAugment", "SSLResult", "TeacherCentering", "dino_loss", "ibot_loss",
    "interpolate_pos_embed", "koleo_loss", "load_backbone_weights", "sample_masks", "sinkhorn_knopp", "train_ssl",
    "vit_tokens",
]
