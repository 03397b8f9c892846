"""RoPE delta rotation, re-exported from `leyline.server.core.rope`."""

from leyline.server.core.rope import RopeSpec, UnsupportedRope, hf_cache_spec, rotate

__all__ = ["RopeSpec", "UnsupportedRope", "hf_cache_spec", "rotate"]
