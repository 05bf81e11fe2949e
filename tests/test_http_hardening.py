"""The HTTP server at the protocol level, against the real thing: ``twotower serve`` in a
subprocess on a free port, spoken to over raw sockets where a client library would refuse to send
what a hostile client sends. Request smuggling (Content-Length with Transfer-Encoding and its
relatives), slow heads and bodies, aborted uploads, oversize heads, idle and excess connections,
one rule for content types, no server paths in answers, SIGTERM under load, a wedged event loop,
and the serve flags that cannot work. docs/reliability.md lists the guarantees these prove."""
from __future__ import annotations

import asyncio
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow  # real server processes

# Short limits, so that a test waits seconds, not the defaults' tens of seconds.
HEADER_TIMEOUT, BODY_TIMEOUT, KEEP_ALIVE, MAX_HEAD = 2.0, 2.0, 2.0, 16_384
# What a deadline may overrun by on a shared, loaded machine (the event loop's own delays).
SLACK = 4.0


class Served:
    """A ``twotower serve`` process: its port, its combined log, and a way to stop it."""

    def __init__(self, run: Path, log: Path, *flags: str):
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "twotower.cli", "serve", str(run), "--port", "0", *flags],
                                     stdout=self._log, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while True:
            m = re.search(r"page http://127\.0\.0\.1:(\d+)/", log.read_text())
            if m:
                self.port = int(m.group(1))
                break
            assert self.proc.poll() is None, log.read_text()
            assert time.time() < deadline, "server did not start: " + log.read_text()
            time.sleep(0.1)
        self.url = f"http://127.0.0.1:{self.port}"
        while True:  # the line is printed before uvicorn starts: wait for an answer
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert self.proc.poll() is None, log.read_text()
                time.sleep(0.1)

    def text(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def served(synthetic_run, tmp_path_factory):
    s = Served(synthetic_run, tmp_path_factory.mktemp("served") / "serve.log",
               "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
               "--keep-alive", str(KEEP_ALIVE), "--max-head-bytes", str(MAX_HEAD))
    yield s
    s.stop()


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.settimeout(timeout)
    return s


def read_all(s: socket.socket) -> tuple[bytes, str]:
    """Everything the server sends until it closes the connection ("eof") or goes quiet for the
    socket's timeout ("open")."""
    out = b""
    try:
        while True:
            b = s.recv(65536)
            if not b:
                return out, "eof"
            out += b
    except socket.timeout:
        return out, "open"
    except ConnectionResetError:
        return out, "reset"


def statuses(raw: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", raw)]


def healthy(served) -> bool:
    return httpx.get(served.url + "/health", timeout=10).status_code == 200


def no_traceback(log: str) -> None:
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]


# -- 10. request smuggling: a request the parser cannot frame one way only is refused, the connection closed

SMUGGLED = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
HEAD = b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
AMBIGUOUS = {
    "content-length then transfer-encoding": HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding then content-length": HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n",
    "two different content-lengths": HEAD + b"Content-Length: 5\r\nContent-Length: 40\r\n\r\n{\"a\":",
    "a list of content-lengths": HEAD + b"Content-Length: 5, 40\r\n\r\n{\"a\":",
    "content-length with a sign": HEAD + b"Content-Length: +5\r\n\r\n{\"a\":",
    "transfer-encoding not ending in chunked": HEAD + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "an unknown transfer coding with content-length": HEAD + b"Content-Length: 5\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding twice": HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    "a space before the colon": HEAD + b"Content-Length: 5\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "a folded transfer-encoding": HEAD + b"Content-Length: 5\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    "bare LF line ends": HEAD.replace(b"\r\n", b"\n") + b"Content-Length: 5\n\n{\"a\":",
    "HTTP/1.0 with both": HEAD.replace(b"1.1", b"1.0") + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "a NUL in a header": HEAD + b"X-A: a\x00b\r\nContent-Length: 5\r\n\r\n{\"a\":",
    "a chunk size beyond 64 bits": HEAD + b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFFFF\r\n",
    "a control byte in a chunk extension": HEAD + b"Transfer-Encoding: chunked\r\n\r\n0;\x00\r\n\r\n",
}


@pytest.mark.parametrize("case", list(AMBIGUOUS))
def test_a_request_framed_two_ways_is_refused_and_what_follows_is_never_answered(served, case):
    with connect(served.port, timeout=HEADER_TIMEOUT + SLACK) as s:
        s.sendall(AMBIGUOUS[case] + SMUGGLED)
        raw, end = read_all(s)
    assert end in ("eof", "reset"), (case, raw)  # closed by the server, not left waiting
    got = statuses(raw)
    assert got in ([400], []), (case, raw)  # a 400, or a bare close once the body had begun; never the GET's 200
    assert b'"status":"ok"' not in raw
    assert healthy(served)


def test_chunked_alone_and_pipelining_still_work(served):
    """The refusals above are of ambiguity, not of chunked bodies or pipelining."""
    body = b'{"user": 1, "k": 2}'
    req = HEAD + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    with connect(served.port, timeout=KEEP_ALIVE + SLACK) as s:
        s.sendall(req + SMUGGLED)
        raw, end = read_all(s)
    assert statuses(raw) == [200, 200] and end == "eof"  # both answered, then closed by the keep-alive timeout


# -- 10. slow clients: a deadline for the head and for the body; other clients are served meanwhile

def _trickle(port: int, data: bytes, every: float, result: dict) -> None:
    """Send ``data`` a byte at a time; note when the server cut the connection and what it said."""
    t0 = time.monotonic()
    with connect(port, timeout=30) as s:
        try:
            for b in data:
                s.sendall(bytes([b]))
                # wait for the next byte's turn, or for the server's answer or close: the time is taken
                # when the server cuts, not when the next send notices (up to two sends later)
                if select.select([s], [], [], every)[0]:
                    break
            raw, end = read_all(s)
        except (BrokenPipeError, ConnectionResetError):
            raw, end = b"", "reset"
        if end != "reset":
            s.settimeout(0.05)
            try:
                raw += s.recv(65536)
            except OSError:
                pass
    result.update(seconds=time.monotonic() - t0, raw=raw, end=end)


def _served_meanwhile(served, seconds: float) -> list[int]:
    """Statuses of requests made one after another for ``seconds`` by a well-behaved client."""
    got, t_end = [], time.monotonic() + seconds
    with httpx.Client(base_url=served.url, timeout=5) as c:
        while time.monotonic() < t_end:
            got.append(c.post("/recommend", json={"user": 1, "k": 3}).status_code)
            time.sleep(0.1)
    return got


def test_a_head_sent_one_byte_a_second_is_cut_at_the_deadline_while_others_are_served(served):
    result: dict = {}
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 60 + b"\r\n\r\n"
    t = threading.Thread(target=_trickle, args=(served.port, head, 1.0, result))
    t.start()
    others = _served_meanwhile(served, HEADER_TIMEOUT + 1)
    t.join(timeout=120)
    assert HEADER_TIMEOUT - 0.5 <= result["seconds"] <= HEADER_TIMEOUT + SLACK, result
    assert statuses(result["raw"]) in ([408], []) and result["end"] in ("eof", "reset"), result
    assert others and set(others) == {200}, others


def test_a_body_sent_one_byte_a_second_is_cut_at_the_deadline_while_others_are_served(served):
    result: dict = {}
    body = b'{"user": 1, "k": 3, "alpha": 0.0, "exclude_seen": true}'
    t0 = time.monotonic()
    with connect(served.port, timeout=30) as s:
        s.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % len(body))
        t = threading.Thread(target=lambda: result.update(others=_served_meanwhile(served, BODY_TIMEOUT + 1)))
        t.start()
        try:
            for b in body:
                s.sendall(bytes([b]))
                time.sleep(1.0)
            raw, end = read_all(s)
        except (BrokenPipeError, ConnectionResetError):
            raw, end = b"", "reset"
        seconds = time.monotonic() - t0
        t.join(timeout=60)
    assert BODY_TIMEOUT - 0.5 <= seconds <= BODY_TIMEOUT + SLACK, seconds
    assert statuses(raw) == [] and end in ("eof", "reset"), raw  # closed; the application saw a disconnect
    assert set(result["others"]) == {200}, result
    no_traceback(served.text())


