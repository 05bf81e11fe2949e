"""End to end through the command line on MovieLens 100K, and the bad-input contract
(one clear message, exit code 2, nothing written)."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from twotower.cli import main

FAST = ["--set", "train.epochs=2", "--set", "model.dim=16", "--set", "eval.ks=[10, 20]", "--quiet"]


def _cli(*args, env_data=None):
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory, data_dir):
    """A MovieLens 100K training through the CLI: the tests that use it are marked slow."""
    out = tmp_path_factory.mktemp("runs") / "ml"
    cfg = Path(__file__).resolve().parents[1] / "configs" / "ml-100k.toml"
    assert main(["train", str(cfg), "--out", str(out), "--data-dir", str(data_dir), *FAST]) == 0
    return out


@pytest.mark.slow
def test_train_writes_run_directory(ml_run):
    for name in ["config.json", "users.json", "items.json", "model.safetensors", "metrics.jsonl", "metrics.json",
                 "known.safetensors", "item_embeddings.npy", "checkpoint/last.safetensors", "checkpoint/optimizer.pt"]:
        assert (ml_run / name).is_file(), name
    lines = (ml_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["epoch"] == 1
    m = json.loads((ml_run / "metrics.json").read_text())
    assert 0.0 < m["test"]["recall@20"] <= 1.0 and 0.0 < m["valid"]["recall@20"] <= 1.0
    assert not list(ml_run.glob("**/*.tmp"))


@pytest.mark.slow
def test_evaluate_matches_training_figure(ml_run, data_dir, capsys):
    assert main(["evaluate", str(ml_run), "--data-dir", str(data_dir), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    saved = json.loads((ml_run / "metrics.json").read_text())["test"]
    assert got["recall@20"] == pytest.approx(saved["recall@20"], abs=1e-9)


@pytest.mark.slow
def test_recommend_one_user_shows_titles(ml_run, capsys):
    assert main(["recommend", str(ml_run), "--user", "196", "-k", "5"]) == 0
    out = capsys.readouterr().out
    assert "user 196" in out and "(19" in out  # MovieLens titles carry the year
    assert len([l for l in out.splitlines() if l.strip()[:1].isdigit()]) == 5


@pytest.mark.slow
def test_recommend_all_users_excludes_training_items(ml_run, tmp_path):
    from twotower.run import Run
    out = tmp_path / "recs.parquet"
    assert main(["recommend", str(ml_run), "--all-users", "-k", "10", "--out", str(out)]) == 0
    recs = pd.read_parquet(out)
    assert list(recs.columns) == ["user", "item", "score", "rank"]
    run = Run(ml_run)
    assert recs.user.nunique() == len(run.known.indptr) - 1 or recs.user.nunique() > 900
    seen = {(u, i) for u in recs.user.unique()[:50] for i in run.history_of(u)}
    assert not any((u, i) in seen for u, i in zip(recs.user, recs.item))
    assert (recs.groupby("user")["rank"].max() == 10).all()
    csv = tmp_path / "recs.csv"
    (tmp_path / "users.txt").write_text("196\n1\n")
    assert main(["recommend", str(ml_run), "--users-file", str(tmp_path / "users.txt"), "-k", "3", "--out", str(csv)]) == 0
    assert pd.read_csv(csv).user.tolist() == [196] * 3 + [1] * 3


@pytest.mark.slow
def test_resume_continues_from_checkpoint(ml_run, tmp_path, data_dir):
    import shutil
    run = tmp_path / "resumed"
    shutil.copytree(ml_run, run)
    cfg = json.loads((run / "config.json").read_text())
    # same config (2 epochs, already done): resume finishes without training more epochs
    assert main(["train", str(run / "config.json"), "--out", str(run), "--resume", "--data-dir", str(data_dir), "--quiet"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    # a different config is refused
    assert main(["train", str(run / "config.json"), "--out", str(run), "--resume", "--data-dir", str(data_dir),
                 "--set", "train.epochs=3"]) == 2


@pytest.mark.slow
def test_refuses_to_overwrite_a_run(ml_run, data_dir, capsys):
    cfg = Path(__file__).resolve().parents[1] / "configs" / "ml-100k.toml"
    assert main(["train", str(cfg), "--out", str(ml_run), "--data-dir", str(data_dir)]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("content,expect", [
    ("", "empty"),
    ("user,item\n", "no"),
    ("usr,item\n1,2\n", "user"),
    ("user,item\nabc,2\n1,\n", "line"),
])
def test_bad_interactions_exit_2_and_write_nothing(tmp_path, capsys, content, expect):
    data = tmp_path / "inter.csv"
    data.write_text(content)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[data]\ndataset = "files"\ninteractions = "{data}"\n')
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "inter.csv" in err and expect in err.lower()
    assert not out.exists()


def test_an_item_table_row_without_interactions_is_an_item_of_the_catalog(tmp_path, capsys):
    """Item 99 has a row in the item table and no interaction: it is in the vocabulary, counted 0,
    embedded from its features (the same vector as a new item with those features) and indexed."""
    import numpy as np
    import torch

    from twotower.model.towers import embed_items
    from twotower.run import Run

    (tmp_path / "inter.csv").write_text("user,item\n1,10\n1,11\n2,10\n2,12\n3,11\n3,12\n")
    (tmp_path / "items.csv").write_text("item,genre\n10,a\n11,a\n12,b\n99,b\n")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[data]\ndataset = "files"\ninteractions = "{tmp_path / "inter.csv"}"\nvalid_fraction = 0.0\ntest_fraction = 0.5\n'
                   f'item_features = "{tmp_path / "items.csv"}"\nitem_feature_cols = ["genre"]\n'
                   '[model]\ndim = 4\nitem_features = "all"\nitem_id_dropout = 0.5\n'
                   '[train]\nepochs = 2\nbatch_size = 4\nmonitor = "recall@2"\n[eval]\nks = [2]\n')
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 0
    run = Run(tmp_path / "run")
    j = int(run.items.encode([99])[0])
    assert j >= 0 and run.item_counts[j] == 0
    with torch.no_grad():
        as_new = run.model.item_vectors(run.model.item_inputs([-1], [{"genre": "b"}]))[0]
        torch.testing.assert_close(embed_items(run.model)[j], as_new)
    assert main(["index", str(tmp_path / "run"), "--quiet"]) == 0
    assert "4 items" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(tmp_path / "run" / "item_embeddings.npy")[j], as_new.numpy(), rtol=1e-6)


def test_config_errors_are_clear(tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('[model]\ndimm = 8\n[train]\nmonitor = "auc"\n')
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "model.dimm" in err and "unknown setting" in err and "train.monitor" in err
    assert main(["train", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "run")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_unknown_user_is_a_clear_error(ml_run, capsys):
    assert main(["recommend", str(ml_run), "--user", "no-such-user"]) == 2
    assert "not in this run" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "twotower.cli", "train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--resume" in r.stdout and "examples" in r.stdout


def test_every_command_and_argument_has_help():
    import argparse

    from twotower.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    listed = {c.dest for c in sub._choices_actions}
    missing = []
    for name, parser in sub.choices.items():
        if name not in listed:
            missing.append(f"twotower {name} (no help line in `twotower --help`)")
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"twotower {name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "arguments without a help string: " + ", ".join(missing)


def _help_examples(parser) -> list[tuple[str, str]]:
    """Every ``twotower ...`` line in the help texts of the subcommands (with the subcommand), with
    continuation lines (ending in a backslash) joined."""
    import argparse

    texts = []
    for action in parser._actions:  # argparse keeps its subparsers here; no public accessor exists
        if isinstance(action, argparse._SubParsersAction):
            texts += [(name, (sp.description or "") + "\n" + (sp.epilog or "")) for name, sp in action.choices.items()]
    out = []
    for name, text in texts:
        joined = text.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.strip()
            if line.startswith("twotower "):
                out.append((name, line))
    return out


def test_every_help_example_parses():
    """The examples that --help shows are commands a user will paste: each must get past the
    parser (an earlier `update --help` showed an argument the parser refused)."""
    import shlex

    from twotower.cli import build_parser

    examples = _help_examples(build_parser())
    assert len(examples) >= 20 and any(name == "update" for name, _ in examples)
    for name, line in examples:
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split, lex.commenters = True, "#"
        words = []
        for w in list(lex)[1:]:
            if w in {">", ">>", "<", "|", "||", "&&", ";", "&"}:  # the shell's part of the line
                break
            words.append(w)
        try:
            build_parser().parse_args(words)
        except SystemExit as e:
            raise AssertionError(f"`{line}` from `twotower {name} --help` is refused by the parser") from e
