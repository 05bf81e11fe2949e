"""Hostile configs (issue 17, classes 6 and 7): every field of ``config.py`` given a value that cannot
work, sizes that would ask for terabytes, and files that a parser cannot be trusted with (nested
100,000 deep, latin-1 bytes, alias bombs, megabytes of text), as well as run-directory files nested
or encoded the same way. Every refusal: exit code 2, one message naming the place and the fix."""
from __future__ import annotations

import hashlib
import json
import shutil
import typing
from pathlib import Path

import pytest

from _hostile import FAST, assert_refused, cli, tiny_config

DEEP = 100_000

# (key, value as written after --set, fragment the message must name). Every field of every section
# has at least one case; a field with an upper bound has one beyond it too.
BAD_VALUES = [
    # [data]
    ("data.dataset", '"movielens"', "data.dataset"),
    ("data.path", '"a\\u0000b"', "NUL byte"),
    ("data.interactions", '"in\\u0000ter.csv"', "NUL byte"),
    ("data.test_interactions", "5", "data.test_interactions"),
    ("data.user_col", "[]", "data.user_col"),
    ("data.item_col", "{}", "data.item_col"),
    ("data.time_col", "3", "data.time_col"),
    ("data.weight_col", "[1]", "data.weight_col"),
    ("data.min_weight", "nan", "data.min_weight: must be a finite number"),
    ("data.min_weight", "1e300", "data.min_weight"),
    ("data.item_features", "5", "data.item_features"),
    ("data.item_id_col", '"i\\u0000d"', "NUL byte"),
    ("data.item_feature_cols", '"genre"', "data.item_feature_cols"),
    ("data.item_multi_valued", '{genre = ""}', "data.item_multi_valued.genre"),
    ("data.item_title_col", "1", "data.item_title_col"),
    ("data.user_features", "[]", "data.user_features"),
    ("data.user_id_col", "1.5", "data.user_id_col"),
    ("data.user_feature_cols", "[1, 2]", "data.user_feature_cols.0"),
    ("data.user_multi_valued", '{age = ""}', "data.user_multi_valued.age"),
    ("data.split", '"weekly"', "data.split"),
    ("data.test_fraction", "1.0", "data.test_fraction"),
    ("data.test_fraction", "nan", "data.test_fraction: must be a finite number"),
    ("data.leave_last", "0", "data.leave_last"),
    ("data.leave_last", "1000000000000", "data.leave_last"),
    ("data.valid_fraction", "-0.1", "data.valid_fraction"),
    ("data.valid_leave_last", "-1", "data.valid_leave_last"),
    ("data.valid_leave_last", "99999999999", "data.valid_leave_last"),
    ("data.min_train_items", "0", "data.min_train_items"),
    ("data.min_train_items", "1000000000000", "data.min_train_items"),
    ("data.synthetic_users", "0", "data.synthetic_users"),
    ("data.synthetic_users", "1000000000", "data.synthetic_users"),
    ("data.synthetic_items", "1000000000", "data.synthetic_items"),
    ("data.seed", "-1", "data.seed"),
    ("data.seed", "18446744073709551616", "data.seed"),
    ("data.max_decompressed_mb", "0", "data.max_decompressed_mb"),
    ("data.max_decompressed_mb", "1000000000", "data.max_decompressed_mb"),
    ("data.max_compression_ratio", "1", "data.max_compression_ratio"),
    ("data.max_compression_ratio", "5000", "data.max_compression_ratio"),
    # [model]
    ("model.dim", "0", "model.dim"),
    ("model.dim", "1180591620717411303424", "model.dim"),  # 2**70: beyond int64
    ("model.user_id", '"maybe"', "model.user_id"),
    ("model.user_history", "2", "model.user_history"),
    ("model.history_length", "0", "model.history_length"),
    ("model.history_length", "1000000", "model.history_length"),
    ("model.share_item_table", '"x"', "model.share_item_table"),
    ("model.user_features", "5", "model.user_features"),
    ("model.item_id", '"x"', "model.item_id"),
    ("model.item_features", "5", "model.item_features"),
    ("model.mlp", "[-4]", "model.mlp.0"),
    ("model.mlp", "[0]", "model.mlp.0"),
    ("model.mlp", "[64, 1000000000]", "model.mlp.1"),
    ("model.mlp", "[" + ", ".join(["8"] * 17) + "]", "model.mlp"),
    ("model.dropout", "1.0", "model.dropout"),
    ("model.dropout", "nan", "model.dropout: must be a finite number"),
    ("model.temperature", "0", "model.temperature"),
    ("model.temperature", "inf", "model.temperature: must be a finite number"),
    ("model.temperature", "1000", "model.temperature"),
    ("model.learn_temperature", '"x"', "model.learn_temperature"),
    ("model.item_bias", '"x"', "model.item_bias"),
    ("model.init_std", "0", "model.init_std"),
    ("model.init_std", "inf", "model.init_std: must be a finite number"),
    # [train]
    ("train.epochs", "0", "train.epochs"),
    ("train.epochs", "1000000000", "train.epochs"),
    ("train.batch_size", "1", "train.batch_size"),
    ("train.batch_size", "1099511627776", "train.batch_size"),
    ("train.optimizer", '"lbfgs"', "train.optimizer"),
    ("train.lr", "0", "train.lr"),
    ("train.lr", "inf", "train.lr: must be a finite number"),
    ("train.lr", "-inf", "train.lr: must be a finite number"),
    ("train.lr", "100", "train.lr"),
    ("train.weight_decay", "-1", "train.weight_decay"),
    ("train.weight_decay", "inf", "train.weight_decay: must be a finite number"),
    ("train.schedule", '"step"', "train.schedule"),
    ("train.warmup_steps", "-1", "train.warmup_steps"),
    ("train.warmup_steps", "1000000000000", "train.warmup_steps"),
    ("train.grad_clip", "0", "train.grad_clip"),
    ("train.grad_clip", "inf", "train.grad_clip: must be a finite number"),
    ("train.unique_users", '"x"', "train.unique_users"),
    ("train.logq", '"x"', "train.logq"),
    ("train.logq_weight", "-1", "logq_weight = -1.0: a negative weight only with"),
    ("train.logq_weight", "nan", "train.logq_weight: must be a finite number"),
    ("train.correct_positive", '"x"', "train.correct_positive"),
    ("train.logq_form", '"x"', "train.logq_form"),
    ("train.frequency", '"x"', "train.frequency"),
    ("train.streaming_lr", "0", "train.streaming_lr"),
    ("train.streaming_lr", "2", "train.streaming_lr"),
    ("train.streaming_buckets", "0", "train.streaming_buckets"),
    ("train.streaming_buckets", "1099511627776", "train.streaming_buckets"),
    ("train.mask_user_history", '"x"', "train.mask_user_history"),
    ("train.patience", "-1", "train.patience"),
    ("train.patience", "1000000000", "train.patience"),
    ("train.monitor", '"recall@0"', "train.monitor"),
    ("train.monitor", '"recall@999999999"', "train.monitor"),
    ("train.monitor", '"auc@10"', "train.monitor"),
    ("train.monitor", '"recall@\u0663"', "train.monitor"),  # an Arabic-Indic digit: not a cut-off
    ("train.eval_every", "0", "train.eval_every"),
    ("train.refit", '"x"', "train.refit"),
    ("train.seed", "-1", "train.seed"),
    ("train.seed", "4294967296", "train.seed"),
    ("train.device", '"tpu"', "train.device"),
    ("train.threads", "0", "train.threads"),
    ("train.threads", "100000", "train.threads"),
    ("train.native", '"x"', "train.native"),
    # [negatives]
    ("negatives.sampled", "-1", "negatives.sampled"),
    ("negatives.sampled", "1073741824", "negatives.sampled"),
    ("negatives.proposal", '"x"', "negatives.proposal"),
    ("negatives.beta", "-1", "negatives.beta"),
    ("negatives.beta", "inf", "negatives.beta: must be a finite number"),
    ("negatives.bank_size", "-1", "negatives.bank_size"),
    ("negatives.bank_size", "1073741824", "negatives.bank_size"),
    ("negatives.bank_warmup_steps", "-1", "negatives.bank_warmup_steps"),
    ("negatives.hard", '"x"', "negatives.hard"),
    ("negatives.hard_k", "-1", "negatives.hard_k"),
    ("negatives.hard_k", "5000", "negatives.hard_k"),
    ("negatives.category_feature", "5", "negatives.category_feature"),
    ("negatives.exposure_file", '"a\\u0000b"', "NUL byte"),
    ("negatives.exposure_user_col", "5", "negatives.exposure_user_col"),
    ("negatives.exposure_item_col", "5", "negatives.exposure_item_col"),
    ("negatives.hard_warmup_steps", "-1", "negatives.hard_warmup_steps"),
    ("negatives.hard_ramp_steps", "1000000000000", "negatives.hard_ramp_steps"),
    ("negatives.hard_ramp", '"x"', "negatives.hard_ramp"),
    ("negatives.hard_weight", "0", "negatives.hard_weight"),
    ("negatives.hard_weight", "inf", "negatives.hard_weight: must be a finite number"),
    # [mining]
    ("mining.rounds", "-1", "mining.rounds"),
    ("mining.rounds", "1000000", "mining.rounds"),
    ("mining.epochs_per_round", "0", "mining.epochs_per_round"),
    ("mining.top_r", "0", "mining.top_r"),
    ("mining.top_r", "1000000000", "mining.top_r"),
    ("mining.window_lo", "-1", "mining.window_lo"),
    ("mining.window_hi", "0", "mining.window_hi"),
    # [eval]
    ("eval.ks", "[]", "eval.ks"),
    ("eval.ks", "[0]", "eval.ks.0"),
    ("eval.ks", "[10, 1000000000]", "eval.ks.1"),
    ("eval.ks", "[" + ", ".join(str(i) for i in range(1, 70)) + "]", "eval.ks"),
    ("eval.batch_users", "0", "eval.batch_users"),
    ("eval.batch_users", "1099511627776", "eval.batch_users"),
    ("eval.alpha", "nan", "eval.alpha: must be a finite number"),
    ("eval.alpha", "inf", "eval.alpha: must be a finite number"),
    ("eval.alpha", "100000.0", "eval.alpha"),
    ("eval.popularity_buckets", "[0.5, 0.2]", "strictly increasing"),
    ("eval.popularity_buckets", "[0.2, 0.2]", "strictly increasing"),
    ("eval.popularity_buckets", "[0.0, 0.5]", "eval.popularity_buckets.0"),
    ("eval.popularity_buckets", "[0.5, 1.5]", "eval.popularity_buckets.1"),
    ("eval.popularity_buckets", "[0.2, nan]", "eval.popularity_buckets.1: must be a finite number"),
]

