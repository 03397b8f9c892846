"""Segment-wise chat tokenization with the SmolLM2 tokenizer and chat template."""

from __future__ import annotations

import copy
import itertools
import random

import numpy as np
import pytest
from transformers import PreTrainedTokenizerBase

from leyline.segments import split_content
from leyline.server.engine.model import LoadedModel
from leyline.server.engine.tokenize import PromptTokens, tokenize_chat

GENERATION_PROMPT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok(tiny_llama: LoadedModel) -> PreTrainedTokenizerBase:
    return tiny_llama.tokenizer


def _long_text(seed: int, lines: int = 60) -> str:
    rng = random.Random(seed)
    words = ["def", "return", "  x = 1", "\tindent", "naïve", "日本語", "foo_bar", "  ", "{}", "42"]
    out = []
    for _ in range(lines):
        out.append(" ".join(rng.choice(words) for _ in range(rng.randint(0, 9))))
    return "\n".join(out) + rng.choice(["", "\n", "\n\n", "  "])


def _segments(tokens: PromptTokens, message: int) -> list[list[int]]:
    return [
        tokens.ids[start:end].tolist()
        for (start, end), owner in zip(tokens.segment_spans, tokens.message_of_segment, strict=True)
        if owner == message
    ]


def _rendered(tok: PreTrainedTokenizerBase, messages: list[dict], **kwargs: object) -> str:
    text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    assert isinstance(text, str)
    return text


def test_identical_content_identical_ids_at_any_position(tok: PreTrainedTokenizerBase):
    shared = _long_text(1)
    short = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": shared},
    ]
    longer = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": _long_text(2, lines=23)},
        {"role": "assistant", "content": "ok  \n"},
        {"role": "user", "content": shared},
    ]
    a = tokenize_chat(tok, short)
    b = tokenize_chat(tok, longer)
    assert a.aligned and b.aligned
    assert len(_segments(a, 1)) > 1  # multi-piece content
    assert _segments(a, 1) == _segments(b, 3)
    assert _segments(a, 0) == _segments(b, 0)
    # The generation prompt is tokenized the same way too.
    assert a.ids[a.prompt_end :].tolist() == b.ids[b.prompt_end :].tolist()


def test_ids_decode_to_rendered_prompt_and_spans_partition(tok: PreTrainedTokenizerBase):
    gen_len = len(tok(GENERATION_PROMPT, add_special_tokens=False)["input_ids"])
    messages = [
        {"role": "user", "content": _long_text(3)},
        {"role": "assistant", "content": "Sure.\n\n"},
        {"role": "user", "content": "  leading spaces and trailing\n"},
    ]
    for add in (True, False):
        tokens = tokenize_chat(tok, messages, add_generation_prompt=add)
        text = _rendered(tok, messages, add_generation_prompt=add)
        decoded = tok.decode(tokens.ids.tolist(), clean_up_tokenization_spaces=False)
        assert decoded == text
        assert tokens.ids.dtype == np.int64
        spans = tokens.segment_spans
        assert spans[0][0] == 0
        assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(spans))
        assert spans[-1][1] == len(tokens.ids) - (gen_len if add else 0)
        assert list(tokens.message_of_segment) == sorted(tokens.message_of_segment)
        assert set(tokens.message_of_segment) == {0, 1, 2}


def test_multi_piece_message_segments_follow_the_pieces(tok: PreTrainedTokenizerBase):
    content = _long_text(4, lines=90)
    pieces = split_content(content)
    assert len(pieces) >= 3 and "".join(pieces) == content
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": content}]
    tokens = tokenize_chat(tok, messages)
    segments = _segments(tokens, 1)
    assert len(segments) == len(pieces)
    glue = "<|im_end|>\n<|im_start|>user\n"
    texts = [tok.decode(ids, clean_up_tokenization_spaces=False) for ids in segments]
    assert texts[0] == glue + pieces[0]
    assert texts[1:-1] == pieces[1:-1]
    assert texts[-1] == pieces[-1] + "<|im_end|>\n"  # trailing glue joins the last segment


