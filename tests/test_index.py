"""The item index: the served score through appended dimensions is exact, ANN kinds reach high
recall against exact search, filtered search is exact, saved indexes load back (and stale or
corrupted ones are refused), and `twotower index` measures recall on real users at build."""
import json

import numpy as np
import pytest

from _trained import tiny_run
from twotower.errors import ArtifactError, ConfigError
from twotower.index import (IndexParams, ItemIndex, ScoreLayout, augment_items, augment_queries, auto_kind,
                            log_popularity, recall_at, served_scores)


def _data(n=4000, d=16, q=60, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(30, d))
    items = centers[rng.integers(0, 30, n)] + 0.4 * rng.normal(size=(n, d))
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    users = centers[rng.integers(0, 30, q)] + 0.6 * rng.normal(size=(q, d))
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    counts = rng.zipf(1.6, n).astype(np.float64) - 1  # many zero counts: smoothing keeps log p finite
    return items.astype(np.float32), users.astype(np.float32), counts


def _brute(items, users, log_p, tau, alpha, bias=None):
    s = users.astype(np.float64) @ items.T.astype(np.float64) / tau - alpha * log_p[None, :]
    return s + (0 if bias is None else bias[None, :])


def test_log_popularity_is_smoothed_and_normalised():
    lp = log_popularity(np.array([0, 1, 8]))
    assert np.all(np.isfinite(lp)) and np.exp(lp).sum() == pytest.approx(1.0)
    assert lp[0] == pytest.approx(np.log(1 / 12))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_flat_index_top_k_equals_brute_force_served_score(alpha, with_bias):
    items, users, counts = _data()
    tau, log_p = 0.1, log_popularity(counts)
    bias = np.random.default_rng(1).normal(size=len(items)) if with_bias else None
    layout = ScoreLayout.fit(log_p, tau, bias)
    assert np.abs(layout.items(items, log_p, bias)[:, 16:]).max() <= 0.25 + 1e-6  # appended coordinates kept small
    index = ItemIndex.build(layout.items(items, log_p, bias), IndexParams(kind="flat"), layout)
    inner, ids = index.search(layout.queries(users, alpha), 10)
    brute = _brute(items, users, log_p, tau, alpha, bias)
    top = np.argsort(-brute, axis=1, kind="stable")[:, :10]
    assert (ids == top).mean() > 0.99  # float32 vs float64: an occasional near-tie may swap
    np.testing.assert_allclose(layout.scores(inner, alpha), np.take_along_axis(brute, ids, 1), atol=2e-3)


def test_plain_layout_is_the_design_form():
    """Without centring or scaling, items are [g, -log p] and queries [f / tau, alpha]."""
    items, users, counts = _data(n=50, q=3)
    log_p = log_popularity(counts)
    x, q = augment_items(items, log_p), augment_queries(users, 0.7, temperature=0.1)
    np.testing.assert_allclose(x[:, -1], -log_p, rtol=1e-6)
    np.testing.assert_allclose(q[:, :-1], users / 0.1, rtol=1e-6)
    assert np.all(q[:, -1] == np.float32(0.7))
    np.testing.assert_allclose(q @ x.T, _brute(items, users, log_p, 0.1, 0.7), rtol=1e-4)
    assert served_scores(np.zeros((2, 3)), np.array([1.0, 2.0]), 0.5)[1, 0] == pytest.approx(1.0)


def test_per_query_alpha_in_one_search_and_larger_alpha_means_less_popular():
    items, users, counts = _data()
    log_p = log_popularity(counts)
    layout = ScoreLayout.fit(log_p, 0.1)
    index = ItemIndex.build(layout.items(items, log_p), IndexParams(kind="flat"), layout)
    alphas = np.repeat([0.0, 0.3, 1.0], len(users))
    _, ids = index.search(layout.queries(np.tile(users, (3, 1)), alphas), 20)
    pop = [log_p[ids[i * len(users):(i + 1) * len(users)]].mean() for i in range(3)]
    assert pop[0] > pop[1] > pop[2]
    for i, a in enumerate([0.0, 0.3, 1.0]):  # each row ranked with its own alpha
        top = np.argsort(-_brute(items, users, log_p, 0.1, a), axis=1)[:, :20]
        assert (ids[i * len(users):(i + 1) * len(users)] == top).mean() > 0.99


