"""``leyline eval replay`` end to end against the real in-process engine (tiny-llama)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leyline.evals.cli import main
from leyline.evals.replay import ReplayConfig, default_kv_tokens, percentile, run_replay
from leyline.evals.workload import WorkloadConfig


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 99) == pytest.approx(1.99)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown arm"):
        ReplayConfig(arms=("exact", "splice"))
    with pytest.raises(ValueError):
        ReplayConfig(concurrency=(0,))
    with pytest.raises(ValueError):
        ReplayConfig(max_tokens=0)
    assert default_kv_tokens(WorkloadConfig(scale=1.0), 16) > 16 * 19_000


def test_replay_arms_against_the_engine(tmp_path: Path) -> None:
    out = tmp_path / "replay"
    code = main(
        [
            "replay",
            "--model",
            "tiny-llama",
            "--device",
            "cpu",
            "--scale",
            "0.05",
            "--conversations",
            "2",
            "--turns",
            "3",
            "--concurrency",
            "1,2",
            "--arms",
            "exact,amortize,forget",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    runs = {(r["arm"], r["concurrency"]): r["metrics"] for r in data["runs"]}
    assert len(runs) == 6 and len(data["records"]) == 6 * 2 * 3
    for c in (1, 2):
        exact, amortize, forget = (runs[(a, c)] for a in ("exact", "amortize", "forget"))
        # the same prompts reach the server in every arm
        assert exact["prompt_tokens"] == amortize["prompt_tokens"] == forget["prompt_tokens"]
        assert amortize["cache_hit"] > exact["cache_hit"]
        assert amortize["unchanged_reused"] > exact["unchanged_reused"]
        assert amortize["spliced"] > 0 and amortize["directives_applied"] >= 2 * 2
        assert amortize["directives_ignored"] == forget["directives_ignored"] == 0
        assert amortize["recomputed"] < forget["recomputed"]
        # FORGET recomputes from the edit on: exactly what exact-prefix matching keeps
        assert forget["spliced"] == forget["chunk_reused"] == 0
        assert forget["cached_tokens"] == exact["cached_tokens"]
        assert forget["directives_applied"] >= 2 * 2
        assert forget["first_token_agreement"] == 1.0
        assert 0.0 <= amortize["first_token_agreement"] <= 1.0
        assert exact["first_token_agreement"] == 1.0  # exact KV: same greedy token as FORGET
        assert 0 < amortize["ttft_p50_ms"] <= amortize["ttft_p99_ms"]
        assert amortize["ttft_server_p50_ms"] is not None and exact["ttft_server_p50_ms"] is None
    first_turns = [r for r in data["records"] if r["turn"] == 1]
    assert all(r["unchanged_tokens_est"] == 0 for r in first_turns)
    edited = [r for r in data["records"] if r["turn"] > 1]
    assert all(0 < r["new_tokens_est"] < r["prompt_tokens"] for r in edited)
    assert {r["edit"] for r in edited} <= {"delete", "replace_shorter", "replace_longer", "move"}
    assert "| amortize | 1 |" in (out / "summary.md").read_text()
    for name in ("cache_hit.png", "ttft_cdf.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_replay_against_an_endpoint_salts_each_arm() -> None:
    from _engine_server import running_server

    with running_server(model="tiny-llama") as srv:
        cfg = ReplayConfig(
            workload=WorkloadConfig(scale=0.03, conversations=1, turns=2),
            arms=("exact", "content"),
            concurrency=(1,),
            model=srv.model,
            endpoint=srv.base_url,
            warmup=False,
            progress=False,
        )
        result = run_replay(cfg)
        salts = [run["salt"] for run in result.runs]
        assert len(set(salts)) == 2 and all(salts)
        # the second arm shares nothing with the first: its first request has no system-prompt hit
        first = next(r for r in result.records if r.arm == "content" and r.turn == 1)
        assert first.cached_tokens < 16
        assert all(run["metrics"]["first_token_agreement"] is None for run in result.runs)
        with srv.engine.lock:
            assert len(srv.engine.sessions) == 0  # the eval closed its sessions


def test_agent_mix_labels_merge_and_server_measures(tmp_path: Path) -> None:
    """Two invocations against one server (as against SGLang's default radix cache and the
    Leyline backend): each labels its arms, the second merges the first's results.json; every
    run reports throughput and the server's KV occupancy."""
    from _engine_server import running_server

    common = ["--scale", "0.03", "--conversations", "2", "--turns", "6", "--mix", "agent"]
    common += ["--concurrency", "1", "--no-progress", "--no-warmup"]
    with running_server(model="tiny-llama") as srv:
        where = ["--endpoint", srv.base_url, "--model", srv.model]
        first, second = tmp_path / "radix", tmp_path / "merged"
        argv = ["replay", *where, *common, "--arms", "exact", "--label", "radix"]
        assert main([*argv, "--out", str(first)]) == 0
        arms = "amortize+content,repair,forget"
        argv = ["replay", *where, *common, "--arms", arms, "--label", "ley"]
        bad = main([*argv, "--merge-with", str(tmp_path / "missing.json"), "--out", str(second)])
        assert bad == 2
        merge = ["--merge-with", str(first / "results.json")]
        assert main([*argv, *merge, "--out", str(second)]) == 0
    data = json.loads((second / "results.json").read_text())
    runs = {r["arm"]: r["metrics"] for r in data["runs"]}
    assert list(runs) == ["exact@radix", "amortize+content@ley", "repair@ley", "forget@ley"]
    assert data["merged_from"] == [str(first / "results.json")]
    exact, leyline, repair, forget = runs.values()
    # salted texts (one server): the same edits on statistically equal prompts
    assert abs(leyline["prompt_tokens"] / exact["prompt_tokens"] - 1) < 0.1
    assert leyline["unchanged_reused"] > exact["unchanged_reused"]
    assert leyline["spliced"] > 0 and leyline["directives_applied"] > 0
    assert forget["spliced"] == forget["chunk_reused"] == 0 and forget["directives_ignored"] == 0
    assert repair["directives_applied"] > 0 and repair["directives_ignored"] == 0
    assert repair["recomputed"] > leyline["recomputed"]  # the windows after each edit
    for m in runs.values():
        assert m["requests"] == 12 and m["requests_per_s"] > 0 and m["prompt_tokens_per_s"] > 0
        assert 0 < m["kv_occupancy_peak"] <= 1 and m["kv_occupancy_mean"] <= m["kv_occupancy_peak"]
    kinds = {r["edit"] for r in data["records"] if r["turn"] > 1}
    assert kinds <= {"clear", "truncate", "drop_failed", "summarize", "reread"} and len(kinds) >= 4
    summary = (second / "summary.md").read_text()
    assert "| forget@ley | 1 |" in summary and "edit mix `agent`" in summary
    assert "Published" not in summary  # the published numbers are for the paper mix
    for name in ("cache_hit.png", "ttft_cdf.png", "ttft_vs_c.png"):
        assert (second / name).read_bytes()[:4] == b"\x89PNG"
