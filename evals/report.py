"""Eval reports: ``results.json``, ``summary.md`` and PNG plots (matplotlib, Agg backend).

Every eval writes into its ``--out`` directory:

- ``results.json``: the config, the software versions (leyline, torch, transformers, ...), the
  machine (platform, CPU count, GPU name), the model and seed, per-run metrics and the raw
  per-request (or per-case) records;
- ``summary.md``: a Markdown table of the metrics with their definitions;
- plots: ``cache_hit.png``, ``ttft_cdf.png`` and ``ttft_vs_c.png`` (replay), ``kl_hist.png`` and
  ``first_divergence.png`` (consistency).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leyline.evals.consistency import ConsistencyResult
    from leyline.evals.replay import ReplayResult

__all__ = [
    "bar_chart",
    "cdf_chart",
    "environment",
    "histogram",
    "markdown_table",
    "write_consistency_report",
    "write_json",
    "write_replay_report",
]

_PACKAGES = ("leyline", "torch", "transformers", "numpy", "httpx", "matplotlib", "triton")


def environment() -> dict[str, Any]:
    """Versions and machine facts for ``results.json`` (never imports torch if it is absent)."""
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    gpu = None
    if versions["torch"] is not None:
        import torch

        if torch.cuda.is_available():
            gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "versions": versions,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "gpu": gpu,
        },
    }


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (NaN/inf become null)."""
    path.write_text(json.dumps(_clean(data), indent=2, sort_keys=False) + "\n")
    return path


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def fmt(x: Any, kind: str = "") -> str:
    if x is None:
        return "-"
    if kind == "pct":
        return f"{100 * x:.1f}%"
    if kind == "ms":
        return f"{x:.1f}"
    if kind == "sci":
        return f"{x:.2e}"
    if isinstance(x, float):
        return f"{x:.3f}"
    return str(x)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table (cells converted with ``str``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def bar_chart(
    path: Path,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    title: str,
    ylabel: str,
    percent: bool = False,
) -> Path:
    """Grouped bars: one group per entry of ``groups``, one bar per series (None = no bar)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups) + 2), 4))
    width = 0.8 / max(1, len(series))
    for j, (label, values) in enumerate(series.items()):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ys = [(v if v is not None else 0.0) * (100 if percent else 1) for v in values]
        ax.bar(xs, ys, width=width, label=label)
    ax.set_xticks(range(len(groups)), groups, rotation=15)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cdf_chart(
    path: Path,
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    log_x: bool = False,
) -> Path:
    """Empirical CDFs: one subplot per panel, one line per series."""
    plt = _pyplot()
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.8), squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels.items(), strict=False):
        for label, values in series.items():
            xs = sorted(values)
            if not xs:
                continue
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=label)
        if log_x:
            ax.set_xscale("log")
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def line_chart(
    path: Path,
    xs: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
) -> Path:
    """One line per series over ``xs`` (None = a gap); dashed when the label ends in 'p99'."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, values in series.items():
        pts = [(x, y) for x, y in zip(xs, values, strict=True) if y is not None]
        if pts:
            style = "--" if label.endswith("p99") else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
    ax.set_xticks(list(xs), [str(x) for x in xs])
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def histogram(
    path: Path,
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    xlabel: str,
    bins: int | Sequence[float] = 20,
) -> Path:
    """Overlaid histograms, one per series."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, values in series.items():
        if len(values):
            ax.hist(list(values), bins=bins, alpha=0.55, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- replay
_REPLAY_DEFS = """\
- **cache-hit**: reused prompt tokens (exact + spliced + chunk-reused, i.e.
  `usage.prompt_tokens_details.cached_tokens`) / prompt tokens, all requests; **after edit**:
  requests 2..T only.
- **unchanged reused**: over requests 2..T, sum(min(cached, unchanged)) / sum(unchanged), where
  unchanged = prompt tokens - new tokens, new tokens = prompt tokens x (new content characters /
  all content characters); new content = the appended turn + the edit's inserted text (moved
  content counts as unchanged).
- **TTFT**: client-side, request sent -> first streamed content piece (ms); *edit* = requests
  2..T; *server* = the engine's `leyline.ttft_ms` (includes queueing).
- **agree**: first generated text piece equal to the FORGET arm's (greedy), requests 2..T.
- **req/s**, **prompt tok/s**: requests and prompt tokens served per second of the run's wall
  time (all client threads together, warm-up excluded).
- **KV peak**: the largest sampled KV pool occupancy during the run (SGLang: `/v1/loads`
  `num_used_tokens / max_total_num_tokens`; embedded engine: `/v1/leyline/stats`), sampled
  every 0.25 s; empty when the server does not report it.
"""

_PUBLISHED = """Published (the seed paper, SGLang, same workload shape, scale 1.0): cache-hit 49.6% with
SGLang's radix cache vs 60.8% with Leyline; p50 TTFT -241 ms at C=8, +45 ms at C=16.
"""


def write_replay_report(
    out: Path, result: ReplayResult, *, command: str | None = None
) -> list[Path]:
    """Write results.json, summary.md, cache_hit.png, ttft_cdf.png and ttft_vs_c.png; returns
    the paths."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = result.config
    data = {
        "eval": "replay",
        "command": command,
        "config": cfg.to_dict(),
        "model": cfg.model,
        "seed": cfg.workload.seed,
        **environment(),
        "runs": result.runs,
        "merged_from": result.merged_from,
        "records": [asdict(r) for r in result.records],
    }
    paths = [write_json(out / "results.json", data)]

    headers = [
        "arm",
        "C",
        "req",
        "prompt tok",
        "cache-hit",
        "after edit",
        "unchanged reused",
        "spliced",
        "chunk",
        "recomputed",
        "TTFT p50",
        "TTFT p99",
        "TTFT edit p50",
        "TTFT edit p99",
        "server TTFT p50",
        "latency p50",
        "req/s",
        "prompt tok/s",
        "KV peak",
        "agree",
    ]
    rows = []
    for run in result.runs:
        m = run["metrics"]
        rows.append(
            [
                run["arm"],
                run["concurrency"],
                m["requests"],
                m["prompt_tokens"],
                fmt(m["cache_hit"], "pct"),
                fmt(m["cache_hit_after_edit"], "pct"),
                fmt(m["unchanged_reused"], "pct"),
                m["spliced"],
                m["chunk_reused"],
                m["recomputed"],
                fmt(m["ttft_p50_ms"], "ms"),
                fmt(m["ttft_p99_ms"], "ms"),
                fmt(m["ttft_edit_p50_ms"], "ms"),
                fmt(m["ttft_edit_p99_ms"], "ms"),
                fmt(m["ttft_server_p50_ms"], "ms"),
                fmt(m["latency_p50_ms"], "ms"),
                fmt(m.get("requests_per_s")),
                fmt(m.get("prompt_tokens_per_s"), "ms"),
                fmt(m.get("kv_occupancy_peak"), "pct"),
                fmt(m["first_token_agreement"], "pct"),
            ]
        )
    w = cfg.workload
    target = cfg.endpoint or f"in-process leyline serve ({cfg.device}, fresh engine per run)"
    text = [
        "# Message-edit replay\n",
        f"Model `{cfg.model}` on {target}; workload seed {w.seed}, scale {w.scale}, "
        f"{w.conversations} conversations x {w.turns} turns, max_tokens {cfg.max_tokens}, "
        "greedy. Times in ms.\n",
    ]
    text[-1] = text[-1].replace("greedy.", f"greedy; edit mix `{w.mix}`.")
    if command:
        text.append(f"Command: `{command}`\n")
    if result.merged_from:
        text.append("Runs merged in first from: " + ", ".join(result.merged_from) + "\n")
    text += [markdown_table(headers, rows), "\n"]
    if w.mix == "paper":
        text.append(_PUBLISHED)
    text.append(_REPLAY_DEFS)
    (out / "summary.md").write_text("\n".join(text))
    paths.append(out / "summary.md")

    levels = sorted({run["concurrency"] for run in result.runs})
    arms = list(dict.fromkeys(run["arm"] for run in result.runs))
    by = {(run["arm"], run["concurrency"]): run["metrics"] for run in result.runs}
    series = {f"C={c}": [by.get((a, c), {}).get("cache_hit") for a in arms] for c in levels}
    series.update(
        {
            f"unchanged reused, C={c}": [by.get((a, c), {}).get("unchanged_reused") for a in arms]
            for c in levels
        }
    )
    paths.append(
        bar_chart(
            out / "cache_hit.png",
            arms,
            series,
            title="Prompt tokens served from cache",
            ylabel="%",
            percent=True,
        )
    )
    panels = {
        f"C={c}": {
            a: [
                r.ttft_ms
                for r in result.records
                if r.arm == a and r.concurrency == c and r.turn > 1
            ]
            for a in arms
        }
        for c in levels
    }
    paths.append(
        cdf_chart(
            out / "ttft_cdf.png",
            panels,
            title="TTFT after an edit (client-side)",
            xlabel="ms",
            log_x=True,
        )
    )
    ttft: dict[str, list[float | None]] = {}
    for a in arms:
        for q in ("p50", "p99"):
            ttft[f"{a} {q}"] = [by.get((a, c), {}).get(f"ttft_edit_{q}_ms") for c in levels]
    paths.append(
        line_chart(
            out / "ttft_vs_c.png",
            levels,
            ttft,
            title="TTFT after an edit vs client concurrency",
            xlabel="concurrency C",
            ylabel="ms",
            log_y=True,
        )
    )
    return paths


# ---------------------------------------------------------------------- consistency
_CONSISTENCY_DEFS = """\
- Each case: a conversation's request t-1 is served, then request t (after an edit of the
  history) is served with AMORTIZE (splice) in one session and FORGET (re-prefill from the
  edit) in another; the next k tokens are then computed from each session's cached KV and
  compared with a fresh prefill of request t (no cache) over the fresh prefill's greedy
  continuation (teacher forcing).
- **first-token agree**: the variant's argmax at the first generated position equals the fresh
  prefill's. **KL**: per position, KL(fresh || variant) in nats over the k positions; the table
  gives the mean over cases of each case's mean, and the largest per-position value.
- **first divergence**: first position whose argmax differs from the fresh greedy token
  (k = none within k tokens).
"""


def write_consistency_report(
    out: Path, result: ConsistencyResult, *, command: str | None = None
) -> list[Path]:
    """Write results.json, summary.md, kl_hist.png and first_divergence.png."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = result.config
    data = {
        "eval": "consistency",
        "command": command,
        "config": cfg.to_dict(),
        "model": cfg.model,
        "seed": cfg.workload.seed,
        **environment(),
        "metrics": result.metrics,
        "records": [asdict(c) for c in result.cases],
    }
    paths = [write_json(out / "results.json", data)]
    headers = [
        "variant",
        "cases",
        "first-token agree",
        "mean KL",
        "max KL",
        "no divergence in k",
        "median first divergence",
    ]
    rows = []
    for variant, m in result.metrics.items():
        if not isinstance(m, Mapping):
            continue
        rows.append(
            [
                variant,
                m["cases"],
                fmt(m["first_token_agreement"], "pct"),
                fmt(m["mean_kl"], "sci"),
                fmt(m["max_kl"], "sci"),
                fmt(m["no_divergence"], "pct"),
                fmt(m["median_first_divergence"]),
            ]
        )
    text = [
        "# Output consistency: AMORTIZE and FORGET vs a fresh prefill\n",
        f"Model `{cfg.model}` ({cfg.device}, {cfg.dtype}); k = {cfg.k} greedy tokens; "
        f"{len(result.cases)} edit cases (workload seed {cfg.workload.seed}, "
        f"scale {cfg.workload.scale}).\n",
    ]
    if command:
        text.append(f"Command: `{command}`\n")
    text += [markdown_table(headers, rows), "\n", _CONSISTENCY_DEFS]
    (out / "summary.md").write_text("\n".join(text))
    paths.append(out / "summary.md")

    floor = 1e-12  # NOTE: FORGET's KL is ~0 (fp32 rounding); log10 needs a floor
    kl = {
        v: [math.log10(max(x, floor)) for c in result.cases for x in getattr(c, f"{v}_kl")]
        for v in ("amortize", "forget")
    }
    paths.append(
        histogram(
            out / "kl_hist.png",
            kl,
            title="Per-token KL(fresh || variant)",
            xlabel="log10 KL (nats), floored at 1e-12",
        )
    )
    div = {
        v: [
            float(cfg.k if d is None else d)
            for d in (getattr(c, f"{v}_first_divergence") for c in result.cases)
        ]
        for v in ("amortize", "forget")
    }
    paths.append(
        histogram(
            out / "first_divergence.png",
            div,
            title=f"First divergence from the fresh greedy tokens (k={cfg.k}: none)",
            xlabel="generated token position",
            bins=[x - 0.5 for x in range(cfg.k + 2)],
        )
    )
    return paths
