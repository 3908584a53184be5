"""Latency the server adds to a request over its own compute: TCP stalls, queue waits."""

from __future__ import annotations

import http.client
import io
import statistics
import threading
import time
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from cdd.adapters.architectures import build_adapter
from cdd.adapters.zoo import save_entry
from cdd.runtime.diffusion.factory import make_backbone, save_backbone
from cdd.runtime.serving import server
from cdd.runtime.serving.app import create_app
from cdd.runtime.serving.engine import Engine
from cdd.runtime.serving.settings import ServeSettings

RES = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("latency")
    bb = make_backbone("latent", resolution=RES, seed=3)
    save_backbone(bb, root / "backbone")
    adapter = build_adapter("controlnet", bb.unet, bb.vae_scale_factor)
    save_entry(root / "zoo" / "depth", adapter, name="depth", task="depth", backbone_fingerprint=bb.fingerprint,
               condition={"channels": 3, "range": [0, 1], "resolution": RES}, steps=1)
    return root


def _multipart(image: bytes, **fields) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + image
    for k, v in fields.items():
        body += f'\r\n--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}'.encode()
    return body + f"\r\n--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


def _server_total_ms(response) -> float:
    parts = dict(p.strip().split(";dur=") for p in response.getheader("Server-Timing").split(","))
    return float(parts["total"])


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_small_responses_on_a_keep_alive_connection_do_not_wait_for_delayed_acks(world, loop):
    """One keep-alive connection alternating a task request and /healthz (the pattern that met Nagle's
    algorithm and the client's delayed ACK: about 44 ms per response on the asyncio loop, which sets
    TCP_NODELAY only on sockets made with IPPROTO_TCP, and `server.bind` makes protocol-0 ones)."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    settings = ServeSettings(backbone=world / "backbone", zoo=world / "zoo", max_batch=1, warmup=False)
    sock = server.bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = server.config(create_app(settings), settings)
    config.loop = loop
    srv = server.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        deadline = time.monotonic() + 60
        while True:
            try:
                conn.request("GET", "/readyz")
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    break
            except OSError:
                conn.close()
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.1)
        buf = io.BytesIO()
        Image.fromarray(np.zeros((RES, RES, 3), np.uint8)).save(buf, format="PNG")
        body, content_type = _multipart(buf.getvalue(), prompt="a red sphere", seed="1")
        over, healthz = [], []
        for _ in range(8):
            t0 = time.perf_counter()
            conn.request("POST", "/v1/tasks/depth", body=body, headers={"Content-Type": content_type})
            r = conn.getresponse()
            r.read()
            assert r.status == 200
            over.append((time.perf_counter() - t0) * 1000 - _server_total_ms(r))
            t0 = time.perf_counter()
            conn.request("GET", "/healthz")
            r = conn.getresponse()
            r.read()
            assert r.status == 200
            healthz.append((time.perf_counter() - t0) * 1000)
        conn.close()
        # a delayed ACK costs 40 ms; a loaded machine a few ms
        assert statistics.median(healthz) < 20, healthz
        assert statistics.median(over) < 20, over
    finally:
        srv.should_exit = True
        thread.join(30)


@pytest.mark.parametrize("batching", ["request", "step"])
def test_a_lone_request_on_an_idle_engine_does_not_wait_for_max_wait(world, batching):
    engine = Engine(ServeSettings(backbone=world / "backbone", zoo=world / "zoo", max_batch=4, max_wait_ms=2000,
                                  batching=batching, warmup=False)).start()
    try:
        assert engine.wait_ready(60)
        reg = engine.pool.get("depth")
        for seed in range(3):  # one client, one request after another
            work = engine.prepare(reg, torch.rand(3, RES, RES), steps=1, sampler="gd", seed=seed, prompt="")
            assert engine.run(work, timeout=60).queue_s < 0.5
    finally:
        engine.stop()
