"""The candidate-set builder: the one place that decides which items every row is scored against.

Shared candidates (scored by every row, one matrix product):
- in-batch: the batch's own positives (column ``b`` is row ``b``'s positive);
- sampled: ``M`` items drawn once per batch from the proposal ``r`` (Yang et al., WWW 2020);
- memory bank: the item embeddings of the last ``Q`` positives, detached (Wang et al., SIGIR 2021).
Each shared candidate carries the log of its expected count in the shared set under the combined
proposal, ``log(B p(j) + M r(j) + Q p(j))`` (``losses.log_expected_count``), or the tracked
negative/positive ratio, as configured.

Per-row candidates: ``K`` hard negatives for each row (same category, mined, or exposed), with no
correction, a weight from the curriculum, and a mask for rows that have none to offer and for
items the user is known to like.

Excluded shared entries: accidental hits (a row's positive item in another column) and, with
``train.mask_user_history``, the user's own training items.

The result is a ``losses.CandidateSet``; ``losses.logit_inputs`` turns it into the softmax's inputs,
and the loss never sees where a column came from.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config import RunConfig
from ..data.dataset import Dataset
from ..data.popularity import counted_probabilities, proposal_probabilities
from ..errors import ConfigError
from . import losses
from .frequency import NegPosRatio, StreamingFrequency
from .losses import CandidateSet
from .hard_negatives import CategorySampler, ListSampler, hard_schedule, margin_mask
from .memory_bank import MemoryBank

if TYPE_CHECKING:
    from .distributed import GlobalBatch


def distinct_positives(ids: torch.Tensor, vecs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's positives with each item once: ``(ids, vecs, where, log_count)``, ``where[i]``
    being the column of positive ``i`` and ``log_count`` the log of each column's copies.

    ``k`` equal columns contribute ``k e^z = e^(z + log k)`` to a row's softmax sum, so one column
    with ``log k`` added to its logit scores the same; for a row whose own positive it is, the other
    ``k - 1`` copies are accidental hits (masked), so there the target logit takes ``log k`` back
    (the trainer's positive shift). Loss and gradients are unchanged and the three ``B x C``
    products shrink with ``C`` (Gowalla, B = 2048: ~1,900 distinct items). Exact only when equal ids
    give equal vectors: the item tower must be deterministic (no dropout).
    """
    unique, where, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    if len(unique) == len(ids):  # nothing to merge: keep the batch's own order
        return ids, vecs, torch.arange(len(ids), device=ids.device), torch.zeros(len(ids), dtype=vecs.dtype, device=ids.device)
    # each item's first occurrence carries the column's vector (and so its gradient)
    first = torch.full((len(unique),), len(ids), dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, where, torch.arange(len(ids), device=ids.device), reduce="amin")
    return unique, vecs.index_select(0, first), where, counts.to(vecs.dtype).log()


