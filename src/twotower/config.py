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
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined

from .errors import ConfigError

# Upper bounds shared by several fields: far beyond any useful value, well below what would
# overflow an int64 or ask for terabytes before the first step. Sizes that depend on the data
# (the embedding tables, the evaluation's score block) are checked against the data and the
# machine when the model is built (``training.trainer.check_memory``).
MAX_SEED = 2**32 - 1             # numpy's and PyTorch's seeds; train.seed is also combined with epoch and rank
MAX_DIM = 16384                  # embedding size, and MLP layer sizes
MAX_STEPS = 10**9                # step counts (warm-ups, ramps)
MAX_EPOCHS = 100_000
MAX_K = 100_000                  # cut-offs, retrieval depths
MAX_COUNT = 10**7                # counts of users, items, interactions per user
MAX_ALPHA = 1e4                  # the popularity correction: serving refuses |alpha| > 1e4 the same way
MAX_CONFIG_BYTES = 1 << 20       # a config file (a hostile one could be anything)
MAX_CONFIG_DEPTH = 32            # tables within tables (a config has 2 or 3)
MAX_CONFIG_NODES = 100_000       # values in all (YAML aliases can make a few lines mean billions)

PositiveSize = Annotated[int, Field(ge=1, le=MAX_DIM)]
CutOff = Annotated[int, Field(ge=1, le=MAX_K)]
Share = Annotated[float, Field(gt=0.0, lt=1.0)]
Name = Annotated[str, Field(max_length=4096)]


def _no_nul(value: Any, where: str) -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{where} holds a NUL byte (\\x00); file and column names cannot")
    elif isinstance(value, (list, tuple)):
        for v in value:
            _no_nul(v, where)
    elif isinstance(value, dict):
        for k, v in value.items():
            _no_nul(k, where)
            _no_nul(v, where)


# The groups of a cold split's metrics (``evaluation.evaluator``): the held-out pairs of withheld
# items or users, and the others.
COLD_GROUPS = ("warm_items", "cold_items", "warm_users", "cold_users")


class _Section(BaseModel):
    # allow_inf_nan=False: every float of every section is finite (lr = inf, temperature = inf or
    # eval.alpha = nan used to be accepted and broke the run later).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _text_has_no_nul(cls, v: Any) -> Any:
        _no_nul(v, "the value")
        return v

    @classmethod
    def from_values(cls, d: dict[str, Any], source: str = "config", section: str | None = None):
        """This section from a dict, validated, or one ``ConfigError`` with a line per bad field
        (named ``section.key`` when the section's name is given)."""
        try:
            return cls.model_validate(d)
        except ValidationError as e:
            raise ConfigError(_format_validation(e, source, section)) from None


