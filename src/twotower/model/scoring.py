"""The served score, defined once, and the vectors that compute it.

DESIGN.md, "Serving-time popularity correction": every face of a trained model (the service, the
CLI, ``Run.recommend``, evaluation with ``--alpha``, mining, the index) ranks and reports

    score(u, j) = <f(u), g(j)> / tau  +  b_j  -  alpha * log p(j)

where ``<f(u), g(j)> / tau`` is the training logit (cosine over the temperature), ``b_j`` the learned
item bias when the model has one, and ``alpha`` a knob whose scale is relative to that logit;
``p(j)`` is the item's share of training positives with add-one smoothing (``log_popularity``), so
items never seen in training have a finite ``log p``.

Two layouts of the same score:

- ``ServedScore`` (fixed ``alpha``): the query ``f/tau`` and one additive term per item,
  ``c_j = b_j - alpha log p(j)``, for blocked exact ranking (evaluation, ``Run.recommend``) and, as
  ``[f/tau, 1] . [g, c]``, for an inner-product search (mining). Without a per-item term the cosine
  itself ranks the items (``tau > 0`` scales every score alike), so the vectors stay ``f`` and ``g``
  and the scores are divided by ``tau`` afterwards (``ServedScore.finish``);
- ``ScoreLayout`` (``alpha`` per query, for an index built once): appended dimensions,

    item  x_j = [ g(j),   s_b * b_j,   s_p * (-log p(j) - c) ]
    query q_u = [ f(u)/tau, 1 / s_b,   alpha / s_p           ]

    <q_u, x_j> = <f(u), g(j)>/tau + b_j - alpha * log p(j) - alpha * c = score(u, j) - alpha * c

  The constant ``c`` (the mean of ``-log p``) is the same for every item, so it changes no ranking
  and is added back to report the score (``served_scores``). The positive scales ``s_p`` and
  ``s_b`` cancel in the product; they keep the appended coordinates small (at most ``0.25`` in
  absolute value, ``ScoreLayout.fit``) so that item vectors stay close to the unit sphere, which
  approximate indexes (clusters, neighbour graphs) need: unscaled, ``-log p`` is 5 to 15 and would
  dominate every distance between items. With ``c = 0`` and scales of 1 this is the plain form
  ``[g, -log p]`` / ``[f/tau, alpha]``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


def item_bias(model) -> np.ndarray | None:
    """The learned per-item bias ``b_j`` of ``model`` as float32 ``[n_items]``, or ``None`` when it
    has none. Reads ``model.item_bias`` (a tensor, a parameter or an embedding module)."""
    b = getattr(model, "item_bias", None)
    if b is None:
        return None
    if isinstance(b, torch.nn.Module):
        b = getattr(b, "weight", None)
        if b is None:
            return None
    return b.detach().float().cpu().numpy().reshape(-1)


@dataclass(frozen=True)
class ServedScore:
    """The served score at one ``alpha``: ``<f, g>/tau + c_j`` with ``c_j = b_j - alpha log p(j)``
    (``terms``: float32 ``[n_items]``, or ``None`` when there is no per-item term)."""

    temperature: float
    terms: torch.Tensor | None = None

    @classmethod
    def of(cls, model, log_p: np.ndarray | None = None, alpha: float = 0.0) -> "ServedScore":
        """The score of ``model`` (its temperature and learned bias) at ``alpha`` (``log_p``: the
        items' ``log p(j)``, needed when ``alpha != 0``)."""
        bias = None
        if getattr(model, "item_bias", None) is not None:
            with torch.no_grad():
                bias = model.bias(torch.arange(model.n_items, device=model.device)).float()
        terms = bias
        if alpha:
            if log_p is None:
                raise ValueError("a popularity correction (alpha != 0) needs the items' log p")
            pop = torch.from_numpy(-float(alpha) * np.asarray(log_p, dtype=np.float64)).float()
            pop = pop.to(bias.device) if bias is not None else pop.to(model.device)
            terms = pop if bias is None else bias + pop
        return cls(float(model.temperature), terms)

    def without(self, items: np.ndarray, n_items: int) -> "ServedScore":
        """The same score with ``items`` (a bool mask over the ``n_items`` items, e.g. retired ones)
        never ranked: their term is ``-inf``. The others' scores and order are unchanged (a zero
        term where there was none: ``<f, g>/tau`` is then ranked as it is reported)."""
        mask = torch.from_numpy(np.asarray(items, dtype=bool))
        if not mask.any():
            return self
        terms = torch.zeros(n_items) if self.terms is None else self.terms.detach().clone()
        terms[mask.to(terms.device)] = float("-inf")
        return ServedScore(self.temperature, terms)

    def query(self, f: torch.Tensor) -> torch.Tensor:
        """The query side of the ranking product: ``f / tau`` with per-item terms, else ``f``."""
        return f if self.terms is None else f / self.temperature

    def finish(self, ranked: torch.Tensor) -> torch.Tensor:
        """Served scores from ranking scores (``query(f) . g + terms``): divided by ``tau`` when
        the cosine was ranked."""
        return ranked / self.temperature if self.terms is None else ranked

    def inner_product(self, f: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Queries and items (float32) whose inner product ranks as the score, for an
        inner-product search: ``(f, g)`` without terms, else ``([f/tau, 1], [g, c])``."""
        if self.terms is None:
            return f, g
        q = np.hstack([f / np.float32(self.temperature), np.ones((len(f), 1), np.float32)])
        x = np.hstack([g, self.terms.cpu().numpy().astype(np.float32).reshape(-1, 1)])
        return q.astype(np.float32), x.astype(np.float32)


def augment_items(vecs: np.ndarray, log_p: np.ndarray, bias: np.ndarray | None = None,
                  offset: float = 0.0, scale: float = 1.0, bias_scale: float = 1.0) -> np.ndarray:
    """Item side of the served score (module docstring): ``[g(j), s_b b_j, s_p (-log p(j) - c)]``,
    float32 ``[n, d + 1]`` without a bias, ``[n, d + 2]`` with one."""
    vecs = np.asarray(vecs, dtype=np.float32)
    pop = (scale * (-np.asarray(log_p, dtype=np.float64) - offset)).astype(np.float32)[:, None]
    cols = [vecs]
    if bias is not None:
        cols.append((bias_scale * np.asarray(bias, dtype=np.float64).reshape(-1)).astype(np.float32)[:, None])
    cols.append(pop)
    return np.ascontiguousarray(np.hstack(cols))


def augment_queries(vecs: np.ndarray, alpha: float | np.ndarray, temperature: float = 1.0, scale: float = 1.0,
                    bias_scale: float | None = None) -> np.ndarray:
    """Query side of the served score (module docstring): ``[f(u)/tau, 1/s_b, alpha/s_p]`` per row;
    ``alpha`` is a scalar or one value per query; ``bias_scale`` is ``None`` when items carry no bias."""
    vecs = np.asarray(vecs, dtype=np.float32)
    n = len(vecs)
    a = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (n,)) / scale
    cols = [vecs / np.float32(temperature)]
    if bias_scale is not None:
        cols.append(np.full((n, 1), 1.0 / bias_scale, dtype=np.float32))
    cols.append(a.astype(np.float32)[:, None])
    return np.ascontiguousarray(np.hstack(cols))


def served_scores(inner: np.ndarray, alpha: float | np.ndarray, offset: float) -> np.ndarray:
    """``score(u, j)`` from the index's inner product ``<q_u, x_j>``: add back ``alpha * c``.
    ``alpha`` is a scalar or one value per row of ``inner``."""
    a = np.asarray(alpha, dtype=np.float64)
    return (inner + (a[:, None] if a.ndim else a) * offset).astype(np.float32)


@dataclass(frozen=True)
class ScoreLayout:
    """The constants of the served score's layout in an index (module docstring): the temperature,
    the popularity offset ``c`` and scale ``s_p``, and the bias scale ``s_b`` (``None``: no bias)."""

    temperature: float
    offset: float = 0.0
    scale: float = 1.0
    bias_scale: float | None = None

    @classmethod
    def fit(cls, log_p: np.ndarray, temperature: float, bias: np.ndarray | None = None, bound: float = 0.25) -> "ScoreLayout":
        """Centre ``-log p`` on its mean and scale the appended coordinates into ``[-bound, bound]``."""
        neg = -np.asarray(log_p, dtype=np.float64)
        offset = float(neg.mean()) if len(neg) else 0.0
        spread = float(np.abs(neg - offset).max()) if len(neg) else 0.0
        scale = bound / spread if spread > 0 else 1.0
        bias_scale = None
        if bias is not None:
            m = float(np.abs(np.asarray(bias, dtype=np.float64)).max()) if len(bias) else 0.0
            bias_scale = bound / m if m > 0 else 1.0
        return cls(float(temperature), offset, scale, bias_scale)

    @classmethod
    def of(cls, model, log_p: np.ndarray) -> tuple["ScoreLayout", np.ndarray | None]:
        """The layout of ``model``'s served score (its temperature and learned bias) and the bias."""
        bias = item_bias(model)
        return cls.fit(log_p, float(model.temperature), bias), bias

    def items(self, vecs: np.ndarray, log_p: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        if (bias is None) != (self.bias_scale is None):
            raise ValueError("the layout and the items disagree on whether there is a learned bias")
        return augment_items(vecs, log_p, bias, self.offset, self.scale, self.bias_scale or 1.0)

    def queries(self, vecs: np.ndarray, alpha: float | np.ndarray) -> np.ndarray:
        return augment_queries(vecs, alpha, self.temperature, self.scale, self.bias_scale)

    def scores(self, inner: np.ndarray, alpha: float | np.ndarray) -> np.ndarray:
        return served_scores(inner, alpha, self.offset)

    @property
    def width(self) -> int:
        """Dimensions appended to ``g(j)``: the popularity coordinate, and the bias's."""
        return 1 + (self.bias_scale is not None)

    def to_dict(self) -> dict:
        return asdict(self)
