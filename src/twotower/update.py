"""Continuing a trained run on new interactions: ``update`` (``twotower update``).

A run in production is never trained once. ``update(RUN, NEW, OUT)`` makes a new run directory
``OUT`` from ``RUN`` without retraining from scratch:

1. the new interactions' users and items that ``RUN`` does not know are admitted through the one
   admission path (``index.admit.admit``): vocabularies, feature tables and weights grow; a new
   entity's id row is the learned unknown vector (id dropout) or zero when its tower has features;
   in a tower of ids alone, the fold-in of its new interactions (``fold_in_rows``,
   ``update.new_rows``) or a draw from the configured initialiser (``model.init_std``);
2. training continues from ``RUN``'s weights and optimizer state (its last checkpoint: Adam's
   moments, grown with zero rows for the new entities; the step count, so that the streaming
   frequency estimator and the memory bank carry on) for ``update.epochs`` passes over the new
   interactions plus a replay sample of the ones ``RUN`` knows (``replay_sample``), so that the
   model does not forget them; no validation: every epoch's weights are taken;
3. what the run knows grows by the new interactions, and the item counts behind ``p(j)`` continue
   (``continued_counts``: optionally decayed, then the new ones added);
4. ``OUT`` is written whole in a hidden folder beside it (every file through ``RunDir``, a fresh
   manifest, a checkpoint for the next update, ``lineage.json`` naming the parent, the index
   rebuilt in the parent's kind when the parent had one) and renamed into place last, so it is
   complete and verifiable like any trained run, or absent.

Retirement (``update.retire_after``, ``retired``): the users and items no update's new
interactions touched for that many updates are retired: their id rows are reset to the unknown
entity's (``forget_ids``), their pairs leave the replay pool, retired items leave the index and
every recommendation, and a retired user is answered from its features or history, or refused
clearly when its tower reads ids alone. ``activity.safetensors`` keeps per entity the generation
that last touched it.

Not done: runs with context features (refused: the new interactions' context is not read yet);
the update's settings are chosen by ``benchmarks/freshness.py`` on validation slices, not here.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import locks
from .config import UpdateConfig
from .data.dataset import CSR, Dataset, Split
from .errors import ArtifactError, TwotowerError
from .index.admit import NewEntities, admit, read_new_entities, read_new_items
from .model.towers import embed_items, embed_users
from .run_dir import RunDir
from .training.trainer import Trainer


# ---- the maths: small pure functions ----------------------------------------------------------------
def replay_sample(n_old: int, n_new: int, ratio: float, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of the old interactions replayed beside ``n_new`` new ones: ``m = min(round(ratio *
    n_new), cap, n_old)`` drawn uniformly without replacement, sorted. Uniform replay keeps the old
    data's distribution in the update's batches (experience replay, as in continual learning: Lin,
    1992; Rolnick et al., NeurIPS 2019, "Experience Replay for Continual Learning"), so the logQ
    correction of the update's batches stays the one of their own mix."""
    m = int(round(ratio * n_new))
    if cap is not None:
        m = min(m, int(cap))
    m = max(0, min(m, int(n_old)))
    return np.sort(rng.choice(int(n_old), size=m, replace=False)) if m else np.zeros(0, dtype=np.int64)


def focused_replay_sample(prefer: np.ndarray, m: int, share: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``m`` old interactions (``prefer``: a mask over them) of which ``m_f = min(round(share
    * m), |prefer|)`` are drawn uniformly without replacement among the preferred ones and the other
    ``m - m_f`` uniformly among all the rest, sorted. With ``prefer`` the pairs of the users active
    in the new interactions, ``share`` of the replay goes to their histories: their rows are trained
    against what they did before as well as what they did now, while the uniform part keeps every
    other row's place (a recency-focused replay, in the spirit of prioritised experience replay:
    Schaul et al., ICLR 2016; ``share = 0`` is ``replay_sample``'s uniform draw)."""
    prefer = np.asarray(prefer, dtype=bool)
    m = max(0, min(int(m), len(prefer)))
    pool = np.flatnonzero(prefer)
    m_f = min(int(round(share * m)), len(pool))
    first = rng.choice(pool, size=m_f, replace=False) if m_f else np.zeros(0, dtype=np.int64)
    rest = np.ones(len(prefer), dtype=bool)
    rest[first] = False
    rest_idx = np.flatnonzero(rest)
    second = rng.choice(rest_idx, size=m - m_f, replace=False) if m > m_f else np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate([first, second]).astype(np.int64))


