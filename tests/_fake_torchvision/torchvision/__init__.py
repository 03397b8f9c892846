"""TEST-ONLY FAKE torchvision (leyline-test-fake-torchvision): import stand-in, no functionality.

SGLang 0.5.16 imports ``torchvision.io.decode_jpeg`` and ``torchvision.transforms`` at module
level; the real torchvision does not load against the CPU torch used in Leyline's SGLang test
venv. Anything that actually calls into this package raises ``FakeTorchvisionError``.
"""

from __future__ import annotations

__version__ = "0.0.0+leyline.fake"
IS_LEYLINE_FAKE = True


class FakeTorchvisionError(RuntimeError):
    """Raised by every function of the fake package."""


def _unavailable(*_args: object, **_kwargs: object) -> None:
    raise FakeTorchvisionError(
        "this is Leyline's test-only fake torchvision; install the real one for image work"
    )


from torchvision import io, transforms  # noqa: E402

__all__ = ["FakeTorchvisionError", "io", "transforms"]
