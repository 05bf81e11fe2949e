"""Typed, validated configuration: one object tree for the CLI, the Python API and the run directory.

A config file (TOML or YAML) maps one-to-one onto ``RunConfig``; ``--set section.key=value`` on the
command line overrides any field; the resolved config is written to ``RUN/config.json``.
"""
from __future__ import annotations

import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined

from .errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the interactions come from and how they are split.

    Paths are relative to the data directory (``TWOTOWER_DATA``) unless absolute.
    """

    dataset: Literal["files", "ml-100k", "gowalla", "grocery", "lightgcn", "synthetic"] = Field(
        "files", description="files: the interactions (and features) files named below; ml-100k: the MovieLens 100K "
                             "folder; gowalla / lightgcn: a LightGCN-format folder (train.txt, test.txt; split='given'); "
                             "grocery: the Amazon Grocery folder (train.csv, item_meta.csv); synthetic: generated "
                             "(no files)")
    path: str | None = Field(None, description="Folder of a named dataset (default: its name under the data directory).")
    interactions: str | None = Field(None, description="Interactions file (CSV, TSV or Parquet) for dataset='files'.")
    test_interactions: str | None = Field(None, description="A given test file (split='given').")
    user_col: str = Field("user", description="interactions column holding the raw user id")
    item_col: str = Field("item", description="interactions column holding the raw item id")
    time_col: str | None = Field(None, description="interactions column holding a numeric timestamp (needed by "
                                                   "split='temporal'; orders each user's history)")
    weight_col: str | None = Field(None, description="interactions column holding a numeric weight (e.g. a rating), "
                                                     "used by min_weight")
    min_weight: float | None = Field(None, description="Drop interactions whose weight (e.g. rating) is below this.")
    item_features: str | None = Field(None, description="Item-features table (CSV/TSV/Parquet).")
    item_id_col: str = Field("item", description="item-features column holding the raw item id")
    item_feature_cols: list[str] = Field(default_factory=list, description="deprecated (declare [[features.item]]): "
                                                                           "item-features columns read as categorical features")
    item_multi_valued: dict[str, str] = Field(default_factory=dict, description="deprecated (declare [[features.item]] "
                                                                                "with kind = \"multi_categorical\"): column -> separator")
    item_title_col: str | None = Field(None, description="item-features column with a display title (shown by "
                                                         "`recommend` and the service; not a feature)")
    user_features: str | None = Field(None, description="User-features table (CSV/TSV/Parquet).")
    user_id_col: str = Field("user", description="user-features column holding the raw user id")
    user_feature_cols: list[str] = Field(default_factory=list, description="deprecated (declare [[features.user]]): "
                                                                           "user-features columns read as categorical features")
    user_multi_valued: dict[str, str] = Field(default_factory=dict, description="deprecated (declare [[features.user]] "
                                                                                "with kind = \"multi_categorical\"): column -> separator")
    split: Literal["given", "random", "temporal"] = Field(
        "random", description="given: the test set is a file (test_interactions, or the dataset's own); random: a "
                              "seeded share of each user's items (test_fraction); temporal: each user's last "
                              "leave_last interactions (needs time_col)")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="split='random': share of each user's items held out")
    leave_last: int = Field(1, ge=1, description="split='temporal': each user's last N interactions are the test set")
    valid_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of each user's training items carved out for validation (random/given splits)")
    valid_leave_last: int = Field(1, ge=0, description="split='temporal': the N interactions before the test ones are validation")
    min_train_items: int = Field(1, ge=1, description="a user keeps at least this many training items when carving holdouts")
    synthetic_users: int = Field(2000, ge=1, description="dataset='synthetic': number of users generated")
    synthetic_items: int = Field(1000, ge=1, description="dataset='synthetic': number of items generated")
    seed: int = Field(0, description="seed of the random splits and of the synthetic data")


class ModelConfig(_Section):
    """The two towers. With ids only and no MLP the model is matrix factorisation."""

    dim: int = Field(64, ge=1, description="embedding size d of both towers' output (and of every id and feature table)")
    user_id: bool = Field(True, description="user tower uses a user-id embedding (the user tower needs at least one "
                                                         "of user_id, user_history, user or context features)")
    user_history: bool = Field(False, description="user tower pools the embeddings of the user's past items")
    history_length: int = Field(50, ge=1, description="user_history: the user's last N items are pooled")
    share_item_table: bool = Field(True, description="history pooling reuses the item tower's id table")
    user_features: list[str] | Literal["all"] = Field(default_factory=list, description="deprecated (declare "
                         "[[features.user]]): user features read as categorical (names of data columns), or \"all\"")
    item_id: bool = Field(True, description="item tower uses an item-id embedding (the item tower needs item_id, "
                                                         "item features or both)")
    item_features: list[str] | Literal["all"] = Field(default_factory=list, description="deprecated (declare "
                         "[[features.item]]): item features read as categorical (names of data columns), or \"all\"")
    mlp: list[int] = Field(default_factory=list, description="hidden layer sizes of each tower's MLP (empty: no MLP)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout between the MLP layers (no effect without mlp)")
    temperature: float = Field(0.1, gt=0.0, description="tau: the score is cosine / tau (0.05 to 0.2 is the useful range)")
    learn_temperature: bool = Field(False, description="train tau too (as log tau, clamped to [0.01, 1]); `temperature` is its start")
    item_bias: bool = Field(False, description="a learned per-item bias b_j added to every score (exported to serving)")
    init_std: float = Field(0.1, gt=0.0, description="standard deviation of the normal initialisation of the embedding tables")


class TrainConfig(_Section):
    """The optimiser, the loss and its corrections, early stopping and model selection."""

    epochs: int = Field(20, ge=1, description="most epochs (passes over the training pairs); early stopping may end sooner")
    batch_size: int = Field(1024, ge=2, description="B: positive pairs per step (the global batch under torchrun); "
                                                    "each row's in-batch negatives are the other B - 1 positives")
    optimizer: Literal["adam", "adamw", "deferred_adam", "sparse_adam", "adagrad", "sgd"] = Field(
        "adam", description="adam: dense (fused) Adam; deferred_adam: dense Adam's update with each embedding row "
                            "updated only when a step reads it, its skipped steps summed in closed form (faster on "
                            "large tables; the same trajectory except that eps in the skipped steps is taken as at "
                            "the first of them, which shows only where sqrt(v) is as small as eps); "
                            "sparse_adam: lazy Adam, untouched rows frozen (torch.optim.SparseAdam's rule). "
                            "The two row-wise ones apply weight_decay to dense layers only")
    lr: float = Field(1e-3, gt=0.0, description="base learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="weight decay: added to the gradient (adam, adagrad, sgd) or "
                                                         "decoupled (adamw); deferred_adam and sparse_adam: dense layers only")
    schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="learning rate after the warm-up: constant, or cosine / linear decay to 0 at the last step")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warm-up from lr / warmup_steps to lr")
    grad_clip: float | None = Field(None, gt=0.0, description="clip the gradient norm of the dense parameters to this (none: no clipping)")
    unique_users: bool = Field(False, description="put each user at most once in a batch")
    logq: bool = Field(True, description="subtract log of the expected count of each shared candidate (Yi et al. 2019)")
    logq_weight: float = Field(1.0, ge=-2.0, le=4.0, description=(
        "multiplier w of the logQ correction, logit - w * log q (1: the full correction); a negative w, which adds the "
        "correction instead, only with logq_form = \"neg_pos_ratio\" (its sign is what is in question there)"))
    correct_positive: bool = Field(True, description="apply the logQ correction to the positive's logit too")
    logq_form: Literal["expected_count", "neg_pos_ratio"] = Field(
        "expected_count", description="expected_count: log E[count of j in the shared candidate set] under the combined "
                                      "proposal; neg_pos_ratio: log(times j was a negative / times j was a positive), tracked")
    corrected_logq: bool = Field(False, description=(
        "the logQ correction of Khrylchenko et al., RecSys 2025 (\"Correcting the LogQ Correction\"): the positive is "
        "in the candidate set with probability 1, not sampled, so it is left uncorrected and each negative j of row b "
        "is corrected by log(n_b q(j) / (1 - q(i_b))), n_b the row's unmasked negatives and q the per-draw proposal "
        "(docs/design.md). Needs logq with logq_form = \"expected_count\"; correct_positive is then ignored"))
    frequency: Literal["counts", "streaming"] = Field(
        "counts", description="p(j) from exact counts over the training data, or the streaming estimator of Yi et al. 2019")
    streaming_lr: float = Field(0.05, gt=0.0, le=1.0, description="streaming estimator: learning rate a of the gap estimate")
    streaming_buckets: int = Field(1 << 20, ge=1, description="streaming estimator: size of the hashed arrays")
    mask_user_history: bool = Field(False, description="mask candidates that are among the row user's training items")
    patience: int = Field(3, ge=0, description="epochs without validation improvement before stopping (0: never stop early)")
    monitor: str = Field("recall@20", description="validation metric used for early stopping and model selection: "
                                                       "recall, ndcg, hr, precision or mrr, at a K (e.g. recall@20)")
    eval_every: int = Field(1, ge=1, description="validate every N epochs (and after the last)")
    refit: bool = Field(False, description="after early stopping, retrain from scratch on train + validation for the "
                                          "best number of epochs (selection stays on validation; more data for the final model)")
    seed: int = Field(0, description="seed of initialisation, batch order and negative sampling")
    device: Literal["auto", "cpu", "cuda"] = Field("cpu", description="where to train and evaluate; auto: CUDA when available")
    threads: int | None = Field(None, ge=1, description=(
        "PyTorch's intra-op threads for this process (torch.set_num_threads); default: all cores. On a machine "
        "shared with other work, give each job a share of the cores (e.g. 1 on 2 cores with another training): "
        "threads that wait on a busy core cost more than they bring (docs/benchmarks.md, 'A busy machine')"))
    native: bool = Field(True, description=(
        "take the compiled kernels (fused softmax, top-k, DeferredAdam's row passes) where built; false: their "
        "PyTorch paths (same results to float rounding). TWOTOWER_NATIVE=0 in the environment turns them off "
        "whatever this says; `twotower info` shows which run"))

    @model_validator(mode="after")
    def _logq_forms(self):
        if self.logq_weight < 0 and self.logq_form != "neg_pos_ratio":
            raise ValueError(f"logq_weight = {self.logq_weight}: a negative weight only with logq_form = \"neg_pos_ratio\"")
        if self.corrected_logq and not (self.logq and self.logq_form == "expected_count"):
            raise ValueError("corrected_logq needs logq = true and logq_form = \"expected_count\"")
        return self

    @field_validator("monitor")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        name, _, k = v.partition("@")
        if name not in {"recall", "ndcg", "hr", "precision", "mrr"} or not k.isdigit():
            raise ValueError(f"monitor must look like 'recall@20' or 'ndcg@10', got {v!r}")
        return v

    @property
    def sparse_embeddings(self) -> bool:
        """Embedding tables with sparse gradients, updated row-wise (deferred_adam, sparse_adam)."""
        return self.optimizer in ("deferred_adam", "sparse_adam")


class NegativesConfig(_Section):
    """Negative sources beyond the batch's own positives; the trainer composes them (docs/design.md,
    "The candidate set")."""

    sampled: int = Field(0, ge=0, description="M items per batch from the proposal, shared by all rows (Yang et al. 2020)")
    proposal: Literal["uniform", "frequency"] = Field("uniform", description="sampled negatives: uniform, or count^beta")
    beta: float = Field(0.75, ge=0.0, description="exponent of the frequency proposal")
    bank_size: int = Field(0, ge=0, description="Q: memory bank of the last Q positives' item embeddings (Wang et al. 2021)")
    bank_warmup_steps: int = Field(0, ge=0, description="steps before the memory bank is used (its entries go stale fastest early)")
    hard: Literal["none", "category", "mined", "exposure"] = Field(
        "none", description="per-row hard negatives: same category as the positive, mined by the model (see [mining]), "
                            "or shown-but-not-engaged items from an impressions file")
    hard_k: int = Field(0, ge=0, description="K hard negatives per row (more than 0 when hard is not none)")
    category_feature: str | None = Field(None, description="hard = category: the item feature holding categories "
                                                           "(default: the only item feature)")
    exposure_file: str | None = Field(None, description="hard = exposure: impressions file (CSV/TSV/Parquet, raw ids); "
                                                        "`twotower mine` writes one in the same format")
    exposure_user_col: str = Field("user", description="hard = exposure: impressions column holding the raw user id")
    exposure_item_col: str = Field("item", description="hard = exposure: impressions column holding the raw item id")
    hard_warmup_steps: int = Field(0, ge=0, description="curriculum: steps before hard negatives begin")
    hard_ramp_steps: int = Field(0, ge=0, description="curriculum: steps over which hard negatives ramp up after the warm-up")
    hard_ramp: Literal["count", "weight"] = Field("count", description="ramp the number of hard negatives, or their weight")
    hard_weight: float = Field(1.0, gt=0.0, le=1000.0, description="weight w of a hard negative in the softmax (its logit + log w)")
    hard_margin: float | None = Field(None, ge=-100.0, le=100.0, description=(
        "false-negative filter: a hard negative h of row b is masked where its score is within this margin of the "
        "positive's, s(u_b, h) > s(u_b, i_b) - margin (scores in logit units, cosine / tau + bias); a negative margin "
        "masks only those above the positive by more than |margin|. None: no filter"))

    @model_validator(mode="after")
    def _hard_is_complete(self):
        if self.hard != "none" and self.hard_k == 0:
            raise ValueError(f"hard = {self.hard!r} needs hard_k > 0 (hard negatives per row)")
        if self.hard == "exposure" and not self.exposure_file:
            raise ValueError("hard = 'exposure' needs exposure_file (user, item impressions)")
        if self.hard_margin is not None and self.hard == "none":
            raise ValueError("hard_margin filters hard negatives: it needs hard = category, mined or exposure")
        return self


class MiningConfig(_Section):
    """Hard-negative mining in rounds: after ``train.epochs``, each round embeds every item, retrieves the
    top R for every training user, drops the user's positives, keeps ranks in [window_lo, window_hi) and
    trains ``epochs_per_round`` more epochs sampling ``negatives.hard_k`` per row from them."""

    rounds: int = Field(0, ge=0, description="mining rounds after the first training phase (0: none; needs negatives.hard = \"mined\")")
    epochs_per_round: int = Field(2, ge=1, description="epochs trained on each round's mined negatives")
    top_r: int = Field(200, ge=1, description="R: items retrieved per training user")
    window_lo: int = Field(10, ge=0, description="skip the very top, where unlabelled positives (false negatives) live")
    window_hi: int = Field(200, ge=1, description="ranks from window_lo up to, not including, window_hi are kept "
                                                     "(window_lo < window_hi <= top_r)")
    window_scale: float = Field(1.0, gt=0.0, le=1.0, description=(
        "curriculum over rounds: round r keeps ranks [window_lo * s^(r-1), window_hi * s^(r-1)) (at least one rank "
        "wide), so s < 1 moves the window toward the top, harder, round after round; 1: the same window every round"))
    source: Literal["model", "content"] = Field("model", description=(
        "what ranks the items: model: the model's own score (the previous round's weights, frozen for the round); "
        "content: the item tower's feature part alone, each user as the mean of its items' feature vectors, so the "
        "mined items resemble the user's in content but were not taken (needs item features)"))
    cooccurrence_drop: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "false-negative filter: per user, drop this share of the mined items that co-occur most with the user's "
        "training items (the sum of the item-item cosines of the interaction matrix: what an item-based "
        "collaborative filter would recommend); 0: no filter"))
    patience: int | None = Field(None, ge=0, description=(
        "validations without improvement that end training during the rounds; each round starts with the whole "
        "patience (None: train.patience; 0: never stop during the rounds)"))
    restart_schedule: bool = Field(False, description=(
        "each round restarts train.schedule over its own epochs (the first phase's spans train.epochs): with a "
        "decaying schedule the rounds otherwise train at the tail of the learning rate"))
    lr_scale: float = Field(1.0, gt=0.0, le=10.0, description="the rounds' learning rate as a multiple of train.lr")

    @model_validator(mode="after")
    def _window(self):
        if not self.window_lo < self.window_hi <= self.top_r:
            raise ValueError(f"need window_lo < window_hi <= top_r, got {self.window_lo}, {self.window_hi}, {self.top_r}")
        return self


class EvalConfig(_Section):
    """Evaluation by full ranking: every item ranked for every user with held-out items."""

    ks: list[int] = Field(default_factory=lambda: [10, 20, 50, 100, 500], description="cut-offs K of every metric "
                                                                                     "(train.monitor's K is added)")
    batch_users: int = Field(1024, ge=1, description="users ranked against the whole catalog at a time (memory: "
                                                     "batch_users x items scores)")
    alpha: float = Field(0.0, description="rank by the served score with popularity correction, score - alpha * log p(item) "
                                         "(as `serve`/`recommend --alpha`); 0 ranks by the training score")
    popularity_buckets: list[float] = Field(
        default_factory=lambda: [0.2, 0.5],
        description="cumulative item shares that cut items (most popular first) into head / torso / tail",
    )

    @field_validator("ks")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("ks must be a non-empty list of positive integers")
        return sorted(set(v))



FEATURE_KINDS = ("categorical", "multi_categorical", "numeric", "vector", "text")
# The options each kind takes (name, kind, column and missing are every kind's); an option given to
# a kind that ignores it is refused, so that a typo or a wrong kind cannot pass unnoticed.
KIND_OPTIONS = {
    "categorical": {"hash_buckets", "seed", "min_count"},
    "multi_categorical": {"separator", "hash_buckets", "seed", "min_count"},
    "numeric": {"transform", "buckets"},
    "vector": {"file", "length", "freeze"},
    "text": {"hash_buckets", "seed", "word_ngrams", "char_ngrams", "max_tokens", "lowercase"},
}
COMMON_OPTIONS = {"name", "kind", "column", "missing"}
TEXT_BUCKETS = 1 << 15


class FeatureSpec(_Section):
    """One feature, declared once: its name, its kind (which encoder reads it), the column it comes
    from and the kind's options. The source (item table, user table, interactions) is the list the
    declaration is in (``features.item``, ``features.user``, ``features.context``)."""

    name: str = Field(..., min_length=1, max_length=100, pattern=r"^[^.\s][^.]*$",
                      description="the feature's name: in the model, in requests (features / context) and in messages")
    kind: Literal["categorical", "multi_categorical", "numeric", "vector", "text"] = Field(
        ..., description="categorical: one value per row; multi_categorical: several (mean-pooled); numeric: a number "
                         "(standardised, log1p or quantile buckets); vector: a precomputed dense vector, projected; "
                         "text: hashed word and character n-grams, mean-pooled (docs/features.md)")
    column: str | None = Field(None, min_length=1, description="the table's column (default: the name); context: the "
                                                               "interactions file's column")
    missing: Literal["learn", "error"] = Field(
        "learn", description="learn: a missing value (empty cell, NaN, null, no values) is a value of its own with a "
                             "learned embedding; error: a missing value is refused (at training: the file and row; at "
                             "serving: a 422)")
    separator: str | None = Field(None, min_length=1, description="multi_categorical in a CSV/TSV file: the separator "
                                                                  "between the values of a cell (default \"|\")")
    hash_buckets: int | None = Field(None, ge=1, le=1 << 24, description=(
        "categorical: hash values into this many buckets instead of fitting a vocabulary (unbounded vocabularies; "
        "no value is out of vocabulary); text: the n-gram buckets (default 32768)"))
    seed: int = Field(0, ge=0, description="hashing seed (categorical with hash_buckets, text)")
    min_count: int = Field(1, ge=1, description="categorical vocabulary: values on fewer training rows than this go to "
                                                "the out-of-vocabulary bucket (which then learns what a rare value is)")
    transform: Literal["standardize", "log1p", "quantile"] = Field(
        "standardize", description="numeric: standardize ((x - mean) / std of the training rows, clipped to +-5), log1p "
                                   "(log(1 + x), then standardised; needs x > -1), quantile (buckets between the "
                                   "training rows' quantiles, an embedding each)")
    buckets: int = Field(10, ge=2, le=1000, description="numeric, transform = quantile: the number of buckets")
    file: str | None = Field(None, min_length=1, description="vector: a .npy file of records (id, vector) keyed by the "
                                                             "table's ids (docs/features.md); default: the table's list column")
    length: int | None = Field(None, ge=1, le=1 << 16, description="vector: the expected length (default: the "
                                                                   "length of the data's first vector)")
    freeze: bool = Field(False, description="vector: keep the projection at its initialisation (a fixed random "
                                            "projection that roughly keeps the vectors' inner products) instead of learning it")
    word_ngrams: int = Field(2, ge=1, le=4, description="text: word n-grams of 1 to N words")
    char_ngrams: list[int] = Field(default_factory=lambda: [3, 4], description="text: character n-gram sizes taken "
                                                                                 "within each word ([]: none)")
    max_tokens: int = Field(256, ge=1, le=100_000, description="text: the first N words of a text are read")
    lowercase: bool = Field(True, description="text: lower-case before tokenising")
    derive: Literal["hour", "weekday"] | None = Field(
        None, description="context: the hour of day (0-23) or the day of week (Mon-Sun) of a timestamp column "
                          "(unix seconds, UTC); the feature is categorical")

    @field_validator("char_ngrams")
    @classmethod
    def _ngram_sizes(cls, v: list[int]) -> list[int]:
        if any(not 1 <= n <= 10 for n in v):
            raise ValueError(f"char_ngrams sizes must be between 1 and 10, got {v}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _options_of_the_kind(self):
        allowed = COMMON_OPTIONS | KIND_OPTIONS[self.kind] | {"derive"}  # derive: checked by FeaturesConfig
        # an option of another kind at its default is harmless (a resolved config lists every option)
        fields = type(self).model_fields
        extra = sorted(o for o in set(fields) - allowed if getattr(self, o) != fields[o].get_default(call_default_factory=True))
        if extra:
            owners = []
            for o in extra:
                kinds = [k for k, opts in KIND_OPTIONS.items() if o in opts]
                owners.append(f"{o}: {', '.join(kinds) if kinds else 'context features only'}")
            raise ValueError(f"feature {self.name!r} ({self.kind}): option(s) {extra} do not apply to {self.kind} features "
                             f"(they belong to {'; '.join(owners)})")
        if self.derive is not None and self.kind != "categorical":
            raise ValueError(f"feature {self.name!r}: derive = {self.derive!r} gives a categorical feature; set kind = \"categorical\"")
        return self

    @property
    def source_column(self) -> str:
        """The column read (the name unless ``column`` says otherwise)."""
        return self.column or self.name

    @property
    def buckets_for_text(self) -> int:
        return self.hash_buckets or TEXT_BUCKETS


class FeaturesConfig(_Section):
    """Every feature of the towers, each declared once (docs/features.md): item features feed the
    item tower, user features and context features the user tower. Item and user features come from
    the item and user tables (``data.item_features`` / ``data.user_features``, or a named dataset's
    own); context features from the interactions file, per interaction (at serving: the request's
    ``context``). An empty section with the older ``model.item_features`` / ``model.user_features``
    declares those as categorical features (deprecated)."""

    item: list[FeatureSpec] = Field(default_factory=list, description="item features: [[features.item]] tables "
                                                                        "(name, kind, column, options)")
    user: list[FeatureSpec] = Field(default_factory=list, description="user features: [[features.user]] tables")
    context: list[FeatureSpec] = Field(default_factory=list, description="context features of each interaction: "
                                                                           "[[features.context]] tables (categorical or "
                                                                           "numeric; derive = hour / weekday from a timestamp)")

    @model_validator(mode="after")
    def _names_and_sources(self):
        for where, specs in (("item", self.item), ("user", self.user + self.context)):
            names = [s.name for s in specs]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"feature name(s) {dup} declared twice in the {where} tower; give each feature its own name")
        for s in self.item + self.user:
            if s.derive is not None:
                raise ValueError(f"feature {s.name!r}: derive applies to context features (features.context) only")
        for s in self.context:
            if s.kind not in ("categorical", "numeric"):
                raise ValueError(f"context feature {s.name!r}: kind {s.kind!r}; context features are categorical or numeric")
        return self

    @property
    def declared(self) -> bool:
        return bool(self.item or self.user or self.context)

    def tower(self, name: str) -> list[FeatureSpec]:
        return {"item": self.item, "user": self.user, "context": self.context}[name]


# The feature columns the named datasets have always offered (read as categorical features): what the
# deprecated model.item_features / model.user_features name. Their other columns are declared in
# [features] (docs/features.md lists them).
LEGACY_COLUMNS = {
    "ml-100k": {"item": {"genre": "multi_categorical"},
                "user": {"age": "categorical", "gender": "categorical", "occupation": "categorical"}},
    "grocery": {"item": {"i_category": "categorical"}, "user": {}},
    "synthetic": {"item": {"category": "categorical"}, "user": {}},
}


def legacy_features(data: "DataConfig", model: "ModelConfig | None" = None) -> FeaturesConfig:
    """The categorical declarations behind the deprecated way of naming features: the data's columns
    (``data.item_feature_cols`` / ``item_multi_valued``, or a named dataset's), those the model names
    (``model.item_features``: names or "all"; without a model: every one)."""
    out = {}
    for tower in ("item", "user"):
        if data.dataset in LEGACY_COLUMNS:
            available = dict(LEGACY_COLUMNS[data.dataset][tower])
        else:
            cols = data.item_feature_cols if tower == "item" else data.user_feature_cols
            multi = data.item_multi_valued if tower == "item" else data.user_multi_valued
            table = data.item_features if tower == "item" else data.user_features
            available = {} if not table else {c: "categorical" for c in cols}
            if table:
                available.update({c: "multi_categorical" for c in multi})
        wanted = list(available) if model is None else getattr(model, f"{tower}_features")
        wanted = list(available) if wanted == "all" else list(wanted)
        multi = data.item_multi_valued if tower == "item" else data.user_multi_valued
        # a name the data does not offer stays: building the model names it with the dataset's columns
        out[tower] = [FeatureSpec(name=n, kind=available.get(n, "categorical"), **({"separator": multi[n]} if n in multi else {}))
                      for n in wanted]
    return FeaturesConfig(**out)


class RunConfig(_Section):
    """A whole run: one section per stage of the data flow."""

    data: DataConfig = Field(default_factory=DataConfig, description="what to read and how to split it")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the towers")
    train: TrainConfig = Field(default_factory=TrainConfig, description="optimiser, loss and its corrections, early stopping")
    negatives: NegativesConfig = Field(default_factory=NegativesConfig, description="sampled, memory-bank and hard negatives")
    mining: MiningConfig = Field(default_factory=MiningConfig, description="hard-negative mining rounds")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="metrics: cut-offs, popularity correction, buckets")
    features: FeaturesConfig = Field(default_factory=FeaturesConfig, description="the towers' features, each declared once")

    def feature_specs(self) -> FeaturesConfig:
        """The features the towers take: ``[features]``, or the deprecated ``model.item_features`` /
        ``model.user_features`` (with ``data.item_feature_cols`` ...) as categorical declarations."""
        if self.features.declared:
            return self.features
        return legacy_features(self.data, self.model)

    @model_validator(mode="after")
    def _features_declared_once(self):
        m, d = self.model, self.data
        if self.features.declared:
            old = [k for k, v in (("model.item_features", m.item_features), ("model.user_features", m.user_features),
                                  ("data.item_feature_cols", d.item_feature_cols), ("data.item_multi_valued", d.item_multi_valued),
                                  ("data.user_feature_cols", d.user_feature_cols), ("data.user_multi_valued", d.user_multi_valued)) if v]
            if old:
                raise ValueError(f"features are declared in [features]; remove the older {', '.join(old)} (each feature is "
                                 "declared once: docs/features.md)")
        specs = self.feature_specs()
        if not (m.user_id or m.user_history or specs.user or specs.context):
            raise ValueError("the user tower has no input: enable model.user_id or model.user_history, or declare user "
                             "or context features")
        if not (m.item_id or specs.item):
            raise ValueError("the item tower has no input: enable model.item_id or declare item features")
        return self

    @model_validator(mode="after")
    def _mining_has_a_source(self):
        if self.mining.rounds and self.negatives.hard != "mined":
            raise ValueError("mining.rounds > 0 needs negatives.hard = \"mined\" (and negatives.hard_k)")
        if self.negatives.hard == "mined" and not self.mining.rounds:
            raise ValueError("negatives.hard = \"mined\" needs mining.rounds > 0")
        return self

    @model_validator(mode="after")
    def _monitor_is_evaluated(self):
        k = int(self.train.monitor.split("@")[1])
        if k not in self.eval.ks:
            self.eval.ks = sorted(set(self.eval.ks) | {k})
        return self

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "RunConfig":
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            raise ConfigError(_format_validation(e, source)) from None

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "RunConfig":
        """Read a TOML, YAML or JSON config and apply ``section.key=value`` overrides."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found. Pass a TOML/YAML file, e.g. configs/ml-100k.toml")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".toml":
                d = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                d = yaml.safe_load(text) or {}
            elif path.suffix == ".json":
                d = json.loads(text)
            else:
                raise ConfigError(f"{path}: unknown config format {path.suffix!r}. Use .toml, .yaml or .json")
        except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot parse: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: the top level must be a table of sections (data, model, train, negatives, mining, eval, features)")
        apply_overrides(d, overrides or [])
        return cls.from_dict(d, source=str(path))


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings; the value is parsed as TOML (``0.1``, ``true``, ``[1, 2]``, ``"x"``),
    falling back to a bare string."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.epochs=5")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return d


