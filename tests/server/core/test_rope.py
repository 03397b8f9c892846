"""RoPE delta rotation against the models' own Hugging Face rotary code (the §4 oracle).

For every variant: ``rotate(K_at(p), δ) == K_at(p + δ)`` where ``K_at`` is the model's own rotary
embedding module plus its own apply function, to fp32 rounding. fp32 angle rounding grows with
the position, so the tolerance is ``2 · 2^-24 · (|p| + |p+δ| + |δ|)`` times the key's magnitude
plus a 1e-6 floor. Observed: at most 0.2 of that bound, while a 1e-5 relative frequency error
gives 10-40x the bound and a wrong layout or a re-applied mscale gives errors of order 1.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable

import pytest
import torch
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DynamicCache,
    Gemma3TextConfig,
    GlmConfig,
    GPTJConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2VLTextConfig,
    Qwen3Config,
    Qwen3NextConfig,
    SmolLM3Config,
)
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as ds2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds3
from transformers.models.glm import modeling_glm as glm
from transformers.models.llama import modeling_llama as llama
from transformers.models.mistral import modeling_mistral as mistral
from transformers.models.qwen2 import modeling_qwen2 as qwen2
from transformers.models.qwen3 import modeling_qwen3 as qwen3
from transformers.models.qwen3_next import modeling_qwen3_next as qwen3_next

from leyline.errors import LeylineError
from leyline.server.core import rope as rope_mod
from leyline.server.core.rope import RopeSpec, UnsupportedRope, hf_cache_spec, rotate

EPS32 = 2.0**-24
HEADS, TOKENS = 3, 53
YARN_DS = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,  # != mscale, so attention_factor != 1 is baked into HF's keys
}


def _llama_like(cls: type, **rope: object) -> object:
    return cls(hidden_size=72, num_attention_heads=3, num_key_value_heads=3, head_dim=24, **rope)


def _deepseek(cls: type, **kw: object) -> object:
    return cls(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=3,
        num_key_value_heads=3,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        kv_lora_rank=24,
        q_lora_rank=None,
        qk_rope_head_dim=16,
        qk_nope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=163840,
        **kw,
    )


Case = tuple[object, Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor, int]


def _cos_sin_case(config: object, module: object, rot_cls: type, apply: Callable) -> Case:
    """(config, K_at, HF inv_freq, key width) for models whose rotary module returns (cos, sin)."""
    rot = rot_cls(config)

    def k_at(k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cos, sin = rot(k, pos[None])
        return apply(k, k, cos, sin)[1]

    width = getattr(config, "qk_rope_head_dim", None) or config.head_dim
    return config, k_at, rot.inv_freq, width


def _case(name: str) -> Case:
    if name == "llama-default":
        c = _llama_like(LlamaConfig)
        return _cos_sin_case(c, llama, llama.LlamaRotaryEmbedding, llama.apply_rotary_pos_emb)
    if name == "mistral-default":
        c = _llama_like(MistralConfig, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        return _cos_sin_case(
            c, mistral, mistral.MistralRotaryEmbedding, mistral.apply_rotary_pos_emb
        )
    if name == "qwen3-default":
        c = _llama_like(Qwen3Config)
        return _cos_sin_case(c, qwen3, qwen3.Qwen3RotaryEmbedding, qwen3.apply_rotary_pos_emb)
    if name == "llama-linear":
        c = _llama_like(LlamaConfig, rope_parameters={"rope_type": "linear", "factor": 4.0})
        return _cos_sin_case(c, llama, llama.LlamaRotaryEmbedding, llama.apply_rotary_pos_emb)
    if name == "llama3":
        rp = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        c = _llama_like(LlamaConfig, rope_parameters=rp, max_position_embeddings=131072)
        return _cos_sin_case(c, llama, llama.LlamaRotaryEmbedding, llama.apply_rotary_pos_emb)
    if name == "qwen2-yarn":
        rp = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
        c = _llama_like(Qwen2Config, rope_parameters=rp, max_position_embeddings=16384)
        return _cos_sin_case(c, qwen2, qwen2.Qwen2RotaryEmbedding, qwen2.apply_rotary_pos_emb)
    if name == "qwen3next-partial":
        c = _llama_like(Qwen3NextConfig)  # partial_rotary_factor 0.25, neox, pass dims after
        return _cos_sin_case(
            c, qwen3_next, qwen3_next.Qwen3NextRotaryEmbedding, qwen3_next.apply_rotary_pos_emb
        )
    if name == "glm-partial-interleaved":
        c = _llama_like(GlmConfig)  # partial_rotary_factor 0.5, GPT-J pairs
        return _cos_sin_case(c, glm, glm.GlmRotaryEmbedding, glm.apply_rotary_pos_emb)
    if name in ("deepseek_v2-default", "deepseek_v2-yarn"):
        c = _deepseek(DeepseekV2Config, rope_parameters=dict(YARN_DS) if "yarn" in name else None)
        rot = ds2.DeepseekV2RotaryEmbedding(c)

        def k_at(k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            return ds2.apply_rotary_emb(k, k, rot(k, pos[None]))[1]

        return c, k_at, rot.inv_freq, c.qk_rope_head_dim
    if name in ("deepseek_v3-yarn", "deepseek_v3-yarn-neox"):
        c = _deepseek(
            DeepseekV3Config, rope_parameters=dict(YARN_DS), rope_interleave="neox" not in name
        )
        apply = ds3.apply_rotary_pos_emb if "neox" in name else ds3.apply_rotary_pos_emb_interleave
        return _cos_sin_case(c, ds3, ds3.DeepseekV3RotaryEmbedding, apply)
    raise AssertionError(name)


CASES = [
    "llama-default",
    "mistral-default",
    "qwen3-default",
    "llama-linear",
    "llama3",
    "qwen2-yarn",
    "qwen3next-partial",
    "glm-partial-interleaved",
    "deepseek_v2-default",
    "deepseek_v2-yarn",
    "deepseek_v3-yarn",
    "deepseek_v3-yarn-neox",
]


def _positions(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token positions up to 16K and deltas of both signs (p + δ >= 0), small ones included."""
    p = torch.randint(0, 16384, (TOKENS,), generator=gen)
    d = torch.randint(-16384, 16384, (TOKENS,), generator=gen).clamp(min=-p)
    p[:6], d[:6] = torch.tensor([0, 1, 7, 300, 16000, 5]), torch.tensor([3, -1, 250, -300, -9, 0])
    return p, d


