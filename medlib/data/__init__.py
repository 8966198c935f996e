"""Data: phantoms, the natural stand-in, real-data sources, splits and transforms."""

from .imageset import ImageSet

__all__ = ["ImageSet"]