# Values that are fine alone but not together (the message names the rule).
BAD_COMBINATIONS = [
    (["model.learn_temperature=true", "model.temperature=5.0"], "[0.01, 1]"),
    (["model.user_id=false"], "the user tower has no input"),
    (["model.item_id=false"], "the item tower has no input"),
    (["train.refit=true", "data.valid_fraction=0.0"], "train.refit"),
    (["train.refit=true", 'data.split="temporal"', "data.valid_leave_last=0"], "data.valid_leave_last = 0"),
    (['negatives.hard="category"'], "needs hard_k > 0"),
    (['negatives.hard="exposure"', "negatives.hard_k=2"], "needs exposure_file"),
    (["mining.rounds=1"], 'needs negatives.hard = "mined"'),
    (['negatives.hard="mined"', "negatives.hard_k=2"], "needs mining.rounds > 0"),
    (["mining.window_lo=50", "mining.window_hi=20"], "window_lo < window_hi <= top_r"),
    (["train.monitor=\"cold_items/recall@20\""], "needs a cold split"),
    (['model.history_encoder="recency"'], "needs user_history = true"),
    (["model.item_id=false", "model.item_id_dropout=0.5", 'model.item_features="all"'], "needs item_id = true"),
    (["trian.epochs=3"], "trian: unknown setting"),
    (["train.epoch=3"], "train.epoch: unknown setting"),
]


