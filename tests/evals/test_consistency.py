"""``leyline eval consistency`` on the real engine (tiny-llama, fp32, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leyline.evals.cli import main
from leyline.evals.consistency import ConsistencyConfig, load_trajectory_cases, workload_cases
from leyline.evals.frontier import answer_cases
from leyline.evals.workload import WorkloadConfig


def _trajectory_file(tmp_path: Path) -> Path:
    system = {"role": "system", "content": "You debug Python programs.\n" * 12}
    task = {"role": "user", "content": "Fix the failing test in utils.py.\n" + "x = 1\n" * 40}
    out = {"role": "user", "content": "".join(f"line {i}: output of pdb\n" for i in range(60))}
    step1 = [system, task, {"role": "assistant", "content": "pdb utils.py"}, out]
    truncated = dict(out, content=out["content"][:200] + "\n[truncated]")
    step2 = [
        system,
        task,
        {"role": "assistant", "content": "pdb utils.py"},
        truncated,
        {"role": "assistant", "content": "eval"},
        {"role": "user", "content": "1 failed"},
    ]
    step0 = step1[:2]
    path = tmp_path / "traj.json"
    path.write_text(json.dumps({"trajectories": [{"requests": [step0, step1, step2]}]}))
    return path


def test_cases_from_workload_and_trajectories(tmp_path: Path) -> None:
    cases = workload_cases(WorkloadConfig(scale=0.05, conversations=3, turns=3), 4)
    assert [c.label for c in cases] == ["conv0-turn2", "conv1-turn2", "conv2-turn2", "conv0-turn3"]
    assert all(c.forget == (1,) and c.edit for c in cases)
    traj = load_trajectory_cases(_trajectory_file(tmp_path), 10)
    assert len(traj) == 1  # step0 -> step1 is a pure append, not an edit
    assert traj[0].forget == (3, 4, 5) and traj[0].source == "trajectory"
    with pytest.raises(ValueError, match="not found"):
        ConsistencyConfig(trajectories=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError):
        ConsistencyConfig(k=0)


def test_consistency_run_writes_report(tmp_path: Path) -> None:
    out = tmp_path / "cons"
    k = 6
    code = main(
        [
            "consistency",
            "--model",
            "tiny-llama",
            "--device",
            "cpu",
            "--scale",
            "0.03",
            "--conversations",
            "2",
            "--turns",
            "2",
            "--cases",
            "2",
            "--k",
            str(k),
            "--trajectories",
            str(_trajectory_file(tmp_path)),
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    records = data["records"]
    assert [r["source"] for r in records] == ["replay", "replay", "trajectory"]
    for r in records:
        assert len(r["amortize_kl"]) == len(r["forget_kl"]) == k
        # FORGET is exact: the same distributions as a fresh prefill, to fp32 rounding
        assert max(r["forget_kl"]) < 1e-6
        assert r["forget_first_token_agree"] and r["forget_first_divergence"] is None
        assert r["amortize_tokens"]["spliced"] > 0 and r["amortize_directives"]
        assert r["forget_tokens"]["spliced"] == 0
        assert all(x >= 0 for x in r["amortize_kl"])
        # the spliced suffix still saw the old span: AMORTIZE is measurably not exact
        assert max(r["amortize_kl"]) > 100 * max(max(r["forget_kl"]), 1e-12)
    m = data["metrics"]
    assert m["forget"]["first_token_agreement"] == 1.0 and m["forget"]["no_divergence"] == 1.0
    assert m["amortize"]["cases"] == 3
    for name in ("kl_hist.png", "first_divergence.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "| forget | 3 | 100.0% |" in (out / "summary.md").read_text()


def test_windows_config_and_answer_cases() -> None:
    cfg = ConsistencyConfig(windows=(64, 16, 16))
    assert cfg.windows == (0, 16, 64)  # AMORTIZE (0) is the baseline of every sweep
    with pytest.raises(ValueError, match="windows"):
        ConsistencyConfig(windows=(-1,))
    with pytest.raises(ValueError, match="answer cases"):
        ConsistencyConfig(answers=2)
    with pytest.raises(SystemExit):
        main(["consistency", "--windows", "16,lots"])
    cases = answer_cases(4)
    assert len({c.answer for c in cases}) == 4
    for c in cases:
        question = c.after[-1]["content"]
        fact_message = next(m for m in c.after if c.answer in str(m["content"]))
        # the fact stays after the edit, the edit (a failed call) comes before it, and the
        # question is the new turn
        assert c.answer not in question and fact_message in c.before
        assert len(c.before) > len(c.after) - 1 and "Error" not in str(c.after)


def test_repair_sweep_writes_the_frontier(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    argv = ["consistency", "--model", "tiny-llama", "--device", "cpu", "--scale", "0.03",
            "--conversations", "1", "--turns", "2", "--cases", "1", "--k", "4",
            "--windows", "16,full", "--answers", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    m = data["metrics"]["all"]
    assert list(m) == ["0", "16", "full", "forget"] and data["metrics"]["answer"]["0"]["cases"] == 1
    assert m["0"]["mean_window_tokens"] == 0 and 0 < m["16"]["mean_window_tokens"] <= 16
    # a window over the whole suffix recomputes what AMORTIZE copies and is exact
    assert m["full"]["mean_window_fraction"] == 1.0 and m["full"]["reply_agreement"] == 1.0
    assert m["full"]["max_kl"] < 1e-6 < m["0"]["max_kl"]
    for case in data["records"]:
        assert case["forget_tokens"]["spliced"] == 0 and case["suffix_tokens"] > 0
        for v in case["variants"]:
            t = v["tokens"]
            served = t["exact"] + t["spliced"] + t["chunk_reused"] + t["recomputed"]
            assert served == case["prompt_tokens"]
            assert len(v["kl"]) == 4 and (v["answer_correct"] is None) == (case["answer"] is None)
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "| full (FORGET) |" in (out / "summary.md").read_text()
