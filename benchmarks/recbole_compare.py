"""twotower beside RecBole (SimpleX and BPR) on the same Gowalla split, in one run.

    .venv/bin/python benchmarks/recbole_compare.py [--epochs 2] [--negatives 100]

1. RecBole gets its own virtual environment, ``benchmarks/.recbole-venv`` (made once): PyTorch
   2.13.0 first (the CPU build these machines hold locally; any other version would download a
   CUDA build), then ``recbole`` from PyPI without its ``ray`` dependency (only its
   hyper-parameter search imports it) and the rest of its requirements, NumPy below 2.
2. The split: twotower's own (``configs/gowalla.toml``, ``train.refit = false``): training pairs
   (90 % of each user's ``train.txt`` items, seeded), validation (the other 10 %) and ``test.txt``,
   written as RecBole atomic files (``DATASET.{train,valid,test}.inter``, RecBole's
   ``benchmark_filename``), so both tools train on the same pairs and rank the same test users
   with the same known items (training + validation) masked.
3. Each tool trains the same number of epochs with embedding size 64 and 2048 positive pairs per
   step, in its own process (peak resident memory is that process's), then scores the test split
   by full ranking. No validation pass is timed. Each tool runs holding ``--lock`` (the machine's
   shared lock for timed jobs), taken and released per tool so that no single hold is long.

Writes ``benchmarks/results/recbole_compare.json`` and the table between the ``recbole`` markers
of ``docs/benchmarks.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import fcntl
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / ".recbole-venv"
DATA = HERE / ".recbole-data"
DATASET = "gowalla-tt"
# RecBole's declared requirements minus ray (imported by its quick_start and hyper-parameter
# search only, neither used here); NumPy 2 removed aliases that RecBole 1.2 still uses.
RECBOLE_DEPS = ["numpy<2", "scipy", "pandas<2.3", "tqdm", "colorlog==4.7.2", "colorama==0.4.4", "scikit-learn",
                "pyyaml", "tensorboard", "thop", "tabulate", "plotly", "texttable", "psutil"]


LOCK: str | None = None
TWOTOWER_MODELS = [("MF, in-batch softmax", []), ("MLP towers [256], in-batch softmax", ["model.mlp=[256]"])]


def sh(cmd: list[str], locked: bool = False) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    if not (locked and LOCK):
        subprocess.run(cmd, check=True)
        return
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # the same lock as flock(1): timings with nothing else running
        try:
            subprocess.run(cmd, check=True)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_venv(version: str) -> Path:
    py = VENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", f"import recbole, torch; assert torch.__version__.startswith('2.13.0'); "
                                       f"assert recbole.__version__ == '{version}'"], capture_output=True).returncode == 0:
        return py
    sh([sys.executable, "-m", "venv", str(VENV)])
    pip = [str(py), "-m", "pip", "install", "-q"]
    sh(pip + ["torch==2.13.0"])  # first: later requirements then find torch satisfied
    sh(pip + ["--no-deps", f"recbole=={version}"])
    sh(pip + RECBOLE_DEPS)
    return py


def export_split(cfg_path: str, data_dir: str) -> dict:
    """twotower's split of Gowalla as RecBole atomic files; returns its sizes."""
    from twotower import RunConfig, load_dataset

    cfg = RunConfig.load(cfg_path, ["train.refit=false"])
    ds = load_dataset(cfg.data, data_dir)
    out = DATA / DATASET
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, split in (("train", ds.train), ("valid", ds.valid), ("test", ds.test)):
        path = out / f"{DATASET}.{name}.inter"
        with open(path, "w") as f:
            f.write("user_id:token\titem_id:token\n")
            f.writelines(f"u{u}\ti{i}\n" for u, i in zip(split.users.tolist(), split.items.tolist()))
        sizes[name] = len(split)
    return sizes


def run_twotower(cfg_path: str, overrides: list[str], data_dir: str, out: Path, model: str) -> dict:
    """twotower in a fresh process (its own peak RSS), through the same Trainer the CLI uses."""
    code = f"""
import json, resource, time, sys
from twotower import RunConfig, load_dataset, Trainer
from twotower.evaluation.evaluator import evaluate
cfg = RunConfig.load({cfg_path!r}, {overrides!r})
t = time.perf_counter(); ds = load_dataset(cfg.data, {data_dir!r}); load_s = time.perf_counter() - t
tr = Trainer(cfg, ds, quiet=True)
state = tr.fit()
t = time.perf_counter(); m = evaluate(tr.model, ds, "test", cfg.eval.model_copy(update={{"ks": [20]}}), cfg.model.history_length)
eval_s = time.perf_counter() - t
ep = [r["seconds"] for r in state.history]
json.dump({{"tool": "twotower", "model": {model!r}, "config": {cfg_path!r}, "overrides": {overrides!r}, "epochs": len(ep),
            "train_pairs": len(ds.train), "load_seconds": load_s, "epoch_seconds": ep,
            "seconds_per_epoch": sum(ep) / len(ep), "examples_per_s": len(ds.train) * len(ep) / sum(ep),
            "loss": [r["loss"] for r in state.history], "eval_seconds": eval_s,
            "test_recall@20": m["recall@20"], "test_ndcg@20": m["ndcg@20"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}},
          open({str(out)!r}, "w"), indent=2)
"""
    sh([sys.executable, "-c", code], locked=True)
    return json.loads(out.read_text())


