"""Trainer pieces: learning-rate schedule, early stopping and the mining schedule (scripted validation
sequences), the demo's offline fallback, training end to end."""
import json

import numpy as np
import pytest
import torch

from twotower.cli import main
from twotower.config import RunConfig
from twotower.training.schedule import EarlyStopping, MiningSchedule, TrainState
from twotower.training.trainer import Trainer, lr_factor


def test_lr_schedule():
    assert lr_factor(0, 100, 10, "constant") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "constant") == pytest.approx(1.0)
    assert lr_factor(50, 100, 0, "constant") == 1.0
    assert lr_factor(0, 100, 0, "cosine") == pytest.approx(1.0)
    assert lr_factor(50, 100, 0, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 0, "cosine") == pytest.approx(0.0)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)


def test_early_stopping_on_a_scripted_sequence():
    state = TrainState()
    stop = EarlyStopping(state, patience=2)
    values = [0.10, 0.30, 0.25, 0.35, 0.35, 0.20]      # an equal value is no improvement
    assert [stop.observe(e, v) for e, v in enumerate(values, 1)] == [True, True, False, True, False, False]
    assert stop.spent and (state.best_epoch, state.best_value, state.bad_evals) == (4, 0.35, 2)
    stop.restart()                                       # a new phase: the whole patience, the same best
    assert not stop.spent and state.best_value == 0.35
    assert not stop.observe(7, 0.30) and not stop.spent and stop.observe(8, 0.50) and state.best_epoch == 8

    never = EarlyStopping(TrainState(), patience=0)
    assert never.observe(1, 1.0) and not any(never.observe(e, -e) for e in range(2, 20)) and not never.spent
    never.take_unvalidated(20)                           # no validation set: the latest epoch is the best
    assert never.state.best_epoch == 20


def test_mining_schedule_rounds_and_the_end_of_the_first_phase():
    s = MiningSchedule(epochs=3, rounds=2, epochs_per_round=2)
    assert s.total_epochs == 7
    assert [s.round_at(e) for e in range(1, 8)] == [None, None, None, 1, None, 2, None]
    assert [s.in_first_phase(e) for e in range(1, 5)] == [True, True, False, False]
    assert not any(s.replays_jump(e) for e in range(1, 8))  # nothing to replay
    state = TrainState(epoch=2)
    assert s.end_first_phase(state, best=1) == 3 and (state.epoch, state.phase_one_best) == (3, 1)

    replay = MiningSchedule(epochs=3, rounds=2, epochs_per_round=2, jump_after=2)
    assert [replay.replays_jump(e) for e in range(1, 5)] == [False, True, False, False]
    assert not MiningSchedule(epochs=3, rounds=2, jump_after=3).replays_jump(3)  # the phase ends there anyway

    plain = MiningSchedule(epochs=5)                     # no rounds: no phases
    assert plain.total_epochs == 5 and plain.round_at(6) is None and not plain.in_first_phase(1)


def test_fit_stops_early_on_a_scripted_validation_sequence_and_keeps_the_best_weights(tmp_path):
    cfg = RunConfig.from_dict({"data": {"dataset": "synthetic", "synthetic_users": 200, "synthetic_items": 120},
                               "model": {"dim": 8}, "train": {"epochs": 10, "batch_size": 512, "patience": 2}})
    from twotower.data.sources import load_dataset

    trainer = Trainer(cfg, load_dataset(cfg.data), tmp_path / "run", quiet=True, log=lambda m: None)
    scripted = iter([0.10, 0.20, 0.15, 0.18, 0.99])
    weights = {}

    def validate():
        weights[trainer.state.epoch + 1] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        return {"recall@20": next(scripted)}

    trainer.validate = validate
    state = trainer.fit()
    assert [r["epoch"] for r in state.history] == [1, 2, 3, 4]  # epochs 3 and 4 spend the patience
    assert state.stopped_early and state.best_epoch == 2 and state.best_value == 0.20
    assert all(torch.equal(v, weights[2][k]) for k, v in trainer.model.state_dict().items())
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["valid/recall@20"] for x in lines] == [0.10, 0.20, 0.15, 0.18]
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.slow  # the whole demo end to end
def test_demo_falls_back_to_synthetic_offline(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["demo", "--data-dir", str(tmp_path / "empty"), "--offline", "--epochs", "2", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "synthetic" in text and "recall@20" in text and "user 0" in text
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs_run"] == 2 and m["test"]["recall@20"] > 0.05  # well above random (20 / 1000 items)


@pytest.mark.slow
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