@pytest.mark.parametrize("kind,params", [("hnsw", {"ef_search": 128}), ("ivf", {"nprobe": 16}),
                                         ("ivfpq", {"nprobe": 16, "pq_m": 6, "refine": 8}),
                                         ("ivfpq", {"nprobe": 16, "pq_m": 6, "pq_bits": 4, "fast_scan": True, "refine": 8})])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_ann_kinds_reach_high_recall_and_report_exact_scores(kind, params, alpha):
    items, users, counts = _data(n=6000)
    log_p = log_popularity(counts)
    layout = ScoreLayout.fit(log_p, 0.1)
    index = ItemIndex.build(layout.items(items, log_p), IndexParams(kind=kind, **params), layout)
    q = layout.queries(users, alpha)
    inner, ids = index.search(q, 100)
    _, exact = index.exact_search(q, 100)
    assert index.kind == kind
    assert recall_at(ids, exact, 10) >= 0.9 and recall_at(ids, exact, 100) >= 0.85
    np.testing.assert_allclose(inner, np.einsum("bd,bkd->bk", q, index.vectors[ids]), rtol=1e-5, atol=1e-4)
    assert np.all(np.diff(inner, axis=1) <= 1e-6)


def test_fast_scan_needs_ivfpq_with_4_bit_codes_and_survives_save_and_load(tmp_path):
    with pytest.raises(ConfigError, match="pq_bits 4"):
        IndexParams(kind="ivfpq", pq_bits=8, fast_scan=True)
    with pytest.raises(ConfigError, match="kind 'ivfpq'"):
        IndexParams(kind="hnsw", pq_bits=4, fast_scan=True)
    items, users, counts = _data(n=3000)
    log_p = log_popularity(counts)
    layout = ScoreLayout.fit(log_p, 0.1)
    x = layout.items(items, log_p)
    index = ItemIndex.build(x, IndexParams(kind="ivfpq", nprobe=8, pq_m=6, pq_bits=4, fast_scan=True), layout)
    import faiss
    assert isinstance(faiss.downcast_index(index.faiss_index.base_index), faiss.IndexIVFPQFastScan)
    index.save(tmp_path)
    again = ItemIndex.load(tmp_path, x)
    q = layout.queries(users, 0.0)
    assert again.params.fast_scan and np.array_equal(again.search(q, 10)[1], index.search(q, 10)[1])


def test_tune_reaches_target_and_measure_reports_recall_and_latency():
    items, users, counts = _data(n=6000, q=120)
    log_p = log_popularity(counts)
    layout = ScoreLayout.fit(log_p, 0.1)
    index = ItemIndex.build(layout.items(items, log_p), IndexParams(kind="hnsw", target_recall=0.97), layout)
    q = layout.queries(users, 0.0)
    t = index.tune(q[::2])
    assert t["param"] == "ef_search" and index.params.ef_search == t["value"]
    m = index.measure(q[1::2], latency_queries=20)
    assert m["recall@10"] >= 0.9 and m["recall@100"] >= 0.9
    assert m["ann_ms_p50"] > 0 and m["exact_ms_p50"] > 0 and m["queries"] == 60


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_filtered_search_returns_only_the_subset_and_is_exact_when_small(kind):
    items, users, counts = _data(n=5000)
    log_p = log_popularity(counts)
    layout = ScoreLayout.fit(log_p, 0.1)
    index = ItemIndex.build(layout.items(items, log_p), IndexParams(kind=kind, exact_subset_max=1000), layout)
    q = layout.queries(users, 0.2)
    for subset in (np.arange(0, 5000, 7), np.arange(0, 5000, 2)):  # small: exact; large: through the index
        inner, ids = index.search(q, 30, subset=subset)
        assert np.isin(ids, subset).all()
        brute = _brute(items, users, log_p, 0.1, 0.2)[:, subset]
        top = subset[np.argsort(-brute, axis=1)[:, :30]]
        assert recall_at(ids, top, 30) >= (0.999 if kind == "flat" or len(subset) <= 1000 else 0.85)


