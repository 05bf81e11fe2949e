"""Trainer pieces: learning-rate schedule, the demo's offline fallback, early stopping bookkeeping."""
import json

import numpy as np
import pytest

from twotower.cli import main
from twotower.config import RunConfig
from twotower.training.trainer import lr_factor


def test_lr_schedule():
    assert lr_factor(0, 100, 10, "constant") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "constant") == pytest.approx(1.0)
    assert lr_factor(50, 100, 0, "constant") == 1.0
    assert lr_factor(0, 100, 0, "cosine") == pytest.approx(1.0)
    assert lr_factor(50, 100, 0, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 0, "cosine") == pytest.approx(0.0)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)


@pytest.mark.slow  # the whole demo end to end
def test_demo_falls_back_to_synthetic_offline(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["demo", "--data-dir", str(tmp_path / "empty"), "--offline", "--epochs", "2", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "synthetic" in text and "recall@20" in text and "user 0" in text
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs_run"] == 2 and m["test"]["recall@20"] > 0.05  # well above random (20 / 1000 items)


def test_training_learns_and_logq_matters(tmp_path):
    from twotower.api import train
    from twotower.data.sources import load_dataset

    base = {"data": {"dataset": "synthetic", "synthetic_users": 600, "synthetic_items": 300},
            "model": {"dim": 16}, "train": {"epochs": 4, "batch_size": 256, "lr": 0.01, "patience": 0},
            "eval": {"ks": [20]}}
    ds = load_dataset(RunConfig.from_dict(base).data)
    with_logq = train(RunConfig.from_dict(base), dataset=ds, quiet=True, log=lambda m: None)
    base["train"]["logq"] = False
    without = train(RunConfig.from_dict(base), dataset=ds, quiet=True, log=lambda m: None)
    assert with_logq.valid["recall@20"] > 20 / 300  # learns something beyond random ranking
    # Without the correction popular items, frequent in-batch negatives, are pushed down; the
    # correction removes that penalty, so the corrected model recommends more popular items.
    assert with_logq.valid["popularity@20"] > without.valid["popularity@20"]
