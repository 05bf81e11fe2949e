"""Item embeddings at scale: ``g(j)`` written in chunks as Parquet parts, and an index built from
the parts without holding every vector in memory at once.

Layout of a parts folder (default ``RUN/embeddings``)::

    part-00000.parquet   items [0, chunk) in vocabulary order: columns ``item`` (raw id) and
                         ``vector`` (fixed-size list of float32)
    part-00000.json      that part's record: its item range, row count, size, sha256, the weights' sha256
    ...
    embeddings.json      the manifest: every part in order, written once all parts exist

Part ``p`` holds vocabulary indices ``[p * chunk, (p + 1) * chunk)``, so parts can be computed by
independent jobs (``job`` of ``n_jobs`` writes the parts ``p`` with ``p % n_jobs == job``): the
job that completes the set writes the manifest. Every file is written atomically; a part whose
record matches the plan and whose file has the recorded size is kept, so an interrupted job
resumes where it stopped. Readers check each part's sha256 as they read it.

Building an index from the parts (``build_run_index_from_parts``) reads one part at a time: exact
and HNSW kinds add each part as it is read; the IVF kinds gather a uniform sample of rows across all
parts while reading, train k-means on it, then add the lists part by part. The raw embeddings go
to ``item_embeddings.npy`` of the index folder through a memory map (what ``load_run_index``, and so
``twotower serve`` and ``Recommender``, read), the augmented vectors (``model.scoring.ScoreLayout``) to a
temporary memory map used for tuning and the recall measurement, then removed.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import artifacts
from ..errors import ArtifactError, ConfigError
from ..model.scoring import ScoreLayout
from ..model.towers import embed_items
from .embeddings import NUMPY, PARQUET, embedding_progress, embeddings_table
from .index import IndexParams, ItemIndex, new_faiss_index, train_size, with_search_defaults, zero_pad
from .run_index import popularity_denominator, tune_measure_save

FORMAT = "twotower-embedding-parts/1"
MANIFEST = "embeddings.json"
DEFAULT_CHUNK = 1_000_000


def part_name(p: int) -> str:
    return f"part-{p:05d}.parquet"


def record_name(p: int) -> str:
    return f"part-{p:05d}.json"


def plan(n_items: int, chunk_size: int) -> list[tuple[int, int]]:
    """The item range ``[start, stop)`` of every part."""
    if chunk_size < 1:
        raise ConfigError(f"chunk size must be a positive integer, got {chunk_size}")
    return [(s, min(s + chunk_size, n_items)) for s in range(0, n_items, chunk_size)]


def parse_job(text: str) -> tuple[int, int]:
    """``"I/N"`` (job ``I`` of ``N``, counted from 0) as ``(I, N)``."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ConfigError(f"--job {text!r}: write it as I/N, e.g. 0/4 for the first of four jobs") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--job {text!r}: need 0 <= I < N, e.g. 0/4 ... 3/4 for four jobs")
    return i, n


@dataclass
class EmbeddingPart:
    """One part read back: its number, item range, raw ids and float32 vectors ``[stop - start, dim]``."""

    number: int
    start: int
    stop: int
    ids: np.ndarray
    vectors: np.ndarray


# ---- writing ------------------------------------------------------------------------------------
def _write_part(path: Path, ids: np.ndarray, vectors: np.ndarray) -> tuple[int, str]:
    """Write one part atomically (``embeddings.embeddings_table``); returns its size in bytes and sha256."""
    import pyarrow.parquet as pq

    with artifacts.atomic_path(path) as tmp:
        pq.write_table(embeddings_table(ids, vectors), tmp)
        size, digest = tmp.stat().st_size, artifacts.sha256_file(tmp)
    return size, digest


def _record_ok(folder: Path, p: int, rec: dict | None, expect: dict) -> bool:
    if not rec or any(rec.get(k) != v for k, v in expect.items()):
        return False
    f = folder / rec.get("file", "")
    return f.is_file() and f.stat().st_size == rec.get("bytes")


def _read_record(folder: Path, p: int) -> dict | None:
    path = folder / record_name(p)
    if not path.is_file():
        return None
    try:
        return artifacts.read_json(path)
    except ArtifactError:
        return None  # a torn or foreign record: the part is rewritten


