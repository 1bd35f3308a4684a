"""tokenforget: token-level forgetting for LLM fine-tuning (Taheri et al., arXiv 2508.04329).

The data's journey: `data` (records -> tokens with response masks) -> `score` (CE_base - CE_ref per
token) -> `partition` (global ranking into +1/-1 classes) -> `train` (`ForgettingTrainer`) ->
`evaluate` -> `report`, one module each; `pipeline.Run` ties them to one run folder (docs/architecture.md).
"""

from tokenforget.config import (
    DataConfig, ModelConfig, ObjectiveConfig, PartitionConfig, RunConfig, TrainConfig, TrainingConfig,
)

__version__ = "0.1.0"


def __getattr__(name: str):  # heavy imports (torch, transformers Trainer) only when asked for
    if name in ("OBJECTIVES", "SCHEDULES", "TokenCounts", "forgetting_loss", "token_cross_entropy"):
        from tokenforget import losses

        return getattr(losses, name)
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
    "ObjectiveConfig",
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
