"""`leyline eval debug-gym` end to end: the prepared 3.12 venv, scripted replays, a fresh engine
per policy arm, and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leyline.evals.cli import main
from leyline.evals.debug_gym_env import dataset_available


@pytest.mark.slow
def test_debug_gym_eval_report_against_the_engine(tmp_path: Path) -> None:
    if not dataset_available():
        pytest.skip("mini_nightmare data is not here (../shared/datasets or debug-gym's cache)")
    out = tmp_path / "dg"
    argv = [
        "debug-gym",
        "--llm",
        "scripted",
        "--serve",
        "tiny-llama",
        "--tasks",
        "purr,grader",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    keep, trunc = results["arms"]["keep_all"], results["arms"]["truncate"]
    assert keep["kind"] == "replay" and keep["solved"] == 2 and trunc["solved"] == 2
    # the engine answered every replayed prompt and reported its cache
    assert keep["cached_tokens_per_step"] > 0 and trunc["directives_per_step"] > 0
    assert trunc["spliced_per_step"] > 0
    assert trunc["prompt_tokens_per_step"] < keep["prompt_tokens_per_step"]
    assert "REPLAYS" in (out / "summary.md").read_text()
    assert (out / "solve_rate.png").stat().st_size > 1000
    # the replayed prompts feed the consistency eval as debug-gym edit cases
    trajectories = out / "truncate" / "trajectories.json"
    data = json.loads(trajectories.read_text())["trajectories"]
    assert len(data) == 2 and all(len(t) >= 2 for t in data)
    cons = tmp_path / "cons"
    argv = [
        "consistency",
        "--model",
        "tiny-llama",
        "--device",
        "cpu",
        "--k",
        "4",
        "--cases",
        "2",
        "--trajectories",
        str(trajectories),
        "--no-progress",
        "--out",
        str(cons),
    ]
    assert main(argv) == 0
    report = json.loads((cons / "results.json").read_text())
    assert "trajectory" in json.dumps(report)
