"""``twotower compare``: train several variants with the same data, seed and budget, and report
them side by side (a Markdown table and PNG plots).

Variants are whole configs, or a grid of ``section.key`` values crossed with each other.
"""
from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import artifacts, locks
from .config import RunConfig, apply_overrides, parse_value, read_config_file
from .errors import ConfigError
from .run_dir import RunDir

TABLE_METRICS = ["recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20", "ndcg@50",
                 "coverage@20", "tail_share@20", "popularity@20"]
BUCKETS = ["head", "torso", "tail"]
# a cold split's warm and cold columns, shown when a variant has them
COLD_METRICS = ["warm_items/recall@20", "cold_items/recall@20", "cold_items/ndcg@20",
                "warm_users/recall@20", "cold_users/recall@20", "cold_users/ndcg@20"]
MAX_VARIANTS = 1000


@dataclass
class Variant:
    name: str
    config: dict[str, Any]


@dataclass
class VariantResult:
    name: str
    valid: dict[str, float]
    test: dict[str, float]
    seconds_per_epoch: float
    curve: list[tuple[int, float]] = field(default_factory=list)
    # What the baseline check reads (``below_baseline``): the monitored metric, whether the variant is
    # itself an in-batch + logQ baseline, its batch size, and its config with the negative-sampling
    # recipe taken out (``recipe_free``), so that a recipe is held to the baseline it was added to.
    monitor: str = "recall@20"
    baseline: bool = False
    batch_size: int = 0
    recipe_free: str = ""


# The keys of a negative-sampling recipe: the negatives and mining sections, and the logQ correction's
# form. A variant that leaves all of them at their defaults (logQ on) is an in-batch + logQ baseline.
_RECIPE_TRAIN_KEYS = ("logq", "logq_weight", "correct_positive", "logq_form", "corrected_logq", "frequency",
                      "streaming_lr", "streaming_buckets", "mask_user_history")


def recipe_free(cfg: RunConfig) -> dict[str, Any]:
    """``cfg`` with every recipe key at its default: what the same run is without its recipe."""
    d = cfg.to_dict()
    defaults = RunConfig().to_dict()
    d["negatives"], d["mining"] = defaults["negatives"], defaults["mining"]
    for k in _RECIPE_TRAIN_KEYS:
        d["train"][k] = defaults["train"][k]
    return d


def is_baseline(cfg: RunConfig) -> bool:
    """In-batch softmax with the count-based logQ correction and no other negative source."""
    return recipe_free(cfg) == cfg.to_dict()


def below_baseline(results: list[VariantResult]) -> list[str]:
    """One warning per variant whose validation result is below the in-batch + logQ baseline of the
    same comparison: the baseline with the same config less the recipe if there is one, else the best
    baseline of the same batch size, else the best baseline. Nothing without a baseline."""
    bases = [r for r in results if r.baseline]
    out = []
    for r in results:
        if r.baseline or not bases:
            continue
        same = [b for b in bases if b.recipe_free == r.recipe_free] or [b for b in bases if b.batch_size == r.batch_size] \
            or bases
        m = r.monitor
        base = max(same, key=lambda b: b.valid.get(m, float("-inf")))
        mine, theirs = r.valid.get(m), base.valid.get(m)
        if mine is not None and theirs is not None and mine < theirs:
            out.append(f"{r.name}: validation {m} {mine:.4f} is below the in-batch + logQ baseline "
                       f"{base.name} ({theirs:.4f}, {100 * (mine / theirs - 1):+.1f} %)")
    return out


