"""Export time, and the exported user tower's latency in ONNX Runtime and TorchScript against the
PyTorch path, for a batch of 1 and of 256 known users of MovieLens 100K.

    flock /tmp/twotower-bench.lock .venv/bin/python benchmarks/export_latency.py

Two models, trained here for one epoch (latency does not depend on quality): configs/ml-100k.toml's
towers (user tower: id + the mean of the last 50 items; item tower: id + genres) and the same with
the user features of u.user (age bucket, gender, occupation: three EmbeddingBags in the user
tower). For the second, ONNX is also exported with the exporter's stock EmbeddingBag translation (a
Loop over bags) to measure the lowering of ``twotower.export.formats.embedding_bag_onnx``.

Each variant runs the same prepared inputs (real users, their known items, their stored features),
one thread each (``torch.set_num_threads(1)``, ONNX Runtime ``intra_op_num_threads = 1``: the machine
is shared), interleaved round by round (A, B, C, A, B, C, ...); the figure is the median over rounds
of the mean time of a call within a round, and ratios are to PyTorch. Export time is the median of
three exports per format (each includes the check against the Python path and the Parquet files).
Writes ``benchmarks/results/export-latency.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from twotower import RunConfig, train  # noqa: E402
from twotower.export import TowerExport, export_run  # noqa: E402
from twotower.export import formats  # noqa: E402
from twotower.export.towers import numpy_inputs  # noqa: E402
from twotower.run import Run  # noqa: E402

MODELS = {
    "history+genres": {"dim": 64, "user_history": True, "item_features": ["genre"], "temperature": 0.1},
    "history+genres+user features": {"dim": 64, "user_history": True, "item_features": ["genre"], "temperature": 0.1,
                                     "user_features": ["age", "gender", "occupation"]},
}


def timed(fn, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls


def latency(variants: dict, rounds: int, calls: dict[int, int], batches=(1, 256)) -> dict:
    out = {}
    for b in batches:
        samples = {name: [] for name in variants}
        for name, (fn, feed) in variants.items():
            fn(feed[b])  # warm
        for _ in range(rounds):
            for name, (fn, feed) in variants.items():
                samples[name].append(timed(lambda: fn(feed[b]), calls[b]))
        med = {name: statistics.median(s) for name, s in samples.items()}
        out[b] = {name: {"ms_median": med[name] * 1e3, "ratio_to_pytorch": med[name] / med["pytorch"]} for name in variants}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("TWOTOWER_DATA"))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export-latency.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="export-bench-"))
    results = {"machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                           "threads": 1}, "models": {}}
    for name, model in MODELS.items():
        run_dir = tmp / name.replace(" ", "_").replace("+", "_")
        cfg = RunConfig.from_dict({"data": {"dataset": "ml-100k", "split": "random"}, "model": model,
                                   "train": {"epochs": 1, "batch_size": 512, "lr": 0.005}, "eval": {"ks": [10]}})
        train(cfg, run_dir, data_dir=args.data_dir, quiet=True, log=lambda m: None)
        run = Run(run_dir)
        export_s = {}
        for fmt in ("onnx", "torchscript"):
            times = []
            for _ in range(3):
                t = time.perf_counter()
                export_run(run, tmp / f"{run_dir.name}-{fmt}", fmt, overwrite=True)
                times.append(time.perf_counter() - t)
            export_s[fmt] = statistics.median(times)
        module = TowerExport(run.model, "user")
        rng = np.random.default_rng(0)
        feeds, tensors = {}, {}
        for b in (1, 256):
            users = np.sort(rng.choice(len(run.users), b, replace=False))
            tensors[b] = module.tensors_of(run.model.user_inputs(users, run.known))
            feeds[b] = numpy_inputs(module.sig, tensors[b])
        onnx_tower = formats.OnnxTower(tmp / f"{run_dir.name}-onnx" / "user_tower.onnx", threads=1)
        ts_tower = formats.TorchScriptTower(tmp / f"{run_dir.name}-torchscript" / "user_tower.pt")

        def pytorch(t):
            with torch.no_grad():
                return module(*t)

        def script(t):
            with torch.no_grad():
                return ts_tower.module(*t)

        variants = {"pytorch": (pytorch, tensors), "onnxruntime": (onnx_tower, feeds), "torchscript": (script, tensors)}
        if module.sig.features:  # the stock translation of EmbeddingBag, for comparison
            stock = tmp / f"{run_dir.name}-stock.onnx"
            keep = formats.embedding_bag_translations
            formats.embedding_bag_translations = lambda m: {}
            try:
                formats.save_onnx(module, module.example(), stock)
            finally:
                formats.embedding_bag_translations = keep
            variants["onnxruntime, stock EmbeddingBag (Loop)"] = (formats.OnnxTower(stock, threads=1), feeds)
        lat = latency(variants, args.rounds, {1: 200, 256: 20})
        results["models"][name] = {"export_seconds": export_s, "latency": lat}
        print(f"\n{name}: export {export_s['onnx']:.2f}s (onnx), {export_s['torchscript']:.2f}s (torchscript)")
        for b, rows in lat.items():
            for v, r in rows.items():
                print(f"  batch {b:>3}  {v:<40} {r['ms_median']:8.3f} ms  x{r['ratio_to_pytorch']:.2f}")
        sys.stdout.flush()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
