"""``leyline eval consistency --windows ...``: the REPAIR frontier, agreement with FORGET
against the recompute window ``k``, on a model with real weights.

Per edit case (``before``, then ``after`` = an edited history plus a new turn):

1. one session per window ``k`` (ascending; ``k = 0`` is plain AMORTIZE) serves ``before``
   then ``after`` with every edit in REPAIR mode and ``window = k``, and keeps its KV;
2. the reference: a FORGET session serves the same two requests (exact: the edit and
   everything after it re-prefilled; the windows the variants computed are exact KV too, so
   it reuses them as exact-prefix hits) and its KV decodes ``n`` greedy tokens ``g``
   (``ConsistencyConfig.k``) with their logits;
3. each variant's KV is driven over ``g`` (teacher forcing) for per-token KL(FORGET ||
   variant), first-token agreement and the first divergence (none within ``n``: its greedy
   reply equals FORGET's); a diverging variant's own greedy reply is decoded for the answer
   check.

``full`` (a window past the whole suffix) plans exactly what FORGET plans (every token after
the edit recomputed, no copy; tests/server/engine/test_repair.py checks it against the model's
own forward), so the FORGET row is the frontier's ``full`` point. A ``full`` given in
``windows`` is served before the reference, which then reuses all of its (exact) KV: a
consistency check, not an independent measurement.

Cost of a window: ``suffix`` is what AMORTIZE copies (spliced + chunk-reused tokens) in that
case, the most a window can recompute; a window's cost is the part of it the variant did not
copy (``suffix`` minus its own spliced + chunk-reused tokens). The variants of one case share
the engine, so a window computed by a smaller ``k`` is an exact-prefix hit for the next (the
same KV: windows are anchored at the edit point, so a standalone run of ``k`` computes the
same tokens); the response's ``repaired`` count is therefore not the cost, the copies are.

Answer cases (:func:`answer_cases`): agent histories whose tool output states a fact; the
edit removes an earlier failed tool call (before the fact), and the new turn asks for the
fact. A reply is correct when it contains the expected answer.
"""

from __future__ import annotations

import statistics
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from leyline.client import LeylineClient
from leyline.directives import MAX_WINDOW, Mode
from leyline.session import Session

__all__ = [
    "FULL",
    "CaseSweep",
    "SweepResult",
    "VariantRecord",
    "answer_cases",
    "plot_frontier",
    "run_sweep",
    "window_label",
    "write_sweep_report",
]

#: The ``full`` window: longer than any suffix, so the whole suffix is recomputed.
FULL = MAX_WINDOW


def window_label(window: int) -> str:
    return "full" if window >= FULL else str(window)


@dataclass
class VariantRecord:
    """One window's measurements on one case."""

    window: int
    tokens: dict[str, int]
    window_tokens: int
    first_token_agree: bool
    kl: list[float]
    first_divergence: int | None
    reply: str
    answer_correct: bool | None


@dataclass
class CaseSweep:
    """One case: the FORGET reference and every window's variant."""

    source: str
    label: str
    edit: str | None
    answer: str | None
    prompt_tokens: int
    suffix_tokens: int
    forget_tokens: dict[str, int]
    forget_reply: str
    forget_answer_correct: bool | None
    variants: list[VariantRecord] = field(default_factory=list)


@dataclass
class SweepResult:
    config: Any  # ConsistencyConfig
    cases: list[CaseSweep]
    metrics: dict[str, Any]


# ---------------------------------------------------------------------- answer cases
_FACTS = (
    ("run_tests", "How many tests failed in the test run? Answer with the number only.",
     "51", "Summary: 51 tests failed, 1,204 passed, 3 skipped."),
    ("read_config", "Which port does the staging server listen on? Answer with the number only.",
     "8443", "staging.listen_port = 8443   # the staging server listens here"),
    ("git_log", "Which commit introduced the regression? Answer with the commit hash only.",
     "a91f3c7", "Bisect result: commit a91f3c7 introduced the regression."),
    ("profile", "Which function is the slowest? Answer with the function name only.",
     "parse_header", "Slowest function: parse_header (412 ms per call)."),
)  # fmt: skip


