"""Serving latency the way a deployment sees it: the server pinned to one core, the load generator
to the other (``taskset``), requests sent on a clock at a fixed rate (open loop) and latency
measured from the time each request was due, so that queueing counts; p50/p99 and the server's CPU
time per request (from ``/proc``) at 100, 200 and 400 requests/s. Optionally the model is swapped
three times while the load runs (to a second run and back; by default a hard-linked twin of the
first run): non-2xx must stay at zero, and the p99 of the requests due while a swap was loading is
reported beside the steady state's.

One command measures everything the acceptance asks for, on both catalogs (about 4 minutes on a quiet
2-core machine once the runs exist):

    flock /tmp/twotower-bench.lock .venv/bin/python benchmarks/open_loop.py --run synthetic runs/gowalla

``synthetic`` is the 1M-item synthetic run in ``--workdir`` (written and indexed first when missing:
``--prepare-only`` does that alone, about 6 minutes quiet, mostly the HNSW graph); the other runs are
trained run directories (``twotower train configs/gowalla.toml --out runs/gowalla`` and its index).
The swaps run under load on the first run only (``--swaps 0``: none). A result measured while other
work ran on the machine (load average before it above ``--quiet-load``) is marked as disturbed in
the results file and in the table.

The server is the product command, ``twotower serve RUN`` (one uvicorn worker, micro-batching),
started under ``taskset -c SERVER_CORE`` with one OpenMP / BLAS thread (it owns one core). The load
generator is this script in client mode under ``taskset -c CLIENT_CORE``: an asyncio loop over
keep-alive connections (a new one opened when all are busy, up to ``--connections``), fed by a
scheduler thread that sleeps to each request's due time (``time.sleep`` wakes within ~0.1 ms;
asyncio's own timers round up to 1 ms). Each request is ``POST /recommend`` ``{"user": U, "k": K}``
for a random known user (seen items excluded). The server's CPU time per request is the growth of
``utime + stime`` of its process (all threads) over a level divided by the requests it answered.
The synthetic run is ``http_load.py``'s (HNSW, efSearch tuned to recall@10 and @100 >= 0.95 on
real users). Writes ``benchmarks/results/open-loop-<catalog>.json`` and the section of
``docs/benchmarks.md``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
REQUEST_TIMEOUT = 60.0  # seconds: a request unanswered this long is an error (never a hang)
KEEP_ALIVE = 4.0  # seconds a client connection may sit idle and be reused (uvicorn closes them after 5)


# ---- client mode (runs pinned to its own core) --------------------------------------------------
async def _client(host: str, port: int, bodies: list[bytes], rate: float, duration: float, max_conns: int,
                  health: bool = False) -> dict:
    loop = asyncio.get_running_loop()
    n = int(rate * duration)
    due = np.empty(n)
    sent = np.full(n, np.nan)
    done = np.full(n, np.nan)
    status = np.zeros(n, dtype=np.int32)
    idle: list = []
    waiting: list = []  # requests due while every connection is busy and the cap is reached
    opened = [0]
    finished = asyncio.Event()
    left = [n]
    errors: list[str] = []

    async def connect():
        opened[0] += 1
        return await asyncio.open_connection(host, port)

    async def one(i: int):
        while idle:  # the connection used last; one the server may have closed (idle past its keep-alive) is not reused
            conn, since = idle.pop()
            if not conn[0].at_eof() and time.perf_counter() - since < KEEP_ALIVE:
                break
            conn[1].close()
            opened[0] -= 1
        else:
            conn = None
        if conn is not None:
            pass
        elif opened[0] < max_conns:
            conn = await connect()
        else:
            fut = loop.create_future()
            waiting.append(fut)
            conn = await fut
        reader, writer = conn
        body = bodies[i % len(bodies)]
        sent[i] = time.perf_counter()
        if health:
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        else:
            writer.write(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            status[i] = int(head[9:12])
            length = None
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length is None:
                raise ValueError(f"no content-length in {head[:200]!r}")
            await asyncio.wait_for(reader.readexactly(length), REQUEST_TIMEOUT)
            done[i] = time.perf_counter()
            if waiting:
                waiting.pop(0).set_result(conn)
            else:
                idle.append((conn, time.perf_counter()))
        except Exception as e:  # counted as an error; the connection is dropped and replaced
            status[i] = -1
            done[i] = time.perf_counter()
            errors.append(f"{type(e).__name__}: {e}"[:300])
            writer.close()
            opened[0] -= 1
            if waiting:
                try:
                    waiting.pop(0).set_result(await connect())
                except OSError as e2:
                    errors.append(f"reconnect: {e2}")
        left[0] -= 1
        if left[0] == 0:
            finished.set()

    def start(i):
        loop.create_task(one(i))

    for _ in range(min(8, max_conns)):  # a few connections ready before the clock starts
        idle.append((await connect(), time.perf_counter()))
    t0 = time.perf_counter() + 0.2

    def schedule():
        for i in range(n):
            t = t0 + i / rate
            due[i] = t
            wait = t - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            loop.call_soon_threadsafe(start, i)

    cpu0 = time.process_time()
    th = threading.Thread(target=schedule, daemon=True)
    th.start()
    try:
        await asyncio.wait_for(finished.wait(), timeout=duration + 120)
    except asyncio.TimeoutError:
        print(f"client: {left[0]} of {n} requests unanswered after {duration + 120:g} s ({len(waiting)} waiting for a "
              f"connection, {opened[0]} connections, {len(idle)} idle, {int(np.isnan(sent).sum())} never sent)", file=sys.stderr)
        raise
    th.join()
    cpu = time.process_time() - cpu0
    for (_, w), _ in idle:
        w.close()
    return {"due": (due - t0).tolist(), "latency_ms": ((done - due) * 1e3).tolist(), "lag_ms": ((sent - due) * 1e3).tolist(),
            "status": status.tolist(), "connections": opened[0], "client_cpu_s": cpu, "wall_s": time.perf_counter() - t0,
            "errors": errors[:20]}


def client_main(args) -> int:
    bodies = [json.dumps({"user": u, "k": args.k}).encode() for u in json.loads(Path(args.users_file).read_text())]
    res = asyncio.run(_client("127.0.0.1", args.port, bodies, args.rate, args.duration, args.connections, args.health))
    Path(args.out).write_text(json.dumps(res))
    return 0


# ---- orchestration --------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(run: Path, port: int, core: int, extra: list[str], log) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    cmd = ["taskset", "-c", str(core), sys.executable, "-m", "twotower.cli", "serve", str(run), "--port", str(port),
           "--log-level", "warning", *extra]
    log("server: " + " ".join(cmd[:3]) + " OMP_NUM_THREADS=1 twotower serve " + " ".join(cmd[7:]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    from http_load import wait_healthy

    return wait_healthy(proc, port, seconds=600)


def run_level(port: int, core: int, users_file: str, rate: float, duration: float, k: int, connections: int, pid: int,
              health: bool = False) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        cpu0, t0 = cpu_seconds(pid), time.time()
        subprocess.run(["taskset", "-c", str(core), sys.executable, __file__, "--client-mode", "--port", str(port),
                        "--users-file", users_file, "--rate", str(rate), "--duration", str(duration), "-k", str(k),
                        "--connections", str(connections), "--out", out] + (["--health"] if health else []),
                       check=True, timeout=duration + 300)
        cpu = cpu_seconds(pid) - cpu0
        res = json.loads(Path(out).read_text())
    finally:
        os.unlink(out)
    res["server_cpu_s"] = cpu
    res["t_start"] = t0
    return res


def summary(res: dict, mask=None) -> dict:
    lat = np.asarray(res["latency_ms"])
    st = np.asarray(res["status"])
    lag = np.asarray(res["lag_ms"])
    if mask is not None:
        lat, st, lag = lat[mask], st[mask], lag[mask]
    ok = st == 200
    pct = lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan")  # noqa: E731
    return {"requests": int(len(lat)), "non_2xx": int((~ok).sum()), "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90),
            "p99_ms": pct(lat, 99), "p999_ms": pct(lat, 99.9), "max_ms": float(lat.max()) if len(lat) else float("nan"),
            "mean_ms": float(lat.mean()) if len(lat) else float("nan"), "dispatch_lag_p50_ms": pct(lag, 50),
            "dispatch_lag_p99_ms": pct(lag, 99)}


def level_summary(res: dict, rate: float, duration: float) -> dict:
    s = summary(res)
    s.update({"rate": rate, "duration_s": duration, "achieved_rps": s["requests"] / res["wall_s"],
              "statuses": {str(k): int(v) for k, v in zip(*np.unique(res["status"], return_counts=True))},
              "client_errors": res.get("errors", [])[:5],
              "server_cpu_ms_per_request": res["server_cpu_s"] * 1e3 / max(s["requests"], 1),
              "server_cpu_utilisation": res["server_cpu_s"] / res["wall_s"],
              "client_cpu_utilisation": res["client_cpu_s"] / res["wall_s"], "connections": res["connections"]})
    return s


def breakdown(run: Path, core: int, k: int, log, n: int = 400) -> dict:
    """Where a request's server time goes, in this process pinned to the server's core with one
    thread (before the server starts): the index search alone (one query, k + the user's seen items,
    as the service asks), the user tower alone, and the serving code for a request (``Recommender``
    and the JSON of the answer) alone and in micro-batches of 8."""
    import faiss
    import torch

    from twotower.serving.query import Query, Recommender
    from twotower.serving.service import _encode

    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        rec = Recommender.load(run)
        users = np.flatnonzero(rec.run.known.lengths() > 0)
        users = np.random.default_rng(1).choice(users, min(n, len(users)), replace=False)
        raw = rec.run.users.decode(users).tolist()
        seen = rec.run.known.lengths()[users]
        q = rec.index.layout.queries(rec._known_user_vectors(users, [None] * len(users)), 0.0)

        def per_call(fn, reps):
            fn(0)
            t = time.perf_counter()
            for i in range(reps):
                fn(i)
            return (time.perf_counter() - t) * 1e3 / reps

        out = {"search_ms": per_call(lambda i: rec.index.search(q[i : i + 1], k + int(seen[i])), len(users)),
               "user_tower_ms": per_call(lambda i: rec._known_user_vectors(users[i : i + 1], [None]), len(users)),
               "serving_code_ms": per_call(lambda i: _encode(rec.recommend_many([Query(user=raw[i], k=k)])[0]), len(users)),
               "serving_code_batch8_ms_per_request": per_call(
                   lambda i: [_encode(r) for r in rec.recommend_many([Query(user=u, k=k) for u in raw[8 * i : 8 * i + 8]])],
                   len(users) // 8) / 8}
    finally:
        torch.set_num_threads(threads[0])
        faiss.omp_set_num_threads(threads[1])
        os.sched_setaffinity(0, before)
    log("breakdown (one core, one thread): " + ", ".join(f"{k} {v:.3f}" for k, v in out.items()))
    return out


def swap_phase(port: int, args, users_file: str, pid: int, token: str, runs: list[str], log) -> dict:
    """The load at ``args.swap_rate`` while the model is swapped ``args.swaps`` times (A -> B -> A ...)."""
    import httpx

    swaps = []

    def swapper():
        time.sleep(args.swap_first)
        for i in range(args.swaps):
            target = runs[(i + 1) % 2]
            t = time.time()
            r = httpx.post(f"http://127.0.0.1:{port}/admin/swap", json={"run": target},
                           headers={"Authorization": f"Bearer {token}"}, timeout=600)
            swaps.append({"run": target, "start": t, "end": time.time(), "status": r.status_code,
                          "server_seconds": r.json().get("seconds"), "detail": r.json().get("detail")})
            log(f"swap {i + 1} to {target}: {r.status_code} in {time.time() - t:.1f}s")
            time.sleep(args.swap_gap)

    th = threading.Thread(target=swapper, daemon=True)
    th.start()
    res = run_level(port, args.client_core, users_file, args.swap_rate, args.swap_duration, args.k, args.connections, pid)
    th.join()
    due = np.asarray(res["due"]) + res["t_start"] + 0.2  # approximately wall-clock due times (client t0 = start + ~0.2 s)
    during = np.zeros(len(due), bool)
    for s in swaps:
        during |= (due >= s["start"]) & (due <= s["end"] + 1.0)
    out = {"rate": args.swap_rate, "duration_s": args.swap_duration, "swaps": swaps, "all": level_summary(res, args.swap_rate, args.swap_duration),
           "during_swaps": summary(res, during), "outside_swaps": summary(res, ~during),
           "swaps_completed": sum(s["status"] == 200 for s in swaps)}
    return out


def markdown(results: list[dict]) -> str:
    lines = ["<!-- open-loop:begin -->", "## HTTP service, open loop on pinned cores", "",
             "`twotower serve` pinned to one core (`taskset`, one OpenMP/BLAS thread), the load generator to the other; "
             "requests sent on a clock at a fixed rate and latency measured from each request's due time, so time spent "
             "queueing (in the server or for a connection) counts. `POST /recommend` `{\"user\": U, \"k\": 100}` for random "
             "known users (seen items excluded). Server CPU per request: growth of the server process's utime + stime "
             "(every thread) over the level, divided by the requests answered. `benchmarks/open_loop.py`.", "",
             "One command measures every figure below on a quiet machine (about 4 minutes once the runs exist; "
             "`--prepare-only` writes and indexes the 1M-item synthetic run first, about 6 minutes): "
             "`flock /tmp/twotower-bench.lock .venv/bin/python benchmarks/open_loop.py --run synthetic runs/gowalla` "
             "(`runs/gowalla`: `twotower train configs/gowalla.toml --out runs/gowalla`, then `twotower index runs/gowalla`). "
             "The three swaps run under load on the first run, to a hard-linked twin of it and back.", ""]
    for res in results:
        idx = res["index"]
        m = idx.get("measured", {})
        names = {"hnsw": ("M", "ef_search"), "ivf": ("nlist", "nprobe"), "ivfpq": ("nlist", "nprobe", "pq_m", "refine")}
        knob = {k: v for k, v in idx["params"].items() if k in names.get(idx["kind"], ()) and v is not None}
        lines += [f"### {res['catalog']}: {res['n_items']:,} items, top-{res['k']}, {idx['kind'].upper()}", "", "```bash",
                  res["command"], "```", "",
                  f"Machine: {res['machine']}; server on core {res['server_core']}, client on core {res['client_core']}; "
                  f"server stack: {res['server_stack']}. Index: {idx['kind']} {json.dumps(knob)}, recall@10 "
                  f"{m.get('recall@10', float('nan')):.4f} and recall@100 {m.get('recall@100', float('nan')):.4f} against exact "
                  f"search on {m.get('queries', '?')} real users. Load average before: {res['load_before']} "
                  f"(`{res['uptime_before']}`); after: `{res['uptime_after']}`."
                  + (f" Measured in {res['seconds']:.0f} s." if "seconds" in res else ""), ""]
        if res.get("disturbed", True):
            lines += ["**Disturbed**: measured while other work shared the machine's two cores (load average above), so "
                      "neither the server nor the load generator owned its core; these figures are an upper bound, not "
                      "the acceptance figure. Rerun the command above on a quiet machine.", ""]
        lines += [
                  "| rate (req/s) | requests | achieved | p50 (ms) | p90 (ms) | p99 (ms) | p99.9 (ms) | max (ms) | non-2xx | server CPU per request (ms) | server core busy | client dispatch lag p99 (ms) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in res["levels"]:
            lines.append(f"| {r['rate']:g} | {r['requests']:,} | {r['achieved_rps']:.0f} | **{r['p50_ms']:.2f}** | {r['p90_ms']:.2f} | "
                         f"**{r['p99_ms']:.2f}** | {r['p999_ms']:.2f} | {r['max_ms']:.1f} | {r['non_2xx']} | "
                         f"**{r['server_cpu_ms_per_request']:.2f}** | {100 * r['server_cpu_utilisation']:.0f} % | "
                         f"{r['dispatch_lag_p99_ms']:.2f} |")
        b = res.get("breakdown")
        if b:
            lines += ["", "Where the server's time goes (one core, one thread; in-process, before the server starts; "
                          "the HTTP stack from `GET /health` at the middle rate):", "",
                      "| part | ms |", "| --- | --- |",
                      f"| index search alone (k + the user's seen items) | {b['search_ms']:.3f} |",
                      f"| user tower alone | {b['user_tower_ms']:.3f} |",
                      f"| serving code for one request (Recommender + JSON of the answer; includes the two above) | {b['serving_code_ms']:.3f} |",
                      f"| the same per request, in micro-batches of 8 | {b['serving_code_batch8_ms_per_request']:.3f} |",
                      f"| HTTP stack per request (server CPU for `GET /health`) | {b.get('http_health_cpu_ms_per_request', float('nan')):.3f} |"]
        sw = res.get("swap")
        if sw:
            a, d, o = sw["all"], sw["during_swaps"], sw["outside_swaps"]
            secs = ", ".join(f"{s['end'] - s['start']:.1f}" for s in sw["swaps"])
            lines += ["", f"**Three swaps under load** ({sw['rate']:g} req/s for {sw['duration_s']:g} s; swaps to "
                          f"`{Path(sw['swaps'][0]['run']).name}` and back, each loading and warming the run and its index "
                          f"beside the serving one: {secs} s): {sw['swaps_completed']} of {len(sw['swaps'])} swaps done, "
                          f"**non-2xx {a['non_2xx']}** of {a['requests']:,} requests.", "",
                      "| requests due | count | p50 (ms) | p99 (ms) | p99.9 (ms) | max (ms) | non-2xx |", "| --- | --- | --- | --- | --- | --- | --- |"]
            for name, s in (("while a swap loads (its start to 1 s after its end)", d), ("outside the swaps", o), ("all", a)):
                lines.append(f"| {name} | {s['requests']:,} | {s['p50_ms']:.2f} | **{s['p99_ms']:.2f}** | {s['p999_ms']:.2f} | "
                             f"{s['max_ms']:.1f} | {s['non_2xx']} |")
        lines.append("")
    lines += ["Result files: `benchmarks/results/open-loop-<catalog>.json`.", "<!-- open-loop:end -->"]
    return "\n".join(lines)


def render(out_dir: Path, doc: Path) -> None:
    from ann import write_section

    every = [json.loads(f.read_text()) for f in sorted(out_dir.glob("open-loop-*.json"))]
    every.sort(key=lambda r: (not r["slug"].startswith("synthetic"), -r["n_items"], r["slug"]))
    write_section(doc, markdown(every), "<!-- open-loop:begin -->", "<!-- open-loop:end -->")


def twin_of(run: Path, workdir: Path) -> Path:
    """A second run directory holding the same files as ``run`` (hard links where the file system
    allows, else copies): what the swaps alternate with when no ``--swap-to`` is given."""
    import shutil

    twin = workdir / f"{run.name}-twin"
    if (twin / "manifest.json").is_file() and (twin / "manifest.json").read_bytes() == (run / "manifest.json").read_bytes() \
            and sorted(p.name for p in (twin / "index").glob("*")) == sorted(p.name for p in (run / "index").glob("*")):
        return twin
    shutil.rmtree(twin, ignore_errors=True)
    twin.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(run, twin, copy_function=os.link)
    except OSError:
        shutil.rmtree(twin, ignore_errors=True)
        shutil.copytree(run, twin)
    return twin


def measure(run: Path, run_arg: str, args, swap_to: str | None, log) -> dict:
    """Every level against one server of ``run``: the breakdown, the rates, ``GET /health``, the swaps."""
    import httpx

    from ann import machine
    from http_load import free_port

    t_begin = time.time()
    users = json.loads((run / "users.json").read_text())["ids"]
    pick = [users[i] for i in np.random.default_rng(0).choice(len(users), min(len(users), 5000), replace=False)]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(pick, f)
        users_file = f.name
    token = None
    extra = args.serve_args.split()
    if swap_to:
        import secrets

        token = secrets.token_urlsafe(32)
        tok = Path(tempfile.mkdtemp()) / "token"
        tok.write_text(token)
        tok.chmod(0o600)
        extra += ["--admin-token-file", str(tok)]
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()
    log(uptime)
    parts = breakdown(run, args.server_core, args.k, log) if not args.no_breakdown else None
    port = free_port()
    proc = start_server(run, port, args.server_core, extra, log)
    try:
        meta = httpx.get(f"http://127.0.0.1:{port}/metadata", timeout=30).json()
        log(f"server pid {proc.pid}, affinity {sorted(os.sched_getaffinity(proc.pid))}; warming up {args.warmup:g} s")
        run_level(port, args.client_core, users_file, args.rates[0], args.warmup, args.k, args.connections, proc.pid)
        levels = []
        for rate in args.rates:
            res = run_level(port, args.client_core, users_file, rate, args.duration, args.k, args.connections, proc.pid)
            s = level_summary(res, rate, args.duration)
            levels.append(s)
            log(f"{rate:>5g} req/s: p50 {s['p50_ms']:.2f} ms, p90 {s['p90_ms']:.2f}, p99 {s['p99_ms']:.2f}, max {s['max_ms']:.1f}; "
                f"server CPU {s['server_cpu_ms_per_request']:.2f} ms/request ({100 * s['server_cpu_utilisation']:.0f} % of its core); "
                f"{s['non_2xx']} non-2xx; dispatch lag p99 {s['dispatch_lag_p99_ms']:.2f} ms")
        if parts is not None:  # the HTTP stack alone: GET /health at the middle rate
            rate = args.rates[len(args.rates) // 2]
            seconds = min(args.duration, 5)
            res = run_level(port, args.client_core, users_file, rate, seconds, args.k, args.connections, proc.pid, health=True)
            h = level_summary(res, rate, seconds)
            parts["http_health_cpu_ms_per_request"] = h["server_cpu_ms_per_request"]
            parts["http_health_p50_ms"] = h["p50_ms"]
            log(f"GET /health at {rate:g} req/s: server CPU {h['server_cpu_ms_per_request']:.3f} ms per request, p50 {h['p50_ms']:.2f} ms")
        swap = None
        if swap_to:
            swap = swap_phase(port, args, users_file, proc.pid, token, [str(run), str(swap_to)], log)
            log(f"swaps: {swap['swaps_completed']} done; non-2xx {swap['all']['non_2xx']}; p99 during swaps "
                f"{swap['during_swaps']['p99_ms']:.2f} ms, outside {swap['outside_swaps']['p99_ms']:.2f} ms")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.unlink(users_file)
    import importlib.util

    fast = all(importlib.util.find_spec(m) is not None for m in ("httptools", "uvloop"))
    stack = "uvicorn with httptools + uvloop" if fast else "uvicorn with h11 + asyncio (the declared dependencies)"
    synthetic = run_arg == "synthetic"
    slug = (f"synthetic-{meta['counts']['items']}" if synthetic else meta["dataset"]["name"]) + ("-httptools" if fast else "")
    return {"catalog": "synthetic clustered" if synthetic else f"{meta['dataset']['name']} (trained run)", "slug": slug,
            "n_items": meta["counts"]["items"], "k": args.k, "index": meta["index"], "levels": levels, "swap": swap,
            "breakdown": parts, "server_core": args.server_core, "client_core": args.client_core, "server_stack": stack,
            "machine": machine(), "load_before": f"{load[0]:.1f}", "uptime_before": uptime,
            "disturbed": bool(load[0] > args.quiet_load), "seconds": time.time() - t_begin,
            "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", nargs="+", default=["synthetic"], metavar="RUN",
                   help="run directories to serve, one after the other; `synthetic` is the 1M-item synthetic run in "
                        "--workdir (default: synthetic)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "twotower-bench"),
                   help="where the synthetic run (and the twins the swaps use) are kept (default %(default)s)")
    p.add_argument("--prepare-only", action="store_true", help="write and index the synthetic run, then stop")
    p.add_argument("--rates", type=float, nargs="+", default=[100, 200, 400], help="request rates (default 100 200 400)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per rate (default 15)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load at the first rate before measuring (default 5)")
    p.add_argument("-k", type=int, default=100)
    p.add_argument("--connections", type=int, default=64, help="most client connections (default 64)")
    p.add_argument("--server-core", type=int, default=1)
    p.add_argument("--client-core", type=int, default=0)
    p.add_argument("--serve-args", default="", help="extra arguments for `twotower serve`")
    p.add_argument("--no-breakdown", action="store_true", help="skip the measurement of where a request's time goes")
    p.add_argument("--swaps", type=int, default=3, help="swaps under load, on the first run (default 3; 0: none)")
    p.add_argument("--swap-to", metavar="RUN2", help="the run the swaps alternate with (default: a hard-linked twin of the first run)")
    p.add_argument("--swap-rate", type=float, default=200.0)
    p.add_argument("--swap-duration", type=float, default=60.0, help="seconds of load while swapping (default 60)")
    p.add_argument("--swap-first", type=float, default=5.0, help="seconds of load before the first swap")
    p.add_argument("--swap-gap", type=float, default=3.0, help="seconds between the end of a swap and the next")
    p.add_argument("--quiet-load", type=float, default=0.5,
                   help="a load average above this before a run marks its figures as disturbed (default 0.5)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--render-only", action="store_true")
    # client mode (internal)
    p.add_argument("--client-mode", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--users-file", help=argparse.SUPPRESS)
    p.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--health", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client_mode:
        return client_main(args)
    if args.render_only:
        render(Path(args.out_dir), Path(args.doc))
        return 0
    from http_load import prepare_synthetic
    from twotower import artifacts

    log = lambda m: print(m, flush=True)  # noqa: E731
    t0 = time.time()
    workdir = Path(args.workdir)
    if args.prepare_only:
        run = prepare_synthetic(workdir, 1_000_000, "auto", log)
        log(f"synthetic run ready in {run} ({time.time() - t0:.0f} s)")
        return 0
    runs = []
    for arg in args.run:  # every run checked before anything is measured
        run = Path(arg) if arg != "synthetic" else None
        if run is not None and not (run / "manifest.json").is_file():
            p.error(f"--run {arg}: not a run directory (no manifest.json); train one, e.g. "
                    f"`twotower train configs/gowalla.toml --out {arg}`, and index it")
        runs.append((arg, run))
    os.sched_setaffinity(0, {args.client_core})  # this process only orchestrates: it stays off the server's core
    cmd = "flock /tmp/twotower-bench.lock .venv/bin/python benchmarks/open_loop.py" + (
        f" --run {' '.join(args.run)}" if args.run != ["synthetic"] else "") + (
        f" --workdir {args.workdir}" if args.workdir != p.get_default("workdir") else "") + (
        f" --rates {' '.join(f'{r:g}' for r in args.rates)}" if args.rates != [100, 200, 400] else "") + (
        f" --duration {args.duration:g}" if args.duration != p.get_default("duration") else "") + (
        f" --swaps {args.swaps}" if args.swaps != 3 else "") + (f" --swap-to {args.swap_to}" if args.swap_to else "") + (
        f" --serve-args \"{args.serve_args}\"" if args.serve_args else "")
    out_dir = Path(args.out_dir)
    written = []
    for i, (arg, run) in enumerate(runs):
        if run is None:
            run = prepare_synthetic(workdir, 1_000_000, "auto", log)
        swap_to = None
        if i == 0 and args.swaps > 0:
            swap_to = args.swap_to or str(twin_of(run, workdir))
        res = measure(run, arg, args, swap_to, log)
        res["command"] = cmd
        artifacts.write_json(out_dir / f"open-loop-{res['slug']}.json", res)
        written.append(out_dir / f"open-loop-{res['slug']}.json")
        log(f"{arg}: measured in {res['seconds']:.0f} s" + (" (DISTURBED: load average "
                                                            f"{res['load_before']} before it)" if res["disturbed"] else ""))
    render(out_dir, Path(args.doc))
    log(f"wrote {', '.join(map(str, written))} and the open-loop section of {args.doc} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
