"""twotower: two-tower candidate retrieval.

The data flow, one subpackage per stage: ``data`` -> ``model`` -> ``evaluation`` -> ``training``
-> ``index`` -> ``serving`` (each imports only the ones before it; docs/design.md, "Module map").
``api`` and ``cli`` are two faces of the same objects.
"""
from . import openmp

openmp.apply_defaults()  # first: OpenMP reads its environment once, when PyTorch loads it

from .api import TrainResult, evaluate_run, train  # noqa: E402
from .config import DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig, UpdateConfig  # noqa: E402
from .data.dataset import Dataset  # noqa: E402
from .data.sources import load_dataset  # noqa: E402
from .errors import ArtifactError, ConfigError, DataError, TwotowerError  # noqa: E402
from .model.towers import TwoTowerModel  # noqa: E402
from .run import Run  # noqa: E402
from .training.trainer import Trainer  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "RunConfig", "DataConfig", "ModelConfig", "TrainConfig", "EvalConfig", "Dataset", "load_dataset",
    "TwoTowerModel", "Trainer", "train", "evaluate_run", "Run", "TrainResult", "UpdateConfig",
    "TwotowerError", "DataError", "ConfigError", "ArtifactError",
]