def _log(tool: str, seed: int, lines: int) -> str:
    """Deterministic, realistic-looking tool output filler."""
    out = []
    for i in range(lines):
        v = (i * 37 + seed * 11) % 97
        out.append(f"[{tool}] step {i:03d}: checked module_{v:02d}.py in {v % 13}.{v % 7} ms, ok")
    return "\n".join(out)


def answer_cases(limit: int, *, lines: int = 48) -> list[Any]:
    """Edit cases whose answer is checkable: a fact in a tool output that stays after the edit
    (which deletes an earlier failed call and its error), asked about in the new turn."""
    from leyline.evals.consistency import EditCase

    out = []
    for n, (tool, question, answer, fact) in enumerate(_FACTS[:limit]):
        body = _log(tool, n, lines // 2) + f"\n{fact}\n" + _log(tool, n + 1, lines // 2)
        head: list[dict[str, Any]] = [
            {"role": "system", "content": "You are a software agent. You call tools and answer "
             "the user's questions from the tool outputs."},
            {"role": "user", "content": f"Investigate the project with the {tool} tool and "
             "report what you find."},
        ]  # fmt: skip
        failed = [
            {"role": "assistant", "content": f"Calling {tool} --verbose."},
            {"role": "user", "content": f"Tool output ({tool}):\nError: unknown flag --verbose\n"
             + _log("usage", n, lines // 3)},
        ]  # fmt: skip
        good = [
            {"role": "assistant", "content": f"Calling {tool}."},
            {"role": "user", "content": f"Tool output ({tool}):\n{body}"},
            {"role": "assistant", "content": "I have the output."},
        ]
        before = (*head, *failed, *good, {"role": "user", "content": "Summarize it briefly."})
        after = (*head, *good, {"role": "user", "content": question})
        out.append(
            EditCase(
                source="answer",
                label=f"answer-{tool}",
                before=tuple(before),
                after=tuple(after),
                forget=(),
                edit="drop_failed_call",
                answer=answer,
            )
        )
    return out


# ---------------------------------------------------------------------- serving
def _serve(
    client: LeylineClient,
    model: str,
    case: Any,
    mode: Mode,
    *,
    window: int | None = None,
    content_reuse: bool = True,
) -> tuple[Session, dict[str, Any]]:
    """A new session serving ``before`` then ``after`` with every edit in ``mode``."""
    session = Session(f"frontier-{uuid.uuid4().hex[:16]}", content_reuse=content_reuse)
    body: dict[str, Any] = {}
    for i, messages in enumerate((case.before, case.after)):
        prepared = session.prepare(list(messages), default_mode=mode, window=window if i else None)
        result = client.chat(
            None,
            list(messages),
            model=model,
            max_tokens=1,
            temperature=0,
            custom_params=prepared.to_payload().to_custom_params(),
        )
        session.commit(prepared)
        body = result.body
    return session, body


def _decode(engine: Any, session_id: str, n: int) -> tuple[Any, Any]:
    """Free-running greedy decoding of ``n`` tokens over the session's cached KV:
    ``(tokens (n,), fp32 logits (n, vocab))``; the cache is left as it was."""
    import torch

    from leyline.evals.consistency import _over_session

    with _over_session(engine, session_id, n) as (ids, gen, scratch):
        m = len(ids)
        feed, rows, tokens = torch.from_numpy(ids[m - 1 :]), [], []
        for step in range(n):
            row = gen.extend(
                feed, torch.tensor([m - 1 + step]), torch.from_numpy(scratch[step : step + 1])
            )[-1]
            rows.append(row.float())
            tokens.append(int(torch.argmax(row)))
            feed = torch.tensor([tokens[-1]])
    return torch.tensor(tokens, dtype=torch.int64), torch.stack(rows)


def _correct(answer: str | None, reply: str) -> bool | None:
    return None if answer is None else answer.lower() in reply.lower()


def _tokens(body: dict[str, Any]) -> dict[str, int]:
    return dict((body.get("leyline") or {}).get("tokens") or {})


def _sweep_case(
    engine: Any, client: LeylineClient, model: str, case: Any, cfg: Any, bar: Any
) -> CaseSweep:
    from leyline.evals.consistency import _compare, _session_logits, _session_prompt

    tok = engine.loaded.tokenizer
    served: list[tuple[int, Session, dict[str, int]]] = []
    try:
        for window in cfg.windows:
            mode = Mode.AMORTIZE if window == 0 else Mode.REPAIR
            session, body = _serve(
                client, model, case, mode, window=window or None, content_reuse=cfg.content_reuse
            )
            served.append((window, session, _tokens(body)))
            if bar is not None:
                bar.update(0.5)
        forget, f_body = _serve(client, model, case, Mode.FORGET, content_reuse=False)
        ids = _session_prompt(engine, forget.id)
        greedy, ref = _decode(engine, forget.id, cfg.k)
        client.close_session(forget)
        f_tokens = _tokens(f_body)
        if f_tokens.get("spliced", 0) or f_tokens.get("chunk_reused", 0):
            raise RuntimeError(f"case {case.label}: the FORGET reference reused approximate KV")
        forget_reply = tok.decode(greedy.tolist())
        suffix = served[0][2].get("spliced", 0) + served[0][2].get("chunk_reused", 0)
        record = CaseSweep(
            source=case.source,
            label=case.label,
            edit=case.edit,
            answer=case.answer,
            prompt_tokens=len(ids),
            suffix_tokens=suffix,
            forget_tokens=f_tokens,
            forget_reply=forget_reply,
            forget_answer_correct=_correct(case.answer, forget_reply),
        )
        for window, session, t in served:
            v_ids, logits = _session_logits(engine, session.id, greedy)
            if not (len(v_ids) == len(ids) and (v_ids == ids).all()):
                raise RuntimeError(f"case {case.label}: window {window} cached another prompt")
            agree, kl, div = _compare(ref, logits, greedy)
            reply = forget_reply
            if div is not None:
                reply = tok.decode(_decode(engine, session.id, cfg.k)[0].tolist())
            record.variants.append(
                VariantRecord(
                    window=window,
                    tokens=t,
                    window_tokens=suffix - t.get("spliced", 0) - t.get("chunk_reused", 0),
                    first_token_agree=agree,
                    kl=kl,
                    first_divergence=div,
                    reply=reply,
                    answer_correct=_correct(case.answer, reply),
                )
            )
            if bar is not None:
                bar.update(0.5)
    finally:
        for _, session, _ in served:
            client.close_session(session)
    return record


def _median(xs: Sequence[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def _summaries(cases: Sequence[CaseSweep], windows: Sequence[int], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, window in enumerate(windows):
        rows = [c.variants[i] for c in cases]
        divs = [r.first_divergence for r in rows if r.first_divergence is not None]
        fracs = [r.window_tokens / c.suffix_tokens for r, c in zip(rows, cases, strict=True)
                 if c.suffix_tokens]  # fmt: skip
        checked = [r.answer_correct for r in rows if r.answer_correct is not None]
        out[window_label(window)] = {
            "window": window,
            "cases": len(rows),
            "first_token_agreement": sum(r.first_token_agree for r in rows) / len(rows),
            "reply_agreement": sum(r.first_divergence is None for r in rows) / len(rows),
            "mean_kl": sum(sum(r.kl) / n for r in rows) / len(rows),
            "max_kl": max(max(r.kl) for r in rows),
            # a reply that never diverges counts as diverging after the last token (n)
            "median_first_divergence": _median(
                [float(n if r.first_divergence is None else r.first_divergence) for r in rows]
            ),
            "diverged": len(divs),
            "mean_window_tokens": sum(r.window_tokens for r in rows) / len(rows),
            "mean_window_fraction": sum(fracs) / len(fracs) if fracs else None,
            "max_window_fraction": max(fracs) if fracs else None,
            "answer_accuracy": sum(checked) / len(checked) if checked else None,
            "answer_cases": len(checked),
        }
    checked = [c.forget_answer_correct for c in cases if c.forget_answer_correct is not None]
    out["forget"] = {
        "answer_accuracy": sum(checked) / len(checked) if checked else None,
        "answer_cases": len(checked),
        "mean_suffix_tokens": sum(c.suffix_tokens for c in cases) / len(cases),
        "mean_prompt_tokens": sum(c.prompt_tokens for c in cases) / len(cases),
    }
    return out


def run_sweep(cfg: Any, cases: Sequence[Any]) -> SweepResult:
    """Measure every case at every window of ``cfg.windows`` (see the module docstring)."""
    from leyline.evals._server import local_server
    from leyline.evals.consistency import _kv_tokens

    # every window's session keeps its KV until the reference is decoded
    kv = cfg.kv_tokens or _kv_tokens(cases) * (len(cfg.windows) + 3) // 4
    records: list[CaseSweep] = []
    with local_server(model=cfg.model, device=cfg.device, dtype=cfg.dtype, kv_tokens=kv) as srv:
        bar: Any = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(cases) * len(cfg.windows), desc="repair sweep", unit="run")
        with LeylineClient(srv.base_url, timeout=3600) as client:
            for case in cases:
                if bar is not None:
                    bar.set_postfix_str(case.label)
                records.append(_sweep_case(srv.engine, client, srv.model, case, cfg, bar))
        if bar is not None:
            bar.close()
    metrics: dict[str, Any] = {
        "all": _summaries(records, cfg.windows, cfg.k),
        "k": cfg.k,
        "windows": list(cfg.windows),
    }
    for source in sorted({r.source for r in records}):
        metrics[source] = _summaries([r for r in records if r.source == source], cfg.windows,
                                     cfg.k)  # fmt: skip
    return SweepResult(config=cfg, cases=records, metrics=metrics)


# ---------------------------------------------------------------------- report
_DEFS = """\
- Reference: FORGET (the edit and everything after it re-prefilled: exact), its greedy reply of
  n tokens decoded from its own KV. Each window k serves the same edit in REPAIR mode
  (k = 0: AMORTIZE), from a cache that holds nothing of the reference.
- **first-token agree**: the variant's argmax at the first reply position equals FORGET's.
  **reply agree**: its greedy reply equals FORGET's over all n tokens (no divergence).
  **KL**: per position KL(FORGET || variant) in nats over FORGET's reply (teacher forcing); mean
  of each case's mean, and the largest value. **median first divergence**: first position
  whose argmax differs (n when none).
- **window tokens**: what the window recomputed where AMORTIZE copied (spliced or chunk-reused
  tokens after the edit); **/ suffix**: divided by the tokens AMORTIZE copies in that case.
- **answer accuracy**: answer cases whose greedy reply contains the fact asked for.
"""


def _table(summary: dict[str, Any]) -> str:
    from leyline.evals.report import fmt, markdown_table

    headers = ["k", "cases", "first-token agree", "reply agree", "mean KL", "max KL",
               "median first divergence", "window tokens", "window / suffix (mean, max)",
               "answer accuracy"]  # fmt: skip
    rows = []
    for label, m in summary.items():
        if label == "forget":
            continue
        answer = "-" if m["answer_accuracy"] is None else (
            f"{fmt(m['answer_accuracy'], 'pct')} of {m['answer_cases']}")  # fmt: skip
        rows.append([
            label, m["cases"], fmt(m["first_token_agreement"], "pct"),
            fmt(m["reply_agreement"], "pct"), fmt(m["mean_kl"], "sci"), fmt(m["max_kl"], "sci"),
            fmt(m["median_first_divergence"]), f"{m['mean_window_tokens']:.0f}",
            f"{fmt(m['mean_window_fraction'], 'pct')}, {fmt(m['max_window_fraction'], 'pct')}",
            answer,
        ])  # fmt: skip
    f = summary["forget"]
    answer = "-" if f["answer_accuracy"] is None else (
        f"{fmt(f['answer_accuracy'], 'pct')} of {f['answer_cases']}")  # fmt: skip
    rows.append(["full (FORGET)", "-", "(reference)", "(reference)", "-", "-", "-",
                 f"{f['mean_suffix_tokens']:.0f}", "100.0%", answer])  # fmt: skip
    return markdown_table(headers, rows)


def write_sweep_report(out: Path, result: SweepResult, *, command: str | None = None) -> list[Path]:
    """Write results.json, summary.md and frontier.png (agreement against recompute cost)."""
    from leyline.evals.report import environment, write_json

    out.mkdir(parents=True, exist_ok=True)
    cfg = result.config
    data = {
        "eval": "consistency-repair-sweep",
        "command": command,
        "config": cfg.to_dict(),
        "model": cfg.model,
        **environment(),
        "metrics": result.metrics,
        "records": [asdict(c) for c in result.cases],
    }
    paths = [write_json(out / "results.json", data)]
    n_cases = len(result.cases)
    text = [
        "# REPAIR frontier: agreement with FORGET against the recompute window k\n",
        f"Model `{cfg.model}` ({cfg.device}, {cfg.dtype}); n = {cfg.k} greedy tokens; "
        f"{n_cases} edit cases (workload seed {cfg.workload.seed}, scale {cfg.workload.scale}; "
        f"{sum(c.source == 'answer' for c in result.cases)} answer cases).\n",
    ]
    if command:
        text.append(f"Command: `{command}`\n")
    for name, summary in result.metrics.items():
        if isinstance(summary, dict):
            text += [f"## {name} cases\n", _table(summary)]
    text += ["\n", _DEFS]
    (out / "summary.md").write_text("\n".join(text))
    paths.append(out / "summary.md")

    paths.append(plot_frontier(out / "frontier.png", result.metrics, cfg.k))
    return paths


def plot_frontier(path: Path, metrics: dict[str, Any], n: int) -> Path:
    """Reply agreement against window cost, one line per case source, FORGET at (100%, 100%)
    (``metrics`` as in ``results.json``, so a committed run can be re-plotted)."""
    from leyline.evals.report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, summary in metrics.items():
        if not isinstance(summary, dict):
            continue
        pts = [(100 * m["mean_window_fraction"], 100 * m["reply_agreement"], label)
               for label, m in summary.items() if label != "forget"
               and m["mean_window_fraction"] is not None]  # fmt: skip
        pts.append((100.0, 100.0, "FORGET"))
        cases = next(iter(summary.values()))["cases"]
        ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o",
                label=f"{name} ({cases} cases)")  # fmt: skip
        if name == "all":
            for x, y, label in pts:
                ax.annotate(label if label == "FORGET" else f"k={label}", (x, y),
                            textcoords="offset points", xytext=(4, -10), fontsize="x-small")  # fmt: skip
    ax.axhline(95, color="grey", linestyle="--", linewidth=0.8)
    ax.axvline(10, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlim(-2, 102)
    ax.set_ylim(0, 102)
    ax.set_xlabel("window tokens / tokens AMORTIZE copies (%, mean over cases)")
    ax.set_ylabel(f"greedy reply == FORGET's over {n} tokens (%)")
    ax.set_title("REPAIR frontier (target: >= 95% at <= 10%, dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
