"""Feature encoders: one module per feature of a tower, owning its fitted state.

An encoder turns the values of one feature into a vector of the tower's width. Besides its weights
it holds what was fitted on the training data (a categorical feature: its vocabulary of values) and
the values of every entity the run knows (the per-entity table), and it saves and restores both
through one API: ``encoder.fitted()`` gives a ``FittedFeature`` (a JSON-ready part and tensors), the
kind's class rebuilds the encoder from one. Nothing outside the model knows how a feature is stored.

Three ways in, the same for every kind:

- ``fit(name, column)``: the fitted state from the dataset's column (``data.dataset.EncodedFeatures``);
- ``lookup(rows, all_known)``: the stored values of entities of the vocabulary (training,
  evaluation, a known user); rows ``-1`` (not in the vocabulary) get none;
- ``encode(raw)``: values given at request time, one entry per entity (a new user's features);
  values the encoder cannot place are reported, and contribute nothing.

``forward`` takes what ``lookup`` or ``encode`` returned and gives ``[B, dim]``. ``FeatureSet`` is a
tower's features, summed. A new kind is a class with these methods, registered in ``KINDS``.

For ``twotower export`` (``export/towers.py``) a kind also says what its ``forward`` input is made of
as plain tensors: ``export_inputs()`` lists them (``TensorSpec``: name, dtype, shape, meaning), in the
order of the fields of the input (a dataclass of tensors such as ``Bag``, or a single tensor), and
``example_input(n)`` gives an input for ``n`` entities to trace ``forward`` with. The exported
tower then runs the encoder's own ``forward`` on those tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..data.dataset import EncodedFeatures


@dataclass
class FittedFeature:
    """What a feature encoder took from the data, apart from its learned weights: ``meta`` is
    JSON-ready (a categorical feature's values), ``arrays`` the per-entity table as tensors."""

    name: str
    kind: str
    meta: dict
    arrays: dict[str, torch.Tensor]


@dataclass
class FeatureState:
    """The fitted state of both towers' features, as saved with a run: ``meta`` (JSON-ready:
    ``{"item": [...], "user": [...]}``, one entry per feature in tower order) and ``arrays``
    (tensors, keyed ``"item.K.NAME"`` for the tower's K-th feature)."""

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
        """The fitted features of ``tower`` (``"item"`` or ``"user"``), in order."""
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
    """Values of a categorical feature for ``B`` entities in ``EmbeddingBag`` layout: ``codes``
    concatenated, ``offsets[b]`` where entity ``b``'s codes start."""

    codes: torch.Tensor
    offsets: torch.Tensor

    def to(self, device) -> "Bag":
        return Bag(self.codes.to(device), self.offsets.to(device))


def gather_rows(indptr: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries of CSR ``rows`` concatenated, and the offset where each row starts (EmbeddingBag input)."""
    starts = indptr[rows]
    lens = indptr[rows + 1] - starts
    offsets = torch.cumsum(lens, 0) - lens
    flat = torch.repeat_interleave(starts - offsets, lens) + torch.arange(int(lens.sum()), device=rows.device)
    return indices[flat], offsets


class CategoricalFeature(nn.Module):
    """A categorical feature, one or several values per entity: the mean of its values'
    embeddings (a multi-valued feature such as genres is mean-pooled; no value contributes zero).

    Fitted state: the value vocabulary (code ``i`` is ``values[i]``) and each known entity's codes."""

    kind = "categorical"

    def __init__(self, fitted: FittedFeature, dim: int, init_std: float, sparse: bool = False):
        super().__init__()
        self.name = fitted.name
        self.values = list(fitted.meta["values"])
        self._code = {str(v): i for i, v in enumerate(self.values)}
        self.bag = nn.EmbeddingBag(max(len(self.values), 1), dim, mode="mean", sparse=sparse)
        nn.init.normal_(self.bag.weight, std=init_std)
        # Not in the state dict: data, not weights (saved with the fitted state, FeatureState).
        self.register_buffer("indptr", fitted.arrays["indptr"].to(torch.int64), persistent=False)
        self.register_buffer("codes", fitted.arrays["codes"].to(torch.int64), persistent=False)

    @staticmethod
    def fit(name: str, features: EncodedFeatures) -> FittedFeature:
        """The vocabulary of the feature's values and each entity's codes (``EncodedFeatures``
        encodes them against the training data's entities)."""
        csr = features.rows[name]
        return FittedFeature(name, CategoricalFeature.kind, {"values": features.values[name].ids.tolist()},
                             {"indptr": torch.from_numpy(np.array(csr.indptr, dtype=np.int64)),
                              "codes": torch.from_numpy(np.array(csr.indices, dtype=np.int64))})

    def fitted(self) -> FittedFeature:
        return FittedFeature(self.name, self.kind, {"values": list(self.values)},
                             {"indptr": self.indptr.cpu(), "codes": self.codes.cpu()})

    def lookup(self, rows: torch.Tensor, all_known: bool = True) -> Bag:
        """The stored codes of entities ``rows`` (``-1``: none, unless ``all_known``)."""
        if all_known:
            return Bag(*gather_rows(self.indptr, self.codes, rows))
        known = rows >= 0
        r = rows.clamp_min(0)
        starts = self.indptr[r]
        lens = torch.where(known, self.indptr[r + 1] - starts, torch.zeros_like(starts))
        offsets = torch.cumsum(lens, 0) - lens
        flat = torch.repeat_interleave(starts - offsets, lens) + torch.arange(int(lens.sum()), device=rows.device)
        return Bag(self.codes[flat], offsets)

    def encode(self, raw: Sequence[Any]) -> tuple[Bag, list[list]]:
        """Codes of raw values, one entry per entity (``None``, a value or a list of values; compared
        as strings); returns the bag and, per entity, the values not in the vocabulary."""
        codes, lens, unknown = [], [], []
        for v in raw:
            vals = [] if v is None else (list(v) if isinstance(v, (list, tuple)) else [v])
            ok = [self._code[str(x)] for x in vals if str(x) in self._code]
            codes.extend(ok)
            lens.append(len(ok))
            unknown.append([x for x in vals if str(x) not in self._code])
        lens_a = np.asarray(lens, dtype=np.int64)
        dev = self.indptr.device
        return Bag(torch.tensor(codes, dtype=torch.int64, device=dev),
                   torch.from_numpy(np.cumsum(lens_a) - lens_a).to(dev)), unknown

    def forward(self, x: Bag) -> torch.Tensor:
        return self.bag(x.codes, x.offsets)

    def export_inputs(self) -> list[TensorSpec]:
        """``Bag``'s two tensors, as an exported tower takes them."""
        return [TensorSpec("codes", "int64", ("n_codes",),
                           f"codes of the {self.name} values of every entity, concatenated (code i is value i of the "
                           "feature's vocabulary; an unknown value is left out)"),
                TensorSpec("offsets", "int64", ("batch",),
                           "where each entity's codes start in codes: non-decreasing, first 0; the mean of an "
                           "entity's codes' embeddings is used, zero when it has none")]

    def example_input(self, n: int) -> Bag:
        """One code per entity (any ``n`` entities: only the shapes matter for tracing)."""
        dev = self.indptr.device
        codes = torch.arange(n, dtype=torch.int64, device=dev) % max(len(self.values), 1)
        return Bag(codes, torch.arange(n, dtype=torch.int64, device=dev))

    def entities_with(self, value) -> np.ndarray:
        """Sorted indices of the stored entities whose values include ``value`` (compared as a
        string). Raises ``KeyError`` naming the known values."""
        code = self._code.get(str(value))
        if code is None:
            vals = self.values
            raise KeyError(f"{self.name} {value!r} is not a known value; known: {vals[:20]}{' ...' if len(vals) > 20 else ''}")
        indptr, codes = self.indptr.cpu().numpy(), self.codes.cpu().numpy()
        owners = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        return np.unique(owners[codes == code]).astype(np.int64)


KINDS: dict[str, type] = {CategoricalFeature.kind: CategoricalFeature}


def fit_features(features: EncodedFeatures | None) -> list[FittedFeature]:
    """The fitted state of every feature of a dataset's table (each by its kind's ``fit``)."""
    if features is None:
        return []
    return [CategoricalFeature.fit(name, features) for name in features.names]


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

    def lookup(self, rows: torch.Tensor, all_known: bool = True) -> dict[str, Any]:
        """Every feature's stored values for entities ``rows`` (see the encoders' ``lookup``)."""
        return {e.name: e.lookup(rows, all_known) for e in self.encoders}

    def encode(self, raw: Sequence[Mapping[str, Any] | None]) -> tuple[dict[str, Any], list[dict[str, list]]]:
        """Every feature's inputs from raw values, one mapping ``{feature: value(s)}`` (or ``None``)
        per entity; a feature absent from a mapping is missing. Returns the inputs and, per entity,
        ``{feature: [values not placed]}``. A name that is no feature of the tower raises ``KeyError``."""
        names = set(self.names)
        for r in raw:
            extra = sorted(set(r or {}) - names)
            if extra:
                raise KeyError(f"unknown feature(s) {extra}; this tower's features: {self.names or 'none'}")
        out, unknown = {}, [{} for _ in raw]
        for e in self.encoders:
            out[e.name], bad = e.encode([(r or {}).get(e.name) for r in raw])
            for row, b in zip(unknown, bad):
                if b:
                    row[e.name] = b
        return out, unknown

    def categories(self) -> dict[str, list]:
        """The values of each feature that has a vocabulary (what a category filter can name)."""
        return {e.name: list(e.values) for e in self.encoders if hasattr(e, "entities_with")}

    def forward(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        out = 0
        for e in self.encoders:
            out = out + e(inputs[e.name])
        return out
