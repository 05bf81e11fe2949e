"""The training loop: epochs of in-batch sampled softmax, validation, early stopping, checkpoints.

Everything a step does is visible in ``Trainer.step``: encode the batch, build the candidate set,
correct, mask, take the softmax loss, update. Only ``Trainer`` touches the run directory.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import artifacts
from ..config import RunConfig
from ..data.dataset import Dataset
from ..errors import ArtifactError
from ..evaluation.evaluator import evaluate
from ..model.towers import TwoTowerModel
from . import distributed, losses
from .batching import epoch_batches
from .candidates import CandidateBuilder
from .mining import mine_negatives, scoring_vectors
from .optim import DeferredAdam, RowAdam


@dataclass
class TrainState:
    epoch: int = 0                 # epochs completed
    step: int = 0
    best_epoch: int = 0
    best_value: float = -math.inf
    bad_evals: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)
    # With mining rounds: the best epoch of a first phase that early-stopped, whose weights the
    # rounds started from (a refit replays the same jump).
    phase_one_best: int | None = None


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
    m = cfg.model
    item_feats = dataset.item_features
    if item_feats is not None:
        names = item_feats.names if m.item_features == "all" else m.item_features
        _check_names(names, item_feats.names, "model.item_features", "item")
        item_feats = item_feats.select(names) if names else None
    elif m.item_features not in ("all", []):
        raise _feature_error("model.item_features", m.item_features, [], "item")
    user_feats = dataset.user_features
    if user_feats is not None:
        names = user_feats.names if m.user_features == "all" else m.user_features
        _check_names(names, user_feats.names, "model.user_features", "user")
        user_feats = user_feats.select(names) if names else None
    elif m.user_features not in ("all", []):
        raise _feature_error("model.user_features", m.user_features, [], "user")
    return TwoTowerModel(dataset.n_users, dataset.n_items, m, item_feats, user_feats,
                         sparse=cfg.train.sparse_embeddings)


def _check_names(names, available, key, kind):
    unknown = [n for n in names if n not in available]
    if unknown:
        raise _feature_error(key, unknown, available, kind)


def _feature_error(key, names, available, kind):
    from ..errors import ConfigError
    return ConfigError(f"{key}: unknown {kind} feature(s) {names}; the dataset has {list(available) or 'none'}")


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
        from ..errors import ConfigError
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
                 quiet: bool = False, log=None):
        self.cfg, self.dataset = cfg, dataset
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.quiet = quiet
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        self.device = distributed.setup(resolve_device(cfg.train.device))
        self.model = build_model(cfg, dataset).to(self.device)
        # Under torchrun: DDP over the towers, this rank's rows of each batch, the global batch's gathers.
        self.par = distributed.Parallel(self.model, self.device, cfg.train.seed, sparse=cfg.train.sparse_embeddings)
        if not self.par.main:
            self.quiet, self.log = True, (lambda msg: None)
        self.optimizer = make_optimizer(cfg, self.model)
        self.state = TrainState()
        self.candidates = CandidateBuilder(cfg, dataset, self.device, cfg.model.dim, exposure=_exposure(cfg, dataset),
                                           merge_duplicates=self.model.item_tower.deterministic)
        # A batch's rows of one user score the same, and the loss may score them once
        # (losses.shared_softmax_loss's query_ids)
        self.same_user_same_query = self.model.user_tower.deterministic
        self.steps_per_epoch = len(epoch_batches(len(dataset.train), cfg.train.batch_size, np.random.default_rng(0),
                                                 dataset.train.users if cfg.train.unique_users else None))
        # Mining rounds extend training: train.epochs, then epochs_per_round more after each round.
        self.total_epochs = cfg.train.epochs + cfg.mining.rounds * cfg.mining.epochs_per_round
        self.best_weights: dict[str, torch.Tensor] | None = None

    # ---- one step --------------------------------------------------------------------------------
    def step(self, pairs: np.ndarray, rng: np.random.Generator) -> float:
        cfg, ds, model = self.cfg, self.dataset, self.model
        dev = self.device
        shard = self.par.shard(pairs)  # ``pairs`` is the global batch; this rank encodes its own rows
        pairs = shard.rows
        users = distributed.to_device(ds.train.users[pairs], dev)
        items = distributed.to_device(ds.train.items[pairs], dev)
        hist = mask = None
        if cfg.model.user_history:
            h, m = ds.pair_history(pairs, cfg.model.history_length, rng)
            hist, mask = distributed.to_device(h, dev), distributed.to_device(m, dev)
        u, v = self.par.encode(users, items, hist, mask)
        everyone = shard.global_batch(items, v, ds.train.items, self.state.step)

        # Candidates: in-batch + sampled + memory bank (shared by all rows), hard (per row).
        cand = self.candidates.build(model, users, items, v, self.state.step, shared=everyone)
        # Shared columns score z = <u, v_c> / tau + b_c - w log q_c. The product, the softmax and its
        # gradients are fused in blocks of rows (losses.shared_softmax_loss): no [B, C] matrix is
        # stored, and the masks are coordinates of the few excluded entries.
        offset, shift = model.bias(cand.ids), None
        if cand.log_q is not None:
            correction = cfg.train.logq_weight * cand.log_q
            offset = -correction if offset is None else offset - correction
            if not cfg.train.correct_positive:
                shift = -correction[cand.target]  # the positive's own logit stays uncorrected
        if cand.log_count is not None:
            # a column standing for k copies of an item: + log k, except as the row's own positive
            # (candidates.distinct_positives)
            offset = cand.log_count if offset is None else offset + cand.log_count
            own = cand.log_count[cand.target]
            shift = own if shift is None else shift + own
        excluded = (losses.no_coordinates(items.device) if cand.distinct
                    else losses.accidental_hits(items, cand.ids, cand.target))
        if cfg.train.mask_user_history:
            seen = losses.seen_item_mask(users, cand.ids, cand.target, self.candidates.seen_keys, ds.n_items)
            excluded = losses.merge_coordinates(excluded, losses.mask_coordinates(seen), n_cols=len(cand.ids))
        hard = hard_mask = None
        if cand.hard_ids is not None:
            # Hard columns: no logQ (not drawn from a known distribution); the curriculum's weight w
            # enters as + log w.
            hard = model.score_rows(u, cand.hard_vectors, cand.hard_ids.clamp_min(0)) + cand.hard_log_weight
            hard_mask = self.candidates.hard_mask(users, items, cand)
        loss = losses.shared_softmax_loss(u / model.tau(), cand.vectors, cand.target, offset, excluded, shift, hard, hard_mask,
                                          query_ids=users if self.same_user_same_query else None)

        self.optimizer.zero_grad()
        (loss * shard.loss_weight).backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.dense_parameters() if p.grad is not None] if cfg.train.sparse_embeddings
                                           else model.parameters(), cfg.train.grad_clip)
        factor = lr_factor(self.state.step, self.total_epochs * self.steps_per_epoch, cfg.train.warmup_steps, cfg.train.schedule)
        for g in self.optimizer.param_groups:
            g["lr"] = cfg.train.lr * factor
        self.optimizer.step()
        self.candidates.after_step(items, v, cand, excluded, shared=everyone)
        self.state.step += 1
        return shard.mean_loss(loss)

    # ---- epochs ----------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        cfg, ds = self.cfg, self.dataset
        # Seeded by (seed, epoch): an epoch resumed from a checkpoint replays exactly.
        rng = np.random.default_rng([cfg.train.seed, epoch])
        # Per rank: dropout masks and hard-negative draws of different rows must not be copies.
        torch.manual_seed(cfg.train.seed * 100003 + epoch + 7919 * self.par.rank)
        batches = epoch_batches(len(ds.train), cfg.train.batch_size, rng, ds.train.users if cfg.train.unique_users else None)
        self.model.train()
        t0 = time.perf_counter()
        total, n = 0.0, 0
        bar = tqdm(batches, desc=f"epoch {epoch}", unit="batch", disable=self.quiet, leave=False, file=sys.stderr)
        for k, pairs in enumerate(bar):
            loss = self.step(pairs, rng)
            if not math.isfinite(loss):
                raise FloatingPointError(f"epoch {epoch}, batch {k}: loss is {loss}. Lower train.lr or raise model.temperature")
            total += loss * len(pairs)
            n += len(pairs)
            if k % 20 == 0:
                bar.set_postfix(loss=f"{total / n:.4f}", ex_s=f"{n / (time.perf_counter() - t0):,.0f}")
        self.optimizer.flush()  # validation, mining and checkpoints read every row
        seconds = time.perf_counter() - t0
        return {"epoch": epoch, "loss": total / max(n, 1), "seconds": seconds, "examples_per_s": n / max(seconds, 1e-9)}

    def validate(self) -> dict[str, float]:
        # Per-epoch validation ranks only as deep as the monitored cut-off: a top-20 costs far
        # less than the top-500 of the final report.
        k = int(self.cfg.train.monitor.split("@")[1])
        quick = self.cfg.eval.model_copy(update={"ks": [k]})
        return self.par.on_main(lambda: evaluate(self.model, self.dataset, "valid", quick, self.cfg.model.history_length))

    def mine(self) -> dict:
        """One mining round (DESIGN.md): embed every item with the current model, take each training
        user's top R, drop the user's positives, keep ranks in the window; the next epochs sample
        their hard negatives from these lists."""
        from ..evaluation.ranking import embed_items, embed_users

        mc, ds = self.cfg.mining, self.dataset
        t0 = time.perf_counter()
        users = np.unique(ds.train.users)

        def lists():
            hist = ds.history("train")
            with torch.no_grad():
                items = embed_items(self.model).float().cpu().numpy()
                uv = torch.cat([embed_users(self.model, users[s : s + 8192], hist, self.cfg.model.history_length)
                                for s in range(0, len(users), 8192)]).float().cpu().numpy()
                bias = self.model.bias(torch.arange(ds.n_items, device=self.device)) if self.model.item_bias is not None else None
                uv, items = scoring_vectors(uv, items, float(self.model.temperature), None if bias is None else bias.float().cpu().numpy())
            return mine_negatives(uv, items, users, hist.indptr, hist.indices, mc.top_r, mc.window_lo, mc.window_hi, ds.n_users)

        indptr, indices = self.par.on_main(lists)  # every rank samples from the lists rank 0 mined
        self.model.train()
        self.candidates.set_mined(indptr, indices)
        info = {"mined_negatives": int(len(indices)), "mining_seconds": time.perf_counter() - t0}
        self.log(f"mining: {len(indices):,} negatives for {len(users):,} users (ranks {mc.window_lo} to {mc.window_hi - 1} "
                 f"of the top {mc.top_r}, positives dropped) in {info['mining_seconds']:.1f}s")
        return info

    def _mining_round(self, epoch: int) -> int | None:
        """The round that starts with ``epoch`` (1-based), or None."""
        mc, first = self.cfg.mining, self.cfg.train.epochs + 1
        if not mc.rounds or epoch < first or (epoch - first) % mc.epochs_per_round:
            return None
        return (epoch - first) // mc.epochs_per_round + 1

    def fit(self, resume: bool = False, max_epochs: int | None = None, jump_after: int | None = None) -> TrainState:
        """Train until ``train.epochs`` (plus the mining rounds' epochs) or early stopping; keep the best
        weights (by validation). ``max_epochs`` stops sooner without changing the schedule.
        ``jump_after``: with mining rounds, end the first phase after this epoch and go on to the
        rounds (a refit replaying a run whose first phase early-stopped; ``TrainState.phase_one_best``)."""
        cfg = self.cfg
        if resume and self._checkpoint() is not None:
            self._load_checkpoint()
            # A crash in the middle of a checkpoint swap left a second copy beside it; with no epoch
            # left to train no later save would clear it. Rank 0 settles it once every rank has read.
            self.par.barrier()
            if self._writes:
                artifacts.settle_dir(self.run_dir / "checkpoint", "state.json")
        elif self._writes:
            self._start_run_dir(restart=resume)
        monitor = cfg.train.monitor
        has_valid = len(self.dataset.valid) > 0
        last = self.total_epochs if max_epochs is None else min(max_epochs, self.total_epochs)
        if self.state.stopped_early:  # resumed after early stopping: training ended there
            last = self.state.epoch
        epoch = self.state.epoch
        while epoch < last:
            epoch += 1
            round_ = self._mining_round(epoch)
            mined = self.mine() if round_ is not None else {}
            record = self.train_epoch(epoch)
            if round_ is not None:
                record.update({"mining_round": round_, **mined})
            if has_valid and (epoch % cfg.train.eval_every == 0 or epoch == last):
                t0 = time.perf_counter()
                metrics = self.validate()
                record["eval_seconds"] = time.perf_counter() - t0
                record.update({f"valid/{k}": v for k, v in metrics.items()})
                value = metrics[monitor]
                if value > self.state.best_value:
                    self.state.best_value, self.state.best_epoch, self.state.bad_evals = value, epoch, 0
                    self.best_weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                    if self._writes:
                        artifacts.save_tensors(self.run_dir / "model.safetensors", self.best_weights)
                else:
                    self.state.bad_evals += 1
            elif not has_valid:
                self.state.best_epoch = epoch
                self.best_weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                if self._writes:
                    artifacts.save_tensors(self.run_dir / "model.safetensors", self.best_weights)
            self.state.epoch = epoch
            self.state.history.append(record)
            self._log_epoch(record)
            if cfg.train.patience and self.state.bad_evals >= cfg.train.patience:
                self.state.stopped_early = True
                if cfg.mining.rounds and epoch < cfg.train.epochs:
                    # The first phase has converged: go on to the mining rounds from its best weights
                    # rather than skip them (mining needs a trained model, not a fixed epoch number).
                    self.log(f"early stop of the first phase at epoch {epoch}; mining rounds begin from epoch "
                             f"{self.state.best_epoch}'s weights")
                    self.model.load_state_dict(self.best_weights)
                    self.state.stopped_early, self.state.bad_evals = False, 0
                    epoch = self._end_first_phase(self.state.best_epoch)
            elif jump_after is not None and cfg.mining.rounds and epoch == jump_after < cfg.train.epochs:
                self.log(f"first phase ends at epoch {epoch}, as in the run being replayed"
                         + ("; mining rounds begin" if cfg.train.epochs < last else ""))
                epoch = self._end_first_phase(epoch)
            if self._writes:
                artifacts.append_jsonl(self.run_dir / "metrics.jsonl", record)
                self._save_checkpoint()
            if self.state.stopped_early:
                self.log(f"early stop: no {monitor} improvement for {cfg.train.patience} evaluations; best epoch {self.state.best_epoch}")
                break
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
        return self.state

    def _end_first_phase(self, best: int) -> int:
        """Skip to the end of the first phase (``train.epochs``): the next epoch is the first mining
        round's. ``best`` is the epoch whose weights the rounds start from. Returns the new epoch."""
        self.state.phase_one_best = best
        self.state.epoch = self.cfg.train.epochs
        return self.state.epoch

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

    def _start_run_dir(self, restart: bool = False) -> None:
        """``restart``: --resume found no checkpoint (the run died before its first one), so it
        starts over in the same directory, provided the config is the same."""
        d = self.run_dir
        if restart:
            self._check_same_config()
            # what the dead process left: a half-written first checkpoint, an epoch line
            for stale in ("checkpoint", "checkpoint.new", "checkpoint.old"):
                shutil.rmtree(d / stale, ignore_errors=True)
            (d / "metrics.jsonl").unlink(missing_ok=True)
            if d.exists():
                self.log(f"no checkpoint in {d} yet: starting the run from the beginning")
        elif (d / "checkpoint").exists() or (d / "metrics.jsonl").exists():
            raise ArtifactError(f"{d}: already holds a run. Pass --resume to continue it, or choose another --out")
        d.mkdir(parents=True, exist_ok=True)
        write_run_metadata(d, self.cfg, self.dataset)

    def _checkpoint(self) -> Path | None:
        return None if self.run_dir is None else artifacts.committed_dir(self.run_dir / "checkpoint", "state.json")

    def _check_same_config(self) -> None:
        d = self.run_dir
        if (d / "config.json").is_file() and artifacts.read_json(d / "config.json") != self.cfg.to_dict():
            raise ArtifactError(f"{d}: the run was started with a different config; resume it with the same config "
                                f"(see {d}/config.json) or start a new run")

    def _save_checkpoint(self) -> None:
        # The files of a checkpoint must change together: weights of epoch E with the state of
        # epoch E - 1 would replay epoch E from the wrong start. So each checkpoint is written whole
        # into checkpoint.new (state.json last) and swapped in.
        final = self.run_dir / "checkpoint"
        ck = artifacts.staging_dir(final, "state.json")
        artifacts.save_tensors(ck / "last.safetensors", self.model.state_dict())
        if self.best_weights is not None:  # not model.safetensors: a refit replaces that with its own weights
            artifacts.save_tensors(ck / "best.safetensors", self.best_weights)
        artifacts.save_torch_state(ck / "optimizer.pt", self.optimizer.state_dict())
        state = dict(self.state.__dict__)
        state["best_value"] = None if not math.isfinite(state["best_value"]) else state["best_value"]
        extra = self.candidates.state_dict()
        if extra:  # memory bank, streaming frequencies, ratio counts, mined lists: resume replays exactly
            artifacts.save_tensors(ck / "negatives.safetensors", extra)
        artifacts.write_json(ck / "state.json", state)
        artifacts.replace_dir(ck, final)

    def _load_checkpoint(self) -> None:
        d, ck = self.run_dir, self._checkpoint()
        if ck is None:
            raise ArtifactError(f"{d}: no checkpoint to resume from. Start the run without --resume")
        self._check_same_config()
        self.model.load_state_dict(artifacts.load_tensors(ck / "last.safetensors"))
        self.optimizer.load_state_dict(artifacts.load_torch_state(ck / "optimizer.pt"))  # moved to param devices
        st = artifacts.read_json(ck / "state.json")
        st["best_value"] = -math.inf if st["best_value"] is None else st["best_value"]
        self.state = TrainState(**st)
        if (ck / "negatives.safetensors").exists():
            self.candidates.load_state_dict(artifacts.load_tensors(ck / "negatives.safetensors"))
        # The checkpoint's history is the record: a crash between writing metrics.jsonl and the
        # checkpoint must not leave a line for an epoch that will be trained again.
        if self._writes:
            artifacts.write_text(d / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.state.history))
        best = ck / "best.safetensors" if (ck / "best.safetensors").exists() else d / "model.safetensors"
        if best.exists():
            self.best_weights = artifacts.load_tensors(best)
        self.log(f"resuming {d} after epoch {self.state.epoch}")


