"""Training on several sources at once (CUHK03 + the PETA training subsets from ../shared), the
camera loss on images without a camera, the identity cap of the sampler, and distillation from a
real teacher model (Intel's OpenVINO re-ID model) in a real training step."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import run_cli, tiny_peta_root, trimmed
from typer.testing import CliRunner

from fanet.checkpoint import read_checkpoint
from fanet.config import DataConfig, DatasetName, parse_sources
from fanet.data.datasets import UNKNOWN_CAMERA, build_dataset
from fanet.data.loaders import build_training_set
from fanet.data.peta import DG_TEST_SUBSETS, read_dg_splits, read_peta_labels, read_peta_train
from fanet.data.sampler import PKSampler
from fanet.losses import camera_id_loss, relational_distillation_loss
from reid_app.cli import typer_app as app

OMZ = "weights/openvino_omz_person_reid/intel"
TEACHER_0288 = f"{OMZ}/person-reidentification-retail-0288/FP16/person-reidentification-retail-0288.xml"


@pytest.fixture(scope="module")
def data_root(shared_dir: Path) -> Path:
    return shared_dir / "data"


def osnet_on_two_sources(shared_dir: Path, data_root: Path) -> list[str]:
    """``train`` arguments of the multi-source recipe: CUHK03 + PETA, OSNet from Intel's 0267."""
    weights = shared_dir / f"{OMZ}/person-reidentification-retail-0287/person-reidentification-retail-0267.onnx"
    return ["train", "--dataset", "cuhk03+peta", "--data-root", str(data_root), "--backbone", "osnet",
            "--last-stride", "2", "--pretrained", str(weights)]  # fmt: skip


def test_peta_training_set_never_holds_a_dg_test_image(data_root: Path) -> None:
    peta = read_peta_train(data_root)
    labels = {image.path: image for image in read_peta_labels(data_root).values()}
    subsets = Counter(labels[s.path].subset for s in peta.train)
    assert set(subsets) == {"CAVIAR4REID", "3DPeS", "SARC3D", "TownCentre"}
    assert not set(subsets) & set(DG_TEST_SUBSETS)
    assert sum(subsets.values()) == 1220 + 1012 + 200 + 6967
    # Three known cameras (CAVIAR4REID's two, TownCentre's one); 3DPeS and SARC3D have none.
    assert peta.num_train_cams == 3
    unknown = {labels[s.path].subset for s in peta.train if s.camid == UNKNOWN_CAMERA}
    assert unknown == {"3DPeS", "SARC3D"}
    with pytest.raises(ValueError, match="VIPeR are DG test sets"):
        read_peta_train(data_root, subsets=("VIPeR", "3DPeS"))


def test_sources_keep_their_identities_and_cameras_apart(data_root: Path) -> None:
    cuhk03 = build_dataset(DatasetName.CUHK03, data_root)
    peta = build_dataset(DatasetName.PETA, data_root)
    combined = build_training_set(DataConfig(dataset="cuhk03", extra_sources=("peta",), root=str(data_root)))
    assert combined.name == "cuhk03+peta"
    assert combined.num_train_pids == cuhk03.num_train_pids + peta.num_train_pids
    assert combined.num_train_cams == cuhk03.num_train_cams + peta.num_train_cams == 13
    assert len(combined.train) == len(cuhk03.train) + len(peta.train)
    cuhk03_part = combined.train[: len(cuhk03.train)]
    peta_part = combined.train[len(cuhk03.train) :]
    assert max(s.pid for s in cuhk03_part) < min(s.pid for s in peta_part)
    assert {s.camid for s in cuhk03_part} == set(range(10))
    assert {s.camid for s in peta_part} == {UNKNOWN_CAMERA, 10, 11, 12}
    assert combined.query == cuhk03.query and combined.gallery == cuhk03.gallery  # evaluated on the first


def test_source_names_parse_and_refuse_unknown_or_repeated() -> None:
    assert parse_sources("cuhk03+peta") == (DatasetName.CUHK03, (DatasetName.PETA,))
    with pytest.raises(ValueError, match="unknown dataset 'viper'"):
        parse_sources("cuhk03+viper")
    with pytest.raises(ValueError, match="named twice"):
        DataConfig(dataset="cuhk03", extra_sources=("cuhk03",))


