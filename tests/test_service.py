"""The HTTP service through real HTTP: a uvicorn server on a free loopback port, called with httpx.
Recommendations for known and new users, seen items excluded, the popularity correction, the
category filter, batches, similar items, metadata, and a 4xx that says what to fix for every
client mistake."""
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from _trained import tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    return tiny_run(tmp_path_factory, data_dir)


@pytest.fixture(scope="module")
def recommender(run_dir):
    from twotower.index.index import IndexParams
    from twotower.index.run_index import build_run_index
    from twotower.run import Run
    from twotower.serving.query import Recommender

    run = Run(run_dir)
    folder = run_dir.parent / "ivf-index"  # an ANN index, so that the service path runs through FAISS
    build_run_index(run, IndexParams(kind="ivf", nlist=16), folder, sample=200, progress=False, log=lambda m: None)
    return Recommender.load(run, folder)


@pytest.fixture(scope="module")
def server(recommender):
    import uvicorn

    from twotower.serving.server import ServerSettings, uvicorn_config  # the stack `twotower serve` runs
    from twotower.serving.service import create_app

    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say TCP (with proto 0 every
    # answer waits ~40 ms for a delayed ACK)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn_config(create_app(recommender, max_body_bytes=200_000), ServerSettings(), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    assert srv.started, "server did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


def _items(resp):
    assert resp.status_code == 200, resp.text
    return [x["item"] for x in resp.json()["items"]]


def test_known_user_gets_k_raw_ids_best_first(client, recommender):
    r = client.post("/recommend", json={"user": 196, "k": 10})
    body = r.json()
    items = _items(r)
    assert len(items) == 10 and body["user"] == 196 and body["fallback"] is None
    assert set(items) <= set(recommender.run.items.ids.tolist())
    scores = [x["score"] for x in body["items"]]
    assert scores == sorted(scores, reverse=True)
    # the same user as a string id is the same user
    assert _items(client.post("/recommend", json={"user": "196", "k": 10})) == items


def test_seen_items_are_excluded_unless_asked(client, recommender):
    run = recommender.run
    users = run.users.ids[:20].tolist()
    included_any = False
    for u in users:
        seen = set(run.history_of(u).tolist())
        assert not seen & set(_items(client.post("/recommend", json={"user": u, "k": 100})))
        with_seen = _items(client.post("/recommend", json={"user": u, "k": 100, "exclude_seen": False}))
        included_any |= bool(seen & set(with_seen))
    assert included_any


def test_new_user_by_history_ignores_and_reports_unknown_ids(client):
    r = client.post("/recommend", json={"history": [1, 50, "no-such-item", 999999], "k": 20})
    body = r.json()
    items = _items(r)
    assert len(items) == 20 and not {1, 50} & set(items)
    assert body["unknown_items"] == ["no-such-item", 999999] and body["fallback"] is None
    assert body["user"] is None


def test_empty_history_falls_back_to_popularity(client, recommender):
    r = client.post("/recommend", json={"history": ["nope"], "k": 5})
    body = r.json()
    assert body["fallback"] == "popularity" and body["unknown_items"] == ["nope"]
    top = recommender.run.items.decode(np.argsort(-recommender.run.item_counts, kind="stable")[:5]).tolist()
    assert _items(r) == top
    assert client.post("/recommend", json={"history": [], "k": 3}).json()["fallback"] == "popularity"


def test_larger_alpha_moves_results_to_less_popular_items(client, recommender):
    run = recommender.run
    users = run.users.ids[:60].tolist()
    mean_log_p = []
    for alpha in (0.0, 0.5, 2.0):
        reqs = [{"user": u, "k": 20, "alpha": alpha} for u in users]
        res = client.post("/recommend/batch", json={"requests": reqs}).json()["results"]
        items = np.concatenate([run.items.encode([x["item"] for x in r["items"]]) for r in res])
        mean_log_p.append(recommender.log_p[items].mean())
    assert mean_log_p[0] > mean_log_p[1] > mean_log_p[2]


def test_category_filter_returns_only_that_category(client, recommender):
    run = recommender.run
    drama = set(run.items.decode(run.item_category_items("genre", "Drama")).tolist())
    for body in ({"user": 196, "k": 50, "category": "Drama"}, {"history": [1, 2, 3], "k": 50, "category": "Drama"},
                 {"history": [], "k": 10, "category": "Drama"}):
        items = _items(client.post("/recommend", json=body))
        assert len(items) == body["k"] and set(items) <= drama
    horror = set(run.items.decode(run.item_category_items("genre", "Horror")).tolist())
    assert set(_items(client.post("/recommend", json={"user": 1, "k": 10, "category": "Horror", "alpha": 1.0}))) <= horror


def test_batch_answers_each_request_and_isolates_errors(client):
    reqs = [{"user": 196, "k": 5}, {"user": "nobody", "k": 5}, {"history": [50], "k": 3, "category": "Comedy"}]
    res = client.post("/recommend/batch", json={"requests": reqs}).json()["results"]
    assert len(res) == 3 and len(res[0]["items"]) == 5 and len(res[2]["items"]) == 3
    assert res[1]["status"] == 404 and "history" in res[1]["detail"]
    one = client.post("/recommend", json={"user": 196, "k": 5}).json()
    assert res[0]["items"] == one["items"]


def test_similar_items_health_metadata_and_docs(client, recommender):
    r = client.get("/items/50/similar", params={"k": 5})
    items = _items(r)
    assert len(items) == 5 and 50 not in items and r.json()["item"] == 50
    assert client.get("/health").json()["status"] == "ok"
    meta = client.get("/metadata").json()
    assert meta["index"]["kind"] == "ivf" and meta["index"]["params"]["nlist"] == 16
    assert meta["index"]["measured"]["recall@10"] > 0.5 and meta["counts"]["items"] == len(recommender.run.items)
    assert meta["category_feature"] == "genre" and "Drama" in meta["categories"] and meta["dataset"]["name"] == "ml-100k"
    assert client.get("/docs").status_code == 200
    assert "/recommend" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("kwargs,status,needle", [
    ({"content": b'{"user": 196, "k": '}, 400, "malformed JSON"),
    ({"content": b"user=196"}, 400, "malformed JSON"),
    ({"json": [196]}, 422, "expected a JSON object"),
    ({"json": {"user": 196, "k": "ten"}}, 422, "k as an integer between 1 and 1000"),
    ({"json": {"user": 196, "k": 0}}, 422, "between 1 and 1000"),
    ({"json": {"user": 196, "k": 1001}}, 422, "between 1 and 1000"),
    ({"json": {"user": 196, "k": 10.5}}, 422, "integer"),
    ({"json": {"user": 196, "alpha": "high"}}, 422, "alpha"),
    ({"json": {"user": 196, "exclude_seen": "yes"}}, 422, "true or false"),
    ({"json": {"user": 196, "history": [1]}}, 422, "not both"),
    ({"json": {"k": 10}}, 422, "send either"),
    ({"json": {"user": 196, "topk": 10}}, 422, "unknown field 'topk'"),
    ({"json": {"history": "1,2,3"}}, 422, "list of raw item ids"),
    ({"json": {"user": 196, "category": "Cooking"}}, 422, "Drama"),
    ({"json": {"user": 123456789}}, 404, "\"history\""),
    ({"json": {"history": [1], "features": {"shoe_size": "42"}}}, 422, "unknown user feature"),
    ({"content": b""}, 400, "malformed JSON"),
    ({"content": b'{"user": 196}{"user": 1}'}, 400, "malformed JSON"),
    ({"content": b'{"user": 196, "alpha": NaN}'}, 422, "finite number"),
    ({"content": b"null"}, 422, "expected a JSON object"),
    ({"json": {"user": 196, "k": -5}}, 422, "between 1 and 1000"),
    ({"json": {"user": 196, "k": 10**30}}, 422, "between 1 and 1000"),
    ({"json": {"user": 196, "k": True}}, 422, "integer"),
    ({"json": {"user": 196, "alpha": 1e300}}, 422, "alpha"),
    ({"json": {"user": [196]}}, 422, "raw user id"),
    ({"json": {"user": 196.5}}, 422, "raw user id"),
    ({"json": {"history": [1.5]}}, 422, "list of raw item ids"),
    ({"json": {"history": list(range(10_001))}}, 422, "at most 10000"),
    ({"json": {"history": [1], "features": ["age"]}}, 422, "features"),
    ({"json": {"user": 2**64}}, 404, "not known"),  # beyond int64: unknown, not an overflow
    ({"json": {"user": -1}}, 404, "not known"),
])
def test_client_mistakes_are_4xx_that_say_what_to_fix(client, kwargs, status, needle):
    headers = {"content-type": "application/json"}
    r = client.post("/recommend", headers=headers, **kwargs)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"], r.json()


def test_oversize_bodies_and_bad_batches_and_bad_similar_requests(client):
    big = {"history": list(range(60_000)), "k": 10}
    r = client.post("/recommend", json=big)
    assert r.status_code == 413 and "bytes" in r.json()["detail"]
    # a body without Content-Length (chunked) is counted while it is read
    r = client.post("/recommend", content=iter([b'{"history": [' + b"1," * 150_000, b'1]}']),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.post("/recommend/batch", json={"requests": []})
    assert r.status_code == 422 and "requests" in r.json()["detail"]
    r = client.post("/recommend/batch", json={"requests": [{"user": 196, "k": -1}]})
    assert r.status_code == 422 and "requests.0.k" in r.json()["detail"]
    assert client.get("/items/no-such-item/similar").status_code == 404
    r = client.get("/items/50/similar", params={"k": 0})
    assert r.status_code == 422 and "k" in r.json()["detail"]
    assert client.get("/items/50/similar", params={"category": "Cooking"}).status_code == 422
    assert client.get("/health").status_code == 200  # still serving


def test_client_mistakes_in_batches_and_similar_requests_are_4xx(client):
    h = {"content-type": "application/json"}
    r = client.post("/recommend/batch", content=b'{"requests": [', headers=h)
    assert r.status_code == 400 and "malformed JSON" in r.json()["detail"]
    r = client.post("/recommend/batch", content=b'{"requests": [{"user": 196}]}', headers={"content-type": "text/plain"})
    assert r.status_code == 422 and "Content-Type: application/json" in r.json()["detail"]
    r = client.post("/recommend/batch", json={"requests": [{"user": 196}] * 1001})
    assert r.status_code == 422 and "1 to 1000" in r.json()["detail"]
    r = client.post("/recommend/batch", json={"requests": {"user": 196}})
    assert r.status_code == 422 and "requests" in r.json()["detail"]
    # ids beyond int64 and lone surrogates (valid JSON, not UTF-8) are unknown ids, never a 500
    body = b'{"requests": [{"user": 18446744073709551616}, {"history": [18446744073709551616, "\\ud800", 50], "k": 3}]}'
    res = client.post("/recommend/batch", content=body, headers=h).json()["results"]
    assert res[0]["status"] == 404 and "not known" in res[0]["detail"]
    assert len(res[1]["items"]) == 3 and res[1]["unknown_items"] == [2**64, "\ud800"]
    for path, params, status in [("/items/99999999999999999999999/similar", {}, 404), ("/items/50/similar", {"k": -1}, 422),
                                 ("/items/50/similar", {"k": 10**30}, 422), ("/items/50/similar", {"k": "ten"}, 422),
                                 ("/items/50/similar", {"alpha": "nan"}, 422), ("/items/50/similar", {"alpha": "inf"}, 422)]:
        r = client.get(path, params=params)
        assert r.status_code == status and r.json()["detail"], (path, params, r.text)
    assert client.put("/recommend").status_code == 405 and client.get("/no-such-route").status_code == 404


@pytest.mark.slow
def test_500_concurrent_mixed_requests_get_no_5xx(server, recommender):
    """Behaviour under load, not timing: 500 requests from 32 concurrent clients over real HTTP, a mix
    of known users, new users by history, batches, similar items and deliberately bad requests (in
    the same micro-batches as good ones). Every good request gets 200, every bad one its 4xx, none a
    5xx, and the server answers afterwards. (`benchmarks/load_test.py` is the 10,000-request version.)"""
    import asyncio

    run = recommender.run
    users, items = run.users.ids[:100].tolist(), run.items.ids[:300].tolist()
    rng = np.random.default_rng(0)
    bad = [("POST", "/recommend", {"content": b'{"user": ', "headers": {"content-type": "application/json"}}, 400),
           ("POST", "/recommend", {"json": {"user": 196, "k": 0}}, 422),
           ("POST", "/recommend", {"json": {"user": "nobody", "k": 5}}, 404),
           ("POST", "/recommend", {"json": {"history": [1, 2], "category": "Cooking"}}, 422),
           ("GET", "/items/no-such-item/similar", {}, 404),
           ("POST", "/recommend/batch", {"json": {"requests": []}}, 422)]

    def make(i):
        kind = i % 10
        if kind < 4:
            return "POST", "/recommend", {"json": {"user": users[rng.integers(len(users))], "k": 20}}, 200
        if kind < 6:
            hist = rng.choice(items, size=int(rng.integers(1, 30))).tolist()
            return "POST", "/recommend", {"json": {"history": hist, "k": 20, "alpha": 0.5}}, 200
        if kind == 6:
            reqs = [{"user": u, "k": 10} for u in rng.choice(users, size=8).tolist()]
            return "POST", "/recommend/batch", {"json": {"requests": reqs}}, 200
        if kind < 9:
            return "GET", f"/items/{items[rng.integers(len(items))]}/similar", {"params": {"k": 10}}, 200
        return bad[(i // 10) % len(bad)]

    plan = [make(i) for i in range(500)]
    order = rng.permutation(len(plan))

    async def main():
        got = [None] * len(plan)
        queue = list(order)
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=server, timeout=60, limits=limits) as c:
            async def worker():
                while queue:
                    i = queue.pop()
                    method, path, kw, _ = plan[i]
                    got[i] = (await c.request(method, path, **kw)).status_code
            await asyncio.gather(*(worker() for _ in range(32)))
        return got

    statuses = asyncio.run(main())
    assert not [s for s in statuses if s >= 500]
    wrong = [(plan[i][:2], plan[i][3], s) for i, s in enumerate(statuses) if s != plan[i][3]]
    assert not wrong, wrong[:5]
    assert sum(s >= 400 for s in statuses) == 50
    assert httpx.get(f"{server}/health").status_code == 200


@pytest.mark.slow  # a served process
def test_serve_command_binds_localhost(run_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "twotower.cli", "serve", str(run_dir), "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 40
        while time.time() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        assert r.json() == {"status": "ok", "items": 1682, "index": "flat"}
        r = httpx.post(f"http://127.0.0.1:{port}/recommend", json={"user": 196, "k": 3})
        assert len(r.json()["items"]) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_python_cli_and_http_report_one_score_the_served_score(client, run_dir, capsys):
    """``Run.recommend``, ``twotower recommend`` and ``POST /recommend`` give the same score for the
    same user and item, and that score is ``<f(u), g(j)> / tau`` (no bias, alpha 0), not the cosine."""
    import torch

    from twotower.cli import main
    from twotower.model.towers import embed_items
    from twotower.run import Run

    run = Run(run_dir)
    http = {x["item"]: x["score"] for x in client.post("/recommend", json={"user": 196, "k": 5}).json()["items"]}
    frame = run.recommend([196], k=100)
    py = dict(zip(frame["item"].tolist(), frame["score"].tolist()))
    assert main(["recommend", str(run_dir), "--user", "196", "-k", "5"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    cli = {int(r[1]): float(r[2]) for r in rows if len(r) >= 3 and r[0].isdigit()}
    assert len(cli) == 5 and set(cli) & set(http)
    for item, score in http.items():
        assert py[item] == pytest.approx(score, rel=1e-5)  # HTTP writes 6 significant digits
    for item, score in cli.items():
        assert py[item] == pytest.approx(score, abs=1e-4)  # the CLI prints 4 decimals
    with torch.no_grad():
        u = run.users.encode([196])
        f = run.model.user_vectors(run.model.user_inputs(u, run.known))[0]
        g = embed_items(run.model)
    tau = float(run.model.temperature)
    for item in cli:
        j = int(run.items.encode([item])[0])
        assert py[item] == pytest.approx(float(f @ g[j]) / tau, rel=1e-5)