# Cold splits, history encoders, id dropout, starts of the id tables, early batches (issue 18, 22).
BAD_VALUES += [
    ("data.cold_items", "1.0", "data.cold_items"),
    ("data.cold_items", "nan", "data.cold_items: must be a finite number"),
    ("data.cold_users", "-0.1", "data.cold_users"),
    ("data.cold_user_history", "-1", "data.cold_user_history"),
    ("data.cold_user_history", "1000000000000", "data.cold_user_history"),
    ("model.init", '"pca"', "model.init"),
    ("model.history_encoder", '"lstm"', "model.history_encoder"),
    ("model.history_half_life", "0", "model.history_half_life"),
    ("model.history_half_life", "inf", "model.history_half_life: must be a finite number"),
    ("model.learn_half_life", '"x"', "model.learn_half_life"),
    ("model.history_layers", "0", "model.history_layers"),
    ("model.history_layers", "100", "model.history_layers"),
    ("model.history_heads", "0", "model.history_heads"),
    ("model.history_heads", "1000", "model.history_heads"),
    ("model.history_dropout", "1.0", "model.history_dropout"),
    ("model.item_id_dropout", "1.0", "model.item_id_dropout"),
    ("model.item_id_dropout", "nan", "model.item_id_dropout: must be a finite number"),
    ("model.user_id_dropout", "-0.5", "model.user_id_dropout"),
    ("train.early_batch_size", "1", "train.early_batch_size"),
    ("train.early_batch_size", "1099511627776", "train.early_batch_size"),
    ("train.early_batch_epochs", "-1", "train.early_batch_epochs"),
    ("train.early_batch_epochs", "1000000000", "train.early_batch_epochs"),
    # [tune]: the search space and the baselines' lists
    ("tune.dim", "[0]", "tune.dim.0"),
    ("tune.dim", "[64, 1000000000]", "tune.dim.1"),
    ("tune.temperature", "[0.2, 0.05]", "tune.temperature"),
    ("tune.temperature", "[0.05, inf]", "tune.temperature.1: must be a finite number"),
    ("tune.lr", "[-1.0]", "tune.lr.0"),
    ("tune.lr", "[0.001, 1000.0]", "tune.lr.1"),
    ("tune.schedule", '["weekly"]', "tune.schedule.0"),
    ("tune.warmup_steps", "[-1]", "tune.warmup_steps.0"),
    ("tune.warmup_steps", "[1000000000000]", "tune.warmup_steps.0"),
    ("tune.batch_size", "[1]", "tune.batch_size.0"),
    ("tune.batch_size", "[1099511627776]", "tune.batch_size.0"),
    ("tune.logq_weight", "[nan]", "tune.logq_weight.0: must be a finite number"),
    ("tune.logq_weight", "[0.0, 1000.0]", "tune.logq_weight.1"),
    ("tune.item_bias", '["x"]', "tune.item_bias.0"),
    ("tune.user_history", "[2]", "tune.user_history.0"),
    ("tune.init", '["pca"]', "tune.init.0"),
    ("tune.epochs", "[0]", "tune.epochs.0"),
    ("tune.epochs", "[1000000000]", "tune.epochs.0"),
    ("tune.sampler_seed", "-1", "tune.sampler_seed"),
    ("tune.sampler_seed", "18446744073709551616", "tune.sampler_seed"),
    ("tune.pruner", '"hyperband"', "tune.pruner"),
    ("tune.prune_after", "-1", "tune.prune_after"),
    ("tune.prune_after", "1000000000", "tune.prune_after"),
    ("tune.startup_trials", "-1", "tune.startup_trials"),
    ("tune.startup_trials", "1000000000", "tune.startup_trials"),
    ("tune.als_factors", "[0]", "tune.als_factors.0"),
    ("tune.als_factors", "[1000000000]", "tune.als_factors.0"),
    ("tune.als_regularization", "[0.0]", "tune.als_regularization.0"),
    ("tune.als_regularization", "[inf]", "tune.als_regularization.0: must be a finite number"),
    ("tune.als_alpha", "[-1.0]", "tune.als_alpha.0"),
    ("tune.als_alpha", "[1e300]", "tune.als_alpha.0"),
    ("tune.als_iterations", "[0]", "tune.als_iterations.0"),
    ("tune.als_iterations", "[1000000000]", "tune.als_iterations.0"),
    ("tune.ease_lambda", "[0.0]", "tune.ease_lambda.0"),
    ("tune.ease_lambda", "[1e300]", "tune.ease_lambda.0"),
    ("tune.ease_max_items", "0", "tune.ease_max_items"),
    ("tune.ease_max_items", "1000000000000", "tune.ease_max_items"),
    # negative-sampling practices (issue 19)
    ("train.corrected_logq", '"maybe"', "train.corrected_logq"),
    ("train.logq_weight", "100.0", "train.logq_weight"),
    ("negatives.hard_margin", "1000.0", "negatives.hard_margin"),
    ("negatives.hard_margin", "nan", "negatives.hard_margin: must be a finite number"),
    ("mining.window_scale", "0", "mining.window_scale"),
    ("mining.window_scale", "1.5", "mining.window_scale"),
    ("mining.source", '"graph"', "mining.source"),
    ("mining.cooccurrence_drop", "1.0", "mining.cooccurrence_drop"),
    ("mining.cooccurrence_drop", "nan", "mining.cooccurrence_drop: must be a finite number"),
    ("mining.patience", "-1", "mining.patience"),
    ("mining.patience", "1000000000", "mining.patience"),
    ("mining.restart_schedule", "3", "mining.restart_schedule"),
    ("mining.lr_scale", "0", "mining.lr_scale"),
    ("mining.lr_scale", "100.0", "mining.lr_scale"),
    # [update] (issue 21)
    ("update.epochs", "0", "update.epochs"),
    ("update.epochs", "1000000", "update.epochs"),
    ("update.replay", "-1.0", "update.replay"),
    ("update.replay", "nan", "update.replay: must be a finite number"),
    ("update.replay_max", "-1", "update.replay_max"),
    ("update.replay_max", "18446744073709551616", "update.replay_max"),
    ("update.lr", "0.0", "update.lr"),
    ("update.lr", "inf", "update.lr: must be a finite number"),
    ("update.count_decay", "1.5", "update.count_decay"),
    ("update.new_rows", '"zeros"', "update.new_rows"),
    ("update.replay_focus", "-0.1", "update.replay_focus"),
    ("update.replay_focus", "1.5", "update.replay_focus"),
    ("update.replay_focus", "nan", "update.replay_focus"),
    ("update.retire_after", "0", "update.retire_after"),
    ("update.retire_after", "2.5", "update.retire_after"),
    ("update.retire_after", "10000000", "update.retire_after"),
    ("update.seed", "-1", "update.seed"),
    ("update.seed", "18446744073709551616", "update.seed"),
]

