"""``leyline eval consistency``: how much AMORTIZE changes outputs, next to FORGET and a fresh
prefill, on a model with real weights (default SmolLM2-135M; ``tiny-llama`` for tests).

Per edit case (a pair of consecutive requests: ``before``, then ``after`` = an edited history
plus a new turn):

1. an in-process engine serves ``before`` then ``after`` through HTTP in an AMORTIZE session
   (directives, content reuse on unless ``content_reuse=False``), and in a second session with
   FORGET for the edited messages (content reuse off: exact); ``max_tokens=1`` so each
   session's cached sequence is exactly the ``after`` prompt;
2. a fresh prefill of the ``after`` prompt (the model's own forward, no pool, no cache
   reuse) gives the greedy continuation ``g`` of ``k`` tokens and its logits;
3. each session's cached KV (read from ``engine.sessions`` / ``engine.tree`` under
   ``engine.lock``) is driven with the engine's ``Generation`` over the last prompt token and
   ``g[:k-1]`` (teacher forcing), giving ``k`` logits rows per variant.

Metrics: first-token agreement (argmax at position 0 equals ``g[0]``), per-token KL(fresh ||
variant) over the ``k`` positions, and the first position whose argmax leaves ``g`` (the first
divergence of free-running greedy decoding). FORGET must match the fresh prefill to rounding;
AMORTIZE is measured, not asserted.

Edit cases come from the replay workload (request ``t-1`` -> ``t``, turns 2..) and, optionally,
from a trajectories JSON file: a list (or ``{"trajectories": [...]}``) of trajectories, each a
list of requests' message lists (or ``{"requests": [...]}``); consecutive requests where the
later one does not extend the earlier one become cases, with FORGET on the changed messages.

With ``windows`` (``--windows 0,16,...,full``) the run is the REPAIR sweep instead
(:mod:`leyline.evals.frontier`): agreement with FORGET per recompute window, plus ``answers``
cases whose answer is checkable.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from leyline.client import LeylineClient
from leyline.evals.workload import WorkloadConfig, build_workload
from leyline.session import Session

__all__ = [
    "CaseRecord",
    "ConsistencyConfig",
    "ConsistencyResult",
    "EditCase",
    "edit_cases",
    "load_trajectory_cases",
    "run_consistency",
    "workload_cases",
]


def _default_workload() -> WorkloadConfig:
    return WorkloadConfig(seed=0, scale=0.05, conversations=4, turns=3)


@dataclass(frozen=True, slots=True)
class ConsistencyConfig:
    """One ``leyline eval consistency`` run (the CLI's defaults come from here)."""

    workload: WorkloadConfig = field(default_factory=_default_workload)
    model: str = "smollm2"
    device: str = "cpu"
    dtype: str = "float32"
    k: int = 32
    cases: int = 8
    trajectories: str | None = None
    content_reuse: bool = True
    kv_tokens: int | None = None
    progress: bool = True
    windows: tuple[int, ...] = ()  # REPAIR windows to sweep (frontier); 0 (AMORTIZE) is added
    answers: int = 0  # answer cases (frontier only)

    def __post_init__(self) -> None:
        from leyline.directives import MAX_WINDOW

        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if any(isinstance(w, bool) or not 0 <= w <= MAX_WINDOW for w in self.windows):
            raise ValueError(f"windows must be 0..{MAX_WINDOW} tokens, got {self.windows}")
        if self.windows:
            object.__setattr__(self, "windows", tuple(sorted({0, *self.windows})))
        if self.answers < 0 or (self.answers and not self.windows):
            raise ValueError("answers (>= 0) are answer cases of the windows sweep")
        if self.cases < 1:
            raise ValueError(f"cases must be >= 1, got {self.cases}")
        if self.kv_tokens is not None and self.kv_tokens < 64:
            raise ValueError(f"kv_tokens must be >= 64, got {self.kv_tokens}")
        if self.trajectories is not None and not Path(self.trajectories).is_file():
            raise ValueError(f"trajectories file not found: {self.trajectories}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EditCase:
    """Two consecutive requests of one conversation; ``forget`` indexes ``after``'s messages."""

    source: str
    label: str
    before: tuple[dict[str, Any], ...]
    after: tuple[dict[str, Any], ...]
    forget: tuple[int, ...]
    edit: str | None = None
    answer: str | None = None  # the expected answer (answer cases)


@dataclass
class CaseRecord:
    """One case's measurements (a row of ``results.json``'s ``records``)."""

    source: str
    label: str
    edit: str | None
    prompt_tokens: int
    amortize_tokens: dict[str, int]
    forget_tokens: dict[str, int]
    amortize_directives: list[str]
    greedy_text: str
    amortize_first_token_agree: bool
    amortize_kl: list[float]
    amortize_first_divergence: int | None
    forget_first_token_agree: bool
    forget_kl: list[float]
    forget_first_divergence: int | None


@dataclass
class ConsistencyResult:
    config: ConsistencyConfig
    cases: list[CaseRecord]
    metrics: dict[str, Any]


# ---------------------------------------------------------------------- cases
def workload_cases(cfg: WorkloadConfig, limit: int) -> list[EditCase]:
    """Edit cases from the replay workload, earliest turns first (shortest prompts)."""
    convs = build_workload(cfg)
    out: list[EditCase] = []
    for t in range(2, cfg.turns + 1):
        for conv in convs:
            before, after = conv.requests[t - 2], conv.requests[t - 1]
            out.append(
                EditCase(
                    source="replay",
                    label=f"conv{conv.index}-turn{t}",
                    before=before.messages,
                    after=after.messages,
                    forget=after.forget,
                    edit=after.edit.kind if after.edit else None,
                )
            )
    return out[:limit]


def _trajectories(data: Any) -> Iterator[list[list[dict[str, Any]]]]:
    items = data.get("trajectories", []) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ValueError("a trajectories file holds a list of trajectories")
    for item in items:
        requests = item.get("requests") if isinstance(item, dict) else item
        if not isinstance(requests, list) or not all(isinstance(r, list) for r in requests):
            raise ValueError("each trajectory is a list of requests' message lists")
        yield requests


def load_trajectory_cases(path: str | Path, limit: int) -> list[EditCase]:
    """Edit cases from a trajectories JSON file (see the module docstring for the format)."""
    data = json.loads(Path(path).read_text())
    out: list[EditCase] = []
    for n, requests in enumerate(_trajectories(data)):
        for i in range(1, len(requests)):
            before, after = requests[i - 1], requests[i]
            if after[: len(before)] == before:
                continue  # a pure append: nothing was edited
            changed = tuple(
                j for j in range(len(after)) if j >= len(before) or after[j] != before[j]
            )
            out.append(
                EditCase(
                    source="trajectory",
                    label=f"traj{n}-step{i}",
                    before=tuple(before),
                    after=tuple(after),
                    forget=changed,
                )
            )
    return out[:limit]


# ---------------------------------------------------------------------- logits
def _fresh_greedy(loaded: Any, ids: Any, k: int) -> tuple[Any, Any]:
    """Greedy continuation of ``ids`` by the model alone (fresh prefill, its own cache):
    ``(tokens (k,), fp32 logits (k, vocab))``."""
    import torch
    from transformers import DynamicCache

    model = loaded.model
    cache = DynamicCache(config=model.config)
    dev = loaded.device
    rows = []
    tokens = []
    with torch.inference_mode():
        feed = torch.as_tensor(ids, dtype=torch.int64, device=dev)[None]
        for step in range(k):
            out = model(input_ids=feed, cache=cache, use_cache=True, logits_to_keep=1)
            row = out.logits[0, -1].float()
            rows.append(row)
            tokens.append(int(torch.argmax(row)))
            if step < k - 1:
                feed = torch.tensor([[tokens[-1]]], dtype=torch.int64, device=dev)
    return torch.tensor(tokens, dtype=torch.int64), torch.stack(rows)


def _session_cache(engine: Any, session_id: str) -> tuple[Any, Any]:
    """(token ids, slots) of the session's cached sequence; call under ``engine.lock``."""
    state = engine.sessions.get(session_id)
    if state.node is None:
        raise RuntimeError(f"session {session_id} lost its cache (evicted); raise kv_tokens")
    ids = engine.tree.path_tokens(state.node)
    if len(ids) != len(state.tokens):
        raise RuntimeError("the session's cached sequence is incomplete (partly evicted)")
    return ids, engine.tree.path_slots(state.node)


def _scratch(engine: Any, n: int) -> Any:
    """``n`` free slots for fed tokens (evicting unlocked cached KV if the pool is full); call
    under ``engine.lock`` and free them with ``engine.store.free``."""
    if engine.store.num_free < n:
        engine.tree.evict(n - engine.store.num_free)
    return engine.store.alloc(n)


def _session_prompt(engine: Any, session_id: str) -> Any:
    with engine.lock:
        return _session_cache(engine, session_id)[0]


@contextmanager
def _over_session(engine: Any, session_id: str, fed: int) -> Iterator[tuple[Any, Any, Any]]:
    """Under the engine lock: the session's cached prompt ids, a ``Generation`` over the KV of
    all but its last prompt token, and ``fed`` scratch slots for the tokens fed from there on
    (freed on exit, so the cache is left as it was)."""
    import numpy as np
    import torch

    from leyline.server.engine.forward import Generation

    with engine.lock:
        ids, slots = _session_cache(engine, session_id)
        scratch = _scratch(engine, fed)
        try:
            cached = torch.from_numpy(np.ascontiguousarray(slots[: len(ids) - 1]))
            yield ids, Generation(engine.loaded, engine.store, cached_slots=cached), scratch
        finally:
            engine.store.free(scratch)


def _session_logits(engine: Any, session_id: str, greedy: Any) -> tuple[Any, Any]:
    """Prompt ids of the session's cached sequence and the logits of its last prompt token and
    ``greedy[:-1]`` computed over the session's cached KV (teacher forcing)."""
    import torch

    k = int(greedy.numel())
    with _over_session(engine, session_id, k) as (ids, gen, scratch):
        n = len(ids)
        feed = torch.cat([torch.from_numpy(ids[n - 1 :]), greedy[: k - 1].cpu()])
        logits = gen.extend(feed, torch.arange(n - 1, n - 1 + k), torch.from_numpy(scratch))
    return ids, logits.float()


def _compare(ref: Any, var: Any, greedy: Any) -> tuple[bool, list[float], int | None]:
    import torch

    logp_ref = torch.log_softmax(ref.double(), dim=-1)
    logp_var = torch.log_softmax(var.double().to(ref.device), dim=-1)
    kl = (logp_ref.exp() * (logp_ref - logp_var)).sum(-1).clamp_min(0.0)
    picks = torch.argmax(var, dim=-1).cpu()
    mismatch = (picks != greedy.cpu()).nonzero()
    first = int(mismatch[0, 0]) if mismatch.numel() else None
    return bool(picks[0] == greedy[0]), [float(x) for x in kl.cpu()], first


# ---------------------------------------------------------------------- run
def _serve_pair(
    client: LeylineClient, model: str, case: EditCase, *, forget: bool, content_reuse: bool
) -> tuple[Session, dict[str, Any]]:
    session = Session(f"consistency-{uuid.uuid4().hex[:16]}", content_reuse=content_reuse)
    client.chat(session, list(case.before), model=model, max_tokens=1, temperature=0)
    result = client.chat(
        session,
        list(case.after),
        model=model,
        max_tokens=1,
        temperature=0,
        forget=case.forget if forget else (),
    )
    return session, result.body


def _kv_tokens(cases: Sequence[EditCase]) -> int:
    chars = max(sum(len(str(m.get("content") or "")) for m in c.after) for c in cases)
    # NOTE: >= 2.5 characters per token on this text; two versions live at once, plus scratch
    return max(8192, int(chars / 2.5 * 4))


def _summary(cases: Sequence[CaseRecord], variant: str, k: int) -> dict[str, Any]:
    if not cases:
        return {
            "cases": 0,
            "first_token_agreement": None,
            "mean_kl": None,
            "median_kl": None,
            "max_kl": None,
            "no_divergence": None,
            "median_first_divergence": None,
        }
    means = sorted(sum(getattr(c, f"{variant}_kl")) / k for c in cases)
    divs = sorted(d for c in cases if (d := getattr(c, f"{variant}_first_divergence")) is not None)
    return {
        "cases": len(cases),
        "first_token_agreement": sum(getattr(c, f"{variant}_first_token_agree") for c in cases)
        / len(cases),
        "mean_kl": sum(means) / len(means),
        "median_kl": means[len(means) // 2],
        "max_kl": max(max(getattr(c, f"{variant}_kl")) for c in cases),
        "no_divergence": (len(cases) - len(divs)) / len(cases),
        "median_first_divergence": divs[len(divs) // 2] if divs else None,
    }


def edit_cases(cfg: ConsistencyConfig) -> list[EditCase]:
    """The run's cases: workload, then trajectories, then answer cases."""
    cases = workload_cases(cfg.workload, cfg.cases)
    if cfg.trajectories:
        cases += load_trajectory_cases(cfg.trajectories, cfg.cases)
    if cfg.answers:
        from leyline.evals.frontier import answer_cases

        cases += answer_cases(cfg.answers)
    if not cases:
        raise ValueError("no edit cases: the workload needs turns >= 2 (or give trajectories)")
    return cases


def run_consistency(cfg: ConsistencyConfig) -> ConsistencyResult:
    """Measure every case (see the module docstring)."""
    from leyline.evals._server import local_server

    cases = edit_cases(cfg)
    records: list[CaseRecord] = []
    kv = cfg.kv_tokens or _kv_tokens(cases)
    with local_server(model=cfg.model, device=cfg.device, dtype=cfg.dtype, kv_tokens=kv) as srv:
        engine = srv.engine
        bar: Any = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(cases), desc="consistency", unit="case")
        with LeylineClient(srv.base_url, timeout=3600) as client:
            for case in cases:
                amortize, a_body = _serve_pair(
                    client, srv.model, case, forget=False, content_reuse=cfg.content_reuse
                )
                ids = _session_prompt(engine, amortize.id)
                with engine.lock:  # the worker is idle; keep it off the model meanwhile
                    greedy, ref = _fresh_greedy(engine.loaded, ids, cfg.k)
                _, a_logits = _session_logits(engine, amortize.id, greedy)
                client.close_session(amortize)
                forget, f_body = _serve_pair(
                    client, srv.model, case, forget=True, content_reuse=False
                )
                f_ids, f_logits = _session_logits(engine, forget.id, greedy)
                client.close_session(forget)
                if not (len(f_ids) == len(ids) and (f_ids == ids).all()):
                    raise RuntimeError(
                        f"case {case.label}: the two sessions cached different prompts"
                    )
                a_agree, a_kl, a_div = _compare(ref, a_logits, greedy)
                f_agree, f_kl, f_div = _compare(ref, f_logits, greedy)
                a_ley = a_body.get("leyline") or {}
                records.append(
                    CaseRecord(
                        source=case.source,
                        label=case.label,
                        edit=case.edit,
                        prompt_tokens=len(ids),
                        amortize_tokens=dict(a_ley.get("tokens") or {}),
                        forget_tokens=dict((f_body.get("leyline") or {}).get("tokens") or {}),
                        amortize_directives=[
                            str(d.get("status")) for d in a_ley.get("directives") or ()
                        ],
                        greedy_text=engine.loaded.tokenizer.decode(greedy.tolist()),
                        amortize_first_token_agree=a_agree,
                        amortize_kl=a_kl,
                        amortize_first_divergence=a_div,
                        forget_first_token_agree=f_agree,
                        forget_kl=f_kl,
                        forget_first_divergence=f_div,
                    )
                )
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
    spliced = [r for r in records if r.amortize_tokens.get("spliced", 0) > 0]
    metrics: dict[str, Any] = {
        "amortize": _summary(records, "amortize", cfg.k),
        "forget": _summary(records, "forget", cfg.k),
        "amortize (spliced cases only)": _summary(spliced, "amortize", cfg.k),
        "k": cfg.k,
    }
    if any(math.isnan(x) for r in records for x in r.amortize_kl + r.forget_kl):
        metrics["warning"] = "NaN in KL: the model produced non-finite logits"
    return ConsistencyResult(config=cfg, cases=records, metrics=metrics)
