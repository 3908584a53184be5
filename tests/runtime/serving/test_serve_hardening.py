"""The service against hostile or careless input (FastAPI TestClient, lifespan included, a tiny latent
backbone): work limits checked on the header, admission by estimated wait, cancelled requests, entries
that cannot serve refused at registration, no server paths or directory listings, no Host reflection."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cdd.adapters.architectures import build_adapter
from cdd.adapters.zoo import ADAPTER_FILE, MANIFEST, save_entry, sha256_file
from cdd.runtime.serving.app import APIError, _run, create_app
from cdd.runtime.diffusion.factory import make_backbone, save_backbone
from cdd.runtime.serving.settings import ServeSettings
from cdd.runtime.serving.tasks import blank_work

RES = 16
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def save(bb, zoo, name, task, kind="controlnet", steps=1, **kw):
    adapter = build_adapter(kind, bb.unet, bb.vae_scale_factor)
    save_entry(zoo / name, adapter, name=name, task=task, backbone_fingerprint=bb.fingerprint,
               condition={"channels": 3, "range": [0, 1], "resolution": RES}, steps=steps, **kw)
    return zoo / name


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    bb = make_backbone("latent", resolution=RES, seed=5)
    save_backbone(bb, root / "backbone")
    zoo = root / "zoo"
    save(bb, zoo, "sr", "super-resolution", steps=2, training={"backbone": "/secret/server/path", "method": "codi"})
    save(bb, zoo, "depth", "depth")
    (zoo / "broken").mkdir()
    manifest = json.loads((zoo / "depth" / MANIFEST).read_text())
    (zoo / "broken" / MANIFEST).write_text(json.dumps({**manifest, "name": ["x"]}))
    return {"root": root, "backbone": bb, "zoo": zoo}


@pytest.fixture(scope="module")
def app(world):
    s = ServeSettings(backbone=world["root"] / "backbone", zoo=world["zoo"], max_batch=2, max_wait_ms=0,
                      max_pixels=64 * 64, max_work=8, api_key=KEY, warmup=False)
    app = create_app(s)
    with TestClient(app) as client:
        assert app.state.engine.wait_ready(60)
        yield app, client


@pytest.fixture
def client(app):
    return app[1]


def png(w, h, seed=0):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def post(client, task, image, **form):
    return client.post(f"/v1/tasks/{task}", files={"image": ("in.png", image, "image/png")},
                       data={k: str(v) for k, v in form.items()})


def error(r, status, code):
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    return r.json()["error"]["message"]


def header_only_png(w, h):
    """A PNG header and the start of an IDAT chunk of junk: anything that decodes it fails."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", 1000) + b"IDAT" + b"junk")


def test_work_over_the_budget_is_413_from_the_header(client):
    # a 1 x 4096 strip is few pixels but, x4 and tiled at 16 px, hundreds of tiles: refused before decoding
    t0 = time.monotonic()
    message = error(post(client, "super-resolution", header_only_png(4096, 1)), 413, "too_much_work")
    assert time.monotonic() - t0 < 5
    assert "max_work" in message and "is 8" in message and "tile-steps" in message
    assert "--max-work" in message and "CDD_MAX_WORK" in message and "steps=" not in message  # 1 step is too much
    # a 4x4 input is one 16-px tile: 1 row x 2 steps fits; 8 steps would not, but steps are at most 4
    assert post(client, "super-resolution", png(4, 4), seed=1).status_code == 200
    message = error(post(client, "super-resolution", png(7, 7), seed=1, steps=4), 413, "too_much_work")  # 4 x 4
    assert "steps=2 or fewer" in message and "CDD_MAX_WORK" in message
    # served tiles are 32 px: the 28 px output is one row of 4 tile-steps a step; 5x5 (20 px out) is 2
    assert "an input of at most 5x5 pixels at 4 step(s)" in message
    assert post(client, "super-resolution", png(7, 7), seed=1, steps=2).status_code == 200


