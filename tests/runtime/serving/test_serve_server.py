"""The HTTP server under cdd-serve (uvicorn with its guards, run in a thread on a real socket): shutdown
under a backlog answers every queued request with 503 shutting_down, never a 500 or a closed connection;
a client that stops reading is dropped after the write timeout; an idle connection after the idle timeout."""

from __future__ import annotations

import asyncio
import http.client
import io
import socket
import threading
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from cdd.adapters.architectures import build_adapter
from cdd.adapters.zoo import save_entry
from cdd.runtime.diffusion.factory import make_backbone, save_backbone
from cdd.runtime.serving.app import create_app
from cdd.runtime.serving.server import Server, bind, config, drain
from cdd.runtime.serving.settings import ServeSettings

RES = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    bb = make_backbone("latent", resolution=RES, seed=5)
    save_backbone(bb, root / "backbone")
    adapter = build_adapter("controlnet", bb.unet, bb.vae_scale_factor)
    save_entry(root / "zoo" / "depth", adapter, name="depth", task="depth", backbone_fingerprint=bb.fingerprint,
               condition={"channels": 3, "range": [0, 1], "resolution": RES}, steps=1)
    return root


class Running:
    """cdd-serve's server on a free port, in a thread (no signal handlers: `stop()` is what SIGTERM does)."""

    def __init__(self, settings: ServeSettings, send_buffer: int | None = None):
        self.app = create_app(settings)
        self.sock = bind("127.0.0.1", 0)
        if send_buffer is not None:  # accepted sockets inherit it
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        self.port = self.sock.getsockname()[1]
        self.server = Server(config(self.app, settings))
        self.server.on_shutdown = lambda: drain(self.app, settings)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive()
            time.sleep(0.02)

    def stop(self, timeout: float = 60) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def multipart(image: bytes) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
            ).encode() + image + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def png(w, h):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_shutdown_under_a_backlog_answers_every_queued_request_with_503(world):
    s = ServeSettings(backbone=world / "backbone", zoo=world / "zoo", max_batch=2, max_wait_ms=0, warmup=False,
                      drain_s=1, queue_size=100)
    server = Running(s)
    engine = server.app.state.engine
    engine._lock.acquire()  # a batch that runs long: the worker takes max_batch requests and waits on them
    body, ctype = multipart(png(16, 16))
    answers: list = []

    def client():
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            c.request("POST", "/v1/tasks/depth", body=body, headers={"Content-Type": ctype})
            r = c.getresponse()
            answers.append((r.status, r.getheader("Retry-After"), r.read()))
        except Exception as e:  # noqa: BLE001 - a closed connection is what the test looks for
            answers.append((None, None, repr(e).encode()))
        finally:
            c.close()

    clients = [threading.Thread(target=client) for _ in range(12)]
    for t in clients:
        t.start()
    deadline = time.monotonic() + 30
    while len(engine.scheduler) < 12 - s.max_batch:
        assert time.monotonic() < deadline, len(engine.scheduler)
        time.sleep(0.02)
    t0 = time.monotonic()
    stopping = threading.Thread(target=server.stop)  # what SIGTERM does
    stopping.start()
    time.sleep(2.5)
    engine._lock.release()  # the long batch ends after drain_s (1 s)
    stopping.join(60)
    for t in clients:
        t.join(30)
    assert not server.thread.is_alive()
    statuses = [a[0] for a in answers]
    assert set(statuses) == {200, 503} and statuses.count(200) <= s.max_batch, answers  # no 500, none closed
    assert len(answers) == 12
    assert all(retry == "5" and b"shutting_down" in text for status, retry, text in answers if status == 503)
    assert time.monotonic() - t0 < 15


def test_a_client_that_reads_nothing_is_dropped_after_the_write_timeout(world):
    s = ServeSettings(backbone=world / "backbone", zoo=world / "zoo", warmup=False, write_timeout_s=1,
                      idle_timeout_s=60)
    server = Running(s, send_buffer=16384)
    try:
        clients = []
        for _ in range(5):  # ask for the 1.5 MB Swagger bundle and never read a byte
            c = socket.socket()
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.connect(("127.0.0.1", server.port))
            c.sendall(b"GET /docs/assets/swagger-ui-bundle.js HTTP/1.1\r\nHost: x\r\n\r\n")
            clients.append(c)
        t0 = time.monotonic()
        while len(server.server.server_state.connections) < 5 and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        assert len(server.server.server_state.connections) == 5
        while server.server.server_state.connections and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert not server.server.server_state.connections  # dropped: no answer is held for them
        assert time.monotonic() - t0 < 5
        for c in clients:
            c.close()
    finally:
        server.stop()