# [features]: the three lists, and every key of a feature declaration (config.FeatureSpec), each
# given as one declaration in features.item (or context, for derive) with one bad key.
BAD_VALUES += [
    ("features.item", "5", "features.item: Input should be a valid list"),
    ("features.user", '[{name = "x"}]', "features.user.0.kind"),
    ("features.context", '[{name = "x", kind = "text"}]', "context features are categorical or numeric"),
]
BAD_FEATURE_KEYS = [
    ("name", '{name = "a\\u0000b", kind = "numeric"}', "NUL byte"),
    ("name", '{name = "a.b", kind = "numeric"}', "features.item.0.name"),
    ("kind", '{name = "x", kind = "image"}', "features.item.0.kind"),
    ("column", '{name = "x", kind = "numeric", column = ""}', "features.item.0.column"),
    ("missing", '{name = "x", kind = "numeric", missing = "drop"}', "features.item.0.missing"),
    ("separator", '{name = "x", kind = "multi_categorical", separator = ""}', "features.item.0.separator"),
    ("hash_buckets", '{name = "x", kind = "categorical", hash_buckets = 0}', "features.item.0.hash_buckets"),
    ("hash_buckets", '{name = "x", kind = "categorical", hash_buckets = 1000000000000}', "features.item.0.hash_buckets"),
    ("seed", '{name = "x", kind = "categorical", seed = -1}', "features.item.0.seed"),
    ("seed", '{name = "x", kind = "categorical", seed = 18446744073709551616}', "features.item.0.seed"),
    ("min_count", '{name = "x", kind = "categorical", min_count = 0}', "features.item.0.min_count"),
    ("min_count", '{name = "x", kind = "categorical", min_count = 100000000000}', "features.item.0.min_count"),
    ("transform", '{name = "x", kind = "numeric", transform = "sqrt"}', "features.item.0.transform"),
    ("buckets", '{name = "x", kind = "numeric", buckets = 1}', "features.item.0.buckets"),
    ("buckets", '{name = "x", kind = "numeric", buckets = 100000}', "features.item.0.buckets"),
    ("file", '{name = "x", kind = "vector", file = ""}', "features.item.0.file"),
    ("length", '{name = "x", kind = "vector", length = 0}', "features.item.0.length"),
    ("length", '{name = "x", kind = "vector", length = 10000000}', "features.item.0.length"),
    ("freeze", '{name = "x", kind = "vector", freeze = "maybe"}', "features.item.0.freeze"),
    ("word_ngrams", '{name = "x", kind = "text", word_ngrams = 0}', "features.item.0.word_ngrams"),
    ("word_ngrams", '{name = "x", kind = "text", word_ngrams = 99}', "features.item.0.word_ngrams"),
    ("char_ngrams", '{name = "x", kind = "text", char_ngrams = [0]}', "features.item.0.char_ngrams.0"),
    ("char_ngrams", '{name = "x", kind = "text", char_ngrams = [11]}', "features.item.0.char_ngrams.0"),
    ("max_tokens", '{name = "x", kind = "text", max_tokens = 0}', "features.item.0.max_tokens"),
    ("max_tokens", '{name = "x", kind = "text", max_tokens = 1000000000}', "features.item.0.max_tokens"),
    ("lowercase", '{name = "x", kind = "text", lowercase = 3}', "features.item.0.lowercase"),
    ("derive", '{name = "x", kind = "categorical", derive = "month"}', "features.item.0.derive"),
]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Path:
    return tiny_config(tmp_path_factory.mktemp("cfg"))


