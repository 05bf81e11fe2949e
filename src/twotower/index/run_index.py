"""A run's item index: embed every item, lay out the served score, build, tune and measure on real
users, save into the run directory; load it back (checked against the run's weights); update it
(items added, replaced, removed) without a rebuild.

The popularity coordinate of the layout is ``s_p (-log p(j) - c)`` with ``log p(j) = log(n_j + 1) -
log D`` and ``D = N + n_items`` (add-one smoothing, ``data.popularity.log_popularity``). Items
admitted to a run change ``D`` for every item: a constant shift of every ``log p``, which changes
no ranking and is absorbed by the offset ``c`` (``rebase``), so the stored coordinates of the items
already indexed stay valid and a new item's is laid out like any other (count 0 unless the run
holds one). ``index.json`` records the ``D`` its vectors were laid out with.
"""
from __future__ import annotations

import math
import sys
import time
import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .. import artifacts, locks
from ..errors import ArtifactError, ConfigError, storage_error
from ..model.scoring import ScoreLayout, item_bias
from ..model.towers import embed_items, embed_users
from .embeddings import NUMPY, PARQUET, embedding_progress, save_embeddings
from .index import EF_GRID, META_FILE, IndexParams, ItemIndex


@contextmanager
def writing_index(folder: Path) -> Iterator[None]:
    """Hold the index folder's lock (one writer at a time, ``locks``) and remove what a killed
    writer left there: its temporary files (``.NAME.XXXX.tmp``), which no later run would. The lock
    is ``.NAME.lock`` beside the folder: ``--update`` swaps the folder in whole, which would carry a
    lock inside it away."""
    folder = Path(folder)
    with locks.exclusive(folder, "twotower index", beside=True):
        made = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(e, folder) from None
        try:
            artifacts.remove_stale_temporaries(folder)
            yield
        finally:
            if made:  # a build that failed before writing leaves no empty folder behind
                try:
                    folder.rmdir()
                except OSError:
                    pass


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


def item_vectors(run, embeddings: np.ndarray, layout: ScoreLayout | None = None) -> tuple[np.ndarray, ScoreLayout]:
    """The augmented item vectors of ``run`` (its popularity and learned bias laid out after
    ``embeddings``) and the layout that forms matching queries: ``layout`` (an index's saved one),
    else one fitted to the run's popularity."""
    fitted, bias = ScoreLayout.of(run.model, run.log_popularity)
    layout = layout or fitted
    return layout.items(embeddings, run.log_popularity, bias), layout


def shifted_layout(layout: ScoreLayout, old_counts: np.ndarray, new_counts: np.ndarray) -> ScoreLayout:
    """``layout`` after items were added to the catalog: with ``p(j) = (n_j + 1) / (N + n_items)``
    every known item's ``-log p(j)`` grows by the same ``delta = log((N + n') / (N + n))``, so the
    offset ``c`` grows by ``delta`` and the known items' coordinates ``s_p (-log p(j) - c)`` (and
    their vectors in the index) stay as they are; the new ones are laid out on the same scale."""
    before = float(np.sum(old_counts, dtype=np.float64)) + len(old_counts)
    after = float(np.sum(new_counts, dtype=np.float64)) + len(new_counts)
    return dataclasses.replace(layout, offset=layout.offset + float(np.log(after / before)))


def popularity_denominator(counts: np.ndarray) -> float:
    """``D = N + n_items = sum_j (n_j + 1)``, the denominator of the add-one smoothed ``p(j)``."""
    return float((np.asarray(counts, dtype=np.float64) + 1.0).sum())


def log_popularity_over(counts: np.ndarray, denominator: float) -> np.ndarray:
    """``log p(j) = log(n_j + 1) - log D`` for a given ``D``: ``data.popularity.log_popularity``
    (the same operations, the same floats) when ``D = popularity_denominator(counts)``."""
    return np.log(np.asarray(counts, dtype=np.float64) + 1.0) - np.log(denominator)


def without_retired(run, idx: ItemIndex, seed: int = 0) -> int:
    """Remove from ``idx`` the run's retired items (updates retire items untouched for
    ``update.retire_after`` updates); returns how many."""
    retired = np.flatnonzero(run.activity.items_retired)
    if len(retired):
        idx.update(remove=retired, seed=seed)
    return len(retired)


