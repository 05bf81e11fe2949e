"""Item embeddings in Parquet parts and the index built from them, on a real MovieLens 100K run
(1,682 items): parts cover every item once and equal the in-memory embeddings; parallel jobs and
interrupted jobs end with the same parts; damaged or foreign parts are refused; an exact index
built from parts answers as the in-memory one, approximate ones reach high recall; both load
through the serving path."""
import json
import shutil
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from _trained import tiny_run
from twotower.errors import ArtifactError, ConfigError
from twotower.index import IndexParams, recall_at
from twotower.model.towers import embed_items
from twotower.index.parts import (build_run_index_from_parts, embed_run_to_parts, embed_to_parts, iter_parts, parse_job,
                                  plan, read_manifest)
from twotower.index.run_index import build_run_index, load_run_index, sample_users, user_vectors

QUIET = {"progress": False, "log": lambda m: None}
CHUNK = 500  # 1,682 items -> 4 parts


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    from twotower.run import Run

    return Run(tiny_run(tmp_path_factory, data_dir))


@pytest.fixture(scope="module")
def parts(run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("parts") / "embeddings"
    res = embed_run_to_parts(run, folder, chunk_size=CHUNK, **QUIET)
    return folder, res


@pytest.fixture(scope="module")
def queries(run):
    """Augmented-ready user vectors of 200 real users."""
    return user_vectors(run, sample_users(run, 200, seed=3))


def _read_all(folder):
    got = list(iter_parts(folder))
    return got, np.concatenate([p.ids for p in got]), np.concatenate([p.vectors for p in got])


# ---- the parts ------------------------------------------------------------------------------------
def test_parts_cover_every_item_once_and_equal_the_in_memory_embeddings(run, parts):
    import pyarrow.parquet as pq

    folder, res = parts
    n = len(run.items)
    man = read_manifest(folder)
    assert n == 1682 and man["n_parts"] == 4 and res["written"] == [0, 1, 2, 3] and res["missing"] == []
    assert [(r["start"], r["stop"]) for r in man["parts"]] == plan(n, CHUNK)
    assert [pq.read_metadata(folder / r["file"]).num_rows for r in man["parts"]] == [500, 500, 500, 182]
    got, ids, vecs = _read_all(folder)
    assert [p.number for p in got] == [0, 1, 2, 3]
    assert len(ids) == n and len(np.unique(ids)) == n and ids.tolist() == run.items.ids.tolist()
    np.testing.assert_allclose(vecs, embed_items(run.model).numpy(), atol=1e-6)
    np.testing.assert_allclose(vecs, run.item_vectors.numpy(), atol=1e-6)
    assert not list(folder.glob(".*"))  # no temporary files left behind


def test_embedding_holds_one_part_in_memory_not_the_catalog(tmp_path):
    """A 200,000 x 32 catalog (25.6 MB of float32) embedded in parts of 8,000 items: the NumPy
    memory in use at the peak is a small fraction of the whole matrix."""
    class Stub(torch.nn.Module):
        def __init__(self, n, d):
            super().__init__()
            self.n_items, self.cfg, self.w = n, SimpleNamespace(dim=d), torch.nn.Parameter(torch.ones(d))

        def encode_items(self, items):
            return torch.sin(items[:, None].float() * self.w)

    n, d = 200_000, 32
    model, ids = Stub(n, d), np.arange(n) * 7
    tracemalloc.start()
    try:
        res = embed_to_parts(model, ids, tmp_path, chunk_size=8000, batch=2000, **QUIET)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res["manifest"]["n_parts"] == 25
    assert peak < n * d * 4 / 5, f"peak {peak:,} bytes"
    _, got, vecs = _read_all(tmp_path)
    assert got.tolist() == ids.tolist()
    np.testing.assert_array_equal(vecs, model.encode_items(torch.arange(n)).detach().numpy())


def test_parallel_jobs_write_disjoint_parts_and_the_last_one_writes_the_manifest(run, parts, tmp_path):
    folder = tmp_path / "jobs"
    r = embed_run_to_parts(run, folder, chunk_size=CHUNK, job=1, n_jobs=3, **QUIET)
    assert r["written"] == [1] and r["manifest"] is None and r["missing"] == [0, 2, 3]
    with pytest.raises(ArtifactError, match="some jobs have not finished"):
        read_manifest(folder)
    r = embed_run_to_parts(run, folder, chunk_size=CHUNK, job=0, n_jobs=3, **QUIET)
    assert r["written"] == [0, 3] and r["manifest"] is None and r["missing"] == [2]
    r = embed_run_to_parts(run, folder, chunk_size=CHUNK, job=2, n_jobs=3, **QUIET)
    assert r["written"] == [2] and r["manifest"] is not None
    one_job = read_manifest(parts[0])["parts"]
    assert [p["sha256"] for p in read_manifest(folder)["parts"]] == [p["sha256"] for p in one_job]  # the same bytes


def test_a_rerun_keeps_written_parts_and_rewrites_damaged_or_replanned_ones(run, tmp_path):
    folder = tmp_path / "resume"
    embed_run_to_parts(run, folder, chunk_size=700, **QUIET)
    (folder / "part-00001.parquet").write_bytes(b"torn")  # as if killed mid-write of a non-atomic writer
    r = embed_run_to_parts(run, folder, chunk_size=700, **QUIET)
    assert r["written"] == [1] and r["kept"] == [0, 2] and r["manifest"]["n_parts"] == 3
    r = embed_run_to_parts(run, folder, chunk_size=700, **QUIET)
    assert r["written"] == [] and r["kept"] == [0, 1, 2]
    r = embed_run_to_parts(run, folder, chunk_size=1000, **QUIET)  # another plan: every part is rewritten
    assert r["written"] == [0, 1] and read_manifest(folder)["n_parts"] == 2
    _, ids, _ = _read_all(folder)
    assert ids.tolist() == run.items.ids.tolist()


def test_damaged_or_foreign_parts_are_refused(run, parts, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(parts[0], folder)
    f = folder / "part-00002.parquet"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, different bytes: only the sha256 can tell
    f.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="part-00002.parquet: does not match the sha256"):
        list(iter_parts(folder))
    with pytest.raises(ArtifactError, match="sha256"):
        build_run_index_from_parts(run, folder, IndexParams(kind="flat"), tmp_path / "idx", sample=50, **QUIET)
    shutil.copy(parts[0] / "part-00002.parquet", f)
    man = json.loads((folder / "embeddings.json").read_text())
    (folder / "embeddings.json").write_text(json.dumps({**man, "model_sha256": "0" * 64}))
    with pytest.raises(ArtifactError, match="other weights"):
        build_run_index_from_parts(run, folder, IndexParams(kind="flat"), tmp_path / "idx", sample=50, **QUIET)
    (folder / "embeddings.json").write_text(json.dumps({**man, "n_items": 99}))
    with pytest.raises(ArtifactError, match="another run"):
        build_run_index_from_parts(run, folder, IndexParams(kind="flat"), tmp_path / "idx", sample=50, **QUIET)
    with pytest.raises(ArtifactError, match="twotower embed"):
        read_manifest(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="I/N"):
        parse_job("2")
    with pytest.raises(ConfigError, match="0 <= I < N"):
        parse_job("4/4")


# ---- the index from parts -------------------------------------------------------------------------
def test_exact_index_from_parts_answers_as_the_in_memory_one_and_serves(run, parts, queries, tmp_path, monkeypatch):
    from twotower.serving.query import Query, Recommender

    mem = build_run_index(run, IndexParams(kind="flat"), tmp_path / "mem", sample=100, **QUIET)

    def no_item_embedding(*a, **k):
        raise AssertionError("building from parts must not embed items")

    with monkeypatch.context() as mp:
        mp.setattr(run.model, "encode_items", no_item_embedding)
        fp = build_run_index_from_parts(run, parts[0], IndexParams(kind="flat"), tmp_path / "fp", sample=100, **QUIET)
    assert fp.kind == "flat" and fp.layout == mem.layout and fp.n_items == mem.n_items
    for alpha in (0.0, 1.0):
        q = mem.layout.queries(queries, alpha)
        (si, ii), (sm, im) = fp.search(q, 50), mem.search(q, 50)
        assert (ii == im).mean() > 0.999  # the same vectors up to float rounding: a near-tie may swap
        np.testing.assert_allclose(si, sm, rtol=1e-5, atol=1e-5)
    back = load_run_index(run, tmp_path / "fp", required=True)  # the serving load path
    assert back.kind == "flat" and back.info["from_parts"]["n_parts"] == 4
    np.testing.assert_allclose(np.load(tmp_path / "fp" / "item_embeddings.npy"), _read_all(parts[0])[2])
    a = Recommender.load(run, tmp_path / "fp").recommend(Query(user=196, k=10, alpha=0.5))
    b = Recommender.load(run, tmp_path / "mem").recommend(Query(user=196, k=10, alpha=0.5))
    assert a.items.tolist() == b.items.tolist()
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
    assert not list((tmp_path / "fp").glob(".*"))  # the temporary augmented map is gone


@pytest.mark.parametrize("kind,extra", [("ivf", {"nlist": 16, "train_size": 800}),
                                        ("ivfpq", {"nlist": 16, "train_size": 800, "pq_m": 6, "refine": 8}),
                                        ("hnsw", {})])
def test_approximate_index_from_parts_reaches_high_recall_and_serves(run, parts, queries, tmp_path, kind, extra):
    """High recall against exact search, and the same quality as the in-memory build of the same
    parameters (IVF: the same k-means sample, so the same lists and answers), popularity correction
    included; the saved index loads through the serving path."""
    from twotower.serving.query import Query, Recommender

    folder = tmp_path / kind
    idx = build_run_index_from_parts(run, parts[0], IndexParams(kind=kind, **extra), folder, sample=400, **QUIET)
    mem = build_run_index(run, IndexParams(kind=kind, **extra), tmp_path / "mem", sample=400, **QUIET)
    meta = json.loads((folder / "index.json").read_text())
    assert meta["kind"] == kind and meta["from_parts"]["n_parts"] == 4
    assert meta["from_parts"]["train_sample"] == (800 if kind != "hnsw" else 0)  # k-means on a sample of all parts
    assert meta["measured"]["recall@10"] >= 0.95 and meta["measured"]["recall@100"] >= 0.95
    assert (idx.params.nprobe, idx.params.ef_search) == (mem.params.nprobe, mem.params.ef_search)
    for alpha in (0.0, 1.0):  # on other users than the build measured on
        q = idx.layout.queries(queries, alpha)
        _, exact = idx.exact_search(q, 100)
        (_, ids), (_, mem_ids) = idx.search(q, 100), mem.search(q, 100)
        if alpha == 0.0:
            assert recall_at(ids, exact, 10) >= 0.9 and recall_at(ids, exact, 100) >= 0.9
        assert recall_at(ids, exact, 100) >= recall_at(mem_ids, exact, 100) - 0.03
        if kind != "hnsw":
            assert (ids == mem_ids).mean() > 0.99
    back = load_run_index(run, folder, required=True)
    q = idx.layout.queries(queries, 0.5)
    assert back.kind == kind and (back.search(q, 20)[1] == idx.search(q, 20)[1]).all()
    ann = Recommender.load(run, folder).recommend(Query(user=196, k=10))
    exact = Recommender.load(run).recommend(Query(user=196, k=10))
    assert len(set(ann.items.tolist()) & set(exact.items.tolist())) >= 9


def test_cli_embed_then_index_from_parts(run, tmp_path, capsys):
    from twotower.cli import main

    emb, out = tmp_path / "emb", tmp_path / "idx"
    assert main(["embed", str(run.path), "--out", str(emb), "--chunk-size", "600", "--quiet"]) == 0
    assert "1,682 items x 16 dims in 3 part(s)" in capsys.readouterr().out
    assert main(["index", str(run.path), "--from-parts", str(emb), "--kind", "ivf", "--nlist", "8", "--out", str(out),
                 "--quiet", "--sample-users", "200"]) == 0
    printed = capsys.readouterr().out
    assert "from 3 part(s)" in printed and "recall@10" in printed
    assert json.loads((out / "index.json").read_text())["kind"] == "ivf"
    assert main(["embed", str(run.path), "--out", str(emb), "--job", "2/2"]) == 2
    assert "0 <= I < N" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    helptext = capsys.readouterr().out
    assert "--job" in helptext and "--from-parts" in helptext and "embeddings.json" in helptext
