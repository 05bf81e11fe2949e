"""The HTTP server under the service: uvicorn with the httptools parser (and uvloop where it
installs), every protocol-level limit set here rather than left to the stack's defaults.

The defaults of an ASGI server are made for development; behind them a production deployment
would keep connections that never finish their request head (one byte a second holds a connection
for good), heads of any size (httptools has no limit of its own), a request that carries both
``Content-Length`` and ``Transfer-Encoding`` answered together with the request smuggled behind it
(h11; RFC 9112, section 6.1 says reject or close), and a shutdown that waits forever. This module
owns the answers, in one place:

- ``ServerSettings``: every limit, typed and bounded (the ``serve`` command's flags come from it);
- ``guarded_protocol``: uvicorn's httptools protocol with a deadline for the request head
  (408, or a plain close when nothing was sent), a deadline for the body, and a cap on the head's
  size (431). llhttp (httptools) refuses ``Content-Length`` together with ``Transfer-Encoding``, two
  different lengths, and any transfer coding but a final ``chunked`` with a 400 and a close;
- ``listen``: the socket bound before the run is loaded, a refusal as one message;
- ``run``: uvicorn's server with a watchdog: after SIGTERM or SIGINT the process ends within
  ``shutdown_timeout`` plus a few seconds, whatever the event loop is doing.

``benchmarks/load_test.py`` measured this stack against the plain default (h11 on asyncio):
docs/reliability.md, "Figures".
"""
from __future__ import annotations

import errno
import importlib.util
import json
import math
import os
import signal
import socket
import sys
import threading
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ConfigError

# Seconds a refused connection is still read (and the data dropped) before it is closed.
LINGER_S = 2.0
# Extra seconds the watchdog allows beyond the graceful shutdown before it ends the process.
WATCHDOG_MARGIN_S = 5.0


