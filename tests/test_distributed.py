"""Distributed data-parallel training: two CPU processes (gloo), as ``torchrun --nproc-per-node 2``
would start them, train FA-Net on different PK batches and must end with identical weights."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from fanet.config import DataConfig, SolverConfig, TrainConfig

WORLD_SIZE = 2


def parameters_sha256(model: torch.nn.Module) -> str:
    """Hash of every parameter's name and exact values. (BatchNorm running statistics are not
    parameters: each replica updates them from its own batch, and rank 0's are the ones saved.)"""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _replica(rank: int, root: str, output: str, report_dir: str, port: int) -> None:
    # The environment torchrun sets for each process.
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(WORLD_SIZE),
    })
    torch.set_num_threads(1)
    from fanet.engine.trainer import Trainer

    config = TrainConfig(
        data=DataConfig(root=root, height=64, width=32, num_identities=4, num_instances=2, workers=0),
        solver=SolverConfig(epochs=1, base_lr=0.05, warmup_start_lr=0.05, warmup_epochs=0),
        output_dir=output, random_init=True, eval_period=0, max_iters_per_epoch=2, device="cpu",
    )
    trainer = Trainer(config, show_progress=False)
    before = parameters_sha256(trainer.model)
    trainer.train_loader.set_epoch(0)
    first_batch = next(iter(trainer.train_loader))["index"].tolist()
    result = trainer.train()
    report = {
        "rank": rank,
        "world_size": trainer.context.world_size,
        "before": before,
        "after": parameters_sha256(trainer.model),
        "first_batch": first_batch,
        "run_dir": str(result.run_dir),
        "wrote_final": result.final_inference_checkpoint is not None,
    }
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(report))


def test_two_process_gloo_training_keeps_replicas_identical(tiny_market_root: Path, tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    output = tmp_path / "ddp_run"
    mp.spawn(
        _replica,
        args=(str(tiny_market_root), str(output), str(reports), _free_port()),
        nprocs=WORLD_SIZE,
        join=True,
    )
    rank0, rank1 = (json.loads((reports / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE))
    assert rank0["world_size"] == rank1["world_size"] == WORLD_SIZE
    # The replicas saw different shares of the epoch's PK batches...
    assert rank0["first_batch"] != rank1["first_batch"]
    assert rank0["before"] == rank1["before"]
    # ...trained (the weights moved) and stayed identical: gradients were averaged.
    assert rank0["after"] != rank0["before"]
    assert rank0["after"] == rank1["after"]
    # Only rank 0 wrote the run folder, and it is the folder both ranks agreed on.
    assert rank0["run_dir"] == rank1["run_dir"] == str(output)
    assert rank0["wrote_final"] and not rank1["wrote_final"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp_run", "reports"]
    assert {"last.pt", "results.csv", "config.json", "model_final.pt"} <= {p.name for p in output.iterdir()}
    payload = torch.load(output / "last.pt", map_location="cpu", weights_only=True)
    assert payload["world_size"] == WORLD_SIZE and len(payload["rng"]) == WORLD_SIZE
    assert payload["iteration"] == 2
