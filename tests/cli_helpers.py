"""Running ``reid-app`` in the test process, exactly as the console script does."""

from __future__ import annotations

import sys

import pytest

from reid_app import cli


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
