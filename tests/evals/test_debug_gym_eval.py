"""`leyline eval debug-gym` end to end: the prepared 3.12 venv, scripted replays, a fresh engine
per policy arm, and the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import leyline.evals.debug_gym_env as env_module
from leyline.evals import debug_gym
from leyline.evals.cli import main, parser
from leyline.evals.debug_gym_env import dataset_available


def _no_environment(*args: Any, **kwargs: Any) -> Path:
    raise AssertionError("the environment was prepared")


def test_policy_names_match_help_and_are_checked_before_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(env_module, "prepare_env", _no_environment)
    with pytest.raises(SystemExit):
        main(["debug-gym", "--help"])
    assert "truncate_older_than" in capsys.readouterr().out  # named by --help, and accepted:
    assert parser().parse_args(["debug-gym", "--policy", "truncate_older_than"]).policy
    # argparse refuses an unknown name before anything runs, listing the valid ones
    with pytest.raises(SystemExit) as exc:
        main(["debug-gym", "--llm", "scripted", "--policy", "truncate_old", "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'truncate_old'" in err and "drop_failed" in err
    # a caller that builds its own Namespace gets the same check, also before the environment
    args = parser().parse_args(["debug-gym", "--llm", "scripted", "--out", str(tmp_path)])
    args.policy = ["keep_all", "nope"]
    assert debug_gym.run(args) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().out


def test_seed_policy_and_venv_reach_the_runner(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    specs: list[env_module.DebugGymEnvSpec] = []
    calls: list[dict[str, Any]] = []

    def prepare(spec: env_module.DebugGymEnvSpec, **kwargs: Any) -> Path:
        specs.append(spec)
        return Path("/venv/bin/python")

    def run_arm(python: Path, **kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs)
        summary = {k: 0 for k in ("solved", "tasks", "mean_steps", "prompt_tokens_per_step")}
        summary |= dict.fromkeys(
            ("solve_rate", "cached_tokens_per_step", "spliced_per_step", "recomputed_per_step"),
            None,
        )
        summary |= {"directives_per_step": None, "ttft_p50_s": None}
        return {"summary": summary, "kind": "replay", "note": "replay"}

    monkeypatch.setattr(env_module, "prepare_env", prepare)
    monkeypatch.setattr(env_module, "run_debug_gym", run_arm)
    monkeypatch.setattr(debug_gym, "bar_chart", lambda *a, **k: None)
    argv = ["debug-gym", "--llm", "scripted", "--policy", "truncate_older_than"]
    argv += ["--policy", "drop_failed", "--seed", "5", "--debug-gym-venv", str(tmp_path / "v")]
    assert main([*argv, "--no-progress", "--out", str(tmp_path / "out")]) == 0
    assert [c["policy"] for c in calls] == ["truncate_older_than", "drop_failed"]
    assert {c["seed"] for c in calls} == {5}
    assert [s.venv for s in specs] == [tmp_path / "v"]


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
