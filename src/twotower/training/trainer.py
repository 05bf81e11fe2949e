"""The training loop: epochs of in-batch sampled softmax, validation, early stopping, checkpoints.

Everything a step does is visible in ``Trainer.step``: encode the batch, build the candidate set,
assemble the logit (``losses.logit_inputs``), take the softmax loss, update. ``Trainer.fit`` runs the
epochs; which epoch is best, when to stop and when mining rounds begin are ``schedule``'s objects.
During training only ``Trainer`` writes the run directory, through ``run_dir.RunDir`` (the one
owner of its format).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import native
from ..config import RunConfig
from ..data.dataset import Dataset, EncodedFeatures
from ..errors import ArtifactError, ConfigError, TrainingError
from ..features.encoders import fit_context
from ..evaluation.evaluator import evaluate
from ..model import init
from ..model.scoring import ServedScore
from ..model.towers import TwoTowerModel, embed_items, embed_users
from ..run_dir import RunDir
from . import distributed, losses
from .batching import epoch_batches
from .candidates import CandidateBuilder
from . import mining
from .mining import mine_negatives
from .optim import DeferredAdam, RowAdam
from .schedule import EarlyStopping, MiningSchedule, TrainState


class _Optimizers:
    """A dense optimizer and, for sparse embedding tables, a sparse one, stepped together."""

    def __init__(self, opts: list[torch.optim.Optimizer]):
        self.opts = opts

    def zero_grad(self):
        for o in self.opts:
            o.zero_grad(set_to_none=True)

    def step(self):
        for o in self.opts:
            o.step()

    def flush(self):
        """Apply deferred updates (``DeferredAdam``) so that every parameter is current."""
        for o in self.opts:
            if hasattr(o, "flush"):
                o.flush()

    def state_dict(self):
        return {str(i): o.state_dict() for i, o in enumerate(self.opts)}

    def load_state_dict(self, state):
        for i, o in enumerate(self.opts):
            o.load_state_dict(state[str(i)])

    @property
    def param_groups(self):
        return [g for o in self.opts for g in o.param_groups]


def build_model(cfg: RunConfig, dataset: Dataset) -> TwoTowerModel:
    """The towers of ``cfg`` with their feature encoders fitted on ``dataset``'s training rows."""
    specs = cfg.feature_specs()
    legacy = not cfg.features.declared
    item_feats = _tower_features(dataset.item_features, specs.item, "model.item_features" if legacy else "features.item", "item")
    user_feats = _tower_features(dataset.user_features, specs.user, "model.user_features" if legacy else "features.user", "user")
    try:
        context = fit_context(specs.context, dataset.fit_context)
    except ValueError as e:
        raise ConfigError(f"features.context: {e}") from None
    check_memory(cfg, dataset.n_users, dataset.n_items, _feature_rows(item_feats) + _feature_rows(user_feats))
    model = TwoTowerModel(dataset.n_users, dataset.n_items, cfg.model, item_feats, user_feats,
                          sparse=cfg.train.sparse_embeddings, context=context)
    if cfg.model.init != "normal":
        init.start_id_tables(model, dataset.train.users, dataset.train.items, cfg.model.init, cfg.train.seed)
    return model


def _feature_rows(feats: EncodedFeatures | None) -> int:
    """Rows of a tower's categorical feature tables (their vocabularies), for ``check_memory``."""
    return sum(feats.cardinalities().values()) if feats is not None else 0


