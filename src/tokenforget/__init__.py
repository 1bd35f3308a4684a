"""tokenforget: token-level forgetting for LLM fine-tuning (Taheri et al., arXiv 2508.04329).

The data's journey: `data` (records -> tokens with response masks) -> `score` (CE_base - CE_ref per
token) -> `partition` (global ranking into +1/-1 classes) -> `train` (`ForgettingTrainer`) ->
`evaluate` -> `report`. `pipeline.Run` ties the stages to one run folder.
"""

from tokenforget.config import DataConfig, ModelConfig, PartitionConfig, RunConfig, TrainConfig, TrainingConfig
from tokenforget.losses import OBJECTIVES, SCHEDULES, TokenCounts, forgetting_loss, token_cross_entropy

__version__ = "0.1.0"


def __getattr__(name: str):  # heavy imports (transformers Trainer) only when asked for
    if name in ("ForgettingMixin", "ForgettingTrainer", "TokenClassCollator"):
        from tokenforget import train

        return getattr(train, name)
    if name == "Run":
        from tokenforget.pipeline import Run

        return Run
    raise AttributeError(name)


__all__ = [
    "DataConfig",
    "ForgettingMixin",
    "ForgettingTrainer",
    "ModelConfig",
    "OBJECTIVES",
    "PartitionConfig",
    "Run",
    "RunConfig",
    "SCHEDULES",
    "TokenClassCollator",
    "TokenCounts",
    "TrainConfig",
    "TrainingConfig",
    "forgetting_loss",
    "token_cross_entropy",
]
