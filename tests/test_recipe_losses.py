"""The recipe terms added to Eq. 6 (``LossConfig``): label smoothing and a batch-hard triplet loss.

Both are off by default, so the paper's objective stays what ``FANetLoss`` computes unless a run
asks for them; the triplet loss is checked against a brute-force loop over every anchor.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as functional

from fanet import FANet, FANetConfig, FANetLoss
from fanet.config import LossConfig, TrainConfig
from fanet.losses import batch_hard_triplet_loss
from reid_app.commands.fanet_cmds import build_train_config
from reid_app.errors import ReidAppError


def _brute_force_triplet(features: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    unit = functional.normalize(features, dim=1)
    terms = []
    for anchor in range(len(labels)):
        positives = [
            (unit[anchor] - unit[j]).norm() for j in range(len(labels)) if j != anchor and labels[j] == labels[anchor]
        ]
        negatives = [(unit[anchor] - unit[j]).norm() for j in range(len(labels)) if labels[j] != labels[anchor]]
        if positives and negatives:
            terms.append(torch.relu(max(positives) - min(negatives) + margin))
    return torch.stack(terms).mean()


def test_batch_hard_triplet_matches_a_loop_over_anchors() -> None:
    torch.manual_seed(0)
    features = torch.randn(12, 20)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 7])  # the lone 7 has no positive: left out
    expected = _brute_force_triplet(features, labels, 0.3)
    assert expected > 0
    assert torch.allclose(batch_hard_triplet_loss(features, labels, 0.3), expected, atol=1e-5)


def test_batch_hard_triplet_is_zero_for_separated_identities_and_trains_otherwise() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    separated = torch.eye(3).repeat_interleave(2, dim=0) * 5
    assert batch_hard_triplet_loss(separated, labels, 0.3).item() == 0.0
    mixed = torch.eye(3)[[0, 1, 1, 2, 2, 0]].clone().requires_grad_(True)  # each pair split across ids
    loss = batch_hard_triplet_loss(mixed, labels, 0.3)
    loss.backward()
    assert loss.item() > 0.3 and mixed.grad.abs().sum() > 0
    # No anchor with both a positive and a negative: nothing to learn, and no NaN.
    assert batch_hard_triplet_loss(torch.randn(3, 4), torch.tensor([0, 1, 2]), 0.3).item() == 0.0


@pytest.fixture(scope="module")
def small_output() -> tuple[FANetConfig, object, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    config = FANetConfig(backbone="mobilenetv2", tem_k=8)
    model = FANet(config, num_classes=4, num_cameras=3).train()
    images = torch.rand(8, 3, 64, 32)
    return config, model(images), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.tensor([0, 1, 0, 1, 2, 0, 1, 2])


def test_default_loss_is_the_papers_objective(small_output) -> None:
    config, output, pids, camids = small_output
    default = FANetLoss(config)(output, pids, camids)
    assert "triplet" not in default
    expected = 0.5 * (default["person_id"] + default["camera_id"]) + default["target_attention"]
    assert torch.allclose(default["total"], expected)


def test_recipe_terms_change_the_objective_as_configured(small_output) -> None:
    config, output, pids, camids = small_output
    plain = FANetLoss(config)(output, pids, camids)
    recipe = FANetLoss(config, LossConfig(label_smoothing=0.1, triplet_weight=2.0, triplet_margin=0.3))(
        output, pids, camids
    )
    smoothed = torch.stack(
        [functional.cross_entropy(x, pids, label_smoothing=0.1) for x in output.person_logits]
    ).mean()
    assert torch.allclose(recipe["person_id"], smoothed)
    assert not torch.allclose(recipe["person_id"], plain["person_id"])
    triplet = batch_hard_triplet_loss(output.features, pids, 0.3)
    assert torch.allclose(recipe["triplet"], triplet)
    expected = 0.5 * (recipe["person_id"] + recipe["camera_id"]) + recipe["target_attention"] + 2.0 * triplet
    assert torch.allclose(recipe["total"], expected)


def test_loss_settings_come_from_flags_and_survive_the_run_config() -> None:
    config = build_train_config(TrainConfig(), label_smoothing=0.1, triplet_weight=1.0, triplet_margin=0.2)
    assert config.loss == LossConfig(label_smoothing=0.1, triplet_weight=1.0, triplet_margin=0.2)
    assert TrainConfig.from_dict(config.to_dict()).loss == config.loss
    # A run folder written before the loss settings existed resumes with the paper's objective.
    old = config.to_dict()
    del old["loss"]
    assert TrainConfig.from_dict(old).loss == LossConfig()
    with pytest.raises(ReidAppError, match="label_smoothing"):
        build_train_config(TrainConfig(), label_smoothing=1.5)
    assert dataclasses.replace(config, loss=LossConfig()).loss.triplet_weight == 0.0


def test_batch_hard_triplet_is_computed_in_float32_under_autocast() -> None:
    torch.manual_seed(0)
    features = torch.randn(16, 3840)
    labels = torch.arange(4).repeat_interleave(4)
    exact = batch_hard_triplet_loss(features, labels, margin=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = batch_hard_triplet_loss(features, labels, margin=0.3)
    assert under_autocast.dtype == torch.float32
    assert float(under_autocast) == pytest.approx(float(exact), abs=1e-6)
