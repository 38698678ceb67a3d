"""Helpers shared by the tests: the ultralytics sample photos and an in-process ``reid-app``."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fanet.data.peta import DG_TEST_SUBSETS
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


def trimmed(split: dict, labels: dict, queries: int, distractors: int) -> dict:
    """``split`` cut to its first ``queries`` queries, their gallery matches and ``distractors`` other
    gallery images per set: a small but still valid DG split."""
    out = {}
    for name in DG_TEST_SUBSETS:
        query = list(split[name]["query"][:queries])
        pids = {labels[f].pid for f in query}
        gallery = [f for f in split[name]["gallery"] if labels[f].pid in pids]
        gallery += [f for f in split[name]["gallery"] if labels[f].pid not in pids][:distractors]
        out[name] = {"query": query, "gallery": gallery}
    return out


def tiny_peta_root(tmp_path: Path, peta: Path, split: dict) -> Path:
    """A peta_reid folder in tmp: the real images and labels.csv (linked, not copied) and one split."""
    folder = tmp_path / "data" / "peta_reid"
    folder.mkdir(parents=True)
    (folder / "images").symlink_to(peta / "images")
    (folder / "labels.csv").symlink_to(peta / "labels.csv")
    (folder / "dg_splits.json").write_text(json.dumps({"protocol": "test", "seed": 0, "splits": [split]}))
    return folder
