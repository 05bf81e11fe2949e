"""History encoders (model/history.py): the maths on hand cases, independence from padding and
alignment, no leakage from a training pair's target or later items, and restoration from a run."""
import json

import numpy as np
import pytest
import torch

from twotower.config import ModelConfig, RunConfig
from twotower.model.history import (AttentionHistory, MeanHistory, RecencyHistory, history_ages, most_recent,
                                    recency_weights)

ENCODERS = ["mean", "recency", "attention"]


def _encoder(kind: str, dim: int = 8, length: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    enc = {"mean": MeanHistory(), "recency": RecencyHistory(2.0, learn=True),
           "attention": AttentionHistory(dim, length, layers=2, heads=2, dropout=0.1, init_std=0.1)}[kind]
    return enc.eval()


def test_ages_count_the_real_items_after_each_place_whatever_the_padding():
    right = torch.tensor([[False, False, True, True, True]])
    left = torch.tensor([[True, True, True, False, False]])
    assert history_ages(right)[right].tolist() == [2, 1, 0]
    assert history_ages(left)[left].tolist() == [2, 1, 0]
    assert most_recent(right).tolist() == [[False, False, False, False, True]]
    assert most_recent(left).tolist() == [[False, False, True, False, False]]
    assert not most_recent(torch.zeros(1, 5, dtype=torch.bool)).any()


def test_recency_weights_halve_every_half_life_and_sum_to_one():
    mask = torch.tensor([[False, True, True, True]])
    w = recency_weights(history_ages(mask), mask, torch.tensor(1.0))
    # ages 2, 1, 0 -> 2^-2, 2^-1, 2^0, normalised by 1.75
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.25 / 1.75, 0.5 / 1.75, 1.0 / 1.75]]))
    e = torch.tensor([[[9.0], [1.0], [2.0], [4.0]]])
    out = RecencyHistory(1.0, learn=False)(e, mask)
    torch.testing.assert_close(out, torch.tensor([[(0.25 + 1.0 + 4.0) / 1.75]]))
    # a very long half-life is the mean
    torch.testing.assert_close(RecencyHistory(1e6, learn=False)(e, mask), MeanHistory()(e, mask), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ENCODERS)
def test_an_encoder_reads_only_the_real_items_in_order_and_gives_zero_without_any(kind):
    enc = _encoder(kind)
    torch.manual_seed(1)
    items = torch.randn(3, 8)
    right = torch.zeros(1, 6, 8)
    right[0, 3:] = items
    left = torch.zeros(1, 6, 8)
    left[0, :3] = items
    mr = torch.tensor([[False, False, False, True, True, True]])
    ml = torch.tensor([[True, True, True, False, False, False]])
    with torch.no_grad():
        out = enc(right, mr)
        torch.testing.assert_close(enc(left, ml), out)  # the same history, padded on the other side
        noisy = right.clone()
        noisy[0, :3] = 100 * torch.randn(3, 8)  # garbage in the padding changes nothing
        torch.testing.assert_close(enc(noisy, mr), out)
        assert enc(right, torch.zeros_like(mr)).abs().max() == 0  # no history: zero
        swapped = right.clone()
        swapped[0, [3, 5]] = swapped[0, [5, 3]]
        changed = not torch.allclose(enc(swapped, mr), out)
    assert changed == (kind != "mean")  # order matters to recency and attention, not to the mean


def test_a_learned_half_life_and_the_attention_layers_get_gradients():
    rec, att = _encoder("recency").train(), _encoder("attention").train()
    e = torch.randn(4, 6, 8)
    mask = torch.rand(4, 6) < 0.7
    mask[:, -1] = True
    (rec(e, mask) * torch.randn(4, 8)).sum().backward()
    (att(e, mask) ** 2).sum().backward()
    assert rec.log_half_life.grad is not None and rec.log_half_life.grad != 0
    assert att.positions.grad.abs().sum() > 0 and all(p.grad is not None for p in att.parameters())


