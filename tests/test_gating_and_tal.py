"""What FA-Net gates and what the target attention loss trains, asserted exactly.

Gradient-is-non-zero checks cannot tell ``F * Z`` from ``F * (1 - Z)``, nor a loss that uses
the mask from one that detaches it. Here the maps that reach the pyramid pooling are captured
with forward hooks and compared with F * Z and B * (1 - Z) computed from the same forward pass,
and the loss is checked by hand on maps where the background term ``B * Z`` is not zero,
together with its gradient with respect to Z.
"""

from __future__ import annotations

import math

import pytest
import torch

from fanet import FANet, FANetConfig, FANetLoss, target_attention_loss
from fanet.config import Variant
from fanet.losses import spatial_l2_normalise

NUM_CLASSES, NUM_CAMERAS = 4, 3
SMALL = (64, 32)  # ResNet50 maps of 4 x 2 with last stride 1: cheap on a CPU


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _skewed_mask(model: FANet) -> None:
    """Shift TEM's output away from 0.5, where F * Z and F * (1 - Z) would nearly agree."""
    with torch.no_grad():
        model.target_enhancement.attention_maps.bias.fill_(1.5)


def _pooling_inputs(model: FANet) -> dict[str, list[torch.Tensor]]:
    """Record the map each pooling head receives (one entry per forward call)."""
    seen: dict[str, list[torch.Tensor]] = {"foreground": [], "background": []}
    for name, module in (("foreground", model.foreground_pooling), ("background", model.background_pooling)):
        if module is not None:
            module.register_forward_hook(lambda _m, inputs, _out, name=name: seen[name].append(inputs[0].detach()))
    return seen


@pytest.mark.parametrize(
    ("variant", "foreground_gated", "background_gated"),
    [
        (Variant.BASELINE, False, None),
        (Variant.TEM, True, None),
        (Variant.TEM_BG, True, False),  # background branch, no interaction: B pooled as it is
        (Variant.TEM_BG_IA, True, True),
        (Variant.FANET, True, True),
    ],
)
def test_pooled_maps_are_exactly_f_times_z_and_b_times_one_minus_z(
    variant: Variant, foreground_gated: bool, background_gated: bool | None
) -> None:
    config = FANetConfig.variant(variant)
    model = FANet(config, num_classes=NUM_CLASSES, num_cameras=NUM_CAMERAS).train()
    if config.use_tem:
        _skewed_mask(model)
    seen = _pooling_inputs(model)
    output = model(torch.rand(2, 3, *SMALL))

    foreground, background, mask = output.foreground_map, output.background_map, output.foreground_mask
    (pooled_foreground,) = seen["foreground"]
    if foreground_gated:
        assert mask.shape == (2, 1, 4, 2)
        # The mask is really one-sided, so the wrong gate would give a very different map.
        assert float(mask.detach().min()) > 0.6 and float(mask.detach().max()) < 1.0
        torch.testing.assert_close(pooled_foreground, (foreground * mask).detach(), rtol=0, atol=0)
        assert not torch.allclose(pooled_foreground, (foreground * (1 - mask)).detach())
    else:
        assert mask is None
        torch.testing.assert_close(pooled_foreground, foreground.detach(), rtol=0, atol=0)

    if background_gated is None:
        assert background is None and seen["background"] == []
        return
    (pooled_background,) = seen["background"]
    expected = background * (1 - mask) if background_gated else background
    torch.testing.assert_close(pooled_background, expected.detach(), rtol=0, atol=0)
    if background_gated:
        assert not torch.allclose(pooled_background, (background * mask).detach())


def test_inference_features_pool_the_masked_foreground() -> None:
    """Eval mode: the features are the pyramid embeddings of F * Z, recomputed here step by step."""
    model = FANet(FANetConfig(), num_classes=0).eval()
    _skewed_mask(model)
    images = torch.rand(2, 3, *SMALL)
    with torch.no_grad():
        low = model.low_level((images - model.pixel_mean) / model.pixel_std)
        foreground = model.foreground_branch(low)
        mask = model.target_enhancement(foreground)
        expected = torch.cat(model.foreground_pooling(foreground * mask), dim=1)
        wrong = torch.cat(model.foreground_pooling(foreground * (1 - mask)), dim=1)
        features = model(images)
    torch.testing.assert_close(features, expected)
    assert (features - wrong).abs().max() > 1e-3


# --------------------------------------------------------------------------- target attention loss


