"""Feature encoders: one module per feature of a tower, chosen by the feature's declared kind, owning
its fitted state (docs/features.md).

An encoder turns the values of one feature into a vector of the tower's width. Besides its weights
it holds what was fitted on the training rows (a vocabulary, a mean and standard deviation, bucket
edges, hashing seeds) and, for item and user features, the values of every entity the run knows (the
per-entity table); it saves and restores both through one API: ``encoder.fitted()`` gives a
``FittedFeature`` (a JSON-ready part and tensors), the kind's class rebuilds the encoder from one.
Nothing outside the model knows how a feature is stored.

Every kind has the same ways in:

- ``fit(name, column, fit_rows, spec)``: the fitted state from a column of the data (``EncodedFeatures``'
  per-entity column, or a split's context values), fitted on the rows ``fit_rows`` alone;
- ``rows(column)``: a whole column encoded at once, vectorised, into the kind's tensor table (the
  per-entity table; a split's context);
- ``take(table, rows, all_known)`` / ``lookup(rows, all_known)``: the encoder's input for some rows
  of a table / of the stored per-entity table; a row ``-1`` (not in the vocabulary) is missing;
- ``encode(raw)``: values given at request time, one per entity, checked (a value the kind cannot
  take raises ``FeatureInputError``); categorical values outside the vocabulary are reported and go
  to the out-of-vocabulary bucket.

``forward`` takes what those return (plain tensors: a ``Bag`` of codes, or a float tensor) and gives
``[B, dim]``; the raw-value -> tensor encoding stays in Python. Missing values are explicit in every
kind: a code of their own (categorical, text, numeric buckets) or NaN in the input tensor that the
forward replaces by a learned vector (numeric, vector). ``FeatureSet`` is a tower's features, summed.
A new kind is a class with these methods, registered in ``KINDS``.

For ``twotower export`` (``export/towers.py``) a kind also says what its ``forward`` input is made of
as plain tensors: ``export_inputs()`` lists them (``TensorSpec``: name, dtype, shape, meaning), in the
order of the fields of the input (a dataclass of tensors such as ``Bag``, or a single tensor), and
``example_input(n)`` gives an input for ``n`` entities to trace ``forward`` with. The exported
tower then runs the encoder's own ``forward`` on those tensors.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..config import FeatureSpec
from ..data.dataset import CSR, EncodedFeatures
from ..data.vocab import Vocabulary
from ..errors import FeatureInputError

ABSENT = object()  # a feature not given at all (a context feature then takes its default)
CLIP = 5.0  # standardised numbers are clipped to +-CLIP: one extreme value must not dominate a vector


@dataclass
class FittedFeature:
    """What a feature encoder took from the data, apart from its learned weights: ``meta`` is
    JSON-ready (the declaration, a vocabulary, statistics), ``arrays`` the per-entity table as tensors."""

    name: str
    kind: str
    meta: dict
    arrays: dict[str, torch.Tensor]


@dataclass
class FeatureState:
    """The fitted state of the towers' features, as saved with a run: ``meta`` (JSON-ready:
    ``{"item": [...], "user": [...], "context": [...]}``, one entry per feature in tower order) and
    ``arrays`` (tensors, keyed ``"item.K.NAME"`` for the tower's K-th feature)."""

    meta: dict
    arrays: dict[str, torch.Tensor]

    @classmethod
    def of(cls, towers: Mapping[str, Sequence[FittedFeature]]) -> "FeatureState":
        meta, arrays = {}, {}
        for tower, feats in towers.items():
            meta[tower] = [{"name": f.name, "kind": f.kind, **f.meta} for f in feats]
            for k, f in enumerate(feats):
                arrays.update({f"{tower}.{k}.{key}": t for key, t in f.arrays.items()})
        return cls(meta, arrays)

    def tower(self, tower: str) -> list[FittedFeature]:
        """The fitted features of ``tower`` (``"item"``, ``"user"`` or ``"context"``), in order."""
        out = []
        for k, entry in enumerate(self.meta.get(tower, [])):
            meta = {key: v for key, v in entry.items() if key not in ("name", "kind")}
            prefix = f"{tower}.{k}."
            arrays = {key[len(prefix):]: t for key, t in self.arrays.items() if key.startswith(prefix)}
            out.append(FittedFeature(entry["name"], entry["kind"], meta, arrays))
        return out


@dataclass(frozen=True)
class TensorSpec:
    """One plain tensor of an exported tower's input (``twotower export``): ``dtype`` a NumPy name,
    ``shape`` one entry per dimension, an int (fixed) or a name (varies with the request: ``"batch"``
    is the number of entities; another name is a length of its own, such as a number of codes)."""

    name: str
    dtype: str
    shape: tuple
    meaning: str


@dataclass
class Bag:
    """Codes of ``B`` rows in ``EmbeddingBag`` layout: ``codes`` concatenated, ``offsets[b]`` where
    row ``b``'s codes start (every row has at least one: a missing value is a code of its own)."""

    codes: torch.Tensor
    offsets: torch.Tensor

    def to(self, device) -> "Bag":
        return Bag(self.codes.to(device), self.offsets.to(device))


def bag_specs(codes_meaning: str) -> list[TensorSpec]:
    """A ``Bag``'s two tensors as an exported tower takes them (``export_inputs`` of the bag kinds)."""
    return [TensorSpec("codes", "int64", ("n_codes",), codes_meaning),
            TensorSpec("offsets", "int64", ("batch",),
                       "where each entity's codes start in codes: non-decreasing, first 0; every entity has at least one "
                       "code (a missing value is the missing code); the mean of an entity's codes' embeddings is used")]


def gather_rows(indptr: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries of CSR ``rows`` concatenated, and the offset where each row starts (EmbeddingBag input)."""
    starts = indptr[rows]
    lens = indptr[rows + 1] - starts
    offsets = torch.cumsum(lens, 0) - lens
    flat = torch.repeat_interleave(starts - offsets, lens) + torch.arange(int(lens.sum()), device=rows.device)
    return indices[flat], offsets


def take_bag(indptr: torch.Tensor, codes: torch.Tensor, rows: torch.Tensor, all_known: bool, missing: int) -> Bag:
    """The bags of CSR rows ``rows``; a row ``-1`` (unless ``all_known``) gets the one code ``missing``."""
    if all_known:
        return Bag(*gather_rows(indptr, codes, rows))
    known = rows >= 0
    r = rows.clamp_min(0)
    starts = indptr[r]
    lens = torch.where(known, indptr[r + 1] - starts, torch.ones_like(starts))
    offsets = torch.cumsum(lens, 0) - lens
    flat = torch.repeat_interleave(starts - offsets, lens) + torch.arange(int(lens.sum()), device=rows.device)
    out = codes[flat.clamp_max(max(len(codes) - 1, 0))] if len(codes) else torch.full_like(flat, missing)
    out[offsets[~known]] = missing
    return Bag(out, offsets)


def bags_with_missing(indptr: np.ndarray, codes: np.ndarray, missing: int) -> tuple[np.ndarray, np.ndarray]:
    """A CSR whose empty rows get the single code ``missing`` (so that every row's bag has a code)."""
    lens = np.diff(indptr)
    empty = lens == 0
    new_lens = np.where(empty, 1, lens)
    new_indptr = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(new_lens, out=new_indptr[1:])
    out = np.full(int(new_indptr[-1]), missing, dtype=np.int64)
    pos = np.repeat(new_indptr[:-1], lens) + (np.arange(len(codes)) - np.repeat(indptr[:-1], lens))
    out[pos] = codes
    return new_indptr, out


def repeat_rows(x, n: int):
    """An input of one row (a ``Bag`` or a tensor) repeated for ``n`` rows."""
    if isinstance(x, Bag):
        k = len(x.codes)
        return Bag(x.codes.repeat(n), torch.arange(n, device=x.codes.device) * k)
    return x.expand(n, *x.shape[1:]).contiguous()


def stable_hash(strings: np.ndarray, seed: int, buckets: int) -> np.ndarray:
    """``blake2b(s, salt=seed) mod buckets`` of each string: the same in every process and on every
    machine (Python's ``hash`` is salted per process), so a run's hashed codes are reproducible."""
    salt = int(seed).to_bytes(16, "little")
    out = np.fromiter((int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8, salt=salt).digest(), "little")
                       % buckets for s in strings), dtype=np.int64, count=len(strings))
    return out


def labels_column(labels: np.ndarray) -> tuple[Vocabulary, CSR]:
    """One label (or ``None``: missing) per row as the categorical column form: the distinct labels
    (sorted, as strings) and a CSR row -> label index."""
    series = pd.Series(labels, dtype=object)
    present = series.notna().to_numpy()
    codes, uniques = pd.factorize(series[present].astype(str), sort=True)
    indptr = np.zeros(len(series) + 1, dtype=np.int64)
    np.cumsum(present, out=indptr[1:])
    return Vocabulary(np.asarray(uniques, dtype=object), name="values"), CSR(indptr, np.asarray(codes, dtype=np.int64))


def lists_column(lists: Sequence[Sequence[str]]) -> tuple[Vocabulary, CSR]:
    """Per row a list of labels as the categorical column form."""
    lens = np.fromiter((len(v) for v in lists), dtype=np.int64, count=len(lists))
    flat = np.asarray([x for v in lists for x in v], dtype=object)
    uniques, inverse = (np.unique(flat.astype(str), return_inverse=True) if len(flat)
                        else (np.array([], dtype=str), np.array([], dtype=np.int64)))
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lens, out=indptr[1:])
    return Vocabulary(uniques.astype(object), name="values"), CSR(indptr, inverse.astype(np.int64).reshape(-1))


