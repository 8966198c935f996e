"""Backbones (one timm-based registry, one feature API), task heads and parameter-efficient adapters."""

from .adapters import apply_bitfit, apply_lora, freeze, trainable_parameter_report
from .backbones import (
    BACKBONES,
    EMBEDDED_ARCHS,
    EMBEDDED_FAMILIES,
    Backbone,
    BackboneSpec,
    WeightsMismatchError,
    WeightsNotFoundError,
    backbone_info,
    cached_weights_path,
    create_backbone,
    embedded_weights_path,
    linear_probe_input,
    list_backbones,
    load_model_card,
)
from .heads import LinearHead, LinearSegHead, MLPHead, SegmentationModel, UNet, UNetDecoder

__all__ = [
    "BACKBONES", "EMBEDDED_ARCHS", "EMBEDDED_FAMILIES", "Backbone", "BackboneSpec", "WeightsMismatchError",
    "WeightsNotFoundError", "backbone_info", "cached_weights_path", "create_backbone", "embedded_weights_path",
    "linear_probe_input", "list_backbones", "load_model_card",
    "LinearHead", "LinearSegHead", "MLPHead", "SegmentationModel", "UNet", "UNetDecoder",
    "apply_bitfit", "apply_lora", "freeze", "trainable_parameter_report",
]
