"""Phase 4 of a request: sample tokens until a stop, streaming text as it becomes final.

Each fed-back token's KV goes to a fresh slot (``alloc``: the engine reserved them up front);
the request's ``slots`` grow with them, so the commit phase caches prompt and output together.
:func:`decode` is a generator that yields after every sampled token, so the engine can
interleave the steps of several requests; it stops early when ``work.cancelled`` is set (the
client went away: nobody is listening). Stop strings end the text where
they start; characters that could begin a stop string are held back from the stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from leyline.server.engine.forward import sample_next
from leyline.server.engine.model import LoadedModel
from leyline.server.engine.request import ContextTooLong, Request

__all__ = ["decode"]


def decode(
    loaded: LoadedModel, req: Request, alloc: Callable[[int], np.ndarray], default_seed: int
) -> Iterator[None]:
    """Fill ``req.generated``, ``text``, ``finish_reason``, ``ttft_at``; extend ``slots``.
    Yields once per sampled token; the request is complete when the generator is exhausted."""
    work, sp = req.work, req.work.sampling
    assert req.logits is not None and req.generation is not None, "materialize runs first"
    n = len(req.ids)
    max_new = min(sp.max_tokens, loaded.max_positions - n)
    if max_new < 1:
        raise ContextTooLong(
            f"the prompt ({n} tokens) leaves no room to generate within the model's "
            f"{loaded.max_positions} positions"
        )
    gen = torch.Generator().manual_seed(sp.seed if sp.seed is not None else default_seed)
    logits, out, emitted, all_slots = req.logits, req.generated, "", [req.slots]
    for step in range(max_new):
        token = sample_next(logits, sp.temperature, sp.top_p, gen)
        if step == 0:
            req.ttft_at = time.perf_counter()
            if work.on_start is not None:
                work.on_start()
        if token in loaded.eos_ids:
            req.finish_reason = "stop"
            break
        out.append(token)
        text = _text(loaded.tokenizer, out)
        stop_at = _find_stop(text, sp.stop)
        if stop_at is not None:
            text = text[:stop_at]
            req.finish_reason = "stop"
        if work.on_text is not None and not text.endswith("\ufffd"):
            hold = _stop_prefix_len(text, sp.stop) if stop_at is None else 0
            visible = text[: len(text) - hold]
            if len(visible) > len(emitted):
                work.on_text(visible[len(emitted) :])
                emitted = visible
        if stop_at is not None or work.cancelled.is_set():
            if work.cancelled.is_set():
                req.finish_reason = "cancelled"
            break
        if step == max_new - 1:
            break
        yield  # another request may step here
        if work.cancelled.is_set():
            req.finish_reason = "cancelled"
            break
        # feed the sampled token: its KV goes to a fresh slot
        new_slot = alloc(1)
        logits = req.generation.decode(token, n + len(out) - 1, int(new_slot[0]))
        all_slots.append(new_slot)
    text = _text(loaded.tokenizer, out)
    stop_at = _find_stop(text, sp.stop)
    req.text = text[:stop_at] if stop_at is not None else text
    if work.on_text is not None and len(req.text) > len(emitted):
        work.on_text(req.text[len(emitted) :])
    req.slots = np.concatenate(all_slots)


def _text(tokenizer: Any, ids: list[int]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert isinstance(text, str)  # one sequence in, one string out
    return text


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that could start a stop string (held back)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                best = max(best, k)
                break
    return best
