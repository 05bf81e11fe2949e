"""Item-embedding export: ``g(j)`` for every item, in batches, saved as Parquet (raw ids and
vectors) and as a NumPy array; the learned item bias when the model has one."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import artifacts
from ..errors import ArtifactError

PARQUET = "item_embeddings.parquet"
NUMPY = "item_embeddings.npy"


@torch.no_grad()
def embed_all_items(model, batch: int = 16384, progress: bool = True) -> np.ndarray:
    """``g(j)`` for every item of ``model``, float32 ``[n_items, d]``, ``batch`` items at a time
    (with a progress bar unless ``progress`` is false)."""
    from tqdm.auto import tqdm

    model.eval()
    dev = next(model.parameters()).device
    n = int(model.n_items)
    out = np.empty((n, int(model.cfg.dim)), dtype=np.float32)
    with tqdm(total=n, desc="embedding items", unit="item", disable=not progress, leave=False) as bar:
        for s in range(0, n, batch):
            e = min(s + batch, n)
            out[s:e] = model.encode_items(torch.arange(s, e, device=dev)).float().cpu().numpy()
            bar.update(e - s)
    return out


def item_bias(model) -> np.ndarray | None:
    """The learned per-item bias ``b_j`` as float32 ``[n_items]``, or ``None`` when the model has
    none. Reads ``model.item_bias`` (a tensor, a parameter or an embedding module) when present."""
    b = getattr(model, "item_bias", None)
    if b is None:
        return None
    if isinstance(b, torch.nn.Module):
        b = getattr(b, "weight", None)
        if b is None:
            return None
    return b.detach().float().cpu().numpy().reshape(-1)


def save_embeddings(folder: str | Path, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Write ``item_embeddings.parquet`` (columns ``item``: raw id, ``vector``: fixed-size list of
    float32) and ``item_embeddings.npy`` (row ``i`` is vocabulary index ``i``) atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    ids = np.asarray(ids)
    id_col = pa.array(ids.astype(np.int64)) if ids.dtype.kind in "iu" else pa.array([str(x) for x in ids], pa.string())
    vec_col = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), d)
    table = pa.table({"item": id_col, "vector": vec_col})
    with artifacts.atomic_path(folder / PARQUET) as tmp:
        pq.write_table(table, tmp)
    artifacts.save_numpy(folder / NUMPY, vectors)


def load_embeddings(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Raw ids and vectors written by ``save_embeddings``."""
    import pyarrow.parquet as pq

    path = Path(folder) / PARQUET
    if not path.is_file():
        raise ArtifactError(f"{path}: missing. Build the index with `twotower index RUN`")
    t = pq.read_table(path)
    d = t.schema.field("vector").type.list_size
    vecs = t.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, d).astype(np.float32)
    return t.column("item").to_numpy(zero_copy_only=False), vecs
