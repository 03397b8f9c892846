"""TEST-ONLY FAKE ``torchvision.transforms.functional``: every name is a raising stub."""

from torchvision import _unavailable
from torchvision.transforms import InterpolationMode

__all__ = ["InterpolationMode"]


def __getattr__(name: str) -> object:
    if name.startswith("__"):
        raise AttributeError(name)
    return _unavailable
