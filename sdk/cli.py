"""The ``leyline`` command: ``serve``, ``demo`` and ``eval`` dispatch to their packages.

The client install has no server: those subcommands say which extra to install.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

from leyline import __version__
from leyline.errors import MissingExtraError

# subcommand -> (module with `main(argv) -> int`, extra it needs, one-line help)
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("leyline.server.engine.cli", "server", "run the embedded OpenAI-compatible engine"),
    "demo": ("leyline.server.engine.demo", "server", "start the engine and run an edit demo"),
    "eval": ("leyline.evals.cli", "eval", "run an evaluation (replay, debug-gym, consistency)"),
}


def _usage() -> str:
    lines = [f"leyline {__version__}", "", "usage: leyline <command> [options]", ""]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in _COMMANDS.items()]
    lines += ["", "Run 'leyline <command> --help' for a command's options."]
    return "\n".join(lines)


def _load(command: str) -> Callable[[Sequence[str]], int]:
    module_name, extra, _ = _COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("leyline"):
            raise
        raise MissingExtraError(f"'leyline {command}'", extra, exc) from exc
    main: Callable[[Sequence[str]], int] = module.main
    return main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``leyline`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] == "--version":
        print(__version__)
        return 0
    if args[0] not in _COMMANDS:
        print(f"leyline: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        run = _load(args[0])
    except MissingExtraError as exc:
        print(f"leyline: {exc}", file=sys.stderr)
        return 2
    return run(args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
