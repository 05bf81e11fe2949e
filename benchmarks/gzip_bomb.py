"""A gzip bomb given to ``twotower train``: how long until it is refused, and the peak memory.

    flock /tmp/twotower-bench.lock .venv/bin/python benchmarks/gzip_bomb.py [--before SRC] [--reps 3]
        [--out benchmarks/results/gzip-bomb.json]

The bomb has the shape of the one issue 17 reported (306 KB): ~310 KB of gzip (level 9) that
expands to 320 MiB of valid ``user,item`` rows. Each repetition runs ``twotower train`` on it in a
fresh process (``python -c 'from twotower.cli import main; ...'`` with ``PYTHONPATH`` set to the
source tree) and records the wall time until the process ends, its exit code, the last line of
stderr and its peak resident memory (``ru_maxrss`` of that child, from ``os.wait4``).

``--before SRC``: also run a source tree without the cap (e.g. ``git archive d1bb9eb src | tar -x
-C /tmp/before`` with this tree's compiled ``native/*.so`` copied in), interleaved with this one
(before, after, before, after, ...); medians are reported with after / before.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_bomb(path: Path) -> int:
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(b"user,item\n")
        block = b"1,2\n" * (1 << 20)
        for _ in range(80):
            f.write(block)
    return path.stat().st_size


def run_once(src: Path, cfg: Path, out: Path) -> dict:
    code = "import sys\nfrom twotower.cli import main\nsys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code, "train", str(cfg), "--out", str(out), "--quiet",
                          "--set", "train.threads=1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    err = p.stderr.read().decode("utf-8", "replace")
    _, status, usage = os.wait4(p.pid, 0)
    seconds = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in err.splitlines() if line.strip()]
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "exit": p.returncode,
            "traceback": "Traceback" in err, "message": lines[-1][:300] if lines else ""}


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, help="a source tree (the folder holding twotower/) without the cap")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gzip-bomb.json")
    args = ap.parse_args()
    trees = ([("before", args.before)] if args.before else []) + [("after", ROOT / "src")]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        size = make_bomb(d / "inter.csv.gz")
        cfg = d / "bomb.toml"
        cfg.write_text(f'[data]\ndataset = "files"\ninteractions = "{d / "inter.csv.gz"}"\n')
        runs: dict[str, list[dict]] = {name: [] for name, _ in trees}
        for rep in range(args.reps):
            for name, src in trees:
                r = run_once(src, cfg, d / f"run-{name}-{rep}")
                runs[name].append(r)
                print(f"{name} rep {rep}: {r['seconds']:.1f}s, peak {r['peak_rss_mb']:.0f} MB, exit {r['exit']}, "
                      f"{r['message'][:120]}", flush=True)
    summary = {name: {"median_seconds": median([r["seconds"] for r in rs]),
                      "median_peak_rss_mb": median([r["peak_rss_mb"] for r in rs])} for name, rs in runs.items()}
    if "before" in summary:
        summary["after_over_before"] = {k: round(summary["after"][f"median_{k}"] / summary["before"][f"median_{k}"], 4)
                                        for k in ("seconds", "peak_rss_mb")}
    result = {"bomb_bytes": size, "expands_to_bytes": 10 + 80 * 4 * (1 << 20), "reps": args.reps,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared: other work ran beside)",
              "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
