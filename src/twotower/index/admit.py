"""Admitting new items (and users) to a trained run without retraining: ``admit``.

The one way entities join a finished run (``twotower add-items``; the freshness command of issue
21 reuses it). For each new item:

1. its raw id is appended to the item vocabulary (index ``n_items``, ``n_items + 1``, ...);
2. its feature values join every item feature encoder's per-entity table, placed by the encoders
   as at request time (the vocabularies stay the training data's; values they cannot place are
   reported and contribute nothing);
3. its id row is the item tower's learned unknown vector (zero without id dropout), its learned
   bias zero and its training count zero, so ``g(j)`` is exactly what the item tower computes for
   the item as one outside the vocabulary (``TwoTowerModel.with_new_entities``);
4. its vector is added to the run's index with FAISS's ``add`` (flat, IVF, HNSW, IVF-PQ: no
   rebuild); the popularity coordinate's offset moves with the catalog's size so that every known
   item's indexed vector stays as it is (``run_index.shifted_layout``);
5. the run directory is rewritten at once through ``RunDir``: every changed file, and the index
   folder, written whole into ``RUN/.staged``, then swapped in and a new manifest written
   (``RunDir.commit_staged``). A ``serve`` started afterwards serves the new items.

New users get a row in the user vocabulary, their features in the user encoders' tables and the
unknown-user vector as id row; they have no known items.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .. import artifacts
from ..data.dataset import CSR
from ..data.vocab import Vocabulary
from ..data.popularity import log_popularity
from ..errors import TwotowerError
from ..model.scoring import item_bias
from ..model.towers import embed_items
from ..run_dir import RunDir
from .embeddings import save_embeddings
from .run_index import load_run_index, popularity_denominator, shifted_layout


@dataclass
class NewEntities:
    """Entities to admit: raw ``ids`` (new to the run), per entity its features ``{feature: value
    or [values]}`` (or ``None``), and for items optional display ``titles``."""

    ids: np.ndarray
    features: Sequence[Mapping[str, Any] | None] | None = None
    titles: Sequence[str | None] | None = None

    def __post_init__(self):
        self.ids = np.asarray(self.ids)
        if self.features is not None and len(self.features) != len(self.ids):
            raise ValueError(f"{len(self.features)} feature rows for {len(self.ids)} ids")
        if self.titles is not None and len(self.titles) != len(self.ids):
            raise ValueError(f"{len(self.titles)} titles for {len(self.ids)} ids")

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self) -> list:
        return list(self.features) if self.features is not None else [None] * len(self.ids)


@dataclass
class Admitted:
    """What ``admit`` did: entities added, the feature values no encoder could place (by raw id),
    the index it updated (``None``: the run had none), the items' count after, and the seconds."""

    items: int
    users: int
    unknown_features: dict = field(default_factory=dict)
    index: str | None = None
    n_items: int = 0
    seconds: float = 0.0


