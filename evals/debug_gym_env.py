"""The Python 3.12 environment that runs debug-gym 1.3.0 next to Leyline's 3.11 main venv.

debug-gym 1.3.0 needs Python >= 3.12, and a plain ``pip install debug-gym`` drags in
swesmith -> sglang -> torch. :func:`prepare_env` builds (once, cached) a separate venv:

1. a Python 3.12 interpreter makes the venv: one per checkout, ``debug-gym-venv-<key>`` in the
   Leyline cache directory (``$LEYLINE_CACHE_DIR``, default ``~/.cache/leyline``), where
   ``<key>`` names the project root; ``DebugGymEnvSpec(venv_dir=...)`` or
   ``leyline eval debug-gym --debug-gym-venv`` picks another place;
2. ``debug-gym==1.3.0``, ``swesmith==0.0.4``, ``swebench==4.0.3`` with ``--no-deps``;
3. their light dependencies from the lock file ``debug_gym_assets/requirements-debug-gym.lock``
   (resolved once; installed with ``--no-deps``, so no resolver run and no torch);
   installs go through ``uv pip`` (bootstrapped next to the venv; seconds) or, when uv cannot
   be had, the venv's pip (minutes);
4. the client-only ``leyline`` from the project root, editable, with ``--no-deps``;
5. an import check; then a stamp (hash of the pins, the lock and the interpreter version).

A second call with the same stamp returns at once. Each checkout has its own venv, so a run
always imports the ``leyline`` of the checkout that started it; a venv given explicitly and
shared by checkouts is re-linked (step 4) whenever a different checkout uses it. The mini_nightmare data is copied to ``$HOME/.cache/debug_gym/mini_nightmare``
(where debug-gym looks for it) when absent, so nothing is downloaded.

:func:`runner_command` and :func:`run_debug_gym` then run :mod:`leyline.middleware.debug_gym_run`
inside that venv as a subprocess; the 3.11 side never imports debug-gym.

>>> spec = DebugGymEnvSpec()
>>> spec.venv.name == f"debug-gym-venv-{checkout_key(spec.project_root)}"
True
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEBUG_GYM_PINS",
    "DebugGymEnvSpec",
    "checkout_key",
    "dataset_available",
    "find_dataset",
    "prepare_env",
    "run_debug_gym",
    "runner_command",
    "runner_env",
    "venv_python",
]

log = logging.getLogger("leyline.evals.debug_gym_env")

DEBUG_GYM_PINS: tuple[str, ...] = ("debug-gym==1.3.0", "swesmith==0.0.4", "swebench==4.0.3")
ASSETS = Path(__file__).resolve().parent / "debug_gym_assets"
LOCK_FILE = ASSETS / "requirements-debug-gym.lock"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
STAMP_NAME = ".leyline-stamp"
# why: uv installs the ~120 pinned wheels in seconds where pip takes minutes.
UV_PIN = "uv==0.13.9"
LINK_NAME = ".leyline-project"
# NOTE: debug-gym's MiniNightmareEnv checks for this file before it tries to download the data.
DATA_MARKER = Path("config") / "test.py"
# Modules the runner imports; a venv that cannot import them is rebuilt.
IMPORT_CHECK = (
    "import debug_gym.agents, debug_gym.llms, debug_gym.gym.envs, debug_gym.gym.terminals; "
    "import leyline, leyline.middleware.policies"
)


def checkout_key(project_root: Path = PROJECT_ROOT) -> str:
    """A short name for a checkout: its folder name and a hash of its resolved path.

    >>> checkout_key(Path("/src/leyline")) == checkout_key(Path("/src/leyline/"))
    True
    """
    root = project_root.resolve()
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:10]
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in root.name)[:32]
    return f"{name}-{digest}"


def _default_venv(project_root: Path = PROJECT_ROOT) -> Path:
    from leyline._config import Environment

    return Environment.read().cache_dir / f"debug-gym-venv-{checkout_key(project_root)}"


def _default_data_target() -> Path:
    return Path.home() / ".cache" / "debug_gym" / "mini_nightmare"


def find_dataset(project_root: Path = PROJECT_ROOT) -> Path | None:
    """The mini_nightmare copy shipped in ``shared/datasets`` beside the repository, if any."""
    candidates = (
        project_root.parent / "shared" / "datasets" / "mini_nightmare",
        Path("/work/shared/datasets/mini_nightmare"),
    )
    for path in candidates:
        if (path / DATA_MARKER).is_file():
            return path
    return None


def dataset_available(project_root: Path = PROJECT_ROOT) -> bool:
    """mini_nightmare is either already in debug-gym's cache or can be copied from shared/."""
    return (_default_data_target() / DATA_MARKER).is_file() or find_dataset(
        project_root
    ) is not None


