"""The evaluation pipeline that feeds :func:`fanet.evaluation.evaluate_rank`: loaders → features
(flip-averaged or not) → pids/camids → metrics, and ``reid-app evaluate`` with ``--rerank`` and
``--no-flip``, each compared with an independent computation on data with same-camera matches.

``evaluate_rank`` itself is tested in test_evaluation.py; what is checked here is that the camera
ids, the flip and the re-ranking really reach it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluation import reference_eval_market1501
from test_rerank_reference import reference_rerank
from typer.testing import CliRunner

from fanet import FANet, FANetConfig, load_inference_model, save_inference_checkpoint
from fanet.engine.evaluator import evaluate_model
from reid_app.cli import typer_app


class HalvesColour(torch.nn.Module):
    """A model with known features: mean RGB of the left half, then of the right half (6-d).

    Mirroring an image swaps its halves, so the flip-averaged feature of an image whose halves
    have colours a and b is the direction of (a + b, a + b), and without flip that of (a, b).
    """

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # embed_images reads the device from it

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        half = images.shape[-1] // 2
        return torch.cat([images[..., :half].mean(dim=(2, 3)), images[..., half:].mean(dim=(2, 3))], dim=1)


def halves_image(left: tuple[float, ...], right: tuple[float, ...], size: int = 4) -> torch.Tensor:
    image = torch.empty(3, size, size)
    image[:, :, : size // 2] = torch.tensor(left)[:, None, None]
    image[:, :, size // 2 :] = torch.tensor(right)[:, None, None]
    return image


def batches(images: list[torch.Tensor], pids: list[int], camids: list[int], size: int) -> list[dict]:
    """What the test loaders yield: dicts of batched images, pids and camids."""
    return [
        {
            "image": torch.stack(images[i : i + size]),
            "pid": torch.tensor(pids[i : i + size]),
            "camid": torch.tensor(camids[i : i + size]),
        }
        for i in range(0, len(images), size)
    ]


def test_same_camera_match_is_removed_hand_worked() -> None:
    # q0 (pid 1, camera 0) has colour halves red | red.
    #   g0: pid 1, camera 0, red | red       -> distance 0, but same pid AND camera: not counted
    #   g1: pid 2, camera 1, red | green     -> cosine 1/2, distance 0.5: a miss
    #   g2: pid 1, camera 1, green | green   -> cosine 0, distance 1: the first valid hit, rank 2
    # CMC = [0, 1, 1], AP = 1/2. Had g0 counted: rank-1 hit and AP = (1 + 2/3) / 2.
    red, green = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)
    query = batches([halves_image(red, red)], [1], [0], size=1)
    gallery = batches([halves_image(red, red), halves_image(red, green), halves_image(green, green)], [1, 2, 1],
                      [0, 1, 1], size=2)
    for flip in (False, True):  # g1's flip-averaged feature (red+green on both halves) is also at 0.5
        result = evaluate_model(HalvesColour(), query, gallery, flip=flip)
        np.testing.assert_allclose(result.cmc, [0.0, 1.0, 1.0])
        assert result.mAP == pytest.approx(0.5)
        assert (result.num_query, result.num_gallery) == (1, 3)


def expected_features(halves: np.ndarray, flip: bool) -> np.ndarray:
    """(N, 2, 3) half colours → l2-normalised features, written out independently of the model."""
    left, right = halves[:, 0], halves[:, 1]
    raw = np.concatenate([left + right, right + left], axis=1) if flip else np.concatenate([left, right], axis=1)
    return raw / np.linalg.norm(raw, axis=1, keepdims=True)


@pytest.mark.parametrize("flip", [False, True])
def test_evaluate_model_equals_an_independent_computation(flip: bool) -> None:
    """Random identities over 3 cameras, every query with a near-copy of itself on its own camera;
    metrics must be those of the Market-1501 protocol on the true camera ids."""
    rng = np.random.default_rng(7)
    num_ids = 6
    # Each identity: a base colour per half; images are noisy versions, asymmetric left/right so
    # that flip matters.
    base = rng.uniform(0.1, 0.9, (num_ids, 2, 3))
    q_pids = np.arange(num_ids)
    q_cams = rng.integers(0, 3, num_ids)
    g_pids = np.concatenate([q_pids, np.repeat(q_pids, 3)])
    g_cams = np.concatenate([q_cams, rng.integers(0, 3, 3 * num_ids)])  # the first 6: same camera as the query
    q_halves = np.clip(base[q_pids] + 0.15 * rng.standard_normal((num_ids, 2, 3)), 0, 1)
    g_halves = np.concatenate([
        np.clip(q_halves + 0.01 * rng.standard_normal(q_halves.shape), 0, 1),  # near-copies of the queries
        np.clip(base[g_pids[num_ids:]] + 0.15 * rng.standard_normal((3 * num_ids, 2, 3)), 0, 1),
    ])
    # Every query keeps at least one match on another camera.
    for pid in q_pids:
        others = np.flatnonzero((g_pids == pid) & (np.arange(len(g_pids)) >= num_ids))
        if (g_cams[others] == q_cams[pid]).all():
            g_cams[others[0]] = (q_cams[pid] + 1) % 3

    def loader(halves: np.ndarray, pids: np.ndarray, cams: np.ndarray) -> list[dict]:
        images = [halves_image(tuple(h[0]), tuple(h[1])) for h in halves.astype(np.float32)]
        return batches(images, pids.tolist(), cams.tolist(), size=5)

    result = evaluate_model(
        HalvesColour(), loader(q_halves, q_pids, q_cams), loader(g_halves, g_pids, g_cams), flip=flip
    )

    query, gallery = expected_features(q_halves, flip), expected_features(g_halves, flip)
    distance = 1.0 - query @ gallery.T
    cmc, mean_ap, valid = reference_eval_market1501(distance, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    assert valid == num_ids
    np.testing.assert_allclose(result.cmc[:10], cmc, atol=1e-6)
    assert result.mAP == pytest.approx(mean_ap, abs=1e-6)
    # The near-copies are near the top: counting them would give much better numbers.
    cmc_without_cameras, map_without_cameras, _ = reference_eval_market1501(
        distance, q_pids, g_pids, np.full(num_ids, -1), np.full(len(g_pids), -2), max_rank=10
    )
    assert map_without_cameras > result.mAP + 0.05 and cmc_without_cameras[0] > result.cmc[0]


# --------------------------------------------------------------------------- reid-app evaluate

HEIGHT, WIDTH = 64, 32
MARKET_NAME = re.compile(r"^(-?\d+)_c(\d)")


def _market_image(rng: np.random.Generator, pattern: np.ndarray, tint: np.ndarray) -> Image.Image:
    """A blocky 128x64 'person' from an identity's 8x4 colour pattern, with noise and a camera tint."""
    blocks = np.clip(pattern * tint + 0.08 * rng.standard_normal(pattern.shape), 0, 1)
    pixels = np.kron(blocks, np.ones((16, 16, 1)))
    return Image.fromarray((pixels * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def market_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Market-1501 layout with 6 query identities (one query each), 3 gallery images per
    identity of which one is on the query's own camera, 2 distractors and 1 junk image:
    6 + 20 images, more than re-ranking's k1 = 20."""
    rng = np.random.default_rng(1501)
    root = tmp_path_factory.mktemp("market_eval") / "Market-1501-v15.09.15"
    folders = {name: root / name for name in ("bounding_box_train", "query", "bounding_box_test")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    # Identities close to each other and strong camera tints: an image on the query's own camera
    # is nearer than the identity's images on other cameras (which is what makes the same-camera
    # rule matter here).
    tints = rng.uniform(0.6, 1.4, (7, 3))
    patterns = np.clip(rng.uniform(0.2, 0.8, (8, 4, 3)) + 0.3 * rng.standard_normal((8, 8, 4, 3)), 0, 1)
    _market_image(rng, patterns[7], tints[1]).save(folders["bounding_box_train"] / "0099_c1s1_000151_01.jpg")
    for pid in range(1, 7):
        query_camera = pid % 3 + 1
        _market_image(rng, patterns[pid], tints[query_camera]).save(
            folders["query"] / f"{pid:04d}_c{query_camera}s1_000151_01.jpg"
        )
        for number, camera in enumerate((query_camera, query_camera % 6 + 1, (query_camera + 2) % 6 + 1)):
            _market_image(rng, patterns[pid], tints[camera]).save(
                folders["bounding_box_test"] / f"{pid:04d}_c{camera}s1_{(number + 2) * 151:06d}_01.jpg"
            )
    for number, camera in enumerate((2, 5)):
        _market_image(rng, patterns[0], tints[camera]).save(
            folders["bounding_box_test"] / f"0000_c{camera}s1_{(number + 1) * 151:06d}_01.jpg"
        )
    _market_image(rng, patterns[0], tints[3]).save(folders["bounding_box_test"] / "-1_c3s1_000151_01.jpg")
    return root.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, market_root: Path) -> Path:
    """A random-init FA-Net whose BatchNorm statistics are those of the test images.

    Straight from random init, every image's feature is almost the same vector (cosine ~0.999),
    so rankings would hang on float rounding. Taking the BN statistics from the images
    themselves (as AdaBN does) spreads the features out; the weights stay random.
    """
    torch.manual_seed(0)
    model = FANet(FANetConfig(), num_classes=0).eval()
    images = torch.cat([_split(market_root, "query")[0], _split(market_root, "bounding_box_test")[0]])
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train()  # the model itself stays in eval mode and returns features
            module.momentum = None  # cumulative average: after one batch, that batch's statistics
            module.reset_running_stats()
    with torch.no_grad():
        model(images)
    model.eval()
    return save_inference_checkpoint(
        model, tmp_path_factory.mktemp("eval_ckpt") / "fanet.pt", input_size=[HEIGHT, WIDTH], init="random"
    )


def _split(root: Path, name: str) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Images, pids and 0-based camera ids of one split, read here without fanet.data."""
    images, pids, cams = [], [], []
    for path in sorted((root / "Market-1501-v15.09.15" / name).glob("*.jpg")):
        pid, camera = (int(v) for v in MARKET_NAME.match(path.name).groups())
        if pid == -1:
            continue
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)
        images.append(torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float() / 255.0)
        pids.append(pid)
        cams.append(camera - 1)
    return torch.stack(images), np.array(pids), np.array(cams)


def _features(model: torch.nn.Module, images: torch.Tensor, flip: bool) -> np.ndarray:
    with torch.no_grad():
        features = model(images) + (model(images.flip(-1)) if flip else 0)
    features = features.double().numpy()
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def _printed_metrics(output: str) -> dict[str, float]:
    fields = output.strip().splitlines()[-1].split()
    return {name: float(value.rstrip("%")) for name, value in zip(fields[::2], fields[1::2], strict=True)}


@pytest.mark.parametrize(("rerank", "flip"), [(False, True), (False, False), (True, True), (True, False)])
def test_cli_evaluate_matches_an_independent_computation(
    market_root: Path, checkpoint: Path, rerank: bool, flip: bool
) -> None:
    args = ["evaluate", "--checkpoint", str(checkpoint), "--dataset", "market1501", "--data-root", str(market_root),
            "--workers", "0", "--device", "cpu"]
    args += ["--rerank"] if rerank else []
    args += [] if flip else ["--no-flip"]
    result = CliRunner().invoke(typer_app, args)
    assert result.exit_code == 0, result.output
    header = result.output.strip().splitlines()[-2]
    assert header.startswith("market1501 (6 queries, 20 gallery images)")
    assert ("re-ranked" in header) == rerank and ("flip" in header) == flip
    printed = _printed_metrics(result.output)

    model = load_inference_model(checkpoint).eval()
    q_images, q_pids, q_cams = _split(market_root, "query")
    g_images, g_pids, g_cams = _split(market_root, "bounding_box_test")
    query, gallery = _features(model, q_images, flip), _features(model, g_images, flip)
    # Re-ranking with its defaults k1 = 20, k2 = 6, lambda = 0.3.
    distance = reference_rerank(query, gallery, 20, 6, 0.3) if rerank else 1.0 - query @ gallery.T
    # No near-ties that float rounding (float32 in the CLI, float64 here) could reorder.
    ordered = np.sort(distance, axis=1)
    assert np.diff(ordered, axis=1).min() > 1e-6
    cmc, mean_ap, valid = reference_eval_market1501(distance, q_pids, g_pids, q_cams, g_cams, max_rank=20)
    assert valid == 6
    # Without its same-camera image, each query has 19 gallery images: R20 is R19.
    expected = {"mAP": 100 * mean_ap, **{f"R{k}": 100 * cmc[min(k, len(cmc)) - 1] for k in (1, 5, 10, 20)}}
    assert printed == pytest.approx(expected, abs=0.006)
    # The same-camera copies are near: ignoring the cameras would give other numbers.
    _, map_without_cameras, _ = reference_eval_market1501(
        distance, q_pids, g_pids, np.full(len(q_pids), -1), np.full(len(g_pids), -2), max_rank=20
    )
    assert abs(100 * map_without_cameras - printed["mAP"]) > 3.0
