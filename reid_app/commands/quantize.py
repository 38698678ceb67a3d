"""``reid-app quantize``: an int8 graph of the embedder, kept only if the gate accepts it
(:mod:`reid_app.quantize`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer

from reid_app.commands.fanet_cmds import DATASETS, fanet_errors
from reid_app.errors import ReidAppError
from reid_app.quantize import DEFAULT_CALIBRATION_CROPS, DEFAULT_GATE, TOLERANCE_POINTS, parse_gate


class Int8Rejected(ReidAppError):
    """The gate refused the int8 graph: the figures are printed, nothing is written."""


def _progress(line: str) -> None:
    typer.echo(line, err=True)  # stdout carries the result table only


def quantize_command(
    data_root: str = typer.Option(
        ..., "--data-root", help="Folder holding the gate's datasets (CUHK03's folder and/or peta_reid/)."
    ),
    weights: str | None = typer.Option(None, "--weights", help="FA-Net checkpoint (default: the shipped one)."),
    gate: str = typer.Option(
        ",".join(DEFAULT_GATE), "--gate",
        help=f"Protocols int8 must keep within {TOLERANCE_POINTS:g} point of float32 (R1 and mAP): any of "
        f"{', '.join(DATASETS)}, dg.",
    ),  # fmt: skip
    calibration: Path | None = typer.Option(
        None, "--calibration",
        help="Person crops (a folder of images) or video(s) to calibrate on (default: sample_videos/).",
    ),  # fmt: skip
    crops: int = typer.Option(DEFAULT_CALIBRATION_CROPS, "--crops", help="Calibration crops to use."),
    json_file: Path | None = typer.Option(None, "--json", help="Also write the record (figures) to this file."),
) -> None:
    """Quantise the embedder to int8 and keep it only if CUHK03 and DG stay within 1 point; then
    use it with --int8 on ingest, search, serve and evaluate."""
    from reid_app.quantize import quantise_checkpoint  # noqa: PLC0415

    protocols = parse_gate(gate, DATASETS)
    with fanet_errors():
        record = quantise_checkpoint(weights, data_root, protocols, calibration, crops, log=_progress)
    if json_file is not None:
        json_file.write_text(json.dumps(asdict(record), indent=2) + "\n")
    typer.echo(f"{'protocol':<10}{'float32 R1/mAP':>16}{'int8 R1/mAP':>14}")
    for protocol, result in record.figures.items():
        f32, int8 = result["float32"], result["int8"]
        typer.echo(
            f"{protocol:<10}{f32['R1']:>9.1f} / {f32['mAP']:<4.1f}{int8['R1']:>8.1f} / {int8['mAP']:.1f}"
        )
    if not record.accepted:
        raise Int8Rejected(
            f"int8 rejected: it loses more than {TOLERANCE_POINTS:g} point on a gate protocol (figures above); "
            "nothing written"
        )
    typer.echo(
        f"int8 accepted ({record.float_layers} first layers and {record.pooled_float_layers} on pooled features "
        f"kept in float32, feature cosine "
        f"{record.feature_cosine:.4f}): use --int8"
    )


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_command)
