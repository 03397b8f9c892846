"""TEST-ONLY FAKE ``torchvision.transforms.v2``."""

from torchvision import _unavailable
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional

__all__ = ["InterpolationMode", "functional"]


def __getattr__(name: str) -> object:
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable
