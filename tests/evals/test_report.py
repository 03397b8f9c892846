"""Reports: JSON with environment facts, Markdown tables, and real PNG plots."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from leyline.evals.consistency import CaseRecord, ConsistencyConfig, ConsistencyResult
from leyline.evals.replay import ReplayConfig, ReplayResult, RequestRecord, arm_metrics
from leyline.evals.report import (
    bar_chart,
    cdf_chart,
    environment,
    histogram,
    markdown_table,
    write_consistency_report,
    write_json,
    write_replay_report,
)
from leyline.evals.workload import WorkloadConfig

PNG = b"\x89PNG\r\n\x1a\n"


def _png_ok(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 2000, path


def test_environment_lists_versions_and_machine() -> None:
    env = environment()
    assert env["versions"]["leyline"] and env["versions"]["torch"]
    assert env["versions"]["python"].count(".") == 2
    assert env["machine"]["cpu_count"] >= 1 and env["machine"]["platform"]


def test_markdown_table_and_json(tmp_path: Path) -> None:
    table = markdown_table(["a", "b"], [[1, "x"], [2.5, None]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 | None |"]
    path = write_json(tmp_path / "r.json", {"x": float("nan"), "y": [1.5, math.inf], "z": (1,)})
    assert json.loads(path.read_text()) == {"x": None, "y": [1.5, None], "z": [1]}


def test_plots_are_png(tmp_path: Path) -> None:
    rng = random.Random(0)
    _png_ok(
        bar_chart(
            tmp_path / "b.png",
            ["exact", "amortize", "forget"],
            {"C=1": [0.3, 0.8, None], "C=4": [0.29, 0.79, 0.3]},
            title="t",
            ylabel="%",
            percent=True,
        )
    )
    _png_ok(
        cdf_chart(
            tmp_path / "c.png",
            {"C=1": {"a": [rng.uniform(1, 90) for _ in range(37)], "b": []}},
            title="t",
            xlabel="ms",
            log_x=True,
        )
    )
    _png_ok(
        histogram(
            tmp_path / "h.png",
            {"a": [rng.gauss(0, 1) for _ in range(53)]},
            title="t",
            xlabel="x",
            bins=7,
        )
    )


def _record(arm: str, turn: int, cached: int, ttft: float) -> RequestRecord:
    return RequestRecord(
        arm=arm,
        concurrency=1,
        conversation=0,
        turn=turn,
        edit=None if turn == 1 else "move",
        prompt_tokens=100,
        cached_tokens=cached,
        exact=cached,
        spliced=0,
        chunk_reused=0,
        recomputed=100 - cached,
        new_tokens_est=100 if turn == 1 else 20,
        unchanged_tokens_est=0 if turn == 1 else 80,
        ttft_ms=ttft,
        ttft_server_ms=None,
        latency_ms=ttft + 3,
        first_text=" a" if arm == "forget" or turn == 2 else " b",
        text=" a b",
        directives_applied=0,
        directives_ignored=0,
    )


def test_arm_metrics_definitions() -> None:
    recs = [
        _record("amortize", 1, 10, 5.0),
        _record("amortize", 2, 90, 1.0),
        _record("amortize", 3, 50, 3.0),
    ]
    m = arm_metrics(recs)
    assert m["cache_hit"] == (10 + 90 + 50) / 300
    assert m["cache_hit_after_edit"] == (90 + 50) / 200
    assert m["unchanged_reused"] == (80 + 50) / 160  # min(cached, unchanged) per request
    assert m["ttft_p50_ms"] == 3.0 and m["ttft_edit_p50_ms"] == 2.0


def test_replay_report_files(tmp_path: Path) -> None:
    records = [
        _record(a, t, c, 10.0 * t)
        for a in ("exact", "forget")
        for t, c in ((1, 5), (2, 40), (3, 60))
    ]
    runs = [
        {"arm": a, "concurrency": 1, "metrics": arm_metrics([r for r in records if r.arm == a])}
        for a in ("exact", "forget")
    ]
    for run in runs:
        run["metrics"]["first_token_agreement"] = 0.5 if run["arm"] == "exact" else 1.0
    cfg = ReplayConfig(
        workload=WorkloadConfig(scale=0.05),
        arms=("exact", "forget"),
        concurrency=(1,),
        model="tiny-llama",
    )
    paths = write_replay_report(
        tmp_path / "out",
        ReplayResult(cfg, runs, records),
        command="leyline eval replay --scale 0.05",
    )
    names = sorted(p.name for p in paths)
    assert names == ["cache_hit.png", "results.json", "summary.md", "ttft_cdf.png", "ttft_vs_c.png"]
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["model"] == "tiny-llama" and data["seed"] == 0
    assert data["config"]["api_key"] == "***" and len(data["records"]) == 6
    assert data["versions"]["torch"] and "machine" in data
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| exact | 1 | 3 |" in summary and "50.0%" in summary
    assert "Published" in summary and "49.6%" in summary  # the paper mix: the paper beside it
    for name in ("cache_hit.png", "ttft_cdf.png", "ttft_vs_c.png"):
        _png_ok(tmp_path / "out" / name)


def test_consistency_report_files(tmp_path: Path) -> None:
    k = 5
    cases = [
        CaseRecord(
            source="replay",
            label=f"c{i}",
            edit="move",
            prompt_tokens=300,
            amortize_tokens={"spliced": 40},
            forget_tokens={"recomputed": 200},
            amortize_directives=["applied"],
            greedy_text="x",
            amortize_first_token_agree=i % 2 == 0,
            amortize_kl=[0.01 * (i + j) for j in range(k)],
            amortize_first_divergence=None if i % 2 == 0 else 2,
            forget_first_token_agree=True,
            forget_kl=[0.0] * k,
            forget_first_divergence=None,
        )
        for i in range(4)
    ]
    from leyline.evals.consistency import _summary

    metrics = {
        "amortize": _summary(cases, "amortize", k),
        "forget": _summary(cases, "forget", k),
        "k": k,
    }
    assert metrics["amortize"]["first_token_agreement"] == 0.5
    assert metrics["forget"]["no_divergence"] == 1.0
    cfg = ConsistencyConfig(model="tiny-llama", k=k)
    paths = write_consistency_report(tmp_path, ConsistencyResult(cfg, cases, metrics))
    assert sorted(p.name for p in paths) == [
        "first_divergence.png",
        "kl_hist.png",
        "results.json",
        "summary.md",
    ]
    _png_ok(tmp_path / "kl_hist.png")
    _png_ok(tmp_path / "first_divergence.png")
    assert "| amortize | 4 | 50.0% |" in (tmp_path / "summary.md").read_text()
