"""medlib: the thin helper library behind the DINOv2 medical-imaging companion notebooks."""

from .config import Profile, get_profile

__all__ = ["Profile", "get_profile"]
__version__ = "0.1.0"
