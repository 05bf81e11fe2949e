"""RowAdam reproduces torch.optim.SparseAdam, touching only the rows a step used; DeferredAdam
follows dense Adam, in its PyTorch path and in its compiled one."""
import math
import shutil

import pytest
import torch
from torch import nn

from twotower import native
from twotower.training.optim import DeferredAdam, RowAdam

compiled_paths = [False, pytest.param(True, marks=pytest.mark.skipif(not native.built("rowadam"), reason="C extension not built"))]


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


def _touch_steps(emb, opt, lrs, seed, steps):
    """Steps ``steps`` (a range) of a fixed sequence of lookups: rows 0..5 often, 0..29 rarely (the
    deferred moves of long gaps are exercised), 30.. never."""
    g = torch.Generator().manual_seed(seed)
    draws = [torch.cat([torch.randint(0, 6, (8,), generator=g), torch.randint(0, 30, (3,), generator=g)]) for _ in lrs]
    for s in steps:
        for group in opt.param_groups:
            group["lr"] = lrs[s]
        opt.zero_grad()
        (emb(draws[s]) ** 2 * torch.arange(1, 5)).sum().backward()
        opt.step()


@pytest.mark.parametrize("compiled", compiled_paths)
def test_deferred_adam_follows_dense_adam_with_a_varying_learning_rate(compiled):
    torch.manual_seed(0)
    dense = nn.Embedding(40, 4)
    rows = nn.Embedding(40, 4, sparse=True)
    rows.load_state_dict(dense.state_dict())
    od = torch.optim.Adam(dense.parameters(), lr=0.05, foreach=False)
    # window < steps: the truncation is exercised
    orows = DeferredAdam(rows.parameters(), lr=0.05, window=64, compiled=compiled)
    hooks = orows.attach(rows)
    lrs = [0.05 * (0.5 + 0.5 * math.cos(math.pi * s / 120)) for s in range(120)]
    _touch_steps(dense, od, lrs, 1, range(120))
    _touch_steps(rows, orows, lrs, 1, range(120))
    # rows not read lately have not moved yet; after flush every row is where dense Adam put it
    assert not torch.allclose(dense.weight, rows.weight, atol=1e-4)
    orows.flush()
    assert torch.allclose(dense.weight, rows.weight, atol=2e-6, rtol=1e-5)
    assert torch.allclose(od.state[dense.weight]["exp_avg"], orows.state[rows.weight]["moments"][:, 0], atol=1e-5)
    assert torch.equal(rows.weight[30:], dense.weight[30:])  # never read: no moments, no move
    # the state round-trips through state_dict mid-way (deferred moves pending), and a flush
    # between steps changes nothing
    _touch_steps(dense, od, lrs, 2, range(30))
    _touch_steps(rows, orows, lrs, 2, range(10))
    again = DeferredAdam(rows.parameters(), lr=0.05, compiled=compiled)
    again.load_state_dict(orows.state_dict())
    for h in hooks:
        h.remove()
    again.attach(rows)
    _touch_steps(rows, again, lrs, 2, range(10, 20))
    again.flush()
    _touch_steps(rows, again, lrs, 2, range(20, 30))
    again.flush()
    assert torch.allclose(dense.weight, rows.weight, atol=5e-6, rtol=1e-5)


def test_the_c_extension_is_built_wherever_a_c_compiler_is(native_on):
    # setup.py marks it optional, so a broken build would otherwise pass unnoticed
    if shutil.which("cc") or shutil.which("gcc"):
        for kernel in native.KERNELS:
            assert native.built(kernel), f"twotower.native._{kernel} was not built: run `pip install -e .` and read its errors"
        assert DeferredAdam([nn.Parameter(torch.zeros(2, 2))]).compiled


@pytest.mark.skipif(not native.built("rowadam"), reason="C extension not built")
def test_compiled_deferred_adam_matches_the_pytorch_path_on_the_same_gradients():
    """Same sparse gradients into both paths: repeated rows, gradients from 1e-10 to 1 (Adam's
    normalisation is most sensitive where |g| is near eps), and rows in the gradient that the
    lookup did not read (another rank's, under torchrun), which the step must first move."""
    torch.manual_seed(0)
    n, d = 500, 16
    a, b = nn.Embedding(n, d, sparse=True), nn.Embedding(n, d, sparse=True)
    b.load_state_dict(a.state_dict())
    oa, ob = DeferredAdam(a.parameters(), lr=0.02, compiled=False), DeferredAdam(b.parameters(), lr=0.02, compiled=True)
    oa.attach(a)
    ob.attach(b)
    g = torch.Generator().manual_seed(1)
    for s in range(40):
        ix = torch.randint(0, n, (120,), generator=g)
        other = torch.randint(0, n, (30,), generator=g)  # in the gradient, never looked up
        w = torch.randn(150, d, generator=g) * 10 ** torch.empty(150, 1).uniform_(-10, 0, generator=g)
        for emb, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            (emb(ix) * w[:120]).sum().backward()
            emb.weight.grad = emb.weight.grad + torch.sparse_coo_tensor(other[None], w[120:], (n, d), check_invariants=True)
            opt.step()
        if s % 10 == 9:
            oa.flush()
            ob.flush()
        torch.testing.assert_close(b.weight, a.weight, rtol=1e-6, atol=1e-6, msg=f"step {s}")
    oa.flush()
    ob.flush()
    # moments to float rounding (PyTorch fuses m * b1 + (1 - b1) g into one multiply-add, C does not)
    torch.testing.assert_close(ob.state[b.weight]["moments"], oa.state[a.weight]["moments"], rtol=1e-5, atol=1e-8)
    assert torch.equal(ob.state[b.weight]["clock"], oa.state[a.weight]["clock"])
    assert torch.equal(ob.state[b.weight]["tail"], oa.state[a.weight]["tail"])


