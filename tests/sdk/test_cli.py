import pytest

from leyline.cli import main


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "serve" in out and "demo" in out and "eval" in out


def test_unknown_command_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_serve_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--kv-tokens" in out and "--content-reuse" in out


def test_serve_rejects_bad_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "0"]) == 2
    assert "port" in capsys.readouterr().err


def test_serve_rejects_bad_repair_windows(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--repair-window", "150%"]) == 2
    assert "fraction" in capsys.readouterr().err
    assert main(["serve", "--repair-window", "64", "--repair-window-cap", "8"]) == 2
    assert "percentage" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--repair-window", "lots"])
    assert "token count or a percentage" in capsys.readouterr().err