def _assert_rotation_close(
    got: torch.Tensor, want: torch.Tensor, p: torch.Tensor, d: torch.Tensor
) -> None:
    """Per-token max error within the fp32 angle-rounding bound (tokens on dim -2)."""
    err = (got - want).abs().amax(dim=-1)  # (..., tokens)
    mag = want.abs().amax(dim=-1)
    bound = mag * (1e-6 + 2 * EPS32 * (p.abs() + (p + d).abs() + d.abs()).double())
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"rotation error {worst:.2f}x over the fp32 bound"


@pytest.mark.parametrize("name", CASES)
def test_inv_freq_matches_transformers(name: str) -> None:
    config, _, hf_inv, _ = _case(name)
    spec = RopeSpec.from_hf_config(config)
    assert spec.rotary_dim == 2 * hf_inv.numel()
    # NOTE: transformers forms base ** fp32(i / dim) in fp32; the exponent's rounding is amplified
    # by ln(base), so its inv_freq is off by up to ~ln(base) ulp from the float64 value.
    theta = config.rope_parameters["rope_theta"]
    rtol = (2 + math.log(theta)) * EPS32
    torch.testing.assert_close(spec.inv_freq_tensor(), hf_inv, rtol=rtol, atol=0)


@pytest.mark.parametrize("name", CASES)
def test_rotate_matches_model_rope_at_shifted_positions(name: str) -> None:
    config, k_at, _, width = _case(name)
    spec = hf_cache_spec(config)
    gen = torch.Generator().manual_seed(CASES.index(name))
    p, d = _positions(gen)
    k = torch.randn(1, HEADS, TOKENS, width, generator=gen) * 3 + 0.5
    k_p, k_pd = k_at(k, p), k_at(k, p + d)
    before = k_p.clone()
    got = rotate(k_p, d, spec)  # (TOKENS,) broadcasts over (1, HEADS, TOKENS)
    assert torch.equal(k_p, before), "rotate mutated its input"
    _assert_rotation_close(got, k_pd, p, d)
    # dims past rotary_dim (partial rotary) are copied bit-exactly
    assert torch.equal(got[..., spec.rotary_dim :], k_p[..., spec.rotary_dim :])
    # the oracle discriminates: the other pair layout is far off
    wrong = rotate(k_p, d, spec.with_interleaved(not spec.interleaved))
    assert (wrong - k_pd).abs().max() > 0.1


