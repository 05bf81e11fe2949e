"""Cold-start items on MovieLens 100K: twotower (ids only; with features; with features and id
dropout) beside LightFM and popularity, on one cold-item split, every method's settings chosen on
validation and test scored once.

    flock /tmp/twotower-heavy.lock .venv/bin/python benchmarks/cold_start.py [--config configs/ml-100k-cold.toml]

1. The split: the config's (``data.cold_items = 0.2``: 20 % of the items with ratings withheld from
   training, seeded; a ``valid_fraction`` share of them are the cold validation items, the rest the
   cold test items; the warm interactions split as usual). Every method ranks every item for every
   user with held-out items, known items (training, and validation for test) masked; metrics per
   group of held-out pairs (docs/features.md, "Cold start"): warm_items/ and cold_items/.
2. twotower: the config as it is ("with features + id dropout"), without id dropout ("with
   features"), and without any feature ("ids only"); each over a small grid, the best on validation
   (cold-item Recall@20; ids only: warm Recall@20, it cannot place a cold item) kept, early stopping
   on the same figure.
3. LightFM (WARP loss) in its own virtual environment, ``benchmarks/.lightfm-venv`` (made once:
   NumPy, SciPy, Cython and setuptools first, then ``lightfm`` built without build isolation,
   since its setup fails under the isolated new setuptools), with the same item and user features
   (the config's categorical features, one column per value, rows normalised; identity features
   for every entity, for none, or only for the entities with training interactions, so that a cold
   item is its features alone); a grid of sizes, regularisation, identity features and epochs,
   chosen on validation cold-item Recall@20 (``benchmarks/lightfm_worker.py``).
4. Popularity: training counts (a withheld item has none, so it never reaches a top 20), and
   feature popularity, each item scored by the mean training count of the items that share its
   feature values (the non-personalised baseline that can place a new item).

Writes ``benchmarks/results/cold-start.json`` (another config: ``cold-start-<config name>.json``)
and the table between the ``cold-start`` markers of ``docs/features.md`` (not with ``--no-docs``).
Training seconds are wall-clock on a shared two-core machine (one thread), indicative only.

With every kind of feature ML-100K has (titles as text, the release year and age as numbers, the
hashed zip code, the hour and weekday as context): ``--config configs/ml-100k-cold-features.toml``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / ".lightfm-venv"
LIGHTFM = "lightfm==1.17"
K = 20


def ensure_venv() -> Path:
    py = VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import lightfm"], capture_output=True).returncode == 0:
        return py
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["numpy", "scipy", "setuptools", "wheel", "cython"], check=True)
    subprocess.run(pip + ["--no-build-isolation", LIGHTFM], check=True)
    return py


# ---- the protocol's metrics from top lists (the evaluator's definitions, checked against it) ------
def metrics_from_top(top: np.ndarray, users: np.ndarray, truth, groups: dict, ks=(K,)) -> dict:
    """Recall@K and NDCG@K over every user of ``users`` and per group (``name -> ("item" or
    "user", mask)``), from each user's ranked items ``top [U, >= max(ks)]`` (known items already
    left out); ``truth`` a per-user CSR of held-out items."""
    from twotower.evaluation import metrics as M
    from twotower.evaluation.evaluator import group_pairs

    n_items = int(max(truth.indices.max(initial=0), top.max(initial=0))) + 1
    keys = np.sort(np.repeat(np.arange(truth.n_rows), truth.lengths()) * n_items + truth.indices)
    t = torch.from_numpy(top)
    flat = users[:, None] * n_items + top
    hits = torch.from_numpy(np.isin(flat, keys))
    out = {}
    n_rel = torch.from_numpy(truth.lengths()[users])
    for k in ks:
        out[f"recall@{k}"] = float(M.recall_at_k(hits, n_rel, k).mean())
        out[f"ndcg@{k}"] = float(M.ndcg_at_k(hits, n_rel, k).mean())
    for name, (axis, member) in groups.items():
        g_hits, g_rel = group_pairs(truth, users, t, hits, axis, np.asarray(member))
        rows = g_rel > 0
        for k in ks:
            out[f"{name}/recall@{k}"] = float(M.recall_at_k(g_hits[rows], g_rel[rows], k).mean())
            out[f"{name}/ndcg@{k}"] = float(M.ndcg_at_k(g_hits[rows], g_rel[rows], k).mean())
        out[f"{name}/users"] = float(rows.sum())
    return out


def protocol(ds, split: str):
    """``(users, truth CSR, known CSR)`` of ``split`` ('valid' or 'test')."""
    truth = (ds.valid if split == "valid" else ds.test).csr(ds.n_users)
    known = ds.history("train" if split == "valid" else "valid")
    return np.flatnonzero(truth.lengths() > 0), truth, known


def ranked(scores: np.ndarray, users: np.ndarray, known, k: int) -> np.ndarray:
    """Top ``k`` items of each user by ``scores`` (``[n_items]`` shared, or ``[U, n_items]``), known masked;
    ties go to the lower index."""
    s = np.array(np.broadcast_to(scores, (len(users), scores.shape[-1])), dtype=np.float64)
    vals, _ = known.gather(users)
    s[np.repeat(np.arange(len(users)), known.lengths()[users]), vals] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")
    return order[:, :k]


# ---- twotower --------------------------------------------------------------------------------------
def run_twotower(base: dict, grid: list[dict], select: str, ds, log) -> dict:
    from twotower import RunConfig, train
    from twotower.config import apply_overrides
    from twotower.evaluation.evaluator import evaluate

    best = None
    tried = []
    for point in grid:
        d = json.loads(json.dumps(base))
        apply_overrides(d, [f"{k}={json.dumps(v)}" for k, v in point.items()])
        cfg = RunConfig.from_dict(d)
        res = train(cfg, None, dataset=ds, quiet=True, evaluate_test=False, log=lambda m: None)
        seconds = float(sum(r["seconds"] for r in res.trainer.state.history))
        tried.append({"settings": point, "valid": {k: res.valid[k] for k in res.valid if "@20" in k and "/" in k},
                      "epochs": res.trainer.state.best_epoch, "train_seconds": seconds})
        log(f"  {point}: valid {select} {res.valid[select]:.4f} (epoch {res.trainer.state.best_epoch}, {seconds:.0f}s)")
        if best is None or res.valid[select] > best[0]:
            best = (res.valid[select], point, res, cfg, seconds)
    _, point, res, cfg, seconds = best
    test = evaluate(res.model, ds, "test", cfg.eval, cfg.model.history_length)  # once, for the chosen settings
    return {"chosen": point, "select": select, "tried": tried, "train_seconds": seconds,
            "best_epoch": res.trainer.state.best_epoch, "test": test, "model": res.model, "config": cfg}


def check_against_evaluator(out: dict, ds, groups: dict) -> float:
    """The benchmark's metric code on the chosen twotower model's own top lists must give the
    evaluator's figures (the same protocol for every method)."""
    from twotower.evaluation.evaluator import heldout_context
    from twotower.evaluation.ranking import top_k_blocks
    from twotower.model.towers import embed_items

    model, cfg = out["model"], out["config"]
    new_items, new_users = model.new_entities(ds)
    users, truth, known = protocol(ds, "test")
    context = heldout_context(model, ds.test, known.n_rows)  # each user's first test interaction's, as the evaluator's
    tops = [top.numpy() for _, _, top in top_k_blocks(model, users, known, known, K, cfg.model.history_length, 1024,
                                                       embed_items(model, new=new_items), context=context,
                                                       new_users=new_users)]
    mine = metrics_from_top(np.concatenate(tops), users, truth, groups)
    return max(abs(mine[key] - out["test"][key]) for key in mine if key in out["test"])


