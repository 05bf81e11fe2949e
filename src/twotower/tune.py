"""``twotower tune``: search the settings that matter on validation, within a wall-clock budget,
then refit the best trial as a normal run directory and score test once (docs/tuning.md).

- The search space is the config's ``[tune]`` section (``config.TuneConfig``): choices and ranges
  for the embedding size, temperature, learning rate and schedule, batch size, logQ weight, item
  bias, history encoder, initialisation and epochs; an empty list keeps the base config's value.
- Optuna samples the trials (TPE, Bergstra et al., NeurIPS 2011; seeded) and prunes a trial whose
  per-epoch validation curve falls behind the others' (``tune.pruner``: the median rule, or
  successive halving, Jamieson and Talwalkar, AISTATS 2016). Configs given with ``--enqueue`` are
  tried first (reference configs whose settings were chosen on validation).
- The budget is wall clock and covers the whole command: loading, trials, the final refit and the
  test evaluation. Before every epoch of a trial the tuner checks that the epoch still fits, with
  room kept for the final step of the best trial so far (or of this one, were it to become the
  best); a trial that would not fit is cut after its last whole epoch (``cut``), like a pruned
  one, and no new trial starts without the room for one epoch.
- Each trial trains through ``Trainer.fit`` (its ``on_epoch`` hook reports each validation figure
  and asks to stop) into its own run directory under ``OUT/trials``; a pruned, failed or
  superseded trial's folder is removed, so only the best trial's is kept. At the end that folder
  becomes ``OUT/best`` and is finished through ``api.train(..., resume=True)``, the path of
  ``twotower train --resume``: the best weights reload (the validation figure of the trial, again),
  ``train.refit`` retrains on training + validation for the chosen epochs, and test is scored once.
- ``OUT/report.md`` holds the trials table, validation against time, the importance of each
  setting, the baselines beside the best trial (``--baseline DIR``: folders of ``twotower
  baseline``), and ``OUT/tune.json`` the same as data.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import artifacts
from .config import RunConfig, TuneConfig, apply_overrides
from .errors import ConfigError, TwotowerError
from .run_dir import RunDir

# name in [tune] -> (config key, how it is sampled)
PARAMS: dict[str, tuple[str, str]] = {
    "dim": ("model.dim", "choice"),
    "temperature": ("model.temperature", "log"),
    "lr": ("train.lr", "log"),
    "schedule": ("train.schedule", "choice"),
    "warmup_steps": ("train.warmup_steps", "choice"),
    "batch_size": ("train.batch_size", "choice"),
    "logq_weight": ("train.logq_weight", "linear"),
    "item_bias": ("model.item_bias", "choice"),
    "user_history": ("model.user_history", "choice"),
    "init": ("model.init", "choice"),
    "epochs": ("train.epochs", "choice"),
}


def parse_budget(text: str) -> float:
    """``20m``, ``90s``, ``1h30m``, ``1.5h`` or plain seconds -> seconds (> 0)."""
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        seconds = float(s)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", s)
        if not parts or "".join(n + u for n, u in parts) != s.replace(" ", ""):
            raise TwotowerError(f"--budget {text!r}: write it as 20m, 90s, 1h30m or a number of seconds")
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise TwotowerError(f"--budget {text!r}: must be more than 0")
    return seconds


# ---- the search space ------------------------------------------------------------------------------
def space(tune: TuneConfig) -> dict[str, tuple[str, str, list]]:
    """The settings searched: name -> (config key, sampling, values), leaving out empty lists."""
    out = {}
    for name, (key, kind) in PARAMS.items():
        values = list(getattr(tune, name))
        if values:
            out[name] = (key, kind, values)
    return out


def suggest(trial, tune: TuneConfig) -> dict[str, Any]:
    """One trial's values, ``config key -> value``: a range of two values is sampled (log or
    linear), a single value is fixed, a list of choices is categorical."""
    values = {}
    for name, (key, kind, vals) in space(tune).items():
        if kind in ("log", "linear") and len(vals) == 2:
            values[key] = trial.suggest_float(name, float(vals[0]), float(vals[1]), log=kind == "log")
        elif len(vals) == 1:
            values[key] = vals[0]
        else:
            values[key] = trial.suggest_categorical(name, vals)
    return values


def trial_config(base: RunConfig, values: dict[str, Any]) -> RunConfig:
    """The base config with a trial's values (checked like any config)."""
    d = base.to_dict()
    apply_overrides(d, [f"{k}={json.dumps(v)}" for k, v in values.items()])
    return RunConfig.from_dict(d, source="trial")


