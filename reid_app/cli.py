"""The ``reid-app`` command line. Commands live in :mod:`reid_app.commands`; this module only
wires them and turns user-facing errors into one line on stderr and a non-zero exit."""

from __future__ import annotations

import importlib
import os
import sys

import typer

from reid_app.errors import ReidAppError, describe_failure
from reid_app.safetext import plain

COMMAND_MODULES = (
    "ingest", "search", "stats", "identities", "retention", "serve", "fanet_cmds", "quantize", "reembed", "adapt",
    "cases", "watch",
)  # fmt: skip
#: Set to 1 to get the traceback of a failure the CLI would otherwise report in one line.
DEBUG_ENV = "REID_APP_DEBUG"

typer_app = typer.Typer(
    name="reid-app",
    help="Person re-identification across cameras: ingest video, search people, train FA-Net.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"reid_app.commands.{_name}")
    except ModuleNotFoundError as exc:  # a command module not written yet
        if exc.name != f"reid_app.commands.{_name}":
            raise
        continue
    _module.register(typer_app)


def app() -> None:
    """Console-script entry point."""
    try:
        typer_app()
    except ReidAppError as exc:
        print(f"error: {plain(exc)}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Exception as exc:
        # A failure of the machine (full disk, permissions, a foreign file, a value out of range)
        # the code below let through: still one line; anything else is a bug and keeps its traceback.
        message = describe_failure(exc)
        if message is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"error: {plain(message)}", file=sys.stderr)
        sys.exit(ReidAppError.exit_code)


if __name__ == "__main__":
    app()