def test_idle_connections_are_closed_and_do_not_stop_others(served):
    """Connections that send nothing, or half a head, or stay idle after an answer: each is closed by
    its deadline, and a client connecting meanwhile is served."""
    quiet = [connect(served.port, timeout=HEADER_TIMEOUT + SLACK) for _ in range(100)]
    half = [connect(served.port, timeout=HEADER_TIMEOUT + SLACK) for _ in range(20)]
    for s in half:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    kept = connect(served.port, timeout=KEEP_ALIVE + SLACK)
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        assert healthy(served)
        t0 = time.monotonic()
        ends = [read_all(s) for s in quiet + half + [kept]]
        waited = time.monotonic() - t0
    finally:
        for s in quiet + half + [kept]:
            s.close()
    assert all(end in ("eof", "reset") for _, end in ends), [e for _, e in ends]
    assert all(raw == b"" for raw, _ in ends[:100])  # nothing asked, nothing answered
    assert all(statuses(raw) == [408] for raw, _ in ends[100:120])
    assert statuses(ends[-1][0]) == [200]  # answered, then closed after keep-alive
    assert waited <= max(HEADER_TIMEOUT, KEEP_ALIVE) + SLACK
    assert healthy(served)


# -- 10. aborted uploads: a client that leaves mid-body is not the server's fault: no traceback