def test_identity_cap_stops_video_tracks_from_filling_the_epoch(data_root: Path) -> None:
    combined = build_training_set(DataConfig(dataset="cuhk03", extra_sources=("peta",), root=str(data_root)))
    labels = {image.path: image.subset for image in read_peta_labels(data_root).values()}

    def town_centre_share(sampler: PKSampler) -> float:
        indices = [i for batch in sampler.epoch_batches(0) for i in batch]
        return sum(labels.get(combined.train[i].path) == "TownCentre" for i in indices) / len(indices)

    uncapped = PKSampler(combined.train, 16, 4, seed=0)
    capped = PKSampler(combined.train, 16, 4, max_per_identity=8, seed=0)
    assert town_centre_share(capped) < 0.6 * town_centre_share(uncapped)
    assert len(capped) < len(uncapped)
    # A capped identity still shows both of its cameras, and a new draw comes each epoch.
    pid = combined.train[0].pid
    by_epoch = [
        [i for batch in capped.epoch_batches(epoch) for i in batch if combined.train[i].pid == pid] for epoch in (0, 1)
    ]
    assert all(len({combined.train[i].camid for i in images}) == 2 for images in by_epoch if images)
    with pytest.raises(ValueError, match="must be >= K"):
        PKSampler(combined.train, 16, 4, max_per_identity=2)


def test_camera_loss_skips_images_without_a_camera() -> None:
    torch.manual_seed(0)
    logits = [torch.randn(4, 3, requires_grad=True) for _ in range(2)]
    cameras = torch.tensor([0, UNKNOWN_CAMERA, 2, UNKNOWN_CAMERA])
    known = torch.tensor([True, False, True, False])
    expected = torch.stack([torch.nn.functional.cross_entropy(x[known], cameras[known]) for x in logits]).mean()
    torch.testing.assert_close(camera_id_loss(logits, cameras), expected)
    none_known = camera_id_loss(logits, torch.full((4,), UNKNOWN_CAMERA))
    assert float(none_known.detach()) == 0.0
    none_known.backward()  # a batch of camera-less images still steps
    assert all(float(x.grad.abs().sum()) == 0 for x in logits)


def test_relational_distillation_is_zero_for_the_teachers_geometry_and_pulls_towards_it() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(8, 16)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16))
    # Any feature space with the teacher's similarities (here rotated and in 32 dims) costs nothing.
    same_geometry = torch.cat([teacher @ rotation, torch.zeros(8, 16)], dim=1) * 3.0
    assert float(relational_distillation_loss(same_geometry, teacher, 0.1)) < 1e-5
    student = torch.randn(8, 32, requires_grad=True)
    before = relational_distillation_loss(student, teacher, 0.1)
    assert float(before.detach()) > 0.1
    before.backward()
    with torch.no_grad():
        stepped = student - 0.5 * student.grad
    assert float(relational_distillation_loss(stepped, teacher, 0.1)) < float(before)


