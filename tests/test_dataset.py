"""Vocabularies, splits, CSR helpers, batching and the no-leakage guarantee of training histories."""
import numpy as np
import pandas as pd
import pytest

from twotower.config import DataConfig
from twotower.data.dataset import CSR, Dataset, Split
from twotower.data.sources import build_dataset, load_dataset
from twotower.data.splits import last_n_holdout, random_holdout, rank_within_user
from twotower.data.vocab import Vocabulary
from twotower.training.batching import epoch_batches


def test_vocabulary_round_trip_and_unknown():
    v = Vocabulary.from_values(np.array([30, 10, 20, 10]), name="user")
    assert v.ids.tolist() == [10, 20, 30]
    assert v.encode(np.array([20, 99])).tolist() == [1, -1]
    assert v.encode(["30"]).tolist() == [2]  # strings from a CLI find integer ids
    assert v.decode([2, 0]).tolist() == [30, 10]
    assert Vocabulary.from_json(v.to_json()) == v
    s = Vocabulary.from_values(np.array(["b", "a"], dtype=object))
    assert s.encode(["a", "zz"]).tolist() == [0, -1]
    with pytest.raises(KeyError):
        s.encode(["zz"], strict=True)


def test_rank_within_user():
    users = np.array([1, 0, 1, 1, 0])
    key = np.array([5.0, 2.0, 1.0, 3.0, 1.0])
    rank, count = rank_within_user(users, key)
    assert rank.tolist() == [2, 1, 0, 1, 0]
    assert count.tolist() == [3, 2, 3, 3, 2]


def test_random_holdout_fraction_and_min_keep():
    users = np.repeat(np.arange(3), [10, 1, 5])
    held = random_holdout(users, 0.2, np.random.default_rng(0))
    assert held[users == 0].sum() == 2
    assert held[users == 1].sum() == 0  # a single interaction stays in training
    assert held[users == 2].sum() == 1
    again = random_holdout(users, 0.2, np.random.default_rng(0))
    assert (held == again).all()


def test_last_n_holdout_takes_latest():
    users = np.array([0, 0, 0, 1, 1])
    t = np.array([3.0, 1.0, 2.0, 9.0, 8.0])
    held = last_n_holdout(users, t, 1)
    assert held.tolist() == [True, False, False, True, False]
    assert last_n_holdout(np.array([0]), np.array([1.0]), 1).tolist() == [False]


def test_csr_gather_last_union_dense():
    c = CSR.from_pairs(np.array([1, 0, 1, 1]), np.array([5, 6, 7, 8]), 3)
    vals, offs = c.gather(np.array([1, 0, 2]))
    assert vals.tolist() == [5, 7, 8, 6] and offs.tolist() == [0, 3, 4]
    items, mask = c.last(np.array([1, 2]), 2)
    assert items[0].tolist() == [7, 8] and mask.tolist() == [[True, True], [False, False]]
    u = c.union(CSR.from_pairs(np.array([2]), np.array([9]), 3))
    assert u.row(2).tolist() == [9] and u.row(1).tolist() == [5, 7, 8]
    d = c.to_dense_mask(np.array([0, 1]), 10)
    assert d[0].nonzero().ravel().tolist() == [6] and d[1].nonzero().ravel().tolist() == [5, 7, 8]


def _toy(timestamps: bool) -> Dataset:
    # user 0 re-interacts with item 2 (duplicate kept on purpose to test the target filter)
    users = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    items = np.array([1, 2, 3, 2, 4, 5, 6, 7])
    ts = np.array([10.0, 20.0, 30.0, 40.0, 50.0, 3.0, 1.0, 2.0]) if timestamps else None
    train = Split(users, items, ts)
    empty = Split(np.array([], np.int64), np.array([], np.int64), np.array([]) if timestamps else None)
    return Dataset("toy", Vocabulary(np.arange(2)), Vocabulary(np.arange(8)), train, empty, empty)


