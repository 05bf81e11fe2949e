"""The user tower and the item tower.

Each tower sums the embeddings of its inputs (ids, pooled history, categorical features), passes the
sum through an optional MLP and L2-normalises it, so that ``<f(u), g(j)>`` is a cosine in [-1, 1]
and the temperature alone sets the sharpness of the softmax. With ids only and no MLP the model is
matrix factorisation on the unit sphere.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from ..data.dataset import EncodedFeatures


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``F.normalize(x, dim=-1)``: ``y = x / max(|x|, eps)`` along the last dimension, as one
    autograd node (``_L2Normalize``)."""
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


def gather_rows(indptr: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries of CSR ``rows`` concatenated, and the offset where each row starts (EmbeddingBag input)."""
    starts = indptr[rows]
    lens = indptr[rows + 1] - starts
    offsets = torch.cumsum(lens, 0) - lens
    flat = torch.repeat_interleave(starts - offsets, lens) + torch.arange(int(lens.sum()), device=rows.device)
    return indices[flat], offsets


class FeatureBags(nn.Module):
    """Sum over categorical features of the mean embedding of the entity's values
    (multi-valued features such as genres are mean-pooled; a missing value contributes zero)."""

    def __init__(self, features: EncodedFeatures, dim: int, init_std: float, sparse: bool = False):
        super().__init__()
        self.names = features.names
        self.bags = nn.ModuleDict()
        for k, name in enumerate(self.names):
            bag = nn.EmbeddingBag(max(len(features.values[name]), 1), dim, mode="mean", sparse=sparse)
            nn.init.normal_(bag.weight, std=init_std)
            self.bags[f"f{k}"] = bag
            csr = features.rows[name]
            self.register_buffer(f"indptr{k}", torch.from_numpy(csr.indptr.copy()))
            self.register_buffer(f"values{k}", torch.from_numpy(csr.indices.copy()))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        out = 0
        for k in range(len(self.names)):
            vals, offsets = gather_rows(getattr(self, f"indptr{k}"), getattr(self, f"values{k}"), rows)
            out = out + self.bags[f"f{k}"](vals, offsets)
        return out


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


class ItemTower(nn.Module):
    """g(j): item-id embedding + categorical feature embeddings -> optional MLP -> L2 normalisation."""

    def __init__(self, n_items: int, cfg: ModelConfig, features: EncodedFeatures | None, sparse: bool = False):
        super().__init__()
        self.id_embedding = None
        if cfg.item_id:
            self.id_embedding = nn.Embedding(n_items, cfg.dim, sparse=sparse)
            nn.init.normal_(self.id_embedding.weight, std=cfg.init_std)
        self.features = FeatureBags(features, cfg.dim, cfg.init_std, sparse) if features is not None and features.names else None
        self.mlp = make_mlp(cfg.dim, cfg.mlp, cfg.dropout)

    @property
    def deterministic(self) -> bool:
        """Equal ids give equal vectors, in training too (no dropout)."""
        return not _has_dropout(self)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        x = 0
        if self.id_embedding is not None:
            x = self.id_embedding(items)
        if self.features is not None:
            x = x + self.features(items)
        if self.mlp is not None:
            x = self.mlp(x)
        return l2_normalize(x)


class UserTower(nn.Module):
    """f(u): user-id embedding + mean of the user's history items' embeddings + user features
    -> optional MLP -> L2 normalisation. The history table is the item tower's id table when
    shared (then it is passed in at call time, so each weight is stored once)."""

    def __init__(self, n_users: int, n_items: int, cfg: ModelConfig, features: EncodedFeatures | None, sparse: bool = False):
        super().__init__()
        self.id_embedding = None
        if cfg.user_id:
            self.id_embedding = nn.Embedding(n_users, cfg.dim, sparse=sparse)
            nn.init.normal_(self.id_embedding.weight, std=cfg.init_std)
        self.use_history = cfg.user_history
        self.history_table = None
        if cfg.user_history and not (cfg.share_item_table and cfg.item_id):
            self.history_table = nn.Embedding(n_items, cfg.dim, sparse=sparse)
            nn.init.normal_(self.history_table.weight, std=cfg.init_std)
        self.features = FeatureBags(features, cfg.dim, cfg.init_std, sparse) if features is not None and features.names else None
        self.mlp = make_mlp(cfg.dim, cfg.mlp, cfg.dropout)

    @property
    def deterministic(self) -> bool:
        """Equal user ids give equal vectors, in training too: no dropout, and no history (a
        training pair's history is its own)."""
        return not self.use_history and not _has_dropout(self)

    def forward(self, users: torch.Tensor, history: torch.Tensor | None = None, history_mask: torch.Tensor | None = None,
                shared_table: nn.Embedding | None = None) -> torch.Tensor:
        x = 0
        if self.id_embedding is not None:
            x = self.id_embedding(users)
        if self.use_history and history is not None:
            table = self.history_table if self.history_table is not None else shared_table
            m = history_mask.to(table.weight.dtype).unsqueeze(-1)
            pooled = (table(history) * m).sum(1) / m.sum(1).clamp_min(1.0)
            x = x + pooled
        if self.features is not None:
            x = x + self.features(users)
        if self.mlp is not None:
            x = self.mlp(x)
        return l2_normalize(x)


class TwoTowerModel(nn.Module):
    """Both towers and the score ``s(u, j) = <f(u), g(j)> / tau (+ b_j)``.

    ``tau`` is fixed, or learned as ``log tau`` (clamped to [0.01, 1], the range CLIP allows its logit
    scale) when ``learn_temperature``; the ``temperature`` buffer always holds its current value for
    evaluation and serving. ``b_j`` is an optional learned per-item bias (docs/design.md, "Scores and temperature"), zero at start.
    """

    def __init__(self, n_users: int, n_items: int, cfg: ModelConfig,
                 item_features: EncodedFeatures | None = None, user_features: EncodedFeatures | None = None,
                 sparse: bool = False):
        super().__init__()
        self.cfg = cfg
        self.n_users, self.n_items = n_users, n_items
        self.item_tower = ItemTower(n_items, cfg, item_features, sparse)
        self.user_tower = UserTower(n_users, n_items, cfg, user_features, sparse)
        self.register_buffer("temperature", torch.tensor(float(cfg.temperature)))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.temperature))) if cfg.learn_temperature else None
        self.item_bias = None
        if cfg.item_bias:
            self.item_bias = nn.Embedding(n_items, 1, sparse=sparse)
            nn.init.zeros_(self.item_bias.weight)

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

    def encode_items(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_tower(items)

    def encode_users(self, users: torch.Tensor, history: torch.Tensor | None = None,
                     history_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.user_tower(users, history, history_mask, shared_table=self.item_tower.id_embedding)

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
