"""Cold start: id dropout and its unknown vector, the cold-item and cold-user splits, warm and cold
metrics on a hand-computed case, and admitting new items to a trained run end to end."""
import json
import shutil

import numpy as np
import pytest
import torch

from twotower.config import EvalConfig, ModelConfig, RunConfig
from twotower.data.dataset import CSR, Split
from twotower.errors import ConfigError


# ---- id dropout --------------------------------------------------------------------------------------
def _features(n: int, values: list[list[str]]):
    from twotower.data.dataset import EncodedFeatures
    from twotower.data.vocab import Vocabulary

    return EncodedFeatures.encode(np.arange(n), {"genre": values}, Vocabulary(np.arange(n)))


def test_an_id_outside_the_vocabulary_gets_the_learned_unknown_vector():
    from twotower.model.towers import TwoTowerModel, l2_normalize

    torch.manual_seed(0)
    cfg = ModelConfig(dim=4, item_features=["genre"], item_id_dropout=0.5)
    model = TwoTowerModel(2, 3, cfg, item_features=_features(3, [["a"], ["b"], ["a", "b"]])).eval()
    with torch.no_grad():
        model.item_tower.unknown_id.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        genre_b = model.item_tower.features.encoders[0].bag.weight[1]
        g = model.item_vectors(model.item_inputs([-1], [{"genre": "b"}]))[0]
        torch.testing.assert_close(g, l2_normalize(torch.tensor([1.0, 0.0, 0.0, 0.0]) + genre_b))
        # a known id is its own row, in evaluation always
        known = model.item_vectors(model.item_inputs([1]))[0]
        torch.testing.assert_close(known, l2_normalize(model.item_tower.id_embedding.weight[1] + genre_b))
    # without id dropout there is no unknown vector: the id part of -1 is zero, and the weights are as before
    plain = TwoTowerModel(2, 3, ModelConfig(dim=4, item_features=["genre"]), item_features=_features(3, [["a"], ["b"], []]))
    assert plain.item_tower.unknown_id is None and not any("unknown_id" in k for k in plain.state_dict())


def test_id_dropout_replaces_a_share_p_of_the_rows_while_training_only():
    from twotower.model.towers import drop_ids

    torch.manual_seed(0)
    ids = torch.arange(20000)
    share = drop_ids(ids, 0.3, training=True).float().mean().item()
    assert abs(share - 0.3) < 0.02
    assert not drop_ids(ids, 0.3, training=False).any()
    assert drop_ids(torch.tensor([-1, 4]), 0.0, training=True).tolist() == [True, False]


def test_the_unknown_vector_is_learned_and_towers_with_id_dropout_are_not_deterministic():
    from twotower.data.sources import load_dataset
    from twotower.training.trainer import Trainer

    cfg = RunConfig.from_dict({"data": {"dataset": "synthetic", "synthetic_users": 100, "synthetic_items": 50},
                               "model": {"dim": 8, "item_features": "all", "item_id_dropout": 0.5, "user_id_dropout": 0.5},
                               "train": {"epochs": 1, "batch_size": 64}})
    tr = Trainer(cfg, load_dataset(cfg.data), quiet=True, log=lambda m: None)
    assert not tr.model.item_tower.deterministic and not tr.model.user_tower.deterministic
    assert tr.model.item_tower.unknown_id.abs().sum() == 0  # starts at zero
    tr.train_epoch(1)
    assert tr.model.item_tower.unknown_id.abs().sum() > 0 and tr.model.user_tower.unknown_id.abs().sum() > 0


def test_id_dropout_needs_an_id_to_drop():
    with pytest.raises(ConfigError, match="item_id_dropout > 0 needs item_id"):
        RunConfig.from_dict({"model": {"item_id": False, "item_features": ["x"], "item_id_dropout": 0.5}})


# ---- cold splits ----------------------------------------------------------------------------------------
def _dataset(**data):
    from twotower.data.sources import load_dataset

    return load_dataset(RunConfig.from_dict({"data": {"dataset": "synthetic", "synthetic_users": 300,
                                                      "synthetic_items": 200, **data}}).data)