def _find_python312() -> Path | None:
    # why: pyenv's shim for python3.12 fails unless 3.12 is a selected version, so look for the
    # real interpreter too.
    for name in ("python3.12",):
        found = shutil.which(name)
        if found and _runs(found):
            return Path(found)
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    for candidate in sorted(pyenv_root.glob("versions/3.12*/bin/python3.12"), reverse=True):
        if _runs(str(candidate)):
            return candidate
    for candidate in (Path("/usr/bin/python3.12"), Path("/usr/local/bin/python3.12")):
        if candidate.is_file() and _runs(str(candidate)):
            return candidate
    return None


def _runs(python: str) -> bool:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(sys.version_info[:2] >= (3, 12))"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() == "True"


@dataclass(frozen=True, slots=True)
class DebugGymEnvSpec:
    """Where and how the debug-gym venv is built.

    ``venv_dir``: where the venv lives (default: one per ``project_root``, see the module
    docstring); ``python``: a Python >= 3.12 interpreter (found on PATH or under pyenv when
    ``None``);
    ``data_source``: the mini_nightmare folder to copy (:func:`find_dataset` when ``None``);
    ``data_target``: where debug-gym reads it (``$HOME/.cache/debug_gym/mini_nightmare``).
    """

    venv_dir: Path | None = None
    python: Path | None = None
    project_root: Path = PROJECT_ROOT
    data_source: Path | None = None
    data_target: Path = field(default_factory=_default_data_target)
    lock_file: Path = LOCK_FILE
    pins: tuple[str, ...] = DEBUG_GYM_PINS

    def __post_init__(self) -> None:
        if not self.lock_file.is_file():
            raise ValueError(f"lock file {self.lock_file} does not exist")
        if not (self.project_root / "pyproject.toml").is_file():
            raise ValueError(f"{self.project_root} is not the leyline project root (no pyproject)")
        if self.data_source is not None and not (self.data_source / DATA_MARKER).is_file():
            raise ValueError(
                f"{self.data_source} is not a mini_nightmare folder (no {DATA_MARKER})"
            )
        if not self.pins:
            raise ValueError("pins must name at least debug-gym")

    @property
    def venv(self) -> Path:
        """The venv folder: ``venv_dir``, or this checkout's own under the cache directory."""
        return self.venv_dir if self.venv_dir is not None else _default_venv(self.project_root)

    @property
    def stamp(self) -> str:
        """Version stamp of the venv's contents: pins, lock file and the builder's version."""
        h = hashlib.sha256()
        h.update("\n".join(self.pins).encode())
        h.update(self.lock_file.read_bytes())
        h.update(b"leyline-debug-gym-env/1")
        return h.hexdigest()[:16]


def venv_python(venv_dir: Path) -> Path:
    """The interpreter of a venv."""
    return venv_dir / "bin" / "python"


def _step(progress: Callable[[str], None], n: int, total: int, what: str) -> float:
    progress(f"[debug-gym env {n}/{total}] {what}")
    return time.perf_counter()


