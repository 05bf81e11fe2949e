"""One tiny MovieLens 100K run per test session, shared by the index and service tests
(training is the slow part; both modules only read the run)."""
from pathlib import Path

_RUNS: dict[str, Path] = {}

CONFIG = {"data": {"dataset": "ml-100k", "split": "random"},
          "model": {"dim": 16, "item_features": ["genre"], "user_history": True},
          "train": {"epochs": 2, "batch_size": 512, "lr": 0.005}, "eval": {"ks": [10, 20]}}


def tiny_run(tmp_path_factory, data_dir) -> Path:
    key = str(data_dir)
    if key not in _RUNS:
        from twotower import RunConfig, train

        out = tmp_path_factory.mktemp("serving") / "run"
        train(RunConfig.from_dict(CONFIG), out, data_dir=data_dir, quiet=True, log=lambda m: None)
        _RUNS[key] = out
    return _RUNS[key]
