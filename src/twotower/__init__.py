"""twotower: two-tower candidate retrieval.

The data flow, one subpackage per stage: ``data`` -> ``model`` -> ``evaluation`` -> ``training``
-> ``index`` -> ``serving`` (each imports only the ones before it; docs/design.md, "Module map").
``api`` and ``cli`` are two faces of the same objects.
"""
from .api import TrainResult, evaluate_run, train
from .config import DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig
from .data.dataset import Dataset
from .data.sources import load_dataset
from .errors import ArtifactError, ConfigError, DataError, TwotowerError
from .model.towers import TwoTowerModel
from .run import Run
from .training.trainer import Trainer

__version__ = "0.1.0"
__all__ = [
    "RunConfig", "DataConfig", "ModelConfig", "TrainConfig", "EvalConfig", "Dataset", "load_dataset",
    "TwoTowerModel", "Trainer", "train", "evaluate_run", "Run", "TrainResult",
    "TwotowerError", "DataError", "ConfigError", "ArtifactError",
]