def enqueued_params(path: str | Path, tune: TuneConfig) -> dict[str, Any]:
    """The searched settings of a reference config, as Optuna parameters; a value outside the
    search space is refused with what to change."""
    cfg = RunConfig.load(path)
    d = cfg.to_dict()
    params = {}
    for name, (key, kind, vals) in space(tune).items():
        section, k = key.split(".")
        v = d[section][k]
        if kind in ("log", "linear") and len(vals) == 2:
            if not vals[0] <= v <= vals[1]:
                raise ConfigError(f"--enqueue {path}: {key} = {v} is outside tune.{name} = {vals}; widen the range")
            params[name] = float(v)
        elif len(vals) > 1:
            if v not in vals:
                raise ConfigError(f"--enqueue {path}: {key} = {v!r} is not among tune.{name} = {vals}; add it")
            params[name] = v
    return params


# ---- bookkeeping -----------------------------------------------------------------------------------
@dataclass
class TrialRecord:
    number: int
    params: dict[str, Any]
    state: str = "running"            # complete, pruned, cut (stopped at the deadline), failed
    value: float | None = None        # best validation figure of the monitored metric
    best_epoch: int = 0
    epochs: int = 0
    started: float = 0.0              # seconds since the tune began
    seconds: float = 0.0
    train_seconds_per_epoch: float | None = None
    eval_seconds: float | None = None
    setup_seconds: float = 0.0        # building the model (and its SVD / ALS start)
    curve: list[tuple[float, int, float]] = field(default_factory=list)  # (time since start, epoch, value)
    error: str | None = None


