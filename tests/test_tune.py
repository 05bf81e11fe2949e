"""`twotower tune`: the budget, pruned trials, the refit of the best trial, the trainer's hook."""
import json
import math
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest

from twotower import tune as T
from twotower.api import train
from twotower.config import RunConfig
from twotower.data.sources import load_dataset
from twotower.errors import ConfigError, TwotowerError
from twotower.run import Run
from twotower.run_dir import RunDir
from twotower.training.trainer import Trainer

BASE = {"data": {"dataset": "synthetic", "synthetic_users": 300, "synthetic_items": 120},
        "model": {"dim": 8}, "train": {"epochs": 4, "batch_size": 256, "lr": 0.02, "patience": 0, "threads": 1},
        "eval": {"ks": [10, 20]},
        "tune": {"dim": [8, 16], "temperature": [0.05, 0.2], "lr": [0.005, 0.05], "schedule": ["constant"],
                 "batch_size": [128, 256], "logq_weight": [], "item_bias": [False, True], "user_history": [False]}}


def _cfg(**changes) -> RunConfig:
    d = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        section, k = key.split("__")
        d[section][k] = value
    return RunConfig.from_dict(d)


def test_parse_budget():
    assert T.parse_budget("20m") == 1200
    assert T.parse_budget("1h30m") == 5400
    assert T.parse_budget("90s") == 90
    assert T.parse_budget("45") == 45
    assert T.parse_budget("1.5h") == 5400
    for bad in ("", "20 minutes", "0", "m", "-5"):
        with pytest.raises(TwotowerError):
            T.parse_budget(bad)


def test_trainer_hook_stops_and_resume_goes_on_to_the_end(tmp_path):
    cfg = _cfg(train__epochs=5)
    ds = load_dataset(cfg.data)
    seen = []
    state = Trainer(cfg, ds, tmp_path / "r", quiet=True, log=lambda m: None).fit(
        on_epoch=lambda r: seen.append(r["epoch"]) or r["epoch"] == 2)
    assert seen == [1, 2] and state.epoch == 2 and state.stopped_by_caller and state.stopped_early
    # resumed, the run trains no further epoch (a tuner's cut is final), and finishes normally
    res = train(cfg, tmp_path / "r", resume=True, quiet=True, log=lambda m: None, dataset=ds)
    assert res.trainer.state.epoch == 2
    assert len(RunDir(tmp_path / "r").read_epochs()) == 2
    RunDir(tmp_path / "r").verify()


def test_early_batches_change_the_steps_and_the_schedule():
    cfg = _cfg(train__early_batch_size=1024, train__early_batch_epochs=1, train__epochs=3)
    ds = load_dataset(cfg.data)
    tr = Trainer(cfg, ds, None, quiet=True, log=lambda m: None)
    steps = lambda b: math.ceil(len(ds.train) / b)  # noqa: E731
    assert tr.batch_size(1) == 1024 and tr.batch_size(2) == 256
    assert tr.total_steps == steps(1024) + 2 * steps(256)
    tr.fit()
    assert tr.state.step == tr.total_steps


@pytest.mark.slow
def test_a_tiny_budget_ends_on_time_with_a_valid_run(tmp_path):
    cfg = _cfg(train__epochs=30, train__refit=True)
    budget = 12.0
    t0 = time.perf_counter()
    res = T.tune(cfg, tmp_path / "t", budget, log=lambda m: None, quiet=True)
    wall = time.perf_counter() - t0
    # one synthetic epoch is ~0.1 s (a few times that on a loaded machine): the cut lands within a
    # couple of epochs and a misestimate of the final step of the deadline
    assert wall <= budget + max(3.0, 0.25 * budget), f"took {wall:.1f}s for a {budget}s budget"
    assert res.best is not None and len(res.trials) >= 2
    assert any(t.state == "cut" for t in res.trials), [t.state for t in res.trials]
    RunDir(tmp_path / "t" / "best").verify()
    run = Run(tmp_path / "t" / "best")
    assert len(run.recommend([run.users.decode([0])[0]], k=5)) == 5
    assert res.test is not None and "recall@20" in res.test
    assert not (tmp_path / "t" / "trials").exists()
    for f in ("report.md", "tune.json", "validation_vs_time.png"):
        assert (tmp_path / "t" / f).is_file()


class _PruneFrom(optuna.pruners.BasePruner):
    """Prunes every trial after its first reported epoch, from trial ``first`` on."""

    def __init__(self, first: int):
        self.first = first

    def prune(self, study, trial) -> bool:
        return trial.number >= self.first


def test_a_pruned_trial_leaves_nothing_half_written(tmp_path, monkeypatch):
    made = T.make_study

    def study_with_pruning(tune):
        s = made(tune)
        s.pruner = _PruneFrom(1)
        return s

    monkeypatch.setattr(T, "make_study", study_with_pruning)
    removed = []
    real_rmtree = T.shutil.rmtree
    monkeypatch.setattr(T.shutil, "rmtree", lambda p, **k: removed.append(str(p)) or real_rmtree(p, **k))
    res = T.tune(_cfg(), tmp_path / "t", 600, max_trials=3, log=lambda m: None, quiet=True)
    states = [t.state for t in res.trials]
    assert states == ["complete", "pruned", "pruned"]
    assert [t.epochs for t in res.trials] == [4, 1, 1]
    assert str(tmp_path / "t" / "trials" / "001") in removed and str(tmp_path / "t" / "trials" / "002") in removed
    # what is left: the report and the best trial's complete run directory, nothing else
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == \
        ["best", "importance.png", "report.md", "tune.json", "validation_vs_time.png"] or \
        sorted(p.name for p in (tmp_path / "t").iterdir()) == ["best", "report.md", "tune.json", "validation_vs_time.png"]
    RunDir(tmp_path / "t" / "best").verify()
    table = (tmp_path / "t" / "report.md").read_text()
    assert "| 1 | pruned |" in table and "| 2 | pruned |" in table