def test_overloaded_queue_refuses_with_429_and_an_honest_retry_after(app):
    _, client = app
    engine = app[0].state.engine
    engine.scheduler.record_batch(seconds=2.0, rows=2, steps=1)  # as if a 1-step batch took 2 s
    engine.pause()
    try:
        done = []
        first = threading.Thread(target=lambda: done.append(post(client, "depth", png(16, 16), seed=1)))
        first.start()
        while len(engine.scheduler) < 1:
            time.sleep(0.01)
        engine.scheduler.record_batch(seconds=2.0, rows=2, steps=1)
        r = client.post("/v1/tasks/depth", files={"image": ("a.png", png(16, 16), "image/png")},
                        headers={"X-CDD-Deadline-Ms": "500"})
        message = error(r, 429, "overloaded")
        assert "would be answered in about 2.0 s" in message
        assert int(r.headers["retry-after"]) >= 1
    finally:
        engine.resume()
    first.join(60)
    assert done[0].status_code == 200


def test_a_request_whose_client_left_is_withdrawn_from_the_queue(app):
    engine = app[0].state.engine
    reg = engine.pool.get("depth")
    work = blank_work(reg.name, reg.task, reg.resolution, reg.channels, engine.backbone.model_channels,
                      engine.backbone.vae_scale_factor, 1, "prev")
    engine.pause()
    try:
        with pytest.raises(APIError) as e:
            asyncio.run(_run(engine, work, time.monotonic() + 30, lambda: asyncio.sleep(0.05)))
        assert e.value.status == 499 and e.value.code == "client_closed"
        assert len(engine.scheduler) == 0
    finally:
        engine.resume()


def test_registration_runs_the_entry_once_and_refuses_one_that_cannot_serve(client, world, tmp_path):
    bb = world["backbone"]
    good = save(bb, tmp_path, "colorize", "colorize")
    other = save(bb, tmp_path, "other", "depth", kind="t2i")
    # another adapter's weights under a manifest that lists their (correct) sha256: verification passes
    (good / ADAPTER_FILE).write_bytes((other / ADAPTER_FILE).read_bytes())
    m = json.loads((good / MANIFEST).read_text())
    m["files"][ADAPTER_FILE] = sha256_file(good / ADAPTER_FILE)
    (good / MANIFEST).write_text(json.dumps(m))
    message = error(client.post("/v1/adapters", json={"path": str(good)}, headers=AUTH), 422, "invalid_zoo_entry")
    assert "colorize" in message and "does not" in message
    assert "colorize" not in {t["task"] for t in client.get("/v1/tasks").json()["tasks"]}  # not left registered


def test_registration_errors_never_list_a_folder(client, tmp_path):
    (tmp_path / "private-folder-name").mkdir()
    (tmp_path / "secret.txt").write_text("x")
    message = error(client.post("/v1/adapters", json={"path": str(tmp_path)}, headers=AUTH), 422, "invalid_zoo_entry")
    assert "private-folder-name" not in message and "secret" not in message
    error(client.post("/v1/adapters", json={"path": "a" * 5000}, headers=AUTH), 422, "invalid_parameter")
    error(client.post("/v1/adapters", json={"path": "x" * 300}, headers=AUTH), 422, "invalid_zoo_entry")


def test_bad_manifest_is_422_naming_the_field(client, world, tmp_path):
    entry = save(world["backbone"], tmp_path, "typed", "depth")
    m = json.loads((entry / MANIFEST).read_text())
    for field, value in (("steps", "abc"), ("name", ["x"]), ("files", ["adapter.safetensors"]), ("name", "depth-✓"),
                         ("name", ".."), ("name", "<img src=x onerror=alert(1)>")):
        (entry / MANIFEST).write_text(json.dumps({**m, field: value}))
        message = error(client.post("/v1/adapters", json={"path": str(entry)}, headers=AUTH), 422, "invalid_zoo_entry")
        assert f"'{field}" in message, message


