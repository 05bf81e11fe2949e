"""Negative sources: streaming frequencies, the ratio correction, the memory bank, hard negatives
(category, exposure, mined), the curriculum, and how the candidate builder composes them."""
import math

import numpy as np
import pytest
import torch

from twotower.config import RunConfig
from twotower.data.sources import load_dataset, load_impressions
from twotower.errors import ConfigError, DataError
from twotower.training import losses
from twotower.training.candidates import CandidateBuilder
from twotower.data.popularity import proposal_probabilities
from twotower.training.frequency import NegPosRatio, StreamingFrequency
from twotower.training.hard_negatives import CategorySampler, ListSampler, hard_schedule
from twotower.training.memory_bank import MemoryBank
from twotower.training.mining import mine_negatives
from twotower.training.trainer import Trainer, build_model


# ---- frequencies --------------------------------------------------------------------------------
def test_streaming_estimator_by_hand():
    f = StreamingFrequency(buckets=1 << 10, lr=0.5, init_gap=10.0)
    f.update(torch.tensor([3, 3, 5]), step=0)       # first sighting: no gap yet, a repeat counts once
    assert f.gap[f.bucket(torch.tensor([3]))].item() == 10.0
    f.update(torch.tensor([3]), step=4)             # gap 4: G = 0.5 * 10 + 0.5 * 4 = 7
    f.update(torch.tensor([3]), step=6)             # gap 2: G = 0.5 * 7 + 0.5 * 2 = 4.5
    assert f.gap[f.bucket(torch.tensor([3]))].item() == pytest.approx(4.5)
    # p = 1 / (B G): with B = 2, item 3 -> 1 / 9, item 5 (never a gap) -> 1 / 20
    assert f.probabilities(torch.tensor([3, 5]), batch_size=2).tolist() == pytest.approx([1 / 9, 1 / 20])


def test_streaming_estimator_converges_on_a_stream_with_known_frequencies():
    # Item j is in a batch with probability q_j; the estimate 1 / G must approach q_j.
    rng = np.random.default_rng(0)
    q = np.array([0.5, 0.2, 0.1, 0.05, 0.02])
    f = StreamingFrequency(buckets=1 << 12, lr=0.02, init_gap=1.0)
    for t in range(20000):
        present = np.flatnonzero(rng.random(len(q)) < q)
        if len(present):
            f.update(torch.from_numpy(present), step=t)
    est = 1.0 / f.gap[f.bucket(torch.arange(len(q)))].numpy()
    assert np.allclose(est, q, rtol=0.25), (est, q)
    # and the ordering is exact
    assert list(np.argsort(-est)) == list(range(len(q)))


def test_proposals():
    counts = np.array([9.0, 1.0, 0.0, 0.0])
    assert proposal_probabilities(counts, "uniform").tolist() == [0.25] * 4
    r = proposal_probabilities(counts, "frequency", beta=0.5)   # sqrt: 3, 1, 0, 0
    assert r.tolist() == pytest.approx([0.75, 0.25, 0.0, 0.0])


def test_neg_pos_ratio_by_hand():
    t = NegPosRatio(4)
    # positives 0, 0, 1; candidates [0, 0, 1, 3] were negatives for 2, 2, 1, 3 rows
    t.update(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1, 3]), torch.tensor([2, 2, 1, 3]))
    # item 0: neg 4, pos 2 -> log(5/3); item 1: log(2/2) = 0; item 3: log(4/1); item 2: log(1/1)
    assert t.correction(torch.tensor([0, 1, 2, 3])).tolist() == pytest.approx([math.log(5 / 3), 0.0, 0.0, math.log(4)])


# ---- memory bank --------------------------------------------------------------------------------
def test_memory_bank_fifo_order_and_warmup():
    bank = MemoryBank(size=4, dim=2, warmup_steps=3)
    assert not bank.active(10)  # empty
    vec = lambda ids: torch.tensor([[float(i), 0.0] for i in ids])  # noqa: E731
    bank.push(vec([1, 2, 3]), torch.tensor([1, 2, 3]))
    assert not bank.active(2) and bank.active(3)
    assert bank.entries()[1].tolist() == [1, 2, 3]
    bank.push(vec([4, 5]), torch.tensor([4, 5]))          # 1 leaves first
    v, ids = bank.entries()
    assert ids.tolist() == [2, 3, 4, 5] and v[:, 0].tolist() == [2, 3, 4, 5]
    bank.push(vec([6, 7, 8, 9, 10]), torch.tensor([6, 7, 8, 9, 10]))  # larger than the bank: its last 4
    assert bank.entries()[1].tolist() == [7, 8, 9, 10]
    # entries are detached copies of what was pushed
    x = torch.ones(1, 2, requires_grad=True)
    bank.push(x * 2, torch.tensor([11]))
    assert not bank.entries()[0].requires_grad
    state = bank.state_dict()
    other = MemoryBank(size=4, dim=2)
    other.load_state_dict(state)
    assert other.entries()[1].tolist() == [8, 9, 10, 11]


