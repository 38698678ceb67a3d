"""Training and evaluation engine of fanet: the trainer (single process or ``torchrun`` DDP),
the paper's learning-rate schedule and test-time evaluation."""

from fanet.engine.evaluator import EvaluationResult, evaluate_model, extract_features
from fanet.engine.scheduler import WarmupMultiStepLR
from fanet.engine.trainer import PretrainedWeightsError, Trainer, TrainResult, load_training_model

__all__ = [
    "EvaluationResult",
    "PretrainedWeightsError",
    "TrainResult",
    "Trainer",
    "WarmupMultiStepLR",
    "evaluate_model",
    "extract_features",
    "load_training_model",
]