def build_run_index(run, params: IndexParams, folder: str | Path | None = None, sample: int = 1000, seed: int = 0,
                    progress: bool = True, log=None) -> ItemIndex:
    """Embed every item, build the index of ``params`` over those not retired and save it with the
    embeddings in ``folder`` (default ``RUN/index``). Search knobs left unset are tuned on half of a sample of
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
        if retired := without_retired(run, idx, seed):
            log(f"index: {retired:,} retired item(s) left out (update.retire_after)")
        extra = {"embed_seconds": embed_s, "model_sha256": run.dir.model_digest(),
                 "popularity_denominator": popularity_denominator(run.item_counts)}
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
            idx.params = dataclasses.replace(idx.params, target_recall=float(target_recall))
        given = {k: v for k, v in (("ef_search", ef_search), ("nprobe", nprobe)) if v is not None}
        if given:
            idx.params = dataclasses.replace(idx.params, **given)  # replace() checks them like any index parameter
        keep = {k: idx.info[k] for k in ("embed_seconds", "model_sha256", "build_seconds", "popularity_denominator") if k in idx.info}
        return tune_measure_save(run, idx, folder, not given and idx.kind != "flat", sample, seed, log, keep)


def tune_measure_save(run, idx: ItemIndex, folder: Path, tune: bool, sample: int, seed: int, log, extra: dict,
                      say_saved: bool = True) -> ItemIndex:
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
            idx.params = dataclasses.replace(idx.params, **{tuned["param"]: grid[0]})
            tuned["value"] = grid[0]
        log(f"index: tuned {tuned['param']} = {tuned['value']} for recall >= {p.target_recall} on {len(tune_q)} users")
    m = idx.measure(eval_q, ks=(10, 100))
    m["with_alpha"] = {str(a): idx.recall(layout.queries(eval_u, a)) for a in (0.5, 1.0)}
    log("index: " + ", ".join(f"{k} {m[k]:.4f}" for k in m if k.startswith("recall@")) +
        " (alpha 1: " + ", ".join(f"{k} {v:.4f}" for k, v in m["with_alpha"]["1.0"].items()) + ")" +
        f" against exact on {len(eval_q)} users; per query {m['ann_ms_p50']:.3f} ms (exact {m['exact_ms_p50']:.3f} ms), "
        f"k = {m['k']}, one thread")
    idx.save(folder, {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra, "measured": m,
                      "tuning": tuned if tune else idx.info.get("tuning", {}), "n_users_sampled": int(len(users))})
    if say_saved:
        log(f"index: saved to {folder}")
    return idx


def index_folder(run, folder: str | Path | None = None) -> Path:
    """The index folder of ``run`` (default ``RUN/index``); while an update is swapping a new
    version in, the complete copy beside it (``artifacts.committed_dir``)."""
    folder = Path(folder) if folder is not None else run.dir.index_dir
    return artifacts.committed_dir(folder, META_FILE) or folder


def load_run_index(run, folder: str | Path | None = None, required: bool = False,
                   weights_changed_ok: bool = False) -> ItemIndex | None:
    """The index saved in ``folder`` (default ``RUN/index``), or ``None`` when there is none (an
    error when ``required``). Refuses an index built from other weights or other vectors. An index
    over fewer items than the run has (items admitted since) loads, ``rebase``d to the run's
    popularity; those items are not searched until ``update_run_index`` adds them.

    ``weights_changed_ok``: weights rewritten since the build (admitting items grows the tables)
    are accepted when the item tower still gives the indexed items the vectors the index holds
    (checked on a sample of them); the index is then stamped with the new weights' digest."""
    folder = index_folder(run, folder)
    if not (folder / META_FILE).is_file():
        if required:
            raise ArtifactError(f"{folder}: no index. Build it with `twotower index {run.path}`")
        return None
    meta = ItemIndex.read_meta(folder)
    digest = run.dir.model_digest()
    other_weights = bool(meta.get("model_sha256") and digest and meta["model_sha256"] != digest)
    if other_weights and not weights_changed_ok:
        raise ArtifactError(f"{folder}: built from other weights than {run.dir.weights_path}. "
                            f"Rebuild it with `twotower index {run.path}`")
    path = folder / NUMPY
    if not path.is_file():
        raise ArtifactError(f"{path}: missing. Rebuild the index with `twotower index {run.path}`")
    emb = artifacts.load_numpy(path, f"rebuild the index with `twotower index {run.path}`")
    if emb.ndim != 2 or len(emb) > len(run.items):
        raise ArtifactError(f"{path}: {emb.shape[0]:,} items where the run {run.path} has {len(run.items):,}: the index "
                            f"is from another run. Rebuild it with `twotower index {run.path}`")
    # the vectors as they were laid out (the recorded D; older indexes: the run's own), checked against the index
    denominator = meta.get("popularity_denominator") or popularity_denominator(run.item_counts)
    layout = ScoreLayout(**meta["layout"])
    idx = ItemIndex.load(folder, laid_out(run, layout, emb, np.arange(len(emb)), denominator))
    idx.info["popularity_denominator"] = denominator
    if other_weights:
        check_tower_matches(run, idx, emb, folder)
        idx.info["model_sha256"] = digest
    return rebase(run, idx, emb)