class DataConfig(_Section):
    """Where the interactions come from and how they are split.

    Paths are relative to the data directory (``TWOTOWER_DATA``) unless absolute.
    """

    dataset: Literal["files", "ml-100k", "gowalla", "grocery", "lightgcn", "synthetic"] = Field(
        "files", description="files: the interactions (and features) files named below; ml-100k: the MovieLens 100K "
                             "folder; gowalla / lightgcn: a LightGCN-format folder (train.txt, test.txt; split='given'); "
                             "grocery: the Amazon Grocery folder (train.csv, item_meta.csv); synthetic: generated "
                             "(no files)")
    path: Name | None = Field(None, description="Folder of a named dataset (default: its name under the data directory).")
    interactions: Name | None = Field(None, description="Interactions file (CSV, TSV or Parquet) for dataset='files'.")
    test_interactions: Name | None = Field(None, description="A given test file (split='given').")
    user_col: str = Field("user", description="interactions column holding the raw user id")
    item_col: str = Field("item", description="interactions column holding the raw item id")
    time_col: str | None = Field(None, description="interactions column holding a numeric timestamp (needed by "
                                                   "split='temporal'; orders each user's history)")
    weight_col: str | None = Field(None, description="interactions column holding a numeric weight (e.g. a rating), "
                                                     "used by min_weight")
    min_weight: float | None = Field(None, ge=-1e15, le=1e15, description="Drop interactions whose weight (e.g. rating) is below this.")
    item_features: Name | None = Field(None, description="Item-features table (CSV/TSV/Parquet).")
    item_id_col: str = Field("item", description="item-features column holding the raw item id")
    item_feature_cols: list[str] = Field(default_factory=list, description="deprecated (declare [[features.item]]): "
                                                                           "item-features columns read as categorical features")
    item_multi_valued: dict[str, Annotated[str, Field(min_length=1)]] = Field(default_factory=dict, description="deprecated (declare [[features.item]] "
                                                                                "with kind = \"multi_categorical\"): column -> separator")
    item_title_col: str | None = Field(None, description="item-features column with a display title (shown by "
                                                         "`recommend` and the service; not a feature)")
    user_features: Name | None = Field(None, description="User-features table (CSV/TSV/Parquet).")
    user_id_col: str = Field("user", description="user-features column holding the raw user id")
    user_feature_cols: list[str] = Field(default_factory=list, description="deprecated (declare [[features.user]]): "
                                                                           "user-features columns read as categorical features")
    user_multi_valued: dict[str, Annotated[str, Field(min_length=1)]] = Field(default_factory=dict, description="deprecated (declare [[features.user]] "
                                                                                "with kind = \"multi_categorical\"): column -> separator")
    split: Literal["given", "random", "temporal"] = Field(
        "random", description="given: the test set is a file (test_interactions, or the dataset's own); random: a "
                              "seeded share of each user's items (test_fraction); temporal: each user's last "
                              "leave_last interactions (needs time_col)")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="split='random': share of each user's items held out")
    leave_last: int = Field(1, ge=1, le=MAX_COUNT, description="split='temporal': each user's last N interactions are the test set")
    valid_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of each user's training items carved out for validation (random/given splits)")
    valid_leave_last: int = Field(1, ge=0, le=MAX_COUNT, description="split='temporal': the N interactions before the test ones are validation")
    min_train_items: int = Field(1, ge=1, le=MAX_COUNT, description="a user keeps at least this many training items when carving holdouts")
    synthetic_users: int = Field(2000, ge=1, le=5_000_000, description="dataset='synthetic': number of users generated")
    synthetic_items: int = Field(1000, ge=1, le=5_000_000, description="dataset='synthetic': number of items generated")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the random splits and of the synthetic data")
    # Cold-start protocols (docs/features.md, "Cold start"): entities withheld from training entirely.
    cold_items: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "cold-item split: this share of the items that have interactions (seeded) is withheld from training "
        "entirely; every interaction of a withheld item is held out (a valid_fraction share of those items for "
        "validation, the rest for test), and evaluation reports warm_items/ and cold_items/ metrics (0: off)"))
    cold_users: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "cold-user split: this share of the users (seeded) is withheld from training entirely; each one's "
        "interactions are split as the data.split says, the held-out part is the truth and the rest is the "
        "input history a new user brings (never trained on); scored as new users through the user tower "
        "(a valid_fraction share of them for validation), reported as warm_users/ and cold_users/ (0: off)"))
    cold_user_history: int | None = Field(None, ge=0, le=MAX_COUNT, description=(
        "cold-user split: keep at most this many of a withheld user's most recent input items (0: features only; "
        "none: all of them)"))
    max_decompressed_mb: int = Field(8192, ge=1, le=1 << 20, description=(
        "refuse a gzip-compressed input that decompresses to more than this many MiB (the reader counts while it "
        "decompresses, so a decompression bomb stops here, not when memory runs out); Parquet columns are "
        "checked against it from the file's metadata before reading"))
    max_compression_ratio: int = Field(256, ge=2, le=2000, description=(
        "refuse a gzip-compressed input once more than 64 MiB came out of it at more than this many bytes per "
        "compressed byte (text tables compress 3 to 20 times; gzip's limit is about 1032): a decompression bomb is "
        "refused after 64 MiB instead of after max_decompressed_mb"))