def test_auto_kind_follows_catalog_size():
    assert auto_kind(1_682) == "flat" and auto_kind(40_981) == "flat"
    assert auto_kind(1_000_000) == "hnsw" and auto_kind(50_000_000) == "ivf"
    p = IndexParams(kind="ivf").resolved(1_000_000)
    assert p.nlist == 4000
    with pytest.raises(ConfigError, match="choose one of"):
        IndexParams(kind="lsh")
    with pytest.raises(ConfigError, match="positive integer"):
        IndexParams(kind="hnsw", M=0)


def test_save_and_load_round_trip_and_refuse_tampering(tmp_path):
    items, users, counts = _data(n=3000)
    log_p = log_popularity(counts)
    layout = ScoreLayout.fit(log_p, 0.1)
    vecs = layout.items(items, log_p)
    index = ItemIndex.build(vecs, IndexParams(kind="hnsw", ef_search=64), layout)
    index.save(tmp_path, {"note": "x"})
    back = ItemIndex.load(tmp_path, vecs)
    q = layout.queries(users, 0.3)
    assert back.kind == "hnsw" and back.params.ef_search == 64 and back.layout == layout and back.info["note"] == "x"
    assert (back.search(q, 10)[1] == index.search(q, 10)[1]).all()
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ArtifactError, match="other item vectors"):
        ItemIndex.load(tmp_path, vecs * 1.01)
    (tmp_path / "index.faiss").write_bytes((tmp_path / "index.faiss").read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="sha256"):
        ItemIndex.load(tmp_path, vecs)


# ---- on a real trained run ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    return tiny_run(tmp_path_factory, data_dir)


def test_index_command_measures_recall_on_real_users(run_dir, tmp_path, capsys):
    import pyarrow.parquet as pq

    from twotower.cli import main
    from twotower.run import Run
    from twotower.serving.query import Query, Recommender

    out = tmp_path / "hnsw"
    assert main(["index", str(run_dir), "--kind", "hnsw", "--out", str(out), "--quiet", "--sample-users", "400"]) == 0
    printed = capsys.readouterr().out
    assert "recall@10" in printed and "recall@100" in printed
    meta = json.loads((out / "index.json").read_text())
    assert meta["kind"] == "hnsw" and meta["params"]["ef_search"] >= 16
    assert meta["measured"]["recall@10"] >= 0.95 and meta["measured"]["recall@100"] >= 0.95
    assert meta["measured"]["ann_ms_p50"] > 0 and meta["n_users_sampled"] == 400
    run = Run(run_dir)
    table = pq.read_table(out / "item_embeddings.parquet")
    assert table.column("item").to_pylist() == run.items.ids.tolist()
    emb = np.load(out / "item_embeddings.npy")
    np.testing.assert_allclose(np.asarray(table.column("vector").to_pylist(), np.float32), emb)
    np.testing.assert_allclose(emb, run.item_vectors.numpy(), atol=1e-6)
    # the same answers as exact search for a known user, through the saved ANN index
    ann, exact = Recommender.load(run, out), Recommender.load(run)
    assert ann.index.kind == "hnsw" and exact.index.kind == "flat"
    a, e = ann.recommend(Query(user=196, k=10)), exact.recommend(Query(user=196, k=10))
    assert len(set(a.items.tolist()) & set(e.items.tolist())) >= 9
    # exact search through the Recommender equals the offline ranking of Run.recommend
    offline = run.recommend([196], k=10)
    assert e.items.tolist() == offline["item"].tolist()
    np.testing.assert_allclose(e.scores, offline["score"].to_numpy(), rtol=1e-4)  # one scale: the served score


def test_index_refuses_weights_it_was_not_built_from(run_dir, tmp_path):
    import shutil

    from twotower.index.run_index import build_run_index, load_run_index
    from twotower.run import Run

    run = Run(run_dir)
    build_run_index(run, IndexParams(kind="flat"), tmp_path / "idx", sample=50, progress=False, log=lambda m: None)
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    meta["model_sha256"] = "0" * 64
    (tmp_path / "idx" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="other weights"):
        load_run_index(run, tmp_path / "idx")
    shutil.rmtree(tmp_path / "idx")
    assert load_run_index(run, tmp_path / "idx") is None
    with pytest.raises(ArtifactError, match="twotower index"):
        load_run_index(run, tmp_path / "idx", required=True)