def test_history_is_time_ordered_and_leak_free_with_timestamps():
    ds = _toy(timestamps=True)
    rng = np.random.default_rng(0)
    hist, mask = ds.pair_history(np.arange(len(ds.train)), 3, rng)
    tr = ds.train
    for k in range(len(tr)):
        h = set(hist[k][mask[k]].tolist())
        assert tr.items[k] not in h
        before = tr.items[(tr.users == tr.users[k]) & (tr.timestamps < tr.timestamps[k])]
        later = tr.items[(tr.users == tr.users[k]) & (tr.timestamps > tr.timestamps[k])]
        assert h <= set(before.tolist())
        assert not (h & (set(later.tolist()) - set(before.tolist())))
    # user 0's last pair (item 4 at t=50) sees the 3 most recent earlier items, oldest first: t=20, 30, 40
    k = int(np.flatnonzero((tr.users == 0) & (tr.items == 4))[0])
    assert hist[k][mask[k]].tolist() == [2, 3, 2]
    # the second interaction with item 2 (t=40) must not see the first one (same target item)
    k = int(np.flatnonzero((tr.users == 0) & (tr.timestamps == 40.0))[0])
    assert 2 not in hist[k][mask[k]].tolist() and set(hist[k][mask[k]].tolist()) == {1, 3}


def test_history_without_timestamps_never_contains_target():
    ds = _toy(timestamps=False)
    rng = np.random.default_rng(1)
    for length in (1, 2, 10):
        for _ in range(20):
            hist, mask = ds.pair_history(np.arange(len(ds.train)), length, rng)
            for k in range(len(ds.train)):
                h = hist[k][mask[k]]
                assert ds.train.items[k] not in h.tolist()
                mine = set(ds.train.items[ds.train.users == ds.train.users[k]].tolist())
                assert set(h.tolist()) <= mine


def test_history_leak_free_on_real_data(data_dir):
    cfg = DataConfig(dataset="ml-100k", split="temporal", leave_last=1)
    ds = load_dataset(cfg, data_dir)
    rng = np.random.default_rng(0)
    pairs = rng.choice(len(ds.train), 5000, replace=False)
    hist, mask = ds.pair_history(pairs, 50, rng)
    tr = ds.train
    for row, k in enumerate(pairs[:500]):
        items = hist[row][mask[row]]
        user_rows = np.flatnonzero(tr.users == tr.users[k])
        later = tr.items[user_rows[tr.timestamps[user_rows] > tr.timestamps[k]]]
        earlier = tr.items[user_rows[tr.timestamps[user_rows] <= tr.timestamps[k]]]
        assert set(items.tolist()) <= set(earlier.tolist())


def test_epoch_batches_cover_all_pairs_and_unique_users():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(50), np.arange(1, 51))
    batches = epoch_batches(len(users), 16, rng, users)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(users)))
    for b in batches:
        assert len(b) <= 16 and len(np.unique(users[b])) == len(b)
    plain = epoch_batches(100, 32, np.random.default_rng(0))
    assert [len(b) for b in plain] == [32, 32, 32, 4]
    assert sorted(np.concatenate(plain).tolist()) == list(range(100))


def test_splits_partition_interactions(data_dir):
    for split in ("random", "temporal"):
        ds = load_dataset(DataConfig(dataset="ml-100k", split=split), data_dir)
        total = len(ds.train) + len(ds.valid) + len(ds.test)
        assert total == 100_000
        keys = [set(zip(s.users.tolist(), s.items.tolist())) for s in (ds.train, ds.valid, ds.test)]
        assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    ds = load_dataset(DataConfig(dataset="ml-100k", split="temporal", leave_last=1, valid_leave_last=1), data_dir)
    # every test interaction is at or after the same user's latest training interaction
    last_train = pd.Series(ds.train.timestamps).groupby(ds.train.users).max()
    t = pd.Series(ds.test.timestamps, index=ds.test.users)
    assert (t.values >= last_train.loc[t.index].values).all()


def test_gowalla_given_split(data_dir):
    ds = load_dataset(DataConfig(dataset="gowalla", split="given", valid_fraction=0.1), data_dir)
    assert ds.n_users == 29858 and ds.n_items == 40981
    assert len(ds.train) + len(ds.valid) == 810128 and len(ds.test) == 217242
    assert 0.09 < len(ds.valid) / 810128 < 0.11


def test_build_dataset_string_ids_and_features():
    from twotower.data.readers import Features
    frame = pd.DataFrame({"user": ["u1", "u1", "u2", "u2", "u2"], "item": ["a", "b", "a", "c", "b"]})
    feats = Features(np.array(["a", "b", "c"], dtype=object), {"genre": [["x", "y"], [], ["y"]]})
    cfg = DataConfig(split="random", test_fraction=0.3, valid_fraction=0.0)
    ds = build_dataset("toy", frame, None, feats, None, cfg)
    assert ds.items.ids.tolist() == ["a", "b", "c"]
    g = ds.item_features.rows["genre"]
    vocab = ds.item_features.values["genre"]
    assert vocab.decode(g.row(0)).tolist() == ["x", "y"] and g.row(1).tolist() == []
