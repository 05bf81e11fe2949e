"""The Python API: the same functions the CLI calls.

    from twotower import RunConfig, train, Run
    cfg = RunConfig.load("configs/ml-100k.toml")
    result = train(cfg, "runs/ml100k")
    Run("runs/ml100k").recommend([196], k=10)
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import artifacts, native
from .config import RunConfig
from .data.dataset import Dataset
from .data.sources import load_dataset
from .evaluation.evaluator import evaluate
from .model.towers import embed_items
from .run_dir import RunDir
from .training import distributed
from .training.trainer import Trainer


@dataclass
class TrainResult:
    run_dir: Path | None
    trainer: Trainer
    valid: dict[str, float]
    test: dict[str, float] | None
    seconds: float

    @property
    def model(self):
        return self.trainer.model


def train(cfg: RunConfig, out: str | Path | None = None, data_dir: str | Path | None = None, resume: bool = False,
          quiet: bool = False, dataset: Dataset | None = None, evaluate_test: bool = True, log=None) -> TrainResult:
    """Load the data, train with early stopping on validation, score the best model on test once,
    and write the run directory (``out``) if given.

    Under ``torchrun`` every rank calls this; rank 0 alone logs, evaluates and writes (the others
    get its metrics and return once the run directory is complete)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not distributed.is_main():
        log, quiet = (lambda msg: None), True
    t0 = time.perf_counter()
    ds = dataset if dataset is not None else load_dataset(cfg, data_dir)
    s = ds.summary()
    log(f"data: {s['name']}: {s['users']:,} users, {s['items']:,} items; train {s['train']:,}, valid {s['valid']:,}, test {s['test']:,}")
    trainer = Trainer(cfg, ds, out, quiet=quiet, log=log)
    log(f"native: {native.summary()}")  # so that no speed figure silently comes from the PyTorch paths
    state = trainer.fit(resume=resume)
    hl = cfg.model.history_length
    valid = trainer.par.on_main(lambda: evaluate(trainer.model, ds, "valid", cfg.eval, hl)) if len(ds.valid) else {}
    final = trainer
    if cfg.train.refit and len(ds.valid):
        final = _refit(cfg, ds, state.best_epoch, out, resume, quiet, log, jump_after=state.phase_one_best)
    test = final.par.on_main(lambda: evaluate(final.model, ds, "test", cfg.eval, hl)) if evaluate_test and len(ds.test) else None
    seconds = time.perf_counter() - t0
    if out is not None and final.par.main:
        RunDir(out).finish({
            "best_epoch": state.best_epoch, "epochs_run": state.epoch, "stopped_early": state.stopped_early,
            "refit": final is not trainer,
            "valid": valid, "test": test, "seconds": seconds,
            "seconds_per_epoch": float(np.mean([r["seconds"] for r in state.history])) if state.history else None,
            "native": native.report(),  # which kernels those seconds ran (twotower info --json)
        }, embed_items(final.model).cpu().numpy(), weights=final.model.state_dict() if final is not trainer else None)
    final.par.barrier()
    return TrainResult(Path(out) if out is not None else None, final, valid, test, seconds)


def _refit(cfg: RunConfig, ds: Dataset, epochs: int, out, resume: bool, quiet: bool, log,
           jump_after: int | None = None) -> Trainer:
    """Retrain from scratch on train + validation for the epoch count validation chose.
    Its checkpoints live in ``out/refit`` so that ``--resume`` continues whichever phase was cut.
    With mining rounds after an early-stopped first phase, the first phase is cut where the chosen
    run's rounds began (``jump_after``), so the refit trains the same epochs."""
    log(f"refit: training on train + validation for {epochs} epochs (the best epoch on validation)")
    rcfg = cfg.model_copy(deep=True)
    rcfg.train.patience, rcfg.train.refit = 0, False
    stop = None
    if cfg.mining.rounds:
        stop = max(epochs, 1)  # the same schedule of mining rounds, cut at the chosen epoch
    else:
        rcfg.train.epochs = max(epochs, 1)
    rdir = RunDir(out).refit.path if out is not None else None
    refit = Trainer(rcfg, ds.with_valid_in_train(), rdir, quiet=quiet, log=log)
    refit.fit(resume=resume, max_epochs=stop, jump_after=jump_after)  # a refit killed before its first checkpoint starts over
    return refit


def mine(run_dir: str | Path, out: str | Path, top_r: int = 200, lo: int = 10, hi: int = 200, log=None) -> dict:
    """Mine hard negatives with a trained run: each known user's top ``top_r`` items by the model's
    score, the user's known items dropped, ranks ``[lo, hi)`` kept; written to ``out`` (Parquet or
    CSV, columns ``user``, ``item``: raw ids), the impressions format that ``negatives.hard =
    "exposure"`` reads, so the next training can use them."""
    import pandas as pd

    from .errors import TwotowerError
    from .model.scoring import ServedScore
    from .model.towers import embed_users
    from .run import Run
    from .training.mining import mine_negatives

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out)
    if out.suffix not in (".parquet", ".csv"):
        raise TwotowerError(f"--out {out}: use a .parquet or .csv file name")
    if not 0 <= lo < hi <= top_r:
        raise TwotowerError(f"need 0 <= --window LO < HI <= --top-r, got {lo}, {hi}, {top_r}")
    t0 = time.perf_counter()
    run = Run(run_dir)
    users = np.flatnonzero(run.known.lengths() > 0)
    uv = embed_users(run.model, users, run.known, run.config.model.history_length)
    q, items = ServedScore.of(run.model).inner_product(uv.float().numpy(), run.item_vectors.float().numpy())
    indptr, neg = mine_negatives(q, items, users, run.known.indptr, run.known.indices, top_r, lo, hi, len(run.users))
    rows = np.repeat(np.arange(len(run.users)), np.diff(indptr))
    frame = pd.DataFrame({"user": run.users.decode(rows), "item": run.items.decode(neg)})
    with artifacts.atomic_path(out) as tmp:
        frame.to_parquet(tmp, index=False) if out.suffix == ".parquet" else frame.to_csv(tmp, index=False)
    info = {"users": int(len(users)), "negatives": int(len(frame)), "seconds": time.perf_counter() - t0}
    log(f"mined {len(frame):,} negatives for {len(users):,} users (ranks {lo} to {hi - 1} of the top {top_r}, "
        f"known items dropped) in {info['seconds']:.1f}s -> {out}")
    return info


def evaluate_run(run_dir: str | Path, split: str = "test", data_dir: str | Path | None = None,
                 alpha: float | None = None) -> dict[str, float]:
    """Re-score a saved run on its data's ``split`` (the data is re-read and re-split from the saved config).

    ``alpha`` ranks by the served score with popularity correction ``score - alpha * log p(item)``
    (``None``: the run's ``eval.alpha``)."""
    from .errors import ArtifactError
    from .run import Run

    run = Run(run_dir)
    ds = load_dataset(run.config, data_dir)
    if not (ds.users == run.users and ds.items == run.items):
        raise ArtifactError(f"{run_dir}: the data under the data directory does not match the run's vocabularies "
                            "(different files or data.seed); point TWOTOWER_DATA at the data the run was trained on")
    cfg = run.config.eval if alpha is None else run.config.eval.model_copy(update={"alpha": float(alpha)})
    return evaluate(run.model, ds, split, cfg, run.config.model.history_length)