# ---- LightFM and popularity ------------------------------------------------------------------------
def feature_columns(features, fit: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Every feature of a table as sparse columns: ``(rows, cols, names)`` per feature, columns
    numbered within it. Categorical kinds: a column per value. Numeric: a column per decile bucket
    of the ``fit`` entities' values (entities with training interactions) and one for missing.
    Text: a column per lower-cased word seen on a ``fit`` entity. A vector feature is left out
    (LightFM takes sparse indicator features; ML-100K has none)."""
    out = []
    if features is None:
        return out
    dense = getattr(features, "dense", {})
    for name in features.names:
        if name in features.rows:
            csr = features.rows[name]
            out.append((np.repeat(np.arange(csr.n_rows), csr.lengths()), csr.indices, len(features.values[name]), name))
        elif name in dense and np.asarray(dense[name]).ndim == 1 and np.asarray(dense[name]).dtype != object:
            x = np.asarray(dense[name], dtype=np.float64)
            ok = np.isfinite(x)
            edges = np.unique(np.quantile(x[ok & fit], np.linspace(0.1, 0.9, 9))) if (ok & fit).any() else np.empty(0)
            col = np.where(ok, np.searchsorted(edges, np.where(ok, x, 0.0), side="right"), len(edges) + 1)
            out.append((np.arange(len(x)), col, len(edges) + 2, name))
        elif name in dense and np.asarray(dense[name]).dtype == object:
            words = [str(t).lower().split() if t is not None else [] for t in dense[name]]
            vocab = {}
            for i in np.flatnonzero(fit):
                for w in words[i]:
                    vocab.setdefault(w, len(vocab))
            pairs = sorted({(i, vocab[w]) for i, ws in enumerate(words) for w in ws if w in vocab})
            rows = np.array([p[0] for p in pairs], dtype=np.int64)
            cols = np.array([p[1] for p in pairs], dtype=np.int64)
            out.append((rows, cols, len(vocab), name))
    return out


def feature_csr(features, n: int, fit: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Every feature of a table (``feature_columns``) as one entity-by-column CSR (features in
    separate column ranges)."""
    indptr, width = np.zeros(n + 1, np.int64), 0
    rows_all, cols_all = [], []
    for rows, cols, w, _ in feature_columns(features, fit):
        rows_all.append(rows)
        cols_all.append(cols + width)
        width += w
    if not rows_all:
        return indptr, np.empty(0, np.int64), 0
    rows, cols = np.concatenate(rows_all), np.concatenate(cols_all)
    order = np.lexsort((cols, rows))
    np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
    return indptr, cols[order], width


def trained(ds) -> tuple[np.ndarray, np.ndarray]:
    """Items and users with training interactions (bool)."""
    return np.bincount(ds.train.items, minlength=ds.n_items) > 0, np.bincount(ds.train.users, minlength=ds.n_users) > 0


def run_lightfm(ds, py: Path, grid: list[dict], epochs: list[int], groups: dict, threads: int, log) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="lightfm-"))
    fit_items, fit_users = trained(ds)
    ii, ix, iw = feature_csr(ds.item_features, ds.n_items, fit_items)
    ui, ux, uw = feature_csr(ds.user_features, ds.n_users, fit_users)
    arrays = {"n_users": ds.n_users, "n_items": ds.n_items, "train_users": ds.train.users, "train_items": ds.train.items,
              "item_indptr": ii, "item_indices": ix, "item_width": iw, "user_indptr": ui, "user_indices": ux, "user_width": uw}
    for split in ("valid", "test"):
        users, _, known = protocol(ds, split)
        vals, _ = known.gather(users)
        arrays.update({f"{split}_users": users, f"{split}_known_indices": vals,
                       f"{split}_known_indptr": np.r_[0, np.cumsum(known.lengths()[users])]})
    np.savez(tmp / "split.npz", **arrays)

    def worker(configs, eps, test=False):
        (tmp / "grid.json").write_text(json.dumps({"configs": configs, "epochs": eps, "k": K, "seed": 0, "threads": threads}))
        subprocess.run([str(py), str(HERE / "lightfm_worker.py"), str(tmp / "split.npz"), str(tmp / "grid.json"),
                        str(tmp / "out.npz")] + (["--test"] if test else []), check=True)
        return np.load(tmp / "out.npz")

    users, truth, _ = protocol(ds, "valid")
    out = worker(grid, epochs)
    tried, best = [], None
    for c, cfg in enumerate(grid):
        for e in epochs:
            m = metrics_from_top(out[f"top_{c}_{e}"], users, truth, groups)
            tried.append({"settings": {**cfg, "epochs": e}, "valid": m, "train_seconds": float(out[f"seconds_{c}_{e}"])})
            if best is None or m["cold_items/recall@20"] > best[0]:
                best = (m["cold_items/recall@20"], cfg, e)
    _, cfg, e = best
    log(f"  LightFM chosen on validation: {cfg}, {e} epochs (cold Recall@20 {best[0]:.4f})")
    res = worker([cfg], [e], test=True)
    users, truth, _ = protocol(ds, "test")
    return {"chosen": {**cfg, "epochs": e}, "select": "cold_items/recall@20", "tried": tried,
            "train_seconds": float(res[f"seconds_0_{e}"]), "test": metrics_from_top(res[f"top_0_{e}"], users, truth, groups)}


