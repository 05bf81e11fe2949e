"""Index: item embeddings exported and searched with FAISS, laid out so that an inner product is
the served score (``model.scoring``), kinds and parameters (``index``), a run's index (``run_index``)."""
from ..model.scoring import ScoreLayout, augment_items, augment_queries, served_scores
from ..data.popularity import log_popularity
from .index import KINDS, IndexParams, ItemIndex, auto_kind, recall_at

__all__ = ["KINDS", "IndexParams", "ItemIndex", "auto_kind", "recall_at", "ScoreLayout", "augment_items",
           "augment_queries", "log_popularity", "served_scores"]
