"""The client install: `pip install leyline` brings no torch, and server features name their extra."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_client_only_install_has_no_torch(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT)], check=True, timeout=600)
    script = textwrap.dedent(
        """
        import importlib.util, json
        import leyline
        s = leyline.Session("x")
        p = s.prepare([{"role": "user", "content": "hi"}])
        out = {"torch": importlib.util.find_spec("torch") is not None, "version": p.version}
        try:
            import leyline.server
        except leyline.MissingExtraError as exc:
            out["server_error"] = str(exc)
        from leyline.tokens import count_tokens
        out["tokens"] = count_tokens("The capital of France is Paris.")
        print(json.dumps(out))
        """
    )
    result = subprocess.run([str(py), "-c", script], capture_output=True, text=True, check=True)
    out = __import__("json").loads(result.stdout)
    assert out["torch"] is False
    assert out["version"] == 1 and out["tokens"] == 7
    assert "leyline[server]" in out["server_error"]
    serve = subprocess.run([str(venv / "bin" / "leyline"), "serve"], capture_output=True, text=True)
    assert serve.returncode == 2 and "leyline[server]" in serve.stderr
