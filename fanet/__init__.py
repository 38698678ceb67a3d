"""fanet: a PyTorch implementation of FA-Net, "An End-to-End Foreground-Aware Network for
Person Re-Identification" (Liu et al., IEEE TIP).

Public API::

    from fanet import FANet, FANetConfig
    model = FANet(FANetConfig(), num_classes=751, num_cameras=6)
    features = model.eval()(images)            # (N, 3840)
    fanet.evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids)  # (cmc, mAP)
"""

from fanet.checkpoint import (
    CheckpointError,
    load_inference_model,
    save_inference_checkpoint,
    untrained_inference_model,
)
from fanet.config import DataConfig, FANetConfig, SolverConfig, TALVariant, TrainConfig, Variant
from fanet.inference import embed_images, preprocess_bgr
from fanet.losses import FANetLoss, target_attention_loss
from fanet.model import FANet, FANetOutput

__all__ = [
    "CheckpointError",
    "DataConfig",
    "FANet",
    "FANetConfig",
    "FANetLoss",
    "FANetOutput",
    "SolverConfig",
    "TALVariant",
    "TrainConfig",
    "Variant",
    "embed_images",
    "evaluate_rank",
    "load_inference_model",
    "preprocess_bgr",
    "save_inference_checkpoint",
    "target_attention_loss",
    "untrained_inference_model",
]


def __getattr__(name: str):  # evaluation is imported lazily: it pulls in faiss
    if name == "evaluate_rank":
        from fanet.evaluation import evaluate_rank

        return evaluate_rank
    raise AttributeError(f"module 'fanet' has no attribute {name!r}")
