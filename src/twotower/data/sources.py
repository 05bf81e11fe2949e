"""From a ``DataConfig`` to an encoded ``Dataset``: read, clean, split, encode.

Named datasets are folders under the data directory (``TWOTOWER_DATA``), each read exactly as its
publisher ships it. Generic interaction files are mapped by column names.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..config import DataConfig
from ..errors import ConfigError, DataError
from .dataset import Dataset, EncodedFeatures, encode_interactions
from .paths import default_data_dir
from .readers import Features, read_features, read_interactions, read_lightgcn, read_movielens_100k
from .readers.files import read_limits
from .splits import last_n_holdout, random_holdout
from .vocab import Vocabulary

NAMED_FOLDERS = {"ml-100k": "ml-100k", "gowalla": "gowalla", "lightgcn": "gowalla", "grocery": "grocery"}


def resolve(path: str, data_dir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else data_dir / p


def load_dataset(cfg: DataConfig, data_dir: str | Path | None = None) -> Dataset:
    """Read the configured data and build the splits (seeded, deterministic); compressed inputs may
    expand only within ``data.max_decompressed_mb`` and ``data.max_compression_ratio``."""
    with read_limits(cfg.max_decompressed_mb, cfg.max_compression_ratio):
        ds = _load_dataset(cfg, data_dir)
    check_holdouts(ds.name, cfg, ds.train, ds.valid, ds.test)
    return ds


def _load_dataset(cfg: DataConfig, data_dir: str | Path | None = None) -> Dataset:
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
    elif name == "ml-100k":
        inter, item_f, user_f = read_movielens_100k(_folder(cfg, data_dir))
        frame = inter.frame
    elif name == "grocery":
        folder = _folder(cfg, data_dir)
        frame = read_interactions(folder / "train.csv", user_col="user_id", item_col="item_id", time_col="time").frame
        # item_meta.csv covers the whole catalog, including items seen only in the publisher's
        # held-out parts: keep the rows of items that occur here.
        meta = read_features(folder / "item_meta.csv", id_col="item_id", columns=["i_category"])
        item_f = _restrict(meta, frame["item"].to_numpy())
    elif name == "synthetic":
        from .synthetic import make_synthetic
        syn = make_synthetic(n_users=cfg.synthetic_users, n_items=cfg.synthetic_items, seed=cfg.seed)
        frame, item_f = syn.interactions.frame, syn.item_features
    else:
        if not cfg.interactions:
            raise ConfigError("data.interactions: set the interactions file (CSV, TSV or Parquet), or a named data.dataset")
        frame = read_interactions(resolve(cfg.interactions, data_dir), cfg.user_col, cfg.item_col, cfg.time_col, cfg.weight_col).frame
        if cfg.test_interactions:
            test_frame = read_interactions(resolve(cfg.test_interactions, data_dir), cfg.user_col, cfg.item_col,
                                           cfg.time_col, cfg.weight_col).frame
        known = np.unique(np.concatenate([frame["item"].to_numpy()] + ([test_frame["item"].to_numpy()] if test_frame is not None else [])))
        if cfg.item_features:
            item_f = read_features(resolve(cfg.item_features, data_dir), cfg.item_id_col, cfg.item_feature_cols,
                                   cfg.item_multi_valued, cfg.item_title_col, known_ids=known, kind="item")
        if cfg.user_features:
            known_u = np.unique(np.concatenate([frame["user"].to_numpy()] + ([test_frame["user"].to_numpy()] if test_frame is not None else [])))
            user_f = read_features(resolve(cfg.user_features, data_dir), cfg.user_id_col, cfg.user_feature_cols,
                                   cfg.user_multi_valued, known_ids=known_u, kind="user")
    if cfg.split == "given" and test_frame is None:
        raise ConfigError("data.split = \"given\" needs data.test_interactions (or a dataset that ships a test file)")
    if cfg.split == "temporal" and "timestamp" not in frame:
        raise ConfigError("data.split = \"temporal\" needs timestamps: set data.time_col, or use split = \"random\"")
    return build_dataset(name, frame, test_frame, item_f, user_f, cfg)


def _folder(cfg: DataConfig, data_dir: Path) -> Path:
    folder = resolve(cfg.path or NAMED_FOLDERS[cfg.dataset], data_dir)
    if not folder.is_dir():
        raise DataError(folder, f"the {cfg.dataset} folder does not exist",
                        f"put the dataset under the data directory ({data_dir}; set TWOTOWER_DATA) or set data.path")
    return folder


def _restrict(f: Features, ids: np.ndarray) -> Features:
    keep = pd.Index(np.unique(ids)).get_indexer(f.ids) >= 0
    return Features(f.ids[keep], {k: [v for v, ok in zip(vals, keep) if ok] for k, vals in f.categorical.items()},
                    None if f.titles is None else f.titles[keep], f.source)


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
                  user_f: Features | None, cfg: DataConfig) -> Dataset:
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

    item_feats = EncodedFeatures.encode(item_f.ids, item_f.categorical, items) if item_f is not None and item_f.categorical else None
    user_feats = EncodedFeatures.encode(user_f.ids, user_f.categorical, users) if user_f is not None and user_f.categorical else None
    titles = None
    if item_f is not None and item_f.titles is not None:
        titles = np.full(len(items), None, dtype=object)
        idx = items.encode(item_f.ids)
        titles[idx[idx >= 0]] = item_f.titles[idx >= 0]
    return Dataset(name, users, items, train, valid, test, item_feats, user_feats, titles)


def check_holdouts(name: str, cfg: DataConfig, train, valid, test) -> None:
    """A split that was asked for must hold something: training that exits 0 with no test figure,
    or with validation silently skipped, is a run without meaning. (No validation at all is a
    choice: data.valid_fraction = 0, or data.valid_leave_last = 0 with split = "temporal".)"""
    counts = np.bincount(np.r_[train.users, valid.users, test.users]) if len(train) else np.zeros(1, np.int64)
    most = int(counts.max()) if counts.size else 0
    how = {"random": f"data.test_fraction = {cfg.test_fraction}", "temporal": f"data.leave_last = {cfg.leave_last}",
           "given": "the test file"}[cfg.split]
    if not len(test):
        fix = ("Check the test file and data.min_weight" if cfg.split == "given" else
               f"Users have at most {most} interactions and keep data.min_train_items = {cfg.min_train_items} for "
               "training: raise data.test_fraction or lower data.min_train_items")
        raise DataError(name, f"the split holds out no test interaction ({how})", fix, where="data.split")
    asked = cfg.valid_leave_last if cfg.split == "temporal" else cfg.valid_fraction
    if asked and not len(valid):
        key = "data.valid_leave_last" if cfg.split == "temporal" else "data.valid_fraction"
        raise DataError(name, f"{key} = {asked} carves no validation interaction (users keep at most "
                              f"{most} interactions, data.min_train_items = {cfg.min_train_items} of them for training)",
                        f"Raise {key} or lower data.min_train_items; or set {key} = 0 to train without validation "
                        "(no early stopping: the last epoch's weights are kept)", where="data.split")


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
