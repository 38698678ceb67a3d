"""ONNX export (matches PyTorch through onnxruntime, dynamic batch) and the Fig. 7 attention grid,
through the library and the ``reid-app export`` / ``reid-app visualize`` commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fanet.checkpoint import load_inference_model, read_checkpoint, save_atomically
from fanet.config import DataConfig, SolverConfig, TrainConfig
from fanet.engine.trainer import Trainer, capture_rng_state, load_training_model
from fanet.export import export_onnx, verify_onnx
from fanet.visualize import attention_grid, attention_rows, jet_colormap, load_images
from reid_app.cli import typer_app

HEIGHT, WIDTH = 128, 64


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def training_checkpoint(tiny_market_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real training checkpoint (random init, a few SGD steps so the maps are not all flat)."""
    torch.set_num_threads(2)
    folder = tmp_path_factory.mktemp("checkpoint")
    config = TrainConfig(
        data=DataConfig(root=str(tiny_market_root), height=HEIGHT, width=WIDTH, num_identities=4,
                        num_instances=2, workers=0),
        solver=SolverConfig(epochs=1, base_lr=0.05, warmup_start_lr=0.05, warmup_epochs=0),
        output_dir=str(folder / "run"), random_init=True, eval_period=0,
    )
    trainer = Trainer(config, show_progress=False)
    batch = next(iter(trainer.train_loader))
    for _ in range(2):
        trainer.train_step(batch)
    path = folder / "last.pt"
    save_atomically(trainer.checkpoint_payload(0, [capture_rng_state(trainer.device)]), path)
    return path


def _person_images(tiny_market_root: Path, count: int) -> list[Path]:
    return sorted((tiny_market_root / "Market-1501-v15.09.15" / "query").glob("*.jpg"))[:count]


def test_jet_colormap_endpoints() -> None:
    colours = jet_colormap(np.array([0.0, 0.5, 1.0, -3.0, np.nan]))
    assert colours.dtype == np.uint8 and colours.shape == (5, 3)
    assert colours[0].tolist() == [0, 0, 128]  # dark blue
    assert colours[1].tolist() == [128, 255, 128]  # green-ish middle
    assert colours[2].tolist() == [128, 0, 0]  # dark red
    assert colours[3].tolist() == colours[4].tolist() == [0, 0, 128]  # clipped, NaN -> 0


def test_onnx_export_matches_pytorch(training_checkpoint: Path, tmp_path: Path) -> None:
    model = load_inference_model(training_checkpoint)
    path = export_onnx(model, tmp_path / "fanet.onnx", height=HEIGHT, width=WIDTH)
    graph = onnx.load(str(path), load_external_data=False).graph
    (images,), (features,) = graph.input, graph.output
    input_dims = [d.dim_param or d.dim_value for d in images.type.tensor_type.shape.dim]
    output_dims = [d.dim_param or d.dim_value for d in features.type.tensor_type.shape.dim]
    assert isinstance(input_dims[0], str) and input_dims[1:] == [3, HEIGHT, WIDTH]  # dynamic batch
    assert isinstance(output_dims[0], str) and output_dims[1] == 3840
    # Batches of 1 and 3 (the export used 2): features within 1e-3 of PyTorch's (their scale is ~1).
    difference = verify_onnx(path, model, height=HEIGHT, width=WIDTH, batch_sizes=(1, 3))
    assert difference < 1e-3


def test_visualize_grid_rows_and_size(training_checkpoint: Path, tiny_market_root: Path) -> None:
    model, _ = load_training_model(training_checkpoint)
    paths = _person_images(tiny_market_root, 3)
    images = load_images(paths, HEIGHT, WIDTH)
    assert images.shape == (3, 3, HEIGHT, WIDTH) and images.min() >= 0.0 and images.max() <= 1.0
    rows = attention_rows(model, images)
    assert list(rows) == ["X", "F", "Z", "B", "1-Z"]
    for panels in rows.values():
        assert panels.shape == (3, HEIGHT, WIDTH, 3) and panels.dtype == np.uint8
    # Row X is the image itself; the overlays change it.
    assert np.abs(rows["X"].astype(int) - (images.permute(0, 2, 3, 1).numpy() * 255).round()).max() <= 1
    assert all(np.abs(rows[name].astype(int) - rows["X"]).mean() > 5 for name in ("F", "Z", "B", "1-Z"))
    grid = attention_grid(model, images)
    assert grid.size == (28 + 3 * (WIDTH + 2) + 2, 5 * (HEIGHT + 2) + 2)