def _coder(cls, fitted: FittedFeature):
    """An encoder of width 1 built only to encode a column while fitting; in a forked RNG, so that
    fitting consumes no random numbers (the model's initialisation stays what it was)."""
    with torch.random.fork_rng(devices=[]):
        return cls(fitted, 1, 1.0)


def _category_label(v) -> str:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v).strip()


class _Encoder(nn.Module):
    """What every kind shares: the name, the declaration, the per-entity table (buffers, not weights:
    data saved with the fitted state, never in the state dict)."""

    kind = ""
    table_keys: tuple[str, ...] = ()

    def __init__(self, fitted: FittedFeature):
        super().__init__()
        self.name = fitted.name
        self.kind = fitted.kind
        self.meta = dict(fitted.meta)
        self.spec = FeatureSpec(**self.meta["spec"]) if "spec" in self.meta else FeatureSpec(name=fitted.name, kind=fitted.kind)
        self.has_table = all(k in fitted.arrays for k in self.table_keys)
        for key in self.table_keys:
            t = fitted.arrays.get(key)
            self.register_buffer(key, None if t is None else t.clone(), persistent=False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def fitted(self) -> FittedFeature:
        arrays = {k: getattr(self, k).cpu() for k in self.table_keys} if self.has_table else {}
        return FittedFeature(self.name, self.kind, dict(self.meta), arrays)

    def stored(self) -> dict[str, torch.Tensor]:
        if not self.has_table:
            raise ValueError(f"feature {self.name!r} has no per-entity table (a context feature comes with each request)")
        return {k: getattr(self, k) for k in self.table_keys}

    def lookup(self, rows: torch.Tensor, all_known: bool = True):
        """The stored values of entities ``rows`` (``-1``: missing, unless ``all_known``)."""
        return self.take(self.stored(), rows, all_known)

    def encode(self, raw: Sequence[Any], absent_default: bool = False) -> tuple[Any, list[list]]:
        """The input for raw request values, one per entity (``ABSENT``: not given: missing, or the
        default with ``absent_default``); returns it and, per entity, the values not placed."""
        column, unknown = self.column_of(raw, absent_default)
        table = self.rows(column)
        return self.take(table, torch.arange(len(raw), device=self.device), True), unknown

    def extended(self, raw: Sequence[Any]) -> tuple[FittedFeature, list[list]]:
        """The fitted state with a row per new entity appended to the per-entity table (values as
        ``encode`` takes them; the vocabulary and statistics stay the training data's), and per new
        entity the values not placed: how entities join a trained run without retraining."""
        column, unknown = self.column_of(raw)
        new, old = self.rows(column), self.stored()
        if "indptr" in new:  # a bag per row: the new rows' offsets continue the table's
            arrays = {"indptr": torch.cat([old["indptr"].cpu(), old["indptr"][-1].cpu() + new["indptr"][1:].cpu()]),
                      "codes": torch.cat([old["codes"].cpu(), new["codes"].cpu()])}
        else:
            arrays = {k: torch.cat([old[k].cpu(), new[k].cpu()]) for k in old}
        return FittedFeature(self.name, self.kind, dict(self.meta), arrays), unknown

    def from_text(self, text: str):
        """A value written on a command line (``--features name=VALUE``) as the kind takes it."""
        return text

    def example_input(self, n: int):
        """A valid input of ``n`` rows for ``forward`` (an exporter's example): the first stored
        entity's values repeated, or a context feature's default."""
        if self.has_table:
            return self.lookup(torch.zeros(n, dtype=torch.int64, device=self.device))
        return self.encode([ABSENT] * n, absent_default=True)[0]

    def _missing_or_refuse(self, row: int, what: str = "missing") -> None:
        if self.spec.missing == "error":
            raise FeatureInputError(self.name, f"the value is {what} and this feature refuses missing values "
                                               "(missing = \"error\")", f"send a {self.spec.kind} value", row)

    def _wrong(self, row: int, value, expected: str) -> FeatureInputError:
        shown = repr(value)
        return FeatureInputError(self.name, f"{self.spec.kind} feature got {type(value).__name__} {shown[:60]}",
                                 f"send {expected}", row)


class CategoricalFeature(_Encoder):
    """A categorical feature, one value per entity (``categorical``) or several
    (``multi_categorical``, mean-pooled): the mean of its values' embeddings.

    Fitted state: the vocabulary of values seen on the training rows at least ``min_count`` times
    (code ``i`` is ``values[i]``; then one out-of-vocabulary code and one missing code), or with
    ``hash_buckets`` a seeded hash of the value into that many buckets (then the missing code); the
    most common training value (a context feature's default); each known entity's codes. The
    out-of-vocabulary and missing embeddings start at zero: until training sees them they add nothing."""

    kind = "categorical"
    table_keys = ("indptr", "codes")

    def __init__(self, fitted: FittedFeature, dim: int, init_std: float, sparse: bool = False):
        super().__init__(fitted)
        m = self.meta
        self.hashed = m.get("hash_buckets") is not None
        self.values = None if self.hashed else list(m["values"])
        if self.hashed:
            self.n_codes = int(m["hash_buckets"]) + 1
            self.oov = None
        else:
            self.oov = len(self.values)
            self.n_codes = len(self.values) + 2
            self._index = pd.Index(np.asarray([str(v) for v in self.values], dtype=object))
        self.missing = self.n_codes - 1
        self.bag = nn.EmbeddingBag(self.n_codes, dim, mode="mean", sparse=sparse)
        nn.init.normal_(self.bag.weight, std=init_std)
        with torch.no_grad():
            self.bag.weight[self.n_codes - (1 if self.hashed else 2):] = 0.0

    @classmethod
    def fit(cls, name: str, column, fit_rows: np.ndarray | None, spec: FeatureSpec, table: bool = True) -> FittedFeature:
        """The vocabulary (or the hashing) from the values of the rows ``fit_rows``, and each row's codes."""
        values, rows = column if isinstance(column, tuple) else labels_column(column)
        owner = np.repeat(np.arange(rows.n_rows), rows.lengths())
        sel = np.ones(len(owner), dtype=bool) if fit_rows is None else np.asarray(fit_rows)[owner]
        counts = np.bincount(rows.indices[sel], minlength=len(values))
        labels = np.asarray([str(v) for v in values.ids], dtype=object)
        meta: dict = {"spec": spec.model_dump(mode="json", exclude_unset=True)}
        if spec.hash_buckets is not None:
            meta.update({"hash_buckets": int(spec.hash_buckets), "seed": int(spec.seed)})
        else:
            meta["values"] = labels[counts >= spec.min_count].tolist()
        meta["default"] = str(labels[int(np.argmax(counts))]) if counts.sum() else None
        fitted = FittedFeature(name, spec.kind, meta, {})
        if table:
            fitted.arrays = {k: v.cpu() for k, v in _coder(cls, fitted).rows((values, rows)).items()}
        return fitted

    def codes_of(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes of labels (strings) and which are in the vocabulary (hashed: all)."""
        labels = np.asarray(labels, dtype=object)
        if self.hashed:
            return stable_hash(labels, self.meta["seed"], self.meta["hash_buckets"]), np.ones(len(labels), dtype=bool)
        idx = self._index.get_indexer(labels) if len(labels) else np.zeros(0, dtype=np.int64)
        return np.where(idx >= 0, idx, self.oov).astype(np.int64), idx >= 0

    def rows(self, column) -> dict[str, torch.Tensor]:
        """Each row's codes (``(values, CSR)`` or one label per row, ``None`` missing), empty rows missing."""
        values, rows = column if isinstance(column, tuple) else labels_column(column)
        per_value, _ = self.codes_of(np.asarray([str(v) for v in values.ids], dtype=object))
        indptr, codes = bags_with_missing(np.asarray(rows.indptr, dtype=np.int64), per_value[rows.indices], self.missing)
        return {"indptr": torch.from_numpy(indptr).to(self.device), "codes": torch.from_numpy(codes).to(self.device)}

    def take(self, table: Mapping[str, torch.Tensor], rows: torch.Tensor, all_known: bool = True) -> Bag:
        return take_bag(table["indptr"], table["codes"], rows, all_known, self.missing)

    def column_of(self, raw: Sequence[Any], absent_default: bool = False):
        """Request values to the column form, checked; and per entity the values outside the vocabulary."""
        multi = self.kind == "multi_categorical"
        lists: list[list[str]] = []
        for row, v in enumerate(raw):
            if v is ABSENT and absent_default:
                v = self.meta.get("default")
            elif v is ABSENT:
                v = None
            if v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, (list, tuple)) and not v):
                self._missing_or_refuse(row)
                lists.append([])
                continue
            vals = list(v) if isinstance(v, (list, tuple)) else [v]
            if len(vals) > 1 and not multi:
                raise FeatureInputError(self.name, f"categorical feature got {len(vals)} values", "send one value", row)
            for x in vals:
                if not isinstance(x, (str, int, float, bool, np.integer, np.floating)) or (isinstance(x, float) and np.isnan(x)):
                    raise self._wrong(row, x, "a value as a string (or a number)" + (", or a list of them" if multi else ""))
            lists.append([_category_label(x) for x in vals])
        unknown: list[list] = [[] for _ in lists]
        if not self.hashed:
            flat = np.asarray([x for vals in lists for x in vals], dtype=object)
            known = self.codes_of(flat)[1]
            if not known.all():
                owner = np.repeat(np.arange(len(lists)), [len(v) for v in lists])
                for row, x in zip(owner[~known], flat[~known]):
                    unknown[row].append(x)
        return lists_column(lists), unknown

    def forward(self, x: Bag) -> torch.Tensor:
        return self.bag(x.codes, x.offsets)

    def from_text(self, text: str):
        return [v for v in text.split(self.spec.separator or "|") if v] if self.kind == "multi_categorical" else text

    def export_inputs(self) -> list[TensorSpec]:
        """``Bag``'s two tensors, as an exported tower takes them."""
        return bag_specs(f"codes of the {self.name} values of every entity, concatenated (vocab/features.json: "
                         "code i is values[i] for i < len(values), then the out-of-vocabulary code, then the missing "
                         "code; with hash_buckets, a seeded hash of the value, then the missing code)")

    def entities_with(self, value) -> np.ndarray:
        """Sorted indices of the stored entities whose values include ``value`` (compared as a
        string). Raises ``KeyError`` naming the known values."""
        if self.hashed:
            raise KeyError(f"{self.name} is hashed (hash_buckets): its values are not kept, so it cannot filter")
        code = self._index.get_indexer([str(value)])[0]
        if code < 0:
            vals = self.values
            raise KeyError(f"{self.name} {value!r} is not a known value; known: {vals[:20]}{' ...' if len(vals) > 20 else ''}")
        indptr, codes = self.indptr.cpu().numpy(), self.codes.cpu().numpy()
        owners = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        return np.unique(owners[codes == code]).astype(np.int64)

    def values_of(self, rows: np.ndarray) -> list[list[str]]:
        """The known values of stored entities ``rows`` (out-of-vocabulary and missing ones left out)."""
        if self.hashed:
            return [[] for _ in rows]
        bag = self.lookup(torch.from_numpy(np.asarray(rows, dtype=np.int64).copy()))
        codes, offsets = bag.codes.cpu().numpy(), bag.offsets.cpu().numpy()
        vocab = np.asarray([str(v) for v in self.values] + [None, None], dtype=object)
        return [[v for v in part if v is not None] for part in np.split(vocab[codes], offsets[1:])] if len(rows) else []