@pytest.mark.skipif(not native.built("rowadam"), reason="C extension not built")
def test_compiled_deferred_adam_rejects_an_out_of_range_row_before_writing_anything():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = DeferredAdam(emb.parameters(), lr=0.1, compiled=True)
    opt.attach(emb)
    opt.zero_grad()
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()
    before = emb.weight.detach().clone(), opt.state[emb.weight]["clock"].clone()
    with pytest.raises(IndexError, match="row 12 is out of range for a table of 10 rows"):
        emb(torch.tensor([3, 12]))
    assert torch.equal(emb.weight, before[0]) and torch.equal(opt.state[emb.weight]["clock"], before[1])


def test_deferred_adam_without_the_c_extension(monkeypatch):
    monkeypatch.setitem(native._MODULES, "rowadam", None)
    p = nn.Parameter(torch.zeros(3, 2))
    assert not DeferredAdam([p]).compiled  # the PyTorch path, silently
    with pytest.raises(RuntimeError, match="was not built"):
        DeferredAdam([p], compiled=True)


@pytest.mark.skipif(not native.built("rowadam"), reason="C extension not built")
def test_deferred_adam_follows_the_switch(monkeypatch, native_on):
    p = nn.Parameter(torch.zeros(3, 2))
    assert DeferredAdam([p]).compiled
    monkeypatch.setenv(native.ENV, "0")
    assert not DeferredAdam([p]).compiled
    assert DeferredAdam([p], compiled=True).compiled  # an explicit request, as the tests of the kernel make


def test_deferred_adam_differs_from_lazy_adam_where_rows_are_rare():
    # one touch, then 20 steps without: dense (and deferred) Adam keep moving the row by momentum,
    # lazy Adam leaves it where the touch put it
    emb_d, emb_l = nn.Embedding(3, 2, sparse=True), nn.Embedding(3, 2, sparse=True)
    emb_l.load_state_dict(emb_d.state_dict())
    od, ol = DeferredAdam(emb_d.parameters(), lr=0.1), RowAdam(emb_l.parameters(), lr=0.1)
    od.attach(emb_d)
    for s in range(21):
        ix = torch.tensor([0, 1]) if s == 0 else torch.tensor([1])
        for emb, opt in ((emb_d, od), (emb_l, ol)):
            opt.zero_grad()
            emb(ix).sum().backward()
            opt.step()
    od.flush()
    # row 0: gradient 1 at step 1 -> m = 0.1, v = 0.001; dense Adam's step s moves it by
    # lr/c1_s * 0.9^(s-1) 0.1 / (sqrt(0.999^(s-1) 0.001 / c2_s) + eps)
    b1, b2, expected = 0.9, 0.999, 0.0
    for s in range(1, 22):
        c1, c2 = 1 - b1**s, 1 - b2**s
        expected += 0.1 / c1 * b1 ** (s - 1) * 0.1 / (math.sqrt(b2 ** (s - 1) * 0.001 / c2) + 1e-8)
    moved_d = emb_d.weight.detach()[0]
    start = emb_l.weight.detach()[0] + 0.1  # lazy Adam moved row 0 once, by lr * 1
    assert torch.allclose(start - moved_d, torch.full((2,), expected), atol=1e-5)


@pytest.mark.slow  # four end-to-end trainings
def test_trainer_with_deferred_adam_follows_adam_and_resumes(tmp_path):
    # the same run with dense Adam and with deferred Adam (item bias and features' tables included):
    # the same losses and metrics up to float rounding; a run resumed from its epoch-2 checkpoint
    # ends where the uninterrupted one does
    from twotower import RunConfig, train

    def cfg(opt):
        return RunConfig.from_dict({"data": {"dataset": "synthetic", "synthetic_users": 300, "synthetic_items": 120},
                                    "model": {"dim": 8, "item_bias": True},
                                    "train": {"epochs": 3, "batch_size": 128, "optimizer": opt, "lr": 0.01,
                                              "schedule": "cosine", "patience": 0},
                                    "eval": {"ks": [10]}})

    runs = {opt: train(cfg(opt), tmp_path / opt, quiet=True, log=lambda m: None) for opt in ("adam", "deferred_adam")}
    la = [h["loss"] for h in runs["adam"].trainer.state.history]
    ld = [h["loss"] for h in runs["deferred_adam"].trainer.state.history]
    assert la == pytest.approx(ld, rel=1e-4)
    assert runs["adam"].valid["recall@10"] == pytest.approx(runs["deferred_adam"].valid["recall@10"], abs=1e-3)
    wa = runs["adam"].model.item_tower.id_embedding.weight
    wd = runs["deferred_adam"].model.item_tower.id_embedding.weight
    assert torch.allclose(wa, wd, atol=1e-4)

    from twotower.api import load_dataset
    from twotower.training.trainer import Trainer

    part = tmp_path / "resumed"
    c = cfg("deferred_adam")
    ds = load_dataset(c.data, None)
    Trainer(c, ds, part, quiet=True, log=lambda m: None).fit(max_epochs=2)
    resumed = Trainer(c, ds, part, quiet=True, log=lambda m: None)
    resumed.fit(resume=True)
    assert [h["loss"] for h in resumed.state.history] == pytest.approx(ld, rel=1e-6)
