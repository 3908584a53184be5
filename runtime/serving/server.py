"""The HTTP server under `cdd-serve`: uvicorn with limits that hold whatever HTTP parser is installed.

- The socket is bound and listening before the model loads, so a port in use fails in a second (status
  2), not after warm-up.
- The h11 parser always (httptools, when installed, has no header size limit), and a request head
  (request line and headers) over `max_header_kb` is refused with 431 and the connection closed,
  counted here as the bytes arrive (h11's own limit only applies to a head that arrives in pieces).
- A read deadline per request: a connection that has not sent a whole request (head and body)
  `read_timeout_s` after it opened, or after its last answer, is closed (slowloris). A write deadline: a
  client that reads nothing of its answer for `write_timeout_s` (the send buffer full) is dropped, with
  what was buffered for it. An idle keep-alive connection is closed after `idle_timeout_s`.
- A clean drain after SIGTERM or SIGINT exits with status 0 (uvicorn re-raises the signal: 143). Requests
  still queued `drain_s` after the signal get 503 shutting_down with Retry-After; those running finish.
- TCP_NODELAY on every accepted connection. asyncio sets it only on sockets made with IPPROTO_TCP, and
  `bind` makes protocol-0 ones (uvloop sets it on any TCP socket, but it is not always installed): without
  it a response written in pieces (head, body, end) meets the client's delayed ACK, 40 ms per small response.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Callable

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import ServeSettings

log = logging.getLogger("cdd.serve")
STARTUP_FAILURE = 3
RUNNING_GRACE_S = 5.0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for reading each request and a bound on its head."""

    read_timeout: float = 20.0
    write_timeout: float = 30.0
    max_head_bytes: int = 32 * 1024
    _read_deadline = None
    _write_deadline = None
    _head: bytearray | None = None  # the request head so far, until its blank line

    def connection_made(self, transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        self._head = bytearray()
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if (len(self._head) if end < 0 else end + 4) > self.max_head_bytes:
                self._refuse_head()
                return
            if end >= 0:
                self._head = None
        super().data_received(data)

    def _refuse_head(self) -> None:
        self._head = None
        body = json.dumps({"error": {"code": "headers_too_large", "message":
                                     f"the request head is larger than {self.max_head_bytes // 1024} KiB"}}).encode()
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()

    def connection_lost(self, exc) -> None:
        self._disarm()
        self._resume_timer()
        super().connection_lost(exc)

    def pause_writing(self) -> None:  # the send buffer is full: the client reads nothing of the answer
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(self.write_timeout, self._write_timed_out)

    def resume_writing(self) -> None:
        self._resume_timer()
        super().resume_writing()

    def _resume_timer(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _write_timed_out(self) -> None:
        self._write_deadline = None
        if not self.transport.is_closing():
            client = self.client[0] if self.client else None
            log.info("dropped a client that read nothing of its answer in time",
                     extra={"fields": {"client": client, "write_timeout_s": self.write_timeout}})
            self.transport.abort()  # the buffered answer goes too

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is not None and not cycle.more_body and not cycle.response_complete:
            self._disarm()  # the whole request is in: the app has it

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._head = bytearray()
            self._arm()  # the next request on this connection gets its own deadline

    def _arm(self) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if not self.transport.is_closing():
            client = self.client[0] if self.client else None
            log.info("closed a connection that did not send its request in time",
                     extra={"fields": {"client": client, "read_timeout_s": self.read_timeout}})
            self.transport.close()


class Server(uvicorn.Server):
    on_shutdown: Callable[[], object] | None = None  # called as the shutdown begins, before connections drain

    async def shutdown(self, sockets=None) -> None:
        if self.on_shutdown is not None:
            self.on_shutdown()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self._captured_signals.clear()  # drained cleanly: exit 0, not the signal's 143


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) and listening; OSError when the address is in use. Listening is what
    holds the port: with SO_REUSEADDR two sockets can both be bound to it (a second server started while
    the first loads), and only the second `listen` fails. Connections made before the server runs wait in
    the backlog."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)  # uvicorn's backlog
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def drain(app, settings: ServeSettings) -> None:
    """The shutdown of a cdd-serve app: its engine admits nothing more and refuses, after drain_s, what is
    still queued with 503 shutting_down (Retry-After), rather than leave uvicorn to cancel it (a 500)."""
    engine = getattr(app.state, "engine", None)
    if engine is not None:
        engine.drain(settings.drain_s)


def config(app, settings: ServeSettings) -> uvicorn.Config:
    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,),
                    {"read_timeout": settings.read_timeout_s, "write_timeout": settings.write_timeout_s,
                     "max_head_bytes": settings.max_header_kb * 1024})
    return uvicorn.Config(
        app,
        http=protocol,
        h11_max_incomplete_event_size=settings.max_header_kb * 1024,
        log_config=None,
        timeout_keep_alive=settings.idle_timeout_s,
        access_log=False,  # one JSON line per request comes from the app itself
        # queued requests are refused at drain_s (Engine.drain); the ones running then get as long again and 5 s
        timeout_graceful_shutdown=max(1, round(2 * settings.drain_s + RUNNING_GRACE_S)),
    )


def serve(app, settings: ServeSettings, sock: socket.socket) -> int:
    """Run until SIGTERM/SIGINT (then drain); the exit status."""
    server = Server(config(app, settings))
    server.on_shutdown = lambda: drain(app, settings)
    server.run(sockets=[sock])
    return 0 if server.started else STARTUP_FAILURE