def test_cli_export_and_visualize(training_checkpoint: Path, tiny_market_root: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    onnx_path, pt_path = tmp_path / "model.onnx", tmp_path / "inference.pt"
    result = runner.invoke(typer_app, [
        "export", "--checkpoint", str(training_checkpoint), "--output", str(onnx_path),
        "--inference-checkpoint", str(pt_path), "--height", str(HEIGHT), "--width", str(WIDTH),
    ])
    assert result.exit_code == 0, result.output
    assert "onnxruntime matches PyTorch" in result.output
    assert onnx_path.stat().st_size > 10_000_000  # the ResNet50 weights are inside
    payload = read_checkpoint(pt_path)
    assert payload["kind"] == "inference" and payload["meta"]["init"] == "random"
    assert not any(k.startswith(("background_branch.", "camera_classifiers.")) for k in payload["state_dict"])

    grid_path = tmp_path / "grid.png"
    images = [str(p) for p in _person_images(tiny_market_root, 2)]
    result = runner.invoke(typer_app, ["visualize", *images, "--checkpoint", str(training_checkpoint),
                                       "--output", str(grid_path)])
    assert result.exit_code == 0, result.output
    with Image.open(grid_path) as grid:
        assert grid.format == "PNG"
        # The checkpoint's own input size (128x64) is used; 5 rows, 2 columns.
        assert grid.size == (28 + 2 * (WIDTH + 2) + 2, 5 * (HEIGHT + 2) + 2)

    # An inference checkpoint has no background branch: only X, F and Z are drawn.
    result = runner.invoke(typer_app, ["visualize", *images, "--checkpoint", str(pt_path),
                                       "--output", str(tmp_path / "fg.png"), "--height", "64", "--width", "32"])
    assert result.exit_code == 0, result.output
    assert "rows: X, F, Z" in result.output
    with Image.open(tmp_path / "fg.png") as grid:
        assert grid.size == (28 + 2 * (32 + 2) + 2, 3 * (64 + 2) + 2)


def test_cli_export_half_and_re_export(training_checkpoint: Path, tmp_path: Path) -> None:
    """--half stores float16 (about half the file) with features within fp16 rounding; exporting an
    exported checkpoint again works (a plausible workflow) and keeps its metadata."""
    runner = CliRunner()
    full, half, again = tmp_path / "full.pt", tmp_path / "half.pt", tmp_path / "again.pt"
    for path, extra in ((full, []), (half, ["--half"])):
        result = runner.invoke(typer_app, ["export", "--checkpoint", str(training_checkpoint),
                                           "--inference-checkpoint", str(path), *extra])
        assert result.exit_code == 0, result.output
    assert half.stat().st_size < 0.6 * full.stat().st_size
    payload = read_checkpoint(half)
    assert payload["state_dict"]["low_level.0.weight"].dtype == torch.float16
    assert payload["meta"]["epochs_trained"] == 1 and payload["meta"]["dataset"] == "market1501"
    assert payload["meta"]["source"] == training_checkpoint.name
    images = torch.rand(2, 3, HEIGHT, WIDTH)
    with torch.no_grad():
        reference, halved = load_inference_model(full)(images), load_inference_model(half)(images)
    assert halved.dtype == torch.float32
    assert float((reference - halved).abs().max()) < 0.05 * float(reference.abs().max())
    result = runner.invoke(typer_app, ["export", "--checkpoint", str(half), "--inference-checkpoint", str(again)])
    assert result.exit_code == 0, result.output
    assert read_checkpoint(again)["meta"]["epochs_trained"] == 1
