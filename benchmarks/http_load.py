"""HTTP load benchmark: p50/p95/p99 latency and throughput of ``POST /recommend`` (top-k for a known
user, seen items excluded) at 1, 8 and 32 concurrent clients over loopback, one server worker.

    .venv/bin/python benchmarks/http_load.py                          # 1M-item synthetic run, auto index (HNSW)
    .venv/bin/python benchmarks/http_load.py --run runs/gowalla       # a trained run (its RUN/index, or exact)

The server is the product command, ``twotower serve RUN`` (uvicorn, one worker), started as a
separate process. The load generator is ``wrk`` (closed loop: each client sends its next request
when the previous answer arrives; one wrk thread) when installed, else an asyncio client on httpx.
Each request asks for a random user of the run. Without ``--run``, a synthetic run directory is
written first (``synthetic_catalog.write_run``: 1M items x 64, 10,000 users with 20 known items
each) and indexed with ``twotower index RUN`` (``auto``: HNSW at 1M items, efSearch tuned to recall 0.95) (recall measured at build, stored in
``RUN/index/index.json`` and reported here from ``GET /metadata``). Writes
``benchmarks/results/http-<catalog>.json`` and the HTTP section of ``docs/benchmarks.md``.
"""
from __future__ import annotations

import argparse
import shlex
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from ann import machine, write_section  # noqa: E402
from twotower import artifacts  # noqa: E402