def _format_value(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def expand_grid(base: dict[str, Any], grid: dict[str, list], prefix: str = "") -> list[Variant]:
    """One variant per point of the cartesian product of ``grid`` (``section.key`` -> values),
    each applied to a copy of ``base``; named ``key=value,key=value``."""
    if not grid:
        return [Variant(prefix or "base", json.loads(json.dumps(base)))]
    for key, values in grid.items():
        if "." not in key or not isinstance(values, list) or not values:
            raise ConfigError(f"grid: {key!r} must be 'section.key' with a non-empty list of values")
    keys = list(grid)
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        cfg = json.loads(json.dumps(base))
        apply_overrides(cfg, [f"{k}={json.dumps(v)}" for k, v in zip(keys, combo)])
        name = ",".join(f"{k.split('.')[-1]}={_format_value(v)}" for k, v in zip(keys, combo))
        out.append(Variant(f"{prefix}{name}", cfg))
    return out


def named_variants(base: dict[str, Any], table: dict[str, Any], prefix: str = "") -> list[Variant]:
    """One variant per entry of a ``[variants]`` table: ``name -> {"section.key": value, ...}``,
    each applied to a copy of ``base`` (an empty table is the base itself). Recipes that are not a
    cartesian product (in-batch only; + mixed negatives; + memory bank; ...) are written this way."""
    out = []
    for name, changes in table.items():
        if not isinstance(changes, dict) or any("." not in k for k in changes):
            raise ConfigError(f"[variants.{name}] must be a table of \"section.key\" = value overrides, "
                              f"e.g. [variants.mixed] \"negatives.sampled\" = 1024")
        cfg = json.loads(json.dumps(base))
        apply_overrides(cfg, [f"{k}={json.dumps(v)}" for k, v in changes.items()])
        out.append(Variant(f"{prefix}{name}", cfg))
    return out


def load_variants(paths: list[str | Path], overrides: list[str], grid_flags: list[str]) -> list[Variant]:
    """Variants from config files (each may carry a ``[grid]`` table, or a ``[variants]`` table of
    named override sets, crossed with the grid) and ``--grid key=[...]`` flags."""
    extra_grid: dict[str, list] = {}
    for flag in grid_flags:
        key, sep, raw = flag.partition("=")
        values = parse_value(raw, f"--grid {key}") if sep else None
        if not isinstance(values, list):
            raise ConfigError(f"--grid {flag!r}: expected section.key=[v1, v2, ...], e.g. --grid 'model.temperature=[0.05, 0.1]'")
        extra_grid[key.strip()] = values
    variants: list[Variant] = []
    for p in paths:
        p = Path(p)
        d = read_config_file(p)
        for table_name in ("grid", "variants"):
            if not isinstance(d.get(table_name, {}), dict):
                raise ConfigError(f"{p}: [{table_name}] must be a table, e.g. [grid] \"model.temperature\" = [0.05, 0.1]")
        grid = {**d.pop("grid", {}), **extra_grid}
        n_grid = 1
        for key, values in grid.items():
            n_grid *= len(values) if isinstance(values, list) else 1
        if n_grid > MAX_VARIANTS:
            raise ConfigError(f"{p}: the grid crosses into {n_grid:,} variants, more than {MAX_VARIANTS:,} trainings; "
                              "cross fewer values")
        table = d.pop("variants", None)
        apply_overrides(d, list(overrides))
        prefix = f"{p.stem}:" if len(paths) > 1 else ""
        bases = named_variants(d, table) if table else [Variant("", d)]
        expanded = []
        for b in bases:
            for v in expand_grid(b.config, grid):
                parts = [x for x in (b.name, v.name if grid else "") if x]
                expanded.append(Variant(prefix + ",".join(parts) if parts else (prefix or "base"), v.config))
        for v in expanded:
            RunConfig.from_dict(v.config, source=f"{p} ({v.name})")  # validate every variant before training any
            variants.append(v)
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"variant names are not unique: {names}; give the configs different file names")
    return variants


def run_comparison(variants: list[Variant], out: Path, data_dir=None, quiet: bool = True, log=print,
                   resume: bool = False, only: list[str] | None = None) -> list[VariantResult]:
    """Train each variant (its own run directory under ``out/runs``) and collect its figures.

    ``resume``: a variant whose run directory already finished with the same config is read back,
    not retrained; one left unfinished (or trained with another config) is trained again.
    ``only``: train only the variants whose names match one of these shell patterns; the others are
    read back where they finished before (as with ``resume``) and left out of the report otherwise,
    so that a long comparison can be trained a few variants at a time."""
    with locks.exclusive(out, "twotower compare"):  # one comparison per report folder at a time
        return _run_comparison(variants, out, data_dir, quiet, log, resume, only)


def _run_comparison(variants: list[Variant], out: Path, data_dir, quiet: bool, log, resume: bool,
                    only: list[str] | None) -> list[VariantResult]:
    import fnmatch

    from .api import train
    from .data.sources import load_dataset

    out.mkdir(parents=True, exist_ok=True)
    _warned: set[str] = set()
    datasets: dict[str, Any] = {}
    results = []
    for k, v in enumerate(variants, 1):
        cfg = RunConfig.from_dict(v.config)
        key = json.dumps([cfg.data.model_dump(mode="json"), cfg.features.model_dump(mode="json")], sort_keys=True)
        if key not in datasets:  # variants that share the data and feature declarations share one loaded dataset
            datasets[key] = load_dataset(cfg, data_dir)
        safe = "".join(c if c.isalnum() or c in "=.,-_" else "_" for c in v.name)
        run_dir = out / "runs" / safe
        selected = only is None or any(fnmatch.fnmatchcase(v.name, p) for p in only)
        done = RunDir(run_dir).finished_metrics(cfg) if resume or not selected else None
        mon = f"valid/{cfg.train.monitor}"
        if done is None and not selected:
            log(f"[{k}/{len(variants)}] {v.name} (not selected by --only and not finished before: left out)")
            continue
        if done is not None:
            log(f"[{k}/{len(variants)}] {v.name} (finished before: read back)")
            hist = RunDir(run_dir).read_epochs()
            valid, test = done.get("valid") or {}, done.get("test") or {}
        else:
            log(f"[{k}/{len(variants)}] {v.name}")
            if resume and run_dir.exists():
                shutil.rmtree(run_dir)  # unfinished or another config: our own output, trained again
            res = train(cfg, run_dir, dataset=datasets[key], quiet=quiet, log=(lambda m: None) if quiet else log)
            hist = res.trainer.state.history if not cfg.train.refit else RunDir(run_dir).read_epochs()
            valid, test = res.valid, res.test or {}
        results.append(VariantResult(
            v.name, valid, test,
            float(sum(r["seconds"] for r in hist) / max(len(hist), 1)),
            [(r["epoch"], r[mon]) for r in hist if mon in r],
            monitor=cfg.train.monitor, baseline=is_baseline(cfg), batch_size=cfg.train.batch_size,
            recipe_free=json.dumps(recipe_free(cfg), sort_keys=True)))
        for w in below_baseline(results):  # as soon as a variant and its baseline are both in
            if w not in _warned:
                log(f"warning: {w}")
                _warned.add(w)
    return results