@torch.no_grad()
def embed_to_parts(model, ids: np.ndarray, folder: str | Path, chunk_size: int = DEFAULT_CHUNK, batch: int = 16384,
                   job: int = 0, n_jobs: int = 1, model_sha256: str | None = None, overwrite: bool = False,
                   progress: bool = True, log=None) -> dict:
    """Write ``g(j)`` of every item of ``model`` (raw ids ``ids``, in vocabulary order) as Parquet
    parts of ``chunk_size`` items into ``folder``; at most one part's vectors are in memory at a
    time. This job writes the parts ``p % n_jobs == job`` (parts already written with the same
    plan and weights are kept unless ``overwrite``); the manifest is written once every part exists.
    Returns ``{"written": [...], "kept": [...], "missing": [...], "manifest": dict | None}``."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, d = int(model.n_items), int(model.cfg.dim)
    ids = np.asarray(ids)
    if len(ids) != n:
        raise ArtifactError(f"{len(ids):,} item ids for a model of {n:,} items")
    if batch < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch}")
    parts = plan(n, chunk_size)
    mine = [p for p in range(len(parts)) if p % n_jobs == job]
    expect = lambda p: {"start": parts[p][0], "stop": parts[p][1], "dim": d, "n_items": n,  # noqa: E731
                        "chunk_size": int(chunk_size), "model_sha256": model_sha256}
    old = folder / MANIFEST
    if old.is_file():  # a manifest of another plan or other weights would describe parts about to change
        try:
            m = artifacts.read_json(old)
            stale = overwrite or (m.get("n_items"), m.get("dim"), m.get("chunk_size"), m.get("model_sha256")) != \
                (n, d, int(chunk_size), model_sha256)
        except ArtifactError:
            stale = True
        if stale:
            old.unlink(missing_ok=True)
    todo = [p for p in mine if overwrite or not _record_ok(folder, p, _read_record(folder, p), expect(p))]
    kept = sorted(set(mine) - set(todo))
    written = []
    with embedding_progress(sum(parts[p][1] - parts[p][0] for p in todo), progress) as bar:
        for p in todo:
            t0 = time.perf_counter()
            s, e = parts[p]
            out = embed_items(model, s, e, batch, bar.update).float().cpu().numpy()
            size, digest = _write_part(folder / part_name(p), ids[s:e], out)
            del out
            artifacts.write_json(folder / record_name(p), {
                "part": p, "file": part_name(p), "rows": e - s, "bytes": size, "sha256": digest,
                "seconds": time.perf_counter() - t0, **expect(p)})
            written.append(p)
    manifest = finalize_parts(folder, n, d, chunk_size, model_sha256, ids_integer=ids.dtype.kind in "iu")
    missing = [] if manifest else [p for p in range(len(parts))
                                   if not _record_ok(folder, p, _read_record(folder, p), expect(p))]
    log(f"embed: wrote {len(written)} part(s), kept {len(kept)} already written"
        + (f"; {folder / MANIFEST} lists all {len(parts)} parts ({n:,} items x {d} dims)" if manifest else
           f"; {len(missing)} of {len(parts)} parts still missing (other jobs), no manifest yet"))
    return {"written": written, "kept": kept, "missing": missing, "manifest": manifest}


def finalize_parts(folder: str | Path, n_items: int, dim: int, chunk_size: int, model_sha256: str | None,
                   ids_integer: bool = True) -> dict | None:
    """Write ``embeddings.json`` when every part of the plan is present and matches it; returns the
    manifest, or ``None`` while parts are missing."""
    folder = Path(folder)
    parts = plan(n_items, chunk_size)
    recs = []
    for p, (s, e) in enumerate(parts):
        rec = _read_record(folder, p)
        if not _record_ok(folder, p, rec, {"start": s, "stop": e, "dim": dim, "n_items": n_items,
                                           "chunk_size": int(chunk_size), "model_sha256": model_sha256}):
            return None
        recs.append({k: rec[k] for k in ("file", "start", "stop", "rows", "bytes", "sha256")})
    manifest = {"format": FORMAT, "n_items": n_items, "dim": dim, "chunk_size": int(chunk_size), "n_parts": len(parts),
                "model_sha256": model_sha256, "id_type": "int64" if ids_integer else "string",
                "bytes": sum(r["bytes"] for r in recs), "parts": recs, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    artifacts.write_json(folder / MANIFEST, manifest)
    return manifest


def embed_run_to_parts(run, folder: str | Path | None = None, chunk_size: int = DEFAULT_CHUNK, batch: int = 16384,
                       job: int = 0, n_jobs: int = 1, device: str | None = None, overwrite: bool = False,
                       progress: bool = True, log=None) -> dict:
    """``embed_to_parts`` for a trained run, into ``folder`` (default ``RUN/embeddings``), on
    ``device`` (default: where the run's model is, the CPU)."""
    folder = Path(folder) if folder is not None else run.dir.embeddings_dir
    if device:
        run.model.to(device)
    return embed_to_parts(run.model, run.items.ids, folder, chunk_size, batch, job, n_jobs, run.dir.model_digest(),
                          overwrite, progress, log)


# ---- reading ------------------------------------------------------------------------------------
def read_manifest(folder: str | Path) -> dict:
    """The manifest of a complete parts folder (an error naming the fix otherwise)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        partial = sorted(folder.glob("part-*.json")) if folder.is_dir() else []
        hint = (f" ({len(partial)} part record(s) found: some jobs have not finished)" if partial else "")
        raise ArtifactError(f"{path}: missing{hint}. Write the parts with `twotower embed RUN --out {folder}` "
                            "(every --job I/N of the set)")
    m = artifacts.read_json(path)
    if m.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a twotower embedding-parts manifest (format {m.get('format')!r})")
    return m


def _same_ids(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind in "iu" and b.dtype.kind in "iu":
        return np.array_equal(a, b)
    return len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a.tolist(), b.tolist()))


def iter_parts(folder: str | Path, manifest: dict | None = None, verify: bool = True):
    """Yield every part in item order as ``EmbeddingPart`` (one in memory at a time), each checked
    against its sha256 in the manifest when ``verify``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    d = int(manifest["dim"])
    for p, rec in enumerate(manifest["parts"]):
        path = folder / rec["file"]
        if not path.is_file():
            raise ArtifactError(f"{path}: missing. Write it again with `twotower embed RUN --out {folder}`")
        data = path.read_bytes()
        if verify and hashlib.sha256(data).hexdigest() != rec["sha256"]:
            raise ArtifactError(f"{path}: does not match the sha256 in {MANIFEST} (corrupted, truncated or from another "
                                f"run). Write it again with `twotower embed RUN --out {folder}`")
        t = pq.read_table(pa.BufferReader(data))
        del data
        vecs = t.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, d).astype(np.float32, copy=False)
        if len(vecs) != rec["stop"] - rec["start"]:
            raise ArtifactError(f"{path}: {len(vecs)} rows where {MANIFEST} says {rec['stop'] - rec['start']}")
        yield EmbeddingPart(p, int(rec["start"]), int(rec["stop"]), t.column("item").to_numpy(zero_copy_only=False), vecs)