def check_tower_matches(run, idx: ItemIndex, emb: np.ndarray, folder: Path, sample: int = 512, seed: int = 0) -> None:
    """Refuse an index whose items the run's item tower no longer embeds as the index holds them
    (``sample`` of the indexed items, to float tolerance)."""
    items = np.flatnonzero(idx.contains(np.arange(idx.n_items)))
    if len(items) > sample:
        items = np.sort(np.random.default_rng(seed).choice(items, sample, replace=False))
    g = _tower_vectors(run, items, None, "check")
    if not np.allclose(g, emb[items], rtol=1e-4, atol=1e-5):
        raise ArtifactError(f"{folder}: built from other weights than {run.dir.weights_path} (the item tower gives its items "
                            f"other vectors). Rebuild it with `twotower index {run.path}`")


def laid_out(run, layout: ScoreLayout, g: np.ndarray, items: np.ndarray, denominator: float | None = None) -> np.ndarray:
    """The augmented vectors of run items ``items`` whose tower outputs are ``g``: their popularity
    (the run's counts, over ``denominator``, default the run's own ``D``) and learned bias laid out
    after ``g`` by ``layout``."""
    counts = run.item_counts[items]
    log_p = log_popularity_over(counts, popularity_denominator(run.item_counts) if denominator is None else denominator)
    bias = item_bias(run.model)
    return layout.items(g, log_p, None if bias is None else bias[items])


def rebase(run, idx: ItemIndex, emb: np.ndarray) -> ItemIndex:
    """``idx`` laid out over the run's current popularity denominator ``D'`` when it was laid out
    over another ``D`` (items admitted to the run since). Every ``-log p`` moves by
    ``log(D' / D)``: the offset ``c`` moves with it, so each item's coordinate (and the FAISS index)
    stays as it was, to float32 rounding, and the scores reported are the run's served scores."""
    old = float(idx.info["popularity_denominator"])
    new = popularity_denominator(run.item_counts)
    if new == old:
        return idx
    idx.layout = dataclasses.replace(idx.layout, offset=idx.layout.offset + math.log(new) - math.log(old))
    idx.vectors = laid_out(run, idx.layout, emb, np.arange(len(emb)))
    idx.info["popularity_denominator"] = new
    return idx


def _run_items(run, raw, what: str) -> np.ndarray:
    """Vocabulary indices of raw item ids (an error naming the first one the run does not know)."""
    if raw is None:
        return np.empty(0, np.int64)
    raw = list(raw) if not isinstance(raw, np.ndarray) else raw
    idx = run.items.encode(run.items.coerce(raw) if len(raw) else np.empty(0, np.int64))
    if (idx < 0).any():
        bad = np.asarray(raw, dtype=object)[idx < 0][:3].tolist()
        raise ConfigError(f"{what}: item(s) {bad} are not in the run's vocabulary ({len(run.items):,} items). New items "
                          "are admitted to the run first (their features and vocabulary rows), then added to its index")
    return idx


def _tower_vectors(run, items: np.ndarray, given, what: str) -> np.ndarray:
    """``g(j)`` of run items ``items``: ``given`` (float32 ``[m, d]``) or computed by the run's item tower."""
    d = int(run.config.model.dim)
    if given is not None:
        g = np.asarray(given, dtype=np.float32)
        if g.shape != (len(items), d):
            raise ConfigError(f"{what}: {len(items)} items need vectors of shape ({len(items)}, {d}), got {g.shape}")
        return g
    if not len(items):
        return np.empty((0, d), np.float32)
    run.model.eval()
    with torch.no_grad():
        return run.model.encode_items(torch.from_numpy(items)).float().cpu().numpy()


