"""RowAdam reproduces torch.optim.SparseAdam, touching only the rows a step used."""
import torch
from torch import nn

from twotower.training.optim import RowAdam


def test_row_adam_matches_sparse_adam_and_leaves_untouched_rows_alone():
    torch.manual_seed(0)
    a = nn.Embedding(50, 4, sparse=True)
    b = nn.Embedding(50, 4, sparse=True)
    b.load_state_dict(a.state_dict())
    oa, ob = torch.optim.SparseAdam(a.parameters(), lr=0.05), RowAdam(b.parameters(), lr=0.05)
    for step in range(6):
        ix = torch.randint(0, 40, (25,))  # repeated rows: their gradients must be summed
        for emb, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            (emb(ix) ** 2 * torch.arange(1, 5)).sum().backward()
            opt.step()
        assert torch.allclose(a.weight, b.weight, atol=1e-6)
    before = b.weight[40:].clone()
    assert torch.equal(before, a.weight[40:])  # rows 40.. were never looked up: unchanged
    # State has SparseAdam's keys and shapes, so either optimizer loads the other's checkpoint.
    oa.load_state_dict(ob.state_dict())
    assert set(ob.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_row_adam_refuses_dense_gradients():
    emb = nn.Embedding(5, 2)
    opt = RowAdam(emb.parameters())
    emb(torch.tensor([1])).sum().backward()
    try:
        opt.step()
    except RuntimeError as e:
        assert "sparse" in str(e)
    else:
        raise AssertionError("dense gradient accepted")
