"""`twotower compare`: grid expansion, validation of every variant, and a real report."""
import json

import pytest

from twotower.cli import main
from twotower.errors import ConfigError
from twotower.compare import VariantResult, expand_grid, load_variants, report_markdown


def test_expand_grid_crosses_values():
    vs = expand_grid({"model": {"dim": 8}}, {"model.temperature": [0.05, 0.1], "train.logq": [True, False]})
    assert [v.name for v in vs] == ["temperature=0.05,logq=true", "temperature=0.05,logq=false",
                                    "temperature=0.1,logq=true", "temperature=0.1,logq=false"]
    assert vs[1].config == {"model": {"dim": 8, "temperature": 0.05}, "train": {"logq": False}}


def test_bad_variant_is_refused_before_training(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\ndataset = "synthetic"\n[grid]\n"model.temperature" = [0.1, -1.0]\n')
    with pytest.raises(ConfigError, match="temperature"):
        load_variants([cfg], [], [])
    with pytest.raises(ConfigError, match="--grid"):
        load_variants([cfg], [], ["model.dim=8"])


@pytest.mark.slow
def test_compare_writes_table_and_plots(tmp_path, capsys):
    cfg = tmp_path / "syn.toml"
    cfg.write_text('[data]\ndataset = "synthetic"\nsynthetic_users = 400\nsynthetic_items = 200\n'
                   '[model]\ndim = 8\n[train]\nepochs = 2\nbatch_size = 256\nlr = 0.01\n[eval]\nks = [10, 20, 50]\n')
    out = tmp_path / "report"
    assert main(["compare", str(cfg), "--grid", "train.logq=[true, false]", "--out", str(out), "--quiet"]) == 0
    md = (out / "report.md").read_text()
    assert "logq=true" in md and "logq=false" in md and "recall@20/tail" in md
    for png in ("metrics_by_variant.png", "recall_by_popularity.png", "validation_curves.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    res = json.loads((out / "results.json").read_text())
    assert len(res) == 2 and all(len(r["curve"]) == 2 for r in res)
    assert res[0]["test"]["recall@20"] != res[1]["test"]["recall@20"]


def test_variants_table_names_recipes_and_crosses_the_grid(tmp_path):
    cfg = tmp_path / "recipes.toml"
    cfg.write_text('[data]\ndataset = "synthetic"\n[model]\ndim = 8\n'
                   '[variants.in-batch]\n'
                   '[variants.mixed]\n"negatives.sampled" = 64\n"negatives.proposal" = "uniform"\n'
                   '[variants.no-logq]\n"train.logq" = false\n')
    vs = load_variants([cfg], ["model.dim=16"], [])
    assert [v.name for v in vs] == ["in-batch", "mixed", "no-logq"]
    assert vs[0].config["model"]["dim"] == 16 and "negatives" not in vs[0].config
    assert vs[1].config["negatives"] == {"sampled": 64, "proposal": "uniform"}
    assert vs[2].config["train"]["logq"] is False
    crossed = load_variants([cfg], [], ["model.temperature=[0.05, 0.1]"])
    assert [v.name for v in crossed][:2] == ["in-batch,temperature=0.05", "in-batch,temperature=0.1"]
    assert len(crossed) == 6
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\ndataset = "synthetic"\n[variants]\nmixed = 3\n')
    with pytest.raises(ConfigError, match=r"\[variants.mixed\]"):
        load_variants([bad], [], [])
    typo = tmp_path / "typo.toml"
    typo.write_text('[data]\ndataset = "synthetic"\n[variants.x]\n"negatives.sampeld" = 3\n')
    with pytest.raises(ConfigError, match="sampeld"):
        load_variants([typo], [], [])


def test_resume_reads_back_finished_variants_and_retrains_changed_ones(tmp_path, capsys):
    cfg = tmp_path / "syn.toml"
    body = ('[data]\ndataset = "synthetic"\nsynthetic_users = 200\nsynthetic_items = 100\n'
            '[model]\ndim = 8\n[train]\nepochs = 1\nbatch_size = 128\n[eval]\nks = [10, 20, 50]\n')
    cfg.write_text(body + '[variants.a]\n[variants.b]\n"train.logq" = false\n')
    out = tmp_path / "report"
    assert main(["compare", str(cfg), "--out", str(out), "--quiet"]) == 0
    first = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    # b changes; c is new; a is unchanged and must not be retrained
    cfg.write_text(body + '[variants.a]\n[variants.b]\n"train.logq" = false\n"model.dim" = 4\n[variants.c]\n"model.dim" = 16\n')
    assert main(["compare", str(cfg), "--out", str(out), "--quiet", "--resume"]) == 0
    log = capsys.readouterr().out
    assert "a (finished before: read back)" in log
    assert "b (finished before" not in log and "c (finished before" not in log
    second = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in second] == ["a", "b", "c"]
    assert second[0]["test"] == first[0]["test"]
    assert json.loads((out / "runs" / "b" / "config.json").read_text())["model"]["dim"] == 4


def test_report_leaves_out_cut_offs_no_variant_measured():
    r = VariantResult("a", {"recall@20": 0.2}, {"recall@20": 0.15, "ndcg@20": 0.1, "recall@20/head": 0.3}, 1.5, [])
    table = report_markdown([r])
    header = table.splitlines()[0]
    assert "recall@10" not in header and "recall@50" not in header
    assert "| recall@20 | ndcg@20 |" in header
    assert "nan" not in table.splitlines()[2].split("|")[1:3]
    assert "**0.1500**" in table


def test_report_adds_the_warm_and_cold_columns_of_a_cold_split():
    plain = VariantResult("ids", {"recall@20": 0.2}, {"recall@20": 0.15, "warm_items/recall@20": 0.3,
                                                      "cold_items/recall@20": 0.0, "cold_items/ndcg@20": 0.0}, 1.0, [])
    feats = VariantResult("features", {"recall@20": 0.2}, {"recall@20": 0.14, "warm_items/recall@20": 0.25,
                                                           "cold_items/recall@20": 0.07, "cold_items/ndcg@20": 0.06}, 1.0, [])
    table = report_markdown([plain, feats])
    header = [c.strip() for c in table.splitlines()[0].split("|")]
    assert {"warm_items/recall@20", "cold_items/recall@20", "cold_items/ndcg@20"} <= set(header)
    assert "cold_users/recall@20" not in header  # no variant has a cold-user split
    row = [c.strip() for c in table.splitlines()[3].split("|")]
    assert row[header.index("cold_items/recall@20")] == "**0.0700**"
    assert row[header.index("warm_items/recall@20")] == "0.2500"


def test_a_variant_below_its_in_batch_logq_baseline_is_warned_about():
    from twotower.compare import below_baseline, is_baseline, recipe_free
    from twotower.config import RunConfig

    base = RunConfig.from_dict({"train": {"batch_size": 256}})
    assert is_baseline(base) and is_baseline(RunConfig.from_dict({"model": {"item_bias": True}}))
    bank = RunConfig.from_dict({"train": {"batch_size": 256}, "negatives": {"bank_size": 64}})
    corrected = RunConfig.from_dict({"train": {"batch_size": 256, "corrected_logq": True}})
    assert not is_baseline(bank) and not is_baseline(corrected) and not is_baseline(RunConfig.from_dict({"train": {"logq": False}}))
    assert recipe_free(bank) == base.to_dict()

    def res(name, cfg, valid):
        return VariantResult(name, {"recall@20": valid}, {}, 1.0, [], baseline=is_baseline(cfg),
                             batch_size=cfg.train.batch_size, recipe_free=json.dumps(recipe_free(cfg), sort_keys=True))

    big = RunConfig.from_dict({"train": {"batch_size": 4096}})
    results = [res("inbatch-256", base, 0.20), res("inbatch-4096", big, 0.25), res("bank-256", bank, 0.19),
               res("corrected", corrected, 0.21)]
    # the bank is held to the baseline it was added to (batch 256), not to the larger batch
    assert below_baseline(results) == ["bank-256: validation recall@20 0.1900 is below the in-batch + logQ baseline "
                                       "inbatch-256 (0.2000, -5.0 %)"]
    assert below_baseline(results[2:]) == []                  # no baseline in the comparison: nothing to say


def test_compare_only_trains_the_selected_variants_and_reports_the_warning(tmp_path, capsys):
    cfg = tmp_path / "syn.toml"
    cfg.write_text('[data]\ndataset = "synthetic"\nsynthetic_users = 200\nsynthetic_items = 100\n'
                   '[model]\ndim = 8\n[train]\nepochs = 1\nbatch_size = 128\n[eval]\nks = [20]\n'
                   '[variants.logq]\n[variants.awful]\n"negatives.hard" = "category"\n"negatives.hard_k" = 4\n'
                   '"negatives.hard_weight" = 1000.0\n"model.item_features" = "all"\n')
    out = tmp_path / "report"
    assert main(["compare", str(cfg), "--out", str(out), "--quiet", "--only", "aw*"]) == 0
    log = capsys.readouterr().out
    assert "logq (not selected by --only and not finished before: left out)" in log
    assert [r["name"] for r in json.loads((out / "results.json").read_text())] == ["awful"]
    assert main(["compare", str(cfg), "--out", str(out), "--quiet", "--only", "logq"]) == 0
    log = capsys.readouterr().out
    assert "awful (finished before: read back)" in log
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res] == ["logq", "awful"] and res[0]["baseline"] and not res[1]["baseline"]
    awful, logq = res[1]["valid"]["recall@20"], res[0]["valid"]["recall@20"]
    md = (out / "report.md").read_text()
    assert awful < logq  # a thousandfold weight on four same-category items per row: the synthetic data's categories
    assert "warning: awful: validation recall@20" in log and "below the in-batch + logQ baseline" in md
