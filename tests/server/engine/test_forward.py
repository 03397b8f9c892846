"""The pool-backed forward against the oracle: the model's own plain forward on the full sequence."""

from __future__ import annotations

import pytest
import torch

from leyline.server.engine.forward import Generation, sample_next
from leyline.server.engine.model import LoadedModel
from leyline.server.engine.store import KVStore
from leyline.server.engine.tokenize import tokenize_chat

TINY = ["tiny_llama", "tiny_deepseek"]
ATOL = 2e-5


def _model(request: pytest.FixtureRequest, name: str) -> LoadedModel:
    loaded: LoadedModel = request.getfixturevalue(name)
    return loaded


def _random_ids(loaded: LoadedModel, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, loaded.vocab_size, (n,), generator=generator)


def _oracle(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model(input_ids=ids[None]).logits[0].float()


def _empty() -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64)


def _prefill(
    loaded: LoadedModel,
    pool: KVStore,
    *,
    cached_slots: torch.Tensor,
    ids: torch.Tensor,
    positions: torch.Tensor,
    new_slots: torch.Tensor,
    logits_to_keep: int = 0,
) -> torch.Tensor:
    """Prefill after the cached tokens (the engine's path: a Generation over the store)."""
    generation = Generation(loaded, pool, cached_slots=cached_slots)
    return generation.extend(ids, positions, new_slots, logits_to_keep=logits_to_keep)


@pytest.mark.parametrize("name", TINY)
def test_prefill_whole_prompt_matches_full_forward(request: pytest.FixtureRequest, name: str):
    loaded = _model(request, name)
    ids = _random_ids(loaded, 37, seed=1)
    pool = KVStore(loaded.layout, 49)
    slots = torch.arange(1, 38)
    logits = _prefill(
        loaded, pool, cached_slots=_empty(), ids=ids, positions=torch.arange(37), new_slots=slots
    )
    expected = _oracle(loaded, ids)
    assert logits.shape == (37, loaded.vocab_size) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    # Slots outside the written ones stay untouched (slot 0 is reserved padding).
    assert all(float(k[0].abs().max()) == 0 and float(k[38:].abs().max()) == 0 for k in pool.k)
    assert all(float(k[1:38].abs().min(dim=-1).values.max()) > 0 for k in pool.k)


