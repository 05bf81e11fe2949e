"""The towers' building blocks against hand-computed cases, and their one forward for every kind of user."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from twotower.model.towers import l2_normalize


def test_l2_normalize_by_hand():
    # x = (3, 4): y = (0.6, 0.8); g = (1, 0): <g, y> = 0.6, dL/dx = (g - 0.6 y) / 5 = (0.128, -0.096).
    # A zero row is divided by eps, and so is its gradient (the clamp is constant there).
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    y = l2_normalize(x, eps=1e-3)
    y.backward(torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64))
    assert torch.allclose(y, torch.tensor([[0.6, 0.8], [0.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(x.grad, torch.tensor([[0.128, -0.096], [1e3, 2e3]], dtype=torch.float64))


def test_l2_normalize_matches_f_normalize_in_value_and_gradient():
    torch.manual_seed(0)
    x = torch.randn(50, 7, dtype=torch.float64)
    x[3] = 0.0
    x[4] *= 1e-14  # below eps: clamped
    g = torch.randn(50, 7, dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = l2_normalize(a), F.normalize(b, dim=-1)
    ya.backward(g)
    yb.backward(g)
    assert torch.allclose(ya, yb)
    assert torch.allclose(a.grad, b.grad)


def test_user_tower_is_a_function_of_the_user_id_only_without_history_or_dropout():
    # the trainer lets the loss score a batch's rows of one user once only when this holds
    from twotower.config import ModelConfig
    from twotower.model.towers import UserTower

    assert UserTower(10, 20, ModelConfig(dim=4), None).deterministic
    assert UserTower(10, 20, ModelConfig(dim=4, mlp=[8]), None).deterministic
    assert not UserTower(10, 20, ModelConfig(dim=4, mlp=[8], dropout=0.2), None).deterministic
    assert not UserTower(10, 20, ModelConfig(dim=4, user_history=True, share_item_table=False), None).deterministic


def _age_model(mlp, history=True):
    """A user tower with history and one categorical user feature: ages of users 0..3 are
    a, c, (none), b."""
    from twotower.config import ModelConfig
    from twotower.data.dataset import CSR, EncodedFeatures
    from twotower.data.vocab import Vocabulary
    from twotower.model.towers import TwoTowerModel

    torch.manual_seed(0)
    feats = EncodedFeatures({"age": Vocabulary(["a", "b", "c"], name="age")},
                            {"age": CSR(np.array([0, 1, 2, 2, 3]), np.array([0, 2, 1]))})
    cfg = ModelConfig(dim=8, user_history=history, user_features=["age"], mlp=mlp)
    return TwoTowerModel(4, 30, cfg, None, feats).eval()


@pytest.mark.parametrize("mlp", [[], [8]])
def test_a_new_user_goes_through_the_user_tower_with_a_zero_id_contribution(mlp):
    """A user not in the vocabulary (id -1) with a history and raw feature values gets exactly the
    vector a known user with the same history and stored features gets once its id embedding is
    zero: the same forward, built from raw values by ``user_inputs``."""
    model = _age_model(mlp)
    with torch.no_grad():
        model.user_tower.id_embedding.weight.zero_()
    users = torch.tensor([0, 1, 2, 3])
    hist = torch.tensor([[3, 4, 0], [5, 0, 0], [7, 8, 9], [1, 2, 0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        expected = model.encode_users(users, hist, mask)
        x = model.user_inputs(np.full(4, -1), [np.array([3, 4]), np.array([5]), np.array([7, 8, 9]), np.array([1, 2])],
                              [{"age": "a"}, {"age": ["c"]}, None, {"age": "b"}], history_length=3)
        got = model.user_vectors(x)
    torch.testing.assert_close(got, expected)
    assert x.unknown_features == [{}, {}, {}, {}]


def test_user_inputs_keep_the_last_items_and_report_unplaceable_feature_values():
    model = _age_model([])
    x = model.user_inputs(np.array([-1, -1]), [np.array([1, 2, 3, 4]), np.array([], dtype=np.int64)],
                          [{"age": ["a", "zz"]}, {}], history_length=3)
    assert x.history.tolist() == [[2, 3, 4], [0, 0, 0]]
    assert x.history_mask.tolist() == [[True, True, True], [False, False, False]]
    assert x.unknown_features == [{"age": ["zz"]}, {}]
    # "a" is code 0; "zz" goes to the out-of-vocabulary code (3: after a, b, c) and the user without an
    # age gets the missing code (4)
    assert x.features["age"].codes.tolist() == [0, 3, 4] and x.features["age"].offsets.tolist() == [0, 2]
    with pytest.raises(KeyError, match="unknown feature"):
        model.user_inputs(np.array([-1]), None, [{"height": 3}])


def test_features_alone_place_a_new_user_and_different_features_differ():
    """A features-only new user (no history, no id) is the tower's forward of its features alone."""
    model = _age_model([8])
    with torch.no_grad():
        x = model.user_inputs(np.array([-1, -1, -1]), None, [{"age": "a"}, {"age": "b"}, None])
        f = model.user_vectors(x)
        bags = model.user_tower.features["age"].bag.weight
        by_hand = F.normalize(model.user_tower.mlp(bags[[0, 1]]), dim=-1)
    torch.testing.assert_close(f[:2], by_hand)
    assert not torch.allclose(f[0], f[1])


