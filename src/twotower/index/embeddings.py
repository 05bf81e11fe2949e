"""Item-embedding export: ``g(j)`` for every item saved as Parquet (raw ids and vectors) and as a
NumPy array, in an index folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import artifacts

PARQUET = "item_embeddings.parquet"
NUMPY = "item_embeddings.npy"


def embedding_progress(total: int, progress: bool = True, desc: str = "embedding items"):
    """A progress bar over ``total`` items (a no-op one unless ``progress``): pass its ``update``
    as ``model.towers.embed_items``'s ``progress``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not progress, leave=False)


def embeddings_table(ids: np.ndarray, vectors: np.ndarray):
    """The Parquet layout of item embeddings (a ``pyarrow.Table``): columns ``item`` (raw id: int64,
    else string) and ``vector`` (fixed-size list of float32)."""
    import pyarrow as pa

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.asarray(ids)
    id_col = pa.array(ids.astype(np.int64)) if ids.dtype.kind in "iu" else pa.array([str(x) for x in ids], pa.string())
    vec_col = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    return pa.table({"item": id_col, "vector": vec_col})


def save_embeddings(folder: str | Path, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Write ``item_embeddings.parquet`` (``embeddings_table``) and ``item_embeddings.npy`` (row ``i``
    is vocabulary index ``i``) atomically."""
    import pyarrow.parquet as pq

    folder = Path(folder)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    with artifacts.atomic_path(folder / PARQUET) as tmp:
        pq.write_table(embeddings_table(ids, vectors), tmp)
    artifacts.save_numpy(folder / NUMPY, vectors)
