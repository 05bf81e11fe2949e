"""``twotower update``: continuing a run on new interactions (issue 21).

The maths on hand-computed cases (replay sample, continued counts, grown optimizer state), an end
to end update on MovieLens 100K with new users and items served at once, replay preventing
forgetting (a check that fails without replay), and bad input refused with nothing written.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from twotower.update import continued_counts, focused_replay_sample, grown_optimizer_state, replay_sample


# ---- the maths ----------------------------------------------------------------------------------------
def test_continued_counts_by_hand():
    old, new = np.array([4, 0, 7]), np.array([1, 2, 0, 3])  # one admitted item
    assert continued_counts(old, new).tolist() == [5, 2, 7, 3]
    # decay 0.5: round(2, 0, 3.5) = (2, 0, 4), then the new counts added
    assert continued_counts(old, new, 0.5).tolist() == [3, 2, 4, 3]
    assert continued_counts(old, new, 0.0).tolist() == [1, 2, 0, 3]
    # two updates with decay d: decay^2 on the oldest counts
    twice = continued_counts(continued_counts(np.array([100]), np.array([0]), 0.9), np.array([10]), 0.9)
    assert twice.tolist() == [round(round(100 * 0.9) * 0.9) + 10]


def test_replay_sample_sizes_and_uniqueness():
    rng = np.random.default_rng(0)
    s = replay_sample(10, 4, 1.5, None, rng)
    assert len(s) == 6 and len(set(s.tolist())) == 6 and s.min() >= 0 and s.max() < 10 and (np.diff(s) > 0).all()
    assert len(replay_sample(10, 4, 1.5, 3, rng)) == 3      # the cap
    assert len(replay_sample(10, 4, 0.0, None, rng)) == 0   # no replay
    assert replay_sample(2, 4, 5.0, None, rng).tolist() == [0, 1]  # no more than there is
    # uniform: every old pair is drawn about equally often
    hits = np.bincount(np.concatenate([replay_sample(20, 5, 1.0, None, np.random.default_rng(k)) for k in range(2000)]),
                       minlength=20)
    assert abs(hits / 2000 - 0.25).max() < 0.05


def test_focused_replay_sample_by_hand():
    prefer = np.array([0, 1, 0, 1, 1, 0, 0, 0, 0, 0], dtype=bool)   # pairs 1, 3, 4: users of the new interactions
    rng = np.random.default_rng(0)
    # share 1, m 3: exactly the preferred pairs
    assert focused_replay_sample(prefer, 3, 1.0, rng).tolist() == [1, 3, 4]
    # share 1, m 5: the 3 preferred, then 2 of the rest, no repeats
    s = focused_replay_sample(prefer, 5, 1.0, rng)
    assert len(s) == 5 and set(s.tolist()) >= {1, 3, 4} and len(set(s.tolist())) == 5 and (np.diff(s) > 0).all()
    # share 0.5 of m 4: round(2) preferred + 2 drawn from everything else
    draws = [focused_replay_sample(prefer, 4, 0.5, np.random.default_rng(k)) for k in range(3000)]
    assert all(len(d) == 4 and len(set(d.tolist())) == 4 for d in draws)
    hits = np.bincount(np.concatenate(draws), minlength=10) / 3000
    # a preferred pair: in the 2 of 3 drawn first, or else (1/3) among the 2 of the 8 left: 2/3 + 1/3 * 2/8
    assert abs(hits[prefer] - (2 / 3 + 1 / 3 * 2 / 8)).max() < 0.03
    # any other pair: 2 of the 8 left
    assert abs(hits[~prefer] - 2 / 8).max() < 0.03
    # share 0: uniform over all; m past the pool: all of them
    assert focused_replay_sample(prefer, 20, 0.0, rng).tolist() == list(range(10))
    assert len(focused_replay_sample(prefer, 0, 1.0, rng)) == 0


def test_update_with_replay_focus_replays_the_active_users_histories(synthetic_run, tmp_path, monkeypatch):
    """``update.replay_focus = 1``: the replay is drawn from the earlier pairs of the users in the
    new interactions (the preferred mask ``update`` builds is exactly theirs), its size unchanged."""
    import twotower.update as upd
    from twotower.config import UpdateConfig
    from twotower.run import Run

    parent = Run(synthetic_run)
    known = parent.known
    rng = np.random.default_rng(1)
    active = parent.users.ids[:5]
    new = pd.DataFrame({"user": rng.choice(active, 30), "item": rng.choice(parent.items.ids, 30)})
    seen = {}
    real = upd.focused_replay_sample

    def spy(prefer, m, share, rng_):
        picked = real(prefer, m, share, rng_)
        seen.update(prefer=prefer.copy(), m=m, share=share, picked=picked)
        return picked

    monkeypatch.setattr(upd, "focused_replay_sample", spy)
    res = upd.update(synthetic_run, new, tmp_path / "r", cfg=UpdateConfig(epochs=1, replay=2.0, replay_focus=1.0),
                     log=lambda m: None)
    pairs_u = np.repeat(np.arange(known.n_rows), known.lengths())
    expected = np.isin(pairs_u, parent.users.encode(active))
    np.testing.assert_array_equal(seen["prefer"], expected)
    assert seen["share"] == 1.0 and res.replayed == seen["m"] == len(seen["picked"])
    # the five users have more earlier pairs than the sample asks for: every replayed pair is theirs
    assert expected.sum() >= seen["m"] and expected[seen["picked"]].all()


def test_grown_optimizer_state_pads_rows_with_zero_moments():
    p = torch.nn.Parameter(torch.ones(2, 3))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(2, 3)
    opt.step()
    state = opt.state_dict()
    big = torch.nn.Parameter(torch.ones(4, 3))
    grown = grown_optimizer_state(state, [big])
    st = grown["state"][0]
    assert st["exp_avg"].shape == (4, 3) and st["exp_avg_sq"].shape == (4, 3)
    torch.testing.assert_close(st["exp_avg"][:2], state["state"][0]["exp_avg"])
    assert not st["exp_avg"][2:].any() and not st["exp_avg_sq"][2:].any()
    assert float(st["step"]) == 1.0
    opt2 = torch.optim.Adam([big], lr=0.1)
    opt2.load_state_dict(grown)  # loads into the grown table
    big.grad = torch.zeros(4, 3)
    before = big.detach().clone()
    opt2.step()
    # the old rows move on their momentum; a new row with zero moments does not move
    assert (big.detach()[:2] != before[:2]).all() and (big.detach()[2:] == before[2:]).all()


# ---- MovieLens 100K end to end -------------------------------------------------------------------------
def _ml_frame(data_dir: Path) -> pd.DataFrame:
    f = pd.read_csv(data_dir / "ml-100k" / "u.data", sep="\t", names=["user", "item", "rating", "timestamp"])
    return f.sort_values("timestamp", kind="stable").reset_index(drop=True)


def _genres(data_dir: Path) -> pd.DataFrame:
    from twotower.data.readers import read_movielens_100k

    f = read_movielens_100k(data_dir / "ml-100k")[1]
    return pd.DataFrame({"item": f.ids, "genre": ["|".join(g) for g in f.categorical["genre"]]})


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_dir):
    """Trained on the first 70 % of MovieLens 100K in time, with genres and id dropout, indexed."""
    from twotower import RunConfig, train
    from twotower.index.index import IndexParams
    from twotower.index.run_index import build_run_index
    from twotower.run import Run

    d = tmp_path_factory.mktemp("update")
    frame = _ml_frame(data_dir)
    n70, n80 = int(0.7 * len(frame)), int(0.8 * len(frame))
    frame.iloc[:n70].to_csv(d / "old.csv", index=False)
    frame.iloc[n70:n80].to_csv(d / "new.csv", index=False)
    genres = _genres(data_dir)
    old_items = set(frame.iloc[:n70]["item"])
    genres[genres["item"].isin(old_items)].to_csv(d / "items.csv", index=False)
    genres[~genres["item"].isin(old_items)].to_csv(d / "new_items.csv", index=False)
    cfg = RunConfig.from_dict({
        "data": {"dataset": "files", "interactions": str(d / "old.csv"), "time_col": "timestamp", "split": "random",
                 "item_features": str(d / "items.csv"), "item_multi_valued": {"genre": "|"}},
        "model": {"dim": 16, "item_features": ["genre"], "item_id_dropout": 0.2, "user_history": True},
        "train": {"epochs": 2, "batch_size": 512, "lr": 0.005}, "eval": {"ks": [20]}})
    train(cfg, d / "run", quiet=True, log=lambda m: None)
    build_run_index(Run(d / "run"), IndexParams(kind="flat"), progress=False, log=lambda m: None)
    return d


@pytest.mark.slow
def test_update_admits_new_users_and_items_and_serves_them_at_once(base_run, tmp_path, capsys):
    from twotower.cli import main
    from twotower.run import Run
    from twotower.serving.query import Query, Recommender

    d = base_run
    parent = Run(d / "run")
    new = pd.read_csv(d / "new.csv")
    out = tmp_path / "run2"
    assert main(["update", str(d / "run"), "--interactions", str(d / "new.csv"), "--items", str(d / "new_items.csv"),
                 "--out", str(out), "--set", "update.epochs=1", "--set", "update.replay=1.0"]) == 0
    said = capsys.readouterr().out
    assert "admitted" in said and "index flat built" in said

    run = Run(out)  # complete and verified (manifest)
    new_users = sorted(set(new["user"]) - set(parent.users.ids.tolist()))
    new_items = sorted(set(new["item"]) - set(parent.items.ids.tolist()))
    listed = pd.read_csv(d / "new_items.csv")["item"].tolist()  # the catalog's new items, with or without interactions
    assert new_users and new_items and set(new_items) <= set(listed)
    assert len(run.users) == len(parent.users) + len(new_users) and len(run.items) == len(parent.items) + len(listed)
    # the old ids keep their places; the new ones follow
    assert run.items.ids[: len(parent.items)].tolist() == parent.items.ids.tolist()
    # lineage: names its parent and the parent's weights
    lineage = run.dir.read_lineage()
    assert lineage["parent"] == str((d / "run").resolve()) and lineage["generation"] == 1
    assert lineage["parent_model_sha256"] == parent.dir.model_digest() and lineage["optimizer_state"] == "checkpoint"
    assert "lineage.json" in json.loads((out / "manifest.json").read_text())["sha256"]
    # the weights moved (training continued), the parent is untouched
    assert not torch.equal(run.model.item_tower.id_embedding.weight[: len(parent.items)],
                           parent.model.item_tower.id_embedding.weight)
    Run(d / "run")  # still verifies
    # counts continued: parent's + the new interactions that are not repeats (decay 1)
    fresh = new.drop_duplicates(["user", "item"])
    counts = np.bincount(run.items.encode(fresh["item"].to_numpy()), minlength=len(run.items))
    np.testing.assert_array_equal(run.item_counts, np.r_[parent.item_counts, np.zeros(len(listed), int)] + counts)
    # what the run knows grew by the new interactions: a new user's history is theirs, in time order
    u = new_users[0]
    mine = new[new["user"] == u].drop_duplicates("item")
    assert run.history_of(u).tolist() == mine["item"].tolist()

    rec = Recommender.load(run)  # served at once, through the rebuilt index
    assert rec.index.kind == "flat" and rec.index.n_items == len(run.items)
    r = rec.recommend(Query(user=u, k=10))
    assert len(r.items) == 10 and not set(r.items.tolist()) & set(mine["item"])
    # a new item is retrievable: the query along its own vector finds it first among the items
    j = run.items.encode([new_items[0]])[0]
    q = rec.index.layout.queries(rec.index.vectors[j : j + 1, : rec.dim], 0.0)
    assert j in rec.index.search(q, 5)[1][0]
    # and a new item reaches a user: some new user's top 50 holds some new item
    tops = run.recommend(new_users[:50], k=50)
    assert tops["item"].isin(new_items).any()


def test_a_second_update_continues_the_first(base_run, tmp_path):
    from twotower.run import Run
    from twotower.update import update
    from twotower.config import UpdateConfig

    d = base_run
    new = pd.read_csv(d / "new.csv")
    half = len(new) // 2
    first = update(d / "run", new.iloc[:half], tmp_path / "a", cfg=UpdateConfig(epochs=1, count_decay=0.5),
                   items=None, log=lambda m: None)
    second = update(first.run_dir, new.iloc[half:], tmp_path / "b", log=lambda m: None)
    a, b = Run(tmp_path / "a"), Run(tmp_path / "b")
    assert b.dir.read_lineage()["generation"] == 2 and b.dir.read_lineage()["parent"] == str((tmp_path / "a").resolve())
    assert b.config.update.count_decay == 0.5  # the parent's settings, unless given
    assert second.new_pairs > 0 and len(b.items) >= len(a.items)
    # the step count carried on through the checkpoint each update writes
    from twotower.run_dir import RunDir
    s_a = RunDir(tmp_path / "a").load_checkpoint().state["step"]
    s_b = RunDir(tmp_path / "b").load_checkpoint().state["step"]
    assert s_b > s_a > 0


@pytest.mark.slow
def test_replay_prevents_forgetting(tmp_path_factory, data_dir):
    """Old users' recall on their held-out items after an update on other users only: without
    replay it drops; with replay it stays near where it was. Fails if replay did nothing."""
    from twotower import RunConfig, train
    from twotower.config import EvalConfig, UpdateConfig
    from twotower.data.dataset import Dataset, Split
    from twotower.evaluation.evaluator import evaluate
    from twotower.run import Run
    from twotower.update import update

    d = tmp_path_factory.mktemp("forget")
    frame = _ml_frame(data_dir)
    old = frame[frame["user"] % 2 == 1]
    other = frame[frame["user"] % 2 == 0]  # a disjoint set of users
    old.to_csv(d / "old.csv", index=False)
    cfg = RunConfig.from_dict({
        "data": {"dataset": "files", "interactions": str(d / "old.csv"), "split": "random", "test_fraction": 0.2,
                 "valid_fraction": 0.0},
        "model": {"dim": 32}, "train": {"epochs": 8, "batch_size": 512, "lr": 0.005, "patience": 0}, "eval": {"ks": [20]}})
    train(cfg, d / "run", quiet=True, log=lambda m: None)

    def old_users_recall(path):
        run = Run(path)
        test = run.heldout()[1]
        rows = np.repeat(np.arange(test.n_rows), test.lengths())
        known = run.known
        krows = np.repeat(np.arange(known.n_rows), known.lengths())
        tr = Split(krows, known.indices)
        ds = Dataset("old users", run.users, run.items, tr, tr.take(np.zeros(len(tr), bool)), Split(rows, test.indices))
        return evaluate(run.model, ds, "test", EvalConfig(ks=[20]), None)["recall@20"]

    before = old_users_recall(d / "run")
    settings = dict(epochs=6, lr=0.02)
    update(d / "run", other, d / "no-replay", cfg=UpdateConfig(replay=0.0, **settings), log=lambda m: None)
    update(d / "run", other, d / "replay", cfg=UpdateConfig(replay=1.0, **settings), log=lambda m: None)
    without, with_ = old_users_recall(d / "no-replay"), old_users_recall(d / "replay")
    print(f"old users' recall@20: before {before:.4f}, updated without replay {without:.4f}, with replay {with_:.4f}")
    # measured: before 0.276, without replay 0.235 (-15 %), with replay 0.323
    assert without < 0.9 * before  # forgetting, measurable
    assert with_ > 0.97 * before and with_ > without * 1.2  # replay keeps what the run knew


# ---- bad input ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def features_only_run(tmp_path_factory):
    """A tiny synthetic run whose item tower has no id table: items are their features alone."""
    from twotower import RunConfig, train

    out = tmp_path_factory.mktemp("featonly") / "run"
    cfg = RunConfig.from_dict({"data": {"dataset": "synthetic", "synthetic_users": 200, "synthetic_items": 100},
                               "model": {"dim": 8, "item_id": False, "item_features": "all"},
                               "train": {"epochs": 1, "batch_size": 256}, "eval": {"ks": [10]}})
    train(cfg, out, quiet=True, log=lambda m: None)
    return out


def _nothing_written(folder: Path, before: set) -> bool:
    return set(p.name for p in folder.iterdir()) == before


def test_bad_inputs_are_refused_with_nothing_written(features_only_run, synthetic_run, tmp_path, capsys):
    from twotower.cli import main
    from twotower.run import Run

    run = Run(synthetic_run)
    u, i = run.users.ids[0], run.items.ids[0]
    before = set(p.name for p in tmp_path.iterdir())

    # an interactions file without the user column
    (tmp_path / "nocol.csv").write_text(f"who,item\n{u},{i}\n")
    before = set(p.name for p in tmp_path.iterdir())
    assert main(["update", str(synthetic_run), "--interactions", str(tmp_path / "nocol.csv"), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "user" in err and err.count("\n") == 1 and _nothing_written(tmp_path, before)

    # new items with no features, for a tower that has no id table and no history to learn them from
    feat_run = Run(features_only_run)
    (tmp_path / "newitem.csv").write_text(f"user,item\n{feat_run.users.ids[0]},999999\n")
    before = set(p.name for p in tmp_path.iterdir())
    assert main(["update", str(features_only_run), "--interactions", str(tmp_path / "newitem.csv"), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "999999" in err and "no features" in err and _nothing_written(tmp_path, before)

    # only pairs the run knows: nothing to learn
    k = run.known
    uu = int(np.flatnonzero(k.lengths())[0])
    (tmp_path / "known.csv").write_text(f"user,item\n{run.users.ids[uu]},{run.items.ids[k.row(uu)[0]]}\n")
    before = set(p.name for p in tmp_path.iterdir())
    assert main(["update", str(synthetic_run), "--interactions", str(tmp_path / "known.csv"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "already known" in capsys.readouterr().err and _nothing_written(tmp_path, before)

    # an update setting out of bounds, or not an update setting
    (tmp_path / "ok.csv").write_text(f"user,item\n{u},{i}\n")
    before = set(p.name for p in tmp_path.iterdir())
    for bad, said in (("update.replay=-1", "update.replay:"), ("train.lr=0.1", "update.* settings"),
                      ("update.replay_focus=2", "update.replay_focus: Input should be less than or equal to 1 (got 2)"),
                      ("update.replay_fokus=1", "update.replay_fokus: unknown setting")):
        assert main(["update", str(synthetic_run), "--interactions", str(tmp_path / "ok.csv"), "--out",
                     str(tmp_path / "o"), "--set", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("twotower update: error:") and said in err, err
    assert _nothing_written(tmp_path, before)

    # --out that exists
    (tmp_path / "taken").mkdir()
    assert main(["update", str(synthetic_run), "--interactions", str(tmp_path / "ok.csv"), "--out",
                 str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err

    # a damaged run
    damaged = tmp_path / "damaged"
    shutil.copytree(synthetic_run, damaged)
    w = damaged / "model.safetensors"
    b = bytearray(w.read_bytes())
    b[-1] ^= 0xFF
    w.write_bytes(bytes(b))
    before = set(p.name for p in tmp_path.iterdir())
    assert main(["update", str(damaged), "--interactions", str(tmp_path / "ok.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "model.safetensors" in capsys.readouterr().err and _nothing_written(tmp_path, before)


def test_fold_in_rows_by_hand():
    from twotower.update import fold_in_rows

    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # owner 0 interacted with targets 0 and 1: mean (0.5, 0.5), scaled to norm 2; owner 1 none; owner 2 with 2
    have, rows = fold_in_rows(v, np.array([0, 0, 2]), np.array([0, 1, 2]), 3, 2.0)
    assert have.tolist() == [0, 2]
    torch.testing.assert_close(rows, torch.tensor([[2 ** 0.5, 2 ** 0.5], [-2.0, 0.0]]))


# ---- retirement (update.retire_after) --------------------------------------------------------------
def test_retired_by_hand():
    from twotower.update import retired

    seen = np.array([0, 1, 2, 3, 0])
    # generation 3, horizon 2: untouched for 2 updates or more (seen at 0 or 1) -> retired
    assert retired(seen, 3, 2).tolist() == [True, True, False, False, True]
    assert retired(seen, 3, None).tolist() == [False] * 5                     # never
    before = np.array([False, False, True, False, False])
    assert retired(seen, 3, None, before).tolist() == [False, False, True, False, False]  # stays retired
    touched = np.array([True, False, True, False, False])                      # came back: active again
    assert retired(seen, 3, 2, before, touched).tolist() == [False, True, False, False, True]


def test_retirement_of_an_ids_only_run(synthetic_run, tmp_path):
    """Users and items no update touched for ``retire_after`` updates: rows reset, pairs out of the
    replay, items out of the index and the recommendations, users of an ids-only tower refused
    clearly; one that comes back is active again."""
    from twotower.config import UpdateConfig
    from twotower.run import Run
    from twotower.serving.query import Query, Recommender
    from twotower.update import update

    parent = Run(synthetic_run)
    rng = np.random.default_rng(0)
    users, items = parent.users.ids[:40], parent.items.ids[:50]
    new = pd.DataFrame({"user": rng.choice(users, 400), "item": rng.choice(items, 400)})
    res = update(synthetic_run, new, tmp_path / "r1", cfg=UpdateConfig(epochs=1, retire_after=1), build_index=True,
                 log=lambda m: None)
    run = Run(tmp_path / "r1")
    act = run.activity
    touched_u = np.isin(run.users.ids, new["user"].unique())
    touched_i = np.isin(run.items.ids, new["item"].unique())
    np.testing.assert_array_equal(act.users_retired, ~touched_u)
    np.testing.assert_array_equal(act.items_retired, ~touched_i)
    assert (act.users_seen[touched_u] == 1).all() and (act.users_seen[~touched_u] == 0).all()
    assert res.retired_items == int((~touched_i).sum()) > 0 and run.dir.read_lineage()["retired_users"] == res.retired_users
    # the replay drew only pairs whose user and item are both still active
    known = parent.known
    pairs_u = np.repeat(np.arange(known.n_rows), known.lengths())
    live = int((touched_u[pairs_u] & touched_i[known.indices]).sum())
    assert 0 < res.replayed <= live
    # the retired rows are the unknown entity's (zero in a tower without id dropout)
    w = run.model.item_tower.id_embedding.weight.detach()
    assert not w[torch.from_numpy(act.items_retired)].any() and w[torch.from_numpy(~act.items_retired)].abs().sum() > 0
    # retired items: out of the saved index, the exact index and Run.recommend
    rec = Recommender.load(run)
    assert rec.index.kind == "flat" and not rec.index.contains(np.flatnonzero(act.items_retired)).any()
    counts = rec.metadata()["counts"]  # GET /metadata says how many are retired
    assert counts["retired_items"] == res.retired_items and counts["retired_users"] == res.retired_users
    active_user = run.users.ids[np.flatnonzero(touched_u)[0]]
    got = rec.recommend(Query(user=active_user, k=30, exclude_seen=False))
    assert not np.isin(got.items, run.items.ids[act.items_retired]).any()
    tops = run.recommend([active_user], k=200, exclude_seen=False)
    assert len(tops) == int(touched_i.sum()) and not tops["item"].isin(run.items.ids[act.items_retired]).any()
    # a retired user of an ids-only tower is refused with what to do instead
    gone = run.users.ids[np.flatnonzero(act.users_retired)[0]]
    from twotower.serving.query import UnknownUserError
    with pytest.raises(UnknownUserError, match=r"retired by an update .* reads ids alone\. Send \{\"history\""):
        rec.recommend(Query(user=gone, k=5))
    # the next update brings one back: active again, the others stay retired
    back = pd.DataFrame({"user": [gone, gone], "item": [run.items.ids[np.flatnonzero(act.items_retired)[0]], items[0]]})
    update(tmp_path / "r1", back, tmp_path / "r2", cfg=UpdateConfig(epochs=1, retire_after=5), log=lambda m: None)
    act2 = Run(tmp_path / "r2").activity
    g = run.users.encode([gone])[0]
    assert not act2.users_retired[g] and act2.users_seen[g] == 2
    assert act2.users_retired.sum() == act.users_retired.sum() - 1 and act2.items_retired.sum() == act.items_retired.sum() - 1


@pytest.mark.slow
def test_a_retired_user_of_a_history_tower_is_answered_from_its_history(base_run, tmp_path):
    from twotower.config import UpdateConfig
    from twotower.run import Run
    from twotower.serving.query import Query, Recommender
    from twotower.update import update

    d = base_run
    new = pd.read_csv(d / "new.csv")
    update(d / "run", new, tmp_path / "r", items=d / "new_items.csv", cfg=UpdateConfig(epochs=1, retire_after=1),
           log=lambda m: None)
    run = Run(tmp_path / "r")
    act = run.activity
    assert act.users_retired.any() and act.items_retired.any() and not act.users_retired[np.isin(run.users.ids, new["user"])].any()
    # admitted from the item table without interactions: touched now (new), not retired
    assert not act.items_retired[len(Run(d / "run").items):].any()
    gone = run.users.ids[np.flatnonzero(act.users_retired)[0]]
    r = Recommender.load(run).recommend(Query(user=gone, k=20))
    assert len(r.items) == 20
    assert not np.isin(r.items, run.items.ids[act.items_retired]).any()


def test_served_score_without_items_by_hand():
    """``ServedScore.without``: the masked items' term is -inf, the others score and rank as before."""
    from twotower.model.scoring import ServedScore

    f = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]])
    mask = np.array([True, False, False])
    plain = ServedScore(0.5)
    s = plain.without(mask, 3)
    ranked = s.query(f) @ g.T + s.terms
    assert torch.isinf(ranked[0, 0]) and ranked[0, 0] < 0
    torch.testing.assert_close(s.finish(ranked)[0, 1:], torch.tensor([1.0, 0.2]))     # <f, g>/tau, as without the mask
    biased = ServedScore(0.5, torch.tensor([0.0, 1.0, -1.0]))
    b = biased.without(mask, 3)
    torch.testing.assert_close((b.query(f) @ g.T + b.terms)[0, 1:], torch.tensor([2.0, -0.8]))  # <f, g>/tau + b_j
    assert biased.without(np.zeros(3, bool), 3) is biased and biased.terms[0] == 0.0  # nothing masked; never in place
