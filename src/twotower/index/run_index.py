"""A run's item index: embed every item, lay out the served score, build, tune and measure on real
users, save into the run directory; load it back (checked against the run's weights)."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import artifacts, locks
from ..errors import ArtifactError, ConfigError
from ..model.scoring import ScoreLayout
from ..model.towers import embed_items, embed_users
from .embeddings import NUMPY, embedding_progress, save_embeddings
from .index import EF_GRID, META_FILE, IndexParams, ItemIndex


@contextmanager
def writing_index(folder: Path) -> Iterator[None]:
    """Hold the index folder's lock (one writer at a time, ``locks``) and remove what a killed
    writer left there: its temporary files (``.NAME.XXXX.tmp``), which no later run would."""
    with locks.exclusive(folder, "twotower index"):
        artifacts.remove_stale_temporaries(folder)
        yield


def sample_users(run, n: int = 1000, seed: int = 0) -> np.ndarray:
    """Up to ``n`` user indices drawn at random (seeded) among users with known items."""
    if not 1 <= int(n) <= 10_000_000:
        raise ConfigError(f"--sample-users {n}: recall is measured on real users; give 1 to 10,000,000 (default 1000)")
    users = np.flatnonzero(run.known.lengths() > 0)
    if not len(users):
        raise ArtifactError(f"{run.path}: no user has known items, so the index cannot be tuned or measured on users")
    if len(users) > n:
        users = np.sort(np.random.default_rng(seed).choice(users, n, replace=False))
    return users


def user_vectors(run, users: np.ndarray, batch: int = 4096) -> np.ndarray:
    """``f(u)`` of known users with their most recent known items as history, float32."""
    return embed_users(run.model, users, run.known, run.config.model.history_length, batch).float().cpu().numpy()


def item_vectors(run, embeddings: np.ndarray) -> tuple[np.ndarray, ScoreLayout]:
    """The augmented item vectors of ``run`` (its popularity and learned bias laid out after
    ``embeddings``) and the layout that forms matching queries."""
    layout, bias = ScoreLayout.of(run.model, run.log_popularity)
    return layout.items(embeddings, run.log_popularity, bias), layout


def build_run_index(run, params: IndexParams, folder: str | Path | None = None, sample: int = 1000, seed: int = 0,
                    progress: bool = True, log=None) -> ItemIndex:
    """Embed every item, build the index of ``params`` and save it with the embeddings in ``folder``
    (default ``RUN/index``). Search knobs left unset are tuned on half of a sample of
    real users to reach ``params.target_recall``; recall@10/@100 against exact search (at
    ``alpha = 0``, and also at 0.5 and 1) and per-query latency are measured on the other half and
    stored with the index."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    folder = Path(folder) if folder is not None else run.dir.index_dir
    sample_users(run, sample, seed)  # a sample that cannot measure anything is refused before the build,
    params.resolved(len(run.items))   # and so are parameters this catalog cannot train: nothing written
    with writing_index(folder):
        t0 = time.perf_counter()
        with embedding_progress(len(run.items), progress) as bar:
            emb = embed_items(run.model, progress=bar.update).float().cpu().numpy()
        save_embeddings(folder, run.items.ids, emb)
        embed_s = time.perf_counter() - t0
        vecs, layout = item_vectors(run, emb)
        idx = ItemIndex.build(vecs, params, layout, seed=seed)
        p = idx.params
        log(f"index: {p.kind} over {idx.n_items:,} items x {idx.dim} dims built in {idx.info['build_seconds']:.1f}s")
        extra = {"embed_seconds": embed_s, "model_sha256": run.dir.model_digest()}
        tune = p.kind == "hnsw" and params.ef_search is None or p.kind in ("ivf", "ivfpq") and params.nprobe is None
        return tune_measure_save(run, idx, folder, tune, sample, seed, log, extra)