def test_variants_exercise_their_scaling_branches() -> None:
    """llama3 covers kept, divided and smoothed frequencies; YaRN keys carry an mscale != 1."""
    config, _, _, _ = _case("llama3")
    spec = RopeSpec.from_hf_config(config)
    plain = RopeSpec.from_hf_config(_llama_like(LlamaConfig, rope_parameters={"rope_theta": 5e5}))
    ratio = torch.tensor(spec.inv_freq) / torch.tensor(plain.inv_freq)
    assert (ratio == 1).any() and (ratio == 1 / 8).any()
    assert ((ratio > 1 / 8) & (ratio < 1)).any()
    for name in ("qwen2-yarn", "deepseek_v3-yarn"):
        config, _, _, _ = _case(name)
        rot_cls = qwen2.Qwen2RotaryEmbedding if "qwen" in name else ds3.DeepseekV3RotaryEmbedding
        assert abs(rot_cls(config).attention_scaling - 1.0) > 1e-3
    assert RopeSpec.from_hf_config(_case("deepseek_v3-yarn")[0]).scaling == "deepseek_yarn"


def _layer0_cache(model: torch.nn.Module, ids: torch.Tensor, start: int) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    pos = torch.arange(ids.shape[1])[None] + start
    with torch.no_grad():
        model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("variant", ["deepseek_v2", "deepseek_v3", "deepseek_v3-neox", "llama"])
def test_hf_cache_keys_move_with_hf_cache_spec(variant: str) -> None:
    """Keys actually stored in a Hugging Face KV cache (layer 0, position-free input) rotate."""
    torch.manual_seed(7)
    if variant == "llama":
        config = _llama_like(LlamaConfig, vocab_size=97, num_hidden_layers=1, intermediate_size=32)
        model = LlamaForCausalLM(config).eval()
    else:
        cls, mcls = (
            (DeepseekV2Config, DeepseekV2ForCausalLM)
            if variant == "deepseek_v2"
            else (DeepseekV3Config, DeepseekV3ForCausalLM)
        )
        kw = {"rope_interleave": False} if variant.endswith("neox") else {}
        model = mcls(_deepseek(cls, rope_parameters=dict(YARN_DS), **kw)).eval()
    ids = torch.randint(0, 97, (1, 11))
    start, delta = 9000, -5123
    a, b = _layer0_cache(model, ids, start).layers[0], _layer0_cache(model, ids, start + delta)
    b = b.layers[0]
    p = torch.arange(11) + start
    d = torch.full((11,), delta)
    spec = hf_cache_spec(model.config)
    if variant == "llama":
        _assert_rotation_close(rotate(a.keys, d, spec), b.keys, p, d)
        return
    # MLA: keys = normalized c_kv (position-free), values = k_pe; rotate the pool row with offset
    rank = model.config.kv_lora_rank
    assert torch.equal(a.keys, b.keys)
    row_a, row_b = torch.cat((a.keys, a.values), -1), torch.cat((b.keys, b.values), -1)
    got = rotate(row_a, d, spec, offset=rank)
    assert torch.equal(got[..., :rank], row_a[..., :rank])
    _assert_rotation_close(got[..., rank:], row_b[..., rank:], p, d)
    semantic = RopeSpec.from_hf_config(model.config)
    expect_interleaved = variant != "deepseek_v3-neox"
    assert semantic.interleaved is expect_interleaved
    assert spec.interleaved is (variant == "deepseek_v2")
    if semantic.interleaved != spec.interleaved:  # DeepSeek-V3 pairs in, half-split in the cache
        off = rotate(row_a, d, semantic, offset=rank)[..., rank:]
        assert (off - row_b[..., rank:]).abs().max() > 0.1


def test_deepseek_v3_semantic_layout_is_pairs_then_deinterleaved() -> None:
    """V3's interleave path == rotate GPT-J pairs in place, then permute to (evens, odds)."""
    config, k_at, _, width = _case("deepseek_v3-yarn")
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, 1, TOKENS, width, generator=gen)
    p = torch.randint(0, 16384, (TOKENS,), generator=gen)
    semantic = rotate(k, p, RopeSpec.from_hf_config(config))
    # HF bakes YaRN's attention factor into cos/sin; the rotation itself never applies it
    mscale = ds3.DeepseekV3RotaryEmbedding(config).attention_scaling
    permuted = torch.cat((semantic[..., 0::2], semantic[..., 1::2]), -1) * mscale
    _assert_rotation_close(permuted, k_at(k, p), p, torch.zeros_like(p))


@pytest.mark.parametrize("interleaved", [False, True])
def test_bf16_is_rounded_once_and_pass_dims_are_bit_exact(interleaved: bool) -> None:
    gen = torch.Generator().manual_seed(11)
    spec = RopeSpec(rotary_dim=20, inv_freq=tuple(0.7**i for i in range(10)), interleaved=False)
    spec = spec.with_interleaved(interleaved)
    keys = (torch.randn(5, 7, 3, 40, generator=gen) * 4).bfloat16()
    delta = torch.randint(-3000, 3000, (5, 7, 1), generator=gen)
    got = rotate(keys, delta, spec, offset=13)
    assert got.dtype == torch.bfloat16
    want = rotate(keys.float(), delta, spec, offset=13).bfloat16()
    assert torch.equal(got, want)
    assert torch.equal(got[..., :13], keys[..., :13]) and torch.equal(got[..., 33:], keys[..., 33:])
    assert not torch.equal(got[..., 13:33], keys[..., 13:33])