def _maps_where_background_overlaps_the_mask() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One channel, a 2 x 1 map: F = [1, 1], B = [3, 4], Z = [0.25, 0.5] (B is non-zero where Z > 0).

    Spatially l2-normalised: F -> [1/sqrt 2, 1/sqrt 2], B -> [0.6, 0.8].
    """
    foreground = torch.tensor([1.0, 1.0]).view(1, 1, 2, 1).requires_grad_()
    background = torch.tensor([3.0, 4.0]).view(1, 1, 2, 1).requires_grad_()
    mask = torch.tensor([0.25, 0.5]).view(1, 1, 2, 1).requires_grad_()
    return foreground, background, mask


def test_target_attention_loss_counts_the_background_inside_the_mask() -> None:
    foreground, background, mask = _maps_where_background_overlaps_the_mask()
    f = 1 / math.sqrt(2)
    # Eq. 4: avg over positions of F^l2 (1 - Z) + B^l2 Z.
    eq4 = (f * 0.75 + 0.6 * 0.25 + f * 0.5 + 0.8 * 0.5) / 2
    assert float(target_attention_loss(foreground, background, mask, "eq4").detach()) == pytest.approx(eq4, rel=1e-6)
    # Eq. 7 (V2): the same without normalisation.
    v2 = (1.0 * 0.75 + 3.0 * 0.25 + 1.0 * 0.5 + 4.0 * 0.5) / 2
    assert float(target_attention_loss(foreground, background, mask, "v2").detach()) == pytest.approx(v2, rel=1e-6)


@pytest.mark.parametrize("variant", ["eq4", "v2"])
def test_target_attention_loss_gradient_reaches_the_mask(variant: str) -> None:
    """dL/dZ = (B' - F') / positions: TAL pushes Z up where the background responds less than the
    foreground, and down elsewhere. A detached mask would get no gradient at all."""
    foreground, background, mask = _maps_where_background_overlaps_the_mask()
    target_attention_loss(foreground, background, mask, variant).backward()
    if variant == "eq4":
        f_prime, b_prime = torch.full((2,), 1 / math.sqrt(2)), torch.tensor([0.6, 0.8])
    else:
        f_prime, b_prime = torch.ones(2), torch.tensor([3.0, 4.0])
    assert mask.grad is not None
    torch.testing.assert_close(mask.grad.view(2), (b_prime - f_prime) / 2)
    # F and B learn too: for V2, dL/dF = (1 - Z) / 2 and dL/dB = Z / 2.
    if variant == "v2":
        torch.testing.assert_close(foreground.grad.view(2), torch.tensor([0.75, 0.5]) / 2)
        torch.testing.assert_close(background.grad.view(2), torch.tensor([0.25, 0.5]) / 2)


def test_target_attention_loss_alone_trains_the_target_enhancement_module() -> None:
    """In the full model, back-propagating L_t only must reach TEM (through Z) and both branches."""
    config = FANetConfig()
    model = FANet(config, num_classes=NUM_CLASSES, num_cameras=NUM_CAMERAS).train()
    images = torch.rand(2, 3, *SMALL)
    # Both branches start as copies of the same res_conv4/5 weights (as from ImageNet in the
    # paper), so at initialisation B == F and L_t does not depend on Z at all. Training moves
    # them apart (person vs camera loss); a perturbed background branch stands in for that here.
    with torch.no_grad():
        output = model(images)
        torch.testing.assert_close(output.background_map, output.foreground_map, rtol=0, atol=0)
        for parameter in model.background_branch.parameters():
            parameter.mul_(1 + 0.2 * torch.randn_like(parameter))
    output = model(images)
    assert (output.background_map - output.foreground_map).abs().max() > 1e-3
    output.foreground_mask.retain_grad()
    terms = FANetLoss(config)(output, torch.tensor([0, 1]), torch.tensor([0, 2]))
    terms["target_attention"].backward()

    tem_grad = sum(float(p.grad.abs().sum()) for p in model.target_enhancement.parameters() if p.grad is not None)
    assert tem_grad > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.background_branch.parameters())
    # The gradient TAL sends to Z is exactly the per-position sum over channels of (B' - F') / numel.
    f_prime = spatial_l2_normalise(output.foreground_map.detach())
    b_prime = spatial_l2_normalise(output.background_map.detach())
    expected = (b_prime - f_prime).sum(dim=1, keepdim=True) / f_prime.numel()
    torch.testing.assert_close(output.foreground_mask.grad, expected)
    # The classifiers take no part in L_t.
    assert all(p.grad is None for p in model.person_classifiers.parameters())
