"""tokenforget: token-level forgetting for LLM fine-tuning (Taheri et al., arXiv 2508.04329).

The data's journey, one module each under `stages/`: `data` (records -> tokens with response masks) -> `score`
(CE_base - CE_ref per token) -> `partition` (global ranking into +1/-1 classes) -> `train` -> the trainer
(`ForgettingTrainer`) -> `evaluate`; `pipeline.resolver.Run` ties them to one run folder, `report/` shows it
(docs/architecture.md: the layers and one line per file).
"""

from tokenforget.config import (
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    PartitionConfig,
    RunConfig,
    TrainConfig,
    TrainingConfig,
)
from tokenforget.version import __version__

# name -> the module that holds it: heavy imports (torch, transformers Trainer) only when a name is asked for
_LAZY = {
    **dict.fromkeys(("OBJECTIVES", "SCHEDULES", "TokenCounts", "forgetting_loss"), "tokenforget.training.objectives"),
    "token_cross_entropy": "tokenforget.model.head_ce",
    **dict.fromkeys(("ForgettingMixin", "ForgettingTrainer", "TokenClassCollator"), "tokenforget.training.trainer"),
    "Run": "tokenforget.pipeline.resolver",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = [
    "__version__",
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
