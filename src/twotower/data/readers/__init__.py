"""Readers for interaction and feature files.

Every reader returns raw ids exactly as read: a column whose ids are all integer literals
(``0``, ``17``, ``-3``; no leading zeros, no decimals) becomes ``int64``, any other id column stays
``str``. Mapping raw ids to dense indices is the dataset's job, not the reader's; so is
deduplication.

Supported inputs
----------------
* ``read_interactions`` / ``read_features``: CSV or TSV with a header row (optionally gzip
  compressed, ``.gz``), or Parquet (``.parquet`` / ``.pq``).
* ``read_lightgcn_file`` / ``read_lightgcn``: the LightGCN text format, one line per user,
  ``user item item ...`` (a user with no items is allowed).
* ``read_movielens_100k``: the MovieLens 100K folder as GroupLens ships it.

Every problem with the input raises :class:`twotower.errors.DataError` naming the file, the place
(line, row, column, byte offset), what is wrong and what to do about it.

One module per concern: ``records`` (what the readers return), ``files`` (existence, gzip,
decoding, format and separator detection), ``table`` (a uniform view of a table's columns and the
messages that name a place in it), ``delimited`` (CSV/TSV), ``parquet``, ``columns`` (ids and
numbers from a column), ``tabular`` (interactions and features tables), ``lightgcn`` and
``movielens`` (the two named formats).
"""
from .lightgcn import read_lightgcn, read_lightgcn_file
from .movielens import read_movielens_100k
from .records import Features, Interactions
from .tabular import read_features, read_interactions

__all__ = [
    "Interactions",
    "Features",
    "read_interactions",
    "read_features",
    "read_movielens_100k",
    "read_lightgcn",
    "read_lightgcn_file",
]
