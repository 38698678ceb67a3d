"""The ``reid-app`` command line. Commands live in :mod:`reid_app.commands`; this module only
wires them and turns user-facing errors into one line on stderr and a non-zero exit."""

from __future__ import annotations

import importlib
import sys

import typer

from reid_app.errors import ReidAppError

COMMAND_MODULES = ("ingest", "search", "stats", "identities", "fanet_cmds")

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
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    app()