def _appended(vocab: Vocabulary, new: NewEntities, kind: str) -> Vocabulary:
    """``vocab`` with the new raw ids after its own; refuses ids it knows, repeats, or ids of another type."""
    if not len(new):
        return vocab
    raw = new.ids
    if vocab.is_integer:
        ids = vocab.coerce(list(raw))
        bad = ids == np.iinfo(np.int64).min
        if bad.any():
            raise TwotowerError(f"{kind} id {raw[np.flatnonzero(bad)[0]]!r} is not an integer, and this run's {kind} ids "
                                f"are; give the new {kind}s integer ids")
    else:
        ids = np.array([str(x) for x in raw], dtype=object)
    _, first, counts = np.unique(ids.astype(str) if ids.dtype == object else ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        raise TwotowerError(f"{kind} id {ids[first[np.flatnonzero(counts > 1)[0]]]!r} is given more than once; "
                            f"give each new {kind} once")
    known = vocab.encode(ids) >= 0
    if known.any():
        shown = ", ".join(map(str, ids[known][:5]))
        raise TwotowerError(f"{int(known.sum())} {kind}(s) are already in the run ({shown}{' ...' if known.sum() > 5 else ''}); "
                            f"admit only new {kind}s (a known {kind} keeps what training learned)")
    return Vocabulary(np.concatenate([vocab.ids, ids.astype(vocab.ids.dtype)]), name=vocab.name)


def admit(run_dir, items: NewEntities | None = None, users: NewEntities | None = None, log=None) -> Admitted:
    """Add ``items`` and ``users`` to the run in ``run_dir`` without retraining (module docstring):
    vocabularies, feature tables, weights, known items, titles, item embeddings and the index,
    rewritten at once. Returns what was done. A mistake (an id the run knows, a feature the
    towers do not have) raises ``TwotowerError`` before anything is written. Holds the run
    directory's lock (``RunDir.lock``): a second writer of the run is refused."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    with RunDir(run_dir).lock("twotower add-items", log=log):
        return _admit(run_dir, items, users, log)


def _admit(run_dir, items: NewEntities | None, users: NewEntities | None, log) -> Admitted:
    from ..run import Run

    t0 = time.perf_counter()
    items = items if items is not None else NewEntities(np.empty(0, np.int64))
    users = users if users is not None else NewEntities(np.empty(0, np.int64))
    run = Run(run_dir)
    item_vocab, user_vocab = _appended(run.items, items, "item"), _appended(run.users, users, "user")
    try:
        model, bad_items, bad_users = run.model.with_new_entities(items.rows(), users.rows())
    except KeyError as e:
        raise TwotowerError(f"{e.args[0]}; the new entities' features must be features of this model's towers") from None
    n0, m = len(run.items), len(items)
    counts = np.r_[run.item_counts, np.zeros(m, dtype=run.item_counts.dtype)]
    known = CSR(np.r_[run.known.indptr, np.full(len(users), run.known.indptr[-1], dtype=np.int64)], run.known.indices)
    titles = run.titles
    if m and (titles is not None or items.titles is not None):
        old = titles if titles is not None else np.full(n0, None, dtype=object)
        new = np.asarray(items.titles if items.titles is not None else [None] * m, dtype=object)
        titles = np.concatenate([old, new])
    old_vecs = run.dir.read_item_embeddings()
    if old_vecs is None or len(old_vecs) != n0:
        old_vecs = embed_items(run.model).float().cpu().numpy()
    vecs = np.vstack([old_vecs, embed_items(model, start=n0).float().cpu().numpy()]) if m else old_vecs

    staged = run.dir.staging()
    staged.write_description(run.config, user_vocab, item_vocab, known, counts, run.test_users, model.feature_state(),
                             run.dir.read_summary(), titles)
    staged.save_weights(model.state_dict())
    staged.save_item_embeddings(vecs)
    if len(users) and (held := run.heldout()) is not None:
        staged.write_heldout(*(CSR(np.r_[h.indptr, np.full(len(users), h.indptr[-1], dtype=np.int64)], h.indices)
                               for h in held))
    index = load_run_index(run)
    if index is not None:
        layout = shifted_layout(index.layout, run.item_counts, counts)
        aug = layout.items(vecs, log_popularity(counts), item_bias(model))
        index.layout = layout  # the known items' coordinates, and their FAISS entries, stay as they are
        index.update(add=(np.arange(n0, n0 + m, dtype=np.int64), aug[n0:]))
        # the whole catalog as loading will lay it out (the known rows equal to the indexed ones up
        # to float rounding), over the new popularity denominator, so that loading neither rebases
        # it again nor finds another digest
        index.vectors = aug
        index.info["popularity_denominator"] = popularity_denominator(counts)
        extra = {k: v for k, v in index.info.items() if k not in ("vectors_sha256", "index_sha256")}
        extra["model_sha256"] = artifacts.sha256_file(staged.weights_path)
        extra["admitted"] = list(extra.get("admitted", [])) + [{"items": m, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
        index.save(staged.index_dir, extra)
        save_embeddings(staged.index_dir, item_vocab.ids, vecs)
    run.dir.commit_staged()
    report = {}
    for vocab, new, bad in ((item_vocab, items, bad_items), (user_vocab, users, bad_users)):
        for raw, b in zip(vocab.ids[len(vocab) - len(new):], bad):
            if b:
                report[raw.item() if hasattr(raw, "item") else raw] = b
    out = Admitted(m, len(users), report, str(run.dir.index_dir) if index is not None else None, len(item_vocab),
                   time.perf_counter() - t0)
    log(f"admitted {m:,} item(s) and {len(users):,} user(s) to {run.path} ({len(item_vocab):,} items now)"
        + (f"; index {index.kind} updated" if index is not None else "; no index yet (`twotower index` builds one)")
        + (f"; {len(report)} with feature values the model does not know" if report else "")
        + f" in {out.seconds:.1f}s")
    return out


def read_new_items(run, path: str | Path, id_col: str | None = None, title_col: str | None = None,
                   separators: Mapping[str, str] | None = None) -> NewEntities:
    """A table of new items (CSV, TSV or Parquet): the id column (default the run's
    ``data.item_id_col``) and one column per item feature of the model, and optionally titles
    (default the run's ``data.item_title_col``); ``read_new_entities``."""
    title_col = title_col if title_col is not None else run.config.data.item_title_col
    return read_new_entities(run, path, "item", id_col, title_col, separators)


def read_new_entities(run, path: str | Path, kind: str = "item", id_col: str | None = None,
                      title_col: str | None = None, separators: Mapping[str, str] | None = None) -> NewEntities:
    """A table of new items or users (``kind``; CSV, TSV or Parquet): the id column (default the
    run's ``data.item_id_col`` / ``data.user_id_col``) and one column per feature of that tower,
    each read as its declared kind (``[features]``, or the older ``model.item_features``: a
    multi-valued one is a list column, or text split by ``separators[feature]``; an empty cell is a
    missing value), and optionally a ``title_col``. A vector feature read from its own ``.npy`` file
    is not in the table: the new entities get its missing value."""
    from ..data.readers import read_features

    if kind not in ("item", "user"):
        raise ValueError(f"kind must be 'item' or 'user', got {kind!r}")
    cfg = run.config.data
    feats = (run.model.item_tower if kind == "item" else run.model.user_tower).features
    names = feats.names if feats is not None else []
    seps = dict(separators or {})
    specs = []
    for spec in run.config.feature_specs().tower(kind):
        if spec.name not in names or (spec.kind == "vector" and spec.file):
            continue
        if spec.kind == "multi_categorical" and spec.name in seps:
            spec = spec.model_copy(update={"separator": seps[spec.name]})
        specs.append(spec)
    default_id = cfg.item_id_col if kind == "item" else cfg.user_id_col
    f = read_features(path, id_col or default_id, [], title_col=title_col, kind=kind, specs=specs)
    rows = [{s.name: _raw_value(f, s.name, r) for s in specs} for r in range(len(f.ids))]
    return NewEntities(f.ids, rows, None if f.titles is None else list(f.titles))


def _raw_value(f, name: str, row: int):
    """Row ``row`` of feature ``name`` as a request sends it (``None``: missing)."""
    if name in f.categorical:
        return f.categorical[name][row]
    v = f.dense[name][row]
    if isinstance(v, np.ndarray):  # a vector: a row of NaN is missing
        return None if np.isnan(v).all() else v.astype(np.float64)
    if isinstance(v, (float, np.floating)):
        return None if np.isnan(v) else float(v)
    return v