class NumericFeature(_Encoder):
    """A number per entity. ``standardize``: ``z = (x - mean) / std`` of the training rows, clipped to
    +-5, embedded as ``z w + b``; ``log1p``: the same on ``log(1 + x)``; ``quantile``: the bucket
    between the training rows' quantiles, an embedding each. A missing (or non-finite) value is its
    own learned vector (``missing``; the missing bucket), zero until training sees one.

    Fitted state: the transform, its statistics (mean and std, or bucket edges), and the default of
    an absent context value (the training rows' mean; the median for buckets)."""

    kind = "numeric"
    table_keys = ("values",)

    def __init__(self, fitted: FittedFeature, dim: int, init_std: float, sparse: bool = False):
        super().__init__(fitted)
        m = self.meta
        self.transform = m["transform"]
        if self.transform == "quantile":
            self.edges = np.asarray(m["edges"], dtype=np.float64)
            self.n_codes = len(self.edges) + 2  # buckets, then missing
            self.embedding = nn.Embedding(self.n_codes, dim, sparse=sparse)
            nn.init.normal_(self.embedding.weight, std=init_std)
            with torch.no_grad():
                self.embedding.weight[-1] = 0.0
        else:
            self.weight = nn.Parameter(torch.randn(dim) * init_std)
            self.bias = nn.Parameter(torch.randn(dim) * init_std)
            self.missing = nn.Parameter(torch.zeros(dim))

    @classmethod
    def fit(cls, name: str, column, fit_rows: np.ndarray | None, spec: FeatureSpec, table: bool = True) -> FittedFeature:
        x = np.asarray(column, dtype=np.float64)
        sel = x if fit_rows is None else x[np.asarray(fit_rows)]
        sel = sel[np.isfinite(sel)]
        meta: dict = {"spec": spec.model_dump(mode="json", exclude_unset=True), "transform": spec.transform}
        if spec.transform == "quantile":
            edges = np.unique(np.quantile(sel, np.linspace(0, 1, spec.buckets + 1)[1:-1])) if len(sel) else np.zeros(0)
            meta["edges"] = edges.tolist()
            meta["default"] = float(np.median(sel)) if len(sel) else 0.0
        else:
            t = np.log1p(sel) if spec.transform == "log1p" else sel
            mean, std = (float(t.mean()), float(t.std())) if len(t) else (0.0, 1.0)
            meta.update({"mean": mean, "std": std if std > 1e-12 else 1.0})
            meta["default"] = float(np.expm1(mean)) if spec.transform == "log1p" else mean
        fitted = FittedFeature(name, spec.kind, meta, {})
        if table:
            fitted.arrays = {k: v.cpu() for k, v in _coder(cls, fitted).rows(x).items()}
        return fitted

    def rows(self, column) -> dict[str, torch.Tensor]:
        """Standardised values (NaN: missing), or bucket codes (the last: missing)."""
        x = np.asarray(column, dtype=np.float64)
        bad = ~np.isfinite(x)
        if self.transform == "quantile":
            codes = np.searchsorted(self.edges, np.where(bad, 0.0, x), side="right")
            codes[bad] = self.n_codes - 1
            return {"values": torch.from_numpy(codes.astype(np.int64)).to(self.device)}
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.log1p(x) if self.transform == "log1p" else x
            z = np.clip((t - self.meta["mean"]) / self.meta["std"], -CLIP, CLIP)
        z[bad | ~np.isfinite(t)] = np.nan
        return {"values": torch.from_numpy(z.astype(np.float32)).to(self.device)}

    def take(self, table: Mapping[str, torch.Tensor], rows: torch.Tensor, all_known: bool = True) -> torch.Tensor:
        v = table["values"][rows.clamp_min(0)]
        if all_known:
            return v
        missing = torch.full_like(v, self.n_codes - 1) if self.transform == "quantile" else torch.full_like(v, float("nan"))
        return torch.where(rows >= 0, v, missing)

    def column_of(self, raw: Sequence[Any], absent_default: bool = False):
        out = np.full(len(raw), np.nan)
        for row, v in enumerate(raw):
            if v is ABSENT:
                if absent_default:
                    out[row] = self.meta["default"]
                    continue
                v = None
            if v is None:
                self._missing_or_refuse(row)
                continue
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise self._wrong(row, v, "a number, e.g. 3.5 (null: missing)")
            if not np.isfinite(v):
                self._missing_or_refuse(row, "not finite (NaN or infinity)")
                continue
            if self.transform == "log1p" and v <= -1:
                raise FeatureInputError(self.name, f"log1p feature got {v!r}", "send a number above -1", row)
            out[row] = float(v)
        return out, [[] for _ in raw]

    def from_text(self, text: str):
        if not text.strip():
            return None
        try:
            return float(text)
        except ValueError:
            raise FeatureInputError(self.name, f"{text!r} is not a number", f"write a number, e.g. {self.name}=31") from None

    def export_inputs(self) -> list[TensorSpec]:
        if self.transform == "quantile":
            return [TensorSpec("values", "int64", ("batch",),
                               f"bucket code of {self.name}: searchsorted(edges, value, side='right') with the edges of "
                               "vocab/features.json; len(edges) + 1 for a missing value")]
        how = "log1p(value)" if self.transform == "log1p" else "value"
        return [TensorSpec("values", "float32", ("batch",),
                           f"{self.name} standardised: ({how} - mean) / std with mean and std of vocab/features.json, "
                           f"clipped to +-{CLIP:g}; NaN for a missing value")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform == "quantile":
            return self.embedding(x)
        miss = torch.isnan(x).unsqueeze(-1)
        z = torch.where(miss, torch.zeros_like(x).unsqueeze(-1), x.unsqueeze(-1))
        return z * self.weight + torch.where(miss, self.missing, self.bias)


class VectorFeature(_Encoder):
    """A precomputed dense vector per entity (from an image or a language model), projected to the
    tower's width by a linear map (learned, or fixed with ``freeze``: a random projection, which
    roughly keeps inner products), plus a learned offset; a missing vector is a learned vector of its
    own. The projection starts with ``std = init_std / rms``, ``rms`` the training vectors' root
    mean square norm, so that a projected vector starts on the scale of an embedding.

    Fitted state: the length, ``rms``; each known entity's vector (NaN: missing)."""

    kind = "vector"
    table_keys = ("vectors",)

    def __init__(self, fitted: FittedFeature, dim: int, init_std: float, sparse: bool = False):
        super().__init__(fitted)
        self.length = int(self.meta["length"])
        self.projection = nn.Linear(self.length, dim, bias=False)
        nn.init.normal_(self.projection.weight, std=init_std / max(float(self.meta["rms"]), 1e-6))
        if self.spec.freeze:
            self.projection.weight.requires_grad_(False)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.missing = nn.Parameter(torch.zeros(dim))

    @classmethod
    def fit(cls, name: str, column, fit_rows: np.ndarray | None, spec: FeatureSpec, table: bool = True) -> FittedFeature:
        x = np.asarray(column, dtype=np.float32)
        sel = x if fit_rows is None else x[np.asarray(fit_rows)]
        sel = sel[np.isfinite(sel).all(1)]
        rms = float(np.sqrt((sel.astype(np.float64) ** 2).sum(1).mean())) if len(sel) else 1.0
        meta = {"spec": spec.model_dump(mode="json", exclude_unset=True), "length": int(x.shape[1]), "rms": rms}
        fitted = FittedFeature(name, spec.kind, meta, {})
        if table:
            fitted.arrays = {"vectors": torch.from_numpy(np.ascontiguousarray(x))}
        return fitted

    def rows(self, column) -> dict[str, torch.Tensor]:
        return {"vectors": torch.from_numpy(np.ascontiguousarray(column, dtype=np.float32)).to(self.device)}

    def take(self, table: Mapping[str, torch.Tensor], rows: torch.Tensor, all_known: bool = True) -> torch.Tensor:
        v = table["vectors"][rows.clamp_min(0)]
        return v if all_known else torch.where((rows >= 0).unsqueeze(-1), v, torch.full_like(v, float("nan")))

    def column_of(self, raw: Sequence[Any], absent_default: bool = False):
        out = np.full((len(raw), self.length), np.nan, dtype=np.float32)
        for row, v in enumerate(raw):
            if v is None or v is ABSENT:
                self._missing_or_refuse(row)
                continue
            if not isinstance(v, (list, tuple, np.ndarray)):
                raise self._wrong(row, v, f"a list of {self.length} numbers")
            if len(v) != self.length:
                raise FeatureInputError(self.name, f"vector of length {len(v)}, expected {self.length}",
                                        f"send a list of {self.length} numbers", row)
            if any(isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)) for x in v):
                raise FeatureInputError(self.name, "the vector holds something that is not a number",
                                        f"send a list of {self.length} numbers", row)
            a = np.asarray(v, dtype=np.float64)
            if not np.isfinite(a).all():
                raise FeatureInputError(self.name, "the vector holds NaN or infinity", "send finite numbers (null: missing)", row)
            out[row] = a
        return out, [[] for _ in raw]

    def from_text(self, text: str):
        try:
            return [float(v) for v in re.split(r"[\s;]+", text.strip().strip("[]")) if v]
        except ValueError:
            raise FeatureInputError(self.name, f"{text[:60]!r} is not a list of numbers",
                                    f"write the {self.length} numbers separated by spaces or ';'") from None

    def export_inputs(self) -> list[TensorSpec]:
        return [TensorSpec("vectors", "float32", ("batch", self.length),
                           f"the {self.name} vector of each entity as given (a row of NaN: missing)")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        miss = torch.isnan(x).any(-1, keepdim=True)
        v = torch.where(miss, torch.zeros_like(x), x)
        return self.projection(v) + torch.where(miss, self.missing, self.bias)


_WORDS = re.compile(r"\w+", re.UNICODE)


def tokens(text: str, word_ngrams: int, char_ngrams: Sequence[int], max_tokens: int, lowercase: bool) -> list[str]:
    """The built-in tokenizer: the words (``\\w+``) of ``text``, its word n-grams of 1 to
    ``word_ngrams`` words and the character n-grams of each word with its boundaries marked
    (``<word>``: fastText's subwords, Bojanowski et al. 2017), each tagged with what it is so that a
    word and a character n-gram never share a hash."""
    words = _WORDS.findall(text.lower() if lowercase else text)[:max_tokens]
    out = []
    for n in range(1, word_ngrams + 1):
        out += [f"w{n}:" + " ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    for w in words:
        marked = f"<{w}>"
        for n in char_ngrams:
            out += [f"c:{marked[i : i + n]}" for i in range(max(len(marked) - n + 1, 0))]
    return out


class TextFeature(_Encoder):
    """Free text with the built-in tokenizer (no download): hashed word n-grams and character
    n-grams (``tokens``) into ``hash_buckets`` buckets (a seeded hash), mean-pooled by an
    ``EmbeddingBag`` (fastText's sentence vector, Joulin et al. 2017). A missing or empty text is
    the missing code (zero until training sees one).

    Fitted state: the tokenizer's settings, the buckets and the seed; each known entity's codes."""

    kind = "text"
    table_keys = ("indptr", "codes")

    def __init__(self, fitted: FittedFeature, dim: int, init_std: float, sparse: bool = False):
        super().__init__(fitted)
        self.buckets = int(self.meta["buckets"])
        self.missing = self.buckets
        self.bag = nn.EmbeddingBag(self.buckets + 1, dim, mode="mean", sparse=sparse)
        nn.init.normal_(self.bag.weight, std=init_std)
        with torch.no_grad():
            self.bag.weight[self.missing] = 0.0

    @classmethod
    def fit(cls, name: str, column, fit_rows: np.ndarray | None, spec: FeatureSpec, table: bool = True) -> FittedFeature:
        meta = {"spec": spec.model_dump(mode="json", exclude_unset=True), "buckets": spec.buckets_for_text, "seed": int(spec.seed)}
        fitted = FittedFeature(name, spec.kind, meta, {})
        if table:
            fitted.arrays = {k: v.cpu() for k, v in _coder(cls, fitted).rows(column).items()}
        return fitted

    def rows(self, column) -> dict[str, torch.Tensor]:
        s = self.spec
        toks = [tokens(t, s.word_ngrams, s.char_ngrams, s.max_tokens, s.lowercase) if isinstance(t, str) else [] for t in column]
        lens = np.fromiter((len(t) for t in toks), dtype=np.int64, count=len(toks))
        flat = np.asarray([x for t in toks for x in t], dtype=object)
        uniques, inverse = np.unique(flat.astype(str), return_inverse=True) if len(flat) else (np.zeros(0, str), np.zeros(0, np.int64))
        codes = stable_hash(uniques.astype(object), self.meta["seed"], self.buckets)[inverse.reshape(-1)]
        indptr = np.zeros(len(toks) + 1, dtype=np.int64)
        np.cumsum(lens, out=indptr[1:])
        indptr, codes = bags_with_missing(indptr, codes.astype(np.int64), self.missing)
        return {"indptr": torch.from_numpy(indptr).to(self.device), "codes": torch.from_numpy(codes).to(self.device)}

    def take(self, table: Mapping[str, torch.Tensor], rows: torch.Tensor, all_known: bool = True) -> Bag:
        return take_bag(table["indptr"], table["codes"], rows, all_known, self.missing)

    def column_of(self, raw: Sequence[Any], absent_default: bool = False):
        out = np.empty(len(raw), dtype=object)
        for row, v in enumerate(raw):
            if v is None or v is ABSENT:
                self._missing_or_refuse(row)
                out[row] = None
            elif not isinstance(v, str):
                raise self._wrong(row, v, "the text as a string")
            else:
                out[row] = v
        return out, [[] for _ in raw]

    def export_inputs(self) -> list[TensorSpec]:
        return bag_specs(f"hashed tokens of the {self.name} text of every entity, concatenated (the built-in tokenizer "
                         "of features/encoders.py, `tokens`, with the settings, buckets and seed of vocab/features.json; "
                         "the missing code = buckets for a missing or empty text)")

    def forward(self, x: Bag) -> torch.Tensor:
        return self.bag(x.codes, x.offsets)


KINDS: dict[str, type] = {"categorical": CategoricalFeature, "multi_categorical": CategoricalFeature,
                          "numeric": NumericFeature, "vector": VectorFeature, "text": TextFeature}


def fit_features(features: EncodedFeatures | None) -> list[FittedFeature]:
    """The fitted state of every feature of a dataset's table (each by its kind's ``fit``, on the
    training entities ``features.fit_rows``)."""
    if features is None:
        return []
    out = []
    for name in features.names:
        spec = features.spec(name)
        out.append(KINDS[spec.kind].fit(name, features.column(name), features.fit_rows, spec))
    return out


def fit_context(specs: Sequence[FeatureSpec], columns: Mapping[str, np.ndarray] | None) -> list[FittedFeature]:
    """The fitted state of context features from the training split's values (no per-entity table:
    a context value comes with each interaction and each request)."""
    if not specs:
        return []
    missing = [s.name for s in specs if columns is None or s.name not in columns]
    if missing:
        raise ValueError(f"context feature(s) {missing} are declared but the dataset has no such column; load the "
                         "dataset with the run's config (load_dataset(run_config))")
    return [KINDS[s.kind].fit(s.name, columns[s.name], None, s, table=False) for s in specs]


class FeatureSet(nn.Module):
    """A tower's features: the sum of their encoders' vectors."""

    def __init__(self, fitted: Sequence[FittedFeature], dim: int, init_std: float, sparse: bool = False):
        super().__init__()
        unknown = [f.kind for f in fitted if f.kind not in KINDS]
        if unknown:
            raise ValueError(f"feature kind(s) {unknown} unknown; known: {sorted(KINDS)}")
        self.encoders = nn.ModuleList([KINDS[f.kind](f, dim, init_std, sparse) for f in fitted])

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.encoders]

    def __getitem__(self, name: str) -> nn.Module:
        for e in self.encoders:
            if e.name == name:
                return e
        raise KeyError(f"feature {name!r} is not in this tower; known: {self.names or 'none'}")

    def fitted(self) -> list[FittedFeature]:
        return [e.fitted() for e in self.encoders]

    def kinds(self) -> dict[str, str]:
        return {e.name: e.kind for e in self.encoders}

    def lookup(self, rows: torch.Tensor, all_known: bool = True) -> dict[str, Any]:
        """Every feature's stored values for entities ``rows`` (see the encoders' ``lookup``)."""
        return {e.name: e.lookup(rows, all_known) for e in self.encoders}

    def tables(self, columns: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
        """Whole columns encoded at once (a split's context values), one table per feature."""
        return {e.name: e.rows(columns[e.name]) for e in self.encoders}

    def take(self, tables: Mapping[str, Mapping[str, torch.Tensor]], rows: torch.Tensor) -> dict[str, Any]:
        """Every feature's input for rows ``rows`` of ``tables`` (``tables``' output)."""
        return {e.name: e.take(tables[e.name], rows, True) for e in self.encoders}

    def defaults(self, n: int) -> dict[str, Any]:
        """The inputs of ``n`` rows that give no value: each feature's default (context features)."""
        one = self.encode([{}], absent_default=True)[0]
        return {k: repeat_rows(v, n) for k, v in one.items()}

    def parse(self, text: str, what: str = "feature") -> dict[str, Any]:
        """``name=value,name=value`` (a command line's ``--features`` / ``--context``) as a mapping of
        values in the form each feature's kind takes (a comma separates pairs only where the next
        pair's ``name=`` follows, so a text may hold commas; ``|`` separates the values of a
        multi-valued feature, spaces the numbers of a vector)."""
        out: dict[str, Any] = {}
        for pair in re.split(r",(?=\s*[^,=\s]+=)", text.strip()):
            if not pair.strip():
                continue
            name, sep, value = pair.partition("=")
            if not sep:
                raise KeyError(f"{pair!r}: write {what}s as name=value,name=value (this tower's {what}s: {self.names or 'none'})")
            out[name.strip()] = value
        self.check_names(out, what)
        return {name: self[name].from_text(value) for name, value in out.items()}

    def check_names(self, raw: Mapping[str, Any] | None, what: str = "feature") -> None:
        extra = sorted(set(raw or {}) - set(self.names))
        if extra:
            raise KeyError(f"unknown {what}(s) {extra}; this tower's {what}s: {self.names or 'none'}")

    def encode(self, raw: Sequence[Mapping[str, Any] | None], absent_default: bool = False
               ) -> tuple[dict[str, Any], list[dict[str, list]]]:
        """Every feature's inputs from raw values, one mapping ``{feature: value(s)}`` (or ``None``)
        per entity. A feature absent from a mapping is missing, or with ``absent_default`` takes its
        default (a context feature: the training rows' most common value, or their mean). Returns
        the inputs and, per entity, ``{feature: [values not placed]}``. A name that is no feature of
        the tower raises ``KeyError``; a value its encoder cannot take, ``FeatureInputError``."""
        for r in raw:
            self.check_names(r)
        out, unknown = {}, [{} for _ in raw]
        for e in self.encoders:
            out[e.name], bad = e.encode([(r or {}).get(e.name, ABSENT) for r in raw], absent_default)
            for row, b in zip(unknown, bad):
                if b:
                    row[e.name] = b
        return out, unknown

    def extended(self, raw: Sequence[Mapping[str, Any] | None]) -> tuple[list[FittedFeature], list[dict[str, list]]]:
        """Every feature's fitted state with the new entities ``raw`` (one mapping per entity, as for
        ``encode``) appended to its per-entity table, and per entity ``{feature: [values not placed]}``."""
        for r in raw:
            self.check_names(r)
        fitted, unknown = [], [{} for _ in raw]
        for e in self.encoders:
            f, bad = e.extended([(r or {}).get(e.name, ABSENT) for r in raw])
            fitted.append(f)
            for row, b in zip(unknown, bad):
                if b:
                    row[e.name] = b
        return fitted, unknown

    def categories(self) -> dict[str, list]:
        """The values of each feature that has a vocabulary (what a category filter can name)."""
        return {e.name: list(e.values) for e in self.encoders if isinstance(e, CategoricalFeature) and not e.hashed}

    def forward(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        out = 0
        for e in self.encoders:
            out = out + e(inputs[e.name])
        return out
