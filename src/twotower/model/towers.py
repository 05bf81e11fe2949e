"""The user tower and the item tower.

Each tower sums the embeddings of its inputs (ids, pooled history, features), passes the sum
through an optional MLP and L2-normalises it, so that ``<f(u), g(j)>`` is a cosine in [-1, 1] and
the temperature alone sets the sharpness of the softmax. With ids only and no MLP the model is
matrix factorisation on the unit sphere.

A tower reads one typed batch, ``TowerInputs``, built by ``TwoTowerModel.user_inputs`` (or
``item_inputs``) from vocabulary indices and raw values: training, evaluation, mining, the index,
serving and batch recommendation all go through it and through the tower's own ``forward``, for
known users and for new ones (history, features, or both). The user tower also reads the context of
the request (``TowerInputs.context``: each training pair's own, the held-out interaction's at
evaluation, the request's at serving, the features' defaults when absent). The towers' feature
encoders own their fitted state (``feature_state`` / ``TwoTowerModel.from_state``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..data.dataset import CSR, EncodedFeatures
from ..features.encoders import FeatureSet, FeatureState, FittedFeature, fit_context, fit_features


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(x, dim=-1)``: ``y = x / max(|x|, eps)`` along the last dimension, as one
    autograd node (``_L2Normalize``) when a gradient is wanted."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        # The same arithmetic as _L2Normalize.forward, as plain operations: a custom autograd
        # Function cannot be traced into TorchScript (``twotower export``) and buys nothing here.
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)
    return _L2Normalize.apply(x, eps)


class _L2Normalize(torch.autograd.Function):
    """``y = x / n`` with ``n = max(|x|, eps)``, and its gradient in one expression,

        dL/dx = (g - y <g, y>) / n        (the part of g along y removed: |y| does not move),
        dL/dx = g / eps                   where |x| < eps (the clamp is constant there),

    in place of the five operations ``F.normalize`` records (norm, clamp, expand, divide, and the
    divide's gradient with respect to the norm). Same values; a Gowalla training step's two
    normalisations, forward and backward, took ~1.2 ms of PyTorch operations before."""

    @staticmethod
    def forward(ctx, x, eps):
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        clamped = n < eps
        n = n.clamp_min_(eps)
        y = x / n
        ctx.save_for_backward(y, n, clamped)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        y, n, clamped = ctx.saved_tensors
        dot = (g * y).sum(-1, keepdim=True).masked_fill_(clamped, 0.0)
        return torch.addcmul(g, y, dot, value=-1.0).div_(n), None


def _has_dropout(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())


@dataclass
class TowerInputs:
    """What a tower reads for a batch of ``B`` users or items; ``TwoTowerModel.user_inputs`` and
    ``item_inputs`` build it from vocabulary indices and raw values.

    - ``ids`` ``[B]`` int64: vocabulary indices; ``-1`` for an entity not in the vocabulary (a new
      user), whose id contributes nothing (``id_vectors``: the one place an unknown id is handled);
    - ``history`` / ``history_mask`` ``[B, L]``: item indices, oldest first, and which are real
      (user tower; ``None``: no history);
    - ``features``: each feature's encoded input (``FeatureSet.encode``); ``None``: the stored
      features of the entities, looked up by id (none for ``-1``);
    - ``all_known``: every id is ``>= 0`` (the trainer's batches; skips the masking of unknown ids);
    - ``unknown_features``: per entity, the raw feature values no encoder could place (reported to
      the caller; they go to the out-of-vocabulary bucket);
    - ``context``: each context feature's encoded input, one row per user (user tower); ``None``:
      every context feature at its default.
    """

    ids: torch.Tensor
    history: torch.Tensor | None = None
    history_mask: torch.Tensor | None = None
    features: dict[str, Any] | None = None
    all_known: bool = False
    unknown_features: list[dict] | None = None
    context: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def make_mlp(dim: int, hidden: list[int], dropout: float) -> nn.Module | None:
    if not hidden:
        return None
    layers: list[nn.Module] = []
    d = dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        d = h
    layers.append(nn.Linear(d, dim))
    return nn.Sequential(*layers)


def _plus(a: torch.Tensor | int, b: torch.Tensor | int) -> torch.Tensor | int:
    """``a + b`` where ``0`` stands for an absent part (no operation recorded for it)."""
    if isinstance(b, int):
        return a
    return b if isinstance(a, int) else a + b


@dataclass
class ContextTable:
    """The context values of many rows (a split's interactions, each evaluated user's held-out
    interaction) encoded once; ``take(rows)`` gives the user tower's ``context`` for some of them."""

    features: FeatureSet
    tables: dict

    def take(self, rows) -> dict[str, Any]:
        dev = next(iter(next(iter(self.tables.values())).values())).device
        r = rows if isinstance(rows, torch.Tensor) else torch.from_numpy(np.asarray(rows, dtype=np.int64))
        return self.features.take(self.tables, r.to(dev))


def _fitted(features: EncodedFeatures | Sequence[FittedFeature] | None) -> list[FittedFeature]:
    if features is None:
        return []
    return fit_features(features) if isinstance(features, EncodedFeatures) else list(features)


class _Tower(nn.Module):
    """What both towers share: the id part and the finish (MLP, L2 normalisation)."""

    id_embedding: nn.Embedding | None
    features: FeatureSet | None
    mlp: nn.Module | None

    def id_vectors(self, x: TowerInputs) -> torch.Tensor | int:
        """The id embedding of each row; nothing (zero) for an id not in the vocabulary (``-1``):
        a new user is placed by its history and features alone."""
        if self.id_embedding is None:
            return 0
        if x.all_known:
            return self.id_embedding(x.ids)
        known = (x.ids >= 0).unsqueeze(-1)
        return self.id_embedding(x.ids.clamp_min(0)) * known.to(self.id_embedding.weight.dtype)

    def feature_vectors(self, x: TowerInputs) -> torch.Tensor | int:
        if self.features is None:
            return 0
        return self.features(x.features if x.features is not None else self.features.lookup(x.ids, x.all_known))

    def finish(self, x: torch.Tensor | int, n: int) -> torch.Tensor:
        if isinstance(x, int):  # no input at all for these rows (e.g. a new user of an ids-only tower)
            p = next(self.parameters())
            x = torch.zeros(n, self.dim, dtype=p.dtype, device=p.device)
        if self.mlp is not None:
            x = self.mlp(x)
        return l2_normalize(x)

    def feature_state(self) -> list[FittedFeature]:
        return [] if self.features is None else self.features.fitted()


class ItemTower(_Tower):
    """g(j): item-id embedding + feature embeddings -> optional MLP -> L2 normalisation."""

    def __init__(self, n_items: int, cfg: ModelConfig, features: EncodedFeatures | Sequence[FittedFeature] | None,
                 sparse: bool = False):
        super().__init__()
        self.dim = cfg.dim
        self.id_embedding = None
        if cfg.item_id:
            self.id_embedding = nn.Embedding(n_items, cfg.dim, sparse=sparse)
            nn.init.normal_(self.id_embedding.weight, std=cfg.init_std)
        fitted = _fitted(features)
        self.features = FeatureSet(fitted, cfg.dim, cfg.init_std, sparse) if fitted else None
        self.mlp = make_mlp(cfg.dim, cfg.mlp, cfg.dropout)

    @property
    def deterministic(self) -> bool:
        """Equal ids give equal vectors, in training too (no dropout)."""
        return not _has_dropout(self)

    def forward(self, x: TowerInputs) -> torch.Tensor:
        h = _plus(self.id_vectors(x), self.feature_vectors(x))
        # ids.shape[0], not len(x): under torch.export (twotower export) len() fixes the batch size
        return self.finish(h, x.ids.shape[0])


class UserTower(_Tower):
    """f(u): user-id embedding + mean of the user's history items' embeddings + user features +
    context features -> optional MLP -> L2 normalisation. The history table is the item tower's id
    table when shared (then it is passed in at call time, so each weight is stored once).

    One forward for every kind of user: a known one (id, its history and stored features), and a
    new one (id ``-1``) with a history, features, or both (``TowerInputs``); in every case with the
    request's context (or its defaults)."""

    def __init__(self, n_users: int, n_items: int, cfg: ModelConfig,
                 features: EncodedFeatures | Sequence[FittedFeature] | None, sparse: bool = False,
                 context: Sequence[FittedFeature] = ()):
        super().__init__()
        self.dim = cfg.dim
        self.id_embedding = None
        if cfg.user_id:
            self.id_embedding = nn.Embedding(n_users, cfg.dim, sparse=sparse)
            nn.init.normal_(self.id_embedding.weight, std=cfg.init_std)
        self.use_history = cfg.user_history
        self.history_table = None
        if cfg.user_history and not (cfg.share_item_table and cfg.item_id):
            self.history_table = nn.Embedding(n_items, cfg.dim, sparse=sparse)
            nn.init.normal_(self.history_table.weight, std=cfg.init_std)
        fitted = _fitted(features)
        self.features = FeatureSet(fitted, cfg.dim, cfg.init_std, sparse) if fitted else None
        self.context = FeatureSet(list(context), cfg.dim, cfg.init_std, sparse) if context else None
        self.mlp = make_mlp(cfg.dim, cfg.mlp, cfg.dropout)

    @property
    def deterministic(self) -> bool:
        """Equal user ids give equal vectors, in training too: no dropout, no history and no context
        (a training pair's history and context are its own)."""
        return not self.use_history and self.context is None and not _has_dropout(self)

    def context_vectors(self, x: TowerInputs) -> torch.Tensor | int:
        """The context features' sum: the rows' own context, or every feature's default."""
        if self.context is None:
            return 0
        return self.context(x.context if x.context is not None else self.context.defaults(x.ids.shape[0]))

    def context_state(self) -> list[FittedFeature]:
        return [] if self.context is None else self.context.fitted()

    def history_vectors(self, x: TowerInputs, shared_table: nn.Embedding | None = None) -> torch.Tensor | int:
        """The mean of the history items' embeddings (zero for an empty history)."""
        if not self.use_history or x.history is None:
            return 0
        table = self.history_table if self.history_table is not None else shared_table
        m = x.history_mask.to(table.weight.dtype).unsqueeze(-1)
        return (table(x.history) * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, x: TowerInputs, shared_table: nn.Embedding | None = None) -> torch.Tensor:
        h = _plus(self.id_vectors(x), self.history_vectors(x, shared_table))
        h = _plus(h, self.feature_vectors(x))
        h = _plus(h, self.context_vectors(x))
        return self.finish(h, x.ids.shape[0])


class TwoTowerModel(nn.Module):
    """Both towers and the score ``s(u, j) = <f(u), g(j)> / tau (+ b_j)``.

    ``tau`` is fixed, or learned as ``log tau`` (clamped to [0.01, 1], the range CLIP allows its logit
    scale) when ``learn_temperature``; the ``temperature`` buffer always holds its current value for
    evaluation and serving. ``b_j`` is an optional learned per-item bias (docs/design.md, "Scores and temperature"), zero at start.
    """

    def __init__(self, n_users: int, n_items: int, cfg: ModelConfig,
                 item_features: EncodedFeatures | Sequence[FittedFeature] | None = None,
                 user_features: EncodedFeatures | Sequence[FittedFeature] | None = None, sparse: bool = False,
                 context: Sequence[FittedFeature] = ()):
        """``item_features`` / ``user_features``: a dataset's table (fitted here) or fitted state;
        ``context``: the context features' fitted state (``encoders.fit_context``)."""
        super().__init__()
        self.cfg = cfg
        self.n_users, self.n_items = n_users, n_items
        self.item_tower = ItemTower(n_items, cfg, item_features, sparse)
        self.user_tower = UserTower(n_users, n_items, cfg, user_features, sparse, context)
        self.register_buffer("temperature", torch.tensor(float(cfg.temperature)))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.temperature))) if cfg.learn_temperature else None
        self.item_bias = None
        if cfg.item_bias:
            self.item_bias = nn.Embedding(n_items, 1, sparse=sparse)
            nn.init.zeros_(self.item_bias.weight)

    # ---- the fitted feature state (saved with a run beside the weights) --------------------------
    def feature_state(self) -> FeatureState:
        """What the towers' feature encoders took from the training data (vocabularies, each known
        entity's values): with the weights, all a run needs to rebuild the model (``from_state``)."""
        return FeatureState.of({"item": self.item_tower.feature_state(), "user": self.user_tower.feature_state(),
                                "context": self.user_tower.context_state()})

    @classmethod
    def from_state(cls, n_users: int, n_items: int, cfg: ModelConfig, features: FeatureState) -> "TwoTowerModel":
        """The model of a saved run, before its weights are loaded."""
        return cls(n_users, n_items, cfg, features.tower("item"), features.tower("user"), context=features.tower("context"))

    def context_table(self, columns: Mapping[str, np.ndarray] | None) -> ContextTable | None:
        """Raw context columns (one value per row: ``Split.context``'s form) encoded once, on the
        model's device; ``None`` when the user tower reads no context."""
        if self.user_tower.context is None:
            return None
        return ContextTable(self.user_tower.context, self.user_tower.context.tables(columns))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tau(self) -> torch.Tensor:
        if self.log_temperature is None:
            return self.temperature
        tau = self.log_temperature.exp().clamp(0.01, 1.0)
        with torch.no_grad():
            self.temperature.copy_(tau)
        return tau

    def bias(self, items: torch.Tensor) -> torch.Tensor | None:
        """``b_j`` for ``items`` (any shape), or None without a learned bias."""
        return None if self.item_bias is None else self.item_bias(items).squeeze(-1)

    # ---- the towers' inputs ------------------------------------------------------------------------
    def user_inputs(self, users, history: CSR | Sequence[np.ndarray] | None = None,
                    features: Sequence[Mapping[str, Any] | None] | None = None,
                    history_length: int | None = None, context=None) -> TowerInputs:
        """The user tower's input for ``B`` users, on the model's device: the one place where raw
        values become what the tower reads.

        ``users``: ``[B]`` user indices, ``-1`` for a user not in the vocabulary. ``history``: a CSR
        over user indices (each known user's items in time order: ``run.known``, a dataset's
        history), or one array of item indices per user (oldest first; a new user's); the last
        ``history_length`` items (default ``model.history_length``) are kept. ``features``: per
        user a mapping ``{feature: value or [values]}`` (or ``None``), encoded by the tower's
        encoders, which report what they cannot place (``unknown_features``); ``None`` for the
        whole batch: the stored features of known users. ``context``: per user a mapping
        ``{context feature: value}`` (a feature left out takes its default), or the encoded inputs
        of the rows (``ContextTable.take``); ``None``: every context feature at its default."""
        ids = np.asarray(users, dtype=np.int64).reshape(-1)
        all_known = bool((ids >= 0).all())
        length = int(history_length or self.cfg.history_length)
        dev = self.device
        hist = mask = None
        if history is not None:
            if isinstance(history, CSR):
                h, m = history.last(np.maximum(ids, 0), length)
                if not all_known:
                    m = m & (ids >= 0)[:, None]
            else:
                h, m = _pad_histories(history, length)
            hist, mask = torch.from_numpy(h).to(dev), torch.from_numpy(m).to(dev)
        feats, unknown = _encode_features(self.user_tower, features, len(ids), "user")
        ctx = None
        if context is not None and isinstance(context, dict):
            ctx = context
        elif context is not None:
            if len(context) != len(ids):
                raise ValueError(f"{len(context)} context rows for {len(ids)} users")
            if self.user_tower.context is None:
                if any(context):
                    raise KeyError("this model's user tower takes no context")
            else:
                for c in context:
                    self.user_tower.context.check_names(c, "context feature")
                ctx = self.user_tower.context.encode(list(context), absent_default=True)[0]
        return TowerInputs(torch.from_numpy(ids).to(dev), hist, mask, feats, all_known, unknown, ctx)

    def item_inputs(self, items, features: Sequence[Mapping[str, Any] | None] | None = None) -> TowerInputs:
        """The item tower's input for ``B`` items (item indices, ``-1``: not in the vocabulary;
        ``features`` as for ``user_inputs``)."""
        ids = np.asarray(items, dtype=np.int64).reshape(-1)
        feats, unknown = _encode_features(self.item_tower, features, len(ids), "item")
        return TowerInputs(torch.from_numpy(ids).to(self.device), None, None, feats, bool((ids >= 0).all()), unknown)

    # ---- the towers ------------------------------------------------------------------------------
    def encode_items(self, items: torch.Tensor) -> torch.Tensor:
        """``g(j)`` of items of the vocabulary (a tensor of item indices)."""
        return self.item_tower(TowerInputs(items, all_known=True))

    def encode_users(self, users: torch.Tensor, history: torch.Tensor | None = None,
                     history_mask: torch.Tensor | None = None, context: dict[str, Any] | None = None) -> torch.Tensor:
        """``f(u)`` of users of the vocabulary with the given history and context (the trainer's
        batches: each pair's own, ``ContextTable.take``)."""
        return self.user_tower(TowerInputs(users, history, history_mask, all_known=True, context=context),
                               shared_table=self.item_tower.id_embedding)

    def item_vectors(self, x: TowerInputs) -> torch.Tensor:
        """``g(j)`` for any items (``item_inputs``): the item tower's forward; an item not in the
        vocabulary (id ``-1``) is placed by its features alone."""
        return self.item_tower(x)

    def user_vectors(self, x: TowerInputs, item_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """``f(u)`` for any users (``user_inputs``): the user tower's forward. A new user (id ``-1``)
        with a history, of a tower that reads no history, is placed by ``fold_in`` (the items'
        ``g(j)``: ``item_vectors``, computed when not given)."""
        f = self.user_tower(x, shared_table=self.item_tower.id_embedding)
        if self.user_tower.use_history or x.all_known or x.history is None:
            return f
        fold = (x.ids < 0) & x.history_mask.any(1)
        if not bool(fold.any()):
            return f
        if item_vectors is None:
            item_vectors = embed_items(self)
        return torch.where(fold[:, None], self.fold_in(x.history, x.history_mask, item_vectors.to(f.device)).to(f.dtype), f)

    @staticmethod
    def fold_in(history: torch.Tensor, history_mask: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        """A new user of a tower without history input (ids only: matrix factorisation) as the
        normalised mean of its history items' ``g(j)``, ``f = normalize(sum_j g(j))``: the point on
        the unit sphere whose summed cosine to those items is largest (the least-squares position
        of a user whose positives are those items)."""
        m = history_mask.to(item_vectors.dtype).unsqueeze(-1)
        return F.normalize((item_vectors[history] * m).sum(1), dim=-1)

    def score(self, user_vecs: torch.Tensor, item_vecs: torch.Tensor, item_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, C]`` scores of every user against every (shared) candidate."""
        # Dividing the [B, d] side costs B*d operations instead of B*C.
        s = (user_vecs / self.tau()) @ item_vecs.T
        b = self.bias(item_ids) if item_ids is not None else None
        return s if b is None else s + b

    def score_rows(self, user_vecs: torch.Tensor, item_vecs: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` scores of each user against its own ``K`` candidates (``item_vecs`` ``[B, K, d]``)."""
        s = torch.einsum("bd,bkd->bk", user_vecs / self.tau(), item_vecs)
        b = self.bias(item_ids)
        return s if b is None else s + b

    def sparse_parameters(self) -> list[nn.Parameter]:
        """Embedding tables (sparse gradients when built with ``sparse=True``)."""
        return [m.weight for m in self.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]

    def dense_parameters(self) -> list[nn.Parameter]:
        sparse_ids = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse_ids]


def _encode_features(tower: _Tower, features, n: int, kind: str) -> tuple[dict | None, list[dict] | None]:
    """Raw feature values of ``n`` entities through ``tower``'s encoders (``None``: stored ones)."""
    if features is None:
        return None, None
    if len(features) != n:
        raise ValueError(f"{len(features)} feature rows for {n} {kind}s")
    if tower.features is None:
        if any(features):
            raise KeyError(f"this model's {kind} tower has no features")
        return None, None
    return tower.features.encode(features)


def _pad_histories(histories: Sequence[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
    """The last ``length`` items of each history as ``[B, length]`` (left-aligned) and its mask."""
    lens = np.array([min(len(h), length) for h in histories], dtype=np.int64)
    flat = np.concatenate([np.asarray(h, dtype=np.int64)[len(h) - n:] for h, n in zip(histories, lens)]) if len(histories) \
        else np.empty(0, np.int64)
    rows = np.repeat(np.arange(len(histories)), lens)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)
    hist = np.zeros((len(histories), length), dtype=np.int64)
    mask = np.zeros((len(histories), length), dtype=bool)
    hist[rows, cols], mask[rows, cols] = flat, True
    return hist, mask


@torch.no_grad()
def embed_items(model: TwoTowerModel, start: int = 0, stop: int | None = None, batch: int = 65536,
                progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """``g(j)`` of items ``[start, stop)`` (default: every item), ``[n, d]`` on the model's device,
    ``batch`` items per item-tower pass (``progress(n)`` after each): the one way every item is
    embedded (evaluation, mining, the index, embedding parts, the run's ``item_embeddings.npy``).
    Puts the model in eval mode."""
    model.eval()
    dev = next(model.parameters()).device
    stop = model.n_items if stop is None else int(stop)
    out = None
    for s in range(start, stop, batch):
        e = min(s + batch, stop)
        g = model.encode_items(torch.arange(s, e, device=dev))
        if out is None:  # filled in place: no second copy of the catalog's vectors
            out = torch.empty(stop - start, g.shape[1], device=g.device, dtype=g.dtype)
        out[s - start : e - start] = g
        if progress is not None:
            progress(e - s)
    return out if out is not None else torch.empty(0, model.cfg.dim, device=dev)


@torch.no_grad()
def embed_users(model: TwoTowerModel, users: np.ndarray, history: CSR, history_length: int | None = None,
                batch: int = 8192, context: ContextTable | None = None) -> torch.Tensor:
    """``f(u)`` of known users with their last ``history_length`` items of ``history`` (a CSR over
    user indices), ``batch`` users per user-tower pass, on the model's device; with the context of
    ``context``'s rows of the users (a table over user indices; default: the defaults)."""
    model.eval()
    users = np.asarray(users, dtype=np.int64)
    out = [model.user_vectors(model.user_inputs(users[s : s + batch], history, history_length=history_length,
                                                context=None if context is None else context.take(users[s : s + batch])))
           for s in range(0, len(users), batch)]
    return torch.cat(out) if out else torch.empty(0, model.cfg.dim, device=model.device)
