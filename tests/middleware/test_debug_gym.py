"""debug-gym integration: the 3.12 venv, scripted replays under two policies, and the Leyline
payload that ``LeylineOpenAILLM`` sends (to the stub server of ``stub_server.py``).

debug-gym 1.3.0 needs Python >= 3.12, so everything that imports it runs in the venv built by
``prepare_env`` (cached; a cold build takes a few minutes once) through a subprocess.
"""

from __future__ import annotations

import json
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from stub_server import Reply, StubOpenAIServer

from leyline.evals.debug_gym_env import (
    DATA_MARKER,
    DebugGymEnvSpec,
    checkout_key,
    copy_dataset,
    dataset_available,
    find_dataset,
    prepare_env,
    run_debug_gym,
    runner_command,
    runner_env,
)

SCRIPTS = Path(__file__).resolve().parents[2] / "evals" / "debug_gym_assets" / "scripts"
REPLAY_TASKS = ("config", "purr", "sum_tree")


def _script_calls(task: str) -> list[dict[str, Any]]:
    data = json.loads((SCRIPTS / f"{task}.json").read_text())
    assert data["kind"] == "replay"
    steps: list[dict[str, Any]] = data["steps"]
    return steps


# -- fast: no debug-gym needed ---------------------------------------------------------------
def test_scripts_cover_every_task_and_end_with_submit() -> None:
    names = sorted(p.stem for p in SCRIPTS.glob("*.json"))
    assert len(names) == 10
    for name in names:
        steps = _script_calls(name)
        assert steps[-1]["tool"] == "submit"
        assert any(s["tool"] == "edit" for s in steps), name
        assert {s["tool"] for s in steps} <= {"bash", "view", "pdb", "edit", "eval", "submit"}


def test_copy_dataset_makes_a_writable_copy(tmp_path: Path) -> None:
    source = find_dataset()
    if source is None:
        pytest.skip("shared/datasets/mini_nightmare is not beside the repository")
    target = tmp_path / "mini_nightmare"
    assert copy_dataset(source, target) is True
    code = target / "purr" / "purr_code.py"
    assert code.read_text() == (source / "purr" / "purr_code.py").read_text()
    assert code.stat().st_mode & stat.S_IWUSR
    assert copy_dataset(source, target) is False  # present: left alone
    with pytest.raises(FileNotFoundError):
        copy_dataset(tmp_path / "nowhere", tmp_path / "other")