class ModelConfig(_Section):
    """The two towers. With ids only and no MLP the model is matrix factorisation."""

    dim: int = Field(64, ge=1, le=MAX_DIM, description="embedding size d of both towers' output (and of every id and feature table)")
    user_id: bool = Field(True, description="user tower uses a user-id embedding (the user tower needs at least one "
                                                         "of user_id, user_history, user or context features)")
    user_history: bool = Field(False, description="user tower pools the embeddings of the user's past items")
    history_length: int = Field(50, ge=1, le=10_000, description="user_history: the user's last N items are pooled")
    share_item_table: bool = Field(True, description="history pooling reuses the item tower's id table")
    user_features: list[str] | Literal["all"] = Field(default_factory=list, description="deprecated (declare "
                         "[[features.user]]): user features read as categorical (names of data columns), or \"all\"")
    item_id: bool = Field(True, description="item tower uses an item-id embedding (the item tower needs item_id, "
                                                         "item features or both)")
    item_features: list[str] | Literal["all"] = Field(default_factory=list, description="deprecated (declare "
                         "[[features.item]]): item features read as categorical (names of data columns), or \"all\"")
    mlp: list[PositiveSize] = Field(default_factory=list, max_length=16, description="hidden layer sizes of each tower's "
                                                                                     "MLP (empty: no MLP)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout between the MLP layers (no effect without mlp)")
    temperature: float = Field(0.1, gt=0.0, le=100.0, description="tau: the score is cosine / tau (0.05 to 0.2 is the useful range)")
    learn_temperature: bool = Field(False, description="train tau too (as log tau, clamped to [0.01, 1]); `temperature` is its start")
    item_bias: bool = Field(False, description="a learned per-item bias b_j added to every score (exported to serving)")
    init_std: float = Field(0.1, gt=0.0, le=10.0, description="standard deviation of the normal initialisation of the embedding tables")
    init: Literal["normal", "svd", "als"] = Field(
        "normal", description="start of the user-id and item-id tables: normal (init_std); svd: the top-dim singular "
                              "vectors of the degree-normalised training matrix; als: a few implicit-ALS sweeps "
                              "(needs the `als` extra). svd and als rows are put on the sphere of the normal rows' "
                              "expected norm, init_std * sqrt(dim) (docs/tuning.md, 'Time to quality')")
    # History encoders (docs/features.md, "History encoders").
    history_encoder: Literal["mean", "recency", "attention"] = Field(
        "mean", description="user_history: how the history items' embeddings become one vector: mean (pooling); "
                            "recency (weights 2^(-age / history_half_life), age 0 = the most recent item); attention "
                            "(a small transformer over the last history_length items with positions, SASRec-style, "
                            "the most recent position's output)")
    history_half_life: float = Field(10.0, gt=0.0, le=1e6, description="recency: the age (in items) at which an "
                                                                          "item's weight is half the most recent one's")
    learn_half_life: bool = Field(False, description="recency: train the half-life too (history_half_life is its start)")
    history_layers: int = Field(1, ge=1, le=8, description="attention: transformer layers")
    history_heads: int = Field(2, ge=1, le=16, description="attention: heads per layer (dim must be a multiple of it)")
    history_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="attention: dropout on attention weights and "
                                                                      "residual branches while training")
    # Id dropout (DropoutNet, Volkovs et al. NeurIPS 2017): towers that work without the id.
    item_id_dropout: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "while training, replace a row's item-id embedding by a learned unknown vector with this probability; "
        "an item not in the vocabulary (or with no training interactions) then gets that vector (0: off)"))
    user_id_dropout: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "the same for the user tower: a new user (or one with no training interactions) gets the learned "
        "unknown-user vector (0: off)"))

    @model_validator(mode="after")
    def _history_and_dropout_fit(self):
        if self.history_encoder != "mean" and not self.user_history:
            raise ValueError(f"history_encoder = {self.history_encoder!r} needs user_history = true")
        if self.history_encoder == "attention" and self.dim % self.history_heads:
            raise ValueError(f"history_encoder = \"attention\": dim ({self.dim}) must be a multiple of "
                             f"history_heads ({self.history_heads})")
        if self.item_id_dropout and not self.item_id:
            raise ValueError("item_id_dropout > 0 needs item_id = true (there is no id embedding to drop)")
        if self.user_id_dropout and not self.user_id:
            raise ValueError("user_id_dropout > 0 needs user_id = true (there is no id embedding to drop)")
        return self

    @model_validator(mode="after")
    def _learned_temperature_start(self):
        if self.learn_temperature and not 0.01 <= self.temperature <= 1.0:
            raise ValueError(f"learn_temperature: temperature (its start) must lie in [0.01, 1], where the learned tau "
                             f"is clamped; got {self.temperature}")
        return self