def continued_counts(old: np.ndarray, new: np.ndarray, decay: float = 1.0) -> np.ndarray:
    """Item counts after an update: ``n'_j = round(decay * n_j) + new_j`` (``old`` padded with zeros
    for admitted items). ``decay = 1`` counts all history; ``decay < 1`` is an exponential forgetting
    of popularity per update (``decay^k`` after ``k`` updates), so ``p(j) = (n'_j + 1) / (N' + n_items)``
    (``data/popularity.py``) follows the recent data."""
    old = np.asarray(old, dtype=np.int64)
    new = np.asarray(new, dtype=np.int64)
    base = np.zeros(len(new), dtype=np.int64)
    base[:len(old)] = np.rint(old * float(decay)).astype(np.int64) if decay != 1.0 else old
    return base + new


def retired(last_seen: np.ndarray, generation: int, horizon: int | None, before: np.ndarray | None = None,
            touched: np.ndarray | None = None) -> np.ndarray:
    """Which entities are retired after update ``generation``: those no new interactions touched in
    the last ``horizon`` updates, ``generation - last_seen >= horizon``, plus those retired
    ``before``, less those ``touched`` now (an entity that comes back is active again). The expiry
    of embedding rows unseen for a while is Monolith's (Liu et al., 2022, "Monolith: Real Time
    Recommendation System With Collisionless Embedding Table"); ``horizon = None`` retires nothing
    new."""
    out = np.zeros(len(last_seen), bool) if before is None else np.asarray(before, bool).copy()
    if horizon is not None:
        out |= (int(generation) - np.asarray(last_seen, np.int64)) >= int(horizon)
    if touched is not None:
        out &= ~np.asarray(touched, bool)
    return out