@pytest.mark.parametrize("name", TINY)
def test_cached_prefix_plus_tail_matches_full_forward(request: pytest.FixtureRequest, name: str):
    loaded = _model(request, name)
    ids = _random_ids(loaded, 41, seed=2)
    m = 23
    pool = KVStore(loaded.layout, 63)
    _prefill(
        loaded,
        pool,
        cached_slots=_empty(),
        ids=ids[:m],
        positions=torch.arange(m),
        new_slots=torch.arange(1, m + 1),
    )
    tail = _prefill(
        loaded,
        pool,
        cached_slots=torch.arange(1, m + 1),
        ids=ids[m:],
        positions=torch.arange(m, 41),
        new_slots=torch.arange(m + 1, 42),
    )
    torch.testing.assert_close(tail, _oracle(loaded, ids)[m:], atol=ATOL, rtol=0)
    last = _prefill(
        loaded,
        pool,
        cached_slots=torch.arange(1, m + 1),
        ids=ids[m:],
        positions=torch.arange(m, 41),
        new_slots=torch.arange(m + 1, 42),
        logits_to_keep=1,
    )
    torch.testing.assert_close(last, tail[-1:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_shuffled_slots_match_contiguous_ones(request: pytest.FixtureRequest, name: str):
    loaded = _model(request, name)
    n, m = 33, 19
    ids = _random_ids(loaded, n, seed=3)
    generator = torch.Generator().manual_seed(4)
    slots = torch.randperm(150, generator=generator)[:n] + 1  # non-contiguous, out of order
    pool = KVStore(loaded.layout, 150)
    _prefill(
        loaded,
        pool,
        cached_slots=_empty(),
        ids=ids[:m],
        positions=torch.arange(m),
        new_slots=slots[:m],
    )
    tail = _prefill(
        loaded,
        pool,
        cached_slots=slots[:m],
        ids=ids[m:],
        positions=torch.arange(m, n),
        new_slots=slots[m:],
    )
    torch.testing.assert_close(tail, _oracle(loaded, ids)[m:], atol=ATOL, rtol=0)
    contiguous = KVStore(loaded.layout, n)
    _prefill(
        loaded,
        contiguous,
        cached_slots=_empty(),
        ids=ids,
        positions=torch.arange(n),
        new_slots=torch.arange(1, n + 1),
    )
    for shuffled, plain in zip(pool.k, contiguous.k, strict=True):
        torch.testing.assert_close(shuffled[slots], plain[1:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_decode_steps_match_full_forward(request: pytest.FixtureRequest, name: str):
    loaded = _model(request, name)
    prompt = _random_ids(loaded, 17, seed=5)
    pool = KVStore(loaded.layout, 39)
    slots = torch.arange(39, 0, -1)  # descending slots
    generation = Generation(loaded, pool, cached_slots=_empty())
    logits = generation.extend(prompt, torch.arange(17), slots[:17], logits_to_keep=1)[-1]
    sequence = prompt.tolist()
    for step in range(6):
        token = sample_next(logits, temperature=0.0)
        sequence.append(token)
        position = len(sequence) - 1
        logits = generation.decode(token, position, int(slots[position]))
        expected = _oracle(loaded, torch.tensor(sequence))[-1]
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0, msg=f"step {step}")
    # The decoded tokens' KV reached the pool: a fresh gather reproduces the last step.
    again = Generation(loaded, pool, cached_slots=slots[: len(sequence) - 1])
    replay = again.extend(
        torch.tensor(sequence[-1:]),
        torch.tensor([len(sequence) - 1]),
        slots[len(sequence) - 1 :][:1],
    )
    torch.testing.assert_close(replay[0], logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_wrong_positions_or_kv_are_visible(request: pytest.FixtureRequest, name: str):
    """Negative controls: the oracle comparison is sensitive to positions and to cached KV."""
    loaded = _model(request, name)
    ids = _random_ids(loaded, 30, seed=6)
    expected = _oracle(loaded, ids)[20:]
    pool = KVStore(loaded.layout, 30)
    _prefill(
        loaded,
        pool,
        cached_slots=_empty(),
        ids=ids[:20],
        positions=torch.arange(20),
        new_slots=torch.arange(1, 21),
    )
    shifted = _prefill(
        loaded,
        pool,
        cached_slots=torch.arange(1, 21),
        ids=ids[20:],
        positions=torch.arange(21, 31),
        new_slots=torch.arange(21, 31),
    )
    assert float((shifted - expected).abs().max()) > 1e-3
    pool.k[1][5] += 0.5  # perturb one cached token in one layer
    perturbed = _prefill(
        loaded,
        pool,
        cached_slots=torch.arange(1, 21),
        ids=ids[20:],
        positions=torch.arange(20, 30),
        new_slots=torch.arange(21, 31),
    )
    assert float((perturbed - expected).abs().max()) > 1e-3


def test_mla_pool_rows_are_sglang_layout(tiny_deepseek: LoadedModel):
    """Pool row = [kv_a_layernorm(c_kv) | k_pe rotated in interleaved pairs], as in SGLang."""
    loaded = tiny_deepseek
    attention = loaded.model.model.layers[1].self_attn
    captured: list[torch.Tensor] = []
    hook = attention.kv_a_proj_with_mqa.register_forward_hook(
        lambda _module, _inputs, output: captured.append(output[0].detach())
    )
    ids = _random_ids(loaded, 12, seed=7)
    positions = torch.arange(40, 52)  # not starting at 0: the rotation must follow positions
    pool = KVStore(loaded.layout, 19)
    slots = torch.arange(3, 15)
    try:
        _prefill(loaded, pool, cached_slots=_empty(), ids=ids, positions=positions, new_slots=slots)
    finally:
        hook.remove()
    raw = captured[0]  # (12, kv_lora_rank + rope)
    rank, rope = loaded.layout.rope_offset, loaded.layout.rope_dim
    rows = pool.k[1][slots, 0]
    with torch.inference_mode():
        torch.testing.assert_close(rows[:, :rank], attention.kv_a_layernorm(raw[:, :rank]))
    rotary = loaded.model.model.rotary_emb
    angles = positions[:, None].double() * rotary.inv_freq.double()[None]  # (12, rope/2)
    cos, sin = (angles.cos() * rotary.attention_scaling, angles.sin() * rotary.attention_scaling)
    even, odd = raw[:, rank::2].double(), raw[:, rank + 1 :: 2].double()
    expected = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(1)
    assert expected.shape == (12, rope)
    torch.testing.assert_close(rows[:, rank:].double(), expected, atol=1e-5, rtol=1e-5)


def test_mha_pool_rows_are_per_head(tiny_llama: LoadedModel):
    """V rows hold each KV head's slice of v_proj, in head order (no transposition mix-up)."""
    loaded = tiny_llama
    ids = _random_ids(loaded, 9, seed=8)
    pool = KVStore(loaded.layout, 11)
    _prefill(
        loaded,
        pool,
        cached_slots=_empty(),
        ids=ids,
        positions=torch.arange(9),
        new_slots=torch.arange(2, 11),
    )
    layer = loaded.model.model.layers[0]
    with torch.inference_mode():
        hidden = layer.input_layernorm(loaded.model.model.embed_tokens(ids))
        values = layer.self_attn.v_proj(hidden).view(9, loaded.layout.kv_heads, -1)
    assert pool.v is not None
    torch.testing.assert_close(pool.v[0][2:11], values)


def test_pool_dtype_may_differ_from_model(tiny_llama: LoadedModel):
    ids = _random_ids(tiny_llama, 15, seed=9)
    pool = KVStore(tiny_llama.layout, 15, dtype=torch.bfloat16)
    _prefill(
        tiny_llama,
        pool,
        cached_slots=_empty(),
        ids=ids[:10],
        positions=torch.arange(10),
        new_slots=torch.arange(1, 11),
    )
    tail = _prefill(
        tiny_llama,
        pool,
        cached_slots=torch.arange(1, 11),
        ids=ids[10:],
        positions=torch.arange(10, 15),
        new_slots=torch.arange(11, 16),
    )
    # NOTE: bf16 KV rounding (~3 significant digits) moves logits by ~1e-2, not more.
    torch.testing.assert_close(tail, _oracle(tiny_llama, ids)[10:], atol=5e-2, rtol=0)
    assert pool.k[0].dtype == torch.bfloat16


def test_invalid_arguments_are_refused(tiny_llama: LoadedModel):
    pool = KVStore(tiny_llama.layout, 7)
    ids = _random_ids(tiny_llama, 3, seed=10)
    with pytest.raises(ValueError, match="slot 0"):
        _prefill(
            tiny_llama,
            pool,
            cached_slots=_empty(),
            ids=ids,
            positions=torch.arange(3),
            new_slots=torch.tensor([0, 1, 2]),
        )
    with pytest.raises(ValueError, match="same non-zero length"):
        _prefill(
            tiny_llama,
            pool,
            cached_slots=_empty(),
            ids=ids,
            positions=torch.arange(2),
            new_slots=torch.tensor([1, 2, 3]),
        )
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        KVStore(tiny_llama.layout, 0)


def test_sample_next_greedy_and_nucleus():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9, 0.0])
    assert sample_next(logits, 0.0) == 1
    generator = torch.Generator().manual_seed(0)
    # top_p below the top token's mass keeps only the top token.
    assert {sample_next(logits, 1.0, 0.05, generator) for _ in range(50)} == {1}
    # Probabilities 0.5 / 0.3 / 0.2: top_p 0.6 keeps the first two and samples both.
    three = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    draws = [sample_next(three, 1.0, 0.6, generator) for _ in range(300)]
    assert set(draws) == {1, 2}
    assert 0.5 < draws.count(1) / 300 < 0.75  # renormalized 0.5 / 0.8 = 0.625
    first = [sample_next(logits, 0.7, 1.0, torch.Generator().manual_seed(3)) for _ in range(5)]
    second = [sample_next(logits, 0.7, 1.0, torch.Generator().manual_seed(3)) for _ in range(5)]
    assert first == second
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, -1.0)


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2: LoadedModel):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = torch.from_numpy(tokenize_chat(smollm2.tokenizer, messages).ids)
    n = prompt.numel()
    pool = KVStore(smollm2.layout, n + 23)
    generation = Generation(smollm2, pool, cached_slots=_empty())
    logits = generation.extend(prompt, torch.arange(n), torch.arange(1, n + 1), logits_to_keep=1)
    answer: list[int] = []
    for step in range(16):
        token = sample_next(logits[-1], 0.0)
        if token in smollm2.eos_ids:
            break
        answer.append(token)
        logits = generation.decode(token, n + step, n + 1 + step)[None]
    text = smollm2.tokenizer.decode(answer)
    assert "Paris" in text, text
