"""Re-estimating BatchNorm statistics for weights that no training step produced (an average of
checkpoints, a backbone moved towards its pretrained weights: fanet/engine/averaging.py). Their
running statistics are the average of the inputs' statistics, not the statistics of the averaged
network's activations; a forward pass over training images measures the right ones (the BN
update of stochastic weight averaging, Izmailov et al., UAI 2018)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from fanet.engine.mixstyle import training_augmentation_suspended
from fanet.model import FANet


def recalibrate_batchnorm(model: FANet, batches: Iterable[Tensor]) -> int:
    """Re-estimate the running mean and variance of every BatchNorm of ``model`` (a frozen low-level
    module included) as the plain average over ``batches`` of images (SWA's BN update), measured on
    the network as it runs at inference (training-only feature augmentation such as MixStyle
    suspended); the model's mode and each norm's momentum are restored. Returns the number of
    batches seen; none at all is an error (the statistics would be left reset)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, {k: v.clone() for k, v in m.state_dict().items()}) for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches
    was_training, frozen = model.training, model.low_level_frozen
    model.low_level_frozen = False
    model.train()
    seen = 0
    try:
        with training_augmentation_suspended(model), torch.no_grad():
            for images in batches:
                model(images)
                seen += 1
    finally:
        for norm, (momentum, state) in zip(norms, saved, strict=True):
            norm.momentum = momentum
            if seen == 0:
                norm.load_state_dict(state)
        model.low_level_frozen = frozen
        model.train(was_training)
    if seen == 0:
        raise ValueError("no batch to re-estimate the BatchNorm statistics on")
    return seen
