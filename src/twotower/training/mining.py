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


def round_window(lo: int, hi: int, scale: float, round_: int) -> tuple[int, int]:
    """The rank window of mining round ``round_`` (1-based) under the curriculum ``mining.window_scale``:
    ``[lo s^(r-1), hi s^(r-1))``, rounded, at least one rank wide. ``s < 1`` moves the window toward the
    top round after round: easier negatives first, harder ones once the model can tell them apart."""
    f = float(scale) ** max(int(round_) - 1, 0)
    a = int(round(lo * f))
    return a, max(a + 1, int(round(hi * f)))


def content_queries(item_content: np.ndarray, users: np.ndarray, history_indptr: np.ndarray,
                    history_indices: np.ndarray) -> np.ndarray:
    """``[len(users), d]``: each user as the L2-normalised mean of its items' content vectors (the item
    tower's feature part, ``mining.source = "content"``). A user without items gets zeros."""
    users = np.asarray(users, dtype=np.int64)
    lens = history_indptr[users + 1] - history_indptr[users]
    rows = np.repeat(np.arange(len(users)), lens)
    flat = np.repeat(history_indptr[users] - np.r_[0, np.cumsum(lens)[:-1]], lens) + np.arange(lens.sum())
    q = np.zeros((len(users), item_content.shape[1]), dtype=np.float64)
    np.add.at(q, rows, item_content[history_indices[flat]].astype(np.float64))
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    return (q / np.maximum(norm, 1e-12)).astype(np.float32)


def cooccurrence_scores(history_indptr: np.ndarray, history_indices: np.ndarray, n_items: int, users: np.ndarray,
                        items: np.ndarray, block: int = 512) -> np.ndarray:
    """For each pair ``(users[k], items[k])``, how strongly item ``j`` co-occurs with user ``u``'s items::

        score(u, j) = sum_{i in I_u} cos(i, j),    cos(i, j) = |U_i & U_j| / sqrt(|U_i| |U_j|)

    the item-item cosine of the interaction matrix ``X`` (users x items), summed over the user's
    training items ``I_u`` (``U_i``: the users of item ``i``): an item-based collaborative filter's
    score (Sarwar et al., WWW 2001). As matrices, ``S = X D^-1/2 X^T X D^-1/2`` with ``D`` the item
    counts, computed for ``block`` users at a time as two sparse-dense products (no item-item matrix
    is stored) and read at the pairs. ``users`` must be sorted (as ``mine_negatives``' CSR expands).
    """
    import torch

    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    out = np.zeros(len(users), dtype=np.float32)
    if len(users) == 0:
        return out
    n_users = len(history_indptr) - 1
    lens = np.diff(history_indptr)
    rows = np.repeat(np.arange(n_users), lens)
    deg = np.bincount(history_indices, minlength=n_items).astype(np.float32)
    inv_sqrt = torch.from_numpy(1.0 / np.sqrt(np.maximum(deg, 1.0)))
    ones = torch.ones(len(history_indices), dtype=torch.float32)
    pairs = torch.from_numpy(np.stack([rows, history_indices]))
    x = torch.sparse_coo_tensor(pairs, ones, size=(n_users, n_items), check_invariants=False).coalesce()
    xt = torch.sparse_coo_tensor(pairs.flip(0), ones, size=(n_items, n_users), check_invariants=False).coalesce()
    distinct = np.unique(users)
    for s in range(0, len(distinct), block):
        u = distinct[s : s + block]
        y = torch.from_numpy(np.zeros((n_items, len(u)), dtype=np.float32))  # (X_block D^-1/2)^T
        ul = lens[u]
        col = np.repeat(np.arange(len(u)), ul)
        flat = np.repeat(history_indptr[u] - np.r_[0, np.cumsum(ul)[:-1]], ul) + np.arange(ul.sum())
        it = torch.from_numpy(history_indices[flat])
        y[it, torch.from_numpy(col)] = inv_sqrt[it]
        a_t = torch.sparse.mm(x, y)                       # [n_users, b]: (X_block D^-1/2 X^T)^T
        s_t = torch.sparse.mm(xt, a_t) * inv_sqrt[:, None]  # [n_items, b]: the scores, transposed
        sel = np.arange(np.searchsorted(users, u[0], side="left"), np.searchsorted(users, u[-1], side="right"))
        pos = np.searchsorted(u, users[sel])
        out[sel] = s_t[torch.from_numpy(items[sel]), torch.from_numpy(pos)].numpy()
    return out


def drop_cooccurring(indptr: np.ndarray, indices: np.ndarray, scores: np.ndarray, share: float
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per user, drop the ``share`` of the mined items with the highest co-occurrence ``scores`` (the
    likeliest unlabelled positives; ``floor(share * n)`` of a user's ``n``): ``(indptr, indices, kept)``,
    ``kept`` the boolean mask over the input entries."""
    n_users = len(indptr) - 1
    lens = np.diff(indptr)
    rows = np.repeat(np.arange(n_users), lens)
    order = np.lexsort((-scores, rows))                  # within a user, highest score first
    rank = np.empty(len(indices), dtype=np.int64)
    rank[order] = np.arange(len(indices)) - np.repeat(indptr[:-1], lens)
    kept = rank >= np.floor(share * lens[rows]).astype(np.int64)
    new_lens = np.bincount(rows[kept], minlength=n_users)
    return np.r_[0, np.cumsum(new_lens)].astype(np.int64), indices[kept], kept


def heldout_rate(indptr: np.ndarray, indices: np.ndarray, heldout_indptr: np.ndarray, heldout_indices: np.ndarray,
                 n_items: int) -> float:
    """The share of mined ``(user, item)`` pairs that are among the user's held-out items: mined
    negatives that are in fact positives nobody had logged yet (a measured false-negative rate; the
    held-out set is only a sample of the user's unlogged positives, so this is a lower bound)."""
    if len(indices) == 0:
        return 0.0
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    keys = rows * n_items + indices
    h_rows = np.repeat(np.arange(len(heldout_indptr) - 1), np.diff(heldout_indptr))
    truth = np.sort(h_rows * n_items + heldout_indices)
    if len(truth) == 0:
        return 0.0
    pos = np.searchsorted(truth, keys).clip(max=len(truth) - 1)
    return float((truth[pos] == keys).mean())
