"""TEST-ONLY FAKE ``torchvision.io``."""

from enum import Enum

from torchvision import _unavailable


class ImageReadMode(Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4


decode_jpeg = decode_image = read_image = read_video = _unavailable

__all__ = ["ImageReadMode", "decode_image", "decode_jpeg"]