def _toy(with_later: int):
    """One user with timestamps; ``with_later`` changes the items after the pair looked at."""
    from twotower.data.dataset import Dataset, Split
    from twotower.data.vocab import Vocabulary

    items = np.array([0, 1, 2, 3, 4, 5]) if not with_later else np.array([0, 1, 2, 3, 7, 6])
    train = Split(np.zeros(6, np.int64), items, np.arange(6.0))
    empty = train.take(np.zeros(6, bool))
    return Dataset("toy", Vocabulary(np.arange(1)), Vocabulary(np.arange(8)), train, empty, empty)


@pytest.mark.parametrize("kind", ENCODERS)
def test_a_training_pair_history_holds_neither_its_target_nor_anything_later(kind):
    from twotower.model.towers import TwoTowerModel

    cfg = ModelConfig(dim=8, user_history=True, history_length=4, history_encoder=kind, history_heads=2)
    torch.manual_seed(0)
    model = TwoTowerModel(1, 8, cfg).eval()
    rng = np.random.default_rng(0)
    outs = []
    for later in (0, 1):
        ds = _toy(later)
        h, m = ds.pair_history(np.array([3]), 4, rng)  # pair 3: target item 3, items 4 and 5 come after it
        assert set(h[m].tolist()) == {0, 1, 2}
        with torch.no_grad():
            outs.append(model.encode_users(torch.tensor([0]), torch.from_numpy(h), torch.from_numpy(m)))
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("kind", ["recency", "attention"])
def test_a_history_encoder_is_restored_from_the_run_directory(tmp_path, kind):
    from twotower import train
    from twotower.model.towers import embed_users
    from twotower.run import Run

    cfg = RunConfig.from_dict({"data": {"dataset": "synthetic", "synthetic_users": 120, "synthetic_items": 60},
                               "model": {"dim": 8, "user_history": True, "history_encoder": kind, "learn_half_life": True,
                                         "history_length": 10},
                               "train": {"epochs": 1, "batch_size": 128}, "eval": {"ks": [10]}})
    res = train(cfg, tmp_path / "run", quiet=True, log=lambda m: None)
    run = Run(tmp_path / "run")
    users = np.arange(20)
    torch.testing.assert_close(embed_users(run.model, users, run.known, 10), embed_users(res.model, users, run.known, 10))
    if kind == "recency":  # learned: moved away from its start, and that value came back
        assert run.model.user_tower.history_encoder.half_life == pytest.approx(res.model.user_tower.history_encoder.half_life)
        assert run.model.user_tower.history_encoder.half_life != pytest.approx(10.0)


def test_history_settings_are_checked_at_load():
    from twotower.errors import ConfigError

    with pytest.raises(ConfigError, match="needs user_history"):
        RunConfig.from_dict({"model": {"history_encoder": "attention"}})
    with pytest.raises(ConfigError, match="multiple of history_heads"):
        RunConfig.from_dict({"model": {"user_history": True, "history_encoder": "attention", "dim": 10, "history_heads": 4}})


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.slow
def test_an_attention_history_tower_with_id_dropout_exports(tmp_path, fmt):
    """The history encoders are plain tensor operations: `twotower export` traces a user tower with
    two attention layers (and an item tower with id dropout) and the exported towers give the
    Python path's vectors."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    from twotower import train
    from twotower.cli import main

    cfg = RunConfig.from_dict({"data": {"dataset": "synthetic", "synthetic_users": 120, "synthetic_items": 60},
                               "model": {"dim": 8, "user_history": True, "history_encoder": "attention",
                                         "history_layers": 2, "history_heads": 2, "item_id_dropout": 0.5},
                               "train": {"epochs": 1, "batch_size": 128}, "eval": {"ks": [10]}})
    train(cfg, tmp_path / "run", quiet=True, log=lambda m: None)
    assert main(["export", str(tmp_path / "run"), "--format", fmt, "--out", str(tmp_path / "out")]) == 0
    towers = json.loads((tmp_path / "out" / "export.json").read_text())["towers"]
    assert towers["user"]["check"]["rows"] > 0
    assert towers["user"]["check"]["max_abs_diff"] < 1e-5 and towers["item"]["check"]["max_abs_diff"] < 1e-5