def markdown(res: dict, command: str) -> str:
    rows = [
        "| tool, model | negatives per positive | s / epoch | examples/s | full-ranking eval (s) | peak RSS (MB) | test Recall@20 | test NDCG@20 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["runs"]:
        name = f"{r['tool']} {r['model']}"
        neg = r.get("negatives_per_positive", "in-batch (2047)")
        rows.append(f"| {name} | {neg} | {r['seconds_per_epoch']:.1f} | {r['examples_per_s']:,.0f} | {r['eval_seconds']:.1f} | "
                    f"{r['peak_rss_mb']:,.0f} | {r['test_recall@20']:.4f} | {r['test_ndcg@20']:.4f} |")
    tt = res["runs"][0]
    ratios = [f"{r['model']} {tt['examples_per_s'] / r['examples_per_s']:.1f}x" for r in res["runs"] if r["tool"] == "RecBole"]
    e = res["epochs"]
    return "\n".join([
        "## Side by side with RecBole (Gowalla, same split, same budget)",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Machine: {res['machine']}, {res['threads']} threads, PyTorch {res['torch']} in both environments, "
        f"RecBole {res['recbole']}. Split: twotower's (`configs/gowalla.toml`, `train.refit = false`): "
        f"{res['split']['train']:,} training pairs, {res['split']['valid']:,} validation pairs (masked at test, "
        f"never trained on), {res['split']['test']:,} test pairs from `test.txt`, written as RecBole atomic files "
        f"(`benchmark_filename`). Every tool: {e} epochs, embedding size 64, 2048 positive pairs per step, "
        "Adam, no validation pass; then one full ranking of all items for every test user with training and "
        "validation items masked (Recall@20 on the LightGCN convention in both). examples/s = training pairs "
        "per second of training (negatives not counted). Peak RSS: each tool's own process, data loading included.",
        "",
        *rows,
        "",
        f"twotower ({tt['model']}) trains {', '.join(ratios)} as many examples per second as RecBole's. RecBole's SimpleX draws "
        f"{res['negatives']} uniform negatives per positive (its cosine contrastive loss wants many; RecBole "
        "counts them in its batch, so its `train_batch_size` is set to 2048 x negatives) with RecBole's default "
        "margin, negative weight, history length and learning rate (1e-3); BPR one negative. Few epochs favour "
        "neither side's recall in particular: both are short of convergence (the published SimpleX figure, "
        "0.1872, takes hundreds of epochs of tuned training).",
    ])


def update_doc(block: str) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text()
    begin, end = "<!-- recbole:begin -->", "<!-- recbole:end -->"
    new = f"{begin}\n{block}\n{end}"
    if begin in text:
        text = text[: text.index(begin)] + new + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    doc.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/gowalla.toml")
    ap.add_argument("--data-dir", default=os.environ.get("TWOTOWER_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--negatives", type=int, default=100, help="SimpleX's negatives per positive")
    ap.add_argument("--models", default="SimpleX,BPR")
    ap.add_argument("--recbole-version", default="1.2.1")
    ap.add_argument("--out", default="benchmarks/results/recbole_compare.json")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--lock", default="/tmp/twotower-cpu.lock", help="held while each tool runs; '' for none")
    args = ap.parse_args()
    global LOCK
    LOCK = args.lock or None

    py = ensure_venv(args.recbole_version)
    split = export_split(args.config, args.data_dir)
    out_dir = Path(args.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    res = {"machine": f"{os.cpu_count()}-core {platform.machine()}", "threads": torch.get_num_threads(), "torch": torch.__version__,
           "epochs": args.epochs, "negatives": args.negatives, "split": split, "runs": []}
    overrides = ["model.dim=64", "train.batch_size=2048", "train.refit=false", f"train.epochs={args.epochs}",
                 "train.patience=0", f"train.eval_every={args.epochs}"]
    part = out_dir / "recbole_compare.twotower.json"
    # Matrix factorisation (the configuration of the epoch-time target), then the same with an MLP
    # on each tower (one hidden layer of 256, output 64): what a tower of layers costs on top.
    for name, extra in TWOTOWER_MODELS:
        res["runs"].append(run_twotower(args.config, overrides + extra, args.data_dir, part, name))
    part.unlink()
    for model in args.models.split(","):
        part = out_dir / f"recbole_compare.{model}.json"
        neg = args.negatives if model == "SimpleX" else 1
        t = time.perf_counter()
        sh([str(py), str(HERE / "recbole_worker.py"), str(DATA), DATASET, model, str(args.epochs), "2048", "64", str(neg), str(part)], locked=True)
        print(f"{model}: {time.perf_counter() - t:.0f} s in all", file=sys.stderr)
        res["runs"].append(json.loads(part.read_text()))
        part.unlink()
    res["recbole"] = next((r["recbole"] for r in res["runs"] if r["tool"] == "RecBole"), None)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    flags = [] if args.epochs == 2 else [f"--epochs {args.epochs}"]
    flags += [] if args.negatives == 100 else [f"--negatives {args.negatives}"]
    command = " ".join([".venv/bin/python benchmarks/recbole_compare.py", *flags])
    block = markdown(res, command)
    print(block)
    if not args.no_doc:
        update_doc(block)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