def test_a_cold_item_split_withholds_a_seeded_share_of_items_from_training_entirely():
    ds = _dataset(cold_items=0.2, valid_fraction=0.1)
    plain = _dataset()
    present = np.unique(np.r_[plain.train.items, plain.valid.items, plain.test.items])
    cold = np.flatnonzero(ds.cold_items)
    assert len(cold) == round(0.2 * len(present)) and set(cold) <= set(present)
    assert not ds.cold_items[ds.train.items].any()  # no withheld item is trained on
    in_valid = np.unique(ds.valid.items[ds.cold_items[ds.valid.items]])
    in_test = np.unique(ds.test.items[ds.cold_items[ds.test.items]])
    assert not set(in_valid) & set(in_test)  # the cold validation items are not test items, and back
    assert len(in_valid) == round(0.1 * len(cold))
    every = Split(*(np.r_[a, b, c] for a, b, c in zip((plain.train.users, plain.train.items),
                                                       (plain.valid.users, plain.valid.items),
                                                       (plain.test.users, plain.test.items))))
    n_cold = int(ds.cold_items[every.items].sum())
    assert int(ds.cold_items[ds.valid.items].sum() + ds.cold_items[ds.test.items].sum()) == n_cold  # every one held out
    assert np.array_equal(_dataset(cold_items=0.2, valid_fraction=0.1).cold_items, ds.cold_items)  # seeded
    assert plain.cold_items is None and plain.cold_input is None


def test_a_cold_user_split_gives_withheld_users_an_input_history_and_a_truth_and_no_training():
    ds = _dataset(cold_users=0.1, valid_fraction=0.1, split="temporal")
    cold = np.flatnonzero(ds.cold_users)
    assert len(cold) == 30 and not ds.cold_users[ds.train.users].any()
    assert set(np.unique(ds.cold_input.users)) <= set(cold)
    # temporal: each withheld user's truth is the last interaction, after every input item
    for u in cold[:10]:
        inp = ds.cold_input.timestamps[ds.cold_input.users == u]
        truth = np.r_[ds.test.timestamps[ds.test.users == u], ds.valid.timestamps[ds.valid.users == u]]
        assert len(truth) == 1 and (inp < truth[0]).all()
    # the input is known (fed to the tower, masked) at validation and at test time, never trained on
    h = ds.history("train")
    assert sum(len(h.row(u)) for u in cold) == len(ds.cold_input)
    features_only = _dataset(cold_users=0.1, valid_fraction=0.1, split="temporal", cold_user_history=0)
    assert len(features_only.cold_input) == 0
    refit = ds.with_valid_in_train()
    assert not refit.cold_users[refit.train.users].any() and len(refit.cold_input) > len(ds.cold_input)


def test_a_monitor_of_a_group_needs_its_cold_split():
    with pytest.raises(ConfigError, match="needs a cold split"):
        RunConfig.from_dict({"train": {"monitor": "cold_items/recall@20"}})
    with pytest.raises(ConfigError, match="monitor must look like"):
        RunConfig.from_dict({"train": {"monitor": "lukewarm/recall@20"}})
    RunConfig.from_dict({"data": {"cold_users": 0.1}, "train": {"monitor": "cold_users/ndcg@10"}})