def _format_validation(e: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration:"]
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; `twotower train --help` lists the sections)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


# ---- the reference of every setting (docs/config.md is its output) -------------------------------
def _type_name(annotation) -> str:
    """A field's type in words: ``int``, ``"a" or "b"``, ``list of str``, ``str or none``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "none"
    if origin is Literal:
        return " or ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"table of {_type_name(args[0])} to {_type_name(args[1])}"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field) -> str:
    """The numeric bounds a field declares (``gt``, ``ge``, ``lt``, ``le``) as ``>= 1, < 1``."""
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    return ", ".join(f"{signs[name]} {getattr(m, name)}" for m in field.metadata for name in signs if hasattr(m, name))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown() -> str:
    """Every section and key of ``RunConfig`` with its type, default, bounds and description, as
    Markdown: the output of ``twotower config --reference`` and the content of docs/config.md."""
    lines = ["# Configuration reference", "",
             "Generated from the typed models in `src/twotower/config.py` by `twotower config --reference`;",
             "`tests/test_config_reference.py` fails when this file is stale (regenerate it with",
             "`twotower config --reference > docs/config.md`).", "",
             "A config file (TOML, YAML or JSON) has one table per section; any key can be overridden on the",
             "command line with `--set section.key=value` (the value parsed as TOML). Every value is checked",
             "when the config is loaded: an unknown key, a wrong type or a value outside its bounds is refused",
             "with a message naming it. Some checks span keys (for example `negatives.hard` needs",
             "`negatives.hard_k`); they are named in the descriptions. Paths are relative to the data directory",
             "(`--data-dir`, else `$TWOTOWER_DATA`, else `~/.local/share/twotower`) unless absolute.", ""]
    def table(model) -> list[str]:
        out = ["| key | type | default | bounds | description |", "| --- | --- | --- | --- | --- |"]
        for key, field in model.model_fields.items():
            default = field.get_default(call_default_factory=True)
            default = "(required)" if default is PydanticUndefined else f"`{_cell(json.dumps(default))}`"
            out.append(f"| `{key}` | {_cell(_type_name(field.annotation))} | {default} | "
                       f"{_bounds(field)} | {_cell(field.description or '')} |")
        return out

    for name, section in RunConfig.model_fields.items():
        model = section.annotation
        lines += [f"## [{name}]", "", " ".join((model.__doc__ or section.description or "").split()), ""]
        lines += table(model) + [""]
        nested = {a for f in model.model_fields.values() for a in typing.get_args(f.annotation)
                  if isinstance(a, type) and issubclass(a, BaseModel)}
        for sub in sorted(nested, key=lambda m: m.__name__):
            lines += [f"### {sub.__name__}", "", " ".join((sub.__doc__ or "").split()), "",
                      "Each kind takes the options " + "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in KIND_OPTIONS.items())
                      + f" (every kind: {', '.join(sorted(COMMON_OPTIONS - {'name', 'kind'}))}; context features: derive).", ""]
            lines += table(sub) + [""]
    return "\n".join(lines)