def test_aligned_vs_whole_prompt_tokenization(tok: PreTrainedTokenizerBase):
    """Ids may differ from one-shot tokenization at piece boundaries; the text never does."""
    differing = 0
    trials = 12
    for seed in range(trials):
        messages = [
            {"role": "user", "content": _long_text(10 + seed, lines=40)},
            {"role": "assistant", "content": _long_text(50 + seed, lines=5)},
        ]
        tokens = tokenize_chat(tok, messages)
        plain = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        plain_ids = plain["input_ids"] if not isinstance(plain, list) else plain
        differing += tokens.ids.tolist() != list(plain_ids)
        assert tok.decode(tokens.ids.tolist(), clean_up_tokenization_spaces=False) == tok.decode(
            list(plain_ids), clean_up_tokenization_spaces=False
        )
    assert differing < trials  # boundaries split on newlines: most prompts tokenize identically
    simple = [{"role": "user", "content": "What is the capital of France?"}]
    plain = tok.apply_chat_template(simple, tokenize=True, add_generation_prompt=True)
    assert tokenize_chat(tok, simple).ids.tolist() == list(plain["input_ids"])


def test_tool_calls_tools_and_tool_messages_render(tok: PreTrainedTokenizerBase):
    tools = [{"type": "function", "function": {"name": "ls", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "user"},  # also occurs in the template glue
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "ls", "arguments": '{"p": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "a.py\nb.py"},
    ]
    tokens = tokenize_chat(tok, messages, tools=tools)
    assert tokens.aligned
    text = tok.decode(tokens.ids.tolist(), clean_up_tokenization_spaces=False)
    assert '<tool_call>\n{"name": "ls", "arguments": {"p": 1}}\n</tool_call>' in text
    assert '"name": "ls", "parameters"' in text and "<|im_start|>tool\na.py\nb.py" in text
    # SmolLM2's template ignores tools: without them the default system prompt is used.
    assert "SmolLM" not in text
    assert "SmolLM" in tok.decode(tokenize_chat(tok, messages).ids.tolist())
    # The user content was pinned to its own place, not to the role name in the glue.
    first = tok.decode(_segments(tokens, 0)[0], clean_up_tokenization_spaces=False)
    assert first.endswith("<|im_start|>user\nuser")
    assert tokens.message_of_segment == (0, 1, 2)


def test_tools_land_in_the_first_segment(tok: PreTrainedTokenizerBase):
    tools = [{"type": "function", "function": {"name": "grep", "parameters": {}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Find it."},
    ]
    with_tools = tokenize_chat(tok, messages, tools=tools)
    without = tokenize_chat(tok, messages)
    first = tok.decode(_segments(with_tools, 0)[0], clean_up_tokenization_spaces=False)
    assert '"name": "grep"' in first and first.endswith("</tool_call>\n\nBe brief.")
    assert _segments(with_tools, 1) == _segments(without, 1)  # later segments do not move


def test_content_parts_are_joined(tok: PreTrainedTokenizerBase):
    parts = [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]
    joined = tokenize_chat(tok, [{"role": "user", "content": parts}])
    plain = tokenize_chat(tok, [{"role": "user", "content": "line oneline two"}])
    assert joined.ids.tolist() == plain.ids.tolist()
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    with pytest.raises(ValueError, match="text content parts"):
        tokenize_chat(tok, [{"role": "user", "content": image}])
    with pytest.raises(ValueError, match="empty"):
        tokenize_chat(tok, [])


def test_rewriting_template_falls_back_unaligned(tok: PreTrainedTokenizerBase):
    rewriting = copy.deepcopy(tok)
    rewriting.chat_template = "{% for m in messages %}{{ m['content'] | upper }}\n{% endfor %}"
    tokens = tokenize_chat(rewriting, [{"role": "user", "content": "hello there"}])
    assert not tokens.aligned
    assert tokens.segment_spans == () and tokens.message_of_segment == ()
    assert rewriting.decode(tokens.ids.tolist()) == "HELLO THERE\n"


def test_prompt_tokens_validation():
    ids = np.arange(5, dtype=np.int64)
    with pytest.raises(ValueError, match="contiguous"):
        PromptTokens(ids, ((0, 2), (3, 5)), (0, 1), aligned=True)
    with pytest.raises(ValueError, match="int64"):
        PromptTokens(ids.astype(np.int32), (), (), aligned=False)
    with pytest.raises(ValueError, match="past the end"):
        PromptTokens(ids, ((0, 6),), (0,), aligned=True)
