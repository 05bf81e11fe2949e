"""Serving: the one query code path (``query.Recommender``, used by ``twotower recommend`` and the
HTTP service), micro-batching (``batcher``) and the FastAPI application (``service.create_app``)."""
from .query import MAX_K, Query, Recommendation, Recommender, RequestError, UnknownItemError, UnknownUserError

__all__ = ["MAX_K", "Query", "Recommendation", "Recommender", "RequestError", "UnknownItemError", "UnknownUserError"]