class ServerSettings(BaseModel):
    """Where ``twotower serve`` listens and the limits it keeps on every connection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", min_length=1, max_length=255,
                      description="interface to bind: 127.0.0.1 is this machine only, 0.0.0.0 every interface")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on, 0 to 65535 (0: any free port, printed)")
    max_batch: int = Field(64, ge=1, le=4096, description="most concurrent requests computed together, 1 to 4096")
    header_timeout: float = Field(10.0, gt=0, le=3600, allow_inf_nan=False,
                                  description="seconds a client has to send a whole request head, from its first byte "
                                              "(or from connecting); then 408 and the connection is closed")
    body_timeout: float = Field(30.0, gt=0, le=3600, allow_inf_nan=False,
                                description="seconds a client has to send a request body once its head is in; then the "
                                            "connection is closed")
    keep_alive: float = Field(5.0, gt=0, le=3600, allow_inf_nan=False,
                              description="seconds an idle keep-alive connection stays open between requests")
    max_connections: int = Field(256, ge=1, le=100_000,
                                 description="open connections (or requests in progress) beyond which a request gets "
                                             "503 at once instead of queueing")
    max_head_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024,
                                description="largest request head (request line and headers) in bytes; more: 431")
    shutdown_timeout: float = Field(10.0, gt=0, le=3600, allow_inf_nan=False,
                                    description="seconds requests in progress get to finish after SIGTERM or SIGINT")

    @classmethod
    def checked(cls, **values: Any) -> "ServerSettings":
        """The settings, or one ``ConfigError`` naming each value refused and its bounds."""
        try:
            return cls(**values)
        except ValidationError as e:
            parts = []
            for err in e.errors():
                flag = "--" + "-".join(str(x) for x in err["loc"]).replace("_", "-")
                msg = err["msg"][0].lower() + err["msg"][1:]
                parts.append(f"{flag} {err.get('input')!r}: {msg}")
            raise ConfigError("; ".join(parts) + " (`twotower serve --help` gives each bound)") from None


def fast_stack() -> bool:
    """Whether uvloop is installed (httptools is a dependency; uvloop is not built for Windows)."""
    return importlib.util.find_spec("uvloop") is not None


def guarded_protocol(settings: ServerSettings) -> type:
    """uvicorn's httptools protocol with the head and body deadlines and the head-size cap of
    ``settings`` (one class per settings: uvicorn builds a protocol per connection from a class)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        limits = settings

        # A connection is "in a head" from connecting, and from the end of each request's body, until
        # its next head is complete; "in a body" between the two.
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._in_head, self._head_bytes, self._deadline, self._refused = True, 0, None, False
            self._head_size, self._oversize = 0, False
            self._arm(self.limits.header_timeout, self._head_expired)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:  # answered and closing: what the client still sends is read and dropped
                return
            if self._in_head:
                self._head_bytes += len(data)
                if self._deadline is None:  # the first byte of a kept-alive connection's next request
                    self._arm(self.limits.header_timeout, self._head_expired)
            super().data_received(data)
            if self._in_head and self._head_bytes > self.limits.max_head_bytes and not self.transport.is_closing():
                self._refuse(431, f"request head over {self.limits.max_head_bytes:,} bytes")

        # Two counts bound the head: the bytes received while a head is being read (a head that
        # never ends is cut once they pass the cap), and the parsed size of this head's request line
        # and headers (a head that arrives whole in one read is measured exactly).
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_size = 0

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(len(name) + len(value) + 4)
            super().on_header(name, value)

        def _count_head(self, n: int) -> None:
            self._head_size += n
            if self._head_size > self.limits.max_head_bytes:
                self._oversize = True
                raise ValueError("request head too large")  # stops the parser: uvicorn calls send_400_response

        def on_headers_complete(self) -> None:
            self._in_head, self._head_bytes = False, 0
            self._arm(self.limits.body_timeout, self._body_expired)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head, self._head_bytes = True, 0
            self._disarm()  # the keep-alive timer (uvicorn's) runs until the next request's first byte

        def send_400_response(self, msg: str) -> None:
            # uvicorn's answer to what llhttp refuses (both Content-Length and Transfer-Encoding, two
            # lengths, a bad chunk or header), with the lingering close and a detail in JSON
            if self._oversize:
                self._refuse(431, f"request head over {self.limits.max_head_bytes:,} bytes")
                return
            self._refuse(400, "malformed HTTP request, refused by the parser (for instance Content-Length together "
                              "with Transfer-Encoding, or a malformed header or chunk); the connection is closed")

        def _arm(self, seconds: float, callback) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, callback)

        def _disarm(self) -> None:
            if getattr(self, "_deadline", None) is not None:
                self._deadline.cancel()
                self._deadline = None

        def _head_expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self._head_bytes:
                self._refuse(408, f"request head not complete within {self.limits.header_timeout:g} s")
            else:  # connected (or kept alive) and sent nothing: nothing to answer
                self.transport.close()

        def _body_expired(self) -> None:
            # The application may be reading the body: a response written here could interleave with
            # its own, so the connection is closed and the application sees a disconnect.
            self._deadline = None
            if not self.transport.is_closing():
                self.logger.debug("closing a connection: request body not complete within %g s", self.limits.body_timeout)
                self.transport.close()

        def _refuse(self, status: int, message: str) -> None:
            """Answer ``status`` and close, unless a response is being written on this connection
            (a pipelined request): then close only. The close lingers: closing a socket with unread
            data in it sends a reset, which can destroy the answer before the client reads it; so
            the write side is shut, what still comes is dropped, and the socket closes a moment later."""
            self._disarm()
            self.logger.debug("closing a connection: %s", message)
            if self.cycle is not None and not self.cycle.response_complete:
                self.transport.close()
                return
            body = json.dumps({"detail": message}).encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n%s" % (status, HTTPStatus(status).phrase.encode(), len(body), body))
            self._refused = True
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

    return GuardedHttpToolsProtocol


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, or a ``ConfigError`` that says why not and what to do."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host!r}: not an address or a name this machine can resolve ({e}); "
                          "give an interface address such as 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    family, type_, proto, _, addr = infos[0]
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say TCP (with proto 0 every
    # answer would wait ~40 ms for a delayed ACK)
    sock = socket.socket(family, type_, proto or socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        why = os.strerror(e.errno) if e.errno else str(e)
        fix = {errno.EADDRINUSE: f"another process listens on port {port}: stop it or choose another --port (0 picks a free one)",
               errno.EADDRNOTAVAIL: f"{host} is not an address of this machine: give one of its interfaces, 127.0.0.1 or 0.0.0.0",
               errno.EACCES: f"ports below 1024 need privileges: choose --port 1024 or above and put a proxy in front"}.get(
            e.errno, "choose another --host or --port")
        raise ConfigError(f"cannot listen on {host}:{port}: {why}; {fix}") from None
    return sock


def uvicorn_config(app, settings: ServerSettings, log_level: str = "info"):
    """uvicorn's ``Config`` for ``app``: every setting that bears on the protocol given here, so that
    none of uvicorn's defaults decides it."""
    import uvicorn

    return uvicorn.Config(
        app, host=settings.host, port=settings.port,
        http=guarded_protocol(settings), loop="uvloop" if fast_stack() else "asyncio", ws="none", lifespan="on",
        timeout_keep_alive=settings.keep_alive,
        limit_concurrency=settings.max_connections + 1,  # uvicorn refuses at "connections >= limit"; ours: beyond it
        timeout_graceful_shutdown=settings.shutdown_timeout, backlog=2048, workers=1,
        server_header=False, date_header=True, proxy_headers=True, forwarded_allow_ips=None,
        log_level=log_level, access_log=log_level == "debug")


def run(app, sock: socket.socket, settings: ServerSettings, log_level: str = "info") -> None:
    """Serve ``app`` on ``sock`` until SIGTERM or SIGINT (blocks). The process is ended by a
    watchdog if it has not stopped ``WATCHDOG_MARGIN_S`` seconds after the graceful shutdown's limit."""
    import uvicorn

    class WatchedServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            arm_watchdog(settings.shutdown_timeout + WATCHDOG_MARGIN_S, sig)

    WatchedServer(uvicorn_config(app, settings, log_level)).run(sockets=[sock])


_watchdog_lock = threading.Lock()
_watchdog: threading.Timer | None = None


def arm_watchdog(seconds: float, sig: int) -> None:
    """End the process ``seconds`` from now unless it has ended first. A thread of its own, so that
    an event loop that no longer turns (a bug, a request that never returns) cannot keep the
    process alive after it was told to stop."""
    global _watchdog
    with _watchdog_lock:
        if _watchdog is not None:
            return

        def fire():
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            sys.stderr.write(f"twotower serve: still running {seconds:g} s after {name}; ending the process\n")
            sys.stderr.flush()
            os._exit(128 + sig if 0 < sig < 128 else 1)

        _watchdog = threading.Timer(seconds if math.isfinite(seconds) else 60.0, fire)
        _watchdog.daemon = True
        _watchdog.start()