@pytest.mark.parametrize("key,value,fragment", BAD_VALUES, ids=[f"{k}={v[:20]}" for k, v, _ in BAD_VALUES])
def test_every_field_refuses_a_value_that_cannot_work(cfg, key, value, fragment):
    msg = assert_refused(cli("config", cfg, "--set", f"{key}={value}"), str(cfg), "invalid configuration", fragment)
    assert len(msg.splitlines()) == 2, msg  # one line per bad field


@pytest.mark.parametrize("sets,fragment", BAD_COMBINATIONS, ids=[",".join(s) for s, _ in BAD_COMBINATIONS])
def test_rules_across_fields(cfg, sets, fragment):
    args = [a for s in sets for a in ("--set", s)]
    assert_refused(cli("config", cfg, *args), fragment)


@pytest.mark.parametrize("key,spec,fragment", BAD_FEATURE_KEYS, ids=[f"{k}={v[:30]}" for k, v, _ in BAD_FEATURE_KEYS])
def test_every_key_of_a_feature_declaration_refuses_a_value_that_cannot_work(cfg, key, spec, fragment):
    msg = assert_refused(cli("config", cfg, "--set", f"features.item=[{spec}]"), str(cfg), "invalid configuration", fragment)
    assert len(msg.splitlines()) == 2, msg