def test_spec_validates_and_command_carries_every_option(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a mini_nightmare folder"):
        DebugGymEnvSpec(data_source=tmp_path)
    with pytest.raises(ValueError, match="project root"):
        DebugGymEnvSpec(project_root=tmp_path)
    assert DebugGymEnvSpec().stamp == DebugGymEnvSpec().stamp
    cmd = runner_command(
        Path("/v/bin/python"),
        out=tmp_path,
        tasks=("purr", "config"),
        policy="truncate",
        llm="openai",
        endpoint="http://127.0.0.1:1/v1",
        model="m",
        max_steps=7,
        seed=11,
        stream=True,
    )
    assert cmd[:3] == ["/v/bin/python", "-m", "leyline.middleware.debug_gym_run"]
    joined = " ".join(cmd)
    for part in (
        "--policy truncate",
        "--llm openai",
        "--tasks purr,config",
        "--max-steps 7",
        "--seed 11",
    ):
        assert part in joined
    assert cmd[-1] == "--stream"


def test_venv_is_keyed_by_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two checkouts never share (and re-link) one venv; an explicit folder still wins."""
    monkeypatch.setenv("LEYLINE_CACHE_DIR", str(tmp_path / "cache"))
    roots = [tmp_path / "a" / "leyline", tmp_path / "b" / "leyline"]
    for root in roots:
        root.mkdir(parents=True)
        (root / "pyproject.toml").write_text("[project]\nname = 'leyline'\n")
    venvs = [DebugGymEnvSpec(project_root=root).venv for root in roots]
    assert venvs[0] != venvs[1] and all(v.parent == tmp_path / "cache" for v in venvs)
    assert venvs[0].name == f"debug-gym-venv-{checkout_key(roots[0])}"
    assert DebugGymEnvSpec(project_root=roots[0]).venv == venvs[0]  # stable
    assert DebugGymEnvSpec(venv_dir=tmp_path / "mine").venv == tmp_path / "mine"


# -- slow: the 3.12 venv ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def venv_python() -> Path:
    if not dataset_available():
        pytest.skip("mini_nightmare data is not here (../shared/datasets or debug-gym's cache)")
    python = prepare_env(progress=lambda line: None)
    assert python.is_file()
    return python


@pytest.mark.slow
def test_prepare_env_is_cached(venv_python: Path) -> None:
    lines: list[str] = []
    assert prepare_env(progress=lines.append) == venv_python
    assert any("up to date" in line for line in lines)
    assert (DebugGymEnvSpec().data_target / DATA_MARKER).is_file()


@pytest.mark.slow
def test_scripted_replays_solve_tasks_and_truncate_sends_fewer_tokens(
    venv_python: Path, tmp_path: Path
) -> None:
    arms = {
        policy: run_debug_gym(
            venv_python, out=tmp_path / policy, tasks=REPLAY_TASKS, policy=policy, timeout=300
        )
        for policy in ("keep_all", "truncate")
    }
    for policy, result in arms.items():
        assert result["kind"] == "replay"
        assert result["summary"]["solved_tasks"] == sorted(REPLAY_TASKS), policy
        assert not result["summary"]["errors"]
        for row in result["results"]:
            assert row["stop_reason"] == "terminated"  # resolved by the scripted edit
            assert (tmp_path / policy / row["task"] / "trajectory.json").is_file()
    keep, trunc = arms["keep_all"]["summary"], arms["truncate"]["summary"]
    assert keep["requests"] == trunc["requests"]  # same replayed trajectory
    assert trunc["prompt_tokens"] < keep["prompt_tokens"]
    assert keep["directives_per_step"] == 0.0  # nothing edited: appends only
    assert trunc["directives_per_step"] > 0.0


def _purr_replies() -> list[Reply]:
    return [
        Reply(content=s["content"], tool_calls=((s["tool"], s["arguments"]),))
        for s in _script_calls("purr")
    ]


@pytest.mark.slow
def test_leyline_openai_llm_sends_session_payload_with_directives(
    venv_python: Path, tmp_path: Path, make_stub: Callable[..., StubOpenAIServer]
) -> None:
    stub = make_stub()
    stub.queue(*_purr_replies())
    result = run_debug_gym(
        venv_python,
        out=tmp_path,
        tasks=("purr",),
        policy="truncate",
        llm="openai",
        endpoint=stub.base_url,
        model="stub-model",
        max_steps=10,
        seed=7,
        timeout=300,
    )
    row = result["results"][0]
    assert result["kind"] == "model" and row["solved"], row
    assert result["seed"] == 7 and all(b["seed"] == 7 for b in stub.requests)  # --seed is used
    bodies = stub.bodies_with_leyline
    assert len(bodies) == len(stub.requests) == row["steps"] >= 5
    payloads = [b["leyline"] for b in bodies]
    assert len({p["session"] for p in payloads}) == 1
    assert [p["version"] for p in payloads] == list(range(1, len(payloads) + 1))
    assert [p["base_version"] for p in payloads] == [None, *range(1, len(payloads))]
    # truncation of older tool outputs (n=2) starts at the 4th request: edits -> directives
    assert all(p["directives"] == [] for p in payloads[:3])
    later = [d for p in payloads[3:] for d in p["directives"]]
    assert later and all(d["mode"] == "amortize" for d in later)
    for body, payload in zip(bodies, payloads, strict=True):
        assert len(payload["segments"]) >= len(body["messages"])
        assert body["messages"][0]["role"] == "system"
    assert bodies[0]["messages"][0] == bodies[-1]["messages"][0]  # static system prompt
    tool_names = {t["function"]["name"] for t in bodies[0]["tools"]}
    assert "listdir" not in tool_names and "submit" in tool_names
    records = row["records"]  # the stub's accounting: exact = 10 * version, 3 per directive
    assert [r["exact"] for r in records] == [10 * p["version"] for p in payloads]
    assert [r["spliced"] for r in records] == [3 * len(p["directives"]) for p in payloads]
    assert all(r["recomputed"] == 7 and not r["estimated"] for r in records)


@pytest.mark.slow
def test_bad_request_is_not_retried_and_stream_reports_ttft(
    venv_python: Path, tmp_path: Path, make_stub: Callable[..., StubOpenAIServer]
) -> None:
    stub = make_stub()
    stub.queue(Reply(error="model does not exist", status=400))
    bad = run_debug_gym(
        venv_python,
        out=tmp_path / "bad",
        tasks=("purr",),
        llm="openai",
        endpoint=stub.base_url,
        model="stub-model",
        max_steps=3,
        timeout=300,
    )
    assert len(stub.requests) == 1  # debug-gym 1.3.0 would retry this 400 up to 100 times
    assert "400" in (bad["results"][0]["error"] or "") or "BadRequest" in bad["results"][0]["error"]

    streamed = make_stub()
    result = run_debug_gym(
        venv_python,
        out=tmp_path / "stream",
        tasks=("purr",),
        llm="openai",
        endpoint=streamed.base_url,
        model="stub-model",
        max_steps=3,  # debug-gym counts the initial state: 3 -> 2 requests
        stream=True,
        timeout=300,
    )
    records = result["results"][0]["records"]
    assert len(records) == 2 and all(r["ttft_s"] is not None and r["ttft_s"] > 0 for r in records)
    assert [r["exact"] for r in records] == [10, 20]  # accounting read from the final chunk
    assert all(b.get("stream") for b in streamed.requests)


AGENT_CHECK = r"""
import json, logging, sys
from debug_gym.gym.envs.mini_nightmare import MiniNightmareEnv
from debug_gym.gym.terminals.local import LocalTerminal
from debug_gym.gym.tools.toolbox import Toolbox
from debug_gym.logger import DebugGymLogger
from leyline.middleware import orphan_tool_messages
from leyline.middleware.debug_gym import LeylineFroggyAgent
from leyline.middleware.debug_gym_llm import Script, ScriptStep, ScriptedLLM, load_script

early_submit = Script("counter", (ScriptStep("eval", {}), ScriptStep("submit", {})))
cases = [
    ({"max_history_steps_cutoff": 3}, load_script("counter")),
    ({"max_history_token_cutoff": 1200, "policy": "truncate"}, load_script("counter")),
    ({}, early_submit),
]
for extra, script in cases:
    log = DebugGymLogger("check", log_dir=sys.argv[1], level=logging.ERROR)
    data = MiniNightmareEnv.load_dataset(problems=["counter"], build_image=False, logger=log)
    env = MiniNightmareEnv(task_data=data["counter"], terminal=LocalTerminal(logger=log),
                           logger=log, run_timeout=30)
    for tool in ("bash", "view", "edit", "eval", "submit", "listdir"):
        env.add_tool(Toolbox.get_tool(tool))
    llm = ScriptedLLM(script)
    agent = LeylineFroggyAgent({"max_steps": 20, **extra}, llm=llm, logger=log)
    trajectory = agent.run(env)
    prompts = [s["prompt_response_pairs"][0]["prompt"] for s in trajectory["log"][1:]]
    print("RESULT " + json.dumps({
        "solved": bool(env.resolved), "stop": agent.stop_reason, "steps": len(prompts),
        "tools": [t.name for t in env.tools], "sizes": [len(p) for p in prompts],
        "orphans": sum(len(orphan_tool_messages(p)) for p in prompts),
        "first_roles": [p[2]["role"] for p in prompts if len(p) > 2],
    }))
    env.close()
"""


def _run_check(
    venv_python: Path, script: str, tmp_path: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in debug-gym's venv (argv: ``tmp_path``, then ``args``), in ``tmp_path``."""
    return subprocess.run(
        [str(venv_python), "-c", script, str(tmp_path), *args],
        env=runner_env(venv_python),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_agent_works_around_debug_gym_1_3_0_bugs(venv_python: Path, tmp_path: Path) -> None:
    done = _run_check(venv_python, AGENT_CHECK, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    steps_cut, token_cut, early = (json.loads(line.removeprefix("RESULT ")) for line in lines)
    for case in (steps_cut, token_cut, early):
        assert "listdir" not in case["tools"] and "submit" in case["tools"]
        assert case["orphans"] == 0
        assert all(role == "assistant" for role in case["first_roles"])  # whole steps kept
    # max_history_steps_cutoff=3 keeps one whole step (1.3.0 kept a lone tool message)
    assert steps_cut["solved"] and max(steps_cut["sizes"]) == 4
    assert token_cut["solved"] and max(token_cut["sizes"]) < 2 + 2 * token_cut["steps"]
    # an unresolved submit ends the episode (1.3.0 ran on to max_steps)
    assert early == {**early, "solved": False, "stop": "submitted", "steps": 2}


DROP_FAILED_CHECK = r"""
import json, sys
from pathlib import Path
from leyline import Mode
from leyline.middleware.debug_gym_llm import Script, ScriptStep, ScriptedLLM, load_script
from leyline.middleware.debug_gym_run import run_tasks
from leyline.middleware.policies import DropFailedToolCalls

out, endpoint = Path(sys.argv[1]), sys.argv[2]
try:
    run_tasks(["purr"], "truncate_old", lambda task, logger: None, 5, out / "never")
except ValueError as exc:
    print("BADNAME " + json.dumps(str(exc)))
print("PREPARED " + json.dumps((out / "never").exists()))
# SCRIPTED failing calls: each tool fails once (debug-gym 1.3.0's own failure texts), then works
steps = (
    ScriptStep("view", {"path": "nope.py"}, "View a file that is not there."),
    ScriptStep("view", {"path": "purr_code.py"}, "Read the code."),
    ScriptStep("bash", {"command": "ls no_such_dir"}, "A command that fails."),
    ScriptStep("bash", {"command": "ls"}, "One that works."),
    ScriptStep("pdb", {"command": ""}, "An empty pdb command."),
    ScriptStep("pdb", {"command": "l"}, "List the code under pdb."),
    ScriptStep("edit", {"path": "purr_code.py", "start": 5, "end": 2, "new_code": "x"}, "Bad."),
    ScriptStep("listdir", {}, "A tool that is not registered."),
    *load_script("purr").steps[3:],
)
llms = []
def factory(task, logger):
    llms.append(ScriptedLLM(Script("purr", steps), endpoint=endpoint, logger=logger))
    return llms[-1]
policy = DropFailedToolCalls.for_debug_gym(mode=Mode.FORGET)
(row,) = run_tasks(["purr"], policy, factory, 30, out / "run")
print("RESULT " + json.dumps({"row": {k: row[k] for k in ("solved", "steps", "policy")},
                              "records": [r.as_dict() for r in llms[0].records]}))
"""


@pytest.mark.slow
def test_drop_failed_drops_scripted_failing_calls(
    venv_python: Path, tmp_path: Path, make_stub: Callable[..., StubOpenAIServer]
) -> None:
    """Done-when of issue 15: debug-gym with a SCRIPTED LLM whose tool calls fail (debug-gym's
    own tools produce the failure texts): `drop_failed` sends fewer messages than the full
    history and the requests carry directives (here FORGET, the policy object's mode)."""
    stub = make_stub()
    done = _run_check(venv_python, DROP_FAILED_CHECK, tmp_path, stub.base_url)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = {
        line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1])
        for line in done.stdout.splitlines()
        if line.startswith(("BADNAME ", "PREPARED ", "RESULT "))
    }
    # an unknown name is refused before anything is prepared, with the valid names
    assert "truncate_older_than" in lines["BADNAME"] and lines["PREPARED"] is False
    result = lines["RESULT"]
    assert result["row"]["solved"] and result["row"]["policy"].startswith("DropFailedToolCalls(")
    bodies = stub.bodies_with_leyline
    assert len(bodies) == result["row"]["steps"] >= 10
    full = [2 + 2 * k for k in range(len(bodies))]  # what keep_all sends: system, task, steps
    sent = [len(b["messages"]) for b in bodies]
    assert all(s <= f for s, f in zip(sent, full, strict=True)) and sent[-1] < full[-1]
    last = json.dumps(bodies[-1]["messages"])
    for text in ("View failed", "Command failed", "Failure calling pdb", "Edit failed"):
        assert text in json.dumps([b["messages"] for b in bodies]), text  # it did happen
        assert text not in last, text  # and was dropped once retried
    assert "Unregistered tool: listdir" in last  # never retried: kept
    directives = [d for b in bodies for d in b["leyline"]["directives"]]
    assert len(directives) >= 4 and {d["mode"] for d in directives} == {"forget"}
    records = result["records"]
    assert sum(r["directives"] for r in records) == len(directives) > 0
    assert [r["messages"] for r in records] == sent