class Clock:
    """The budget: seconds left, and the room to keep for the final step of a trial."""

    def __init__(self, budget: float, start: float | None = None):
        self.start = time.perf_counter() if start is None else start
        self.budget = float(budget)

    def now(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.now()


def final_cost(cfg: RunConfig, train_s_per_epoch: float, eval_s: float, best_epoch: int, valid_share: float,
               setup_s: float = 0.0) -> float:
    """Seconds the final step of a trial takes, with room to spare: building the model twice (the
    run, the refit: ``setup_s`` each, an SVD start included), the validation and test evaluations
    at every cut-off (about three quick validations each: top-500 against top-20), and with
    ``train.refit`` ``best_epoch`` epochs on training + validation (``1 + valid_share`` times the
    pairs). The refit's epochs get half as much again: a pair costs more there than in the trial
    when the users' histories grow by their validation items (Grocery, history encoder on: 10 s an
    epoch measured against 7 s foreseen from the trial's 6 s), the rest 15 %."""
    cost = 1.15 * (2 * setup_s + 2 * 3 * eval_s + 1.0)
    if cfg.train.refit:
        cost += 1.5 * best_epoch * train_s_per_epoch * (1 + valid_share)
    return cost


@dataclass
class TuneResult:
    out: Path
    trials: list[TrialRecord]
    best: TrialRecord | None
    valid: dict[str, float]
    test: dict[str, float] | None
    baselines: list[dict]
    seconds: float
    search_seconds: float
    importance: dict[str, float]
    importance_method: str
    load: dict[str, list[float]]


class _Search:
    """The trials of one tune, run one at a time (or by ``jobs`` threads), under the clock."""

    def __init__(self, base: RunConfig, ds, out: Path, clock: Clock, study, max_trials: int, log, quiet: bool):
        self.base, self.ds, self.out, self.clock, self.study = base, ds, out, clock, study
        self.max_trials, self.log, self.quiet = max_trials, log, quiet
        self.monitor = base.train.monitor
        self.valid_share = len(ds.valid) / max(len(ds.train), 1)
        self.records: list[TrialRecord] = []
        self.best: TrialRecord | None = None
        self.best_cfg: RunConfig | None = None
        self.lock = threading.Lock()

    def best_reserve(self) -> float:
        b = self.best
        if b is None or self.best_cfg is None:
            return 0.0
        return final_cost(self.best_cfg, b.train_seconds_per_epoch or 0.0, b.eval_seconds or 0.0, b.best_epoch,
                          self.valid_share, b.setup_seconds)

    def first_epoch_estimate(self) -> float:
        """What a new trial needs before the tuner can first stop it: building its model and one
        epoch with its validation. Its settings are not drawn yet, so the longest seen so far."""
        walls = [r.setup_seconds + (r.train_seconds_per_epoch or 0) + (r.eval_seconds or 0)
                 for r in self.records if r.epochs]
        return max(walls) if walls else 0.0

    def next_slot(self) -> TrialRecord | None:
        """A record for the next trial, or None when no trial may start (the count is reached, or
        the time left holds no epoch beside the final step's room). Taken under the lock, so that
        parallel workers never start more trials than allowed."""
        with self.lock:
            if self.max_trials and len(self.records) >= self.max_trials:
                return None
            if self.clock.left() <= self.first_epoch_estimate() + self.best_reserve():
                return None
            rec = TrialRecord(-1, {}, started=self.clock.now())
            self.records.append(rec)
            return rec

    def worker(self) -> None:
        import optuna

        while (rec := self.next_slot()) is not None:
            trial = self.study.ask()
            rec.number = trial.number
            try:
                values = suggest(trial, self.base.tune)
                rec.params = values
                cfg = trial_config(self.base, values)
            except (ConfigError, ValueError) as e:
                rec.state, rec.error = "failed", str(e).splitlines()[-1]
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                self.log(f"trial {trial.number}: not a valid config ({rec.error})")
                continue
            self.run_trial(trial, rec, cfg)

    def run_trial(self, trial, rec: TrialRecord, cfg: RunConfig) -> None:
        import optuna

        from .training.trainer import Trainer

        folder = self.out / "trials" / f"{rec.number:03d}"
        t0 = self.clock.now()
        last = [t0]
        walls: list[float] = []
        trains: list[float] = []
        evals: list[float] = []
        stop_reason: list[str] = []

        def on_epoch(record: dict) -> bool:
            now = self.clock.now()
            walls.append(now - last[0])
            last[0] = now
            trains.append(record["seconds"])
            if "eval_seconds" in record:
                evals.append(record["eval_seconds"])
            value = record.get(f"valid/{self.monitor}")
            epoch = record["epoch"]
            rec.epochs = epoch
            if value is not None:
                rec.curve.append((now, epoch, float(value)))
                trial.report(float(value), epoch)
                if trial.should_prune():
                    stop_reason.append("pruned")
                    return True
            stop_reason.clear()
            # Does one more epoch fit, with room for the final step of the best trial (this one, if it
            # would become the best after it: its refit grows with its epochs)?
            wall = max(walls[-3:])
            own = final_cost(cfg, float(np.mean(trains)), float(np.mean(evals)) if evals else 0.0, epoch + 1,
                             self.valid_share, rec.setup_seconds)
            with self.lock:
                reserve = max(self.best_reserve(), own)
            if self.clock.left() < 1.1 * wall + reserve:
                stop_reason.append("cut")
                return True
            return False

        self.log(f"trial {rec.number}: {_short(rec.params)}")
        try:
            trainer = Trainer(cfg, self.ds, folder, quiet=True,
                              log=(lambda m: None) if self.quiet else (lambda m: self.log(f"  trial {rec.number}: {m}")))
            rec.setup_seconds = self.clock.now() - t0
            last[0] = self.clock.now()
            state = trainer.fit(on_epoch=on_epoch)
        except (FloatingPointError, ConfigError, RuntimeError, ValueError) as e:
            rec.state, rec.error, rec.seconds = "failed", str(e).splitlines()[0][:200], self.clock.now() - t0
            shutil.rmtree(folder, ignore_errors=True)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            self.log(f"trial {rec.number}: failed ({rec.error})")
            return
        rec.seconds = self.clock.now() - t0
        rec.best_epoch = state.best_epoch
        rec.value = None if not math.isfinite(state.best_value) else float(state.best_value)
        rec.train_seconds_per_epoch = float(np.mean(trains)) if trains else None
        rec.eval_seconds = float(np.mean(evals)) if evals else None
        # The hook's last answer counts only where the trainer stopped for it (not at its own early
        # stop or its last epoch).
        rec.state = stop_reason[-1] if stop_reason and state.stopped_by_caller else "complete"
        if rec.state == "complete":
            self.study.tell(trial, rec.value if rec.value is not None else float("nan"))
        else:  # pruned or cut: incomplete for the sampler, which still reads its reported curve
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        drop = folder
        with self.lock:
            # A cut trial's best epoch is a whole, validated model: it may be the one kept.
            if rec.state in ("complete", "cut") and rec.value is not None and (self.best is None or rec.value > self.best.value):
                if self.best is not None:
                    drop = self.out / "trials" / f"{self.best.number:03d}"
                else:
                    drop = None
                self.best, self.best_cfg = rec, cfg
        if drop is not None:
            shutil.rmtree(drop, ignore_errors=True)
        best = self.best.value if self.best and self.best.value is not None else float("nan")
        self.log(f"trial {rec.number}: {rec.state}, valid {self.monitor} {rec.value if rec.value is not None else float('nan'):.4f} "
                 f"(epoch {rec.best_epoch} of {rec.epochs}), {rec.seconds:.0f}s; best so far {best:.4f}; "
                 f"{max(self.clock.left(), 0):.0f}s left")


def _short(values: dict[str, Any]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else json.dumps(v)
    return ", ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in values.items())


def make_study(tune: TuneConfig):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import warnings

    with warnings.catch_warnings():  # multivariate TPE is marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Multivariate: the settings interact (the learning rate with the batch size, the temperature
        # with the logQ weight), which independent per-setting densities cannot see.
        sampler = optuna.samplers.TPESampler(seed=tune.sampler_seed, n_startup_trials=max(tune.startup_trials, 1),
                                             multivariate=True)
    if tune.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=tune.prune_after)
    elif tune.pruner == "halving":
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=max(tune.prune_after, 1))
    else:
        pruner = optuna.pruners.NopPruner()
    return optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)


