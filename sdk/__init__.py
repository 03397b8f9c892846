"""Leyline: cache-aware agent middleware and KV-cache directives."""

__version__ = "0.1.0"
