"""granian against ``twotower serve`` (uvicorn + httptools + uvloop, guarded by serving/server.py):
the same application over the same run, ``benchmarks/load_test.py``'s plan of requests, paired and
interleaved (uvicorn, granian, uvicorn, granian, ...). The measurement behind the server-stack
decision of issue 17 (docs/reliability.md, "The server stack"); granian is not a dependency:

    pip install --target /tmp/granian-lib granian            # a side folder, not the project's .venv
    flock /tmp/twotower-bench.lock .venv/bin/python benchmarks/serve_granian_ab.py --run runs/ml100k \\
        --granian-path /tmp/granian-lib

Prints each run, the medians and granian/uvicorn ratios, and the requests granian answered
otherwise than expected (for instance a body over 1 MB whose 413 is lost to a connection reset);
writes ``benchmarks/results/serve-granian-ab.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import load_test  # noqa: E402
from http_load import free_port, start_server, wait_healthy  # noqa: E402

APP = """import os
from twotower.serving.query import Recommender
from twotower.serving.service import create_app
app = create_app(Recommender.load(os.environ["TWOTOWER_AB_RUN"]))
"""
KEYS = ("p50_ms", "p95_ms", "p99_ms", "throughput_rps", "server_errors_5xx", "connection_errors", "unexpected")


def start_granian(run: Path, port: int, lib: Path, app_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(app_dir), str(lib), str(ROOT / "src")]),
           "TWOTOWER_AB_RUN": str(run)}
    proc = subprocess.Popen([sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--loop", "uvloop", "--log-level", "warning", "--no-ws", "ab_app:app"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return wait_healthy(proc, port, name="granian")


def one_run(kind: str, run: Path, lib: Path, app_dir: Path, requests: int, concurrency: int) -> dict:
    users = json.loads((run / "users.json").read_text())["ids"]
    items = json.loads((run / "items.json").read_text())["ids"]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_granian(run, port, lib, app_dir) if kind == "granian" else start_server(run, port, [])
    try:
        asyncio.run(load_test._drive(base, load_test.make_plan(users, items, 200, 1), concurrency))  # warm-up
        plan = load_test.make_plan(users, items, requests, 0)
        out, wall = asyncio.run(load_test._drive(base, plan, concurrency))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    s = load_test.summarize(plan, out, wall)
    r = {k: s[k] for k in KEYS}
    # the deliberately bad requests not answered with their one expected status (-1: no answer, a connection error)
    r["bad_requests_answered_otherwise"] = {label: {"expected": b["expected"], "got": b["got"]}
                                            for label, b in s["bad_requests"].items() if set(b["got"]) != {str(b["expected"])}}
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained run directory (e.g. runs/ml100k)")
    ap.add_argument("--granian-path", required=True, help="folder granian was installed into (pip install --target DIR granian)")
    ap.add_argument("--reps", type=int, default=2, help="runs of each server")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve-granian-ab.json"))
    args = ap.parse_args(argv)
    run, lib = Path(args.run).resolve(), Path(args.granian_path).resolve()
    if not (lib / "granian").is_dir():
        ap.error(f"--granian-path {lib}: no granian package there; install it with pip install --target {lib} granian")
    runs: dict[str, list] = {"uvicorn": [], "granian": []}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as app_dir:
        (Path(app_dir) / "ab_app.py").write_text(APP)
        for i in range(args.reps):
            for kind in runs:
                r = one_run(kind, run, lib, Path(app_dir), args.requests, args.concurrency)
                runs[kind].append(r)
                print(f"{i + 1} {kind}: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, {r['throughput_rps']:.0f} req/s, "
                      f"5xx {r['server_errors_5xx']}, connection errors {r['connection_errors']}, unexpected {r['unexpected']} "
                      f"{r['bad_requests_answered_otherwise'] or ''}", flush=True)
    medians = {k: {key: float(np.median([r[key] for r in v])) for key in ("p50_ms", "p95_ms", "p99_ms", "throughput_rps")}
               for k, v in runs.items()}
    ratios = {key: medians["granian"][key] / medians["uvicorn"][key] for key in medians["uvicorn"]}
    paired = {key: [g[key] / u[key] for u, g in zip(runs["uvicorn"], runs["granian"])] for key in ("p50_ms", "p99_ms")}
    res = {"run": str(args.run), "requests": args.requests, "concurrency": args.concurrency, "runs": runs, "medians": medians,
           "granian_over_uvicorn": ratios, "paired_ratios": paired, "load_average_before": load_before,
           "command": ".venv/bin/python benchmarks/serve_granian_ab.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    for key, v in ratios.items():
        print(f"{key}: uvicorn {medians['uvicorn'][key]:.1f}, granian {medians['granian'][key]:.1f} (granian/uvicorn {v:.3f})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
