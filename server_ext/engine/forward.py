"""Running the Hugging Face model over KV held in pool slots.

The pool keeps keys after RoPE in SGLang's layouts (``leyline.server.core.layout``). A forward
gathers the cached tokens' KV from their slots into a transformers ``DynamicCache``, runs the
model's own attention with explicit ``position_ids``, and scatters the new tokens' KV (read
back from the cache, where the model appended it) into the slots the caller gives.

- MHA/GQA: the cache holds ``(1, kv_heads, seq, head_dim)`` K and V per layer; pool rows are
  ``(kv_heads, head_dim)``.
- MLA (DeepSeek-V3): transformers >= 5 caches the compressed latent, like SGLang: the "keys"
  are the normalized ``c_kv`` (after ``kv_a_layernorm``) ``(1, 1, seq, kv_lora_rank)`` and the
  "values" the rotated ``k_pe`` ``(1, 1, seq, qk_rope_head_dim)``; the attention decompresses
  them with ``kv_b_proj`` itself. So a pool row is ``[c_kv | k_pe]`` and nothing is recomputed.
  With ``rope_interleave`` (all DeepSeek checkpoints) HF rotates interleaved pairs but returns
  them de-interleaved (evens then odds); the pool stores them re-interleaved, so pool rows equal
  SGLang's (``is_neox_style = not rope_interleave``).

The attention mask is causal over cache order: the gathered tokens come first, in the order of
``cached_slots``; positions only drive RoPE.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from leyline.server.engine.model import LoadedModel
from leyline.server.engine.store import KVStore


class Generation:
    """One sequence's forward state: a transformers cache mirroring the pool slots it came from.

    The cached prefix is gathered once; every ``extend`` appends to the cache and writes the new
    tokens' KV to the pool, so token-by-token decoding never re-gathers.

    Example::

        gen = Generation(loaded, pool, cached_slots=prefix_slots)
        logits = gen.extend(ids, positions, new_slots)  # (n, vocab) fp32
        logits = gen.extend(next_id, next_pos, next_slot)  # one decode step: (1, vocab)
    """

    def __init__(self, loaded: LoadedModel, pool: KVStore, *, cached_slots: Tensor) -> None:
        self.loaded = loaded
        self.pool = pool
        self.cache = _gather(loaded, pool, _as_index(cached_slots, "cached_slots", loaded))
        self.length = int(cached_slots.numel())
        self._cache_arg = cache_argument(loaded.model)

    def extend(
        self, ids: Tensor, positions: Tensor, new_slots: Tensor, *, logits_to_keep: int = 0
    ) -> Tensor:
        """Run the model on ``ids`` at ``positions``; write their KV to ``new_slots``.

        Returns fp32 logits ``(n, vocab)``, or only the last ``logits_to_keep`` rows if it is > 0.
        """
        device = self.loaded.device
        ids = ids.to(device=device, dtype=torch.int64).reshape(-1)
        positions = positions.to(device=device, dtype=torch.int64).reshape(-1)
        slots = _as_index(new_slots, "new_slots", self.loaded)
        n = ids.numel()
        if n == 0 or positions.numel() != n or slots.numel() != n:
            raise ValueError(
                f"ids, positions and new_slots need the same non-zero length, "
                f"got {n}, {positions.numel()}, {slots.numel()}"
            )
        if int(positions.max()) >= self.loaded.max_positions or int(positions.min()) < 0:
            raise ValueError(f"positions must lie in [0, {self.loaded.max_positions})")
        with torch.inference_mode():
            out: CausalLMOutputWithPast = self.loaded.model(
                input_ids=ids[None],
                position_ids=positions[None],
                **{self._cache_arg: self.cache},
                use_cache=True,
                logits_to_keep=logits_to_keep,
            )
        _scatter(self.loaded, self.pool, self.cache, self.length, slots)
        self.length += n
        assert out.logits is not None  # causal LM outputs always carry logits
        return out.logits[0].float()

    def decode(self, token: int, position: int, slot: int) -> Tensor:
        """One decode step: fp32 logits ``(vocab,)`` for the token after ``token``."""
        device = self.loaded.device
        ids, positions, slots = (
            torch.tensor([value], dtype=torch.int64, device=device)
            for value in (token, position, slot)
        )
        return self.extend(ids, positions, slots)[0]


def sample_next(
    logits_row: Tensor,
    temperature: float,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """Pick the next token from one logits row: argmax when ``temperature == 0``, else
    nucleus sampling (the smallest set of most likely tokens whose mass reaches ``top_p``)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return int(torch.argmax(logits_row))
    probs = torch.softmax(logits_row.float() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    if top_p < 1.0:
        # Keep a token while the mass before it is below top_p: the top token always stays.
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    choice = torch.multinomial(sorted_probs.cpu(), 1, generator=generator)
    return int(order[choice.to(order.device)])


def _as_index(slots: Tensor, name: str, loaded: LoadedModel) -> Tensor:
    slots = slots.to(device=loaded.device, dtype=torch.int64).reshape(-1)
    if slots.numel() and int(slots.min()) < 1:
        raise ValueError(f"{name} must not contain slot 0 (the reserved padding slot)")
    return slots


def _deinterleave(rows: Tensor) -> Tensor:
    """SGLang's interleaved rope pairs -> HF's layout (even dims, then odd dims)."""
    return torch.cat((rows[..., 0::2], rows[..., 1::2]), dim=-1)


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which ``model.forward`` takes a KV cache.

    NOTE: transformers renamed ``past_key_values`` to ``cache`` during 5.x (5.17 takes only
    ``past_key_values``; 5.25 takes ``cache`` and warns on the old name). An unknown keyword is
    swallowed by ``**kwargs``: the model then builds a cache of its own and the engine's stays
    empty, so the name must be the one this version reads.
    """
    return _cache_argument_of(type(model).forward)


@functools.cache
def _cache_argument_of(forward: Callable[..., Any]) -> str:
    # once per model class's forward: a Generation is made per request
    params = inspect.signature(forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise RuntimeError(
        f"{forward.__qualname__} takes neither `cache` nor `past_key_values`; "
        "this transformers version is not supported"
    )


def _interleave(rows: Tensor) -> Tensor:
    half = rows.shape[-1] // 2
    return torch.stack((rows[..., :half], rows[..., half:]), dim=-1).flatten(-2)


def _gather(loaded: LoadedModel, pool: KVStore, slots: Tensor) -> DynamicCache:
    config = loaded.model.config
    layout = loaded.layout
    if slots.numel() == 0:
        return DynamicCache(config=config)
    per_layer = []
    for layer in range(layout.num_layers):
        rows = pool.k[layer][slots].to(loaded.dtype)  # (m, kv_heads, head_dim)
        if layout.kind == "mha":
            assert pool.v is not None
            keys = rows.transpose(0, 1)[None]
            values = pool.v[layer][slots].to(loaded.dtype).transpose(0, 1)[None]
        else:
            rope = rows[:, 0, layout.rope_offset :]
            if loaded.rope_interleaved:
                rope = _deinterleave(rope)
            keys = rows[:, 0, : layout.rope_offset][None, None]
            values = rope[None, None]
        per_layer.append((keys.contiguous(), values.contiguous()))
    return DynamicCache(per_layer, config=config)


def _scatter(
    loaded: LoadedModel, pool: KVStore, cache: DynamicCache, start: int, slots: Tensor
) -> None:
    layout = loaded.layout
    for layer in range(layout.num_layers):
        layer_cache = cache.layers[layer]
        assert isinstance(layer_cache, CacheLayerMixin)  # attention layers only (see kv_layout)
        keys, values = layer_cache.keys, layer_cache.values
        assert keys is not None and values is not None
        new_k, new_v = keys[0, :, start:], values[0, :, start:]  # (heads, n, dim)
        target = pool.k[layer]
        if layout.kind == "mha":
            assert pool.v is not None
            target[slots] = new_k.transpose(0, 1).to(target.dtype)
            pool.v[layer][slots] = new_v.transpose(0, 1).to(pool.v[layer].dtype)
            continue
        if new_k.shape[-1] != layout.rope_offset or new_v.shape[-1] != layout.rope_dim:
            raise RuntimeError(
                "this transformers version does not cache DeepSeek's compressed latent "
                f"(got cached K/V widths {new_k.shape[-1]}/{new_v.shape[-1]}); "
                "the embedded engine needs transformers >= 5 for MLA models"
            )
        rope = _interleave(new_v[0]) if loaded.rope_interleaved else new_v[0]
        target[slots] = torch.cat((new_k[0], rope), dim=-1)[:, None].to(target.dtype)