@pytest.mark.slow
def test_the_refit_reproduces_the_best_trials_validation_figure(tmp_path):
    cfg = _cfg()
    res = T.tune(cfg, tmp_path / "t", 600, max_trials=3, log=lambda m: None, quiet=True)
    best = res.best
    assert best is not None and best.state == "complete"
    assert best.value == max(t.value for t in res.trials if t.value is not None)
    # the finished run directory's validation figure is the trial's ...
    assert res.valid["recall@20"] == pytest.approx(best.value, abs=1e-9)
    assert RunDir(tmp_path / "t" / "best").read_metrics()["valid"]["recall@20"] == pytest.approx(best.value, abs=1e-9)
    # ... and training the best trial's config again from scratch, through `train`, gives it too
    best_cfg = RunDir(tmp_path / "t" / "best").read_config()
    again = train(best_cfg, tmp_path / "again", quiet=True, log=lambda m: None)
    assert again.valid["recall@20"] == pytest.approx(best.value, abs=1e-6)
    assert again.test["recall@20"] == pytest.approx(res.test["recall@20"], abs=1e-6)


def test_enqueued_config_is_the_first_trial(tmp_path):
    ref = tmp_path / "ref.toml"
    ref.write_text('[data]\ndataset = "synthetic"\n[model]\ndim = 16\ntemperature = 0.07\nitem_bias = true\n'
                   '[train]\nbatch_size = 128\nlr = 0.03\n')
    res = T.tune(_cfg(), tmp_path / "t", 600, enqueue=[ref], max_trials=1, log=lambda m: None, quiet=True)
    p = res.trials[0].params
    assert p["model.dim"] == 16 and p["model.temperature"] == pytest.approx(0.07) and p["model.item_bias"] is True
    assert p["train.batch_size"] == 128 and p["train.lr"] == pytest.approx(0.03)
    ref.write_text('[data]\ndataset = "synthetic"\n[model]\ndim = 32\n')
    with pytest.raises(ConfigError, match="model.dim = 32 is not among tune.dim"):
        T.tune(_cfg(), tmp_path / "t2", 600, enqueue=[ref], max_trials=1, log=lambda m: None, quiet=True)
    assert not (tmp_path / "t2").exists()


def test_importance_falls_back_to_a_stated_simple_method():
    tune = _cfg().tune
    records = [T.TrialRecord(i, {"model.dim": d, "model.temperature": t, "train.lr": 0.01, "train.batch_size": 128,
                                 "model.item_bias": False}, "complete", v)
               for i, (d, t, v) in enumerate([(8, 0.05, 0.1), (16, 0.1, 0.3), (8, 0.2, 0.1), (16, 0.07, 0.3)])]
    study = optuna.create_study(direction="maximize")
    imp, method = T.setting_importance(study, records, tune)
    assert "variance explained" in method
    assert imp["dim"] == pytest.approx(1.0)  # the figure depends on dim alone
    assert imp["temperature"] < 0.5


@pytest.mark.slow
def test_tune_cli_refuses_a_bad_budget_and_a_bad_baseline_folder(tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('[data]\ndataset = "synthetic"\n')
    run = [sys.executable, "-m", "twotower", "tune", str(cfg), "--out", str(tmp_path / "t")]
    bad = subprocess.run(run + ["--budget", "soon"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--budget" in bad.stderr
    bad = subprocess.run(run + ["--budget", "5m", "--baseline", str(tmp_path / "none")], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a directory" in bad.stderr
    assert not (tmp_path / "t").exists()


def test_svd_start_separates_two_blocks():
    from twotower.model import init

    # two groups of users who each take one half of the items: one direction per group
    users = np.repeat(np.arange(8), 4)
    items = np.array([j for u in range(8) for j in ((0, 1, 2, 3) if u < 4 else (4, 5, 6, 7))])
    x = init.interaction_matrix(users, items, 8, 8)
    uf, vf = init.svd_factors(x, 2)
    import torch
    gen = torch.Generator().manual_seed(0)
    u, v = init.on_sphere(uf, 1.0, gen), init.on_sphere(vf, 1.0, gen)
    cos = u @ v.T
    assert torch.allclose(u.norm(dim=1), torch.ones(8))
    assert bool((cos[:4, :4] > 0.99).all()) and bool((cos[:4, 4:].abs() < 0.01).all())
    assert bool((cos[4:, 4:] > 0.99).all())


def test_svd_init_sets_the_id_tables(tmp_path):
    cfg = _cfg(model__init="svd")
    ds = load_dataset(cfg.data)
    tr = Trainer(cfg, ds, None, quiet=True, log=lambda m: None)
    w = tr.model.item_tower.id_embedding.weight.detach()
    assert np.allclose(w.norm(dim=1).numpy(), cfg.model.init_std * math.sqrt(cfg.model.dim), rtol=1e-4)
    normal = Trainer(_cfg(), ds, None, quiet=True, log=lambda m: None)
    assert not np.allclose(w.numpy(), normal.model.item_tower.id_embedding.weight.detach().numpy())


@pytest.mark.slow
def test_trials_in_parallel_threads(tmp_path):
    res = T.tune(_cfg(), tmp_path / "t", 600, jobs=2, max_trials=4, log=lambda m: None, quiet=True)
    assert len(res.trials) == 4 and sorted(t.number for t in res.trials) == [0, 1, 2, 3]
    assert all(t.state in ("complete", "pruned") for t in res.trials)
    assert res.valid["recall@20"] == pytest.approx(res.best.value, abs=1e-9)
    assert not (tmp_path / "t" / "trials").exists()
