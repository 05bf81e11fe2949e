"""Index updates without a rebuild: items added, vectors replaced, items removed, in every kind,
against exact search over the items the index should hold; HNSW / IVF-PQ rebuilt past the dead
share; saved and loaded back (tampering refused); a run's index updated through the run (items
admitted to the run since the build, their popularity laid out exactly), served at once; the CLI."""
import json
import shutil

import numpy as np
import pytest

from _mf_runs import clustered, write_mf_run
from twotower.errors import ArtifactError, ConfigError
from twotower.index import IndexParams, ItemIndex, ScoreLayout, log_popularity, recall_at

KINDS = [("flat", {}), ("ivf", {"nlist": 64, "nprobe": 16}), ("hnsw", {"M": 16, "ef_search": 64}),
         ("ivfpq", {"nlist": 64, "nprobe": 16, "pq_m": 8, "refine": 8})]


def _catalog(n=6000, d=16, q=200, seed=0):
    return clustered(n, d, q, seed)


def _brute(q, vectors, gone, k):
    s = q.astype(np.float64) @ vectors.T.astype(np.float64)
    s[:, gone] = -np.inf
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_hand_computed_flat_update():
    """Three items in 2-d, then: item 0 removed, item 1's vector replaced, item 3 added (id 2 stays)."""
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
    idx = ItemIndex.build(x, IndexParams(kind="flat"), ScoreLayout(1.0))
    q = np.array([[1.0, 0.1]], np.float32)
    assert idx.search(q, 3)[1].tolist() == [[0, 2, 1]]
    out = idx.update(add=(np.array([3]), np.array([[0.8, -0.6]], np.float32)),
                     replace=(np.array([1]), np.array([[-1.0, 0.0]], np.float32)), remove=np.array([0]))
    assert (out["added"], out["replaced"], out["removed"], idx.size, idx.n_items) == (1, 1, 1, 3, 4)
    inner, ids = idx.search(q, 5)  # scores 0.68 (item 2), 0.74 (item 3), -1 (item 1); item 0 is gone
    assert ids.tolist() == [[3, 2, 1]]
    np.testing.assert_allclose(inner, [[0.74, 0.68, -1.0]], atol=1e-6)
    assert idx.exact_search(q, 5)[1].tolist() == [[3, 2, 1]]
    assert idx.search(q, 5, subset=np.array([0, 1]))[1].tolist() == [[1]]  # a filter cannot bring item 0 back
    assert idx.contains([0, 1, 2, 3, 4]).tolist() == [False, True, True, True, False]


@pytest.mark.parametrize("kind,params", KINDS)
@pytest.mark.slow
def test_add_replace_remove_against_exact_search(kind, params):
    x, users = _catalog()
    base, new = 5000, np.arange(5000, 6000)
    rng = np.random.default_rng(1)
    idx = ItemIndex.build(x[:base], IndexParams(kind=kind, **params), ScoreLayout(1.0))
    removed = rng.choice(base, 250, replace=False)
    changed = rng.choice(np.setdiff1d(np.arange(base), removed), 100, replace=False)
    moved = rng.normal(size=(100, x.shape[1])).astype(np.float32)  # new directions for the changed items
    moved /= np.linalg.norm(moved, axis=1, keepdims=True)
    idx.update(add=(new, x[new]), replace=(changed, moved), remove=removed)
    truth = x.copy()
    truth[changed] = moved
    want = _brute(users, truth, removed, 100)
    inner, got = idx.search(users, 100)
    assert not np.isin(got, removed).any()
    assert recall_at(got, want, 100) > (0.999 if kind == "flat" else 0.85)
    # every returned score is the inner product with the item's current vector (replacements included)
    ok = got >= 0
    np.testing.assert_allclose(inner[ok], np.einsum("bd,bkd->bk", users, truth[np.maximum(got, 0)])[ok], atol=2e-3)
    assert np.isin(new, got).any() and np.isin(changed, got).any()
    # an added item is found by its own direction, a replaced item by its new one, not by its old one
    _, top = idx.search(np.vstack([x[new[:20]], moved[:20]]), 1)
    assert (top[:20, 0] == new[:20]).mean() >= 0.9 and (top[20:, 0] == changed[:20]).mean() >= 0.9
    # a fresh build over the same items reaches about the same recall
    live = np.setdiff1d(np.arange(len(x)), removed)
    fresh = ItemIndex.build(truth[live], IndexParams(kind=kind, **params), ScoreLayout(1.0))
    assert abs(recall_at(got, want, 100) - recall_at(live[fresh.search(users, 100)[1]], want, 100)) < 0.03
    # filtered search sees only the present items of the subset, through the index or exactly
    subset = np.sort(np.concatenate([removed[:50], new[:500], np.arange(1000)]))
    for limit in (10, 100_000):  # through a FAISS selector, then exactly
        idx.params.exact_subset_max = limit
        _, ids = idx.search(users[:20], 30, subset=subset)
        assert np.isin(ids[ids >= 0], subset).all() and not np.isin(ids, removed).any()


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_kinds_that_cannot_delete_rebuild_past_the_dead_share(kind):
    x, users = _catalog(n=3000)
    params = dict(KINDS)[kind]
    idx = ItemIndex.build(x, IndexParams(kind=kind, rebuild_share=0.25, **params), ScoreLayout(1.0))
    first = idx.update(remove=np.arange(0, 600))  # 20 % dead: kept, filtered at search
    assert not first["rebuilt"] and idx.dead_entries == 600 and idx.faiss_index.ntotal == 3000
    second = idx.update(replace=(np.arange(600, 1000), x[600:1000]))  # 1,000 of 3,400 entries dead: rebuilt
    assert second["rebuilt"] and idx.dead_entries == 0 and idx.faiss_index.ntotal == idx.size == 2400
    assert idx.labels.tolist() == list(range(600, 3000))
    _, got = idx.search(users, 50)
    assert not np.isin(got, np.arange(600)).any()
    assert recall_at(got, _brute(users, x, np.arange(600), 50), 50) > 0.85


