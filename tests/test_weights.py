"""Weights resolution order and its error message."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fanet import weights
from fanet.weights import WeightsNotFoundError, resolve_weights, sha256_file


def test_resolution_order(tmp_path, monkeypatch) -> None:
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    (env_dir / "model.pt").write_bytes(b"env")
    explicit = tmp_path / "explicit.pt"
    explicit.write_bytes(b"explicit")
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(env_dir))
    assert resolve_weights("model.pt", explicit) == explicit
    assert resolve_weights("model.pt") == env_dir / "model.pt"
    assert sha256_file(explicit) == hashlib.sha256(b"explicit").hexdigest()


def test_missing_file_names_the_file_places_and_source(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_weights("nothing.pt", source="https://example.invalid/nothing.pt")
    message = str(info.value)
    assert "nothing.pt" in message and str(tmp_path) in message and str(weights.REPO_WEIGHTS_DIR) in message
    assert "example.invalid" in message and "\n" not in message
    with pytest.raises(WeightsNotFoundError, match="missing.pt"):
        resolve_weights("nothing.pt", tmp_path / "missing.pt")


def test_library_download_is_last_and_failure_is_reported(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path))
    fetched = tmp_path / "cache" / "w.pt"

    def fetch() -> Path:
        fetched.parent.mkdir()
        fetched.write_bytes(b"w")
        return fetched

    assert resolve_weights("w.pt", download=fetch) == fetched

    def offline() -> Path:
        raise OSError("no network")

    with pytest.raises(WeightsNotFoundError, match="library download"):
        resolve_weights("x.pt", download=offline)
