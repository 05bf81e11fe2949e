"""Hard negatives mined by the model itself (docs/design.md, "Mining rounds and the rank window").

Embed every item, retrieve each training user's top ``R`` by inner product, drop the user's own
positives, and keep the items ranked in ``[lo, hi)`` among the rest. The very top of that list is
skipped on purpose: in implicit feedback the highest-scored unlabelled items are often positives
nobody logged (false negatives), and training against them hurts; the window keeps items that are
hard without being likely positives (the practice of, e.g., Huang et al., "Embedding-based Retrieval
in Facebook Search", KDD 2020, who found ranks 101-500 worked better than the top).
"""
from __future__ import annotations

import numpy as np


def mine_negatives(user_vecs: np.ndarray, item_vecs: np.ndarray, users: np.ndarray, positives_indptr: np.ndarray,
                   positives_indices: np.ndarray, top_r: int, lo: int, hi: int, n_users: int,
                   block: int = 4096, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-user lists of mined negatives as a CSR ``(indptr [n_users + 1], indices)`` over user indices.

    ``user_vecs[b]`` is the query of user ``users[b]`` (scores are ``<user_vecs, item_vecs>``);
    ``positives_*`` is the CSR of each user's known positives (never returned). Exact search with
    FAISS (``IndexFlatIP``, blocked): mining runs a few times per training, and exactness keeps the
    rank window meaningful. Each kept item is a negative whose rank among the user's non-positive
    items is in ``[lo, hi)``.
    """
    import faiss

    if not 0 <= lo < hi <= top_r:
        raise ValueError(f"need 0 <= lo < hi <= top_r, got lo={lo}, hi={hi}, top_r={top_r}")
    users = np.asarray(users, dtype=np.int64)
    item_vecs = np.ascontiguousarray(item_vecs, dtype=np.float32)
    n_items = len(item_vecs)
    index = faiss.IndexFlatIP(item_vecs.shape[1])
    index.add(item_vecs)
    # Sorted keys user * n_items + item of every known positive: membership by binary search.
    lens = np.diff(positives_indptr)
    keys = np.sort(np.repeat(np.arange(len(lens), dtype=np.int64), lens) * n_items + positives_indices.astype(np.int64))
    # A user's positives can fill the top R: ask for R plus the largest positive count in the block.
    rows, cols = [], []
    for s in range(0, len(users), block):
        u = users[s : s + block]
        extra = int(lens[u].max()) if len(u) else 0
        r = min(n_items, top_r + extra)
        _, ids = index.search(np.ascontiguousarray(user_vecs[s : s + block], dtype=np.float32), r)
        q = u[:, None] * n_items + ids
        pos = np.searchsorted(keys, q).clip(max=max(len(keys) - 1, 0))
        is_pos = (keys[pos] == q) if len(keys) else np.zeros_like(q, dtype=bool)
        is_pos |= ids < 0
        rank = np.cumsum(~is_pos, axis=1) - 1   # rank among the user's non-positive items
        keep = ~is_pos & (rank >= lo) & (rank < hi)
        rows.append(np.broadcast_to(u[:, None], ids.shape)[keep])
        cols.append(ids[keep])
        if progress is not None:
            progress(len(u))
    rows = np.concatenate(rows) if rows else np.empty(0, np.int64)
    cols = np.concatenate(cols).astype(np.int64) if cols else np.empty(0, np.int64)
    order = np.argsort(rows, kind="stable")
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.add.at(indptr, rows + 1, 1)
    return np.cumsum(indptr), cols[order]