def feature_popularity(ds) -> np.ndarray:
    """Each item's score: the mean, over its feature columns (``feature_columns``: its values), of
    the mean training count of the trained items (not withheld) that have the column (0 for an item
    without any)."""
    counts = ds.item_counts().astype(np.float64)
    fit = trained(ds)[0] & (np.ones(ds.n_items, bool) if ds.cold_items is None else ~ds.cold_items)
    score, n = np.zeros(ds.n_items), np.zeros(ds.n_items)
    for owner, cols, width, _ in feature_columns(ds.item_features, fit):
        total = np.bincount(cols, weights=counts[owner] * fit[owner], minlength=width)
        mean = total / np.maximum(np.bincount(cols, weights=fit[owner].astype(float), minlength=width), 1)
        np.add.at(score, owner, mean[cols])
        np.add.at(n, owner, 1.0)
    return score / np.maximum(n, 1)


def run_popularity(ds, scores: np.ndarray, groups: dict) -> dict:
    users, truth, known = protocol(ds, "test")
    return {"chosen": {}, "train_seconds": 0.0, "test": metrics_from_top(ranked(scores, users, known, K), users, truth, groups)}


# ---- the report ------------------------------------------------------------------------------------
def table(results: dict) -> str:
    rows = ["| method | settings chosen on validation | warm Recall@20 | cold-item Recall@20 | cold-item NDCG@20 | training (s) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        t = r["test"]
        chosen = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in r["chosen"].items()) or "-"
        rows.append(f"| {name} | {chosen} | {t['warm_items/recall@20']:.4f} | {t['cold_items/recall@20']:.4f} | "
                    f"{t['cold_items/ndcg@20']:.4f} | {r['train_seconds']:.1f} |")
    return "\n".join(rows)


