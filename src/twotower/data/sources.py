"""From a ``DataConfig`` to an encoded ``Dataset``: read, clean, split, encode.

Named datasets are folders under the data directory (``TWOTOWER_DATA``), each read exactly as its
publisher ships it. Generic interaction files are mapped by column names.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..config import DataConfig, RunConfig, legacy_features
from ..errors import ConfigError, DataError
from .dataset import Dataset, EncodedFeatures, encode_interactions
from .paths import default_data_dir
from .readers import Features, read_features, read_interactions, read_lightgcn
from .readers.kinds import read_vector_file
from .readers.movielens import movielens_100k_tables
from .readers.table import Table, missing_column_error
from .readers.tabular import context_frame, features_from_table, with_time_column
from .splits import last_n_holdout, random_holdout
from .vocab import Vocabulary

NAMED_FOLDERS = {"ml-100k": "ml-100k", "gowalla": "gowalla", "lightgcn": "gowalla", "grocery": "grocery"}


def resolve(path: str, data_dir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else data_dir / p


def load_dataset(cfg: RunConfig | DataConfig, data_dir: str | Path | None = None) -> Dataset:
    """Read the configured data and build the splits (seeded, deterministic).

    With a ``RunConfig`` that declares ``[features]``, those features, each column read as its kind.
    Otherwise the older categorical columns the data offers (``data.item_feature_cols`` ..., a named
    dataset's genre, age, ...), all of them; the model takes those it names (``model.item_features``)."""
    if isinstance(cfg, RunConfig):
        declared = cfg.features.declared
        specs = cfg.features if declared else legacy_features(cfg.data)
        cfg = cfg.data
    else:
        declared, specs = False, legacy_features(cfg)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    name = cfg.dataset
    test_frame = None
    item_f: Features | None = None
    user_f: Features | None = None
    if name in ("gowalla", "lightgcn"):
        folder = _folder(cfg, data_dir)
        train, test = read_lightgcn(folder)
        frame, test_frame = train.frame, test.frame
        if cfg.split != "given":
            raise ConfigError(f"data.split: the {name} data ships its own train/test split; set data.split = \"given\"")
        if specs.declared:
            raise ConfigError(f"[features]: the {name} data (LightGCN format) has only user-item pairs: no feature "
                              "tables, no timestamps; declare no features")
    elif name == "ml-100k":
        inter, items_t, users_t = movielens_100k_tables(_folder(cfg, data_dir))
        frame = _with_context(inter.frame, inter.table, specs.context, "timestamp")
        item_f = _table_features(items_t, "movie_id", specs.item, "item", items_t.columns["title"].to_numpy(dtype=object))
        user_f = _table_features(users_t, "user_id", specs.user, "user")
    elif name == "grocery":
        folder = _folder(cfg, data_dir)
        frame = read_interactions(folder / "train.csv", user_col="user_id", item_col="item_id", time_col="time",
                                  context=specs.context).frame
        # item_meta.csv covers the whole catalog, including items seen only in the publisher's
        # held-out parts: keep the rows of items that occur here.
        if specs.item:
            meta = read_features(folder / "item_meta.csv", id_col="item_id", columns=[], specs=specs.item)
            item_f = _restrict(meta, frame["item"].to_numpy())
        if specs.user:
            raise ConfigError(f"features.user {[s.name for s in specs.user]}: the grocery data has no user table")
    elif name == "synthetic":
        from .synthetic import make_synthetic
        syn = make_synthetic(n_users=cfg.synthetic_users, n_items=cfg.synthetic_items, seed=cfg.seed)
        frame = _with_context(syn.interactions.frame, _frame_table(syn.interactions.frame, syn.interactions.source),
                              specs.context, "timestamp")
        item_f = _table_features(syn.item_table(), "item", specs.item, "item", syn.item_features.titles)
        if specs.user:
            raise ConfigError(f"features.user {[s.name for s in specs.user]}: the synthetic data has no user table")
    else:
        if not cfg.interactions:
            raise ConfigError("data.interactions: set the interactions file (CSV, TSV or Parquet), or a named data.dataset")
        frame = read_interactions(resolve(cfg.interactions, data_dir), cfg.user_col, cfg.item_col, cfg.time_col, cfg.weight_col,
                                  context=specs.context).frame
        if cfg.test_interactions:
            test_frame = read_interactions(resolve(cfg.test_interactions, data_dir), cfg.user_col, cfg.item_col,
                                           cfg.time_col, cfg.weight_col, context=specs.context).frame
        known = np.unique(np.concatenate([frame["item"].to_numpy()] + ([test_frame["item"].to_numpy()] if test_frame is not None else [])))
        item_specs = [s for s in specs.item if not (s.kind == "vector" and s.file)]
        user_specs = [s for s in specs.user if not (s.kind == "vector" and s.file)]
        # (the older columns are read as they always were: their messages name data.item_feature_cols ...)
        if cfg.item_features:
            item_f = read_features(resolve(cfg.item_features, data_dir), cfg.item_id_col, cfg.item_feature_cols,
                                   cfg.item_multi_valued, cfg.item_title_col, known_ids=known, kind="item",
                                   specs=specs.item if declared else None)
        elif item_specs:
            raise ConfigError(f"features.item {[s.name for s in item_specs]}: set data.item_features (the item table)")
        if cfg.user_features:
            known_u = np.unique(np.concatenate([frame["user"].to_numpy()] + ([test_frame["user"].to_numpy()] if test_frame is not None else [])))
            user_f = read_features(resolve(cfg.user_features, data_dir), cfg.user_id_col, cfg.user_feature_cols,
                                   cfg.user_multi_valued, known_ids=known_u, kind="user", specs=specs.user if declared else None)
        elif user_specs:
            raise ConfigError(f"features.user {[s.name for s in user_specs]}: set data.user_features (the user table)")
    item_f = _with_vector_files(item_f, specs.item, "item", data_dir)
    user_f = _with_vector_files(user_f, specs.user, "user", data_dir)
    if cfg.split == "given" and test_frame is None:
        raise ConfigError("data.split = \"given\" needs data.test_interactions (or a dataset that ships a test file)")
    if cfg.split == "temporal" and "timestamp" not in frame:
        raise ConfigError("data.split = \"temporal\" needs timestamps: set data.time_col, or use split = \"random\"")
    return build_dataset(name, frame, test_frame, item_f, user_f, cfg, context=specs.context)


def _frame_table(frame: pd.DataFrame, source: str) -> Table:
    """A frame's columns as a table whose rows are named by index (a generated dataset's)."""
    return Table(Path(source), {c: frame[c] for c in frame.columns}, len(frame), lambda row: f"row index {row}",
                 [str(c) for c in frame.columns])


def _check_columns(table: Table, specs, source: str) -> None:
    for s in specs:
        if not (s.kind == "vector" and s.file) and s.source_column not in table.columns:
            raise missing_column_error(table.path, s.source_column, f"{source} feature", "column", list(table.found),
                                       "columns", None)


def _table_features(table: Table, id_col: str, specs, source: str, titles=None) -> Features:
    """A named dataset's table read as the declared features (a vector with its own file aside)."""
    specs = [s for s in specs if not (s.kind == "vector" and s.file)]
    _check_columns(table, specs, source)
    return features_from_table(table, table.columns[id_col].to_numpy(), specs, source, titles)


def _with_context(frame: pd.DataFrame, table: Table, specs, time_col: str) -> pd.DataFrame:
    """``frame`` with the context columns ``context:NAME`` read from ``table`` (its rows are the frame's)."""
    if not specs:
        return frame
    specs = [with_time_column(s, time_col) for s in specs]
    _check_columns(table, specs, "context")
    return frame.assign(**context_frame(table, specs))


def _with_vector_files(f: Features | None, specs, source: str, data_dir: Path) -> Features | None:
    """The vector features with their own ``.npy`` file (records keyed by id) joined to the table's
    rows by id (an id without a vector: missing; without a table, the files' ids are the rows)."""
    files = [s for s in specs if s.kind == "vector" and s.file]
    if not files:
        return f
    read = {s.name: read_vector_file(resolve(s.file, data_dir), s, source) for s in files}
    if f is None:
        ids = _same_kind([ids for ids, _ in read.values()])
        ids = pd.unique(pd.Series(ids, dtype=object)).to_numpy()
        ids = ids.astype(np.int64) if all(isinstance(x, (int, np.integer)) for x in ids) else ids.astype(str).astype(object)
        f = Features(ids, {}, None, source, {}, {})
    dense, all_specs = dict(f.dense), dict(f.specs)
    for s in files:
        ids, vectors = read[s.name]
        where = Vocabulary(_same_kind([ids]), name=source).encode(_same_kind([f.ids]))
        out = np.full((len(f.ids), vectors.shape[1]), np.nan, dtype=np.float32)
        out[where >= 0] = vectors[where[where >= 0]]
        if s.missing == "error" and (where < 0).any():
            row = int(np.flatnonzero(where < 0)[0])
            raise DataError(resolve(s.file, data_dir), f"{source} id {f.ids[row]!r} has no vector ({int((where < 0).sum())} "
                                                         f"such ids) and features.{source} {s.name!r} says missing = \"error\"",
                            "add their vectors, or declare missing = \"learn\"")
        dense[s.name] = out
    order = [s.name for s in specs if s.name in dense or s.name in f.categorical]
    all_specs.update({s.name: s for s in files})
    return Features(f.ids, f.categorical, f.titles, f.source, dense, {n: all_specs[n] for n in order})


def _folder(cfg: DataConfig, data_dir: Path) -> Path:
    folder = resolve(cfg.path or NAMED_FOLDERS[cfg.dataset], data_dir)
    if not folder.is_dir():
        raise DataError(folder, f"the {cfg.dataset} folder does not exist",
                        f"put the dataset under the data directory ({data_dir}; set TWOTOWER_DATA) or set data.path")
    return folder


def _restrict(f: Features, ids: np.ndarray) -> Features:
    keep = pd.Index(np.unique(ids)).get_indexer(f.ids) >= 0
    return Features(f.ids[keep], {k: [v for v, ok in zip(vals, keep) if ok] for k, vals in f.categorical.items()},
                    None if f.titles is None else f.titles[keep], f.source, {k: v[keep] for k, v in f.dense.items()},
                    f.specs)


def _clean(frame: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    if cfg.min_weight is not None:
        if "weight" not in frame:
            raise ConfigError("data.min_weight needs a weight column: set data.weight_col")
        frame = frame[frame["weight"] >= cfg.min_weight]
    if "timestamp" in frame:
        frame = frame.sort_values("timestamp", kind="stable")
    # Implicit feedback: a repeated (user, item) pair is one positive; keep its first occurrence.
    return frame.drop_duplicates(["user", "item"], keep="first").reset_index(drop=True)


def build_dataset(name: str, frame: pd.DataFrame, test_frame: pd.DataFrame | None, item_f: Features | None,
                  user_f: Features | None, cfg: DataConfig, context=()) -> Dataset:
    """The splits, vocabularies and features of read data. Feature encoders fit on the training
    split alone: ``EncodedFeatures.fit_rows`` are the entities with training interactions, and the
    context values that fit are the training split's (``context``: the declarations of the frames'
    ``context:NAME`` columns)."""
    frame = _clean(frame, cfg)
    if len(frame) == 0:
        raise DataError(name, "no interactions left after cleaning", "check data.min_weight and the input files")
    users_all = [frame["user"].to_numpy()]
    items_all = [frame["item"].to_numpy()]
    if test_frame is not None:
        test_frame = _clean(test_frame, cfg)
        users_all.append(test_frame["user"].to_numpy())
        items_all.append(test_frame["item"].to_numpy())
    if item_f is not None:
        items_all.append(item_f.ids)
    users = Vocabulary.from_values(_same_kind(users_all), name="user")
    items = Vocabulary.from_values(_same_kind(items_all), name="item")
    data = encode_interactions(frame, users, items)
    rng = np.random.default_rng(cfg.seed)

    if cfg.split == "given":
        train, test = data, encode_interactions(test_frame, users, items)
    elif cfg.split == "random":
        held = random_holdout(data.users, cfg.test_fraction, rng, cfg.min_train_items)
        train, test = data.take(~held), data.take(held)
    else:
        held = last_n_holdout(data.users, data.timestamps, cfg.leave_last, cfg.min_train_items)
        train, test = data.take(~held), data.take(held)

    if cfg.split == "temporal":
        vmask = last_n_holdout(train.users, train.timestamps, cfg.valid_leave_last, cfg.min_train_items)
    else:
        vmask = random_holdout(train.users, cfg.valid_fraction, np.random.default_rng([cfg.seed, 1]), cfg.min_train_items)
    valid, train = train.take(vmask), train.take(~vmask)

    item_feats = user_feats = None
    if item_f is not None and item_f.names:
        item_feats = EncodedFeatures.encode(item_f.ids, item_f.categorical, items, item_f.dense, item_f.specs,
                                            np.bincount(train.items, minlength=len(items)) > 0)
    if user_f is not None and user_f.names:
        user_feats = EncodedFeatures.encode(user_f.ids, user_f.categorical, users, user_f.dense, user_f.specs,
                                            np.bincount(train.users, minlength=len(users)) > 0)
    titles = None
    if item_f is not None and item_f.titles is not None:
        titles = np.full(len(items), None, dtype=object)
        idx = items.encode(item_f.ids)
        titles[idx[idx >= 0]] = item_f.titles[idx >= 0]
    return Dataset(name, users, items, train, valid, test, item_feats, user_feats, titles, list(context))


def load_impressions(path: str | Path, ds: Dataset, user_col: str = "user", item_col: str = "item",
                     data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Shown-but-not-engaged items (an impressions file with raw ``user`` and ``item`` columns, CSV,
    TSV or Parquet) as a CSR ``(indptr [n_users + 1], indices)`` over ``ds``'s user and item indices.

    Rows naming a user or item the dataset does not know are dropped (they can be neither a row nor
    a candidate); a file where none is known is an error, since it most likely belongs to other data.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    p = resolve(str(path), data_dir)
    frame = read_interactions(p, user_col, item_col).frame
    u = ds.users.encode(frame["user"].to_numpy())
    i = ds.items.encode(frame["item"].to_numpy())
    ok = (u >= 0) & (i >= 0)
    if len(frame) and not ok.any():
        raise DataError(str(p), f"none of the {len(frame):,} impressions names a user and an item of the training data",
                        "check that the file's ids are the dataset's raw ids (and user_col / item_col)")
    pairs = np.unique(u[ok] * ds.n_items + i[ok])
    users, items = pairs // ds.n_items, pairs % ds.n_items
    indptr = np.zeros(ds.n_users + 1, dtype=np.int64)
    np.add.at(indptr, users + 1, 1)
    return np.cumsum(indptr), items.astype(np.int64)


def _same_kind(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate id arrays; if one of them holds strings, all become strings (so '7' == 7)."""
    if all(np.asarray(a).dtype.kind in "iu" for a in arrays):
        return np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays])
    return np.concatenate([np.asarray(a).astype(str).astype(object) for a in arrays])