def test_bad_updates_are_refused_and_change_nothing():
    x, _ = _catalog(n=500)
    idx = ItemIndex.build(x[:400], IndexParams(kind="hnsw", M=8), ScoreLayout(1.0))
    cases = [
        ({"add": (np.array([3]), x[3:4])}, "already in the index"),
        ({"remove": np.array([450])}, "not in the index"),
        ({"replace": (np.array([410]), x[410:411])}, "not in the index"),
        ({"remove": np.array([5, 5])}, "named twice"),
        ({"add": (np.array([400]), x[400:401]), "remove": np.array([400])}, "named twice"),
        ({"add": (np.array([400, 401]), x[400:401])}, "shape"),
        ({"add": (np.array([400]), np.full((1, 16), np.nan, np.float32))}, "NaN"),
        ({"remove": np.array([-1])}, ">= 0"),
        ({"remove": np.array([1.5])}, "integer"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            idx.update(**kwargs)
    assert idx.size == 400 and idx.labels is None and idx.faiss_index.ntotal == 400
    with pytest.raises(ConfigError, match="rebuild_share"):
        IndexParams(kind="hnsw", rebuild_share=0.0)


@pytest.mark.parametrize("kind,params", KINDS)
def test_an_updated_index_saves_and_loads_and_tampering_is_refused(kind, params, tmp_path):
    x, users = _catalog(n=2000)
    idx = ItemIndex.build(x[:1800], IndexParams(kind=kind, **params), ScoreLayout(1.0))
    idx.update(add=(np.arange(1800, 2000), x[1800:]), remove=np.arange(0, 100))
    meta = idx.save(tmp_path / "ix")
    assert meta["items_present"] == 1900 and meta["n_items"] == 2000 and meta["updates"][-1]["added"] == 200
    back = ItemIndex.load(tmp_path / "ix", idx.vectors)
    assert back.size == 1900 and np.array_equal(back.search(users, 20)[1], idx.search(users, 20)[1])
    for name in meta["update_files"]:
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(tmp_path / "ix", bad)
        arr = np.load(bad / name)
        arr[::2] = arr[1::2][: len(arr[::2])] if arr.dtype != bool else ~arr[::2]
        np.save(bad / name, arr)
        with pytest.raises(ArtifactError, match=name):
            ItemIndex.load(bad, idx.vectors)
    # an index as built writes neither file (and an update's files left behind by an older save are removed)
    fresh = ItemIndex.build(x, IndexParams(kind=kind, **params), ScoreLayout(1.0))
    assert fresh.save(tmp_path / "ix")["update_files"] == {}
    assert not (tmp_path / "ix" / "labels.npy").exists() and not (tmp_path / "ix" / "present.npy").exists()


# ---- a run's index ----------------------------------------------------------------------------------
@pytest.fixture
def grown_run(tmp_path):
    """A run of 3,000 items with an HNSW index, then the same run with 300 items admitted (what
    admitting new items does to a run: vocabulary, tables and counts grown, the rest unchanged)."""
    from twotower.index.run_index import build_run_index
    from twotower.run import Run

    x, users = _catalog(n=3300, q=300)
    counts = np.random.default_rng(2).zipf(1.5, 3300).astype(np.int64) - 1
    counts[3000:3100] = 0  # admitted without a count: add-one smoothing from 0
    counts[3100:] = np.arange(1, 201)  # admitted with counts
    path = write_mf_run(tmp_path / "run", x[:3000], users, counts[:3000])
    run = Run(path)
    build_run_index(run, IndexParams(kind="hnsw", M=16, ef_search=64), sample=200, progress=False, log=lambda m: None)
    write_mf_run(tmp_path / "run", x, users, counts)  # the admission rewrites the run
    return path, x, users, counts


def _served_scores(run, users_idx, alpha):
    """The served score by brute force: <f, g>/tau - alpha log p(j), over every item of the run."""
    from twotower.data.popularity import log_popularity as lp

    f = run.model.user_vectors(run.model.user_inputs(users_idx, run.known)).detach().numpy().astype(np.float64)
    g = run.item_vectors.numpy().astype(np.float64)
    return f @ g.T / float(run.model.temperature) - alpha * lp(run.item_counts)[None, :]


def test_items_admitted_to_a_run_are_added_and_served_with_exact_scores(grown_run):
    from twotower.index.run_index import load_run_index, update_run_index
    from twotower.run import Run
    from twotower.serving.query import Query, Recommender

    path, x, users, counts = grown_run
    run = Run(path)
    with pytest.raises(ArtifactError, match="other weights"):  # serving refuses an index the weights moved past
        load_run_index(run)
    removed = np.arange(0, 150) * 10  # raw ids of items 0..149
    idx = update_run_index(run, add_new=True, remove=removed, sample=200, log=lambda m: None)
    assert idx.size == 3300 - 150 and idx.n_items == 3300
    meta = json.loads((path / "index" / "index.json").read_text())
    assert meta["updates"][-1]["added"] == 300 and meta["updates"][-1]["removed"] == 150
    assert meta["measured"]["recall@100"] > 0.85 and meta["popularity_denominator"] == float((counts + 1).sum())
    rec = Recommender.load(Run(path))  # loads through the serving path, without complaint
    for alpha in (0.0, 1.0):
        res = rec.recommend_many([Query(user=int(u), k=50, alpha=alpha, exclude_seen=False) for u in range(1000, 1040)])
        brute = _served_scores(rec.run, np.arange(40), alpha)
        brute[:, :150] = -np.inf
        top = np.argsort(-brute, axis=1)[:, :50]
        got = np.stack([rec.run.items.encode(r.items) for r in res])
        assert recall_at(got, top, 50) > 0.9 and not np.isin(got, np.arange(150)).any()
        # the scores reported are the served scores, exact for the new items too (their log p over the new D)
        want = np.take_along_axis(brute, got, 1)
        np.testing.assert_allclose(np.stack([r.scores for r in res]), want, rtol=1e-4, atol=2e-3)
        if alpha == 1.0:
            assert (got >= 3000).any()  # new items come back
    # popularity fallback and similar items skip the removed items; a removed item can still be a query
    pop = rec.recommend(Query(history=[], k=200))
    assert not np.isin(rec.run.items.encode(pop.items), np.arange(150)).any()
    assert len(rec.similar(0, k=5).items) == 5 and 0 not in rec.similar(10, k=100).items


def test_the_layout_keeps_old_coordinates_when_the_denominator_moves(grown_run):
    """After the admission every -log p moves by log(D'/D); rebase moves the offset with it, so the
    coordinates the FAISS index holds for the old items are the ones the run now implies."""
    from twotower.index.run_index import update_run_index
    from twotower.run import Run

    path, x, users, counts = grown_run
    before = json.loads((path / "index" / "index.json").read_text())["layout"]
    idx = update_run_index(Run(path), add_new=True, sample=100, log=lambda m: None)
    d_old, d_new = float((counts[:3000] + 1).sum()), float((counts + 1).sum())
    assert idx.layout.offset == pytest.approx(before["offset"] + np.log(d_new / d_old), abs=1e-12)
    assert idx.layout.scale == before["scale"]
    import faiss

    storage = faiss.downcast_index(faiss.downcast_index(idx.faiss_index).storage)
    stored = faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * storage.d).reshape(storage.ntotal, storage.d)
    np.testing.assert_allclose(stored[:3000], idx.vectors[:3000], atol=1e-6)  # old entries still right
    np.testing.assert_allclose(stored[3000:], idx.vectors[3000:], atol=1e-6)  # new entries laid out the same way
    lp = log_popularity(counts)
    np.testing.assert_allclose(idx.vectors[:, -1], idx.layout.scale * (-lp - idx.layout.offset), atol=1e-6)


def test_update_refuses_ids_the_run_does_not_know_and_an_index_from_other_weights(grown_run, tmp_path):
    from twotower.index.run_index import update_run_index
    from twotower.run import Run

    path, x, users, counts = grown_run
    run = Run(path)
    with pytest.raises(ConfigError, match="not in the run's vocabulary"):
        update_run_index(run, add=[5], log=lambda m: None)  # raw ids are multiples of 10
    with pytest.raises(ConfigError, match="already in the index"):
        update_run_index(run, add=[10], log=lambda m: None)
    other = write_mf_run(tmp_path / "other", x[::-1].copy(), users, counts)
    shutil.copytree(path / "index", other / "index")
    with pytest.raises(ArtifactError, match="other weights"):
        update_run_index(Run(other), add_new=True, log=lambda m: None)


def test_cli_update_add_replace_remove(grown_run, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from twotower.cli import main

    path, x, users, counts = grown_run
    (tmp_path / "retired.txt").write_text("20\n30\n")
    vec = x[3000:3010] * np.float32(-1)
    pq.write_table(pa.table({"item": np.arange(3000, 3010) * 10,
                             "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), 16)}),
                   tmp_path / "new.parquet")
    assert main(["index", str(path), "--update", "--add", str(tmp_path / "new.parquet"), "--remove",
                 str(tmp_path / "retired.txt"), "--sample-users", "100"]) == 0
    assert "items after the update" in capsys.readouterr().out
    meta = json.loads((path / "index" / "index.json").read_text())
    assert meta["items_present"] == 3000 + 10 - 2
    emb = np.load(path / "index" / "item_embeddings.npy")
    np.testing.assert_array_equal(emb[3000:3010], vec)  # the given vectors, not the tower's
    (tmp_path / "empty.txt").write_text("\n")
    assert main(["index", str(path), "--update", "--remove", str(tmp_path / "empty.txt")]) == 2
    assert "no item ids" in capsys.readouterr().err
    assert main(["index", str(path), "--update", "--add-new", "--rebuild-share", "0"]) == 2
    assert "rebuild_share" in capsys.readouterr().err
    assert main(["index", str(path), "--add-new", "--sample-users", "100"]) == 0  # the other 290 admitted items
    assert json.loads((path / "index" / "index.json").read_text())["items_present"] == 3300 - 2


def test_update_into_another_folder_leaves_the_source_as_it_was(grown_run, tmp_path):
    """What a command rewriting a whole run directory at once uses: the updated index written where
    it says (its staging area), the index it started from untouched."""
    from twotower.index.run_index import load_run_index, update_run_index
    from twotower.run import Run

    path, x, users, counts = grown_run
    before = {p.name: p.read_bytes() for p in (path / "index").iterdir()}
    run = Run(path)
    update_run_index(run, add_new=True, out=tmp_path / "staged-index", sample=100, log=lambda m: None)
    assert {p.name: p.read_bytes() for p in (path / "index").iterdir()} == before
    assert load_run_index(run, tmp_path / "staged-index").size == 3300


def test_an_admission_staging_a_new_run_directory_updates_the_old_index_into_it(tmp_path):
    """The flow of a command that admits items by writing a grown copy of the run (a staging
    directory) and committing it whole: the old run's index read, the new items added with the
    vectors the command computed, the result written into the staging directory's index folder."""
    from twotower.index.run_index import build_run_index, load_run_index, update_run_index
    from twotower.run import Run
    from twotower.serving.query import Query, Recommender

    x, users = _catalog(n=2200, q=200)
    counts = np.r_[np.random.default_rng(3).zipf(1.5, 2000).astype(np.int64) - 1, np.zeros(200, np.int64)]
    old = write_mf_run(tmp_path / "run", x[:2000], users, counts[:2000])
    build_run_index(Run(old), IndexParams(kind="hnsw", M=16, ef_search=64), sample=100, progress=False, log=lambda m: None)
    before = {p.name: p.read_bytes() for p in (old / "index").iterdir()}
    staged = write_mf_run(tmp_path / "staged", x, users, counts)  # the grown run, not yet committed
    new_raw = np.arange(2000, 2200) * 10
    idx = update_run_index(Run(staged), add=new_raw, add_vectors=x[2000:], folder=old / "index", out=staged / "index",
                           sample=100, log=lambda m: None)
    assert idx.size == 2200 and {p.name: p.read_bytes() for p in (old / "index").iterdir()} == before
    assert load_run_index(Run(staged)).size == 2200  # the staged run's own index, as serving loads it
    rec = Recommender.load(Run(staged))
    # a new item is a query and a result at once: its neighbours by <g(i), g(j)> over all 2,200 items
    got = rec.run.items.encode(rec.similar(int(new_raw[0]), k=10).items)
    s = x @ x[2000]
    s[2000] = -np.inf
    assert recall_at(got[None, :], np.argsort(-s)[None, :10], 10) >= 0.9
    res = rec.recommend_many([Query(user=int(u), k=20, alpha=1.0, exclude_seen=False) for u in range(1000, 1100)])
    assert any((np.asarray(r.items) >= 20000).any() for r in res)  # new items come back (count 0: log p = -log D')