def grown_optimizer_state(state: dict, params: list[torch.Tensor]) -> dict:
    """An optimizer ``state_dict`` whose per-row tensors (Adam's moments, DeferredAdam's moments and
    clock) are padded with zero rows to the shapes of ``params`` (the tables grew by the admitted
    entities). A zero first and second moment is exactly a row that never had a gradient, which is
    what a new row is. Step counts and step-indexed sums are left as they are."""
    out = {"param_groups": state["param_groups"], "state": {}}
    for key, st in state["state"].items():
        p = params[int(key)]
        grown = {}
        for name, t in st.items():
            if isinstance(t, torch.Tensor) and name not in ("step", "base", "tail") and t.dim() >= 1 \
                    and t.shape[0] < p.shape[0]:
                pad = torch.zeros((p.shape[0] - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
                t = torch.cat([t, pad])
            grown[name] = t
        out["state"][key] = grown
    return out


# ---- reading the inputs -----------------------------------------------------------------------------
def read_new_interactions(run, path: str | Path, user_col: str | None = None, item_col: str | None = None,
                          time_col: str | None = None) -> pd.DataFrame:
    """The new interactions (CSV, TSV or Parquet) as raw ``user``, ``item`` (and ``timestamp``)
    columns; the column names default to the run's ``data`` settings."""
    from .data.readers import read_interactions

    d = run.config.data
    return read_interactions(path, user_col or d.user_col, item_col or d.item_col,
                             time_col if time_col is not None else d.time_col).frame


def read_new_users(run, path: str | Path, id_col: str | None = None) -> NewEntities:
    """A table of new users' features, each read as its declared kind (``admit.read_new_entities``)."""
    return read_new_entities(run, path, "user", id_col)


def _new_ids(vocab, raw: np.ndarray) -> np.ndarray:
    """The distinct raw ids of ``raw`` that ``vocab`` does not know, in order of first appearance."""
    raw = np.asarray(raw)
    unknown = raw[vocab.encode(raw) < 0]
    _, first = np.unique(unknown.astype(str) if unknown.dtype == object else unknown, return_index=True)
    return unknown[np.sort(first)]


def _entities(vocab, interaction_ids: np.ndarray, table: NewEntities | None) -> NewEntities:
    """What to admit: the table's new rows (with their features), then the interactions' other new ids."""
    new = _new_ids(vocab, interaction_ids)
    if table is None:
        return NewEntities(new)
    keep = vocab.encode(table.ids) < 0
    ids = table.ids[keep]
    rows = [r for r, k in zip(table.rows(), keep) if k]
    titles = None if table.titles is None else [t for t, k in zip(table.titles, keep) if k]
    listed = set(map(str, ids))
    rest = np.asarray([x for x in new if str(x) not in listed], dtype=new.dtype)
    if len(rest):
        ids = np.concatenate([ids, rest.astype(ids.dtype) if ids.dtype != object else rest.astype(object)])
        rows = rows + [None] * len(rest)
        titles = None if titles is None else titles + [None] * len(rest)
    return NewEntities(ids, rows, titles)


def _check_representable(run, users: NewEntities, items: NewEntities) -> None:
    """Refuse new entities the towers could not embed: no id table, no history, no features."""
    m = run.config.model
    for kind, new, has_id, has_history, tower in (
            ("user", users, m.user_id, m.user_history, run.model.user_tower),
            ("item", items, m.item_id, False, run.model.item_tower)):
        if not len(new) or has_id or has_history:
            continue
        bare = [i for i, r in enumerate(new.rows()) if tower.features is None or not r or not any(r.values())]
        if bare:
            shown = ", ".join(map(str, new.ids[bare[:5]]))
            raise TwotowerError(f"{len(bare)} new {kind}(s) ({shown}) have no features, and this model's {kind} tower "
                                f"has neither ids nor history to learn them from; give their features with --{kind}s")


# ---- the update --------------------------------------------------------------------------------------
@dataclass
class UpdateResult:
    """What ``update`` did: the new run, its parent, the entities admitted, the pairs trained on,
    and the seconds (all, and training alone)."""

    run_dir: Path
    parent: Path
    new_users: int
    new_items: int
    new_pairs: int
    replayed: int
    seconds: float
    train_seconds: float
    index: str | None = None
    retired_users: int = 0
    retired_items: int = 0


def update(run_dir: str | Path, interactions: str | Path | pd.DataFrame, out: str | Path,
           items: str | Path | NewEntities | None = None, users: str | Path | NewEntities | None = None,
           cfg: UpdateConfig | None = None, user_col: str | None = None, item_col: str | None = None,
           time_col: str | None = None, build_index: bool | None = None, quiet: bool = True, log=None) -> UpdateResult:
    """Continue the run in ``run_dir`` on ``interactions`` (a file, or a frame with raw ``user``,
    ``item`` and optionally ``timestamp`` columns) and write the result to ``out`` (module
    docstring). ``items`` / ``users``: tables (or ``NewEntities``) of new entities' features.
    ``cfg``: the update's settings (default: the run's ``[update]`` section). ``build_index``:
    ``None`` rebuilds an index when the parent has one. Bad input raises ``TwotowerError`` with
    nothing written."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    out = Path(out)
    # the lock beside --out (the folder appears by a rename): a second writer of the same --out is refused
    with locks.exclusive(out, "twotower update", log=log, beside=True):
        return _update(run_dir, interactions, out, items, users, cfg, user_col, item_col, time_col, build_index,
                       quiet, log, t0)


def _update(run_dir, interactions, out: Path, items, users, cfg: UpdateConfig | None, user_col, item_col, time_col,
            build_index: bool | None, quiet: bool, log, t0: float) -> UpdateResult:
    from .index.index import IndexParams
    from .index.run_index import build_run_index, load_run_index
    from .run import Run

    if out.exists():
        raise TwotowerError(f"--out {out}: already exists; choose a new folder for the updated run")
    parent = Run(run_dir)
    if parent.config.feature_specs().context:
        raise TwotowerError(f"{parent.path}: the run's towers take context features, which an update does not read yet "
                            "(each new interaction's context); retrain the run instead")
    cfg = cfg if cfg is not None else parent.config.update
    frame = interactions if isinstance(interactions, pd.DataFrame) else \
        read_new_interactions(parent, interactions, user_col, item_col, time_col)
    if not len(frame):
        raise TwotowerError(f"{interactions}: no interactions to update the run with")
    item_table = read_new_items(parent, items) if isinstance(items, (str, Path)) else items
    user_table = read_new_users(parent, users) if isinstance(users, (str, Path)) else users
    new_items = _entities(parent.items, frame["item"].to_numpy(), item_table)
    new_users = _entities(parent.users, frame["user"].to_numpy(), user_table)
    _check_representable(parent, new_users, new_items)

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for p in parent.path.iterdir():  # the finished run's files (not its working folders)
            if p.is_file() and not p.name.startswith("."):
                shutil.copy2(p, tmp / p.name)
        if len(new_items) or len(new_users):
            admit(tmp, items=new_items, users=new_users, log=log)
        res = _train_and_write(parent, Run(tmp), frame, cfg, tmp, quiet, log)
        had_index = load_run_index(parent) is not None
        index = None
        if build_index if build_index is not None else had_index:
            kind = load_run_index(parent).kind if had_index else "auto"
            idx = build_run_index(Run(tmp), IndexParams(kind=kind), progress=False, log=log)
            index = idx.kind
        os.rename(tmp, out)  # the whole run appears at once
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    result = UpdateResult(out, parent.path, len(new_users), len(new_items), res["new_pairs"], res["replayed"], seconds,
                          res["train_seconds"], index, res["retired_users"], res["retired_items"])
    log(f"updated {parent.path} -> {out}: {result.new_pairs:,} new interactions + {result.replayed:,} replayed, "
        f"{result.new_users:,} new users, {result.new_items:,} new items, {cfg.epochs} epoch(s) in "
        f"{result.train_seconds:.1f}s ({seconds:.1f}s in all)" + (f"; index {index} built" if index else "")
        + (f"; retired (update.retire_after): {result.retired_users:,} users, {result.retired_items:,} items"
           if result.retired_users or result.retired_items else ""))
    return result


def _train_and_write(parent, run, frame: pd.DataFrame, u: UpdateConfig, folder: Path, quiet: bool, log) -> dict:
    """Train ``run`` (the parent with the new entities admitted) on the new pairs plus a replay
    sample, and write the result into ``folder`` (the run's own directory, not yet in place)."""
    rng = np.random.default_rng(u.seed)
    n_users, n_items = len(run.users), len(run.items)
    known = run.known
    old_users = np.repeat(np.arange(known.n_rows), known.lengths())
    old_items = known.indices
    has_time = "timestamp" in frame
    if has_time:
        frame = frame.sort_values("timestamp", kind="stable")
    users = run.users.encode(frame["user"].to_numpy())
    items = run.items.encode(frame["item"].to_numpy())
    # implicit feedback: a pair the run knows, or a repeat within the file, is not a new positive
    key = users.astype(np.int64) * n_items + items
    fresh = ~np.isin(key, old_users * n_items + old_items)
    _, first = np.unique(key, return_index=True)
    once = np.zeros(len(key), dtype=bool)
    once[first] = True
    keep = fresh & once
    # who the new interactions touched (repeats too), and who is retired after this update
    generation = int((parent.dir.read_lineage() or {}).get("generation", 0)) + 1
    act = parent.activity.grown(n_users, n_items, generation)
    touched_u, touched_i = np.zeros(n_users, bool), np.zeros(n_items, bool)
    touched_u[users], touched_i[items] = True, True
    act.users_seen[touched_u], act.items_seen[touched_i] = generation, generation
    act.users_retired = retired(act.users_seen, generation, u.retire_after, act.users_retired, touched_u)
    act.items_retired = retired(act.items_seen, generation, u.retire_after, act.items_retired, touched_i)
    users, items = users[keep], items[keep]
    ts = frame["timestamp"].to_numpy(dtype=np.float64)[keep] if has_time else None
    if act.users_retired.any() or act.items_retired.any():  # a retired entity's pairs are not replayed
        live = ~(act.users_retired[old_users] | act.items_retired[old_items])
        old_users, old_items = old_users[live], old_items[live]
    picked = replay_sample(len(old_items), len(users), u.replay, u.replay_max, rng)
    if u.replay_focus > 0 and len(picked):  # the uniform draw has fixed the size (ratio, cap, pool); redraw it focused
        active = np.zeros(n_users, dtype=bool)
        active[users] = True
        picked = focused_replay_sample(active[old_users], len(picked), u.replay_focus, rng)
    # Replayed pairs come before every new one in time, in the order the run knows them in, so
    # that a pair's history (Dataset.pair_history) holds only what came before it.
    start = float(ts.min()) if has_time and len(ts) else 0.0
    replay = Split(old_users[picked], old_items[picked],
                   (start - len(old_items) + picked).astype(np.float64) if has_time else None)
    new = Split(users, items, ts)
    empty = new.take(np.zeros(len(new), dtype=bool))
    ds = Dataset(f"update of {parent.path.name}", run.users, run.items, replay.concat(new), empty, empty)
    if not len(ds.train):
        raise TwotowerError("every interaction given is already known to the run; nothing to update it with")

    base = run.config
    tc = base.model_copy(deep=True)
    tc.train.epochs, tc.train.patience, tc.train.refit = u.epochs, 0, False
    tc.train.schedule, tc.train.warmup_steps, tc.train.seed = "constant", 0, u.seed
    tc.train.lr = u.lr if u.lr is not None else base.train.lr
    tc.mining.rounds = 0
    if tc.negatives.hard == "mined":
        tc.negatives.hard = None
    model = run.model
    _initialise_new_rows(parent, model, base, u, users, items, known)
    trainer = Trainer(tc, ds, None, quiet=quiet, log=log, model=model)
    optimizer_from = _continue_optimizer(parent, trainer, log)

    t0 = time.perf_counter()
    state = trainer.fit()
    train_seconds = time.perf_counter() - t0
    trainer.model.eval()
    trainer.model.forget_ids(items=act.items_retired, users=act.users_retired)

    d = RunDir(folder)
    new_csr = CSR.from_pairs(users, items, n_users, key=ts)
    known2 = known.union(new_csr)
    counts = continued_counts(run.item_counts, np.bincount(items, minlength=n_items), u.count_decay)
    cfg_out = base.model_copy(deep=True)
    cfg_out.update = u
    summary = dict(run.dir.read_summary() or {})
    summary.update({"users": n_users, "items": n_items})
    d.write_description(cfg_out, run.users, run.items, known2, counts, run.test_users, trainer.model.feature_state(),
                        summary, run.titles)
    d.write_activity(act)
    d.write_epochs(state.history)
    d.save_checkpoint(trainer.model.state_dict(), None, trainer.optimizer.state_dict(),
                      {**state.__dict__, "best_value": None}, trainer.candidates.state_dict())
    retired_counts = {"retired_users": int(act.users_retired.sum()), "retired_items": int(act.items_retired.sum())}
    d.write_lineage({
        "parent": str(parent.path.resolve()),
        "parent_model_sha256": parent.dir.model_digest(),
        "generation": generation,
        "new_interactions": int(len(users)), "replayed": int(len(picked)),
        **retired_counts,
        "new_users": int(n_users - len(parent.users)), "new_items": int(n_items - len(parent.items)),
        "optimizer_state": optimizer_from,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    metrics = {"update": {"epochs": u.epochs, "loss": [r["loss"] for r in state.history], "seconds": train_seconds,
                          "new_interactions": int(len(users)), "replayed": int(len(picked))},
               "parent_metrics": parent.metrics(), "valid": {}, "test": None, "seconds": train_seconds}
    with torch.no_grad():
        vecs = embed_items(trainer.model).float().cpu().numpy()
    d.finish(metrics, vecs, weights=trainer.model.state_dict())
    return {"new_pairs": int(len(users)), "replayed": int(len(picked)), "train_seconds": train_seconds, **retired_counts}


def fold_in_rows(vectors: torch.Tensor, owners: np.ndarray, targets: np.ndarray, n: int, norm: float) -> tuple[np.ndarray, torch.Tensor]:
    """Rows that start at the mean direction of what their entity interacted with: for each owner
    ``o`` of the pairs ``(owners, targets)``, ``r_o = norm * m_o / ||m_o||`` with ``m_o`` the mean of
    ``vectors[targets]`` over its pairs (the other tower's L2-normalised outputs). With a tower of ids
    alone and no MLP, ``f(u) = r_u / ||r_u||``, so the new user starts at the direction that scores
    its own items highest on average (the fold-in of matrix factorisation: a new row fitted to the
    fixed other side). Returns the owners with at least one pair (indices into ``0 .. n-1``) and
    their rows."""
    owners = np.asarray(owners, dtype=np.int64)
    sums = torch.zeros(n, vectors.shape[1], dtype=vectors.dtype)
    sums.index_add_(0, torch.from_numpy(owners), vectors[torch.from_numpy(np.asarray(targets, dtype=np.int64))])
    have = np.flatnonzero(np.bincount(owners, minlength=n) > 0)
    m = sums[torch.from_numpy(have)]
    return have, norm * m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def _initialise_new_rows(parent, model, cfg, u: UpdateConfig, users: np.ndarray, items: np.ndarray, known: CSR) -> None:
    """An admitted entity's id row is the learned unknown vector, or zero; in a tower with neither
    features nor an unknown vector a zero row is a zero vector that the L2 normalisation cannot
    turn (its gradient is undefined there), so those rows get the configured initialiser's draw,
    then, with ``update.new_rows = "fold_in"`` and no MLP, the fold-in of their new interactions
    (``fold_in_rows``): items first, from the known users, then users, from every item."""
    g = torch.Generator().manual_seed(u.seed)
    plain = {}
    for kind, tower, n0 in (("item", model.item_tower, len(parent.items)), ("user", model.user_tower, len(parent.users))):
        emb = tower.id_embedding
        if emb is None or tower.unknown_id is not None or tower.features is not None or emb.weight.shape[0] == n0:
            continue
        rows = emb.weight.shape[0] - n0
        emb.weight[n0:] = (torch.randn(rows, emb.weight.shape[1], generator=g) * cfg.model.init_std).to(emb.weight.dtype)
        plain[kind] = (emb, n0)
    if u.new_rows != "fold_in" or cfg.model.mlp or not plain:
        return
    hl = cfg.model.history_length
    if "item" in plain:
        emb, n0 = plain["item"]
        mine = (items >= n0) & (users < len(parent.users))
        if mine.any():
            uv = embed_users(model, np.arange(len(parent.users)), known, hl).float().cpu()
            have, rows = fold_in_rows(uv, items[mine] - n0, users[mine], emb.weight.shape[0] - n0,
                                      float(emb.weight[:n0].norm(dim=1).mean()))
            emb.weight[n0 + torch.from_numpy(have)] = rows.to(emb.weight.dtype)
    if "user" in plain:
        emb, n0 = plain["user"]
        mine = users >= n0
        if mine.any():
            iv = embed_items(model).float().cpu()
            have, rows = fold_in_rows(iv, users[mine] - n0, items[mine], emb.weight.shape[0] - n0,
                                      float(emb.weight[:n0].norm(dim=1).mean()))
            emb.weight[n0 + torch.from_numpy(have)] = rows.to(emb.weight.dtype)


def _continue_optimizer(parent, trainer: Trainer, log) -> str:
    """Load the parent's last optimizer state (grown to the new tables), its step count and its
    negative sources' state into ``trainer``. Returns where it came from ("none": a fresh optimizer,
    said in the log)."""
    d = parent.dir
    metrics = d.read_metrics()
    source = d.refit if metrics.get("refit") and d.refit.checkpoint_dir() is not None else d
    if source.checkpoint_dir() is None:
        log(f"{parent.path}: no checkpoint with the optimizer's state; the update starts a fresh optimizer")
        return "none"
    try:
        ck = source.load_checkpoint()
    except ArtifactError as e:
        raise ArtifactError(f"{parent.path}: its checkpoint cannot be read ({e}); the update needs the optimizer's state. "
                            "Restore the run's checkpoint/ folder, or retrain") from None
    opts = trainer.optimizer.opts
    saved = ck.optimizer
    grown = {}
    for i, o in enumerate(opts):
        params = [p for g in o.param_groups for p in g["params"]]
        grown[str(i)] = grown_optimizer_state(saved[str(i)], params)
    trainer.optimizer.load_state_dict(grown)
    trainer.state.step = int(ck.state.get("step", 0))
    if ck.negatives:
        n = trainer.model.n_items
        negs = {k: (torch.cat([v, torch.zeros(n - len(v), *v.shape[1:], dtype=v.dtype)]) if k.startswith("ratio.")
                    and len(v) < n else v) for k, v in ck.negatives.items() if not k.startswith("mined.")}
        trainer.candidates.load_state_dict(negs)
    return str(source.path.relative_to(parent.path) / "checkpoint") if source is not d else "checkpoint"
