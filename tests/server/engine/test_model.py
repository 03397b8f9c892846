"""Model loading: built-in names, layouts, local directories, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config

from leyline.server.core.layout import KVLayout
from leyline.server.engine.model import BUILTIN_MODELS, LoadedModel, kv_layout, load_model


def test_tiny_llama_layout_and_metadata(tiny_llama: LoadedModel):
    assert tiny_llama.layout == KVLayout(
        kind="mha", num_layers=3, kv_heads=2, head_dim=16, v_head_dim=16, rope_offset=0, rope_dim=16
    )
    assert tiny_llama.tokenizer.convert_ids_to_tokens(list(tiny_llama.eos_ids)) == ["<|im_end|>"]
    assert tiny_llama.vocab_size == len(tiny_llama.tokenizer)
    assert tiny_llama.max_positions == 8192
    assert tiny_llama.model.config._attn_implementation == "sdpa"
    assert not tiny_llama.rope_interleaved
    assert (
        tiny_llama.tokenizer.chat_template and "<|im_start|>" in tiny_llama.tokenizer.chat_template
    )


def test_tiny_deepseek_is_mla(tiny_deepseek: LoadedModel):
    assert tiny_deepseek.layout == KVLayout(
        kind="mla", num_layers=3, kv_heads=1, head_dim=48, v_head_dim=0, rope_offset=32, rope_dim=16
    )
    assert tiny_deepseek.rope_interleaved
    assert tiny_deepseek.model.config.model_type == "deepseek_v3"
    assert tiny_deepseek.model.config.rope_parameters["rope_type"] == "yarn"


def test_tiny_models_are_seeded(tiny_llama: LoadedModel):
    state = torch.get_rng_state()
    again = load_model("tiny-llama")
    assert torch.equal(state, torch.get_rng_state())  # loading leaves the global RNG alone
    for (name, a), (_, b) in zip(
        tiny_llama.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_dtype_is_applied():
    loaded = load_model("tiny-deepseek", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_local_directory_loads_the_same_model(tiny_llama: LoadedModel, tmp_path: Path):
    tiny_llama.model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.layout == tiny_llama.layout
    ids = torch.tensor([[5, 900, 17, 4321, 2]])
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(ids).logits, tiny_llama.model(ids).logits)


def test_unknown_name_lists_builtins():
    with pytest.raises(ValueError) as info:
        load_model("no-such-model")
    for name in BUILTIN_MODELS:
        assert name in str(info.value)


def test_bad_dtype_and_unsupported_family():
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny-llama", dtype="int8")
    with pytest.raises(ValueError, match="not supported"):
        kv_layout(GPT2Config(n_layer=2, n_embd=32, n_head=2))


@pytest.mark.slow
def test_smollm2_checkpoint(smollm2: LoadedModel):
    assert smollm2.layout == KVLayout(
        kind="mha",
        num_layers=30,
        kv_heads=3,
        head_dim=64,
        v_head_dim=64,
        rope_offset=0,
        rope_dim=64,
    )
    assert smollm2.tokenizer.chat_template is not None
    assert "quantization_config" not in smollm2.model.config.to_dict()
    assert smollm2.tokenizer.convert_ids_to_tokens(list(smollm2.eos_ids)) == ["<|im_end|>"]
