"""``twotower serve`` listens on the loopback interface unless told otherwise: the kernel's table of
listening sockets must show 127.0.0.1, not 0.0.0.0. (Answering on 127.0.0.1 proves nothing: a
server bound to every interface answers there too.)"""
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


PROC_TCP = Path("/proc/net/tcp")


def _listening_addresses(port: int) -> list[str]:
    """IPv4 addresses with a socket in state LISTEN on ``port`` (from /proc/net/tcp)."""
    found = []
    for line in PROC_TCP.read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        hex_ip, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.append(socket.inet_ntoa(bytes.fromhex(hex_ip)[::-1]))
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(synthetic_run, port, *extra):
    proc = subprocess.Popen([sys.executable, "-m", "twotower.cli", "serve", str(synthetic_run), "--port", str(port),
                             "--log-level", "warning", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
    proc.terminate()
    raise AssertionError("server did not start")


def test_the_default_host_is_loopback():
    from twotower.cli import build_parser

    assert build_parser().parse_args(["serve", "RUN"]).host == "127.0.0.1"


@pytest.mark.slow  # a served process per case
@pytest.mark.skipif(not PROC_TCP.is_file(), reason="needs Linux /proc/net/tcp")
@pytest.mark.parametrize("host,expected", [(None, ["127.0.0.1"]), ("0.0.0.0", ["0.0.0.0"])])
def test_serve_listens_where_it_is_told_and_on_loopback_by_default(synthetic_run, host, expected):
    port = _free_port()
    proc = _serve(synthetic_run, port, *(["--host", host] if host else []))
    try:
        assert _listening_addresses(port) == expected
    finally:
        proc.terminate()
        proc.wait(timeout=20)
