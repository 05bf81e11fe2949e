"""Model swaps while serving, over real HTTP: three swaps under concurrent requests drop none and
never mix two models in one answer; a broken new run (corrupted manifest or weights, missing index,
not a run) never takes the service down and says why; the admin route exists only with a token and
refuses every other one; a watched symlink switched atomically, and an index updated in place,
are picked up; `twotower serve --admin-token-file` end to end."""
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from _mf_runs import clustered, write_mf_run
from twotower.errors import ConfigError

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
USERS = list(range(1000, 1060))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs over the same vocabulary whose models differ (item vectors of A, of B), each with a
    saved HNSW index: every user's top 10 differs between them."""
    from twotower.index.index import IndexParams
    from twotower.index.run_index import build_run_index
    from twotower.run import Run

    root = tmp_path_factory.mktemp("swap")
    x, users = clustered(3000, q=300, seed=0)
    y, _ = clustered(3000, q=300, seed=5)
    counts = np.random.default_rng(1).zipf(1.5, 3000).astype(np.int64) - 1
    out = {}
    for name, items in (("A", x), ("B", y)):
        path = write_mf_run(root / name, items, users, counts)
        build_run_index(Run(path), IndexParams(kind="hnsw", M=16, ef_search=64), sample=100, progress=False,
                        log=lambda m: None)
        out[name] = path
    return out


def _answers(path):
    """Each test user's top 10 (raw ids) as the run at ``path`` serves it."""
    from twotower.serving.query import Query, Recommender

    rec = Recommender.load(path)
    return {u: r.items.tolist() for u, r in zip(USERS, rec.recommend_many([Query(user=u, k=10) for u in USERS]))}