def _exposure(cfg: RunConfig, ds: Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """The impressions file of ``negatives.hard = "exposure"`` as a per-user CSR of item indices."""
    neg = cfg.negatives
    if neg.hard != "exposure":
        return None
    from ..data.sources import load_impressions

    return load_impressions(neg.exposure_file, ds, neg.exposure_user_col, neg.exposure_item_col)


def write_run_metadata(d: Path, cfg: RunConfig, ds: Dataset) -> None:
    """Config, vocabularies, known items per user and item counts: what serving and evaluation need."""
    artifacts.write_text(d / "config.json", cfg.to_json() + "\n")
    artifacts.write_json(d / "dataset.json", ds.summary())
    artifacts.write_text(d / "users.json", ds.users.to_json())
    artifacts.write_text(d / "items.json", ds.items.to_json())
    known = ds.history("valid")
    artifacts.save_tensors(d / "known.safetensors", {
        "indptr": torch.from_numpy(known.indptr), "indices": torch.from_numpy(known.indices),
        "item_counts": torch.from_numpy(ds.item_counts().astype(np.int64)),
        "test_users": torch.from_numpy(np.unique(ds.test.users).astype(np.int64)),
    })
    feats = {}
    for kind, f in (("item", ds.item_features), ("user", ds.user_features)):
        if f is not None:
            feats[kind] = {name: v.ids.tolist() for name, v in f.values.items()}
    artifacts.write_json(d / "features.json", feats)
    if ds.item_titles is not None:
        artifacts.write_json(d / "titles.json", [None if t is None else str(t) for t in ds.item_titles])
    write_heldout(d, ds)


# ---- heldout.safetensors (issue 20; run-directory I/O: one writer here, one reader, Run.heldout) --
def write_heldout(d: Path, ds: Dataset) -> None:
    """Each user's validation and test items (per-user CSRs over the user vocabulary, in time order
    when the data has timestamps): what a user went on to interact with after the training data,
    shown as marks by the page of ``twotower serve``. Nothing trains or evaluates from this file."""
    tensors = {}
    for name, split in (("valid", ds.valid), ("test", ds.test)):
        csr = split.csr(ds.n_users)
        tensors[f"{name}_indptr"] = torch.from_numpy(csr.indptr.astype(np.int64))
        tensors[f"{name}_indices"] = torch.from_numpy(csr.indices.astype(np.int64))
    artifacts.save_tensors(d / "heldout.safetensors", tensors)