def test_warm_and_cold_metrics_by_hand():
    """One user, items 0..3 scored 4 > 3 > 2 > 1 (item 0 best), nothing known. Held out: item 1 (warm)
    and item 3 (withheld). Top 2 = [0, 1]: the warm item is found at rank 2, the cold one is not."""
    from twotower.evaluation.evaluator import evaluate_split
    from twotower.model.towers import TwoTowerModel

    model = TwoTowerModel(1, 4, ModelConfig(dim=2, temperature=1.0))
    with torch.no_grad():
        angles = torch.tensor([0.0, 0.3, 0.6, 0.9])
        model.item_tower.id_embedding.weight.copy_(torch.stack([angles.cos(), angles.sin()], 1))
        model.user_tower.id_embedding.weight.copy_(torch.tensor([[1.0, 0.0]]))
    cold = np.array([False, False, False, True])
    truth = Split(np.array([0, 0]), np.array([1, 3]))
    known = CSR(np.array([0, 0]), np.array([], dtype=np.int64))
    m = evaluate_split(model, truth, known, np.ones(4), EvalConfig(ks=[2, 4]),
                       groups={"warm_items": ("item", ~cold), "cold_items": ("item", cold)})
    assert m["recall@2"] == 0.5 and m["warm_items/recall@2"] == 1.0 and m["cold_items/recall@2"] == 0.0
    assert m["warm_items/ndcg@2"] == pytest.approx((1 / np.log2(3)) / 1.0)  # one relevant, found at rank 2
    assert m["cold_items/recall@4"] == 1.0 and m["cold_items/ndcg@4"] == pytest.approx(1 / np.log2(5))
    assert m["warm_items/users"] == 1.0 and m["cold_items/users"] == 1.0
    # a user group: the same user counted as withheld
    m = evaluate_split(model, truth, known, np.ones(4), EvalConfig(ks=[2]),
                       groups={"cold_users": ("user", np.array([True])), "warm_users": ("user", np.array([False]))})
    assert m["cold_users/recall@2"] == 0.5 and m["cold_users/users"] == 1.0 and m["warm_users/users"] == 0.0
    assert np.isnan(m["warm_users/recall@2"])


