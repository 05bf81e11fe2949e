"""The towers as modules of plain tensors, for runtimes outside this package.

A tower reads one typed batch, ``TowerInputs`` (``model/towers.py``). ``TowerExport`` is a small
module whose ``forward`` takes that batch as a flat list of named tensors, rebuilds the
``TowerInputs`` and calls the model's own ``user_vectors`` / ``item_vectors``: the exported graph is
the tower's forward, traced, with nothing re-implemented here.

The inputs, in order (``TowerSignature``):

- ``ids`` ``[batch]`` int64: vocabulary indices, ``-1`` for an entity outside the vocabulary;
- user tower reading a history: ``history`` ``[batch, history_length]`` int64 item indices (oldest
  first) and ``history_mask`` ``[batch, history_length]`` bool;
- for each feature encoder of the tower, in tower order, the tensors its ``forward`` input is made
  of, named ``FEATURE.FIELD``: each encoder says what they are (``export_inputs``) and gives an
  example (``example_input``); nothing here knows a feature kind;
- user tower with context features (``[features.context]``): each context feature's tensors the same
  way, named ``context.FEATURE.FIELD`` (the request's context, encoded; its default when absent).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import TwotowerError
from ..features.encoders import TensorSpec
from ..model.towers import TowerInputs, TwoTowerModel


class ExportError(TwotowerError):
    """A run that cannot be exported as asked (a missing package, a module without an export form)."""


@dataclass(frozen=True)
class FeatureInputs:
    """One feature encoder's part of an exported tower's inputs: its tensors (``specs``, in the
    order of the fields of its ``forward`` input) and how to rebuild that input from them."""

    name: str
    kind: str
    specs: tuple[TensorSpec, ...]
    rebuild: Any  # the forward input's type (a dataclass of tensors), or None for a single tensor

    def pack(self, tensors) -> Any:
        return tensors[0] if self.rebuild is None else self.rebuild(*tensors)

    def unpack(self, x) -> list[torch.Tensor]:
        if self.rebuild is None:
            return [x]
        return [getattr(x, f.name) for f in dataclasses.fields(x)]


@dataclass(frozen=True)
class TowerSignature:
    """What an exported tower takes and gives (module docstring)."""

    tower: str  # "user" or "item"
    history: bool
    features: tuple[FeatureInputs, ...]
    dim: int
    reads_ids: bool = True
    context: tuple[FeatureInputs, ...] = ()

    @property
    def inputs(self) -> list[TensorSpec]:
        ids = (f"{self.tower} vocabulary indices (vocab/{self.tower}s.json: position = index); -1 for a {self.tower} "
               "not in the vocabulary, whose id contributes nothing")
        if not self.reads_ids:
            ids = f"not read by this tower (it has no {self.tower}-id embedding): any int64 values, one per {self.tower}"
        out = [TensorSpec("ids", "int64", ("batch",), ids)]
        if self.history:
            out += [TensorSpec("history", "int64", ("batch", "history_length"),
                               "item vocabulary indices of the user's most recent items, oldest first, left-aligned; "
                               "padding positions hold any valid index (0)"),
                    TensorSpec("history_mask", "bool", ("batch", "history_length"),
                               "true where history holds a real item; the embeddings of those items are averaged")]
        for prefix, group in (("", self.features), ("context.", self.context)):
            for f in group:
                out += [dataclasses.replace(s, name=f"{prefix}{f.name}.{s.name}",
                                            shape=tuple(d if isinstance(d, int) or d == "batch"
                                                        else _identifier(f"{prefix}{f.name}_{d}") for d in s.shape))
                        for s in f.specs]
        return out

    @property
    def outputs(self) -> list[TensorSpec]:
        what = "f(u)" if self.tower == "user" else "g(j)"
        return [TensorSpec("vectors", "float32", ("batch", self.dim),
                           f"{what}: the {self.tower} tower's vectors, L2-normalised (zero for a row with no input)")]

    def describe(self) -> dict:
        """JSON-ready inputs and outputs (names, dtypes, shapes, meanings), with each feature input's
        feature and kind."""
        owner = {f"{f.name}.{s.name}": f for f in self.features for s in f.specs}
        owner.update({f"context.{f.name}.{s.name}": f for f in self.context for s in f.specs})
        rows = []
        for s in self.inputs:
            row = {"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "meaning": s.meaning}
            if s.name in owner:
                row.update(feature=owner[s.name].name, kind=owner[s.name].kind)
            rows.append(row)
        return {"inputs": rows, "outputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "meaning": s.meaning}
                                            for s in self.outputs]}


def _tower(model: TwoTowerModel, tower: str) -> nn.Module:
    if tower not in ("user", "item"):
        raise ValueError(f"tower must be 'user' or 'item', got {tower!r}")
    return model.user_tower if tower == "user" else model.item_tower


def signature(model: TwoTowerModel, tower: str) -> TowerSignature:
    """The exported inputs of ``model``'s ``tower``, asked of its feature encoders."""
    t = _tower(model, tower)
    feats = _feature_inputs(tower, [] if t.features is None else t.features.encoders)
    context = _feature_inputs(tower, [] if tower != "user" or t.context is None else t.context.encoders)
    history = tower == "user" and bool(model.user_tower.use_history)
    return TowerSignature(tower, history, tuple(feats), int(model.cfg.dim), t.id_embedding is not None, tuple(context))