class Server:
    """``create_app`` under uvicorn on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        from twotower.serving.server import ServerSettings, uvicorn_config  # the stack `twotower serve` runs

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.srv = uvicorn.Server(uvicorn_config(app, ServerSettings(), log_level="warning"))
        self.thread = threading.Thread(target=self.srv.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.srv.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.srv.started
        return self

    def __exit__(self, *exc):
        self.srv.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def _app(path, logs=None, **settings):
    from twotower.serving.query import Recommender
    from twotower.serving.service import create_app
    from twotower.serving.swap import SwapSettings

    settings.setdefault("token", TOKEN)
    return create_app(Recommender.load(path), swap=SwapSettings(run=str(path), log=(logs.append if logs is not None else None),
                                                                **settings))


async def _hammer(url, stop: threading.Event, answers: list, clients: int = 12):
    """Concurrent clients sending known-user requests (and similar-item and look-up requests) until
    ``stop``; every answer recorded as (status, user, items)."""
    rng = np.random.default_rng(0)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as c:
        async def worker(w):
            i = 0
            while not stop.is_set():
                i += 1
                if i % 5 == 0:
                    r = await c.get(f"/items/{10 * int(rng.integers(3000))}/similar", params={"k": 5})
                    answers.append((r.status_code, None, None))
                elif i % 7 == 0:
                    r = await c.get(f"/items/{10 * int(rng.integers(3000))}")
                    answers.append((r.status_code, None, None))
                else:
                    u = USERS[int(rng.integers(len(USERS)))]
                    r = await c.post("/recommend", json={"user": u, "k": 10})
                    answers.append((r.status_code, u, [x["item"] for x in r.json()["items"]] if r.status_code == 200 else None))
        await asyncio.gather(*(worker(w) for w in range(clients)))


def _under_load(url, action):
    """Run ``action()`` while clients hammer the server; returns (action's result, answers)."""
    stop, answers = threading.Event(), []
    t = threading.Thread(target=lambda: asyncio.run(_hammer(url, stop, answers)), daemon=True)
    t.start()
    time.sleep(0.5)
    try:
        out = action()
        time.sleep(0.3)
    finally:
        stop.set()
        t.join(timeout=60)
    return out, answers


@pytest.mark.slow
def test_three_swaps_under_concurrent_requests_drop_nothing(runs):
    from twotower.run_dir import RunDir

    want = {"A": _answers(runs["A"]), "B": _answers(runs["B"])}
    assert sum(want["A"][u] != want["B"][u] for u in USERS) > len(USERS) * 0.9
    with Server(_app(runs["A"])) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        meta = c.get("/metadata").json()["serving"]
        assert meta["generation"] == 0 and meta["weights_sha256"] == RunDir(runs["A"]).model_digest()
        assert meta["run"] == "A" and meta["loaded_at"]  # names, not where they lie on the server

        def swaps():
            out = []
            for target in ("B", "A", "B"):
                out.append(c.post("/admin/swap", json={"run": str(runs[target])}, headers=AUTH))
                time.sleep(0.3)
            return out

        done, answers = _under_load(s.url, swaps)
        assert [r.status_code for r in done] == [200, 200, 200], [r.text for r in done]
        assert [r.json()["serving"]["generation"] for r in done] == [1, 2, 3]
        statuses = [a[0] for a in answers]
        assert len(statuses) > 100 and all(st == 200 for st in statuses), sorted(set(statuses))
        # every answer is one model's answer, never a mixture; both models answered
        served = [("A" if items == want["A"][u] else "B" if items == want["B"][u] else "?") for _, u, items in answers if u]
        assert "?" not in served and {"A", "B"} <= set(served)
        meta = c.get("/metadata").json()
        assert meta["serving"]["weights_sha256"] == RunDir(runs["B"]).model_digest()
        assert meta["serving"]["swaps"] == 3 and meta["serving"]["last_swap"]["ok"]
        assert Path(meta["run"]).name == "B"  # the model's own metadata moved with it
        r = c.post("/recommend", json={"user": USERS[0], "k": 10})
        assert [x["item"] for x in r.json()["items"]] == want["B"][USERS[0]]


def _broken(runs, tmp_path):
    """Runs that cannot be served, each with the words its failure must name."""
    out = []
    flip = tmp_path / "weights-flipped"
    shutil.copytree(runs["B"], flip)
    data = bytearray((flip / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flip / "model.safetensors").write_bytes(bytes(data))
    out.append((flip, "model.safetensors"))
    manifest = tmp_path / "manifest-corrupted"
    shutil.copytree(runs["B"], manifest)
    (manifest / "manifest.json").write_text('{"sha256": {"config.json": "0000"')
    out.append((manifest, "manifest.json"))
    no_index = tmp_path / "index-missing"
    shutil.copytree(runs["B"], no_index)
    shutil.rmtree(no_index / "index")
    out.append((no_index, "no index"))
    no_faiss = tmp_path / "index-file-missing"
    shutil.copytree(runs["B"], no_faiss)
    (no_faiss / "index" / "index.faiss").unlink()
    out.append((no_faiss, "index.faiss"))
    out.append((tmp_path / "nowhere", "not a directory"))
    return out


@pytest.mark.slow
def test_a_broken_run_never_takes_the_service_down(runs, tmp_path):
    from twotower.run_dir import RunDir

    logs = []
    want = _answers(runs["A"])
    with Server(_app(runs["A"], logs)) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        def attempts():
            return [(needle, c.post("/admin/swap", json={"run": str(path)}, headers=AUTH)) for path, needle in _broken(runs, tmp_path)]

        done, answers = _under_load(s.url, attempts)
        for needle, r in done:
            assert r.status_code == 422, (needle, r.text)
            detail = r.json()["detail"]
            assert needle in detail and f"still serving {runs['A']}" in detail, detail
        assert answers and all(a[0] == 200 for a in answers)
        assert all(items == want[u] for _, u, items in answers if u)  # the old model answered throughout
        meta = c.get("/metadata").json()["serving"]
        assert meta["generation"] == 0 and meta["weights_sha256"] == RunDir(runs["A"]).model_digest()
        assert meta["last_swap"]["ok"] is False and meta["last_swap"]["run"] == "nowhere"
        assert "error" not in meta["last_swap"]  # it names files on the server: in the log and the admin answer only
        assert sum("failed, still serving" in m for m in logs) == len(done)
        assert c.post("/admin/swap", json={"run": str(runs["B"])}, headers=AUTH).status_code == 200  # and recovers


def test_the_admin_route_needs_its_token(runs, monkeypatch, tmp_path):
    from twotower.serving.swap import read_token

    with Server(_app(runs["A"], token=None)) as s:  # no token: no route
        assert httpx.post(f"{s.url}/admin/swap", json={}, headers=AUTH).status_code == 404
    with Server(_app(runs["A"])) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}):
            r = c.post("/admin/swap", json={"run": str(runs["B"])}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
        assert c.get("/metadata").json()["serving"]["generation"] == 0
        r = c.post("/admin/swap", json={"run": str(runs["B"]), "model": "x"}, headers=AUTH)
        assert r.status_code == 422 and "run, index" in r.json()["detail"]
        assert c.post("/admin/swap", headers=AUTH).status_code == 200  # no body: reload the run being served
        assert c.get("/metadata").json()["serving"]["run"] == "A"
        assert "/admin/swap" not in c.get("/openapi.json").text
    # where the token comes from
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    f.chmod(0o600)
    assert read_token(f) == TOKEN and read_token() is None
    monkeypatch.setenv("TWOTOWER_ADMIN_TOKEN", TOKEN)
    assert read_token(from_env=True) == TOKEN
    for kwargs, needle in (({"file": tmp_path / "none"}, "not found"), ({"file": f, "from_env": True}, "not both")):
        with pytest.raises(ConfigError, match=needle):
            read_token(**kwargs)
    f.write_text("short\n")
    with pytest.raises(ConfigError, match="at least 16"):
        read_token(f)
    monkeypatch.delenv("TWOTOWER_ADMIN_TOKEN")
    with pytest.raises(ConfigError, match="not set"):
        read_token(from_env=True)


def test_a_second_swap_while_one_loads_is_refused(runs):
    from twotower.serving import swap as swap_mod

    with Server(_app(runs["A"])) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        swapper = s.srv.config.app.state.swapper
        release = threading.Event()
        load = swapper.load

        def slow_load(*a, **kw):
            release.wait(20)
            return load(*a, **kw)

        swapper.load = slow_load
        first = threading.Thread(target=lambda: c.post("/admin/swap", json={"run": str(runs["B"])}, headers=AUTH))
        first.start()
        deadline = time.time() + 10
        while swapper.loading is None and time.time() < deadline:
            time.sleep(0.01)
        with httpx.Client(base_url=s.url, timeout=30) as c2:
            r = c2.post("/admin/swap", json={"run": str(runs["A"])}, headers=AUTH)
            assert r.status_code == 409 and "already loading" in r.json()["detail"]
            assert c2.post("/recommend", json={"user": USERS[0], "k": 5}).status_code == 200  # serving meanwhile
        release.set()
        first.join(timeout=60)
        assert c.get("/metadata").json()["serving"]["generation"] == 1
        assert isinstance(swap_mod.SwapBusy("x"), Exception)


def _wait_for(fn, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if fn():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_a_watched_symlink_and_an_index_updated_in_place_are_picked_up(runs, tmp_path):
    from twotower.index.run_index import update_run_index
    from twotower.run import Run
    from twotower.run_dir import RunDir

    live = tmp_path / "live"
    shutil.copytree(runs["A"], live / "v1")
    shutil.copytree(runs["B"], live / "v2")
    broken = live / "v3"
    shutil.copytree(runs["B"], broken)
    (broken / "index" / "index.faiss").write_bytes(b"not faiss")
    current = live / "current"
    current.symlink_to("v1")

    def point(target):  # the atomic switch of a deployment: a new link renamed over the old one
        tmp = live / "current.tmp"
        tmp.symlink_to(target)
        os.replace(tmp, current)

    logs = []
    with Server(_app(current, logs, token=None, watch=True, interval=0.1)) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        serving = lambda: c.get("/metadata").json()["serving"]  # noqa: E731
        assert serving()["run"] == "current" and serving()["run_resolved"] == "v1"
        stop, answers = threading.Event(), []
        t = threading.Thread(target=lambda: asyncio.run(_hammer(s.url, stop, answers, clients=4)), daemon=True)
        t.start()
        try:
            point("v2")
            assert _wait_for(lambda: serving()["weights_sha256"] == RunDir(live / "v2").model_digest())
            point("v3")  # broken: logged, not served, not retried
            assert _wait_for(lambda: serving()["last_swap"]["ok"] is False)
            assert serving()["run_resolved"] == "v2" and any("index.faiss" in m for m in logs)
            time.sleep(0.5)
            assert serving()["swaps"] == 1 and sum("failed" in m for m in logs) == 1
            point("v2")  # a change of target again: loaded (the same run as before the broken one)
            assert _wait_for(lambda: serving()["swaps"] == 2)
            # an index updated in place (items retired) is served once its new version is complete
            gone = np.arange(0, 400) * 10
            update_run_index(Run(live / "v2"), remove=gone, sample=50, log=lambda m: None)
            assert _wait_for(lambda: serving()["swaps"] == 3)
            r = c.post("/recommend", json={"user": USERS[0], "k": 100, "exclude_seen": False})
            assert r.status_code == 200 and not set(x["item"] for x in r.json()["items"]) & set(gone.tolist())
        finally:
            stop.set()
            t.join(timeout=60)
        assert answers and all(a[0] == 200 for a in answers)


@pytest.mark.slow  # a served process
def test_serve_command_with_an_admin_token_file(runs, tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    bad = subprocess.run([sys.executable, "-m", "twotower.cli", "serve", str(runs["A"]), "--admin-token-file",
                          str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "token file not found" in bad.stderr
    proc = subprocess.Popen([sys.executable, "-m", "twotower.cli", "serve", str(runs["A"]), "--port", str(port),
                             "--log-level", "warning", "--admin-token-file", str(token)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert _wait_for(lambda: proc.poll() is None and _ok(f"{url}/health"), 60), proc.stdout.read() if proc.poll() else ""
        r = httpx.post(f"{url}/admin/swap", json={"run": str(runs["B"])}, headers=AUTH, timeout=60)
        assert r.status_code == 200 and r.json()["serving"]["generation"] == 1
        assert json.loads(httpx.get(f"{url}/metadata").text)["serving"]["run"] == "B"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _ok(url):
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False