WRK_SCRIPT = """
local ids = {%(ids)s}
local k = %(k)d
math.randomseed(%(seed)d)
request = function()
  local u = ids[math.random(1, #ids)]
  return wrk.format("POST", "/recommend", {["Content-Type"] = "application/json"}, '{"user":' .. u .. ',"k":' .. k .. '}')
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests":%%d,"duration_s":%%f,"socket_errors":%%d,"non_2xx":%%d,' ..
    '"p50_ms":%%f,"p95_ms":%%f,"p99_ms":%%f,"mean_ms":%%f,"max_ms":%%f}\\n',
    summary.requests, summary.duration / 1e6, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50) / 1e3, latency:percentile(95) / 1e3, latency:percentile(99) / 1e3, latency.mean / 1e3, latency.max / 1e3))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, extra: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "twotower.cli", "serve", str(run), "--port", str(port),
                             "--log-level", "warning", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return wait_healthy(proc, port)


def wait_healthy(proc: subprocess.Popen, port: int, seconds: float = 300, name: str = "server") -> subprocess.Popen:
    """``proc`` once ``GET /health`` on ``port`` answers 200; its output in the error if it exits first,
    terminated if it is not up within ``seconds``."""
    import httpx

    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
    proc.terminate()
    raise RuntimeError(f"{name} did not start in {seconds:.0f} s")


def run_wrk(url: str, ids: list, k: int, concurrency: int, duration: float, seed: int) -> dict:
    body = ",".join(json.dumps(x) if isinstance(x, str) else str(int(x)) for x in ids)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % {"ids": body, "k": k, "seed": seed})
        script = f.name
    try:
        out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{duration:g}s", "--timeout", "10s", "-s", script, url],
                             capture_output=True, text=True, timeout=duration + 60)
    finally:
        os.unlink(script)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    r = json.loads(line[len("RESULT "):])
    r["throughput_rps"] = r["requests"] / r["duration_s"]
    return r


async def _httpx_load(url: str, ids: list, k: int, concurrency: int, duration: float, seed: int) -> dict:
    import httpx

    rng = np.random.default_rng(seed)
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        async def worker():
            nonlocal errors
            while time.perf_counter() < stop:
                body = {"user": ids[int(rng.integers(len(ids)))], "k": k}
                t = time.perf_counter()
                r = await client.post(url, json=body)
                lat.append(time.perf_counter() - t)
                errors += r.status_code != 200
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1e3
    return {"requests": len(lat), "duration_s": wall, "socket_errors": 0, "non_2xx": errors,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "max_ms": float(ms.max()), "throughput_rps": len(lat) / wall}


def run_httpx(url, ids, k, concurrency, duration, seed) -> dict:
    return asyncio.run(_httpx_load(url, ids, k, concurrency, duration, seed))


def prepare_synthetic(workdir: Path, n_items: int, kind: str, log, index_args: str = "") -> Path:
    from synthetic_catalog import write_run

    run = workdir / f"synthetic-{n_items}"
    if not (run / "manifest.json").is_file():
        log(f"writing a synthetic run with {n_items:,} items to {run}")
        write_run(run, n_items=n_items)
    meta = run / "index" / "index.json"
    # Extra index arguments always rebuild: the stored index may have been built with others.
    if not meta.is_file() or index_args or kind != "auto" and json.loads(meta.read_text())["kind"] != kind:
        log(f"building the {kind} index: twotower index {run} --kind {kind} {index_args}")
        subprocess.run([sys.executable, "-m", "twotower.cli", "index", str(run), "--kind", kind, *shlex.split(index_args), "--quiet"],
                       check=True)
    return run


def markdown(results: list[dict]) -> str:
    lines = ["<!-- http:begin -->", "## HTTP service: latency and throughput", "",
             "`POST /recommend` with `{\"user\": U, \"k\": K}` for a random known user `U` (seen items excluded: the index "
             "over-fetches by the user's known items and filters), over loopback, against `twotower serve RUN` "
             "(uvicorn, one worker, micro-batching of requests in flight). Closed loop: each client sends its next "
             "request when the previous answer arrives. The load generator runs on the same machine and takes its share "
             "of the cores. Synthetic catalogs: the generator of the ANN section (`benchmarks/synthetic_catalog.py`) "
             "wrapped in a run directory (an ids-only model whose embeddings are the catalog's vectors; 10,000 users "
             "with 20 known items each).", ""]
    for res in results:
        idx = res["index"]
        m = idx.get("measured", {})
        title = (f"### {res['catalog']}: {res['n_items']:,} items, top-{res['k']}, {res['index']['kind'].upper()}"
                 + (" fast-scan" if res["index"]["params"].get("fast_scan") else "")
                 + (", httptools + uvloop" if res["slug"].endswith("-httptools") else ""))
        lines += [title, "", "```bash", res["command"], "```", "",
                  f"Machine: {res['machine']}. Server: {res.get('server_stack', 'uvicorn')}, one worker. "
                  f"Client: {res['client']}, {res['duration_s']:g} s per level after a warm-up. "
                  f"Index: {idx['kind']} {json.dumps({k: v for k, v in idx['params'].items() if k in {'hnsw': ('M', 'ef_search'), 'ivf': ('nlist', 'nprobe'), 'ivfpq': ('nlist', 'nprobe', 'pq_m', 'pq_bits', 'refine', 'fast_scan')}.get(idx['kind'], ()) and v is not None})}, "
                  f"recall@10 {m.get('recall@10', float('nan')):.4f} and recall@100 {m.get('recall@100', float('nan')):.4f} "
                  f"against exact search on {m.get('queries', '?')} real users (measured at build).", "",
                  "| concurrent clients | requests | throughput (req/s) | p50 (ms) | p95 (ms) | p99 (ms) | non-2xx |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for c, r in sorted(res["levels"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {c} | {r['requests']:,} | {r['throughput_rps']:,.0f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['non_2xx'] + r['socket_errors']} |")
        lines.append("")
    lines += ["Result files: `benchmarks/results/http-<catalog>.json`.", "<!-- http:end -->"]
    return "\n".join(lines)


def render(out_dir: Path, doc: Path) -> None:
    every = [json.loads(f.read_text()) for f in sorted(out_dir.glob("http-*.json"))]
    every.sort(key=lambda r: (not r["slug"].startswith("synthetic"), -r["n_items"], r["slug"]))
    write_section(doc, markdown(every), "<!-- http:begin -->", "<!-- http:end -->")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a run directory to serve (default: a synthetic 1M-item run in --workdir)")
    p.add_argument("--items", type=int, default=1_000_000, help="synthetic catalog size (default 1M)")
    p.add_argument("--kind", default="auto", help="index kind built for the synthetic run (default auto: HNSW at 1M items)")
    p.add_argument("--index-args", default="", help="extra arguments for `twotower index` on the synthetic run, e.g. "
                   "\"--fast-scan --pq-m 32 --nlist 4096\" (rebuilds the index)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "twotower-bench"))
    p.add_argument("-k", type=int, default=100)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per concurrency level (default 10)")
    p.add_argument("--client", choices=["auto", "wrk", "httpx"], default="auto")
    p.add_argument("--serve-args", default="", help="extra arguments for `twotower serve`, e.g. \"--max-batch 32\"")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--render-only", action="store_true", help="only rewrite the doc section from the result files")
    args = p.parse_args(argv)
    if args.render_only:
        render(Path(args.out_dir), Path(args.doc))
        return 0
    log = lambda m: print(m, flush=True)  # noqa: E731
    client = args.client if args.client != "auto" else ("wrk" if shutil.which("wrk") else "httpx")
    run = Path(args.run) if args.run else prepare_synthetic(Path(args.workdir), args.items, args.kind, log, args.index_args)
    users = json.loads((run / "users.json").read_text())["ids"]
    ids = [users[i] for i in np.random.default_rng(0).choice(len(users), min(len(users), 5000), replace=False)]
    port = free_port()
    url = f"http://127.0.0.1:{port}/recommend"
    log(f"starting twotower serve {run} on 127.0.0.1:{port}")
    proc = start_server(run, port, args.serve_args.split())
    try:
        import httpx

        meta = httpx.get(f"http://127.0.0.1:{port}/metadata", timeout=10).json()
        load = run_wrk if client == "wrk" else run_httpx
        load(url, ids, args.k, 8, 5.0, seed=99)  # warm-up: touch the index pages, fill caches
        levels = {}
        for c in args.concurrency:
            r = load(url, ids, args.k, c, args.duration, seed=c)
            levels[str(c)] = r
            log(f"{c:>3} clients: {r['throughput_rps']:,.0f} req/s, p50 {r['p50_ms']:.2f} ms, p95 {r['p95_ms']:.2f} ms, "
                f"p99 {r['p99_ms']:.2f} ms, {r['requests']:,} requests, {r['non_2xx'] + r['socket_errors']} errors")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    import importlib.util

    # the server runs with this interpreter's packages: httptools and uvloop are dependencies since
    # issue 17 (serving/server.py); an environment from before it has h11 + asyncio only
    fast = all(importlib.util.find_spec(m) is not None for m in ("httptools", "uvloop"))
    stack = "uvicorn with httptools + uvloop" if fast else "uvicorn with h11 + asyncio (an environment from before issue 17)"
    slug = (f"synthetic-{meta['counts']['items']}" if not args.run else meta["dataset"]["name"]) + (
        f"-{args.kind}" if not args.run and args.kind != "auto" else "") + ("-httptools" if fast else "")
    cmd = ".venv/bin/python benchmarks/http_load.py" + (f" --run {args.run}" if args.run else "") + (
        f" --items {args.items}" if not args.run and args.items != 1_000_000 else "") + (
        f" --kind {args.kind}" if not args.run and args.kind != "auto" else "") + (
        f" --index-args \"{args.index_args}\"" if not args.run and args.index_args else "") + (f" -k {args.k}" if args.k != 100 else "") + (
        f" --client {args.client}" if args.client != "auto" else "") + (f" --serve-args \"{args.serve_args}\"" if args.serve_args else "")
    res = {"catalog": "synthetic clustered" if not args.run else f"{slug} (trained run)", "slug": slug,
           "n_items": meta["counts"]["items"], "k": args.k, "client": client, "duration_s": args.duration,
           "index": meta["index"], "levels": levels, "command": cmd, "machine": machine(), "server_stack": stack}
    out_dir = Path(args.out_dir)
    artifacts.write_json(out_dir / f"http-{slug}.json", res)
    render(out_dir, Path(args.doc))
    log(f"wrote {out_dir / f'http-{slug}.json'} and the HTTP section of {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