def test_every_field_has_a_case_and_every_number_is_bounded():
    """The table above covers every field of every section, and every numeric field (list items
    included) declares a lower and an upper bound: a new field cannot slip in unbounded."""
    from twotower.config import RunConfig

    covered = {k for k, _, _ in BAD_VALUES}
    unbounded, missing = [], []
    for section, field in RunConfig.model_fields.items():
        for key, f in field.annotation.model_fields.items():
            name = f"{section}.{key}"
            if name not in covered:
                missing.append(name)
            kinds = _numeric_parts(f.annotation)
            if not kinds:
                continue
            bounds = {type(m).__name__ for m in f.metadata}
            for a in typing.get_args(f.annotation):  # list items
                if typing.get_origin(a) is typing.Annotated:
                    bounds |= {type(c).__name__ for m in typing.get_args(a)[1:] for c in getattr(m, "metadata", [m])}
            if not ({"Ge", "Gt"} & bounds and {"Le", "Lt"} & bounds):
                unbounded.append(name)
    from twotower.config import FeatureSpec

    keys = {k for k, _, _ in BAD_FEATURE_KEYS}
    for key, f in FeatureSpec.model_fields.items():
        if key not in keys:
            missing.append(f"features.*.{key}")
        if _numeric_parts(f.annotation) and not _bounded(f):
            unbounded.append(f"features.*.{key}")
    assert not missing, missing
    assert not unbounded, unbounded


def _bounded(f) -> bool:
    bounds = {type(m).__name__ for m in f.metadata}
    for a in typing.get_args(f.annotation):  # list items
        if typing.get_origin(a) is typing.Annotated:
            bounds |= {type(c).__name__ for m in typing.get_args(a)[1:] for c in getattr(m, "metadata", [m])}
    return bool({"Ge", "Gt"} & bounds and {"Le", "Lt"} & bounds)


def _numeric_parts(annotation) -> bool:
    if annotation in (int, float):
        return True
    return any(_numeric_parts(a) for a in typing.get_args(annotation) if a is not bool)


def test_several_bad_fields_are_one_message_with_a_line_each(cfg):
    msg = assert_refused(cli("config", cfg, "--set", "model.dim=0", "--set", "train.lr=inf", "--set", "eval.alpha=nan",
                             "--set", "model.mlp=[-4]", "--set", "train.seed=-1"))
    assert len(msg.splitlines()) == 6, msg


def test_train_refuses_bad_config_before_writing(cfg, tmp_path):
    out = tmp_path / "run"
    assert_refused(cli("train", cfg, "--out", out, *FAST, "--set", "train.temperature=inf"), "train.temperature")
    assert_refused(cli("train", cfg, "--out", out, *FAST, "--set", "model.temperature=inf"), "model.temperature")
    assert not out.exists()


@pytest.mark.parametrize("command", ["evaluate", "recommend"])
@pytest.mark.parametrize("alpha", ["nan", "inf", "-inf", "1e300", "x"])
def test_alpha_is_refused_alike_by_evaluate_and_recommend(command, alpha):
    """``evaluate --alpha nan`` used to be accepted while ``recommend --alpha nan`` was refused."""
    args = {"evaluate": ["evaluate", "RUN"], "recommend": ["recommend", "RUN", "--user", "1"]}[command]
    assert_refused(cli(*args, f"--alpha={alpha}"), "--alpha")


def test_evaluate_run_validates_alpha_like_the_config(tmp_path):
    from twotower.api import evaluate_run
    from twotower.errors import ConfigError, TwotowerError

    cfg = tiny_config(tmp_path)
    assert cli("train", cfg, "--out", tmp_path / "run", *FAST)[0] == 0
    with pytest.raises(ConfigError, match="alpha: must be a finite number"):
        evaluate_run(tmp_path / "run", alpha=float("nan"))
    with pytest.raises(TwotowerError, match="less than or equal to 10000"):
        evaluate_run(tmp_path / "run", alpha=1e9)
    assert evaluate_run(tmp_path / "run", alpha=0.5)["recall@20"] >= 0.0


