"""The configuration reference: generated from the typed models, complete, and docs/config.md up to date."""
import json
from pathlib import Path

import pytest

from twotower.cli import main
from twotower.config import RunConfig, reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_docs_config_md_is_the_generated_reference():
    committed = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == reference_markdown(), (
        "docs/config.md is stale: regenerate it with `twotower config --reference > docs/config.md`")


def test_every_section_and_key_explains_itself():
    for name, section in RunConfig.model_fields.items():
        assert section.description, f"section {name} has no description"
        assert section.annotation.__doc__, f"section {name} ({section.annotation.__name__}) has no docstring"
        for key, field in section.annotation.model_fields.items():
            assert field.description, f"{name}.{key} has no description= in config.py"


def test_reference_rows_give_type_default_and_bounds():
    ref = reference_markdown()
    for section in RunConfig.model_fields:
        assert f"## [{section}]" in ref
    lines = ref.splitlines()
    row = next(line for line in lines if line.startswith("| `test_fraction` |"))
    assert row.startswith("| `test_fraction` | float | `0.2` | > 0.0, < 1.0 | ")
    row = next(line for line in lines if line.startswith("| `split` |"))
    assert row.startswith('| `split` | "given" or "random" or "temporal" | `"random"` |  | ')
    row = next(line for line in lines if line.startswith("| `grad_clip` |"))
    assert row.startswith("| `grad_clip` | float or none | `null` | > 0.0 | ")
    row = next(line for line in lines if line.startswith("| `ks` |"))
    assert row.startswith("| `ks` | list of int | `[10, 20, 50, 100, 500]` |  | ")
    from twotower.config import FeatureSpec

    # every section's keys, and the keys of a feature declaration (one table under [features])
    n_keys = sum(len(s.annotation.model_fields) for s in RunConfig.model_fields.values()) + len(FeatureSpec.model_fields)
    assert sum(1 for line in lines if line.startswith("| `")) == n_keys


def test_config_command_prints_the_reference_or_a_resolved_config(tmp_path, capsys):
    assert main(["config", "--reference"]) == 0
    assert capsys.readouterr().out == reference_markdown()

    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\ndataset = "synthetic"\n[train]\nepochs = 3\n')
    assert main(["config", str(cfg), "--set", "model.dim=16"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["train"]["epochs"] == 3 and resolved["model"]["dim"] == 16
    assert resolved == RunConfig.load(cfg, ["model.dim=16"]).to_dict()


@pytest.mark.parametrize("args, says", [
    (["--set", "model.dim=0"], "model.dim"),
    (["--set", "train.epoch=3"], "unknown setting"),
])
def test_config_command_refuses_a_bad_value_with_exit_2(tmp_path, capsys, args, says):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\ndataset = "synthetic"\n')
    assert main(["config", str(cfg), *args]) == 2
    assert says in capsys.readouterr().err


def test_config_command_needs_one_thing_to_print(tmp_path, capsys):
    assert main(["config"]) == 2
    assert "--reference" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text("[data]\n")
    assert main(["config", str(cfg), "--reference"]) == 2
    assert "alone" in capsys.readouterr().err
