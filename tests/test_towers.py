"""The towers' building blocks against hand-computed cases."""
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