# ---- hard negatives -----------------------------------------------------------------------------
def test_category_sampler_stays_in_category_and_never_returns_the_positive():
    # items 0..5; categories: 0 -> {0}, 1 -> {0, 1}, 2 -> {1}, 3 -> {2}, 4 -> {}, 5 -> {1, 3}
    item_cats = [[0], [0, 1], [1], [2], [], [1, 3]]
    indptr = np.concatenate([[0], np.cumsum([len(c) for c in item_cats])])
    flat = np.array([c for cs in item_cats for c in cs])
    s = CategorySampler(indptr, flat, n_categories=4)
    members = {0: {0, 1}, 1: {1, 2, 5}, 2: {3}, 3: {5}}
    gen = torch.Generator().manual_seed(0)
    pos = torch.tensor([0, 1, 2, 3, 4, 5] * 50)
    out = s.sample(pos, 8, gen)
    assert out.shape == (300, 8)
    for p, row in zip(pos.tolist(), out.tolist()):
        allowed = set().union(*(members[c] for c in item_cats[p])) - {p} if item_cats[p] else set()
        for j in row:
            assert j != p
            assert j == -1 or j in allowed, (p, j, allowed)
        if item_cats[p] and all(members[c] - {p} for c in item_cats[p]):
            assert all(j != -1 for j in row)      # categories with other items always yield one
        elif not allowed:
            assert all(j == -1 for j in row)      # item 3 is alone in its category; item 4 has none
    # multi-valued: item 5's negatives come from both of its categories (1 -> {1, 2}; 3 -> only 5 itself)
    got = set(out[pos == 1].flatten().tolist())
    assert got == {0, 2, 5}


def test_list_sampler_draws_from_the_row_users_list():
    # user 0: [4, 7], user 1: [], user 2: [9]
    s = ListSampler(np.array([0, 2, 2, 3]), np.array([4, 7, 9]))
    out = s.sample(torch.tensor([0, 1, 2, 0]), 50, torch.Generator().manual_seed(1))
    assert set(out[0].tolist()) == {4, 7} and set(out[3].tolist()) == {4, 7}
    assert out[1].tolist() == [-1] * 50 and out[2].tolist() == [9] * 50


def test_curriculum_warmup_and_ramps():
    assert hard_schedule(4, k=8, warmup_steps=5, ramp_steps=0, ramp="count", weight=1.0) == (0, 0.0)
    assert hard_schedule(5, k=8, warmup_steps=5, ramp_steps=0, ramp="count", weight=0.5) == (8, 0.5)
    # count ramp over 4 steps: ceil(8 * 1/4) = 2, ..., 8
    assert [hard_schedule(s, 8, 5, 4, "count", 1.0)[0] for s in range(5, 10)] == [2, 4, 6, 8, 8]
    # weight ramp: all 8 at weight f * w
    assert [hard_schedule(s, 8, 0, 4, "weight", 2.0) for s in (0, 3, 9)] == [(8, 0.5), (8, 2.0), (8, 2.0)]


def test_mined_negatives_skip_positives_and_keep_the_window():
    # 1-d scores: item j scores -j for user 0 (order 0, 1, 2, ...), +j for user 1 (order 9, 8, ...)
    items = np.stack([np.arange(10, dtype=np.float32), np.ones(10, np.float32)], axis=1)
    users = np.array([0, 1])
    uv = np.array([[-1.0, 20.0], [1.0, 0.0]], np.float32)
    # positives: user 0 -> {1, 3}; user 1 -> {9}
    indptr, indices = np.array([0, 2, 3]), np.array([1, 3, 9])
    ip, neg = mine_negatives(uv, items, users, indptr, indices, top_r=6, lo=1, hi=4, n_users=2)
    row = lambda u: neg[ip[u]:ip[u + 1]].tolist()  # noqa: E731
    # user 0 ranks 0, 1, 2, 3, 4, 5, ...; without positives 1, 3: 0, 2, 4, 5, 6 -> ranks 1..3 = 2, 4, 5
    assert row(0) == [2, 4, 5]
    # user 1 ranks 9, 8, 7, 6, ...; without 9: 8, 7, 6, 5 -> ranks 1..3 = 7, 6, 5
    assert row(1) == [7, 6, 5]


def test_impressions_file_read_into_user_lists(tmp_path):
    cfg = RunConfig.from_dict({"data": {"dataset": "synthetic", "synthetic_users": 50, "synthetic_items": 40}})
    ds = load_dataset(cfg.data)
    u_raw, i_raw = ds.users.ids, ds.items.ids
    f = tmp_path / "impressions.csv"
    f.write_text("user,item\n" + f"{u_raw[3]},{i_raw[5]}\n{u_raw[3]},{i_raw[7]}\n{u_raw[3]},{i_raw[5]}\n"
                 f"{u_raw[10]},{i_raw[0]}\nnobody,{i_raw[1]}\n")
    indptr, items = load_impressions(f, ds)
    assert indptr[-1] == 3                                   # duplicate and unknown user dropped
    assert items[indptr[3]:indptr[4]].tolist() == [5, 7] and items[indptr[10]:indptr[11]].tolist() == [0]
    bad = tmp_path / "other.csv"
    bad.write_text("user,item\nx,y\n")
    with pytest.raises(DataError, match="none of the 1 impressions"):
        load_impressions(bad, ds)


