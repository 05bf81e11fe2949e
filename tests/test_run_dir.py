"""The run directory's one owner (``RunDir``): a run written through it loads as a ``Run`` whose
towers, fitted feature state included, equal the model that wrote it; serving answers a new user's
history and features through that same user tower; checkpoints go back and forth whole."""
import math

import numpy as np
import pytest
import torch

from twotower.config import RunConfig
from twotower.data.dataset import CSR, EncodedFeatures
from twotower.data.vocab import Vocabulary
from twotower.model.towers import TwoTowerModel, embed_items
from twotower.run import Run
from twotower.run_dir import RunDir


def _feature(name, values, indptr, codes):
    return EncodedFeatures({name: Vocabulary(values, name=name)}, {name: CSR(np.array(indptr), np.array(codes))})


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Four users (ids 10..13, ages a, c, -, b) and six items (ids 100..105, genres x; x, y; y; -; y; x)."""
    cfg = RunConfig.from_dict({"data": {"dataset": "synthetic"},
                               "model": {"dim": 8, "user_history": True, "user_features": ["age"],
                                         "item_features": ["genre"], "mlp": [8]}})
    users, items = Vocabulary(np.arange(10, 14), name="user"), Vocabulary(np.arange(100, 106), name="item")
    ages = _feature("age", ["a", "b", "c"], [0, 1, 2, 2, 3], [0, 2, 1])
    genres = _feature("genre", ["x", "y"], [0, 1, 3, 4, 4, 5, 6], [0, 0, 1, 1, 1, 0])
    torch.manual_seed(0)
    model = TwoTowerModel(4, 6, cfg.model, genres, ages).eval()
    known = CSR.from_pairs(np.array([0, 0, 1, 2, 3]), np.array([0, 1, 2, 3, 5]), 4)
    d = RunDir(tmp_path_factory.mktemp("rundir") / "run")
    d.write_description(cfg, users, items, known, np.array([5, 4, 3, 2, 1, 0]), np.array([1, 3]), model.feature_state())
    d.save_weights(model.state_dict())
    d.finish({"valid": {}, "test": None}, embed_items(model).numpy())
    return d, model


def test_a_run_written_through_rundir_loads_with_the_same_towers(written):
    d, model = written
    run = Run(d.path)
    with torch.no_grad():
        torch.testing.assert_close(embed_items(run.model), embed_items(model))
        x = [np.arange(4), run.known]
        torch.testing.assert_close(run.model.user_vectors(run.model.user_inputs(*x)), model.user_vectors(model.user_inputs(*x)))
    assert run.item_feature_values() == {"genre": ["x", "y"]}
    assert run.items.decode(run.item_category_items("genre", "y")).tolist() == [101, 102, 104]
    assert run.test_users.tolist() == [1, 3] and run.item_counts.tolist() == [5, 4, 3, 2, 1, 0]
    assert d.model_digest() is not None and d.index_dir == d.path / "index"


def test_serving_places_a_new_user_by_history_and_features_through_the_user_tower(written):
    from twotower.serving.query import Query, Recommender

    d, model = written
    rec = Recommender.load(Run(d.path))
    r = rec.recommend(Query(history=[100, 101], features={"age": ["b", "zz"]}, k=3))
    assert r.unknown_features == {"age": ["zz"]} and r.fallback is None
    assert not {100, 101} & set(r.items.tolist())  # seen items excluded
    with torch.no_grad():
        # "zz" is out of the vocabulary: it is reported, and takes the out-of-vocabulary bucket in the mean
        f = model.user_vectors(model.user_inputs(np.array([-1]), [np.array([0, 1])], [{"age": ["b", "zz"]}]))[0]
        g = embed_items(model)
    tau = float(model.temperature)
    expected = {int(100 + j): float(f @ g[j]) / tau for j in range(2, 6)}
    best = sorted(expected, key=expected.get, reverse=True)[:3]
    assert r.items.tolist() == best
    np.testing.assert_allclose(r.scores, [expected[i] for i in best], rtol=1e-5)
    # features alone: the tower could place the user, but the service still answers by popularity
    # (the current policy), and says which values it could not place
    p = rec.recommend(Query(history=[], features={"age": "nope"}, k=2))
    assert p.fallback == "popularity" and p.unknown_features == {"age": ["nope"]}


def test_a_checkpoint_goes_back_and_forth_whole(tmp_path):
    d = RunDir(tmp_path / "run")
    last, best = {"w": torch.arange(3.0)}, {"w": torch.ones(3)}
    state = {"epoch": 2, "best_value": -math.inf, "history": [{"epoch": 1}, {"epoch": 2}]}
    d.save_checkpoint(last, best, {"0": {"state": {}, "param_groups": []}}, state, {"bank": torch.zeros(2)})
    assert d.checkpoint_dir() == d.path / "checkpoint" and d.holds_run()
    ck = d.load_checkpoint()
    assert torch.equal(ck.last["w"], last["w"]) and torch.equal(ck.best["w"], best["w"])
    assert ck.state == state and torch.equal(ck.negatives["bank"], torch.zeros(2))
    d.save_checkpoint(last, None, {}, {"epoch": 3, "best_value": 0.5})
    ck = d.load_checkpoint()
    assert ck.state["epoch"] == 3 and ck.best is None and ck.negatives is None
    d.clear_progress()
    assert d.checkpoint_dir() is None and not d.holds_run()