@pytest.mark.parametrize("path", ["/recommend", "/recommend/batch", "/items/lookup"])
def test_aborted_uploads_leave_no_traceback(served, path):
    before = served.text()
    for framing in (b"Content-Length: 100000\r\n\r\n", b"Transfer-Encoding: chunked\r\n\r\n9\r\n"):
        for _ in range(5):
            with connect(served.port) as s:
                s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s{\"user\": " % (path.encode(), framing))
                time.sleep(0.05)
    assert healthy(served)
    time.sleep(0.3)
    no_traceback(served.text()[len(before):])


# -- 10. oversize heads: 431 and a close, whether one huge header, many small ones, or a long URL

@pytest.mark.parametrize("head", [
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(5_000)) + b"\r\n",
    b"GET /items?q=" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nCookie: " + b"c=1; " * 20_000,  # never ends
], ids=["one-huge-header", "many-headers", "long-url", "endless-header"])
def test_oversize_heads_get_431_and_a_close(served, head):
    with connect(served.port, timeout=HEADER_TIMEOUT + SLACK) as s:
        try:
            s.sendall(head)
        except (BrokenPipeError, ConnectionResetError):
            pass
        raw, end = read_all(s)
    assert statuses(raw) == [431] and end in ("eof", "reset"), raw[:300]
    assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["detail"].startswith("request head over")
    assert healthy(served)