# ---- the builder composes the sources -----------------------------------------------------------
def _tiny(overrides: dict) -> tuple[RunConfig, object]:
    d = {"data": {"dataset": "synthetic", "synthetic_users": 200, "synthetic_items": 120},
         "model": {"dim": 8, "item_features": "all"}, "train": {"batch_size": 32, "epochs": 1}}
    for sec, kv in overrides.items():
        d.setdefault(sec, {}).update(kv)
    cfg = RunConfig.from_dict(d)
    return cfg, load_dataset(cfg.data)


def test_builder_corrects_every_shared_candidate_by_its_expected_count_under_the_combined_proposal():
    cfg, ds = _tiny({"negatives": {"sampled": 5, "proposal": "frequency", "beta": 1.0, "bank_size": 7}})
    torch.manual_seed(0)
    model = build_model(cfg, ds)
    b = CandidateBuilder(cfg, ds, torch.device("cpu"), cfg.model.dim)
    items = torch.from_numpy(ds.train.items[:32])
    users = torch.from_numpy(ds.train.users[:32])
    v = model.encode_items(items)
    first = b.build(model, users, items, v, step=0)
    assert len(first.ids) == 32 + 5 and first.n_bank == 0           # bank empty at first
    b.after_step(items, v, first)
    c = b.build(model, users, items, v, step=1)
    assert len(c.ids) == 32 + 5 + 7 and c.n_bank == 7
    p = b.p[c.ids].double()
    r = b.r[c.ids].double()
    expected = torch.log(32 * p + 5 * r + 7 * p)
    assert torch.allclose(c.log_q.double(), expected, atol=1e-5)
    assert c.ids[-7:].tolist() == items[-7:].tolist()            # the bank holds the last 7 positives
    assert not c.vectors[-7:].requires_grad or c.vectors.requires_grad  # (bank rows are detached copies)
    assert torch.equal(c.target, torch.arange(32))


def test_distinct_positives_merges_copies_into_one_column_with_their_log_count():
    from twotower.training.candidates import distinct_positives

    ids = torch.tensor([7, 3, 7, 9, 7, 3])
    vecs = torch.arange(6.0)[:, None] * torch.ones(1, 2)
    uid, uvec, where, log_count = distinct_positives(ids, vecs)
    assert uid.tolist() == [3, 7, 9]
    assert uvec[:, 0].tolist() == [1.0, 0.0, 3.0]          # each item's first occurrence
    assert where.tolist() == [1, 0, 1, 2, 1, 0]
    assert torch.allclose(log_count, torch.log(torch.tensor([2.0, 3.0, 1.0])))
    # all distinct: the batch as it is
    same = distinct_positives(torch.tensor([4, 2]), vecs[:2])
    assert same[0].tolist() == [4, 2] and same[2].tolist() == [0, 1] and not same[3].any()


def _ten_sgd_steps_each_way(overrides, owner, flag):
    """Ten SGD steps of 48 rows with a trainer's ``flag`` (on ``trainer.owner``, or the trainer
    itself) left on, then turned off: the dataset, and each run's losses and final weights (SGD, so
    weights differ exactly where gradients would)."""
    base = {"train": {"batch_size": 48, "optimizer": "sgd", "lr": 0.5, "logq": True}}
    for sec, kv in overrides.items():
        base.setdefault(sec, {}).update(kv)
    cfg, ds = _tiny(base)
    runs = []
    for on in (True, False):
        tr = Trainer(cfg, ds, None, quiet=True, log=lambda m: None)
        target = tr if owner is None else getattr(tr, owner)
        assert getattr(target, flag)
        setattr(target, flag, on)
        rng = np.random.default_rng(0)
        losses_ = [tr.step(np.arange(s, s + 48), rng) for s in range(0, 480, 48)]
        runs.append((losses_, {k: v.detach().clone() for k, v in tr.model.state_dict().items()}))
    return ds, runs