def test_train_command_distils_from_an_openvino_teacher_on_two_sources(
    shared_dir: Path, data_root: Path, tmp_path: Path, tiny_folder_root: Path
) -> None:
    pytest.importorskip("openvino")
    run = tmp_path / "run"
    # The evaluations stay small: a tiny test set, and one real DG split cut to 8 queries a set.
    peta = data_root / "peta_reid"
    labels = read_peta_labels(peta)
    dg_root = tiny_peta_root(tmp_path, peta, trimmed(read_dg_splits(peta)[0], labels, queries=8, distractors=8))
    result = CliRunner().invoke(
        app,
        [
            *osnet_on_two_sources(shared_dir, data_root),
            "--variant", "fanet", "--height", "64", "--width", "32", "--batch-p", "4", "--batch-k", "2",
            "--epochs", "1", "--max-iters-per-epoch", "2", "--eval-period", "1", "--workers", "0",
            "--test-dataset", "folder", "--test-root", str(tiny_folder_root), "--dg-root", str(dg_root.parent),
            "--optimizer", "adam", "--lr", "0.00035", "--max-per-identity", "8",
            "--teacher", str(shared_dir / TEACHER_0288), "--output", str(run),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["dataset"] == "cuhk03" and config["data"]["extra_sources"] == ["peta"]
    assert config["teacher"].endswith("0288.xml") and config["loss"]["distill_weight"] == 1.0
    assert config["model"]["backbone"] == "osnet" and config["model"]["last_stride"] == 2
    rows = list(csv.DictReader((run / "results.csv").open()))
    assert rows[0]["init"] == "reid" and float(rows[0]["distillation_loss"]) > 0
    assert float(rows[0]["camera_id_loss"]) > 0
    # The evaluation ran both protocols: the test set's and the DG sets (cameras never trained on).
    assert 0 < float(rows[0]["R1"]) <= 1 and 0 < float(rows[0]["DG_R1"]) <= 1 and 0 < float(rows[0]["DG_mAP"]) <= 1
    assert "DG protocol: mean R1" in result.output
    # The teacher embedded only the images the two steps used, once each, and cached them.
    cache = torch.load(run / "teacher_features.pt", weights_only=True)
    assert cache["teacher"].endswith("0288.xml") and len(cache["paths"]) == len(cache["known"]) > 16_000
    assert 0 < int(cache["known"].sum()) <= 2 * 4 * 2 and cache["features"].shape[1] == 256
    assert torch.allclose(cache["features"][cache["known"]].norm(dim=1), torch.ones(int(cache["known"].sum())))


def test_distillation_on_some_rows_compares_only_those() -> None:
    """``distill_rows`` (the batch rows of the distilled sources): the term is the relational loss
    of those rows alone, and a batch with fewer than two of them adds nothing but still steps."""
    from fanet.config import FANetConfig, LossConfig
    from fanet.losses import FANetLoss
    from fanet.model import FANetOutput

    torch.manual_seed(0)
    criterion = FANetLoss(FANetConfig.variant("baseline"), LossConfig(distill_weight=1.0))
    features = torch.randn(6, 32, requires_grad=True)
    output = FANetOutput(person_logits=[torch.randn(6, 5)], features=features)
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    rows = torch.tensor([True, False, True, True, False, True])
    teacher = torch.randn(4, 16)
    terms = criterion(output, pids, pids, teacher, rows)
    torch.testing.assert_close(terms["distillation"], relational_distillation_loss(features[rows], teacher, 0.1))
    terms["distillation"].backward()
    assert float(features.grad[~rows].abs().sum()) == 0 and float(features.grad[rows].abs().sum()) > 0
    one_row = torch.tensor([False, False, True, False, False, False])
    assert float(criterion(output, pids, pids, None, one_row)["distillation"]) == 0.0
    with pytest.raises(ValueError, match="teacher's features of the distilled images"):
        criterion(output, pids, pids, torch.randn(6, 16), rows)


def test_train_command_distils_on_the_named_sources_only(shared_dir: Path, data_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            *osnet_on_two_sources(shared_dir, data_root),
            "--height", "64", "--width", "32", "--batch-p", "8", "--batch-k", "2", "--epochs", "1",
            "--max-iters-per-epoch", "3", "--eval-period", "0", "--workers", "0", "--optimizer", "adamw",
            "--teacher", str(shared_dir / TEACHER_0288), "--distill-sources", "peta", "--output", str(run),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["loss"]["distill_sources"] == ["peta"]
    rows = list(csv.DictReader((run / "results.csv").open()))
    assert float(rows[0]["distillation_loss"]) > 0
    # The teacher saw PETA images only: CUHK03's were neither embedded nor compared.
    cache = torch.load(run / "teacher_features.pt", weights_only=True)
    peta_paths = {s.path for s in build_dataset(DatasetName.PETA, data_root).train}
    distilled = [path for path, known in zip(cache["paths"], cache["known"].tolist(), strict=True) if known]
    assert distilled and set(distilled) <= peta_paths
    # The exported model says it learned from both sources (what the app and the model card show).
    exported = tmp_path / "exported.pt"
    result = CliRunner().invoke(
        app, ["export", "--checkpoint", str(run / "last.pt"), "--inference-checkpoint", str(exported)]
    )
    assert result.exit_code == 0, result.output
    assert read_checkpoint(exported)["meta"]["dataset"] == "cuhk03+peta"
    # Another ablation row with the same teacher and images starts from that cache (--teacher-cache)
    # instead of running the teacher again, and keeps a copy of its own.
    other_row = tmp_path / "baseline_row"
    result = CliRunner().invoke(
        app,
        [
            *osnet_on_two_sources(shared_dir, data_root),
            "--variant", "baseline", "--height", "64", "--width", "32", "--batch-p", "8", "--batch-k", "2",
            "--epochs", "1", "--max-iters-per-epoch", "1", "--eval-period", "0", "--workers", "0",
            "--teacher", str(shared_dir / TEACHER_0288), "--distill-sources", "peta",
            "--teacher-cache", str(run / "teacher_features.pt"), "--output", str(other_row),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{len(distilled)} of {len(cache['paths'])} images cached" in " ".join(result.output.split())
    reused = torch.load(other_row / "teacher_features.pt", weights_only=True)
    assert bool(reused["known"][cache["known"]].all())
    torch.testing.assert_close(reused["features"][cache["known"]], cache["features"][cache["known"]])


def test_train_command_refuses_unknown_sources_and_a_peta_only_run_with_evaluation(
    data_root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run_cli(["train", "--dataset", "cuhk03+viper", "--data-root", str(data_root)], capsys, monkeypatch)
    assert code != 0 and out == "" and err.count("\n") == 1 and "--dataset must be one of" in err
    code, out, err = run_cli(
        ["train", "--dataset", "peta", "--data-root", str(data_root), "--backbone", "mobilenetv2",
         "--eval-period", "5", "--epochs", "1"],
        capsys, monkeypatch,
    )  # fmt: skip
    assert code != 0 and err.count("\n") == 1 and "without a query/gallery split" in err
    for sources, message in (("msmt17", "msmt17 is not a training source (cuhk03+peta)"), ("viper", "unknown dataset")):
        code, out, err = run_cli(
            ["train", "--dataset", "cuhk03+peta", "--data-root", str(data_root), "--distill-sources", sources],
            capsys, monkeypatch,
        )  # fmt: skip
        assert code != 0 and err.count("\n") == 1 and message in err, err
    code, out, err = run_cli(
        ["train", "--dataset", "cuhk03+peta", "--data-root", str(data_root), "--teacher-cache", "nowhere/teacher.pt"],
        capsys, monkeypatch,
    )  # fmt: skip
    assert code != 0 and err.count("\n") == 1 and "teacher cache nowhere/teacher.pt not found" in err, err


def test_teacher_features_are_computed_once_per_image_and_reused_on_resume(
    shared_dir: Path, data_root: Path, tmp_path: Path
) -> None:
    pytest.importorskip("openvino")
    from fanet.engine.distillation import TeacherFeatures
    from reid_app.external_model import ExternalReIDModel

    model = ExternalReIDModel(shared_dir / TEACHER_0288)
    seen: list[int] = []

    def teacher(images: torch.Tensor) -> torch.Tensor:
        seen.append(len(images))
        return model(images)

    samples = build_dataset(DatasetName.CUHK03, data_root).train[:6]
    cache = tmp_path / "teacher_features.pt"
    features = TeacherFeatures(teacher, "0288", samples, 256, 128, cache)
    first = features(torch.tensor([0, 1, 2, 2]))
    second = features(torch.tensor([2, 3]))
    assert seen == [3, 1]  # each image once, whatever the batches repeat
    torch.testing.assert_close(first[2], second[0])
    torch.testing.assert_close(first[0], model(torch.stack([features._clean_image(0)]))[0])
    features.save()
    seen.clear()
    resumed = TeacherFeatures(teacher, "0288", samples, 256, 128, cache)
    torch.testing.assert_close(resumed(torch.tensor([3, 0])), torch.stack([second[1], first[0]]))
    assert seen == []
    other_teacher = TeacherFeatures(teacher, "0277", samples, 256, 128, cache)
    other_teacher(torch.tensor([0]))
    assert seen == [1]  # another teacher's cache is not reused
    seen.clear()
    second_stage_cache = tmp_path / "stage2" / "teacher_features.pt"
    second_stage_cache.parent.mkdir()
    second_stage = TeacherFeatures(teacher, "0288", samples, 256, 128, second_stage_cache, earlier_cache=cache)
    torch.testing.assert_close(second_stage(torch.tensor([0, 3])), torch.stack([first[0], second[1]]))
    assert seen == []  # an --init-from stage starts from the earlier stage's cache...
    second_stage.save()
    assert second_stage_cache.is_file()  # ...and keeps a copy of its own
    # A run on fewer images (one source of a multi-source run's) takes the features it shares by path.
    subset = TeacherFeatures(teacher, "0288", [samples[3], samples[0], samples[5]], 256, 128,
                             tmp_path / "subset.pt", earlier_cache=cache)  # fmt: skip
    assert subset.known.tolist() == [True, True, False]
    torch.testing.assert_close(subset(torch.tensor([0, 1])), torch.stack([second[1], first[0]]))
    assert seen == []
    subset(torch.tensor([2]))
    assert seen == [1]  # the one image the earlier run never embedded