def retune_run_index(run, folder: str | Path | None = None, ef_search: int | None = None, nprobe: int | None = None,
                     target_recall: float | None = None, sample: int = 1000, seed: int = 0, log=None) -> ItemIndex:
    """Change a saved index's search knobs without rebuilding it: set ``ef_search`` / ``nprobe``
    when given, else tune them again (to ``target_recall`` when given); measure and save."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    folder = Path(folder) if folder is not None else run.dir.index_dir
    sample_users(run, sample, seed)
    idx = load_run_index(run, folder, required=True)
    with writing_index(folder):
        if target_recall is not None:
            idx.params = replace(idx.params, target_recall=float(target_recall))
        given = {k: v for k, v in (("ef_search", ef_search), ("nprobe", nprobe)) if v is not None}
        if given:
            idx.params = replace(idx.params, **given)  # replace() checks them like any index parameter
        keep = {k: idx.info[k] for k in ("embed_seconds", "model_sha256", "build_seconds") if k in idx.info}
        return tune_measure_save(run, idx, folder, not given and idx.kind != "flat", sample, seed, log, keep)


def tune_measure_save(run, idx: ItemIndex, folder: Path, tune: bool, sample: int, seed: int, log, extra: dict) -> ItemIndex:
    """Tune the search knob on half of a sample of real users (stepping further while the other
    half's recall is below target), measure recall and latency on that other half, save."""
    p, layout = idx.params, idx.layout
    users = sample_users(run, sample, seed)
    uv = user_vectors(run, users)
    queries = layout.queries(uv, 0.0)
    tune_q, eval_q = (queries[::2], queries[1::2]) if len(queries) >= 20 else (queries, queries)
    eval_u = uv[1::2] if len(queries) >= 20 else uv
    tuned = {}
    if tune:
        tuned = idx.tune(tune_q, ks=(10, 100))
        # the held-out half must reach the target too (sampling noise): step up the grid while it does not
        while min(idx.recall(eval_q).values()) < p.target_recall:
            grid = [v for v in (EF_GRID if tuned["param"] == "ef_search" else [2 ** i for i in range(17)])
                    if v > getattr(idx.params, tuned["param"])]
            if not grid or tuned["param"] == "nprobe" and grid[0] > idx.params.nlist:
                break
            idx.params = replace(idx.params, **{tuned["param"]: grid[0]})
            tuned["value"] = grid[0]
        log(f"index: tuned {tuned['param']} = {tuned['value']} for recall >= {p.target_recall} on {len(tune_q)} users")
    m = idx.measure(eval_q, ks=(10, 100))
    m["with_alpha"] = {str(a): idx.recall(layout.queries(eval_u, a)) for a in (0.5, 1.0)}
    log("index: " + ", ".join(f"{k} {m[k]:.4f}" for k in m if k.startswith("recall@")) +
        " (alpha 1: " + ", ".join(f"{k} {v:.4f}" for k, v in m["with_alpha"]["1.0"].items()) + ")" +
        f" against exact on {len(eval_q)} users; per query {m['ann_ms_p50']:.3f} ms (exact {m['exact_ms_p50']:.3f} ms), "
        f"k = {m['k']}, one thread")
    idx.save(folder, {**extra, "measured": m, "tuning": tuned, "n_users_sampled": int(len(users)),
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    log(f"index: saved to {folder}")
    return idx


def load_run_index(run, folder: str | Path | None = None, required: bool = False) -> ItemIndex | None:
    """The index saved in ``folder`` (default ``RUN/index``), or ``None`` when there is none (an
    error when ``required``). Refuses an index built from other weights."""
    folder = Path(folder) if folder is not None else run.dir.index_dir
    if not (folder / META_FILE).is_file():
        if required:
            raise ArtifactError(f"{folder}: no index. Build it with `twotower index {run.path}`")
        return None
    meta = ItemIndex.read_meta(folder)
    digest = run.dir.model_digest()
    if meta.get("model_sha256") and digest and meta["model_sha256"] != digest:
        raise ArtifactError(f"{folder}: built from other weights than {run.dir.weights_path}. "
                            f"Rebuild it with `twotower index {run.path}`")
    path = folder / NUMPY
    if not path.is_file():
        raise ArtifactError(f"{path}: missing. Rebuild the index with `twotower index {run.path}`")
    emb = artifacts.load_numpy(path, f"rebuild the index with `twotower index {run.path}`")
    vecs, _ = item_vectors(run, emb)
    return ItemIndex.load(folder, vecs)


def exact_run_index(run) -> ItemIndex:
    """An in-memory exact index of the run's items (what serving uses when no index was saved)."""
    vecs, layout = item_vectors(run, run.item_vectors.float().cpu().numpy())
    idx = ItemIndex.build(vecs, IndexParams(kind="flat"), layout)
    idx.info["saved"] = False
    return idx
