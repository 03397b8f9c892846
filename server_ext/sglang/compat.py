"""The SGLang versions the plugin supports, and every difference between them (only here).

Supported: 0.5.16 (the GPU machines' release: it pins their torch 2.11) and 0.5.23 (the
current release). Any other installed version is refused by `require` with a message naming
the supported ones; the plugin calls it before it registers the backend.

What differs, read from the two wheels:

- the cache lifecycle. 0.5.16 calls ``cache_unfinished_req(req, chunked)`` after each chunk
  and ``cache_finished_req(req, is_insert, kv_len_to_handle=)`` when a request ends or is
  aborted. 0.5.23 calls ``checkpoint(req, up_to=)`` after each chunk and once more when the
  request finished, then ``on_release(req, checkpointed=)`` after freeing its row (also for
  an abort, with ``checkpointed=False``). `Lifecycle` maps either onto two hooks of the cache:
  ``_chunk_cached(req, cached_len)`` and ``_request_done(req, inserted, kv_len)``;
- match results: 0.5.16's ``MatchResult.device_indices`` became ``device_prefix_len`` plus
  ``path_device_indices(last_device_node)``;
- the request's prefix: 0.5.16 ``req.prefix_indices`` / ``req.cache_protected_len`` /
  ``req.req_pool_idx`` and a bare ``inc_lock_ref`` on ``req.last_node``; 0.5.23
  ``req.prefix_len``, ``req.kv`` (a ``ReqKvInfo``) and a ``TreeLock`` in ``req.lock``;
- tenants: 0.5.16 folds ``cache_salt`` into ``req.extra_key``; 0.5.23 keeps it apart, in
  ``req.cache_salt`` and ``RadixKey.cache_salt`` (part of the tree's child keys).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "CHECKPOINTS",
    "SUPPORTED_VERSIONS",
    "Lifecycle",
    "UnsupportedSGLangVersion",
    "extend_prefix",
    "installed_version",
    "key_salt",
    "match_len",
    "match_slots",
    "prefix_len",
    "radix_key",
    "req_salt",
    "require",
]

SUPPORTED_VERSIONS = ("0.5.16", "0.5.23")


class UnsupportedSGLangVersion(RuntimeError):
    """The installed SGLang is not one the plugin was built and tested against."""


def installed_version() -> str:
    import sglang

    return str(sglang.__version__)


def require(version: str | None = None) -> str:
    """The installed (or given) SGLang version; `UnsupportedSGLangVersion` unless supported."""
    version = installed_version() if version is None else version
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedSGLangVersion(
            f"leyline's SGLang plugin supports sglang {' and '.join(SUPPORTED_VERSIONS)}; "
            f"sglang {version} is installed. Install a supported one (pip install "
            f"'leyline[sglang]' gives {SUPPORTED_VERSIONS[0]}) or drop "
            "--radix-cache-backend leyline."
        )
    return version


# Which side of the lifecycle change the installed SGLang is on (True: 0.5.23's checkpoint /
# on_release). An unsupported version imports as 0.5.16 so that `require` (called by the
# plugin and by cache.py) can name the problem.
CHECKPOINTS = installed_version() == "0.5.23"


def match_len(res: Any) -> int:
    """Tokens a `MatchResult` matched on the device."""
    return int(res.device_prefix_len) if CHECKPOINTS else len(res.device_indices)


def match_slots(cache: Any, res: Any) -> torch.Tensor:
    """The KV slots of a `MatchResult`'s matched prefix (int64, on the pool's device)."""
    if CHECKPOINTS:
        return cache.path_device_indices(res.last_device_node)[: res.device_prefix_len]
    slots: torch.Tensor = res.device_indices
    return slots


def radix_key(
    tokens: Any, extra_key: str | None, salt: str | None, limit: int | None = None
) -> Any:
    """A `RadixKey` of ``tokens`` in namespace ``extra_key`` for tenant ``salt``."""
    from sglang.srt.mem_cache.radix_cache import RadixKey

    if CHECKPOINTS:
        return RadixKey(tokens, extra_key, limit=limit, cache_salt=salt)
    assert salt is None, "SGLang 0.5.16 carries the cache salt in extra_key"
    return RadixKey(tokens, extra_key, limit=limit)


def key_salt(key: Any) -> str | None:
    """The tenant salt a `RadixKey` carries apart from its extra key (None on 0.5.16)."""
    return getattr(key, "cache_salt", None) if CHECKPOINTS else None


def req_salt(req: Any) -> str | None:
    """The tenant salt a `Req` carries apart from its extra key (None on 0.5.16)."""
    return getattr(req, "cache_salt", None) if CHECKPOINTS else None


def prefix_len(req: Any) -> int:
    """Tokens of ``req`` already in its KV row (its matched or cached prefix)."""
    return int(req.prefix_len) if CHECKPOINTS else len(req.prefix_indices)


def extend_prefix(cache: Any, req: Any, old_len: int, slots: torch.Tensor, node: Any) -> None:
    """Make ``slots`` (a cached path ending at ``node``, starting with the request's first
    ``old_len`` row entries) the request's prefix, as SGLang's own chunk caching does: write
    the new part of the row, move the request's tree lock to ``node``, mark the prefix
    tree-owned, and let the next chunk resume after it."""
    new = slots[old_len:].to(torch.int32)
    if CHECKPOINTS:
        kv = req.kv
        cache.req_to_token_pool.write((kv.req_pool_idx, slice(old_len, len(slots))), new)
        cache.unlock(req.lock)
        req.lock = cache.lock(node)
        req.last_node = node
        kv.cache_protected_len = len(slots)
        kv.kv_committed_len = max(kv.kv_committed_len, len(slots))
        kv.kv_allocated_len = max(kv.kv_allocated_len, len(slots))
        # NOTE: 0.5.23's checkpoint_kv_cache sets ``req.prefix_len = req.extend_end`` after
        # ``checkpoint`` returns ("the next extend resumes after this one"), and the adder
        # sets extend_end afresh for the next chunk: the copy run counts as extended.
        req.extend_end = len(slots)
        req.prefix_len = len(slots)
        return
    cache.req_to_token_pool.write((req.req_pool_idx, slice(old_len, len(slots))), new)
    cache.dec_lock_ref(req.last_node)
    cache.inc_lock_ref(node)
    req.prefix_indices, req.last_node = slots, node
    req.cache_protected_len = len(slots)


class _Lifecycle0516:
    """0.5.16: ``cache_unfinished_req`` after a chunk, ``cache_finished_req`` at the end."""

    def cache_unfinished_req(self, req: Any, chunked: bool = False) -> None:
        super().cache_unfinished_req(req, chunked)  # type: ignore[misc]
        self._chunk_cached(req, len(req.prefix_indices))  # type: ignore[attr-defined]

    def cache_finished_req(
        self, req: Any, is_insert: bool = True, *, kv_len_to_handle: int
    ) -> None:
        super().cache_finished_req(  # type: ignore[misc]
            req, is_insert, kv_len_to_handle=kv_len_to_handle
        )
        self._request_done(req, is_insert, kv_len_to_handle)  # type: ignore[attr-defined]


class _Lifecycle0523:
    """0.5.23: ``checkpoint`` after a chunk and at the end, ``on_release`` after the row is
    freed (checkpointed or not, e.g. an abort)."""

    def checkpoint(self, req: Any, *, up_to: int, **kwargs: Any) -> None:
        super().checkpoint(req, up_to=up_to, **kwargs)  # type: ignore[misc]
        if not req.finished():
            self._chunk_cached(req, up_to)  # type: ignore[attr-defined]

    def on_release(self, req: Any, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)  # type: ignore[misc]
        # NOTE: 0.5.23's release_kv_cache calls on_release before mark_kv_released: the
        # request's committed length still names the KV it had.
        self._request_done(req, checkpointed, req.owned_kv_len())  # type: ignore[attr-defined]


Lifecycle: type = _Lifecycle0523 if CHECKPOINTS else _Lifecycle0516
