"""Load test of the HTTP service: a fixed number of requests (default 10,000) from concurrent clients
(default 32) over loopback against ``twotower serve RUN`` (uvicorn, one worker), a mix of request
types, deliberately bad requests among them. Pass: no 5xx, no connection error, every good request
answered 200 and every bad one with its 4xx. Reports p50/p95/p99 latency, overall and per kind.

    .venv/bin/python benchmarks/load_test.py --run runs/ml100k
    .venv/bin/python benchmarks/load_test.py --run runs/ml100k --requests 2000 --concurrency 8

The mix (fixed by ``--seed``, shuffled): 40 % a known user's top-20 (seen items excluded), 20 % a
new user by history (1 to 50 raw item ids, some unknown, alpha 0.5), 10 % a batch of 8 known
users, 20 % similar items, 10 % bad requests cycling through malformed JSON, k out of range, wrong
types, an unknown field, unknown user / item / category, a history over the 10,000 cap, an empty
batch, a body over the 1 MB limit. Latency is measured by the client (asyncio + httpx, one
connection per client, closed loop), which shares the machine's cores with the server. Writes
``benchmarks/results/load-<dataset>.json`` and the load-test section of ``docs/benchmarks.md``.
Exits 1 if any request got a 5xx, a connection error, or a status other than the expected one.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from ann import machine, write_section  # noqa: E402
from http_load import free_port, start_server  # noqa: E402
from twotower import artifacts  # noqa: E402

BEGIN, END = "<!-- load:begin -->", "<!-- load:end -->"
JSON = {"content-type": "application/json"}
KINDS = ["known user", "new user", "batch of 8", "similar", "bad request"]


def bad_requests(user, item) -> list[tuple[str, str, str, dict, int]]:
    """(label, method, path, httpx kwargs, expected status): client mistakes that must be 4xx."""
    return [
        ("malformed JSON", "POST", "/recommend", {"content": b'{"user": ' + str(user).encode(), "headers": JSON}, 400),
        ("k = 0", "POST", "/recommend", {"json": {"user": user, "k": 0}}, 422),
        ("k = -3", "POST", "/recommend", {"json": {"user": user, "k": -3}}, 422),
        ("k = 10**9", "POST", "/recommend", {"json": {"user": user, "k": 10**9}}, 422),
        ("alpha as text", "POST", "/recommend", {"json": {"user": user, "alpha": "high"}}, 422),
        ("unknown field", "POST", "/recommend", {"json": {"user": user, "topk": 10}}, 422),
        ("unknown user", "POST", "/recommend", {"json": {"user": "no-such-user", "k": 10}}, 404),
        ("unknown category", "POST", "/recommend", {"json": {"user": user, "category": "no-such-category"}}, 422),
        ("history over 10,000", "POST", "/recommend", {"json": {"history": [item] * 10_001}}, 422),
        ("empty batch", "POST", "/recommend/batch", {"json": {"requests": []}}, 422),
        ("unknown item", "GET", "/items/no-such-item/similar", {}, 404),
        ("similar k = 0", "GET", f"/items/{item}/similar", {"params": {"k": 0}}, 422),
        ("body over 1 MB", "POST", "/recommend", {"content": b'{"history": [' + b"1," * 600_000 + b"1]}", "headers": JSON}, 413),
    ]


def make_plan(users: list, items: list, n: int, seed: int) -> list[tuple[str, str, str, dict, int]]:
    """``n`` requests: (kind, method, path, httpx kwargs, expected status), shuffled."""
    rng = np.random.default_rng(seed)
    pick = lambda ids: ids[int(rng.integers(len(ids)))]  # noqa: E731
    bad = bad_requests(users[0], items[0])
    plan, n_bad = [], 0
    for i in range(n):
        slot = i % 10
        if slot < 4:
            plan.append(("known user", "POST", "/recommend", {"json": {"user": pick(users), "k": 20}}, 200))
        elif slot < 6:
            hist = [pick(items) for _ in range(int(rng.integers(1, 51)))] + (["no-such-item"] if slot == 5 else [])
            plan.append(("new user", "POST", "/recommend", {"json": {"history": hist, "k": 20, "alpha": 0.5}}, 200))
        elif slot == 6:
            plan.append(("batch of 8", "POST", "/recommend/batch",
                         {"json": {"requests": [{"user": pick(users), "k": 10} for _ in range(8)]}}, 200))
        elif slot < 9:
            plan.append(("similar", "GET", f"/items/{pick(items)}/similar", {"params": {"k": 10}}, 200))
        else:
            label, method, path, kw, status = bad[n_bad % len(bad)]
            n_bad += 1
            plan.append(("bad request", method, path, {**kw, "label": label}, status))
    return [plan[i] for i in rng.permutation(n)]


def _detail(r) -> str:
    """The error's ``detail``, or "" when the body is not the service's JSON error (then counted as a
    4xx without a message instead of crashing the client)."""
    try:
        body = r.json()
    except ValueError:
        return ""
    return str(body.get("detail", "")) if isinstance(body, dict) else ""


async def _drive(base: str, plan: list, concurrency: int) -> tuple[list, float]:
    import httpx

    out: list = [None] * len(plan)
    next_i = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        async def worker():
            nonlocal next_i
            while next_i < len(plan):
                i = next_i
                next_i += 1
                _, method, path, kw, _ = plan[i]
                kw = {k: v for k, v in kw.items() if k != "label"}
                t = time.perf_counter()
                try:
                    r = await client.request(method, path, **kw)
                    status, detail = r.status_code, (_detail(r) if r.status_code >= 400 else "")
                except httpx.HTTPError as e:  # connection refused/reset, timeout: counted, never hidden
                    status, detail = -1, f"{type(e).__name__}: {e}"
                out[i] = (status, time.perf_counter() - t, detail)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return out, time.perf_counter() - t0


def _pct(ms: np.ndarray) -> dict:
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "max_ms": float(ms.max())}


def summarize(plan: list, out: list, wall: float) -> dict:
    ms = np.array([o[1] for o in out]) * 1e3
    statuses = [o[0] for o in out]
    kinds = np.array([p[0] for p in plan])
    res = {"requests": len(plan), "duration_s": wall, "throughput_rps": len(plan) / wall, **_pct(ms),
           "status_counts": {str(k): v for k, v in sorted(Counter(statuses).items())},
           "server_errors_5xx": sum(s >= 500 for s in statuses), "connection_errors": sum(s < 0 for s in statuses),
           "per_kind": {}, "bad_requests": {}}
    for kind in KINDS:
        sel = kinds == kind
        if sel.any():
            res["per_kind"][kind] = {"requests": int(sel.sum()), **_pct(ms[sel])}
    wrong = []
    for p, o in zip(plan, out):
        if p[0] == "bad request":
            label = p[3]["label"]
            b = res["bad_requests"].setdefault(label, {"expected": p[4], "got": {}, "detail": o[2][:160]})
            b["got"][str(o[0])] = b["got"].get(str(o[0]), 0) + 1
            if o[0] >= 400 and not o[2]:
                wrong.append({"request": label, "status": o[0], "problem": "4xx without a detail"})
        if o[0] != p[4]:
            wrong.append({"request": p[3].get("label", p[0]), "path": p[2], "expected": p[4], "status": o[0], "detail": o[2][:200]})
    res["unexpected"] = len(wrong)
    res["unexpected_examples"] = wrong[:10]
    return res


def markdown(results: list[dict]) -> str:
    lines = [BEGIN, "## Load test: 4xx for every mistake, never a 5xx", "",
             "A fixed number of requests from concurrent clients over loopback against `twotower serve RUN` (uvicorn, one "
             "worker, micro-batching), closed loop. The mix: 40 % a known user's top-20, 20 % a new user by history (1 to 50 "
             "item ids, some unknown), 10 % a batch of 8 known users, 20 % similar items, 10 % deliberately bad requests "
             "(malformed JSON, k out of range, wrong types, an unknown field, unknown user / item / category, a history over "
             "the cap, an empty batch, a body over 1 MB), each of which must come back with its 4xx and a `detail`. The "
             "client (asyncio + httpx) runs on the same machine and takes its share of the cores: the latencies include "
             "its overhead. Exit status 1 on any 5xx, connection error or unexpected status.", ""]
    for r in results:
        s = r["summary"]
        lines += [f"### {r['catalog']}: {r['n_items']:,} items, {r['n_users']:,} users", "", "```bash", r["command"], "```", "",
                  f"Machine: {r['machine']}. Server: {r['server_stack']}, one worker; index {r['index_kind']}. "
                  f"{s['requests']:,} requests at {r['concurrency']} concurrent clients in {s['duration_s']:.1f} s "
                  f"({s['throughput_rps']:,.0f} requests/s) after {r['warmup']} warm-up requests; machine load average "
                  f"{s.get('load_average_before', float('nan')):.1f} before the run.", "",
                  f"**5xx: {s['server_errors_5xx']}**, connection errors: {s['connection_errors']}, unexpected statuses: "
                  f"{s['unexpected']}; statuses: " + ", ".join(f"{k}: {v:,}" for k, v in s["status_counts"].items()) + ".", "",
                  "| requests | count | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) |", "| --- | --- | --- | --- | --- | --- |",
                  f"| **all** | {s['requests']:,} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} | {s['p99_ms']:.1f} | {s['max_ms']:.1f} |"]
        for kind, k in s["per_kind"].items():
            lines.append(f"| {kind} | {k['requests']:,} | {k['p50_ms']:.1f} | {k['p95_ms']:.1f} | {k['p99_ms']:.1f} | {k['max_ms']:.1f} |")
        lines += ["", "| bad request | expected | got |", "| --- | --- | --- |"]
        for label, b in s["bad_requests"].items():
            lines.append(f"| {label} | {b['expected']} | " + ", ".join(f"{k} x{v}" for k, v in b["got"].items()) + " |")
        lines.append("")
    lines += ["Result files: `benchmarks/results/load-<dataset>.json`.", END]
    return "\n".join(lines)


def render(out_dir: Path, doc: Path) -> None:
    every = [json.loads(f.read_text()) for f in sorted(out_dir.glob("load-*.json"))]
    write_section(doc, markdown(every), BEGIN, END)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a trained run directory (e.g. runs/ml100k)")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--warmup", type=int, default=200, help="requests sent first and not counted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-args", default="", help="extra arguments for `twotower serve`")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--no-doc", action="store_true", help="write the result file only")
    p.add_argument("--render-only", action="store_true", help="only rewrite the doc section from the result files")
    args = p.parse_args(argv)
    if args.render_only:
        render(Path(args.out_dir), Path(args.doc))
        return 0
    if not args.run:
        p.error("--run RUN is required (train one: twotower train configs/ml-100k.toml --out runs/ml100k)")
    import importlib.util

    import httpx

    run = Path(args.run)
    users = json.loads((run / "users.json").read_text())["ids"]
    items = json.loads((run / "items.json").read_text())["ids"]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()[0]
    print(f"starting twotower serve {run} on 127.0.0.1:{port}", flush=True)
    proc = start_server(run, port, args.serve_args.split())
    try:
        meta = httpx.get(f"{base}/metadata", timeout=10).json()
        asyncio.run(_drive(base, make_plan(users, items, args.warmup, args.seed + 1), args.concurrency))
        plan = make_plan(users, items, args.requests, args.seed)
        out, wall = asyncio.run(_drive(base, plan, args.concurrency))
        alive = httpx.get(f"{base}/health", timeout=10).status_code == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except Exception:
            proc.kill()
    s = summarize(plan, out, wall)
    s["healthy_after"] = alive
    s["load_average_before"] = round(load_before, 2)  # 1-minute load of the machine (other work slows every figure)
    # the server runs with this interpreter's packages; what uvicorn picks from them (``twotower serve``
    # since issue 17: httptools always, uvloop where installed; before it, uvicorn's "auto")
    has = {m: importlib.util.find_spec(m) is not None for m in ("httptools", "uvloop")}
    stack = (f"uvicorn with httptools + {'uvloop' if has['uvloop'] else 'asyncio'}" if has["httptools"]
             else "uvicorn with h11 + asyncio")
    name = meta["dataset"]["name"] or run.name
    cmd = f".venv/bin/python benchmarks/load_test.py --run {args.run}" + (
        f" --requests {args.requests}" if args.requests != 10_000 else "") + (
        f" --concurrency {args.concurrency}" if args.concurrency != 32 else "") + (
        f" --serve-args \"{args.serve_args}\"" if args.serve_args else "")
    res = {"catalog": f"{name} (trained run)", "slug": name, "n_items": meta["counts"]["items"], "n_users": meta["counts"]["users"],
           "index_kind": meta["index"]["kind"], "concurrency": args.concurrency, "warmup": args.warmup, "seed": args.seed,
           "command": cmd, "machine": machine(), "client": "asyncio + httpx",
           "server_stack": stack, "summary": s}
    out_dir = Path(args.out_dir)
    artifacts.write_json(out_dir / f"load-{name}.json", res)
    if not args.no_doc:
        render(out_dir, Path(args.doc))
    print(f"{s['requests']:,} requests, {args.concurrency} clients, {s['duration_s']:.1f} s, {s['throughput_rps']:,.0f} req/s; "
          f"p50 {s['p50_ms']:.1f} ms, p95 {s['p95_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms; 5xx {s['server_errors_5xx']}, "
          f"connection errors {s['connection_errors']}, unexpected statuses {s['unexpected']}; statuses {s['status_counts']}")
    for w in s["unexpected_examples"]:
        print("  unexpected:", w)
    print(f"wrote {out_dir / f'load-{name}.json'}" + ("" if args.no_doc else f" and the load-test section of {args.doc}"))
    return 0 if s["server_errors_5xx"] == 0 and s["connection_errors"] == 0 and s["unexpected"] == 0 and alive else 1


if __name__ == "__main__":
    sys.exit(main())
