"""TEST-ONLY FAKE ``torchvision.transforms``."""

from enum import Enum

from torchvision import _unavailable


class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


Compose = Resize = ToTensor = Normalize = CenterCrop = Lambda = _unavailable

from torchvision.transforms import functional  # noqa: E402

__all__ = ["InterpolationMode", "functional"]