def finished_result(path: str | Path) -> VariantResult:
    """A finished run or baseline folder (``twotower baseline``) read back as a row of the report,
    named after its folder (a baseline: ``name (method)``); its figures are its ``metrics.json``."""
    d = RunDir(path)
    d.check_is_dir()
    d.verify()
    m = d.read_metrics()
    name = Path(path).name + (f" ({m['baseline']})" if m.get("baseline") else "")
    hist = d.read_epochs()
    mon = f"valid/{d.read_config().train.monitor}"
    per_epoch = float(sum(r["seconds"] for r in hist) / len(hist)) if hist else float("nan")
    return VariantResult(name, m.get("valid") or {}, m.get("test") or {}, per_epoch,
                         [(r["epoch"], r[mon]) for r in hist if mon in r])


def report_markdown(results: list[VariantResult]) -> str:
    # Columns no variant measured (eval.ks without that cut-off) are left out, not shown as nan.
    metrics = [m for m in TABLE_METRICS + COLD_METRICS if any(m in r.test for r in results)]
    head = ["variant", *metrics, *(f"recall@20/{b}" for b in BUCKETS), "valid recall@20", "s/epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = {m: max((r.test.get(m, float("-inf")) for r in results), default=None) for m in metrics}
    for r in results:
        cells = [r.name]
        for m in metrics:
            val = r.test.get(m, float("nan"))
            s = f"{val:.4f}" if m != "popularity@20" else f"{val:.1f}"
            # the best recall / NDCG of each column in bold, a group's (cold_items/recall@20) too
            cells.append(f"**{s}**" if m.split("/")[-1].startswith(("recall", "ndcg")) and val == best[m] else s)
        cells += [f"{r.test.get(f'recall@20/{b}', float('nan')):.4f}" for b in BUCKETS]
        cells += [f"{r.valid.get('recall@20', float('nan')):.4f}", f"{r.seconds_per_epoch:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(results: list[VariantResult], out: Path, title: str = "Comparison") -> list[Path]:
    """``report.md``, ``results.json`` and three PNG figures in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r.name for r in results]
    files = []
    x = np.arange(len(results))

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(results) + 2), 4.5))
    width = 0.25
    for j, m in enumerate(["recall@20", "ndcg@20", "recall@50"]):
        ax.bar(x + (j - 1) * width, [r.test.get(m, 0) for r in results], width, label=m)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("test metric")
    ax.set_title(f"{title}: test metrics by variant")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    files.append(out / "metrics_by_variant.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(results) + 2), 4.5))
    width = 0.8 / len(results)
    for j, r in enumerate(results):
        ax.bar(np.arange(3) + (j - (len(results) - 1) / 2) * width,
               [r.test.get(f"recall@20/{b}", 0) for b in BUCKETS], width, label=r.name)
    ax.set_xticks(np.arange(3), ["head (top 20 %)", "torso (next 30 %)", "tail (last 50 %)"])
    ax.set_ylabel("test Recall@20 of held-out items in the bucket")
    ax.set_title(f"{title}: recall by item popularity")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    files.append(out / "recall_by_popularity.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r.curve:
            ep, val = zip(*r.curve)
            ax.plot(ep, val, marker="o", ms=3, label=r.name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Recall@20")
    ax.set_title(f"{title}: validation curves")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(out / "validation_curves.png")
    fig.savefig(files[-1], dpi=120)
    plt.close(fig)

    warnings = below_baseline(results)
    md = [f"# {title}", "", "Test metrics of each variant's best-on-validation model (same data, seed and budget).", "",
          report_markdown(results), ""]
    if warnings:
        md += ["**Warning: below the in-batch + logQ baseline on validation.** These variants' validation result "
               "is lower than the baseline's of this comparison (in-batch softmax with the count-based logQ "
               "correction, the same config less the recipe where the comparison has it):", "",
               *(f"- {w}" for w in warnings), ""]
    md += ["![metrics](metrics_by_variant.png)", "", "![recall by popularity](recall_by_popularity.png)", "",
           "![validation curves](validation_curves.png)", ""]
    artifacts.write_text(out / "report.md", "\n".join(md))
    artifacts.write_json(out / "results.json", [r.__dict__ for r in results])
    return [out / "report.md", out / "results.json", *files]