class CandidateBuilder:
    """Owns the negative sources and their state (frequency estimates, memory bank, hard samplers)."""

    def __init__(self, cfg: RunConfig, dataset: Dataset, device: torch.device, dim: int,
                 exposure: tuple[np.ndarray, np.ndarray] | None = None, merge_duplicates: bool = False,
                 exclude: np.ndarray | None = None):
        """``exclude``: items never drawn as negatives, sampled or hard (bool over the items: those
        scored as new, ``TwoTowerModel.new_entities``; a withheld item must not be seen in training)."""
        t, neg = cfg.train, cfg.negatives
        self.cfg, self.device = cfg, device
        # In-batch positives of the same item as one column (``distinct_positives``): exact only for a
        # deterministic item tower (the caller knows), and not with the neg/pos ratio, which counts
        # every column as one candidate.
        self.merge = merge_duplicates and not (t.logq and t.logq_form == "neg_pos_ratio")
        self.n_items = dataset.n_items
        counts = dataset.item_counts()
        self.p = counted_probabilities(counts).to(device)
        self.streaming = None
        if t.frequency == "streaming":
            self.streaming = StreamingFrequency(t.streaming_buckets, t.streaming_lr,
                                                init_gap=max(1.0, dataset.n_items / t.batch_size), device=device)
        self.ratio = NegPosRatio(dataset.n_items, device) if t.logq and t.logq_form == "neg_pos_ratio" else None
        self.r = proposal_probabilities(counts, neg.proposal, neg.beta).to(device) if neg.sampled else None
        self.allowed = None  # the items a uniform proposal draws from, when not all
        if neg.sampled and exclude is not None and exclude.any():
            self.allowed = torch.from_numpy(np.flatnonzero(~exclude)).to(device)
            if neg.proposal == "uniform":
                self.r = torch.zeros(self.n_items, dtype=torch.float32, device=device)
                self.r[self.allowed] = 1.0 / len(self.allowed)
        self.bank = MemoryBank(neg.bank_size, dim, neg.bank_warmup_steps, device) if neg.bank_size else None
        self.exclude = exclude if exclude is not None and exclude.any() else None
        self._stats: dict[str, int] = {}
        self.hard = None
        if neg.hard == "category":
            self.hard = _category_sampler(dataset, neg.category_feature, device, self.exclude)
        elif neg.hard == "exposure":
            if exposure is None:
                raise ConfigError("negatives.hard = \"exposure\": no impressions were loaded")
            self.hard = ListSampler(*self._kept(*exposure), device=device)
        # The curriculum counts its steps from the first step that had hard negatives to draw: step 0
        # for the fixed sources, the first mining round's first step for mined ones.
        self.hard_start = 0
        self.seen_keys: torch.Tensor | None = None
        if t.mask_user_history or neg.hard != "none":
            h = dataset.history("train")
            rows = np.repeat(np.arange(h.n_rows), h.lengths())
            self.seen_keys = torch.from_numpy(np.unique(rows * dataset.n_items + h.indices)).to(device)

    def set_mined(self, indptr: np.ndarray, indices: np.ndarray, step: int | None = None) -> None:
        """Hard negatives for the next mining round (``mining.mine_negatives``' CSR); ``step``: the
        step the round begins with (the first round's starts the curriculum)."""
        if self.hard is None and step is not None:
            self.hard_start = int(step)
        self.hard = ListSampler(*self._kept(indptr, indices), device=self.device)

    def _kept(self, indptr: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A per-user list of hard negatives without the excluded items."""
        if self.exclude is None:
            return indptr, indices
        keep = ~self.exclude[indices]
        rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        return np.r_[0, np.cumsum(np.bincount(rows[keep], minlength=len(indptr) - 1))], indices[keep]

    # ---- per step -----------------------------------------------------------------------------
    def build(self, model, users: torch.Tensor, items: torch.Tensor, item_vecs: torch.Tensor, step: int,
              gen: torch.Generator | None = None, shared: GlobalBatch | None = None) -> CandidateSet:
        """Candidates for this process's rows (``users``, ``items``, ``item_vecs``). ``shared`` is the
        global batch under torchrun (``distributed.GlobalBatch``): its positives are the in-batch
        candidates of every row, the logQ batch size is its size, and sampled negatives come from its
        generator (the same draws on every rank). ``gen`` drives per-row draws (hard negatives)."""
        cfg, neg = self.cfg, self.cfg.negatives
        b = len(items)
        batch_items, all_vecs = (shared.items, shared.vectors) if shared is not None else (items, item_vecs)
        offset = shared.offset if shared is not None else 0
        n = len(batch_items)
        all_items, log_count = batch_items, None
        target = offset + torch.arange(b, device=items.device)
        if self.merge:
            all_items, all_vecs, where, log_count = distinct_positives(batch_items, all_vecs)
            target = where[target]
        vecs, ids = [all_vecs], [all_items]
        m = q = 0
        if neg.sampled:
            m = neg.sampled
            draw = shared.generator if shared is not None else gen
            if neg.proposal == "frequency":
                drawn = torch.multinomial(self.r, m, replacement=True, generator=draw)
            elif self.allowed is not None:
                drawn = self.allowed[torch.randint(len(self.allowed), (m,), generator=draw, device=self.device)]
            else:
                drawn = torch.randint(self.n_items, (m,), generator=draw, device=self.device)
            vecs.append(model.encode_items(drawn))
            ids.append(drawn)
        if self.bank is not None and self.bank.active(step):
            bank_vecs, bank_ids = self.bank.entries()
            q = len(bank_ids)
            vecs.append(bank_vecs.to(item_vecs.dtype))
            ids.append(bank_ids)
        cand_ids = torch.cat(ids) if len(ids) > 1 else all_items
        if log_count is not None and len(ids) > 1:
            log_count = torch.cat([log_count, log_count.new_zeros(len(cand_ids) - len(log_count))])
        cand = CandidateSet(torch.cat(vecs) if len(vecs) > 1 else all_vecs, cand_ids, None, target, n_sampled=m, n_bank=q,
                            log_count=log_count)
        cand.excluded = self.excluded(users, items, cand, distinct=self.merge and len(ids) == 1)
        if cfg.train.logq:
            if self.ratio is not None:
                cand.log_q = self.ratio.correction(cand_ids)
            else:
                if self.streaming is not None:
                    self.streaming.update(batch_items, step)
                    p = self.streaming.probabilities(cand_ids, n)
                else:
                    p = self.p[cand_ids]
                cand.log_q = losses.log_expected_count(p, n, m, self.r[cand_ids] if m else None, q)
        if self.hard is not None:
            k, w = hard_schedule(step - self.hard_start, neg.hard_k, neg.hard_warmup_steps, neg.hard_ramp_steps, neg.hard_ramp, neg.hard_weight)
            if k and w > 0:
                hard = self.hard.sample(users if isinstance(self.hard, ListSampler) else items, k, gen)
                cand.hard_ids = hard
                # An explicit width: a rank can hold no row of a tiny last batch (b = 0).
                cand.hard_vectors = model.encode_items(hard.clamp_min(0).reshape(-1)).view(b, k, item_vecs.shape[-1])
                cand.hard_log_weight = math.log(w)
                cand.hard_mask = self.hard_mask(users, items, cand)
        return cand

    def excluded(self, users: torch.Tensor, items: torch.Tensor, cand: CandidateSet, distinct: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, cols)`` of the shared entries no row may score, rows ascending, each once: row ``b``'s
        positive item in a column other than its target (an accidental hit; none when every column is
        a different item, ``distinct``) and, with ``train.mask_user_history``, the user's own training
        items (false negatives)."""
        hits = (losses.no_coordinates(items.device) if distinct
                else losses.accidental_hits(items, cand.ids, cand.target))
        if not self.cfg.train.mask_user_history:
            return hits
        seen = losses.seen_item_mask(users, cand.ids, cand.target, self.seen_keys, self.n_items)
        return losses.merge_coordinates(hits, losses.mask_coordinates(seen), n_cols=len(cand.ids))

    def hard_mask(self, users: torch.Tensor, items: torch.Tensor, cand: CandidateSet) -> torch.Tensor:
        """``[B, K]`` True where a hard column must not count: nothing sampled, the row's positive,
        or any of the user's training items (a hard negative the user liked is the worst kind)."""
        h = cand.hard_ids
        bad = (h < 0) | (h == items[:, None])
        if self.seen_keys is not None:
            bad |= losses.seen_item_mask(users, h, None, self.seen_keys, self.n_items)
        return bad

    def after_step(self, items: torch.Tensor, item_vecs: torch.Tensor, cand: CandidateSet,
                   shared: GlobalBatch | None = None) -> None:
        """Enqueue the batch's positives in the bank; count negatives and positives for the ratio form
        (every shared column not excluded for a row, ``cand.excluded``, is one of its negatives).
        Under torchrun both see the global batch, so every rank's state stays the same."""
        all_items, all_vecs = (shared.items, shared.vectors) if shared is not None else (items, item_vecs)
        if self.ratio is not None:
            c = len(cand.ids)
            is_target = torch.zeros(c, dtype=torch.long, device=items.device)
            is_target[cand.target] = 1
            negative_rows = len(items) - torch.bincount(cand.excluded[1], minlength=c)[:c] - is_target
            if shared is not None:
                negative_rows = shared.sum(negative_rows)
            self.ratio.update(all_items, cand.ids, negative_rows)
        if self.bank is not None:
            self.bank.push(all_vecs.detach(), all_items)

    # ---- what the sources did (diagnostics, reported per epoch) ----------------------------------
    def filter_hard(self, cand: CandidateSet, hard_scores: torch.Tensor, positive_scores: torch.Tensor) -> None:
        """``negatives.hard_margin``: mask the hard columns within the margin of the row's positive
        (``hard_negatives.margin_mask``), and count them (``take_stats``)."""
        margin = self.cfg.negatives.hard_margin
        if margin is None or cand.hard_mask is None:
            return
        close = margin_mask(hard_scores.detach(), positive_scores.detach(), margin)
        live = ~cand.hard_mask
        self._stats["hard_live"] = self._stats.get("hard_live", 0) + int(live.sum())
        self._stats["hard_margin_masked"] = self._stats.get("hard_margin_masked", 0) + int((close & live).sum())
        cand.hard_mask = cand.hard_mask | close

    def take_stats(self) -> dict[str, float]:
        """The counts gathered since the last call, as shares: ``hard_margin_masked`` is the share of
        the drawn hard negatives that the margin filter masked."""
        st, self._stats = self._stats, {}
        out = {}
        if st.get("hard_live"):
            out["hard_margin_masked"] = st["hard_margin_masked"] / st["hard_live"]
        return out

    @torch.no_grad()
    def bank_staleness(self, model) -> dict[str, float]:
        """How far the bank's stored item vectors are from what the item tower gives now: the mean
        cosine between each entry and the current ``g(j)`` of its item, over all entries and over the
        oldest and newest tenth (1: not stale at all). Empty without a filled bank."""
        if self.bank is None or self.bank.filled == 0:
            return {}
        vecs, ids = self.bank.entries()  # oldest first
        was_training = model.training
        model.eval()
        cos = (torch.nn.functional.normalize(vecs.float(), dim=-1) * model.encode_items(ids).float()).sum(-1)
        model.train(was_training)
        tenth = max(1, len(cos) // 10)
        return {"bank_cosine": float(cos.mean()), "bank_cosine_oldest": float(cos[:tenth].mean()),
                "bank_cosine_newest": float(cos[-tenth:].mean())}

    # ---- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, part in (("bank", self.bank), ("streaming", self.streaming), ("ratio", self.ratio)):
            if part is not None:
                out.update({f"{name}.{k}": v.detach().cpu() for k, v in part.state_dict().items()})
        if isinstance(self.hard, ListSampler) and self.cfg.negatives.hard == "mined":
            out["mined.indptr"], out["mined.indices"] = self.hard.indptr.cpu(), self.hard.indices.cpu()
            out["mined.start"] = torch.tensor([self.hard_start])
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, part in (("bank", self.bank), ("streaming", self.streaming), ("ratio", self.ratio)):
            if part is not None:
                part.load_state_dict({k.split(".", 1)[1]: v.to(self.device) for k, v in state.items() if k.startswith(name + ".")})
        if "mined.indptr" in state:
            self.set_mined(state["mined.indptr"].numpy(), state["mined.indices"].numpy())
            self.hard_start = int(state["mined.start"][0]) if "mined.start" in state else 0


def _category_sampler(dataset: Dataset, feature: str | None, device, exclude: np.ndarray | None = None) -> CategorySampler:
    feats = dataset.item_features
    names = list(feats.values) if feats is not None else []  # the categorical kinds: what a category is
    if feature is None:
        if len(names) != 1:
            raise ConfigError("negatives.hard = \"category\": set negatives.category_feature to one of the item features "
                              f"{names or '(the dataset has none: give data.item_features)'}")
        feature = names[0]
    if feature not in names:
        raise ConfigError(f"negatives.category_feature = {feature!r}: not an item feature of a categorical kind; the dataset has "
                          f"{names or 'none'}")
    csr = feats.rows[feature]
    if len(csr.indices) == 0:
        raise ConfigError(f"negatives.category_feature = {feature!r}: no item has a value")
    indptr, indices = csr.indptr, csr.indices
    if exclude is not None:  # an excluded item has no category to be drawn from
        keep = ~np.repeat(exclude, np.diff(indptr))
        indptr = np.r_[0, np.cumsum(np.bincount(np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))[keep],
                                                minlength=len(indptr) - 1))]
        indices = indices[keep]
    return CategorySampler(indptr, indices, len(feats.values[feature]), device)