def test_an_unknown_id_contributes_nothing_and_known_ids_are_looked_up():
    from twotower.config import ModelConfig
    from twotower.model.towers import TwoTowerModel

    torch.manual_seed(0)
    model = TwoTowerModel(3, 5, ModelConfig(dim=4, user_history=True)).eval()
    with torch.no_grad():
        x = model.user_inputs(np.array([2, -1]), [np.array([1, 3]), np.array([1, 3])])
        f = model.user_vectors(x)
        e = model.user_tower.id_embedding.weight
        g = model.item_tower.id_embedding.weight
        pooled = (g[1] + g[3]) / 2
    torch.testing.assert_close(f[0], F.normalize(e[2] + pooled, dim=-1))
    torch.testing.assert_close(f[1], F.normalize(pooled, dim=-1))


def test_new_user_of_an_ids_only_tower_is_folded_in_from_item_vectors():
    from twotower.config import ModelConfig
    from twotower.model.towers import TwoTowerModel

    model = TwoTowerModel(3, 10, ModelConfig(dim=4, user_history=False)).eval()
    g = F.normalize(torch.randn(10, 4), dim=-1)
    with torch.no_grad():
        x = model.user_inputs(np.array([-1, 1]), [np.array([1, 2]), np.array([4])])
        got = model.user_vectors(x, g)
    torch.testing.assert_close(got[0], F.normalize(g[1] + g[2], dim=-1))
    torch.testing.assert_close(got[1], F.normalize(model.user_tower.id_embedding.weight[1], dim=-1))  # known: its id


def test_the_towers_restore_their_feature_state():
    """``feature_state`` and ``from_state`` rebuild the same model with no knowledge of how each
    feature stores its state; the state dict holds weights only."""
    from twotower.config import ModelConfig
    from twotower.data.dataset import CSR, EncodedFeatures
    from twotower.data.vocab import Vocabulary
    from twotower.model.towers import TwoTowerModel, embed_items

    genres = EncodedFeatures({"genre": Vocabulary(["x", "y"], name="genre")},
                             {"genre": CSR(np.array([0, 2, 3, 3]), np.array([0, 1, 1]))})
    cfg = ModelConfig(dim=6, user_history=True, item_features=["genre"], user_features=["age"])
    model = _age_model([])
    model = TwoTowerModel(4, 3, cfg, genres, model.user_tower.features.fitted()).eval()
    state = model.feature_state()
    assert [f["name"] for f in state.meta["item"]] == ["genre"] and state.meta["item"][0]["values"] == ["x", "y"]
    assert not any("indptr" in k or "codes" in k for k in model.state_dict())
    back = TwoTowerModel.from_state(4, 3, cfg, state)
    back.load_state_dict(model.state_dict())
    back.eval()
    torch.testing.assert_close(embed_items(back), embed_items(model))
    with torch.no_grad():
        x = [np.array([0, 1, 2, 3]), None]
        torch.testing.assert_close(back.user_vectors(back.user_inputs(*x)), model.user_vectors(model.user_inputs(*x)))
    assert back.item_tower.features["genre"].entities_with("y").tolist() == [0, 1]


def test_a_new_item_is_placed_by_its_features_through_the_item_tower():
    from twotower.config import ModelConfig
    from twotower.data.dataset import CSR, EncodedFeatures
    from twotower.data.vocab import Vocabulary
    from twotower.model.towers import TwoTowerModel

    torch.manual_seed(0)
    genres = EncodedFeatures({"genre": Vocabulary(["x", "y"], name="genre")},
                             {"genre": CSR(np.array([0, 1, 3, 3]), np.array([0, 0, 1]))})
    model = TwoTowerModel(2, 3, ModelConfig(dim=4, item_features=["genre"], mlp=[8]), genres).eval()
    with torch.no_grad():
        model.item_tower.id_embedding.weight.zero_()
        known = model.encode_items(torch.tensor([0, 1]))
        new = model.item_vectors(model.item_inputs(np.array([-1, -1]), [{"genre": "x"}, {"genre": ["x", "y"]}]))
    torch.testing.assert_close(new, known)
    with pytest.raises(KeyError, match="no features"):
        TwoTowerModel(2, 3, ModelConfig(dim=4)).user_inputs(np.array([-1]), None, [{"age": "a"}])
