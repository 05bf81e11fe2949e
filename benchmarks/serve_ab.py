"""``twotower serve`` of two source trees side by side: start-up time and request latency, paired and
interleaved (before, after, before, after, ...), so that a change (such as the page and its
endpoints) can be shown not to cost serving.

    git archive BASE_COMMIT src | tar -x -C /tmp/base      # the "before" source tree
    cp src/twotower/*/_*.so /tmp/base/src/twotower/...      # its compiled passes, if built
    flock /tmp/twotower-bench.lock .venv/bin/python benchmarks/serve_ab.py --run runs/ml100k --before-src /tmp/base/src

A "before" tree with its own environment (its own packages decide its server stack: uvicorn picks
httptools and uvloop whenever they are installed) and its own run (an older run format):

    flock /tmp/twotower-bench.lock .venv/bin/python benchmarks/serve_ab.py --run runs/ml100k --starts 0 \
        --before-src ../base/src --before-python ../base/.venv/bin/python --before-run ../base/runs/ml100k

Start-up: seconds from launching ``python -m twotower.cli serve RUN`` to the first 200 from
``/health``, ``--starts`` times each. Latency: ``benchmarks/load_test.py`` (the same mix of known
users, new users, batches, similar items and bad requests), ``--reps`` runs each. Both variants run
with this interpreter and the same benchmark scripts; only ``PYTHONPATH`` differs. Prints medians
and after/before ratios and writes ``benchmarks/results/serve-ab.json`` (``--out``). Without ``--before-python`` and
``--before-run`` both variants use this interpreter and ``--run``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from http_load import free_port  # noqa: E402


def _env(src: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(src)}


def start_seconds(run: Path, src: Path, python: str = sys.executable) -> tuple[float, int]:
    """Seconds to a healthy server, and the status of ``GET /`` (200: this tree serves the page)."""
    import httpx

    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([python, "-m", "twotower.cli", "serve", str(run), "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(src))
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stdout.read()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.01)
        seconds = time.perf_counter() - t0
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code
        return seconds, page
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def load_test(run: Path, src: Path, requests: int, concurrency: int, python: str = sys.executable) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [python, str(ROOT / "benchmarks" / "load_test.py"), "--run", str(run), "--requests", str(requests),
               "--concurrency", str(concurrency), "--no-doc", "--out-dir", out]
        done = subprocess.run(cmd, env=_env(src), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"load test failed: {done.stdout}\n{done.stderr}")
        return json.loads(next(Path(out).glob("load-*.json")).read_text())["summary"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained run directory both trees can serve")
    ap.add_argument("--before-src", required=True, help="the src/ folder of the tree to compare against")
    ap.add_argument("--after-src", default="src", help="default: this tree's src/")
    ap.add_argument("--before-python", default=sys.executable, help="interpreter (and so packages) of the before tree "
                    "(default: this one)")
    ap.add_argument("--before-run", help="run directory the before tree serves (default: --run)")
    ap.add_argument("--starts", type=int, default=5, help="start-ups of each tree")
    ap.add_argument("--reps", type=int, default=2, help="load tests of each tree")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve-ab.json"))
    args = ap.parse_args(argv)
    run = Path(args.run)
    trees = {"before": Path(args.before_src).resolve(), "after": (ROOT / args.after_src).resolve()}
    pythons = {"before": args.before_python, "after": sys.executable}
    runs = {"before": Path(args.before_run or args.run), "after": run}

    starts = {k: [] for k in trees}
    pages = {}
    for i in range(args.starts):
        for name, src in trees.items():
            s, pages[name] = start_seconds(runs[name], src, pythons[name])
            starts[name].append(s)
            print(f"start {i + 1} {name}: {s:.2f} s", flush=True)
    loads = {k: [] for k in trees}
    for i in range(args.reps):
        for name, src in trees.items():
            r = load_test(runs[name], src, args.requests, args.concurrency, pythons[name])
            loads[name].append(r)
            print(f"load {i + 1} {name}: p50 {r['p50_ms']:.2f} ms, p95 {r['p95_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, "
                  f"{r['throughput_rps']:.0f} req/s, 5xx {r['server_errors_5xx']}, unexpected {r['unexpected']}", flush=True)

    def med(name, key):
        return float(np.median([r[key] for r in loads[name]]))

    summary = {"start_s": {k: float(np.median(v)) if v else None for k, v in starts.items()}}
    summary["start_ratio"] = summary["start_s"]["after"] / summary["start_s"]["before"] if starts["before"] else None
    for key in ("p50_ms", "p95_ms", "p99_ms", "throughput_rps"):
        summary[key] = {k: med(k, key) for k in trees}
        summary[f"{key}_ratio"] = summary[key]["after"] / summary[key]["before"]
    # paired ratios: each "after" run over the "before" run just before it
    for key in ("p50_ms", "p99_ms"):
        summary[f"{key[:3]}_paired_ratios"] = [a[key] / b[key] for b, a in zip(loads["before"], loads["after"])]
    summary["start_paired_ratios"] = [a / b for b, a in zip(starts["before"], starts["after"])]
    res = {"run": str(run), "runs": {k: str(v) for k, v in runs.items()}, "pythons": pythons,
           "trees": {"before": args.before_src, "after": args.after_src}, "page_status": pages,
           "requests": args.requests, "concurrency": args.concurrency, "starts": starts,
           "loads": {k: [{x: r[x] for x in ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "throughput_rps", "server_errors_5xx", "unexpected")}
                         for r in v] for k, v in loads.items()},
           "summary": summary, "load_average": os.getloadavg()[0],
           "command": ".venv/bin/python benchmarks/serve_ab.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    if starts["before"]:
        print(f"GET / answered {pages['before']} before, {pages['after']} after")
        print(f"start-up median {summary['start_s']['before']:.2f} s before, {summary['start_s']['after']:.2f} s after "
              f"(ratio {summary['start_ratio']:.3f}; paired {', '.join(f'{x:.2f}' for x in summary['start_paired_ratios'])})")
    for key in ("p50_ms", "p95_ms", "p99_ms", "throughput_rps"):
        print(f"{key}: {summary[key]['before']:.2f} before, {summary[key]['after']:.2f} after (ratio {summary[f'{key}_ratio']:.3f})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