def _run(cmd: Sequence[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(list(cmd), capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"command failed ({' '.join(cmd)}):\n{tail}")


class _Installer:
    """``uv pip install`` into the venv (seconds), or the venv's own pip when uv is unavailable
    (minutes: pip spends them unpacking ~120 wheels one by one)."""

    def __init__(self, base: Path, python: Path, tool_dir: Path) -> None:
        self.python = python
        self.uv: Path | None = self._bootstrap_uv(base, tool_dir)
        if self.uv is None:
            _run([str(python), "-m", "ensurepip", "--upgrade"])

    @staticmethod
    def _bootstrap_uv(base: Path, tool_dir: Path) -> Path | None:
        uv = tool_dir / "bin" / "uv"
        if uv.is_file():
            return uv
        try:
            _run([str(base), "-m", "pip", "install", "-q", "--target", str(tool_dir), UV_PIN])
        except RuntimeError as exc:
            log.warning("could not install %s, falling back to pip: %s", UV_PIN, exc)
            return None
        return uv if uv.is_file() else None

    @property
    def name(self) -> str:
        return "uv" if self.uv else "pip"

    def install(self, args: Sequence[str]) -> None:
        if self.uv is not None:
            cmd = [str(self.uv), "pip", "install", "--python", str(self.python)]
            _run([*cmd, "--compile-bytecode", "--quiet", *args])
        else:
            _run(
                [
                    str(self.python),
                    "-m",
                    "pip",
                    "install",
                    "--disable-pip-version-check",
                    "-q",
                    *args,
                ]
            )


def _import_ok(python: Path, project_root: Path) -> bool:
    if not python.is_file():
        return False
    done = subprocess.run(
        [str(python), "-c", IMPORT_CHECK],
        capture_output=True,
        text=True,
        check=False,
        env=runner_env(python),
        cwd=str(project_root.parent),
    )
    if done.returncode != 0:
        log.warning("debug-gym venv import check failed:\n%s", done.stderr[-2000:])
    return done.returncode == 0


def copy_dataset(source: Path, target: Path) -> bool:
    """Copy mini_nightmare to ``target`` when it is absent; writable copies. True if copied."""
    if (target / DATA_MARKER).is_file():
        return False
    if not (source / DATA_MARKER).is_file():
        raise FileNotFoundError(f"{source} is not a mini_nightmare folder (no {DATA_MARKER})")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    # why: the shared copy is read-only; debug-gym copies tasks from here into a workspace
    # and edits them there, so the copy must be writable.
    shutil.copytree(source, tmp, copy_function=shutil.copyfile)
    for path in [tmp, *tmp.rglob("*")]:
        path.chmod(
            path.stat().st_mode
            | stat.S_IWUSR
            | stat.S_IRUSR
            | (stat.S_IXUSR if path.is_dir() else 0)
        )
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return True


def prepare_env(
    spec: DebugGymEnvSpec | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    force: bool = False,
) -> Path:
    """Build (or reuse) the debug-gym venv and the dataset copy; return the venv's python.

    Cold: ~30 s with uv (minutes with the pip fallback); warm: a stamp check (milliseconds).
    ``progress`` receives one line per step (default: stderr). ``force`` rebuilds from scratch.
    """
    spec = spec or DebugGymEnvSpec()
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    t_start = time.perf_counter()
    python = venv_python(spec.venv)
    stamp_file = spec.venv / STAMP_NAME
    link_file = spec.venv / LINK_NAME
    root = str(spec.project_root.resolve())
    warm = (
        not force
        and stamp_file.is_file()
        and stamp_file.read_text().strip() == spec.stamp
        and python.is_file()
    )
    total = 6
    if not warm or not link_file.is_file() or link_file.read_text().strip() != root:
        base = spec.python or _find_python312()
        if base is None:
            raise RuntimeError(
                "debug-gym 1.3.0 needs Python >= 3.12 and none was found (looked for python3.12 "
                "on PATH and under pyenv); install one or pass DebugGymEnvSpec(python=...)"
            )
    if not warm:
        t = _step(say, 1, total, f"creating a Python 3.12 venv at {spec.venv}")
        shutil.rmtree(spec.venv, ignore_errors=True)
        spec.venv.parent.mkdir(parents=True, exist_ok=True)
        _run([str(base), "-m", "venv", "--without-pip", str(spec.venv)])
        installer = _Installer(base, python, spec.venv.parent / "uv-tool")
        say(f"    {time.perf_counter() - t:.1f} s ({base}, installer: {installer.name})")

        t = _step(say, 2, total, "installing " + ", ".join(spec.pins) + " with --no-deps")
        installer.install(["--no-deps", *spec.pins])
        say(f"    {time.perf_counter() - t:.1f} s")

        t = _step(say, 3, total, f"installing pinned light deps ({spec.lock_file.name}, --no-deps)")
        installer.install(["--no-deps", "-r", str(spec.lock_file)])
        say(f"    {time.perf_counter() - t:.1f} s")
        link_file.unlink(missing_ok=True)
    else:
        say(f"[debug-gym env] venv {spec.venv} is up to date (stamp {spec.stamp})")

    if not link_file.is_file() or link_file.read_text().strip() != root:
        t = _step(
            say, 4, total, f"installing client-only leyline from {root} (editable, --no-deps)"
        )
        installer = _Installer(base, python, spec.venv.parent / "uv-tool")
        installer.install(["--no-deps", "--no-build-isolation", "-e", root])
        link_file.write_text(root + "\n")
        say(f"    {time.perf_counter() - t:.1f} s")

    source = spec.data_source or find_dataset(spec.project_root)
    if (spec.data_target / DATA_MARKER).is_file():
        pass
    elif source is None:
        raise FileNotFoundError(
            "mini_nightmare data not found: expected ../shared/datasets/mini_nightmare beside the "
            f"repository or {spec.data_target}; pass DebugGymEnvSpec(data_source=...)"
        )
    else:
        t = _step(say, 5, total, f"copying mini_nightmare {source} -> {spec.data_target}")
        copy_dataset(source, spec.data_target)
        say(f"    {time.perf_counter() - t:.1f} s")

    if not warm:
        t = _step(say, 6, total, "checking imports")
        if not _import_ok(python, spec.project_root):
            raise RuntimeError(
                f"the debug-gym venv at {spec.venv} cannot import debug-gym and leyline; "
                "see the log above, or rebuild with prepare_env(force=True)"
            )
        stamp_file.write_text(spec.stamp + "\n")
        say(f"    {time.perf_counter() - t:.1f} s")
    say(f"[debug-gym env] ready in {time.perf_counter() - t_start:.1f} s: {python}")
    return python


def runner_env(python: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for processes in the venv: its ``bin`` first on PATH (debug-gym runs the
    tasks' tests with ``python -m pytest``), quiet transformers."""
    env = dict(os.environ if base is None else base)
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(python.parent.parent)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def runner_command(
    python: Path,
    *,
    out: Path,
    tasks: Sequence[str] = (),
    policy: str = "keep_all",
    llm: str = "scripted",
    endpoint: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    max_steps: int | None = None,
    seed: int | None = None,
    stream: bool = False,
) -> list[str]:
    """The command line that runs :mod:`leyline.middleware.debug_gym_run` in the venv."""
    cmd = [str(python), "-m", "leyline.middleware.debug_gym_run", "--policy", policy]
    cmd += ["--llm", llm, "--out", str(out)]
    if tasks:
        cmd += ["--tasks", ",".join(tasks)]
    if endpoint:
        cmd += ["--endpoint", endpoint]
    if model:
        cmd += ["--model", model]
    if api_key:
        cmd += ["--api-key", api_key]
    if max_steps is not None:
        cmd += ["--max-steps", str(max_steps)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    if stream:
        cmd.append("--stream")
    return cmd


def run_debug_gym(
    python: Path, *, out: Path, timeout: float | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Run one arm in the venv (see :func:`runner_command` for ``kwargs``); return results.json."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = runner_command(python, out=out, **kwargs)
    done = subprocess.run(
        cmd,
        env=runner_env(python),
        cwd=str(out),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    (out / "runner.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(
            f"debug-gym runner failed (exit {done.returncode}): {' '.join(cmd)}\n"
            f"{(done.stdout + done.stderr)[-4000:]}"
        )
    result: dict[str, Any] = json.loads((out / "results.json").read_text())
    return result


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Build the debug-gym 3.12 venv and dataset copy.")
    p.add_argument("--venv", type=Path, default=None)
    p.add_argument("--data", type=Path, default=None, help="mini_nightmare folder to copy")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    spec = DebugGymEnvSpec(venv_dir=args.venv, data_source=args.data)
    print(prepare_env(spec, force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