def update_run_index(run, add=None, replace=None, remove=None, add_vectors=None, replace_vectors=None,
                     add_new: bool = False, folder: str | Path | None = None, out: str | Path | None = None,
                     rebuild_share: float | None = None, sample: int = 1000, seed: int = 0, log=None) -> ItemIndex:
    """Update the saved index of ``run`` without rebuilding it, then measure recall against exact
    search on real users and save (``index.json`` records the update and the recall after it).

    ``add``: raw ids of run items the index does not hold (``add_new``: every run item beyond the
    index's rows, i.e. admitted since it was built); ``replace``: raw ids whose vectors
    changed; ``remove``: raw ids to retire (no longer returned; they stay in the vocabulary, so
    histories and similar-item queries that name them still work). Vectors are ``g(j)`` from the
    run's item tower unless given (``add_vectors`` / ``replace_vectors``: float32 ``[m, d]`` in the
    order of the ids). Popularity comes from the run's item counts (count 0 for an item admitted
    without one). The new version is written beside the old one and swapped in whole, so a server
    watching the folder never reads half of it (``index_folder``); with ``out``, it is written
    there instead (a new folder, e.g. the index folder of a run directory being rewritten) and
    ``folder`` is left as it was."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    final = Path(folder) if folder is not None else run.dir.index_dir
    with writing_index(final):  # one writer of the index folder: a build, or another update
        return _update_run_index(run, final, add, replace, remove, add_vectors, replace_vectors, add_new, out,
                                 rebuild_share, sample, seed, log)


def _update_run_index(run, final: Path, add, replace, remove, add_vectors, replace_vectors, add_new: bool, out,
                      rebuild_share, sample: int, seed: int, log) -> ItemIndex:
    t0 = time.perf_counter()
    idx = load_run_index(run, final, required=True, weights_changed_ok=True)
    src = index_folder(run, final)
    emb_old = artifacts.load_numpy(src / NUMPY, f"rebuild the index with `twotower index {run.path}`")
    if rebuild_share is not None:
        idx.params = dataclasses.replace(idx.params, rebuild_share=float(rebuild_share))  # (checked there)
    add_idx = _run_items(run, add, "add")
    if add_new:
        add_idx = np.union1d(add_idx, np.arange(idx.n_items, len(run.items), dtype=np.int64))
    rep_idx, rem_idx = _run_items(run, replace, "replace"), _run_items(run, remove, "remove")
    g_add = _tower_vectors(run, add_idx, add_vectors if not add_new else None, "add")
    g_rep = _tower_vectors(run, rep_idx, replace_vectors, "replace")
    load_s = time.perf_counter() - t0
    done = idx.update(add=(add_idx, laid_out(run, idx.layout, g_add, add_idx)),
                      replace=(rep_idx, laid_out(run, idx.layout, g_rep, rep_idx)), remove=rem_idx, seed=seed)
    emb = np.zeros((idx.n_items, emb_old.shape[1]), np.float32)
    emb[: len(emb_old)] = emb_old
    emb[add_idx], emb[rep_idx] = g_add, g_rep
    log(f"index: {done['added']:,} added, {done['replaced']:,} replaced, {done['removed']:,} removed in "
        f"{done['seconds']:.1f}s" + (" (rebuilt: dead entries passed the rebuild share)" if done["rebuilt"] else "")
        + f"; {idx.size:,} items searchable")
    staging = artifacts.staging_dir(final, META_FILE) if out is None else Path(out)
    staging.mkdir(parents=True, exist_ok=True)
    if (src / PARQUET).is_file():  # keep the Parquet export in step when the folder has one
        save_embeddings(staging, run.items.ids[: len(emb)], emb)
    else:
        artifacts.save_numpy(staging / NUMPY, emb)
    extra = {k: idx.info[k] for k in ("embed_seconds", "model_sha256", "build_seconds", "created", "from_parts")
             if k in idx.info}
    extra["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    extra["update_load_seconds"] = load_s
    tune_measure_save(run, idx, staging, False, sample, seed, log, extra, say_saved=False)
    if out is None:
        artifacts.replace_dir(staging, final)
    m = idx.info.get("measured", {})
    if any(m.get(f"recall@{k}", 1.0) < idx.params.target_recall for k in (10, 100)):
        log(f"index: recall after the update is below the target {idx.params.target_recall}; tune the search knob "
            f"again with `twotower index {run.path} --retune`")
    log(f"index: saved to {final if out is None else out}")
    return idx


def exact_run_index(run) -> ItemIndex:
    """An in-memory exact index of the run's items (what serving uses when no index was saved),
    without the retired ones (``update.retire_after``)."""
    vecs, layout = item_vectors(run, run.item_vectors.float().cpu().numpy())
    idx = ItemIndex.build(vecs, IndexParams(kind="flat"), layout)
    without_retired(run, idx)
    idx.info["saved"] = False
    return idx