def memory_estimate(cfg: RunConfig, n_users: int, n_items: int, feature_values: int = 0) -> dict[str, int]:
    """Bytes that training and evaluation will hold at once, from the config and the data's sizes:
    the embedding tables and MLPs (float32) with their gradients and optimizer moments, the memory
    bank, and one block of evaluation scores (``eval.batch_users`` x items, twice for the top-k)."""
    m, d = cfg.model, cfg.model.dim
    rows = (n_users if m.user_id else 0) + (n_items if m.item_id else 0) + feature_values
    if m.user_history and not m.share_item_table:
        rows += n_items
    if m.item_bias:
        rows += n_items / d
    dense = 0
    for _ in range(2):  # each tower's MLP: d -> h1 -> ... -> d
        sizes = [d, *m.mlp, d] if m.mlp else []
        dense += sum(a * b + b for a, b in zip(sizes, sizes[1:]))
    per_param = 8 if cfg.train.optimizer == "sgd" else 16  # weight + gradient (+ two moments)
    return {"parameters": int((rows * d + dense) * per_param),
            "memory_bank": int(cfg.negatives.bank_size * d * 4),
            "evaluation": int(min(cfg.eval.batch_users, max(n_users, 1)) * n_items * 4 * 2)}


def check_memory(cfg: RunConfig, n_users: int, n_items: int, feature_values: int = 0) -> None:
    """Refuse, before allocating anything, a config whose tables for this data would not fit in the
    machine's memory (model.dim beyond reason, huge tables, an evaluation block of terabytes)."""
    import os

    from ..errors import ConfigError

    need = memory_estimate(cfg, n_users, n_items, feature_values)
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return
    if sum(need.values()) <= have:
        return
    gb = lambda b: f"{b / 2**30:,.1f} GiB"  # noqa: E731
    fixes = {"parameters": "lower model.dim (or the MLP's sizes, or drop features)",
             "memory_bank": "lower negatives.bank_size", "evaluation": "lower eval.batch_users"}
    worst = max(need, key=need.get)
    raise ConfigError(f"model.dim = {cfg.model.dim} with {n_users:,} users and {n_items:,} items: training would need about "
                      f"{gb(sum(need.values()))} (parameters with gradients and optimizer state {gb(need['parameters'])}, "
                      f"memory bank {gb(need['memory_bank'])}, evaluation block {gb(need['evaluation'])}) and this machine "
                      f"has {gb(have)}. {fixes[worst][:1].upper() + fixes[worst][1:]}")


def _tower_features(feats: EncodedFeatures | None, specs, key: str, kind: str) -> EncodedFeatures | None:
    """The declared features of one tower from the dataset's table, each read as declared."""
    names = [s.name for s in specs]
    if not names:
        return None
    available = feats.names if feats is not None else []
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(f"{key}: unknown {kind} feature(s) {unknown}; the dataset has {list(available) or 'none'}")
    for s in specs:
        if s.name in feats.specs and feats.specs[s.name] != s:
            raise ConfigError(f"{key} {s.name!r}: the dataset read it as {feats.specs[s.name].kind} with other options than "
                              "declared; load the dataset with the run's config (load_dataset(run_config))")
    return feats.select(names)


def make_optimizer(cfg: RunConfig, model: TwoTowerModel) -> _Optimizers:
    t = cfg.train
    if t.sparse_embeddings:
        if t.optimizer == "sparse_adam":
            opts: list[torch.optim.Optimizer] = [RowAdam(model.sparse_parameters(), lr=t.lr)]
        else:
            rows = DeferredAdam(model.sparse_parameters(), lr=t.lr)
            rows.attach(model)  # a table lookup first applies its rows' deferred moves
            opts = [rows]
        dense = model.dense_parameters()
        if dense:
            opts.append(torch.optim.Adam(dense, lr=t.lr, weight_decay=t.weight_decay, fused=True))
        return _Optimizers(opts)
    if t.optimizer in ("adam", "adamw"):
        # The fused kernel updates all parameters in one pass: on a CPU it is ~6x faster than the
        # default per-tensor loop for embedding tables (every row is touched by Adam's moments).
        cls = torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW
        return _Optimizers([cls(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=True)])
    cls = {"adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}[t.optimizer]
    return _Optimizers([cls(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)])


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = \"cuda\" but PyTorch sees no CUDA device; use \"cpu\" or \"auto\"")
    return torch.device(name)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate: linear warm-up, then constant, cosine or linear decay to 0."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