def _assert_same_training(a, b):
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    for k, w in a[1].items():
        torch.testing.assert_close(w, b[1][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("overrides", [
    {},
    {"train": {"correct_positive": False, "mask_user_history": True}, "model": {"item_bias": True}},
    {"negatives": {"sampled": 6, "bank_size": 20, "bank_warmup_steps": 1}, "train": {"frequency": "streaming"}},
])
def test_merged_duplicate_positives_train_exactly_as_separate_columns(overrides):
    """One column per distinct in-batch item (``log k`` on its logit) against one column per
    positive with the copies masked as accidental hits: the same losses and the same weights after
    every step (SGD, so weights differ exactly where gradients would)."""
    ds, runs = _ten_sgd_steps_each_way(overrides, "candidates", "merge")  # on: the towers are deterministic
    items = torch.from_numpy(ds.train.items[:480]).view(10, 48)
    assert all(len(torch.unique(b)) < 48 for b in items)  # every batch has copies to merge
    _assert_same_training(*runs)


@pytest.mark.parametrize("overrides", [
    {},
    {"train": {"correct_positive": False}, "model": {"item_bias": True}},
    {"negatives": {"sampled": 6, "bank_size": 20, "bank_warmup_steps": 1}, "model": {"mlp": [16]}},
])
def test_rows_of_one_user_train_exactly_as_separate_rows(overrides):
    """A batch's rows of one user scored once (the loss's ``query_ids``) against every row scored:
    the same losses and weights after every step, with the rows that a positive shift keeps apart
    (merged item copies; every row when the positive is left uncorrected) mixed in."""
    ds, runs = _ten_sgd_steps_each_way(overrides, None, "same_user_same_query")  # on: no history or dropout
    users = torch.from_numpy(ds.train.users[:480]).view(10, 48)
    assert all(len(torch.unique(b)) < 48 for b in users)  # every batch has rows to share
    _assert_same_training(*runs)


def test_a_user_tower_with_history_or_dropout_scores_every_row():
    for model in ({"user_history": True}, {"mlp": [16], "dropout": 0.2}):
        cfg, ds = _tiny({"model": model})
        assert not Trainer(cfg, ds, None, quiet=True, log=lambda m: None).same_user_same_query


def test_a_tower_with_dropout_keeps_every_positive_as_its_own_column():
    cfg, ds = _tiny({"model": {"mlp": [16], "dropout": 0.2}})
    tr = Trainer(cfg, ds, None, quiet=True, log=lambda m: None)
    assert not tr.model.item_tower.deterministic and not tr.candidates.merge


@pytest.mark.slow  # end-to-end training with every source
def test_training_with_every_source_composed(tmp_path):
    cfg, ds = _tiny({"negatives": {"sampled": 16, "bank_size": 64, "bank_warmup_steps": 2, "hard": "category", "hard_k": 3,
                                   "hard_warmup_steps": 1, "hard_ramp_steps": 3},
                     "model": {"item_bias": True, "learn_temperature": True},
                     "train": {"epochs": 2, "lr": 0.05, "batch_size": 128}})
    tr = Trainer(cfg, ds, tmp_path / "run", quiet=True, log=lambda m: None)
    state = tr.fit()
    assert all(math.isfinite(r["loss"]) for r in state.history)
    assert float(tr.model.temperature) != pytest.approx(0.1)          # learned
    assert tr.model.item_bias.weight.abs().sum() > 0                   # learned
    assert (tmp_path / "run" / "checkpoint" / "negatives.safetensors").exists()


@pytest.mark.slow  # end-to-end training with mining rounds
def test_mining_rounds_train_on_mined_negatives(tmp_path):
    cfg, ds = _tiny({"negatives": {"hard": "mined", "hard_k": 2}, "mining": {"rounds": 2, "epochs_per_round": 1,
                                                                              "top_r": 30, "window_lo": 2, "window_hi": 20},
                     "train": {"batch_size": 256}})
    logs = []
    tr = Trainer(cfg, ds, None, quiet=True, log=logs.append)
    state = tr.fit()
    assert [r.get("mining_round") for r in state.history] == [None, 1, 2]
    assert all("valid/recall@20" in r for r in state.history)            # validation after every round
    assert sum("mining:" in m for m in logs) == 2
    assert state.history[1]["mined_negatives"] > 0


def test_early_stopping_of_the_first_phase_goes_on_to_the_mining_rounds():
    # Validation is scripted: it stops improving after epoch 2, far before epoch 40 (patience 1:
    # epoch 3 spends it); the round's two epochs then improve on epoch 2.
    cfg, ds = _tiny({"negatives": {"hard": "mined", "hard_k": 2},
                     "mining": {"rounds": 1, "epochs_per_round": 2, "top_r": 30, "window_lo": 2, "window_hi": 20},
                     "train": {"epochs": 40, "patience": 1, "batch_size": 512}})
    logs = []
    trainer = Trainer(cfg, ds, None, quiet=True, log=logs.append)
    scripted = iter([0.10, 0.30, 0.20, 0.35, 0.40])
    trainer.validate = lambda: {"recall@20": next(scripted)}
    state = trainer.fit()
    epochs = [r["epoch"] for r in state.history]
    assert epochs == [1, 2, 3, 41, 42] and state.best_epoch == 42
    first_round = epochs.index(41)                       # the round's first epoch is train.epochs + 1
    assert 0 < first_round and epochs[first_round - 1] < 40  # reached by a jump, not by 40 epochs
    assert state.history[first_round]["mining_round"] == 1
    assert any("mining rounds begin" in m for m in logs)
    assert sum("mining:" in m for m in logs) == 1
    assert state.phase_one_best == max(range(first_round), key=lambda i: state.history[i]["valid/recall@20"]) + 1

    # A refit replays the same jump: the first phase up to the epoch the rounds started from,
    # then the rounds, up to the chosen epoch; not the 40 nominal epochs of the first phase.
    refit = Trainer(cfg, ds.with_valid_in_train(), None, quiet=True, log=logs.append)
    rstate = refit.fit(max_epochs=41, jump_after=state.phase_one_best)
    assert [r["epoch"] for r in rstate.history] == [*range(1, state.phase_one_best + 1), 41]
    assert rstate.history[-1]["mining_round"] == 1
    assert rstate.phase_one_best == state.phase_one_best == 2


def test_negative_config_errors():
    with pytest.raises(ConfigError, match="hard_k"):
        RunConfig.from_dict({"negatives": {"hard": "category"}})
    with pytest.raises(ConfigError, match="exposure_file"):
        RunConfig.from_dict({"negatives": {"hard": "exposure", "hard_k": 2}})
    with pytest.raises(ConfigError, match="mining.rounds"):
        RunConfig.from_dict({"negatives": {"hard": "mined", "hard_k": 2}})
    with pytest.raises(ConfigError, match="window"):
        RunConfig.from_dict({"mining": {"window_lo": 50, "window_hi": 10}})
    cfg, ds = _tiny({"negatives": {"hard": "category", "hard_k": 2, "category_feature": "nope"}})
    with pytest.raises(ConfigError, match="not an item feature"):
        CandidateBuilder(cfg, ds, torch.device("cpu"), 8)


def test_hard_mask_excludes_the_positive_and_the_users_items():
    cfg, ds = _tiny({"negatives": {"hard": "category", "hard_k": 2}})
    b = CandidateBuilder(cfg, ds, torch.device("cpu"), 8)
    h = ds.history("train")
    u = 0
    liked = h.indices[h.indptr[u]:h.indptr[u + 1]]
    other = next(j for j in range(ds.n_items) if j not in set(liked.tolist()))
    from twotower.training.candidates import CandidateSet
    cand = CandidateSet(torch.zeros(1, 8), torch.tensor([int(liked[0])]), None, torch.tensor([0]),
                        hard_ids=torch.tensor([[int(liked[0]), int(liked[-1]), other, -1]]))
    mask = b.hard_mask(torch.tensor([u]), torch.tensor([int(liked[0])]), cand)
    assert mask.tolist() == [[True, True, False, True]]
    # and seen_item_mask accepts per-row ids
    keys = b.seen_keys
    assert losses.seen_item_mask(torch.tensor([u]), torch.tensor([[other, int(liked[-1])]]), None, keys, ds.n_items).tolist() == [[False, True]]


def test_builder_excludes_accidental_hits_and_with_mask_user_history_the_users_items():
    for mask_history in (False, True):
        cfg, ds = _tiny({"train": {"mask_user_history": mask_history}})
        b = CandidateBuilder(cfg, ds, torch.device("cpu"), 8)
        h = ds.history("train")
        liked = [set(h.indices[h.indptr[u]:h.indptr[u + 1]].tolist()) for u in range(h.n_rows)]
        u, a = 0, min(liked[0])
        # a second user who does not like a and likes two items user 0 does not
        w = next(x for x in range(1, h.n_rows) if a not in liked[x] and len(liked[x] - liked[u]) >= 2)
        b_item, other = sorted(liked[w] - liked[u])[:2]
        # columns: a (row 0's target), b (row 1's), a again (row 0's accidental hit), other (liked by w)
        cand = losses.CandidateSet(torch.zeros(4, 8), torch.tensor([a, b_item, a, other]), None, torch.tensor([0, 1]))
        rows, cols = b.excluded(torch.tensor([u, w]), torch.tensor([a, b_item]), cand)
        assert list(zip(rows.tolist(), cols.tolist())) == ([(0, 2), (1, 3)] if mask_history else [(0, 2)])
    # every column a different item (merged positives): no accidental hit to look for
    cfg, ds = _tiny({})
    b = CandidateBuilder(cfg, ds, torch.device("cpu"), 8)
    cand = losses.CandidateSet(torch.zeros(2, 8), torch.tensor([4, 5]), None, torch.tensor([0, 1]))
    assert b.excluded(torch.tensor([0, 1]), torch.tensor([4, 5]), cand, distinct=True)[0].numel() == 0


@pytest.mark.slow  # real data: train, mine, train again
def test_mine_command_writes_an_impressions_file_that_training_reads(tmp_path_factory, data_dir, tmp_path):
    from _trained import tiny_run

    from twotower.cli import main
    from twotower.run import Run

    run = tiny_run(tmp_path_factory, data_dir)
    out = tmp_path / "mined.csv"
    assert main(["mine", str(run), "--out", str(out), "--top-r", "60", "--window", "5", "40"]) == 0
    import pandas as pd
    mined = pd.read_csv(out)
    r = Run(run)
    known = {(int(u), int(i)) for u, i in zip(r.users.decode(np.repeat(np.arange(len(r.users)), r.known.lengths())),
                                               r.items.decode(r.known.indices))}
    pairs = set(zip(mined["user"].tolist(), mined["item"].tolist()))
    assert pairs and not pairs & known                       # no known positive is mined
    per_user = mined.groupby("user").size()
    assert per_user.max() <= 35                              # window [5, 40): at most 35 per user
    # bad window: exit 2, nothing written
    assert main(["mine", str(run), "--out", str(tmp_path / "x.csv"), "--window", "50", "10"]) == 2
    assert not (tmp_path / "x.csv").exists()
    # the next training reads it as exposure negatives
    from _trained import CONFIG
    import json
    d = json.loads(json.dumps(CONFIG))
    d["train"]["epochs"] = 1
    d["negatives"] = {"hard": "exposure", "hard_k": 4, "exposure_file": str(out)}
    cfg = RunConfig.from_dict(d)
    ds = load_dataset(cfg.data, data_dir)
    tr = Trainer(cfg, ds, None, quiet=True, log=lambda m: None)
    assert tr.candidates.hard.n_entries == len(pairs)
    assert math.isfinite(tr.fit().history[0]["loss"])


# ---- the neg/pos ratio: sign and scale -----------------------------------------------------------
def test_neg_pos_ratio_of_in_batch_negatives_is_the_same_for_every_item():
    """Batches of B = 4 distinct items: every positive is a negative for the other 3 rows, so after
    n batches an item has pos = n, neg = 3 n, and the correction log((3n + 1) / (n + 1)) depends on n
    only, not on the item: items seen equally often get equal corrections, and as n grows every item's
    tends to log 3 = log(B - 1), a constant that no softmax sees (by hand through the builder's count)."""
    t = NegPosRatio(6)
    batches = [[0, 1, 2, 3], [0, 1, 4, 5], [0, 2, 3, 4]]
    for b in batches:
        ids = torch.tensor(b)
        t.update(ids, ids, torch.full((4,), 3))             # 4 rows, each column a negative for the 3 others
    pos = torch.tensor([3.0, 2, 2, 2, 2, 1])
    expected = torch.log((3 * pos + 1) / (pos + 1))
    assert torch.allclose(t.correction(torch.arange(6)).double(), expected.double(), atol=1e-6)
    assert t.correction(torch.tensor([1]))[0] == pytest.approx(t.correction(torch.tensor([3]))[0])


def test_neg_pos_ratio_with_uniform_negatives_corrects_rare_items_most_and_its_sign_is_a_subtraction():
    """With M uniform negatives beside the B in-batch ones, an item of share p is a negative about
    B p + M / N times per positive B p: ratio ~ 1 + M / (N B p), largest for the rarest items. The
    logit subtracts w * log(ratio) (``logq_correction``), so rare items' logits are lowered most in
    training, which the model answers by scoring them higher: the correction favours the tail, the
    opposite of the popular-item claim; a negative weight (added correction) favours the head."""
    cfg, ds = _tiny({"negatives": {"sampled": 64}, "train": {"logq_form": "neg_pos_ratio"}})
    b = CandidateBuilder(cfg, ds, torch.device("cpu"), cfg.model.dim)
    model = build_model(cfg, ds)
    gen = torch.Generator().manual_seed(0)
    n = len(ds.train) // 32 * 32
    for s in range(0, n, 32):
        users, items = torch.from_numpy(ds.train.users[s:s + 32]), torch.from_numpy(ds.train.items[s:s + 32])
        v = model.encode_items(items).detach()
        cand = b.build(model, users, items, v, step=s // 32, gen=gen)
        b.after_step(items, v, cand)
    counts = torch.from_numpy(ds.item_counts()).double()
    seen = counts > 0
    corr = b.ratio.correction(torch.arange(ds.n_items))[seen].double()
    rank = torch.argsort(torch.argsort(counts[seen]))
    # Spearman: the correction falls with popularity
    a, c = rank.double(), torch.argsort(torch.argsort(corr)).double()
    rho = float(((a - a.mean()) * (c - c.mean())).sum() / (a.std() * c.std() * (len(a) - 1)))
    assert rho < -0.8
    # and its scale: about log(1 + B / ... ) -> log of (B - 1 + M / (N p)) for the head, well above 0
    assert float(corr.min()) > math.log(32 - 1) - 0.5
    term = losses.logq_correction(corr.float(), weight=1.0)
    assert torch.allclose(term.column, -corr.float())                          # subtracted from the logit
    assert torch.allclose(losses.logq_correction(corr.float(), weight=-1.0).column, corr.float())  # added
    with pytest.raises(ConfigError, match="negative weight"):
        RunConfig.from_dict({"train": {"logq_weight": -1.0}})


def test_corrected_logq_config_needs_the_expected_count_form():
    assert RunConfig.from_dict({"train": {"corrected_logq": True}}).train.corrected_logq
    for bad in ({"logq": False}, {"logq_form": "neg_pos_ratio"}):
        with pytest.raises(ConfigError, match="corrected_logq"):
            RunConfig.from_dict({"train": {"corrected_logq": True, **bad}})


# ---- mining: the practices that make it work ---------------------------------------------------------
def test_margin_mask_by_hand():
    from twotower.training.hard_negatives import margin_mask

    hard = torch.tensor([[1.0, 2.9, 3.5], [0.0, -1.0, 5.0]])
    pos = torch.tensor([3.0, 0.5])
    # row 0: positive 3, margin 0.5 -> masked above 2.5; row 1: above 0
    assert margin_mask(hard, pos, 0.5).tolist() == [[False, True, True], [False, False, True]]
    # a negative margin masks only what scores above the positive by more than |margin|
    assert margin_mask(hard, pos, -0.4).tolist() == [[False, False, True], [False, False, True]]


def test_round_window_moves_toward_the_top():
    from twotower.training.mining import round_window

    assert round_window(100, 500, 1.0, 3) == (100, 500)
    assert [round_window(100, 500, 0.5, r) for r in (1, 2, 3)] == [(100, 500), (50, 250), (25, 125)]
    assert round_window(1, 2, 0.1, 4) == (0, 1)                       # at least one rank wide


def test_drop_cooccurring_keeps_the_least_cooccurring_share_per_user():
    from twotower.training.mining import drop_cooccurring

    indptr = np.array([0, 4, 4, 7])                                    # user 0: 4 items, user 1: none, user 2: 3
    indices = np.array([10, 11, 12, 13, 20, 21, 22])
    scores = np.array([0.1, 0.9, 0.5, 0.2, 3.0, 1.0, 2.0], dtype=np.float32)
    new_ptr, new_idx, kept = drop_cooccurring(indptr, indices, scores, 0.5)
    # user 0 drops floor(0.5 * 4) = 2 (11 and 12), user 2 drops 1 (20)
    assert new_ptr.tolist() == [0, 2, 2, 4] and new_idx.tolist() == [10, 13, 21, 22]
    assert kept.tolist() == [True, False, False, True, False, True, True]
    assert drop_cooccurring(indptr, indices, scores, 0.0)[1].tolist() == indices.tolist()


def test_cooccurrence_scores_are_the_item_based_filters_scores():
    from twotower.training.mining import cooccurrence_scores

    rng = np.random.default_rng(0)
    x = (rng.random((11, 9)) < 0.35).astype(np.float64)
    indptr = np.r_[0, np.cumsum(x.sum(1))].astype(np.int64)
    indices = np.concatenate([np.flatnonzero(r) for r in x]).astype(np.int64)
    users, items = np.repeat(np.arange(11), 9), np.tile(np.arange(9), 11)
    n = np.maximum(x.sum(0), 1)
    cos = (x.T @ x) / np.sqrt(np.outer(n, n))
    expected = (x @ cos)[users, items]
    for block in (1, 4, 512):
        assert np.allclose(cooccurrence_scores(indptr, indices, 9, users, items, block=block), expected, atol=1e-5)


def test_heldout_rate_and_content_queries_by_hand():
    from twotower.training.mining import content_queries, heldout_rate

    # user 0 mined {1, 2, 3}, user 1 mined {0}; held out: user 0 {2}, user 1 {0, 4}: 2 of 4 mined are held out
    assert heldout_rate(np.array([0, 3, 4]), np.array([1, 2, 3, 0]), np.array([0, 1, 3]), np.array([2, 0, 4]), 5) == 0.5
    content = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    q = content_queries(content, np.array([0, 1]), np.array([0, 2, 3]), np.array([0, 1, 2]))
    assert np.allclose(q, [[2 ** -0.5, 2 ** -0.5], [1.0, 0.0]])


def test_the_hard_curriculum_counts_from_the_first_mined_step():
    cfg, ds = _tiny({"negatives": {"hard": "mined", "hard_k": 2, "hard_warmup_steps": 5},
                     "mining": {"rounds": 1, "top_r": 30, "window_lo": 2, "window_hi": 20}})
    b = CandidateBuilder(cfg, ds, torch.device("cpu"), cfg.model.dim)
    model = build_model(cfg, ds)
    users, items = torch.from_numpy(ds.train.users[:32]), torch.from_numpy(ds.train.items[:32])
    v = model.encode_items(items)
    indptr = np.arange(ds.n_users + 1) * 3
    lists = np.tile([0, 1, 2], ds.n_users)
    b.set_mined(indptr, lists, step=100)
    assert b.build(model, users, items, v, step=104).hard_ids is None     # warm-up: steps 100 to 104
    assert b.build(model, users, items, v, step=105).hard_ids is not None
    b.set_mined(indptr, lists, step=200)                                   # a later round does not restart it
    assert b.hard_start == 100
    assert b.state_dict()["mined.start"].tolist() == [100]


def test_bank_staleness_is_the_cosine_between_stored_and_current_vectors():
    cfg, ds = _tiny({"negatives": {"bank_size": 64}})
    b = CandidateBuilder(cfg, ds, torch.device("cpu"), cfg.model.dim)
    model = build_model(cfg, ds)
    assert b.bank_staleness(model) == {}
    items = torch.from_numpy(ds.train.items[:64])
    with torch.no_grad():
        v = model.encode_items(items)
    b.bank.push(v, items)
    fresh = b.bank_staleness(model)
    assert fresh["bank_cosine"] == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():  # the model moves on: the stored vectors are now stale
        model.item_tower.id_embedding.weight.add_(torch.randn_like(model.item_tower.id_embedding.weight))
    stale = b.bank_staleness(model)
    expected = (torch.nn.functional.normalize(v, dim=-1) * model.encode_items(items)).sum(-1).detach()
    assert stale["bank_cosine"] == pytest.approx(float(expected.mean()), abs=1e-5) and stale["bank_cosine"] < 0.9
    assert stale["bank_cosine_oldest"] == pytest.approx(float(expected[:6].mean()), abs=1e-5)


def _scripted_rounds(overrides, values, epochs=3):
    cfg, ds = _tiny({"negatives": {"hard": "mined", "hard_k": 2},
                     "mining": {"rounds": 2, "epochs_per_round": 2, "top_r": 30, "window_lo": 2, "window_hi": 20,
                                **overrides.get("mining", {})},
                     "train": {"epochs": epochs, "batch_size": 512, **overrides.get("train", {})}})
    logs = []
    trainer = Trainer(cfg, ds, None, quiet=True, log=logs.append)
    scripted = iter(values)
    trainer.validate = lambda: {"recall@20": next(scripted)}
    return trainer, trainer.fit(), logs


def test_every_round_starts_with_the_whole_patience():
    """The first phase runs its 3 epochs without early stopping but ends on two bad evaluations
    (patience 2): the rounds still run, each with its own patience; round 1's two bad epochs end
    training only because no round follows with a better value; here round 2 improves."""
    _, state, _ = _scripted_rounds({"train": {"patience": 2}}, [0.3, 0.2, 0.1, 0.25, 0.28, 0.29, 0.4])
    assert [r["epoch"] for r in state.history] == [1, 2, 3, 4, 5, 6, 7] and state.best_epoch == 7
    # mining.patience: 1 during the rounds (a round's first bad evaluation ends training)
    _, state, _ = _scripted_rounds({"train": {"patience": 5}, "mining": {"patience": 1}}, [0.3, 0.4, 0.5, 0.45, 0.9])
    assert [r["epoch"] for r in state.history] == [1, 2, 3, 4] and state.stopped_early and state.best_epoch == 3


def test_a_warning_when_the_rounds_do_not_improve_validation():
    _, state, logs = _scripted_rounds({"train": {"patience": 0}}, [0.3, 0.5, 0.4, 0.45, 0.44, 0.41, 0.42])
    assert state.best_epoch == 2
    assert any(m.startswith("warning: the mining rounds did not improve") and "0.4500" in m for m in logs)
    _, state, logs = _scripted_rounds({"train": {"patience": 0}}, [0.3, 0.5, 0.4, 0.55, 0.44, 0.41, 0.42])
    assert state.best_epoch == 4 and not any(m.startswith("warning") for m in logs)


def test_restart_schedule_gives_each_round_its_own_learning_rate():
    cfg, ds = _tiny({"negatives": {"hard": "mined", "hard_k": 2},
                     "mining": {"rounds": 2, "epochs_per_round": 2, "top_r": 30, "window_lo": 2, "window_hi": 20,
                                "restart_schedule": True, "lr_scale": 0.5},
                     "train": {"epochs": 4, "batch_size": 512, "schedule": "cosine"}})
    tr = Trainer(cfg, ds, None, quiet=True, log=lambda m: None)
    spe = tr.steps_per_epoch
    from twotower.training.trainer import lr_factor

    tr.state.step = 2 * spe                                   # first phase: a cosine over train.epochs = 4
    assert tr._lr_factor() == pytest.approx(lr_factor(2 * spe, 4 * spe, 0, "cosine")) == pytest.approx(0.5)
    tr.state.round_start_step = 4 * spe                       # a round: its own cosine over 2 epochs, at half
    tr.state.step = 4 * spe
    assert tr._lr_factor() == pytest.approx(0.5)
    tr.state.step = 5 * spe
    assert tr._lr_factor() == pytest.approx(0.25)
    plain = Trainer(cfg.model_copy(update={"mining": cfg.mining.model_copy(update={"restart_schedule": False})}), ds,
                    None, quiet=True, log=lambda m: None)
    plain.state.step, plain.state.round_start_step = 5 * spe, 4 * spe  # one cosine over all 8 epochs, halved in rounds
    assert plain._lr_factor() == pytest.approx(0.5 * lr_factor(5 * spe, 8 * spe, 0, "cosine"))


def test_content_mining_needs_item_features_and_mines_items_of_the_users_categories():
    cfg, ds = _tiny({"negatives": {"hard": "mined", "hard_k": 2}, "model": {"dim": 32},
                     "mining": {"rounds": 1, "top_r": 12, "window_lo": 0, "window_hi": 12, "source": "content"}})
    tr = Trainer(cfg, ds, None, quiet=True, log=lambda m: None)
    # each category its own axis: an item's content vector is its category's, a user's the mix of theirs
    for m in tr.model.item_tower.features.modules():
        if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            with torch.no_grad():
                m.weight.copy_(torch.eye(*m.weight.shape))
    tr.mine(1)
    lists = tr.candidates.hard
    feats = ds.item_features
    name = feats.names[0]
    csr = feats.rows[name]
    cats = [set(csr.indices[csr.indptr[j]:csr.indptr[j + 1]].tolist()) for j in range(ds.n_items)]
    h = ds.history("train")
    shared = total = anywhere = 0
    for u in range(0, ds.n_users, 7):
        mine = lists.indices[lists.indptr[u]:lists.indptr[u + 1]].tolist()
        liked = set().union(*(cats[j] for j in h.indices[h.indptr[u]:h.indptr[u + 1]]))
        shared += sum(bool(cats[j] & liked) for j in mine)
        anywhere += len(mine) * sum(bool(c & liked) for c in cats) / ds.n_items
        total += len(mine)
    # the mined items share a category with the user's items, which items taken at random far less often do
    assert total and shared / total > 0.95 and anywhere / total < 0.8
    plain, ds2 = _tiny({"negatives": {"hard": "mined", "hard_k": 2},
                        "mining": {"rounds": 1, "top_r": 30, "window_lo": 0, "window_hi": 30, "source": "content"},
                        "model": {"item_features": []}})
    with pytest.raises(ConfigError, match="item features"):
        Trainer(plain, ds2, None, quiet=True, log=lambda m: None).mine(1)