def _feature_inputs(tower: str, encoders) -> list[FeatureInputs]:
    """Each encoder's part of the inputs, as it declares them (``export_inputs``), checked against
    the input its ``forward`` takes (``example_input``)."""
    feats = []
    for enc in encoders:
        kind = getattr(enc, "kind", type(enc).__name__)
        if not (hasattr(enc, "export_inputs") and hasattr(enc, "example_input")):
            raise ExportError(f"the {tower} tower's feature {enc.name!r} (kind {kind}) has no export form: its encoder "
                              "needs export_inputs() and example_input(n) (features/encoders.py, CategoricalFeature)")
        specs = tuple(enc.export_inputs())
        example = enc.example_input(2)
        if isinstance(example, torch.Tensor):
            rebuild, fields = None, [specs[0].name] if len(specs) == 1 else None
        elif dataclasses.is_dataclass(example):
            rebuild, fields = type(example), [f.name for f in dataclasses.fields(example)]
        else:
            rebuild, fields = None, None
        if fields != [s.name for s in specs]:
            raise ExportError(f"the {tower} tower's feature {enc.name!r} (kind {kind}): export_inputs() names "
                              f"{[s.name for s in specs]}, but its forward input is {type(example).__name__} "
                              f"({fields or 'not a tensor nor a dataclass of tensors'}); they must match, in order")
        feats.append(FeatureInputs(enc.name, kind, specs, rebuild))
    return feats


class TowerExport(nn.Module):
    """One tower of ``model`` as a module of plain tensors (module docstring), in eval mode."""

    def __init__(self, model: TwoTowerModel, tower: str):
        super().__init__()
        self.model = model
        self.sig = signature(model, tower)
        self.eval()

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        ids, k = tensors[0], 1
        history = mask = None
        if self.sig.history:
            history, mask, k = tensors[1], tensors[2], 3
        features = context = None
        if self.sig.features:
            features = {}
            for f in self.sig.features:
                n = len(f.specs)
                features[f.name] = f.pack(tensors[k : k + n])
                k += n
        if self.sig.context:
            context = {}
            for f in self.sig.context:
                n = len(f.specs)
                context[f.name] = f.pack(tensors[k : k + n])
                k += n
        x = TowerInputs(ids, history, mask, features, context=context)
        if self.sig.tower == "user":
            return self.model.user_vectors(x)
        return self.model.item_vectors(x)

    # ---- inputs -----------------------------------------------------------------------------------
    def tensors_of(self, x: TowerInputs) -> tuple[torch.Tensor, ...]:
        """The exported inputs of a ``TowerInputs`` (features as given, or the stored ones of its ids)."""
        out = [x.ids]
        if self.sig.history:
            if x.history is None:
                raise ValueError("this user tower reads a history: build the inputs with one")
            out += [x.history, x.history_mask]
        if self.sig.features:
            tower = _tower(self.model, self.sig.tower)
            feats = x.features if x.features is not None else tower.features.lookup(x.ids, x.all_known)
            for f in self.sig.features:
                out += f.unpack(feats[f.name])
        if self.sig.context:
            ctx = x.context if x.context is not None else self.model.user_tower.context.defaults(len(x.ids))
            for f in self.sig.context:
                out += f.unpack(ctx[f.name])
        return tuple(out)

    def example(self, n: int = 4) -> tuple[torch.Tensor, ...]:
        """Inputs for ``n`` entities to trace with: every part present and of its own length (the
        features as their encoders give them), so that no dimension is mistaken for a constant."""
        dev = self.model.device
        ids = torch.arange(n, dtype=torch.int64, device=dev) % max(self.model.n_users if self.sig.tower == "user"
                                                                    else self.model.n_items, 1)
        out = [ids]
        if self.sig.history:
            length = max(int(self.model.cfg.history_length), 2)  # 1 would be taken for a constant
            out += [torch.zeros(n, length, dtype=torch.int64, device=dev), torch.ones(n, length, dtype=torch.bool, device=dev)]
        tower = _tower(self.model, self.sig.tower)
        for f, enc in zip(self.sig.features, [] if tower.features is None else tower.features.encoders):
            out += f.unpack(enc.example_input(n))
        if self.sig.context:
            for f, enc in zip(self.sig.context, tower.context.encoders):
                out += f.unpack(enc.example_input(n))
        return tuple(out)


def _identifier(name: str) -> str:
    return re.sub(r"\W", "_", name)


def dimension_names(sig: TowerSignature) -> list[list[str | None]]:
    """Per input, per dimension, the name of a dimension that varies (``None`` for a fixed one):
    inputs that share a name share the dimension."""
    return [[None if isinstance(d, int) else _identifier(d) for d in s.shape] for s in sig.inputs]


def check_dtypes(sig: TowerSignature, tensors) -> None:
    """The tensors match the signature's dtypes and ranks (an encoder's example that disagrees with
    what it declared is a bug of that encoder, named here)."""
    for s, t in zip(sig.inputs, tensors):
        if str(t.dtype).removeprefix("torch.") != s.dtype or t.dim() != len(s.shape):
            raise ExportError(f"input {s.name!r} of the {sig.tower} tower: declared {s.dtype} {list(s.shape)}, "
                              f"but its example is {str(t.dtype).removeprefix('torch.')} of shape {list(t.shape)}")


def numpy_inputs(sig: TowerSignature, tensors) -> dict[str, np.ndarray]:
    """The inputs by name, as NumPy arrays (what an ONNX runtime takes)."""
    return {s.name: t.detach().cpu().numpy() for s, t in zip(sig.inputs, tensors)}