class TrainConfig(_Section):
    """The optimiser, the loss and its corrections, early stopping and model selection."""

    epochs: int = Field(20, ge=1, le=MAX_EPOCHS, description="most epochs (passes over the training pairs); early stopping may end sooner")
    batch_size: int = Field(1024, ge=2, le=1 << 20, description="B: positive pairs per step (the global batch under torchrun); "
                                                    "each row's in-batch negatives are the other B - 1 positives")
    optimizer: Literal["adam", "adamw", "deferred_adam", "sparse_adam", "adagrad", "sgd"] = Field(
        "adam", description="adam: dense (fused) Adam; deferred_adam: dense Adam's update with each embedding row "
                            "updated only when a step reads it, its skipped steps summed in closed form (faster on "
                            "large tables; the same trajectory except that eps in the skipped steps is taken as at "
                            "the first of them, which shows only where sqrt(v) is as small as eps); "
                            "sparse_adam: lazy Adam, untouched rows frozen (torch.optim.SparseAdam's rule). "
                            "The two row-wise ones apply weight_decay to dense layers only")
    lr: float = Field(1e-3, gt=0.0, le=10.0, description="base learning rate")
    weight_decay: float = Field(0.0, ge=0.0, le=10.0, description="weight decay: added to the gradient (adam, adagrad, sgd) or "
                                                         "decoupled (adamw); deferred_adam and sparse_adam: dense layers only")
    schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="learning rate after the warm-up: constant, or cosine / linear decay to 0 at the last step")
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="steps of linear warm-up from lr / warmup_steps to lr")
    early_batch_size: int | None = Field(None, ge=2, le=1 << 20, description="B of the first early_batch_epochs epochs (none: "
                                                                 "batch_size throughout): larger batches early take "
                                                                 "fewer, cheaper steps while the model is far off")
    early_batch_epochs: int = Field(0, ge=0, le=MAX_EPOCHS, description="epochs trained at early_batch_size before batch_size")
    grad_clip: float | None = Field(None, gt=0.0, le=1e6, description="clip the gradient norm of the dense parameters to this (none: no clipping)")
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
    streaming_buckets: int = Field(1 << 20, ge=1, le=1 << 27, description="streaming estimator: size of the hashed arrays")
    mask_user_history: bool = Field(False, description="mask candidates that are among the row user's training items")
    patience: int = Field(3, ge=0, le=MAX_EPOCHS, description="epochs without validation improvement before stopping (0: never stop early)")
    monitor: str = Field("recall@20", description="validation metric used for early stopping and model selection: "
                                                       "recall, ndcg, hr, precision or mrr, at a K (e.g. recall@20); "
                                                       "with a cold split, a group may prefix it (e.g. "
                                                       "cold_items/recall@20, warm_users/ndcg@10)")
    eval_every: int = Field(1, ge=1, le=MAX_EPOCHS, description="validate every N epochs (and after the last)")
    refit: bool = Field(False, description="after early stopping, retrain from scratch on train + validation for the "
                                          "best number of epochs (selection stays on validation; more data for the final model)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of initialisation, batch order and negative sampling")
    device: Literal["auto", "cpu", "cuda"] = Field("cpu", description="where to train and evaluate; auto: CUDA when available")
    threads: int | None = Field(None, ge=1, le=1024, description=(
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
        group, _, metric = v.rpartition("/")
        name, _, k = metric.partition("@")
        if (name not in {"recall", "ndcg", "hr", "precision", "mrr"} or not (k.isascii() and k.isdigit())
                or group not in ("", *COLD_GROUPS)):
            raise ValueError(f"monitor must look like 'recall@20', 'ndcg@10' or, with a cold split, "
                             f"'cold_items/recall@20' (groups: {', '.join(COLD_GROUPS)}), got {v!r}")
        if not 1 <= int(k) <= MAX_K:
            raise ValueError(f"monitor's cut-off must lie in 1 ... {MAX_K}, got {v!r}")
        return v

    @property
    def sparse_embeddings(self) -> bool:
        """Embedding tables with sparse gradients, updated row-wise (deferred_adam, sparse_adam)."""
        return self.optimizer in ("deferred_adam", "sparse_adam")


class NegativesConfig(_Section):
    """Negative sources beyond the batch's own positives; the trainer composes them (docs/design.md,
    "The candidate set")."""

    sampled: int = Field(0, ge=0, le=1 << 20, description="M items per batch from the proposal, shared by all rows (Yang et al. 2020)")
    proposal: Literal["uniform", "frequency"] = Field("uniform", description="sampled negatives: uniform, or count^beta")
    beta: float = Field(0.75, ge=0.0, le=10.0, description="exponent of the frequency proposal")
    bank_size: int = Field(0, ge=0, le=1 << 22, description="Q: memory bank of the last Q positives' item embeddings (Wang et al. 2021)")
    bank_warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="steps before the memory bank is used (its entries go stale fastest early)")
    hard: Literal["none", "category", "mined", "exposure"] = Field(
        "none", description="per-row hard negatives: same category as the positive, mined by the model (see [mining]), "
                            "or shown-but-not-engaged items from an impressions file")
    hard_k: int = Field(0, ge=0, le=1024, description="K hard negatives per row (more than 0 when hard is not none)")
    category_feature: str | None = Field(None, description="hard = category: the item feature holding categories "
                                                           "(default: the only item feature)")
    exposure_file: str | None = Field(None, description="hard = exposure: impressions file (CSV/TSV/Parquet, raw ids); "
                                                        "`twotower mine` writes one in the same format")
    exposure_user_col: str = Field("user", description="hard = exposure: impressions column holding the raw user id")
    exposure_item_col: str = Field("item", description="hard = exposure: impressions column holding the raw item id")
    hard_warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="curriculum: steps before hard negatives begin")
    hard_ramp_steps: int = Field(0, ge=0, le=MAX_STEPS, description="curriculum: steps over which hard negatives ramp up after the warm-up")
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

    rounds: int = Field(0, ge=0, le=1000, description="mining rounds after the first training phase (0: none; needs negatives.hard = \"mined\")")
    epochs_per_round: int = Field(2, ge=1, le=MAX_EPOCHS, description="epochs trained on each round's mined negatives")
    top_r: int = Field(200, ge=1, le=MAX_K, description="R: items retrieved per training user")
    window_lo: int = Field(10, ge=0, le=MAX_K, description="skip the very top, where unlabelled positives (false negatives) live")
    window_hi: int = Field(200, ge=1, le=MAX_K, description="ranks from window_lo up to, not including, window_hi are kept "
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
    patience: int | None = Field(None, ge=0, le=MAX_EPOCHS, description=(
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

    ks: list[CutOff] = Field(default_factory=lambda: [10, 20, 50, 100, 500], max_length=64, description="cut-offs K of every metric "
                                                                                     "(train.monitor's K is added)")
    batch_users: int = Field(1024, ge=1, le=1 << 20, description="users ranked against the whole catalog at a time (memory: "
                                                     "batch_users x items scores)")
    alpha: float = Field(0.0, ge=-MAX_ALPHA, le=MAX_ALPHA, description="rank by the served score with popularity correction, score - alpha * log p(item) "
                                         "(as `serve`/`recommend --alpha`); 0 ranks by the training score")
    popularity_buckets: list[Share] = Field(
        default_factory=lambda: [0.2, 0.5], max_length=16,
        description="cumulative item shares that cut items (most popular first) into head / torso / tail: "
                    "strictly increasing, each in (0, 1)",
    )

    @field_validator("ks")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("ks must be a non-empty list of positive integers")
        return sorted(set(v))

    @field_validator("popularity_buckets")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"popularity_buckets must be strictly increasing cumulative shares, e.g. [0.2, 0.5]; got {v}")
        return v


class TuneConfig(_Section):
    """The search space of `twotower tune` (docs/tuning.md): each list is a range or a set of choices
    for one setting of the base config; an empty list leaves the base config's value. Ranges are
    ``[low, high]`` sampled on a log scale (temperature, lr) or linearly (logq_weight); one value
    fixes the setting."""

    dim: list[PositiveSize] = Field(default_factory=lambda: [64, 128, 256], max_length=64, description="model.dim choices")
    temperature: list[Annotated[float, Field(gt=0.0, le=100.0)]] = Field(default_factory=lambda: [0.05, 0.2], description="model.temperature range "
                                                                                      "[low, high], log scale")
    lr: list[Annotated[float, Field(gt=0.0, le=10.0)]] = Field(default_factory=lambda: [0.002, 0.05], description="train.lr range [low, high], log scale")
    schedule: list[Literal["constant", "cosine", "linear"]] = Field(default_factory=lambda: ["constant", "cosine"],
                                                                    description="train.schedule choices")
    warmup_steps: list[Annotated[int, Field(ge=0, le=MAX_STEPS)]] = Field(default_factory=list, max_length=64, description="train.warmup_steps choices")
    batch_size: list[Annotated[int, Field(ge=2, le=1 << 20)]] = Field(default_factory=lambda: [512, 1024, 2048, 4096], max_length=64,
                                  description="train.batch_size choices (each >= 2)")
    logq_weight: list[Annotated[float, Field(ge=0.0, le=100.0)]] = Field(default_factory=lambda: [0.0, 1.0], description="train.logq_weight range "
                                                                                     "[low, high], linear")
    item_bias: list[bool] = Field(default_factory=lambda: [False, True], description="model.item_bias choices")
    user_history: list[bool] = Field(default_factory=lambda: [False, True], description="model.user_history choices "
                                                                                        "(the history encoder)")
    init: list[Literal["normal", "svd", "als"]] = Field(default_factory=list, description="model.init choices")
    epochs: list[Annotated[int, Field(ge=1, le=MAX_EPOCHS)]] = Field(default_factory=list, max_length=64, description="train.epochs choices (the schedule's length; "
                                                                "early stopping and pruning may end a trial sooner)")
    sampler_seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the TPE sampler")
    pruner: Literal["median", "halving", "none"] = Field(
        "median", description="stop a trial whose per-epoch validation curve falls behind: median (below the median "
                              "of earlier trials at the same epoch), halving (successive halving), none")
    prune_after: int = Field(2, ge=0, le=MAX_EPOCHS, description="epochs a trial runs before it may be pruned")
    startup_trials: int = Field(4, ge=0, le=100_000, description="trials sampled at random before TPE models the results, and "
                                                     "finished before pruning begins")
    als_factors: list[PositiveSize] = Field(default_factory=lambda: [32, 64, 128, 256], max_length=64, description="baseline ALS: factors, "
                                                                                           "chosen on validation")
    als_regularization: list[Annotated[float, Field(gt=0.0, le=1e9)]] = Field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0], max_length=64,
                                            description="baseline ALS: L2 regularisation choices")
    als_alpha: list[Annotated[float, Field(gt=0.0, le=1e6)]] = Field(default_factory=lambda: [0.5, 1.0, 5.0, 20.0], max_length=64,
                                   description="baseline ALS: confidence weight alpha (c = 1 + alpha r) choices")
    als_iterations: list[Annotated[int, Field(ge=1, le=10_000)]] = Field(default_factory=lambda: [15], max_length=64, description="baseline ALS: sweeps choices")
    ease_lambda: list[Annotated[float, Field(gt=0.0, le=1e12)]] = Field(default_factory=lambda: [10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 3000.0], max_length=64,
                                     description="baseline EASE: L2 regularisation lambda choices")
    ease_max_items: int = Field(20000, ge=1, le=1_000_000, description="baseline EASE: largest catalog for the dense n x n inverse "
                                                         "(memory 3 n^2 x 4 bytes, time ~ n^3); larger ones are refused")

    @field_validator("temperature", "lr", "logq_weight")
    @classmethod
    def _range(cls, v: list[float], info) -> list[float]:
        if len(v) > 2 or (len(v) == 2 and not v[0] < v[1]):
            raise ValueError(f"a range is [low, high] with low < high (or one value, or [] for the base's), got {v}")
        if info.field_name in ("temperature", "lr") and any(x <= 0 for x in v):
            raise ValueError(f"{info.field_name} must be > 0 (sampled on a log scale), got {v}")
        if any(x < 0 for x in v):
            raise ValueError(f"must be >= 0, got {v}")
        return v

    @field_validator("dim", "batch_size", "epochs", "als_factors", "als_iterations")
    @classmethod
    def _positive_choices(cls, v: list[int], info) -> list[int]:
        low = 2 if info.field_name == "batch_size" else 1
        if any(x < low for x in v):
            raise ValueError(f"{info.field_name} choices must be >= {low}, got {v}")
        return v

    @field_validator("warmup_steps")
    @classmethod
    def _non_negative(cls, v: list[int]) -> list[int]:
        if any(x < 0 for x in v):
            raise ValueError(f"choices must be >= 0, got {v}")
        return v

    @field_validator("als_regularization", "als_alpha", "ease_lambda")
    @classmethod
    def _positive_values(cls, v: list[float], info) -> list[float]:
        if not v or any(x <= 0 for x in v):
            raise ValueError(f"{info.field_name} needs one or more values > 0, got {v}")
        return v