def test_tables_too_large_for_the_machine_are_refused_before_allocating(cfg, tmp_path, monkeypatch):
    """Sizes that depend on the data are checked when the model is built: the estimate of tables,
    gradients, optimizer moments, bank and evaluation block against the machine's memory."""
    import os

    from twotower.config import RunConfig
    from twotower.errors import ConfigError
    from twotower.training.trainer import check_memory, memory_estimate

    c = RunConfig.from_dict({"model": {"dim": 16384}})
    est = memory_estimate(c, 100_000_000, 10_000_000)
    assert est["parameters"] == (110_000_000 * 16384) * 16  # weight, gradient, two Adam moments, float32
    with pytest.raises(ConfigError, match="model.dim = 16384 with 100,000,000 users and 10,000,000 items") as e:
        check_memory(c, 100_000_000, 10_000_000)
    assert "Lower model.dim" in str(e.value)
    with pytest.raises(ConfigError, match="Lower eval.batch_users"):
        check_memory(RunConfig.from_dict({"model": {"dim": 8}, "eval": {"batch_users": 1 << 20}}), 10_000_000, 10_000_000)
    check_memory(RunConfig.from_dict({}), 1000, 1000)  # ordinary sizes pass

    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 64 if name == "SC_PHYS_PAGES" else real(name))  # 256 KiB
    out = tmp_path / "run"
    assert_refused(cli("train", cfg, "--out", out, *FAST, "--set", "model.dim=512"), "model.dim = 512 with 60 users",
                   "this machine has")
    assert not out.exists()


# ---- class 7: deep nesting and bad encodings ----------------------------------------------------------
def _deep_texts() -> dict[str, tuple[str, str]]:
    return {
        "toml_arrays": (".toml", "[data]\nx = " + "[" * DEEP + "]" * DEEP + "\n"),
        "toml_inline_tables": (".toml", "x = " + "{a = " * DEEP + "1" + "}" * DEEP + "\n"),
        "json": (".json", "[" * DEEP + "]" * DEEP),
        "json_objects": (".json", '{"a": ' * DEEP + "1" + "}" * DEEP),
        "yaml_flow": (".yaml", "[" * DEEP + "]" * DEEP),
        "yaml_blocks": (".yaml", "".join(" " * i + "a:\n" for i in range(2000)) + " " * 2000 + "b: 1\n"),
    }


@pytest.mark.parametrize("case", list(_deep_texts()))
@pytest.mark.slow
def test_configs_nested_deeply_are_one_message(tmp_path, case):
    suffix, text = _deep_texts()[case]
    path = tmp_path / f"deep{suffix}"
    path.write_text(text)
    msg = assert_refused(cli("config", path), str(path))
    assert "nested" in msg or "cannot parse" in msg, msg
    assert_refused(cli("train", path, "--out", tmp_path / "run", *FAST))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_a_latin1_byte_in_a_config_names_line_and_column(tmp_path, suffix):
    body = {".toml": b'[data]\ninteractions = "caf\xe9.csv"\n', ".yaml": b"data:\n  interactions: caf\xe9.csv\n",
            ".json": b'{"data": {"interactions": "caf\xe9.csv"}}'}[suffix]
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(body)
    line = 2 if suffix != ".json" else 1
    assert_refused(cli("config", path), f"line {line}, column", "byte 0xe9 is not UTF-8", "Save the config as UTF-8")


@pytest.mark.parametrize("case", ["alias_bomb", "huge_file", "binary", "yaml_bad_date", "json_huge_int", "folder",
                                  "list_at_top", "deep_override", "deep_grid"])
def test_other_hostile_config_files(tmp_path, case):
    path = tmp_path / "c.yaml"
    args = ["config", path]
    if case == "alias_bomb":  # "billion laughs": 9 levels of 9 references
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
        lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
        path.write_text("\n".join(lines) + "\n")
        fragment = "more than 100,000 values"
    elif case == "huge_file":
        path.write_text("# " + "x" * (2 << 20) + "\n")
        fragment = "larger than 1 MiB"
    elif case == "binary":
        path = tmp_path / "c.toml"
        path.write_bytes(b"\x00\x01\x02[[\x00")
        args = ["config", path]
        fragment = "cannot parse"
    elif case == "yaml_bad_date":
        path.write_text("data:\n  seed: 2001-02-30\n")
        fragment = "cannot parse"
    elif case == "json_huge_int":
        path = tmp_path / "c.json"
        path.write_text('{"model": {"dim": ' + "9" * 10_000 + "}}")
        args = ["config", path]
        fragment = "cannot parse"
    elif case == "folder":
        path.mkdir()
        fragment = "config file not found"
    elif case == "list_at_top":
        path.write_text("- 1\n- 2\n")
        fragment = "the top level must be a table"
    elif case == "deep_override":
        path.write_text("model:\n  dim: 8\n")
        args = ["config", path, "--set", "model.dim=" + "[" * DEEP + "]" * DEEP]
        fragment = "nested too deeply"
    else:
        path.write_text("model:\n  dim: 8\n")
        args = ["compare", path, "--out", tmp_path / "rep", "--grid", "model.dim=" + "[" * DEEP + "]" * DEEP]
        fragment = "nested too deeply"
    assert_refused(cli(*args), fragment)