def write_docs(md: str) -> None:
    path = ROOT / "docs" / "features.md"
    text = path.read_text(encoding="utf-8")
    begin, end = "<!-- cold-start:begin -->", "<!-- cold-start:end -->"
    if begin in text and end in text:
        text = text[: text.index(begin) + len(begin)] + "\n" + md + "\n" + text[text.index(end):]
        path.write_text(text, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "ml-100k-cold.toml"),
                    help="the cold-item config: its data, features and training settings (default configs/ml-100k-cold.toml)")
    ap.add_argument("--data-dir", default=os.environ.get("TWOTOWER_DATA"), help="data directory (default $TWOTOWER_DATA)")
    ap.add_argument("--threads", type=int, default=1, help="threads of every method (default 1)")
    ap.add_argument("--quick", action="store_true", help="one setting per method, few epochs (a check that it runs)")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite the table in docs/features.md (the results file is written)")
    args = ap.parse_args()

    import tomllib

    from twotower.data.sources import load_dataset
    from twotower import RunConfig

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    torch.set_num_threads(args.threads)
    base = tomllib.loads(Path(args.config).read_text(encoding="utf-8"))
    base.setdefault("train", {})["threads"] = args.threads
    cfg = RunConfig.from_dict(base)
    if not cfg.data.cold_items:
        sys.exit(f"{args.config}: set data.cold_items (the share of items withheld), e.g. 0.2")
    ds = load_dataset(cfg, args.data_dir)  # the data with the features the config declares
    groups = {"warm_items": ("item", ~ds.cold_items), "cold_items": ("item", ds.cold_items)}
    log(f"split: {ds.summary()}")
    temps = [0.1] if args.quick else [0.05, 0.1, 0.2]
    drops = [0.5] if args.quick else [0.25, 0.5, 0.75]
    if args.quick:
        base["train"]["epochs"] = 3
    no_drop = {"model.item_id_dropout": 0.0, "model.user_id_dropout": 0.0}
    ids_only = {**no_drop, "model.item_features": [], "model.user_features": [], "train.monitor": "warm_items/recall@20"}
    if "features" in base:  # features declared by kind ([features]): none of them either
        ids_only.update({f"features.{t}": [] for t in base["features"]})
    results, raw = {}, {}
    for name, fixed, grid, select in [
        ("twotower, ids only", ids_only, [{"model.temperature": t} for t in temps], "warm_items/recall@20"),
        ("twotower, features", no_drop, [{"model.temperature": t} for t in temps], "cold_items/recall@20"),
        ("twotower, features + id dropout", {}, [{"model.temperature": t, "model.item_id_dropout": p}
                                                 for t in temps for p in drops], "cold_items/recall@20"),
    ]:
        log(f"{name}:")
        out = run_twotower(base, [{**fixed, **g} for g in grid], select, ds, log)
        out["chosen"] = {k: v for k, v in out["chosen"].items() if k not in fixed}
        raw[name] = out
        results[name] = {k: v for k, v in out.items() if k not in ("model", "config")}
    gap = check_against_evaluator(raw["twotower, features + id dropout"], ds, groups)
    log(f"benchmark metrics vs the evaluator on the same model: largest difference {gap:.2e}")
    assert gap < 1e-9, gap
    log("LightFM:")
    lf_grid = [{"no_components": d, "learning_rate": 0.05, "item_alpha": a, "identity": ident}
               for d in ([64] if args.quick else [32, 64]) for a in ([0.0] if args.quick else [0.0, 1e-5])
               for ident in (["trained"] if args.quick else ["trained", "all", "none"])]
    results["LightFM (WARP)"] = run_lightfm(ds, ensure_venv(), lf_grid, [5] if args.quick else [5, 10, 20, 40, 60],
                                            groups, args.threads, log)
    results["popularity"] = run_popularity(ds, ds.item_counts().astype(np.float64), groups)
    results["feature popularity"] = run_popularity(ds, feature_popularity(ds), groups)

    md = table(results)
    print(md)
    cold = {name: r["test"]["cold_items/recall@20"] for name, r in results.items()}
    verdict = {f"{name}: >= 2x popularity, >= 2x feature popularity, >= LightFM":
               [cold[name] >= 2 * cold["popularity"], cold[name] >= 2 * cold["feature popularity"],
                cold[name] >= cold["LightFM (WARP)"]]
               for name in ("twotower, features", "twotower, features + id dropout")}
    log(f"acceptance: {verdict}")
    if not args.quick:
        # the default config's results are cold-start.json; another config's, cold-start-<its name>.json
        stem = Path(args.config).stem
        name = "cold-start.json" if stem == "ml-100k-cold" else f"cold-start-{stem}.json"
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / name).write_text(json.dumps({
            "command": "flock /tmp/twotower-heavy.lock .venv/bin/python benchmarks/cold_start.py --config "
                       + os.path.relpath(args.config, ROOT),
            "config": base, "split": ds.summary(), "machine": platform.processor() or platform.machine(),
            "threads": args.threads, "torch": torch.__version__, "lightfm": LIGHTFM, "acceptance": verdict,
            "results": results, "date": time.strftime("%Y-%m-%d")}, indent=2, default=float) + "\n")
        if not args.no_docs:
            write_docs(md)


if __name__ == "__main__":
    main()
