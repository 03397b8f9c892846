"""Session-scoped models for the embedded engine's tests (loaded once per test run)."""

from __future__ import annotations

import pytest

from leyline.server.engine.model import LoadedModel, load_model


@pytest.fixture(scope="session")
def tiny_llama() -> LoadedModel:
    """Seeded random 3-layer GQA Llama with the SmolLM2 tokenizer (fp32, CPU)."""
    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_deepseek() -> LoadedModel:
    """Seeded random 3-layer DeepSeek-V3 (MLA) with the SmolLM2 tokenizer (fp32, CPU)."""
    return load_model("tiny-deepseek")


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """SmolLM2-135M-Instruct (fp32, CPU); the first run converts the GGUF file (~1 min)."""
    return load_model("smollm2")