def test_a_head_under_the_cap_is_served(served):
    with connect(served.port, timeout=KEEP_ALIVE + SLACK) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * (MAX_HEAD // 2) + b"\r\n\r\n")
        raw, _ = read_all(s)
    assert statuses(raw) == [200]


# -- 10. one rule for content types on every route that takes a JSON body

def _body_routes(served) -> list[tuple[str, dict]]:
    spec = httpx.get(served.url + "/openapi.json").json()
    ex = {"/recommend": {"user": 1, "k": 3}, "/recommend/batch": {"requests": [{"user": 1, "k": 3}]},
          "/items/lookup": {"items": [1, 2]}}
    routes = [(p, ex.get(p, {})) for p, ops in spec["paths"].items() if "post" in ops and "requestBody" in ops["post"]]
    assert {p for p, _ in routes} >= set(ex), routes
    return routes


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx", "text/json"])
def test_a_body_not_sent_as_json_is_422_on_every_route(served, content_type):
    for path, example in _body_routes(served):
        headers = {"content-type": content_type} if content_type else {}
        r = httpx.post(served.url + path, content=json.dumps(example).encode(), headers=headers)
        assert r.status_code == 422, (path, content_type, r.text)
        assert "Content-Type: application/json" in r.json()["detail"], (path, r.text)


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/problem+json"])
def test_a_body_sent_as_json_is_read_on_every_route(served, content_type):
    for path, example in _body_routes(served):
        r = httpx.post(served.url + path, content=json.dumps(example).encode(), headers={"content-type": content_type})
        assert r.status_code == 200, (path, content_type, r.text)


# -- 10. answers do not tell where the run lies on the server

def test_no_answer_reveals_a_server_path(served, synthetic_run):
    places = {str(synthetic_run), str(synthetic_run.resolve()), str(synthetic_run.parent), str(Path.home())}
    for path in ["/metadata", "/health", "/run/curves", "/openapi.json", "/", "/items", "/users", "/no-such-route"]:
        text = httpx.get(served.url + path).text
        leaked = [p for p in places if p in text]
        assert not leaked, (path, leaked)
    meta = httpx.get(served.url + "/metadata").json()
    assert meta["run"] == synthetic_run.name

    def strings(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)
        elif isinstance(x, str):
            yield x
    assert not [s for s in strings(meta) if s.startswith("/") and os.path.exists(s)]


# -- 10. more connections than allowed: 503 at once, not a hang; served again when they go

def test_connections_beyond_the_cap_get_503_at_once_and_service_resumes(synthetic_run, tmp_path):
    s = Served(synthetic_run, tmp_path / "serve.log", "--max-connections", "8", "--header-timeout", "3")
    try:
        idle = [connect(s.port) for _ in range(8)]
        t0 = time.monotonic()
        r = httpx.get(s.url + "/health", timeout=10)
        assert r.status_code == 503 and time.monotonic() - t0 < 5
        for c in idle:
            c.close()
        time.sleep(0.5)
        assert healthy(s)
    finally:
        s.stop()


# -- 1. SIGTERM and SIGINT stop the server under load, within the shutdown limit; in-flight requests are answered

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_under_load_stops_the_server_within_its_limit_and_no_request_gets_a_5xx(synthetic_run, tmp_path, sig):
    s = Served(synthetic_run, tmp_path / "serve.log", "--shutdown-timeout", "5")
    got: list = []

    async def load():
        async with httpx.AsyncClient(base_url=s.url, timeout=30) as c:
            async def worker():
                while True:
                    try:
                        r = await c.post("/recommend", json={"history": [1, 2, 3], "k": 5})
                        got.append(r.status_code)
                    except httpx.TransportError:  # refused or closed once the server stops: expected
                        return
            await asyncio.gather(*(worker() for _ in range(16)))

    t = threading.Thread(target=lambda: asyncio.run(load()))
    t.start()
    while len(got) < 200:
        time.sleep(0.05)
        assert t.is_alive()
    t0 = time.monotonic()
    s.proc.send_signal(sig)
    code = s.proc.wait(timeout=60)
    stopped = time.monotonic() - t0
    t.join(timeout=60)
    log = s.text()
    s.stop()
    assert stopped <= 5 + SLACK, stopped
    assert code in (-sig, 130), code  # SIGTERM: uvicorn re-raises it after the graceful stop; SIGINT: "interrupted"
    assert got and all(x == 200 for x in got), sorted(set(got))
    assert "Traceback" not in log, log[-3000:]


def test_a_wedged_event_loop_still_stops_on_sigterm(tmp_path):
    """An application that never gives the event loop back (a bug) cannot keep the process alive:
    the watchdog ends it once the graceful shutdown's limit and the margin have passed."""
    script = tmp_path / "wedged.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from fastapi import FastAPI
        from twotower.serving.server import ServerSettings, listen, run

        app = FastAPI()

        @app.get("/wedge")
        async def wedge():
            while True:  # never awaits: the loop cannot run anything else
                time.sleep(0.01)

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        settings = ServerSettings(port=0, shutdown_timeout=1)
        sock = listen(settings.host, settings.port)
        print("port", sock.getsockname()[1], flush=True)
        run(app, sock, settings, log_level="warning")
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = int(proc.stdout.readline().split()[1])
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.time() < deadline
                time.sleep(0.1)
        with connect(port) as c:
            c.sendall(b"GET /wedge HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
            stopped = time.monotonic() - t0
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    from twotower.serving.server import WATCHDOG_MARGIN_S

    assert code == 128 + signal.SIGTERM, (code, out)
    assert 1 + WATCHDOG_MARGIN_S - 0.5 <= stopped <= 1 + WATCHDOG_MARGIN_S + SLACK, stopped
    assert "still running" in out and "SIGTERM" in out, out


# -- 1 and 11. serve flags that cannot work: one message, exit code 2, nothing served

@pytest.mark.parametrize("flags,needle", [
    (["--max-batch", "0"], "--max-batch 0"),
    (["--max-batch", "-3"], "--max-batch -3"),
    (["--max-batch", "100000"], "--max-batch 100000"),
    (["--port", "70000"], "--port 70000"),
    (["--port", "-1"], "--port -1"),
    (["--header-timeout", "0"], "--header-timeout 0"),
    (["--body-timeout", "nan"], "--body-timeout nan"),
    (["--keep-alive", "inf"], "--keep-alive inf"),
    (["--max-connections", "0"], "--max-connections 0"),
    (["--max-head-bytes", "10"], "--max-head-bytes 10"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout -1"),
    (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid'"),
    (["--host", "192.0.2.1"], "not an address of this machine"),  # TEST-NET-1: never a local interface
    (["--host", ""], "--host ''"),
])
def test_serve_flags_that_cannot_work_exit_2_with_one_message(synthetic_run, flags, needle):
    done = subprocess.run([sys.executable, "-m", "twotower.cli", "serve", str(synthetic_run), *flags],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (flags, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("twotower serve: error: ") and needle in lines[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_a_port_in_use_exits_2_before_loading_the_run(synthetic_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "twotower.cli", "serve", str(synthetic_run), "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "", done
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "--port" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_port_0_serves_on_a_free_port_and_says_which(served):
    assert served.port > 0 and healthy(served)


# -- the stack: what was chosen is what runs (no default leaking back)

def test_the_server_runs_the_chosen_stack(served):
    r = httpx.get(served.url + "/health")
    assert "server" not in r.headers  # uvicorn's default announces itself; ours does not
    from twotower.serving.server import ServerSettings, fast_stack, uvicorn_config

    cfg = uvicorn_config(lambda *a: None, ServerSettings())
    cfg.load()
    assert cfg.http_protocol_class.__name__ == "GuardedHttpToolsProtocol"
    assert cfg.ws_protocol_class is None and cfg.timeout_graceful_shutdown == 10.0
    assert cfg.loop == ("uvloop" if fast_stack() else "asyncio")