def test_withheld_items_are_scored_as_new_and_the_saved_weights_say_so(tmp_path, capsys):
    from twotower import train
    from twotower.model.towers import embed_items
    from twotower.run import Run

    cfg = RunConfig.from_dict({"data": {"dataset": "synthetic", "synthetic_users": 200, "synthetic_items": 100,
                                        "cold_items": 0.2},
                               "model": {"dim": 8, "item_features": "all", "item_id_dropout": 0.5},
                               "negatives": {"sampled": 64},
                               "train": {"epochs": 2, "batch_size": 128, "monitor": "cold_items/recall@10"},
                               "eval": {"ks": [10]}})
    res = train(cfg, tmp_path / "run", quiet=True, log=lambda m: None)
    assert {"warm_items/recall@10", "cold_items/recall@10", "cold_items/ndcg@10"} <= set(res.test)
    run = Run(tmp_path / "run")
    cold = np.flatnonzero(res.trainer.dataset.cold_items)
    unknown = run.model.item_tower.unknown_id.detach()
    torch.testing.assert_close(run.model.item_tower.id_embedding.weight[cold].detach(), unknown.expand(len(cold), -1))
    # so the index and serving place them as new items, without knowing which they are
    with torch.no_grad():
        as_new = run.model.item_vectors(run.model.item_inputs(np.full(len(cold), -1), new=None,
                                                              features=[{"category": run.model.item_tower.features.encoders[0]
                                                                         .values[c]} for c in _category_codes(run, cold)]))
    torch.testing.assert_close(embed_items(run.model)[cold], as_new)
    # a reloaded run, re-scored on its data, gives the same warm and cold figures, and prints them
    from twotower.api import evaluate_run
    from twotower.cli import main

    again = evaluate_run(tmp_path / "run")
    assert again["cold_items/recall@10"] == pytest.approx(res.test["cold_items/recall@10"])
    assert main(["evaluate", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "warm_items/recall@10" in printed and "cold_items/ndcg@10" in printed


def _category_codes(run, items):
    enc = run.model.item_tower.features.encoders[0]
    return [int(enc.codes[enc.indptr[j]]) for j in items]


# ---- admitting new items -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def features_run(tmp_path_factory, data_dir):
    """A small MovieLens run with item and user features and id dropout, and an HNSW index."""
    from twotower import train
    from twotower.index.index import IndexParams
    from twotower.index.run_index import build_run_index
    from twotower.run import Run

    out = tmp_path_factory.mktemp("cold") / "run"
    cfg = RunConfig.from_dict({"data": {"dataset": "ml-100k"},
                               "model": {"dim": 16, "item_features": ["genre"], "user_features": "all",
                                         "item_id_dropout": 0.5, "item_bias": True, "user_history": True},
                               "train": {"epochs": 2, "batch_size": 512, "lr": 0.005}, "eval": {"ks": [10, 20]}})
    train(cfg, out, data_dir=data_dir, quiet=True, log=lambda m: None)
    build_run_index(Run(out), IndexParams(kind="hnsw"), sample=200, progress=False, log=lambda m: None)
    return out


@pytest.mark.slow
def test_new_items_are_admitted_without_retraining_and_served_at_once(features_run, tmp_path, capsys):
    from twotower.cli import main
    from twotower.run import Run
    from twotower.serving.query import Query, Recommender

    run_dir = tmp_path / "run"
    shutil.copytree(features_run, run_dir)
    before = Run(run_dir)
    n0 = len(before.items)
    (tmp_path / "new.csv").write_text("item,genre,title\n9001,Action|Sci-Fi,Space Laser\n9002,Nope,Odd One\n9003,,Plain\n")
    assert main(["add-items", str(run_dir), str(tmp_path / "new.csv"), "--sep", "genre=|", "--title-col", "title"]) == 0
    out = capsys.readouterr().out
    assert "admitted 3 item(s)" in out and "hnsw updated" in out and "item 9002" in out and "Nope" in out

    run = Run(run_dir)  # the manifest checks out
    assert len(run.items) == n0 + 3 and run.items.decode([n0, n0 + 2]).tolist() == [9001, 9003]
    assert run.item_counts[n0:].tolist() == [0, 0, 0] and run.title(9001) == "Space Laser"
    raw = [{"genre": ["Action", "Sci-Fi"]}, {"genre": "Nope"}, {}]
    with torch.no_grad():  # the same vectors as the item tower computes for them as new items
        expected = run.model.item_vectors(run.model.item_inputs([-1, -1, -1], raw))
        torch.testing.assert_close(before.model.item_vectors(before.model.item_inputs([-1, -1, -1], raw)), expected)
    np.testing.assert_allclose(np.load(run_dir / "item_embeddings.npy")[n0:], expected.numpy(), rtol=1e-6, atol=1e-7)
    # known items are untouched: vectors, stored features, titles
    np.testing.assert_array_equal(np.load(run_dir / "item_embeddings.npy")[:n0], np.load(features_run / "item_embeddings.npy"))

    rec = Recommender.load(run)  # the updated HNSW index, checked against the new weights and vectors
    assert rec.index.kind == "hnsw" and rec.index.n_items == n0 + 3
    # the new item's neighbours, and a new user whose only item is the new one, through the index
    sim = rec.similar(9001, k=5)
    assert 9001 not in sim.items.tolist() and len(sim.items) == 5
    r = rec.recommend(Query(history=[9001], k=5))
    assert r.fallback is None and 9001 not in r.items.tolist()
    # the new item is retrievable: a query along its vector finds it among the first, through the
    # index as exactly (the learned bias of known items may put one of them before it)
    q = rec.index.layout.queries(rec.index.vectors[n0 : n0 + 1, : rec.dim], 0.0)
    assert rec.index.faiss_index.ntotal == n0 + 3
    assert n0 in rec.index.search(q, 10)[1][0] and n0 in rec.index.exact_search(q, 10)[1][0]
    # ids the run knows are refused, nothing written
    (tmp_path / "again.csv").write_text("item,genre\n9001,Action\n")
    manifest = (run_dir / "manifest.json").read_text()
    assert main(["add-items", str(run_dir), str(tmp_path / "again.csv")]) == 2
    assert "already in the run" in capsys.readouterr().err and (run_dir / "manifest.json").read_text() == manifest


def test_admitting_users_and_a_replacement_cut_short_is_finished_on_open(features_run, tmp_path):
    from twotower.index.admit import NewEntities, admit
    from twotower.run import Run
    from twotower.run_dir import RunDir

    run_dir = tmp_path / "run"
    shutil.copytree(features_run, run_dir)
    res = admit(run_dir, users=NewEntities(np.array([5000]), [{"age": "25-34", "gender": "F"}]), log=lambda m: None)
    assert res.users == 1
    run = Run(run_dir)
    u = int(run.users.encode([5000])[0])
    assert u == len(run.users) - 1 and len(run.known.row(u)) == 0
    with torch.no_grad():
        stored = run.model.user_vectors(run.model.user_inputs([u], run.known))
        new = run.model.user_vectors(run.model.user_inputs([-1], [np.empty(0, np.int64)], [{"age": "25-34", "gender": "F"}]))
    torch.testing.assert_close(stored, new)
    # a commit cut after its marker: the next reader finishes it
    d = RunDir(run_dir)
    staged = d.staging()
    (staged.path / "titles.json").write_text(json.dumps(["x"] * len(run.items)))
    (staged.path / "COMMIT").write_text(json.dumps({"replace": ["titles.json"]}))
    Run(run_dir)  # verify settles: the title file is swapped in and the manifest rewritten
    assert not staged.path.exists() and Run(run_dir).title(run.items.ids[0]) == "x"


# ---- new users by features only, over HTTP ---------------------------------------------------------------
@pytest.fixture(scope="module")
def http(features_run):
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    from twotower.serving.query import Recommender
    from twotower.serving.service import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(create_app(Recommender.load(features_run)), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    assert srv.started, "server did not start"
    with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=30) as client:
        yield client
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_features_only_new_users_get_lists_from_their_features_over_http(http, features_run):
    from twotower.run import Run

    a = {"features": {"age": "18-24", "gender": "M", "occupation": "student"}, "k": 10}
    b = {"features": {"age": "56+", "gender": "F", "occupation": "retired"}, "k": 10}
    ra, rb = http.post("/recommend", json=a), http.post("/recommend", json=b)
    assert ra.status_code == 200 and rb.status_code == 200, (ra.text, rb.text)
    ia, ib = [x["item"] for x in ra.json()["items"]], [x["item"] for x in rb.json()["items"]]
    assert ra.json()["fallback"] is None and rb.json()["fallback"] is None
    assert ia != ib  # two profiles, two lists
    run = Run(features_run)
    with torch.no_grad():  # the list is the user tower's, for a user outside the vocabulary with those features
        f = run.model.user_vectors(run.model.user_inputs([-1], [np.empty(0, np.int64)], [a["features"]]))[0]
    scores = (run.item_vectors @ f / run.model.temperature + run.model.bias(torch.arange(len(run.items)))).detach()
    # each served score is the tower's for that item, best first (the HNSW search is approximate: it
    # may skip an item of the exact top 10, so the list itself is not compared with the exact one)
    served = np.array([x["score"] for x in ra.json()["items"]])
    np.testing.assert_allclose(served, scores[run.items.encode(ia)].numpy(), rtol=1e-4, atol=1e-4)
    assert (np.diff(served) <= 1e-6).all()
    assert len(set(ia) & set(run.items.decode(torch.topk(scores, 10).indices.numpy()).tolist())) >= 7
    # features change the list of a new user with a history too
    h = {"history": [50, 172, 181], "k": 10}
    plain = [x["item"] for x in http.post("/recommend", json=h).json()["items"]]
    assert plain != [x["item"] for x in http.post("/recommend", json={**h, **b}).json()["items"]]
    # nothing usable: popularity, and the reason
    r = http.post("/recommend", json={"features": {"age": "ancient"}, "k": 5}).json()
    assert r["fallback"] == "popularity" and "no feature value is known" in r["fallback_reason"]
    assert r["unknown_features"] == {"age": ["ancient"]}
    r = http.post("/recommend", json={"history": [], "k": 5}).json()
    assert r["fallback"] == "popularity" and "no history items" in r["fallback_reason"]


def test_withheld_items_are_never_negatives_sampled_or_hard():
    from twotower.data.sources import load_dataset
    from twotower.training.trainer import Trainer

    cfg = RunConfig.from_dict({"data": {"dataset": "synthetic", "synthetic_users": 200, "synthetic_items": 100,
                                        "cold_items": 0.3},
                               "model": {"dim": 8, "item_features": "all"},
                               "negatives": {"sampled": 256, "hard": "category", "hard_k": 8},
                               "train": {"epochs": 1, "batch_size": 128}})
    ds = load_dataset(cfg.data)
    tr = Trainer(cfg, ds, quiet=True, log=lambda m: None)
    cold = torch.from_numpy(ds.cold_items)
    gen = torch.Generator().manual_seed(0)
    seen_sampled, seen_hard = set(), set()
    for step in range(20):
        users = torch.from_numpy(ds.train.users[step * 50 : step * 50 + 50])
        items = torch.from_numpy(ds.train.items[step * 50 : step * 50 + 50])
        with torch.no_grad():
            cand = tr.candidates.build(tr.model, users, items, tr.model.encode_items(items), step, gen=gen)
        seen_sampled |= set(cand.ids[len(items):].tolist())
        seen_hard |= set(cand.hard_ids[cand.hard_ids >= 0].tolist())
    assert len(seen_sampled) > 30 and len(seen_hard) > 10
    assert not cold[list(seen_sampled)].any() and not cold[list(seen_hard)].any()
    assert float(tr.candidates.r[cold].sum()) == 0.0 and float(tr.candidates.r.sum()) == pytest.approx(1.0)


def test_admitted_items_are_read_and_placed_by_every_declared_kind(tmp_path, data_dir, capsys):
    """A run whose item tower reads genres, the title as text and the year as a number: new items
    from a CSV get exactly the vector the item tower computes for those raw values as items outside
    the vocabulary, a missing year its learned missing value; the text and the number change it."""
    from twotower import train
    from twotower.cli import main
    from twotower.run import Run

    cfg = RunConfig.from_dict({"data": {"dataset": "ml-100k"},
                               "model": {"dim": 8, "item_id_dropout": 0.5},
                               "features": {"item": [{"name": "genre", "kind": "multi_categorical"},
                                                     {"name": "title", "kind": "text"},
                                                     {"name": "year", "kind": "numeric"}]},
                               "train": {"epochs": 1, "batch_size": 1024}, "eval": {"ks": [10]}})
    run_dir = tmp_path / "run"
    train(cfg, run_dir, data_dir=data_dir, quiet=True, log=lambda m: None)
    n0 = len(Run(run_dir).items)
    (tmp_path / "new.csv").write_text("item,genre,title,year\n9001,Action|Sci-Fi,Space Laser Wars,1997\n"
                                      "9002,Action|Sci-Fi,Quiet Garden Picnic,1951\n9003,Drama,,\n")
    assert main(["add-items", str(run_dir), str(tmp_path / "new.csv")]) == 0
    assert "admitted 3 item(s)" in capsys.readouterr().out
    run = Run(run_dir)
    raw = [{"genre": ["Action", "Sci-Fi"], "title": "Space Laser Wars", "year": 1997.0},
           {"genre": ["Action", "Sci-Fi"], "title": "Quiet Garden Picnic", "year": 1951.0},
           {"genre": ["Drama"], "title": None, "year": None}]
    with torch.no_grad():
        expected = run.model.item_vectors(run.model.item_inputs([-1, -1, -1], raw))
    np.testing.assert_allclose(np.load(run_dir / "item_embeddings.npy")[n0:], expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected[0], expected[1])  # same genres, another title and year


def test_new_users_read_from_a_table_are_admitted_with_their_features(features_run, tmp_path):
    from twotower.index.admit import admit, read_new_entities
    from twotower.run import Run

    run_dir = tmp_path / "run"
    shutil.copytree(features_run, run_dir)
    (tmp_path / "users.csv").write_text("user,age,gender,occupation\n7001,25-34,F,writer\n7002,,M,\n")
    new = read_new_entities(Run(run_dir), tmp_path / "users.csv", "user")
    assert new.ids.tolist() == [7001, 7002]
    # each column read as its declared kind (categorical: a list of labels; an empty cell: none)
    assert new.rows() == [{"age": ["25-34"], "gender": ["F"], "occupation": ["writer"]},
                          {"age": [], "gender": ["M"], "occupation": []}]
    admit(run_dir, users=new, log=lambda m: None)
    run = Run(run_dir)
    u = run.users.encode([7001, 7002])
    with torch.no_grad():
        stored = run.model.user_vectors(run.model.user_inputs(u, run.known))
        direct = run.model.user_vectors(run.model.user_inputs([-1, -1], [np.empty(0, np.int64)] * 2, new.rows()))
    torch.testing.assert_close(stored, direct)
    assert not torch.allclose(stored[0], stored[1])
    with pytest.raises(ValueError, match="kind must be"):
        read_new_entities(run, tmp_path / "users.csv", "context")
