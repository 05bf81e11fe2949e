import time

import numpy as np
import pandas as pd
import pytest

from twotower.data.synthetic import SyntheticData, make_synthetic
from twotower.errors import ConfigError

SMALL = dict(n_users=300, n_items=200, n_categories=10, n_clusters=4, interactions_per_user=(5, 30))


@pytest.fixture(scope="module")
def default_data():
    start = time.perf_counter()
    data = make_synthetic()
    return data, time.perf_counter() - start


def test_default_size_is_fast(default_data):
    _, seconds = default_data
    assert seconds < 2.0


def test_same_seed_same_data_different_seed_different_data():
    a, b, c = make_synthetic(**SMALL, seed=3), make_synthetic(**SMALL, seed=3), make_synthetic(**SMALL, seed=4)
    pd.testing.assert_frame_equal(a.interactions.frame, b.interactions.frame)
    np.testing.assert_array_equal(a.true_item_popularity, b.true_item_popularity)
    np.testing.assert_array_equal(a.user_cluster, b.user_cluster)
    np.testing.assert_array_equal(a.item_category, b.item_category)
    assert a.item_features.categorical == b.item_features.categorical
    assert not a.interactions.frame.equals(c.interactions.frame)
    assert not np.array_equal(a.item_category, c.item_category)


def test_shapes_dtypes_and_ids(default_data):
    data, _ = default_data
    assert isinstance(data, SyntheticData)
    frame = data.interactions.frame
    assert list(frame.columns) == ["user", "item", "timestamp"]
    assert all(frame[c].dtype == np.int64 for c in frame.columns)
    assert isinstance(frame.index, pd.RangeIndex)
    assert data.true_item_popularity.shape == (1000,)
    assert data.true_item_popularity.sum() == pytest.approx(1.0)
    assert data.user_cluster.shape == (2000,) and data.user_cluster.max() < 8
    assert data.item_category.shape == (1000,) and data.item_category.max() < 20
    # every user present, 10..60 interactions each; ids start at 0
    counts = frame.groupby("user").size()
    assert counts.index.tolist() == list(range(2000))
    assert counts.min() >= 10 and counts.max() <= 60
    assert frame["item"].min() >= 0 and frame["item"].max() < 1000
    feats = data.item_features
    np.testing.assert_array_equal(feats.ids, np.arange(1000))
    assert len(feats.categorical["category"]) == 1000
    assert feats.categorical["category"][17] == [f"cat {data.item_category[17]}"]
    assert feats.titles[17] == f"item 17 (cat {data.item_category[17]})"
    assert data.interactions.source.startswith("synthetic(")


def test_no_duplicate_user_item_pairs(default_data):
    data, _ = default_data
    assert not data.interactions.frame.duplicated(["user", "item"]).any()


def test_popularity_is_power_law(default_data):
    data, _ = default_data
    counts = np.sort(data.interactions.frame["item"].value_counts().to_numpy())[::-1]
    share_top10 = counts[:100].sum() / counts.sum()
    assert share_top10 > 0.35  # uniform would give ~0.10
    # observed popularity follows the true popularity
    observed = np.bincount(data.interactions.frame["item"], minlength=1000)
    assert np.corrcoef(np.log1p(observed), np.log(data.true_item_popularity))[0, 1] > 0.6


def test_flat_popularity_exponent_zero():
    data = make_synthetic(**SMALL, popularity_exponent=0.0)
    np.testing.assert_allclose(data.true_item_popularity, 1 / 200)


def test_users_concentrate_in_cluster_categories(default_data):
    data, _ = default_data
    frame = data.interactions.frame
    preferred = np.zeros(data.category_affinity.shape, dtype=bool)
    np.put_along_axis(preferred, data.cluster_categories, True, axis=1)
    in_pref = preferred[data.user_cluster[frame["user"]], data.item_category[frame["item"]]]
    base_rate = data.cluster_categories.shape[1] / 20  # share of preferred categories
    assert in_pref.mean() > 0.5 > 2 * base_rate


def test_timestamps_strictly_increasing_per_user(default_data):
    data, _ = default_data
    frame = data.interactions.frame
    assert (frame["user"].diff().fillna(0) >= 0).all()  # sorted by user
    same_user = frame["user"].to_numpy()[1:] == frame["user"].to_numpy()[:-1]
    assert (np.diff(frame["timestamp"].to_numpy())[same_user] > 0).all()


def test_true_scores(default_data):
    data, _ = default_data
    users = np.array([0, 5, 1999])
    scores = data.true_scores(users)
    assert scores.shape == (3, 1000)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0)
    # users of the same cluster share scores; preferred categories score higher without popularity
    same = np.flatnonzero(data.user_cluster == data.user_cluster[0])[:2]
    s = data.true_scores(same)
    np.testing.assert_allclose(s[0], s[1])
    debiased = data.true_scores([0], include_popularity=False)[0]
    pref_cats = data.cluster_categories[data.user_cluster[0]]
    in_pref = np.isin(data.item_category, pref_cats)
    assert debiased[in_pref].min() > debiased[~in_pref].max()
    with pytest.raises(IndexError):
        data.true_scores([2000])


def test_fixed_count_and_clipping():
    data = make_synthetic(n_users=50, n_items=20, n_categories=4, n_clusters=2, interactions_per_user=(20, 100))
    counts = data.interactions.frame.groupby("user").size()
    assert (counts == 20).all()  # capped at n_items, each user has every item once
    data = make_synthetic(**{**SMALL, "interactions_per_user": 7})
    assert (data.interactions.frame.groupby("user").size() == 7).all()


@pytest.mark.parametrize("kwargs", [
    {"n_users": 0},
    {"interactions_per_user": (0, 5)},
    {"interactions_per_user": (9, 3)},
    {"interactions_per_user": (500, 600)},
    {"popularity_exponent": -1.0},
    {"background_affinity": 0.0},
])
def test_invalid_arguments(kwargs):
    with pytest.raises(ConfigError):
        make_synthetic(**{**SMALL, **kwargs})