def check_parts_match_run(manifest: dict, run, folder: str | Path) -> None:
    """Refuse parts embedded from another run or other weights."""
    if manifest["n_items"] != len(run.items) or manifest["dim"] != int(run.model.cfg.dim):
        raise ArtifactError(f"{folder}: parts hold {manifest['n_items']:,} items x {manifest['dim']} dims, the run "
                            f"{run.path} has {len(run.items):,} x {run.model.cfg.dim}: embedded from another run. "
                            f"Write them with `twotower embed {run.path} --out {folder}`")
    digest = run.dir.model_digest()
    if manifest.get("model_sha256") and digest and manifest["model_sha256"] != digest:
        raise ArtifactError(f"{folder}: embedded with other weights than {run.dir.weights_path}. "
                            f"Write them again with `twotower embed {run.path} --out {folder} --overwrite`")


# ---- the index from parts -----------------------------------------------------------------------
def build_run_index_from_parts(run, parts_dir: str | Path, params: IndexParams, folder: str | Path | None = None,
                               sample: int = 1000, seed: int = 0, progress: bool = True, log=None) -> ItemIndex:
    """Build ``run``'s index of ``params`` from the embedding parts in ``parts_dir`` into ``folder``
    (default ``RUN/index``), one part in memory at a time (module docstring), then tune, measure and
    save it as ``build_run_index`` does: ``load_run_index`` (``twotower serve``, ``Recommender``)
    reads it like any other. IVF kinds train on a uniform random sample of rows of all parts
    (``params.train_size``, default 64 per list)."""
    from tqdm.auto import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    parts_dir = Path(parts_dir)
    folder = Path(folder) if folder is not None else run.dir.index_dir
    manifest = read_manifest(parts_dir)
    check_parts_match_run(manifest, run, parts_dir)
    n, d = int(manifest["n_items"]), int(manifest["dim"])
    log_p = run.log_popularity
    layout, bias = ScoreLayout.of(run.model, log_p)
    width = d + layout.width
    p = params.resolved(n)
    ivf = p.kind in ("ivf", "ivfpq")
    t0 = time.perf_counter()
    index = new_faiss_index(p, width)
    m = train_size(p, n) if ivf else 0
    rows = (np.sort(np.random.default_rng(seed).choice(n, m, replace=False)) if m < n else np.arange(n)) if ivf else None
    train = np.empty((m, width), np.float32) if ivf else None
    folder.mkdir(parents=True, exist_ok=True)
    fd, aug_path = tempfile.mkstemp(prefix=".augmented.", suffix=".npy.tmp", dir=folder)
    os.close(fd)
    try:
        with artifacts.atomic_path(folder / NUMPY) as raw_path:
            raw = np.lib.format.open_memmap(raw_path, mode="w+", dtype=np.float32, shape=(n, d))
            aug = np.lib.format.open_memmap(aug_path, mode="w+", dtype=np.float32, shape=(n, width))
            with tqdm(total=n, desc="reading parts", unit="item", disable=not progress, leave=False) as bar:
                for part in iter_parts(parts_dir, manifest):
                    s, e = part.start, part.stop
                    if not _same_ids(part.ids, run.items.ids[s:e]):
                        raise ArtifactError(f"{parts_dir / manifest['parts'][part.number]['file']}: its item ids are not "
                                            f"the run's items {s}..{e - 1}. Write the parts again with `twotower embed {run.path}`")
                    raw[s:e] = part.vectors
                    a = layout.items(part.vectors, log_p[s:e], None if bias is None else bias[s:e])
                    aug[s:e] = a
                    if ivf:
                        lo, hi = np.searchsorted(rows, [s, e])
                        train[lo:hi] = a[rows[lo:hi] - s]
                    else:
                        index.add(a)
                    bar.update(e - s)
            raw.flush()
            del raw
        read_s = time.perf_counter() - t0
        if ivf:
            index.train(zero_pad(train, index.d))
            del train
            step = int(manifest["chunk_size"])
            with tqdm(total=n, desc="adding to lists", unit="item", disable=not progress, leave=False) as bar:
                for s in range(0, n, step):
                    index.add(zero_pad(np.ascontiguousarray(aug[s : s + step]), index.d))
                    bar.update(min(step, n - s))
        p = with_search_defaults(p)
        idx = ItemIndex(index, p, layout, aug)
        idx.info["build_seconds"] = time.perf_counter() - t0
        log(f"index: {p.kind} over {n:,} items x {idx.dim} dims from {manifest['n_parts']} part(s) in "
            f"{idx.info['build_seconds']:.1f}s" + (f" (k-means on {m:,} sampled items)" if ivf else ""))
        (folder / PARQUET).unlink(missing_ok=True)  # a whole-catalog export from an earlier in-memory build would be stale
        extra = {"model_sha256": run.dir.model_digest(), "read_parts_seconds": read_s,
                 "popularity_denominator": popularity_denominator(run.item_counts),
                 "from_parts": {"dir": str(parts_dir), "n_parts": manifest["n_parts"], "chunk_size": manifest["chunk_size"],
                                "train_sample": m}}
        tune = p.kind == "hnsw" and params.ef_search is None or ivf and params.nprobe is None
        return tune_measure_save(run, idx, folder, tune, sample, seed, log, extra)
    finally:
        Path(aug_path).unlink(missing_ok=True)  # the map stays readable while idx holds it (POSIX)