# ---- run-directory files nested deeply or badly encoded --------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(d)
    assert cli("train", cfg, "--out", d / "run", *FAST)[0] == 0
    assert cli("index", d / "run", "--quiet")[0] == 0
    assert cli("embed", d / "run", "--quiet")[0] == 0
    return d


def _rehash(run: Path, name: str) -> None:
    man = json.loads((run / "manifest.json").read_text())
    man["sha256"][name] = hashlib.sha256((run / name).read_bytes()).hexdigest()
    (run / "manifest.json").write_text(json.dumps(man))


@pytest.mark.parametrize("case", ["manifest", "users", "items", "config", "users_latin1", "manifest_list",
                                  "users_not_ids", "index_meta", "parts_manifest", "checkpoint_state", "epoch_line"])
def test_run_files_nested_deeply_or_damaged_are_refused(trained, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    deep = "[" * DEEP + "]" * DEEP
    args = ["recommend", run, "--user", "1"]
    if case in ("manifest", "manifest_list"):
        (run / "manifest.json").write_text(deep if case == "manifest" else "[1, 2]")
        fragment = "manifest.json: corrupted" if case == "manifest" else "not a manifest written by twotower"
    elif case in ("users", "items", "config"):
        name = f"{case}.json"
        (run / name).write_text('{"ids": ' + deep + "}")
        _rehash(run, name)
        fragment = f"{name}: corrupted (nested too deeply"
    elif case == "users_latin1":
        (run / "users.json").write_bytes(b'{"name": "user", "ids": ["caf\xe9"]}')
        _rehash(run, "users.json")
        fragment = "users.json: corrupted (not UTF-8"
    elif case == "users_not_ids":
        (run / "users.json").write_text('{"name": "user", "ids": [[1], {"a": 2}]}')
        _rehash(run, "users.json")
        fragment = "not a vocabulary written by twotower"
    elif case == "index_meta":
        (run / "index" / "index.json").write_text(deep)
        fragment = "index.json: corrupted (nested too deeply"
    elif case == "parts_manifest":
        (run / "embeddings" / "embeddings.json").write_text(deep)
        args = ["index", run, "--from-parts", run / "embeddings", "--out", tmp_path / "ix", "--quiet"]
        fragment = "embeddings.json: corrupted (nested too deeply"
    elif case == "checkpoint_state":
        (run / "checkpoint" / "state.json").write_text(deep)
        args = ["train", trained / "tiny.toml", "--out", run, *FAST, "--resume"]
        fragment = "state.json: corrupted (nested too deeply"
    else:
        from twotower.errors import ArtifactError
        from twotower.run_dir import RunDir

        with open(run / "metrics.jsonl", "a") as f:
            f.write(deep + "\n")
        with pytest.raises(ArtifactError, match="metrics.jsonl: corrupted"):
            RunDir(run).read_epochs()
        return
    assert_refused(cli(*args), fragment)


# ---- command-line values that used to crash later --------------------------------------------------------
@pytest.mark.parametrize("case", ["ivfpq_small_catalog", "ivf_train_size_below_nlist", "embed_cuda_missing",
                                  "embed_device_nonsense", "index_seed_negative", "recommend_k_zero"])
def test_argument_values_that_would_crash_later_are_refused_before_writing(trained, tmp_path, case):
    run = trained / "run"
    out = tmp_path / "out"
    args, fragments = {
        "ivfpq_small_catalog": (["index", run, "--kind", "ivfpq", "--out", out, "--quiet"],
                                ["256 centroids", "40 here", "lower --pq-bits"]),
        "ivf_train_size_below_nlist": (["index", run, "--kind", "ivf", "--nlist", "30", "--train-size", "5", "--out", out,
                                        "--quiet"], ["30 lists on 5 items", "raise --train-size"]),
        "embed_cuda_missing": (["embed", run, "--device", "cuda:7", "--out", out, "--quiet"], ["--device cuda:7", "use cpu"]),
        "embed_device_nonsense": (["embed", run, "--device", "nonsense", "--out", out, "--quiet"], ["not a torch device"]),
        "index_seed_negative": (["index", run, "--seed", "-1", "--out", out], ["--seed", "from 0"]),
        "recommend_k_zero": (["recommend", run, "--user", "1", "-k", "0"], ["-k", "from 1"]),
    }[case]
    if case == "embed_cuda_missing":
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has 8 CUDA devices")
    assert_refused(cli(*args), *fragments)
    assert not out.exists()