def read_baseline(path: str | Path) -> dict:
    """A finished baseline folder (or any finished run directory) as ``{name, valid, test, ...}``."""
    d = RunDir(path)
    d.check_is_dir()
    d.verify()
    m = d.read_metrics()
    name = m.get("baseline") or Path(path).name
    return {"name": name, "path": str(path), "settings": m.get("settings"), "valid": m.get("valid") or {},
            "test": m.get("test") or {}, "fit_seconds": m.get("fit_seconds", m.get("seconds"))}


def tune(base: RunConfig, out: str | Path, budget: float, data_dir=None, baselines: list[str | Path] | None = None,
         enqueue: list[str | Path] | None = None, jobs: int = 1, max_trials: int = 0, quiet: bool = False,
         log=None) -> TuneResult:
    """Search ``base.tune``'s space on validation within ``budget`` seconds (all of this call), refit
    the best trial into ``out/best``, score test once and write the report in ``out``."""
    from .api import train
    from .data.sources import load_dataset

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    clock = Clock(budget)
    load = {"start": list(os.getloadavg())}
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise TwotowerError(f"{out}: already exists and is not empty; choose another --out")
    if jobs < 1:
        raise TwotowerError(f"--jobs must be at least 1, got {jobs}")
    known_baselines = [read_baseline(p) for p in (baselines or [])]  # refuse a bad folder before any work
    study = make_study(base.tune)
    for p in enqueue or []:
        study.enqueue_trial(enqueued_params(p, base.tune))
    if jobs > 1 and not base.train.threads:
        # each trial's share of the cores; threads beyond them only wait on each other
        base = trial_config(base, {"train.threads": max(1, (os.cpu_count() or 1) // jobs)})
    ds = load_dataset(base.data, data_dir)
    if not len(ds.valid):
        raise ConfigError("tune chooses on validation, and this split has none: set data.valid_fraction (random / "
                          "given splits) or data.valid_leave_last (temporal) above 0")
    (out / "trials").mkdir(parents=True)
    s = ds.summary()
    log(f"tune: {s['name']}: {s['users']:,} users, {s['items']:,} items; budget {budget:.0f}s, "
        f"{len(space(base.tune))} settings searched, {len(enqueue or [])} enqueued")
    search = _Search(base, ds, out, clock, study, max_trials, log, quiet)
    try:
        if jobs == 1:
            search.worker()
        else:
            threads = [threading.Thread(target=search.worker, name=f"tune-{i}") for i in range(jobs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    except BaseException:
        # interrupted, or a trial died of something other than its settings: no trial folder is left
        # behind as if it were a result (a search cannot be resumed; start it again)
        shutil.rmtree(out / "trials", ignore_errors=True)
        raise
    search_seconds = clock.now()
    valid, test = {}, None
    if search.best is not None:
        best_dir = out / "best"
        shutil.move(str(out / "trials" / f"{search.best.number:03d}"), best_dir)
    shutil.rmtree(out / "trials", ignore_errors=True)  # every other trial's folder is already gone
    if search.best is None:
        log("tune: no trial reached a validation figure within the budget; raise --budget")
    else:
        log(f"best trial {search.best.number} ({search.best.state}): valid {base.train.monitor} {search.best.value:.4f}; "
            f"finishing it in {best_dir} ({'refit on training + validation, ' if search.best_cfg.train.refit else ''}"
            f"test scored once)")
        res = train(search.best_cfg, best_dir, data_dir, resume=True, quiet=True, dataset=ds,
                    log=(lambda m: None) if quiet else log)
        valid, test = res.valid, res.test
    importance, method = setting_importance(study, search.records, base.tune)
    load["end"] = list(os.getloadavg())
    result = TuneResult(out, sorted(search.records, key=lambda r: r.number), search.best, valid, test, known_baselines,
                        clock.now(), search_seconds, importance, method, load)
    write_report(result, base, budget)
    return result


# ---- importance ------------------------------------------------------------------------------------
def setting_importance(study, records: list[TrialRecord], tune: TuneConfig) -> tuple[dict[str, float], str]:
    """How much each setting mattered: Optuna's fANOVA importance (Hutter et al., ICML 2014) over the
    complete trials when there are at least 4; otherwise a simple one over every trial with a
    validation figure (the share of the variance of the figure explained by the setting: the
    between-level variance for choices, the squared correlation with the log value for ranges)."""
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    searched = {n for n, (_, kind, vals) in space(tune).items() if len(vals) > 1}
    if len(complete) >= 4:
        try:
            imp = optuna.importance.get_param_importances(study)
            return {k: float(v) for k, v in imp.items() if k in searched}, "fANOVA (optuna.importance, complete trials)"
        except (RuntimeError, ValueError, ZeroDivisionError):
            pass
    rows = [(r.params, r.value) for r in records if r.value is not None]
    if len(rows) < 2:
        return {}, "none (fewer than two trials with a validation figure)"
    y = np.array([v for _, v in rows])
    total = float(y.var())
    out = {}
    for name, (key, kind, vals) in space(tune).items():
        if len(vals) < 2:
            continue
        x = [p.get(key) for p, _ in rows]
        if total <= 0:
            out[name] = 0.0
        elif kind in ("log", "linear"):
            xs = np.array(x, dtype=float)
            xs = np.log(xs) if kind == "log" else xs
            out[name] = float(np.corrcoef(xs, y)[0, 1] ** 2) if xs.std() > 0 else 0.0
        else:
            levels = {json.dumps(v) for v in x}
            means = {lv: y[[json.dumps(v) == lv for v in x]].mean() for lv in levels}
            between = np.mean([(means[json.dumps(v)] - y.mean()) ** 2 for v in x])
            out[name] = float(between / total)
    return out, "variance explained per setting (between-level variance for choices, squared correlation for ranges), all trials with a figure"


# ---- the report ------------------------------------------------------------------------------------
def write_report(r: TuneResult, base: RunConfig, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, mon = r.out, base.train.monitor
    k = mon.split("@")[1]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    best_t, best_v, cur = [], [], -math.inf
    points = sorted((t, v) for rec in r.trials for t, _, v in rec.curve if rec.state != "failed")
    for rec in r.trials:
        if rec.curve:
            t, _, v = zip(*rec.curve)
            style = {"complete": "-", "cut": "--", "pruned": ":"}.get(rec.state, "-")
            ax.plot(t, v, style, lw=0.9, alpha=0.7, marker="o", ms=3 if len(t) > 1 else 5)
    for t, v in points:
        cur = max(cur, v)
        best_t.append(t)
        best_v.append(cur)
    if best_t:
        ax.step(best_t, best_v, where="post", color="black", lw=2, label="best so far")
    labels: dict[float, list[str]] = {}
    for b in r.baselines:
        if mon in b["valid"]:
            labels.setdefault(round(b["valid"][mon], 4), []).append(b["name"])
    for level, names in labels.items():  # baselines with the same figure share one line
        ax.axhline(level, ls="--", lw=1, color="gray")
        ax.text(0.01, level, f"{', '.join(names)} {level:.4f}", transform=ax.get_yaxis_transform(), fontsize=8,
                va="bottom", color="dimgray")
    ax.axvline(budget, color="red", lw=1, label="budget")
    ax.set_xlabel("seconds since the tune began")
    ax.set_ylabel(f"validation {mon}")
    ax.set_title("validation against time: one line per trial (dashed: cut, dotted: pruned)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "validation_vs_time.png", dpi=120)
    plt.close(fig)
    if r.importance:
        names = sorted(r.importance, key=r.importance.get)
        fig, ax = plt.subplots(figsize=(6, 0.4 * len(names) + 1.5))
        ax.barh(names, [r.importance[n] for n in names])
        ax.set_xlabel("importance")
        ax.set_title(r.importance_method[:60], fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "importance.png", dpi=120)
        plt.close(fig)

    n_state = {s: sum(t.state == s for t in r.trials) for s in ("complete", "cut", "pruned", "failed")}
    md = ["# Tuning report", "",
          f"Data: `{base.data.dataset}`; budget {budget:.0f} s; the whole command took {r.seconds:.0f} s (search "
          f"{r.search_seconds:.0f} s, then the best trial's refit and test). Load average (1, 5, 15 min) at start "
          f"{_load(r.load['start'])}, at end {_load(r.load.get('end'))}.", "",
          f"Trials: {len(r.trials)} ({', '.join(f'{v} {s}' for s, v in n_state.items() if v)}). "
          f"Selection on validation only; test scored once, for the best trial.", ""]
    if r.best is not None:
        md += ["## Best trial", "", f"Trial {r.best.number} ({r.best.state}): " + _short(r.best.params), "",
               f"Its run directory: `best/` (`twotower evaluate {out / 'best'}`).", ""]
    md += ["## Best trial and baselines", "",
           f"| model | valid {mon} | test recall@{k} | test ndcg@{k} | fit seconds |", "|---|---|---|---|---|"]
    if r.best is not None:
        md.append(f"| tuned two-tower (trial {r.best.number}) | {r.valid.get(mon, float('nan')):.4f} | "
                  f"{(r.test or {}).get(f'recall@{k}', float('nan')):.4f} | {(r.test or {}).get(f'ndcg@{k}', float('nan')):.4f} | "
                  f"{r.seconds:.0f} (whole tune) |")
    for b in r.baselines:
        fs = b.get("fit_seconds")
        md.append(f"| {b['name']} {_short(b['settings'] or {})} | {b['valid'].get(mon, float('nan')):.4f} | "
                  f"{b['test'].get(f'recall@{k}', float('nan')):.4f} | {b['test'].get(f'ndcg@{k}', float('nan')):.4f} | "
                  f"{'' if fs is None else f'{fs:.1f}'} |")
    md += ["", "![validation against time](validation_vs_time.png)", "", "## What the budget bought", "",
           f"The best validation {mon} of any trial's epoch so far (pruned and cut trials included), against time "
           "since the tune began:", "", "| seconds | best valid so far |", "|---|---|"]
    md += [f"| {t:.0f} | {'' if v is None else f'{v:.4f}'} |" for t, v in best_by_time(r.trials, budget)]
    md += ["", "## Trials", "",
           f"| # | state | valid {mon} | best epoch | epochs | started (s) | seconds | settings |", "|---|---|---|---|---|---|---|---|"]
    for t in r.trials:
        v = "" if t.value is None else f"{t.value:.4f}"
        md.append(f"| {t.number} | {t.state} | {v} | {t.best_epoch} | {t.epochs} | {t.started:.0f} | {t.seconds:.0f} | "
                  f"{_short(t.params)}{' (' + t.error + ')' if t.error else ''} |")
    md += ["", "## Importance of each setting", "", f"Method: {r.importance_method}.", ""]
    if r.importance:
        md += ["| setting | importance |", "|---|---|"] + [f"| {n} | {v:.3f} |" for n, v in
                                                           sorted(r.importance.items(), key=lambda x: -x[1])]
        md += ["", "![importance](importance.png)"]
    md.append("")
    artifacts.write_text(out / "report.md", "\n".join(md))
    artifacts.write_json(out / "tune.json", {
        "budget": budget, "seconds": r.seconds, "search_seconds": r.search_seconds, "monitor": mon,
        "best": None if r.best is None else asdict(r.best), "valid": r.valid, "test": r.test,
        "baselines": r.baselines, "trials": [asdict(t) for t in r.trials], "importance": r.importance,
        "importance_method": r.importance_method, "load": r.load, "best_by_time": best_by_time(r.trials, budget),
        "space": {n: v for n, (_, _, v) in space(base.tune).items()}})


def best_by_time(trials: list[TrialRecord], budget: float) -> list[tuple[float, float | None]]:
    """The best validation figure reached by each of 1, 2, 5, 10, 20, 30, 60 ... minutes (those within
    the budget) and at the budget: what a shorter budget would have bought in this run."""
    points = sorted((t, v) for rec in trials for t, _, v in rec.curve)
    marks = [m * 60.0 for m in (1, 2, 5, 10, 20, 30, 60, 120, 240) if m * 60.0 < budget] + [budget]
    out = []
    for mark in marks:
        seen = [v for t, v in points if t <= mark]
        out.append((mark, max(seen) if seen else None))
    return out


def _load(values) -> str:
    return "n/a" if not values else ", ".join(f"{v:.2f}" for v in values)