class UpdateConfig(_Section):
    """``twotower update``: continuing a trained run on new interactions (docs/freshness.md,
    "Updating a run"). Training goes on from the run's weights and optimizer state, over the new
    interactions plus a replay sample of the ones the run already knows, so that the model does not
    forget; the other training settings are the run's own."""

    epochs: int = Field(1, ge=1, le=1000, description="passes over the update's training pairs (new + replayed)")
    replay: float = Field(1.0, ge=0.0, le=1000.0, description="replayed old interactions per new one, drawn uniformly "
                          "without replacement from what the run knows (0: train on the new interactions alone)")
    replay_max: int | None = Field(None, ge=0, le=10**12, description="at most this many replayed interactions (none: no cap)")
    replay_focus: float = Field(0.0, ge=0.0, le=1.0, description="share of the replay sample drawn from the earlier "
                                "interactions of the users in the new ones (their histories), the rest uniformly from "
                                "all (0: uniform replay)")
    lr: float | None = Field(None, gt=0.0, le=10.0, description="learning rate of the update (none: the run's train.lr); constant, "
                             "no warm-up")
    count_decay: float = Field(1.0, ge=0.0, le=1.0, description="the run's item counts are multiplied by this (rounded) "
                               "before the new interactions are added: 1 keeps all history, smaller values let "
                               "popularity follow the recent data")
    new_rows: Literal["fold_in", "initialiser"] = Field("initialiser", description="id rows of admitted entities in a tower "
                                                         "of ids alone (no features, no id dropout, no MLP): fold_in "
                                                         "starts each at the mean direction of what it interacted with "
                                                         "(its items' vectors for a user, its users' for an item); "
                                                         "initialiser draws them as training does (model.init_std)")
    retire_after: int | None = Field(None, ge=1, le=10**6, description="retire the users and items that no update's new "
                                     "interactions touched in this many updates in a row (the training data counts as "
                                     "update 0): their id rows are reset to the unknown entity's, their pairs leave the "
                                     "replay pool, retired items leave the index and recommendations, and a retired user "
                                     "is answered from its features or history, or refused when its tower reads ids alone; "
                                     "an entity that comes back in new interactions is active again (none: never retire)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the replay sample, batch order and negative sampling of the update")

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
    seed: int = Field(0, ge=0, le=MAX_SEED, description="hashing seed (categorical with hash_buckets, text)")
    min_count: int = Field(1, ge=1, le=MAX_COUNT, description="categorical vocabulary: values on fewer training rows than this go to "
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
    char_ngrams: list[Annotated[int, Field(ge=1, le=10)]] = Field(default_factory=lambda: [3, 4], max_length=10, description="text: character n-gram sizes taken "
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
    tune: TuneConfig = Field(default_factory=TuneConfig, description="`twotower tune`'s search space and the "
                                                                     "baselines' settings (training ignores it)")
    update: UpdateConfig = Field(default_factory=UpdateConfig, description="continuing the run on new interactions "
                                 "(`twotower update`)")
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
    def _monitor_group_exists(self):
        group = self.train.monitor.rpartition("/")[0]
        if group and not (self.data.cold_items if group.endswith("_items") else self.data.cold_users):
            key = "data.cold_items" if group.endswith("_items") else "data.cold_users"
            raise ValueError(f"train.monitor = {self.train.monitor!r} needs a cold split: set {key} > 0")
        if group.startswith("cold_") and not self.data.valid_fraction:
            raise ValueError(f"train.monitor = {self.train.monitor!r} needs cold validation entities: "
                             "set data.valid_fraction > 0")
        return self

    @model_validator(mode="after")
    def _refit_has_validation(self):
        carved = self.data.valid_leave_last if self.data.split == "temporal" else self.data.valid_fraction
        if self.train.refit and not carved:
            key = "data.valid_leave_last" if self.data.split == "temporal" else "data.valid_fraction"
            raise ValueError(f"train.refit retrains for the epoch count validation chose, but {key} = 0 leaves no "
                             f"validation: set {key} > 0, or train.refit = false")
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
        return cls.from_values(d, source)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "RunConfig":
        """Read a TOML, YAML or JSON config (``read_config_file``) and apply ``section.key=value`` overrides."""
        d = read_config_file(path)
        apply_overrides(d, overrides or [])
        check_shape(d, str(path))
        return cls.from_dict(d, source=str(path))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The table of a TOML, YAML or JSON config file: the one place configs are read (``train``,
    ``config``, ``compare``). Bounded: at most ``MAX_CONFIG_BYTES``, UTF-8, nested at most
    ``MAX_CONFIG_DEPTH`` deep with at most ``MAX_CONFIG_NODES`` values; anything else is one
    ``ConfigError`` naming the file and the place, never a parser's ``RecursionError`` or
    ``UnicodeDecodeError``."""
    from .errors import storage_error

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found. Pass a TOML/YAML file, e.g. configs/ml-100k.toml")
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"{path}: unknown config format {path.suffix!r}. Use .toml, .yaml or .json")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise storage_error(e, path, "read") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB, which no config is (they are a few KB). "
                          "Check that this is the config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path}, line {line}, column {col}: byte 0x{raw[e.start:e.start + 1].hex()} is not UTF-8. "
                          "Save the config as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    text = text.removeprefix("\ufeff")
    try:
        if path.suffix == ".toml":
            d = tomllib.loads(text)
        elif path.suffix == ".json":
            d = json.loads(text)
        else:
            d = yaml.safe_load(text)
            d = {} if d is None else d
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to parse (a config has two or three levels of tables). "
                          "Check that this is the config file") from None
    except (tomllib.TOMLDecodeError, yaml.YAMLError, ValueError, TypeError) as e:  # ValueError: JSON, digit limits, YAML dates
        raise ConfigError(f"{path}: cannot parse: {' '.join(str(e).split())}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: the top level must be a table of sections (data, model, train, negatives, mining, eval, features, tune, update)")
    check_shape(d, str(path))
    return d


def check_shape(d: Any, source: str) -> None:
    """Refuse a config tree deeper than ``MAX_CONFIG_DEPTH`` or with more than ``MAX_CONFIG_NODES``
    values (walked without recursion: YAML aliases can make a few lines stand for billions)."""
    stack, nodes = [(d, 1)], 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_CONFIG_NODES:
            raise ConfigError(f"{source}: more than {MAX_CONFIG_NODES:,} values (YAML aliases that expand?); a config "
                              "holds a few dozen. Check that this is the config file")
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{source}: nested more than {MAX_CONFIG_DEPTH} levels deep; a config has sections "
                              "of keys (two or three levels). Check that this is the config file")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, (list, tuple, set)):
            stack.extend((v, depth + 1) for v in node)


def parse_value(raw: str, flag: str) -> Any:
    """A command-line value parsed as TOML (``0.1``, ``true``, ``[1, 2]``, ``"x"``), else the bare string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except RecursionError:
        raise ConfigError(f"{flag}: the value is nested too deeply; give a number, a string, or a flat list") from None
    except (tomllib.TOMLDecodeError, ValueError):
        return raw


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings; the value is parsed as TOML (``0.1``, ``true``, ``[1, 2]``, ``"x"``),
    falling back to a bare string."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.epochs=5")
        value = parse_value(raw, f"--set {key}")
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return d


def _format_validation(e: ValidationError, source: str, section: str | None = None) -> str:
    """One line per bad field: where (``section.key``, a list item by position), what was given, and
    what is allowed. A union type's alternatives each report the same field, and a list may have
    several bad items: the first says it (with how many more)."""
    lines: dict[str, list] = {}
    for err in e.errors():
        parts = ([section] if section else []) + [str(x) for x in err["loc"] if not _is_union_tag(x)]
        field = ".".join(parts[:2])
        if field in lines:
            lines[field][1] += 1
            continue
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; `twotower config --reference` lists every key)"
        elif err["type"] == "finite_number":
            msg = "must be a finite number (not inf or nan)"
        elif "input" in err and err["type"] != "missing" and not isinstance(err["input"], (dict, list)):
            shown = repr(err["input"])
            msg += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
        lines[field] = [f"  {'.'.join(parts) or '(top level)'}: {msg}", 0]
    return "\n".join([f"{source}: invalid configuration:"] +
                     [line + (f" (and {more} more in this field)" if more else "") for line, more in lines.values()])


