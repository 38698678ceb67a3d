"""MixStyle (Zhou et al., "Domain Generalization with MixStyle", ICLR 2021): a training-only
feature augmentation for cameras the model has never seen.

Why: the channel-wise mean and standard deviation of an early feature map carry an image's
"style" (light, colour cast, sensor, background tint: what a camera adds) more than the person.
Mixing those statistics between two images of a batch, with a random weight, shows the network
new styles built from its training cameras, so it learns features that depend less on them. The
paper's re-ID experiments put it after OSNet's conv2 and conv3 stages; here that is after the
shared low-level module (whose last stage is conv2 for OSNet) and after the first stage of each
branch (conv3). It has no parameters, so a model trained with it has exactly the structure and
checkpoint of one trained without (the two can be averaged), and it does nothing at inference.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from fanet.model import FANet


class MixStyle(nn.Module):
    """While training and with probability ``prob`` per batch, replaces each sample's channel
    statistics by a Beta(``alpha``, ``alpha``)-weighted mix of its own and those of a random other
    sample of the batch (the paper's random-shuffle variant; the statistics are not back-propagated
    through, as in the paper). It has no parameters or buffers, so attached to a model
    (:func:`attach_mixstyle`) it is one of the model's modules (found by ``model.modules()``, put in
    training or eval mode with it) while its state dict stays the same."""

    def __init__(self, prob: float = 0.5, alpha: float = 0.1, eps: float = 1e-6) -> None:
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"MixStyle probability must be in [0, 1], got {prob}")
        if alpha <= 0:
            raise ValueError(f"MixStyle alpha must be > 0, got {alpha}")
        self.enabled = True  # off while BatchNorm statistics are measured (fanet.engine.recalibration)
        self.prob = prob
        self.beta = torch.distributions.Beta(alpha, alpha)
        self.eps = eps

    def mix(self, features: Tensor) -> Tensor:
        batch = features.size(0)
        if batch < 2:
            return features
        # float32 statistics whatever the autocast dtype: a bf16 variance of small maps is too coarse
        x = features.float()
        mean = x.mean(dim=(2, 3), keepdim=True).detach()
        std = (x.var(dim=(2, 3), keepdim=True) + self.eps).sqrt().detach()
        weight = self.beta.sample((batch, 1, 1, 1)).to(x.device)
        other = torch.randperm(batch, device=x.device)
        mixed_mean = weight * mean + (1 - weight) * mean[other]
        mixed_std = weight * std + (1 - weight) * std[other]
        return ((x - mean) / std * mixed_std + mixed_mean).to(features.dtype)

    def forward(self, features: Tensor) -> Tensor:
        if not (self.enabled and self.training) or self.prob == 0 or torch.rand(()).item() >= self.prob:
            return features
        return self.mix(features)

    def _after(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        return self(output)


#: The attribute under which :func:`attach_mixstyle` registers the MixStyle module on the model.
MIXSTYLE_ATTRIBUTE = "mixstyle"


def attach_mixstyle(model: FANet, prob: float, alpha: float) -> MixStyle:
    """Hook MixStyle after ``model.low_level`` and after the first module (stage or block) of each
    branch of a FANet (each hook draws its own coin, as in the paper's code); the MixStyle module is
    registered on the model as ``model.mixstyle``."""
    if getattr(model, MIXSTYLE_ATTRIBUTE, None) is not None:
        raise ValueError("MixStyle is already attached to this model")
    mixstyle = MixStyle(prob, alpha)
    model.add_module(MIXSTYLE_ATTRIBUTE, mixstyle)
    mixstyle.train(model.training)
    targets = [model.low_level]
    for branch in (model.foreground_branch, model.background_branch):
        if branch is not None:
            targets.append(next(iter(branch.children())))
    for target in targets:
        target.register_forward_hook(mixstyle._after)
    return mixstyle


@contextmanager
def training_augmentation_suspended(model: nn.Module) -> Iterator[None]:
    """Within the block, every MixStyle module of ``model`` leaves features as they are."""
    mixers = [module for module in model.modules() if isinstance(module, MixStyle)]
    states = [mixer.enabled for mixer in mixers]
    for mixer in mixers:
        mixer.enabled = False
    try:
        yield
    finally:
        for mixer, state in zip(mixers, states, strict=True):
            mixer.enabled = state
