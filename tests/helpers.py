"""Helpers shared by the tests: the ultralytics sample photos and an in-process ``reid-app``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from reid_app import cli

# Found without importing ultralytics, which must first see the offline switches reid_app sets.
ASSETS = Path(importlib.util.find_spec("ultralytics").origin).parent / "assets"  # type: ignore[union-attr, arg-type]


def run_cli(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    """Run ``reid-app ARGS``; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["reid-app", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.app()
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (0 if code is None else int(code)), out, err