class Trainer:
    """Trains a ``TwoTowerModel`` on a ``Dataset`` as configured; writes the run directory if given."""

    def __init__(self, cfg: RunConfig, dataset: Dataset, run_dir: str | Path | None = None,
                 quiet: bool = False, log=None, model: TwoTowerModel | None = None):
        self.cfg, self.dataset = cfg, dataset
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.quiet = quiet
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        native.configure(cfg.train.native)  # for the process, as the thread count
        torch.manual_seed(cfg.train.seed)
        self.device = distributed.setup(resolve_device(cfg.train.device))
        # ``model``: continue from trained weights (``twotower update``) instead of a new model
        self.model = (model if model is not None else build_model(cfg, dataset)).to(self.device)
        # each training pair's own context, encoded once (rows: positions in dataset.train)
        self.train_context = self.model.context_table(dataset.train.context)
        # Under torchrun: DDP over the towers, this rank's rows of each batch, the global batch's gathers.
        self.par = distributed.Parallel(self.model, self.device, cfg.train.seed, sparse=cfg.train.sparse_embeddings)
        if not self.par.main:
            self.quiet, self.log = True, (lambda msg: None)
        self.optimizer = make_optimizer(cfg, self.model)
        self.state = TrainState()
        self.candidates = CandidateBuilder(cfg, dataset, self.device, cfg.model.dim, exposure=_exposure(cfg, dataset),
                                           merge_duplicates=self.model.item_tower.deterministic,
                                           exclude=self.model.new_entities(dataset)[0])
        # A batch's rows of one user score the same, and the loss may score them once
        # (losses.shared_softmax_loss's query_ids)
        self.same_user_same_query = self.model.user_tower.deterministic
        self.steps_per_epoch = self._steps(cfg.train.batch_size)
        # Mining rounds extend training: train.epochs, then epochs_per_round more after each round.
        self.total_epochs = self._schedule().total_epochs
        # The learning-rate schedule runs over every step of every epoch, the early ones at their batch size.
        early = min(self.total_epochs, cfg.train.early_batch_epochs if cfg.train.early_batch_size else 0)
        self.total_steps = (self.total_epochs - early) * self.steps_per_epoch
        if early:
            self.total_steps += early * self._steps(cfg.train.early_batch_size)
        self.best_weights: dict[str, torch.Tensor] | None = None
        # Seconds that earlier invocations spent on the epochs a resumed checkpoint carries
        # (training, validation, mining): part of the run's training time.
        self.earlier_seconds = 0.0

    def _steps(self, batch_size: int) -> int:
        ds = self.dataset
        return len(epoch_batches(len(ds.train), batch_size, np.random.default_rng(0),
                                 ds.train.users if self.cfg.train.unique_users else None))

    def batch_size(self, epoch: int) -> int:
        """B of ``epoch`` (1-based): ``train.early_batch_size`` for the first ``early_batch_epochs``."""
        t = self.cfg.train
        return t.early_batch_size if t.early_batch_size and epoch <= t.early_batch_epochs else t.batch_size

    # ---- one step --------------------------------------------------------------------------------
    def step(self, pairs: np.ndarray, rng: np.random.Generator) -> float:
        """One step: encode the batch, build the candidates, assemble the logit, take the loss, update."""
        model, train = self.model, self.cfg.train
        shard = self.par.shard(pairs)  # ``pairs`` is the global batch; this rank encodes its own rows
        users, items, hist, mask, ctx = self._rows(shard.rows, rng)
        u, v = self.par.encode(users, items, hist, mask, ctx)
        everyone = shard.global_batch(items, v, self.dataset.train.items, self.state.step)

        # In-batch + sampled + memory bank (shared by all rows), hard (per row), and the masks.
        cand = self.candidates.build(model, users, items, v, self.state.step, shared=everyone)
        # The logit of every (row, candidate) pair: bias, logQ, merged copies, hard weight, masks.
        bias = model.bias(cand.ids)
        hard = None if cand.hard_ids is None else model.score_rows(u, cand.hard_vectors, cand.hard_ids.clamp_min(0))
        if hard is not None and self.cfg.negatives.hard_margin is not None:
            # the false-negative filter: hard negatives scored within the margin of the row's positive
            positive = model.score_rows(u, v[:, None, :], items[:, None])[:, 0]
            self.candidates.filter_hard(cand, hard, positive)
        logits = losses.logit_inputs(cand, item_bias=bias, hard_scores=hard, logq_weight=train.logq_weight,
                                     correct_positive=train.correct_positive, corrected=train.corrected_logq)
        # The product, the softmax and its gradients are fused in blocks of rows: no [B, C] matrix
        # is stored, and the masks are coordinates of the few excluded entries.
        loss = losses.shared_softmax_loss(u / model.tau(), cand.vectors, logits,
                                          query_ids=users if self.same_user_same_query else None)

        self._update(loss * shard.loss_weight)
        self.candidates.after_step(items, v, cand, shared=everyone)
        self.state.step += 1
        return shard.mean_loss(loss)

    def _rows(self, pairs: np.ndarray, rng: np.random.Generator):
        """``(users, items, history, history_mask, context)`` of training pairs, on the device (no
        history, no context: None); a pair's context is its own interaction's."""
        ds, dev = self.dataset, self.device
        users = distributed.to_device(ds.train.users[pairs], dev)
        items = distributed.to_device(ds.train.items[pairs], dev)
        hist = mask = None
        if self.cfg.model.user_history:
            h, m = ds.pair_history(pairs, self.cfg.model.history_length, rng)
            hist, mask = distributed.to_device(h, dev), distributed.to_device(m, dev)
        ctx = None if self.train_context is None else self.train_context.take(pairs)
        return users, items, hist, mask, ctx

    def _update(self, loss: torch.Tensor) -> None:
        """Backward, clip, the learning rate of this step, the optimizer's step."""
        t, model = self.cfg.train, self.model
        self.optimizer.zero_grad()
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.dense_parameters() if p.grad is not None] if t.sparse_embeddings
                                           else model.parameters(), t.grad_clip)
        for g in self.optimizer.param_groups:
            g["lr"] = t.lr * self._lr_factor()
        self.optimizer.step()

    def _lr_factor(self) -> float:
        """The learning-rate multiplier of this step: one schedule over every epoch (the rounds at its
        tail), or with ``mining.restart_schedule`` one over the first phase's ``train.epochs`` and one per
        round over its own epochs; ``mining.lr_scale`` in the rounds."""
        t, mc, st = self.cfg.train, self.cfg.mining, self.state
        in_round = st.round_start_step is not None
        if mc.restart_schedule and in_round:
            f = lr_factor(st.step - st.round_start_step, mc.epochs_per_round * self.steps_per_epoch, 0, t.schedule)
        elif mc.restart_schedule and mc.rounds:
            f = lr_factor(st.step, t.epochs * self.steps_per_epoch, t.warmup_steps, t.schedule)
        else:
            f = lr_factor(st.step, self.total_steps, t.warmup_steps, t.schedule)
        return f * (mc.lr_scale if in_round else 1.0)

    # ---- epochs ----------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        cfg, ds = self.cfg, self.dataset
        # Seeded by (seed, epoch): an epoch resumed from a checkpoint replays exactly.
        rng = np.random.default_rng([cfg.train.seed, epoch])
        # Per rank: dropout masks and hard-negative draws of different rows must not be copies.
        torch.manual_seed(cfg.train.seed * 100003 + epoch + 7919 * self.par.rank)
        batches = epoch_batches(len(ds.train), self.batch_size(epoch), rng, ds.train.users if cfg.train.unique_users else None)
        self.model.train()
        t0 = time.perf_counter()
        total, n = 0.0, 0
        bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", disable=self.quiet, leave=False, file=sys.stderr)
        for k, pairs in enumerate(bar):
            loss = self.step(pairs, rng)
            if not math.isfinite(loss):
                raise TrainingError(f"epoch {epoch}, batch {k}: the loss is {loss}: training diverged. Lower train.lr or "
                                    "raise model.temperature, then start again (the run directory keeps the last good "
                                    "checkpoint: --resume continues from it)")
            total += loss * len(pairs)
            n += len(pairs)
            if k % 20 == 0:
                bar.set_postfix(loss=f"{total / n:.4f}", ex_s=f"{n / (time.perf_counter() - t0):,.0f}")
        self.optimizer.flush()  # validation, mining and checkpoints read every row
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch, "loss": total / max(n, 1), "seconds": seconds, "examples_per_s": n / max(seconds, 1e-9)}
        # what the sources did: the bank's staleness, the share of hard negatives the margin filter masked
        record.update(self.candidates.bank_staleness(self.model))
        record.update(self.candidates.take_stats())
        self.model.train()
        return record

    def validate(self) -> dict[str, float]:
        # Per-epoch validation ranks only as deep as the monitored cut-off: a top-20 costs far
        # less than the top-500 of the final report.
        k = int(self.cfg.train.monitor.split("@")[1])  # also of a group's metric (cold_items/recall@20)
        quick = self.cfg.eval.model_copy(update={"ks": [k]})
        return self.par.on_main(lambda: evaluate(self.model, self.dataset, "valid", quick, self.cfg.model.history_length))

    def mine(self, round_: int = 1) -> dict:
        """One mining round (docs/design.md): embed every item with the current model (frozen for the
        round), take each training user's top R, drop the user's positives, keep the round's rank
        window; optionally drop the items that co-occur most with the user's own; the next epochs sample
        their hard negatives from these lists. With ``mining.source = "content"`` the ranking is by the
        item tower's feature part instead of the model's score."""
        mc, ds = self.cfg.mining, self.dataset
        t0 = time.perf_counter()
        users = np.unique(ds.train.users)
        lo, hi = mining.round_window(mc.window_lo, mc.window_hi, mc.window_scale, round_)
        hi = min(hi, mc.top_r)
        lo = min(lo, hi - 1)

        def lists():
            hist = ds.history("train")
            with torch.no_grad():
                if mc.source == "content":
                    items = self._content_vectors()
                    uv = mining.content_queries(items, users, hist.indptr, hist.indices)
                    # a global random order among items of equal content (coarse categories tie)
                    jitter = np.random.default_rng([self.cfg.train.seed, round_]).random(len(items), dtype=np.float32)
                    items = np.c_[items, jitter]
                    uv = np.c_[uv, np.full(len(uv), 1e-3, dtype=np.float32)]
                else:
                    items = embed_items(self.model).float().cpu().numpy()
                    uv = embed_users(self.model, users, hist, self.cfg.model.history_length).float().cpu().numpy()
                    uv, items = ServedScore.of(self.model).inner_product(uv, items)
            indptr, indices = mine_negatives(uv, items, users, hist.indptr, hist.indices, mc.top_r, lo, hi, ds.n_users)
            out = {}
            if len(ds.valid):  # measured on validation items: read, never trained on
                valid = ds.valid.csr(ds.n_users)
                out["mined_valid_rate"] = mining.heldout_rate(indptr, indices, valid.indptr, valid.indices, ds.n_items)
            if mc.cooccurrence_drop:
                rows = np.repeat(np.arange(ds.n_users), np.diff(indptr))
                scores = mining.cooccurrence_scores(hist.indptr, hist.indices, ds.n_items, rows, indices)
                indptr, indices, kept = mining.drop_cooccurring(indptr, indices, scores, mc.cooccurrence_drop)
                if len(ds.valid):
                    out["kept_valid_rate"] = mining.heldout_rate(indptr, indices, valid.indptr, valid.indices, ds.n_items)
            return indptr, indices, out

        indptr, indices, rates = self.par.on_main(lists)  # every rank samples from the lists rank 0 mined
        self.model.train()
        self.candidates.set_mined(indptr, indices, self.state.step)
        info = {"mined_negatives": int(len(indices)), "mining_seconds": time.perf_counter() - t0,
                "mining_window": [lo, hi], **rates}
        fn = ""
        if "mined_valid_rate" in rates:
            fn = f"; {rates['mined_valid_rate']:.2%} of them are validation positives"
            if "kept_valid_rate" in rates:
                fn += f", {rates['kept_valid_rate']:.2%} after the co-occurrence filter"
        self.log(f"mining: round {round_}, {len(indices):,} negatives for {len(users):,} users (ranks {lo} to {hi - 1} "
                 f"of the top {mc.top_r} by {mc.source}, positives dropped{fn}) in {info['mining_seconds']:.1f}s")
        return info

    def _content_vectors(self) -> np.ndarray:
        """``[n_items, d]``: each item's feature part of the item tower, L2-normalised (no id, no MLP)."""
        from ..errors import ConfigError
        from ..model.towers import TowerInputs

        tower = self.model.item_tower
        if tower.features is None:
            raise ConfigError("mining.source = \"content\" needs item features in the item tower (model.item_features)")
        self.model.eval()
        ids = torch.arange(self.dataset.n_items, device=self.device)
        vecs = torch.cat([tower.feature_vectors(TowerInputs(ids[s : s + 65536], all_known=True))
                          for s in range(0, len(ids), 65536)])
        return torch.nn.functional.normalize(vecs.float(), dim=-1).cpu().numpy()

    def _schedule(self, jump_after: int | None = None) -> MiningSchedule:
        return MiningSchedule(self.cfg.train.epochs, self.cfg.mining.rounds, self.cfg.mining.epochs_per_round, jump_after)

    def fit(self, resume: bool = False, max_epochs: int | None = None, jump_after: int | None = None,
            on_epoch: Callable[[dict], bool] | None = None) -> TrainState:
        """Train until ``train.epochs`` (plus the mining rounds' epochs) or early stopping; keep the best
        weights (by validation). ``max_epochs`` stops sooner without changing the schedule.
        ``on_epoch(record)``, after each epoch (its record: loss, seconds, validation figures),
        returns True to stop there: training ends as after early stopping (the checkpoint records
        it, and ``--resume`` goes on to the refit), with the best weights so far.
        ``jump_after``: with mining rounds, end the first phase after this epoch and go on to the
        rounds (a refit replaying a run whose first phase early-stopped; ``TrainState.phase_one_best``)."""
        self._open_run(resume)
        schedule = self._schedule(jump_after)
        stopping = EarlyStopping(self.state, self._patience())
        last = schedule.total_epochs if max_epochs is None else min(max_epochs, schedule.total_epochs)
        if self.state.stopped_early:  # resumed after early stopping: training ended there
            last = self.state.epoch
        epoch = self.state.epoch
        while epoch < last:
            epoch += 1
            if schedule.round_at(epoch) is not None:
                # Every round gets the whole of its own patience, whatever the evaluations before it.
                self.state.round_start_step = self.state.step
                stopping.restart()
                stopping.patience = self._patience()
            record = self._train_scheduled_epoch(epoch, schedule)
            self._select(epoch, last, record, stopping)
            self.state.epoch = epoch
            self.state.history.append(record)
            self._log_epoch(record)
            next_round = schedule.round_at(epoch + 1) if epoch < last else None
            if stopping.spent and (schedule.in_first_phase(epoch) or next_round == 1):
                # The first phase has converged (before its last epoch, or on it): go on to the mining
                # rounds from its best weights rather than skip them.
                self.log(f"early stop of the first phase at epoch {epoch}; mining rounds begin from epoch "
                         f"{self.state.best_epoch}'s weights")
                self.model.load_state_dict(self.best_weights)
                stopping.restart()
                epoch = schedule.end_first_phase(self.state, self.state.best_epoch)
            elif stopping.spent and next_round is None:
                self.state.stopped_early = True
            elif schedule.replays_jump(epoch):
                self.log(f"first phase ends at epoch {epoch}, as in the run being replayed"
                         + ("; mining rounds begin" if schedule.epochs < last else ""))
                epoch = schedule.end_first_phase(self.state, epoch)
            stop = on_epoch is not None and on_epoch(dict(record))
            if stop and not self.state.stopped_early and epoch < last:
                self.state.stopped_early = self.state.stopped_by_caller = True
            self._record_epoch(record)
            if self.state.stopped_by_caller:
                self.log(f"stopped by the caller after epoch {epoch}; best epoch {self.state.best_epoch}")
                break
            if self.state.stopped_early:
                self.log(f"early stop: no {self.cfg.train.monitor} improvement for {stopping.patience} evaluations; "
                         f"best epoch {self.state.best_epoch}")
                break
        self._warn_if_rounds_lost(schedule)
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
        return self.state

    def _patience(self) -> int:
        """The patience of the current phase: ``mining.patience`` once the rounds have begun (default
        ``train.patience``), ``train.patience`` before."""
        mc = self.cfg.mining
        if self.state.round_start_step is not None and mc.patience is not None:
            return mc.patience
        return self.cfg.train.patience

    def _warn_if_rounds_lost(self, schedule: MiningSchedule) -> None:
        """A warning in the log when mining rounds ran but validation chose a model from before them."""
        rounds = [r for r in self.state.history if "mining_round" in r]
        if not rounds or not len(self.dataset.valid):
            return
        first = rounds[0]["epoch"]
        if self.state.best_epoch < first:
            m = self.cfg.train.monitor
            best_round = max((r.get(f"valid/{m}", float("-inf")) for r in self.state.history if r["epoch"] >= first),
                             default=float("nan"))
            self.log(f"warning: the mining rounds did not improve validation {m} ({best_round:.4f} at best, against "
                     f"{self.state.best_value:.4f} at epoch {self.state.best_epoch}, before them): the model from "
                     f"before mining is kept")

    def _train_scheduled_epoch(self, epoch: int, schedule: MiningSchedule) -> dict:
        """A mining pass first if a round starts with ``epoch``, then the epoch's training."""
        round_ = schedule.round_at(epoch)
        mined = self.mine(round_) if round_ is not None else {}
        record = self.train_epoch(epoch)
        if round_ is not None:
            record.update({"mining_round": round_, **mined})
        return record

    def _select(self, epoch: int, last: int, record: dict, stopping: EarlyStopping) -> None:
        """Validate when due (every ``train.eval_every`` epochs and the last) into ``record``, and keep
        the weights of a new best epoch; without a validation set, every epoch's."""
        if not len(self.dataset.valid):
            stopping.take_unvalidated(epoch)
            self._keep_best_weights()
        elif epoch % self.cfg.train.eval_every == 0 or epoch == last:
            t0 = time.perf_counter()
            metrics = self.validate()
            record["eval_seconds"] = time.perf_counter() - t0
            record.update({f"valid/{k}": v for k, v in metrics.items()})
            if stopping.observe(epoch, metrics[self.cfg.train.monitor]):
                self._keep_best_weights()

    def _keep_best_weights(self) -> None:
        self.best_weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        self._save_best_weights()

    def _log_epoch(self, r: dict) -> None:
        m = self.cfg.train.monitor
        val = f"  valid {m} {r[f'valid/{m}']:.4f}" if f"valid/{m}" in r else ""
        rnd = f"  (mining round {r['mining_round']})" if "mining_round" in r else ""
        tau = f"  tau {float(self.model.temperature):.4f}" if self.model.log_temperature is not None else ""
        self.log(f"epoch {r['epoch']:3d}  loss {r['loss']:.4f}  {r['seconds']:.1f}s  {r['examples_per_s']:,.0f} ex/s{val}{tau}{rnd}")

    # ---- run directory ---------------------------------------------------------------------------
    @property
    def _writes(self) -> bool:
        """Rank 0 alone writes the run directory; every rank reads it (``--resume``)."""
        return self.run_dir is not None and self.par.main

    def _open_run(self, resume: bool) -> None:
        """Before the first epoch: load the checkpoint (``resume``), or start the run directory."""
        if resume and self._checkpoint() is not None:
            self._load_checkpoint()
            # A crash in the middle of a checkpoint swap left a second copy beside it; with no epoch
            # left to train no later save would clear it. Rank 0 settles it once every rank has read.
            self.par.barrier()
            self._settle_checkpoint()
        elif self._writes:
            self._start_run_dir(restart=resume)

    @property
    def _dir(self) -> RunDir | None:
        return None if self.run_dir is None else RunDir(self.run_dir)

    def _start_run_dir(self, restart: bool = False) -> None:
        """``restart``: --resume found no checkpoint (the run died before its first one), so it
        starts over in the same directory, provided the config is the same."""
        d = self._dir
        if restart:
            d.check_config(self.cfg)
            d.clear_progress()
            if d.path.exists():
                self.log(f"no checkpoint in {d.path} yet: starting the run from the beginning")
        elif d.holds_run():
            raise ArtifactError(f"{d.path}: already holds a run. Pass --resume to continue it, or choose another --out")
        d.write_metadata(self.cfg, self.dataset, self.model.feature_state())

    def _checkpoint(self) -> Path | None:
        return None if self.run_dir is None else self._dir.checkpoint_dir()

    def _check_same_config(self) -> None:
        self._dir.check_config(self.cfg)

    def _save_best_weights(self) -> None:
        """``best_weights`` become the run's weights (rank 0, with a run directory)."""
        if self._writes:
            self._dir.save_weights(self.best_weights)

    def _record_epoch(self, record: dict) -> None:
        """One epoch's line in the run directory (rank 0, with a run directory)."""
        if self._writes:
            self._dir.append_epoch(record)
            self._save_checkpoint()

    def _settle_checkpoint(self) -> None:
        if self._writes:
            self._dir.settle_checkpoint()

    def _save_checkpoint(self) -> None:
        self._dir.save_checkpoint(self.model.state_dict(), self.best_weights, self.optimizer.state_dict(),
                                  dict(self.state.__dict__), self.candidates.state_dict())

    def _load_checkpoint(self) -> None:
        d = self._dir
        if self._checkpoint() is None:
            raise ArtifactError(f"{d.path}: no checkpoint to resume from. Start the run without --resume")
        self._check_same_config()
        ck = d.load_checkpoint()
        self.model.load_state_dict(ck.last)
        self.optimizer.load_state_dict(ck.optimizer)
        try:
            self.state = TrainState(**ck.state)
        except TypeError as e:
            raise ArtifactError(f"{d.path}: the checkpoint's state.json is not this version's trainer state ({e}). "
                                "Start the run again in a new --out") from None
        self.earlier_seconds = float(sum(r.get(k, 0.0) for r in self.state.history
                                         for k in ("seconds", "eval_seconds", "mining_seconds")))
        if ck.negatives is not None:
            self.candidates.load_state_dict(ck.negatives)
        # The checkpoint's history is the record: a crash between writing an epoch's line and the
        # checkpoint must not leave a line for an epoch that will be trained again.
        if self._writes:
            d.write_epochs(self.state.history)
        if ck.best is not None:
            self.best_weights = ck.best
        self.log(f"resuming {d.path} after epoch {self.state.epoch}")


def _exposure(cfg: RunConfig, ds: Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """The impressions file of ``negatives.hard = "exposure"`` as a per-user CSR of item indices."""
    neg = cfg.negatives
    if neg.hard != "exposure":
        return None
    from ..data.sources import load_impressions

    return load_impressions(neg.exposure_file, ds, neg.exposure_user_col, neg.exposure_item_col)