def test_composition_and_zero_delta() -> None:
    config, _, _, _ = _case("llama3")
    spec = RopeSpec.from_hf_config(config)
    gen = torch.Generator().manual_seed(5)
    k = torch.randn(31, 2, 24, generator=gen)
    a, b = torch.randint(-9000, 9000, (31, 1), generator=gen), -4321
    torch.testing.assert_close(rotate(rotate(k, a, spec), b, spec), rotate(k, a + b, spec))
    assert torch.equal(rotate(k, 0, spec), k)
    torch.testing.assert_close(rotate(rotate(k, 777, spec), -777, spec), k, rtol=0, atol=1e-5)


def test_rotate_rejects_bad_arguments() -> None:
    spec = RopeSpec.from_hf_config(_llama_like(LlamaConfig))
    k = torch.randn(4, 3, 24)
    with pytest.raises(ValueError, match="integer tensor"):
        rotate(k, torch.ones(4, 1), spec)
    with pytest.raises(ValueError, match="broadcast"):
        rotate(k, torch.ones(4, dtype=torch.long), spec)  # (4,) vs (4, 3): needs (4, 1)
    with pytest.raises(ValueError, match="do not fit"):
        rotate(k, 3, spec, offset=2)
    with pytest.raises(ValueError, match="even"):
        RopeSpec(rotary_dim=5, inv_freq=(1.0, 0.1), interleaved=False)
    with pytest.raises(ValueError, match="inverse frequencies"):
        RopeSpec(rotary_dim=4, inv_freq=(1.0,), interleaved=False)


REFUSALS = [
    ("dynamic", lambda: _llama_like(LlamaConfig, rope_parameters={"rope_type": "dynamic", "factor": 2.0})),
    (
        "longrope",
        lambda: Phi3Config(
            hidden_size=48,
            num_attention_heads=3,
            max_position_embeddings=8192,
            original_max_position_embeddings=4096,
            rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
        ),
    ),
    ("M-RoPE", lambda: Qwen2VLTextConfig(rope_parameters={"rope_type": "mrope", "mrope_section": [2, 3, 3]})),
    ("dual-chunk", lambda: _llama_like(Qwen2Config, dual_chunk_attention_config={"chunk_size": 8192})),
    ("NoPE", lambda: SmolLM3Config(num_hidden_layers=8)),
    ("per layer type", lambda: Gemma3TextConfig()),
    ("unknown rope_type 'fancy'", lambda: _llama_like(LlamaConfig, rope_parameters={"rope_type": "fancy"})),
    ("proportional", lambda: _llama_like(LlamaConfig, rope_parameters={"rope_type": "proportional"})),
    ("'gptj'.*not been verified", lambda: GPTJConfig()),
    ("partial_rotary_factor=0.5", lambda: _llama_like(LlamaConfig, partial_rotary_factor=0.5)),
]  # fmt: skip


@pytest.mark.parametrize(("why", "make"), REFUSALS, ids=[w for w, _ in REFUSALS])
def test_refusals_name_the_variant(why: str, make: Callable[[], object]) -> None:
    with pytest.raises(UnsupportedRope, match=why):
        RopeSpec.from_hf_config(make())
    assert issubclass(UnsupportedRope, ValueError) and issubclass(UnsupportedRope, LeylineError)


def test_verified_model_types_have_the_declared_pair_layout() -> None:
    """The model-type allow-lists agree with each model's own ``rotate_half``."""
    x = torch.arange(1.0, 9.0)
    neox = torch.cat((-x[4:], x[:4]))
    pairs = torch.stack((-x[1::2], x[0::2]), -1).flatten()
    for types, want in (
        (rope_mod._NEOX_MODEL_TYPES, neox),
        (rope_mod._INTERLEAVED_MODEL_TYPES, pairs),
    ):
        for t in sorted(types):
            module = importlib.import_module(f"transformers.models.{t}.modeling_{t}")
            assert torch.equal(module.rotate_half(x), want), t
    for t in sorted(rope_mod._PARTIAL_MODEL_TYPES):  # these read the factor in their own code
        module = importlib.import_module(f"transformers.models.{t}.modeling_{t}")
        assert "partial_rotary_factor" in inspect.getsource(module), t