def test_a_bad_entry_in_the_zoo_is_skipped_and_named(world, caplog):
    s = ServeSettings(backbone=world["root"] / "backbone", zoo=world["zoo"], warmup=False)
    with caplog.at_level(logging.ERROR, logger="cdd.serve"), TestClient(create_app(s)) as c:
        names = {a["name"] for t in c.get("/v1/tasks").json()["tasks"] for a in t["adapters"]}
    assert names == {"sr", "depth"}
    assert any("broken" in r.getMessage() and "'name'" in r.getMessage() for r in caplog.records)


def test_tasks_list_shows_no_server_paths(client, world):
    text = client.get("/v1/tasks?detail=true").text
    assert "/secret/server/path" not in text and str(world["root"]) not in text
    sr = next(t for t in client.get("/v1/tasks?detail=true").json()["tasks"] if t["task"] == "super-resolution")
    assert sr["adapters"][0]["manifest"]["training"] == {"method": "codi"}


def test_head_healthz_and_no_host_reflecting_redirect(client):
    r = client.head("/healthz")
    assert r.status_code == 200 and r.content == b""
    r = client.get("/v1/tasks/", headers={"Host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers
    assert "evil.example" not in r.text


def test_playground_never_parses_server_data_as_html(client):
    page = client.get("/").text
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "outerHTML" not in page
    assert "textContent" in page


@pytest.mark.parametrize("frames", [1, 2])
def test_truncated_images_are_400(client, frames):
    a = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    imgs = [Image.fromarray(a), Image.fromarray(a[::-1].copy())][:frames]
    for fmt in ("GIF", "TIFF"):
        buf = io.BytesIO()
        imgs[0].save(buf, format=fmt, save_all=True, append_images=imgs[1:])
        data = buf.getvalue()
        cut = data[: len(data) - 40] if fmt == "GIF" else data[: len(data) // 2]
        error(client.post("/v1/tasks/depth", files={"image": ("a", cut, "application/octet-stream")}), 400,
              "corrupt_image")


def test_scheduler_admission_estimate():
    from cdd.runtime.serving.scheduler import Job, Overloaded, Scheduler

    s = Scheduler(max_batch=4, max_wait=0.0, queue_size=100, clock=lambda: 100.0)
    s.submit(Job("a", 1, None, deadline=100.5, steps=2))  # no batch timed yet: admitted
    s.record_batch(seconds=1.0, rows=4, steps=2)  # 0.125 s per row-step of a full batch
    for _ in range(7):  # 8 rows of 2 steps: 2 full batches of 4 ahead, 1 s each
        s.submit(Job("a", 1, None, deadline=200.0, steps=2))
    with pytest.raises(Overloaded) as e:  # ... then its own batch: answered in 3 s
        s.submit(Job("a", 1, None, deadline=101.5, steps=2))
    assert e.value.wait == pytest.approx(3.0) and e.value.retry_after == 2
    s.submit(Job("a", 1, None, deadline=103.5, steps=2))  # 3 s fits a 3.5 s budget
    s.submit(Job("a", 1, None, deadline=103.5, steps=2))  # joins the batch with room: still 3 s
    with pytest.raises(Overloaded):
        s.submit(Job("b", 1, None, deadline=103.5, steps=2))  # another key: its own batch after all of a's
    j = s.submit(Job("b", 1, None, deadline=200.0))
    assert s.cancel(j) and j.cancelled and j not in s._queue


# -- one admission path: sizes, frames and work from the header and the form, before any decode --------


def test_output_size_is_checked_on_the_header_before_decoding(client):
    # a lone width derives the height from the aspect ratio: 4096 x 4096 is refused from the header (the
    # image cannot even be decoded: a check after decoding would answer 400 corrupt_image)
    t0 = time.monotonic()
    for form in ({"width": 4096}, {"height": 4096}, {"width": 65536}, {"width": 64, "height": 65536}):
        message = error(post(client, "depth", header_only_png(64, 64), **form), 422, "invalid_parameter")
        assert "over the limit of 4096 pixels" in message, message
    assert time.monotonic() - t0 < 5
    error(post(client, "depth", header_only_png(64, 64), width=16), 400, "corrupt_image")  # admitted, then decoded


def gif_of(frames: int, size: int) -> bytes:
    """A GIF of `frames` frames, size x size, each one colour (black and white in turn: PIL merges equal frames)."""
    imgs = [Image.new("P", (size, size), i % 2) for i in range(frames)]
    for img in imgs:
        img.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=10, disposal=1, optimize=False)
    return buf.getvalue()


def test_all_frames_count_against_the_decode_limit(client):
    # 32 frames of 768x768 are 18.9 MP decoded (each frame is read, to find truncation): over the 16.7 MP
    # decode limit, refused from the header; one such frame alone is fine
    data = gif_of(32, 768)
    t0 = time.monotonic()
    message = error(post(client, "depth", data), 413, "too_many_pixels")
    assert "32 frames" in message and time.monotonic() - t0 < 3
    assert post(client, "depth", gif_of(1, 768), seed=1).status_code == 200


def test_a_gif_of_many_frames_is_refused_without_walking_it(client):
    one = gif_of(2, 1)
    start = one.index(b"\x21\xf9")  # graphic control extension + image descriptor + data: one frame
    frame = one[start : one.index(b"\x21\xf9", start + 1)]
    data = one[:start] + frame * 300_000 + b";"  # 7 MB
    assert Image.open(io.BytesIO(one[:start] + frame * 3 + b";")).n_frames == 3
    t0 = time.monotonic()
    message = error(post(client, "depth", data), 400, "too_many_frames")
    assert "more than 64 frames" in message and time.monotonic() - t0 < 1.5


def test_an_empty_size_png_is_400_and_a_thin_strip_is_served(client):
    ihdr = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    zero = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    error(post(client, "depth", zero), 400, "corrupt_image")
    error(post(client, "depth", b"not an image at all"), 415, "unsupported_media_type")
    r = post(client, "depth", png(4000, 1), seed=1)  # default size: the aspect ratio, at most RES^2 pixels
    assert r.status_code == 200, r.text
    w, h = Image.open(io.BytesIO(r.content)).size
    assert w * h <= RES * RES and w > h


def test_resized_names_the_size_the_client_sent(client):
    r = post(client, "depth", png(128, 128), seed=1)  # downscaled to 64x64 on decoding, then to 16x16
    assert r.status_code == 200 and r.headers["x-cdd-resized"] == f"128x128->{RES}x{RES}"


def test_a_client_that_leaves_logs_no_unretrieved_future(app, caplog):
    import gc

    engine = app[0].state.engine
    reg = engine.pool.get("depth")
    work = blank_work(reg.name, reg.task, reg.resolution, reg.channels, engine.backbone.model_channels,
                      engine.backbone.vae_scale_factor, 1, "prev")
    engine.pause()
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            with pytest.raises(APIError):
                asyncio.run(_run(engine, work, time.monotonic() + 30, lambda: asyncio.sleep(0.05)))
            gc.collect()
    finally:
        engine.resume()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_a_refused_registration_frees_its_architecture(app, world, tmp_path):
    _, client = app
    engine = app[0].state.engine
    bb = world["backbone"]
    bad = save(bb, tmp_path, "t2i-bad", "colorize", kind="t2i")  # an architecture no served entry has
    other = save(bb, tmp_path, "cn", "depth")
    (bad / ADAPTER_FILE).write_bytes((other / ADAPTER_FILE).read_bytes())  # weights of another architecture
    m = json.loads((bad / MANIFEST).read_text())
    m["files"][ADAPTER_FILE] = sha256_file(bad / ADAPTER_FILE)
    (bad / MANIFEST).write_text(json.dumps(m))
    before = set(engine.pool.slots())
    for _ in range(3):
        error(client.post("/v1/adapters", json={"path": str(bad)}, headers=AUTH), 422, "invalid_zoo_entry")
        assert set(engine.pool.slots()) == before  # the module built for it is gone with it
    assert "t2i-bad" not in {u["name"] for u in client.get("/v1/tasks").json()["unavailable"]}