def _is_union_tag(part) -> bool:
    """Pydantic names the alternative of a union in an error's location (``list[str]``,
    ``literal['all']``, ``function-after[...]``): not a place in the config."""
    return isinstance(part, str) and ("[" in part or part in ("int", "float", "str", "bool", "none"))


# ---- the reference of every setting (docs/config.md is its output) -------------------------------
def _type_name(annotation) -> str:
    """A field's type in words: ``int``, ``"a" or "b"``, ``list of str``, ``str or none``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "none"
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " or ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"table of {_type_name(args[0])} to {_type_name(args[1])}"
    return getattr(annotation, "__name__", str(annotation))


_SIGNS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _limits(metadata) -> list[str]:
    return [f"{_SIGNS[name]} {getattr(m, name)}" for m in metadata for name in _SIGNS if getattr(m, name, None) is not None]


def _bounds(field) -> str:
    """The bounds a field declares: numeric (``gt``, ``ge``, ``lt``, ``le``) as ``>= 1, < 1``, those of
    each item of a list (``each >= 1``), and a list's longest length (``at most 16``)."""
    out = _limits(field.metadata)
    inner = [a for a in typing.get_args(field.annotation) if typing.get_origin(a) is Annotated]
    for a in inner:
        each = _limits([c for m in typing.get_args(a)[1:] for c in getattr(m, "metadata", [m])])
        if each:
            out.append("each " + ", ".join(each))
    longest = [m.max_length for m in field.metadata if getattr(m, "max_length", None) is not None]
    if longest and typing.get_origin(field.annotation) is list:
        out.append(f"at most {longest[0]} items")
    return ", ".join(out)


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
             "with a message naming it; every number must be finite (no `inf`, no `nan`). Some checks span",
             "keys (for example `negatives.hard` needs `negatives.hard_k`); they are named in the descriptions.",
             "Sizes that depend on the data (the embedding tables, the evaluation's block of scores) are checked",
             "against the data and the machine's memory when the model is built. Paths are relative to the data",
             "directory (`--data-dir`, else `$TWOTOWER_DATA`, else `~/.local/share/twotower`) unless absolute.", ""]
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
