"""The engine feeds its own KV cache to the model under whatever name this transformers reads.

``make transformers-min-tests`` runs this file (and the engine's forward, model and HTTP tests)
with the lowest transformers the ``server`` extra allows; ``make pytest`` with the latest.
"""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version

from leyline.server.engine.forward import Generation, cache_argument
from leyline.server.engine.model import load_model
from leyline.server.engine.store import KVStore


def test_the_declared_lower_bound_is_the_tested_one() -> None:
    from importlib.metadata import requires

    declared = [r for r in requires("leyline") or () if r.startswith("transformers")]
    assert declared and ">=5.17" in declared[0], declared
    assert Version(transformers.__version__) >= Version("5.17")


def test_the_cache_reaches_the_model() -> None:
    """A second extend sees the first one's KV: logits equal one forward over both parts."""
    loaded = load_model("tiny-llama", device="cpu", dtype="float32")
    assert cache_argument(loaded.model) in ("cache", "past_key_values")
    pool = KVStore(loaded.layout, 64)
    ids = torch.randint(5, 200, (12,))
    slots = torch.arange(1, 13)
    gen = Generation(loaded, pool, cached_slots=slots[:0])
    gen.extend(ids[:7], torch.arange(7), slots[:7])
    split = gen.extend(ids[7:], torch.arange(7, 12), slots[7:])
    whole = Generation(loaded, pool, cached_slots=slots[:0]).extend(ids, torch.arange(12), slots)
    torch.testing.assert_close(split, whole[7:], rtol=1e-4, atol=1e-4)
