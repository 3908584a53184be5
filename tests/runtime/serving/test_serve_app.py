"""The HTTP service end to end (FastAPI TestClient, lifespan included) on a tiny latent backbone and a
zoo of five entries: two super-resolution ControlNets of one architecture, a depth ControlNet and a
depth T2I-Adapter, and an edit LoRA-ControlNet with a backbone LoRA (mode `lora`)."""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import re
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from cdd.adapters.architectures import add_backbone_lora, backbone_lora_state, build_adapter
from cdd.adapters.zoo import ADAPTER_FILE, ZooError, save_entry
from cdd.runtime.serving.app import create_app
from cdd.runtime.diffusion.factory import make_backbone, save_backbone
from cdd.runtime.serving.logs import JsonFormatter
from cdd.runtime.serving.pool import AdapterPool
from cdd.runtime.serving.settings import ServeSettings

RES = 16
KEY = "test-key"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def perturb(module, std, seed):
    """Random values on the trainable (zero-initialised) parts, so each adapter visibly matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def save_adapter(bb, zoo, name, task, kind, seed, **kw):
    adapter = perturb(build_adapter(kind, bb.unet, bb.vae_scale_factor), 0.03, seed)
    save_entry(zoo / name, adapter, name=name, task=task, backbone_fingerprint=bb.fingerprint,
               condition={"channels": 3, "range": [0, 1], "resolution": RES}, **kw)
    return zoo / name


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    bb = make_backbone("latent", resolution=RES, seed=5)
    save_backbone(bb, root / "backbone")
    zoo = root / "zoo"
    save_adapter(bb, zoo, "sr", "super-resolution", "controlnet", 1, steps=2, sampler="prev")
    save_adapter(bb, zoo, "sr-b", "super-resolution", "controlnet", 2, steps=2, sampler="prev")
    save_adapter(bb, zoo, "depth", "depth", "controlnet", 3, steps=4, sampler="ddim")
    save_adapter(bb, zoo, "depth-t2i", "depth", "t2i", 4, steps=2, sampler="cm")
    unet = copy.deepcopy(bb.unet)
    cfg = add_backbone_lora(unet, "trained", rank=2)
    perturb(unet, 0.05, 9)
    lora = ({"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules)},
            backbone_lora_state(unet, "trained"))
    save_adapter(bb, zoo, "edit", "edit", "controlnet-lora", 5, steps=2, sampler="prev", mode="lora", backbone_lora=lora)
    return {"root": root, "backbone": bb, "backbone_dir": root / "backbone", "zoo": zoo}


def settings(world, **kw):
    base = dict(backbone=world["backbone_dir"], zoo=world["zoo"], max_batch=4, max_wait_ms=20, max_pixels=64 * 64,
                max_decode_pixels=512 * 512, max_upload_mb=1, api_key=KEY)
    return ServeSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def app(world):
    app = create_app(settings(world))
    with TestClient(app) as client:
        assert app.state.engine.wait_ready(120)
        yield app, client
    assert not app.state.engine._thread.is_alive()  # the lifespan drained and stopped the engine


@pytest.fixture
def client(app):
    return app[1]


def png(w, h, seed=0, mode="RGB"):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def post(client, task, image, headers=None, **form):
    data = {k: str(v) for k, v in form.items()}
    return client.post(f"/v1/tasks/{task}", files={"image": ("in.png", image, "image/png")}, data=data, headers=headers)


def decode(content):
    return np.asarray(Image.open(io.BytesIO(content)))


def error(r, status, code):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    return body["error"]["message"]


# -- operations --------------------------------------------------------------------------


def test_health_ready_docs_and_playground(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert "swagger" in client.get("/docs").text.lower()
    spec = client.get("/openapi.json").json()
    assert {"/v1/tasks/{task}", "/v1/tasks", "/healthz", "/readyz", "/metrics", "/v1/adapters"} <= set(spec["paths"])
    form = spec["components"]["schemas"][
        spec["paths"]["/v1/tasks/{task}"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].split("/")[-1]
    ]
    assert {"image", "prompt", "steps", "seed", "sampler", "adapter"} <= set(form["properties"])
    page = client.get("/")
    assert page.status_code == 200 and "cdd playground" in page.text and page.headers["content-type"].startswith("text/html")


def test_docs_page_loads_only_assets_the_server_serves(client):
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert len(refs) == 4, refs  # stylesheet, icon, script, schema
    types = {".css": "text/css", ".png": "image/png", ".js": "text/javascript", ".json": "application/json"}
    for ref in refs:
        assert ref.startswith("/") and not ref.startswith("//"), f"{ref} is not served by cdd-serve"
        r = client.get(ref)
        assert r.status_code == 200 and len(r.content) > 100, ref
        assert r.headers["content-type"].startswith(types[ref[ref.rindex("."):]]), (ref, r.headers["content-type"])
    # FastAPI writes OpenAPI 3.1, which Swagger UI renders from version 5 on (4.x shows an error page).
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")
    bundle = client.get(next(r for r in refs if r.endswith(".js"))).text
    assert int(re.search(r'PACKAGE_VERSION:"(\d+)\.', bundle).group(1)) >= 5
    assert error(client.get("/docs/assets/../../settings.py"), 404, "not_found")
    assert error(client.get("/docs/assets/index.html"), 404, "not_found")
    text = client.get("/metrics").text
    for route in ("/docs", "/openapi.json", "/docs/assets/{name}"):
        assert f'cdd_http_requests_total{{code="200",route="{route}"}}' in text, route


def test_tasks_list_adapters_and_manifests(client):
    r = client.get("/v1/tasks")
    body = r.json()
    tasks = {t["task"]: t for t in body["tasks"]}
    assert set(tasks) == {"super-resolution", "depth", "edit"}
    assert [a["name"] for a in tasks["depth"]["adapters"]] == ["depth", "depth-t2i"]
    assert tasks["depth"]["default_adapter"] == "depth"
    assert tasks["edit"]["prompt_required"] and not tasks["depth"]["prompt_required"]
    edit = tasks["edit"]["adapters"][0]
    assert edit["kind"] == "controlnet-lora" and edit["mode"] == "lora" and edit["backbone_lora"]
    # the summary a client builds a request from: no manifests (their architecture configs are tens of KB)
    assert "manifest" not in edit and len(r.content) < 4000
    assert (edit["steps"], edit["sampler"], edit["resolution"]) == (2, "prev", RES)
    assert tasks["depth"]["samplers"] == ["prev", "ddim", "cm", "gd"] and tasks["depth"]["steps"] == [1, 2, 3, 4]
    assert "prev+ilvr" in tasks["super-resolution"]["samplers"] and "prev+keep" not in tasks["super-resolution"]["samplers"]
    assert "prev+keep" in tasks["edit"]["samplers"] and "prev+ilvr" not in tasks["edit"]["samplers"]
    assert tasks["super-resolution"]["upscale"] == 4 and not tasks["super-resolution"]["takes_width_height"]
    assert "upscale" not in tasks["depth"] and tasks["depth"]["takes_width_height"]
    assert body["limits"] == {"max_pixels": 64 * 64, "max_decode_pixels": 512 * 512, "max_work": 512,
                              "max_upload_mb": 1.0, "max_prompt": 2000}
    # every sampler a task lists is one it takes
    for task, t in tasks.items():
        for sampler in t["samplers"]:
            assert post(client, task, png(4, 4) if task == "super-resolution" else png(RES, RES), seed=1, steps=1,
                        sampler=sampler, prompt="make it red").status_code == 200, (task, sampler)
    detail = {t["task"]: t for t in client.get("/v1/tasks", params={"detail": "true"}).json()["tasks"]}
    manifest = detail["edit"]["adapters"][0]["manifest"]
    assert manifest["files"][ADAPTER_FILE] and manifest["condition"]["resolution"] == RES


def test_metrics_exposition(client):
    post(client, "depth", png(RES, RES), seed=1)
    text = client.get("/metrics").text
    for name in ("cdd_request_latency_seconds_bucket", "cdd_queue_wait_seconds_bucket", "cdd_batch_size_bucket",
                 "cdd_adapter_swaps_total", "cdd_adapter_load_seconds_bucket", "cdd_resident_adapters",
                 "cdd_http_requests_total", "cdd_cuda_graph_captures_total"):
        assert name in text, name
    assert 'cdd_http_requests_total{code="200",route="/v1/tasks/{task}"}' in text


# -- tasks -------------------------------------------------------------------------------


def test_super_resolution_png_is_4x_with_headers(client):
    r = post(client, "super-resolution", png(9, 5), seed=7)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert decode(r.content).shape == (20, 36, 3)
    h = r.headers
    assert (h["x-cdd-adapter"], h["x-cdd-steps"], h["x-cdd-seed"], h["x-cdd-sampler"]) == ("sr", "2", "7", "prev")
    assert int(h["x-cdd-tiles"]) > 1 and "x-cdd-resized" not in h and "execute;dur=" in h["server-timing"]


def test_super_resolution_with_ilvr_and_ilvr_refused_for_other_tasks(client):
    plain = post(client, "super-resolution", png(9, 5), seed=7)
    r = post(client, "super-resolution", png(9, 5), seed=7, sampler="prev+ilvr")
    assert r.status_code == 200 and r.headers["x-cdd-sampler"] == "prev+ilvr"
    assert decode(r.content).shape == (20, 36, 3) and r.content != plain.content
    message = error(post(client, "depth", png(RES, RES), sampler="prev+ilvr"), 422, "invalid_parameter")
    assert "prev+ilvr" in message and "'depth' has no low-resolution input" in message


def test_edit_with_the_keep_step_and_keep_refused_for_other_tasks(client):
    r = post(client, "edit", png(RES, RES), prompt="make the cube red", seed=7, sampler="prev+keep")
    assert r.status_code == 200 and r.headers["x-cdd-sampler"] == "prev+keep"
    message = error(post(client, "super-resolution", png(9, 5), sampler="cm+keep"), 422, "invalid_parameter")
    assert "cm+keep" in message and "'super-resolution' edits no picture (use 'cm')" in message
    message = error(post(client, "edit", png(RES, RES), prompt="make the cube red", sampler="prev+ilvr"), 422,
                    "invalid_parameter")
    assert "'edit' has no low-resolution input" in message


def test_a_super_resolution_manifest_may_default_to_ilvr_and_other_tasks_may_not(world, tmp_path):
    """A zoo entry's default sampler may be NAME+ilvr for super-resolution (a request with no sampler gets it,
    the same bytes as asking for it); a depth entry with one is refused when the zoo loads."""
    bb, zoo = world["backbone"], tmp_path / "zoo"
    save_adapter(bb, zoo, "sr-ilvr", "super-resolution", "controlnet", 1, steps=2, sampler="prev+ilvr")
    app = create_app(ServeSettings(backbone=world["backbone_dir"], zoo=zoo, warmup=False, max_wait_ms=5))
    with TestClient(app) as c:
        assert app.state.engine.wait_ready(120)
        default, asked = post(c, "super-resolution", png(9, 5), seed=7), post(c, "super-resolution", png(9, 5), seed=7,
                                                                             sampler="prev+ilvr")
        assert default.status_code == 200 and default.headers["x-cdd-sampler"] == "prev+ilvr"
        assert default.content == asked.content
    bad = save_adapter(bb, tmp_path / "bad", "depth-ilvr", "depth", "controlnet", 3, steps=2, sampler="prev+ilvr")
    with pytest.raises(ZooError, match=r"manifest sampler 'prev\+ilvr' is not one of prev, ddim, cm, gd$"):
        AdapterPool(bb, budget_bytes=1 << 30).register(bad)


def test_guidance_per_request_for_a_guided_entry(world, tmp_path):
    """`guidance` reaches a controlnet-guided entry (headers, JSON, GET /v1/tasks' range, the OpenAPI form); no
    guidance is the entry's default; out of range, not a number, or for an entry that takes none is a 422 naming it."""
    bb, zoo = world["backbone"], tmp_path / "zoo"
    adapter = save_adapter(bb, zoo, "depth-g", "depth", "controlnet-guided", 6, steps=2, sampler="prev")
    manifest = json.loads((adapter / "manifest.json").read_text())  # 1-step requests default to w = 0
    (adapter / "manifest.json").write_text(json.dumps({**manifest, "guidance_steps": {"1": 0.0}}))
    save_adapter(bb, zoo, "edit", "edit", "controlnet", 7, steps=1, sampler="prev")
    app = create_app(ServeSettings(backbone=world["backbone_dir"], zoo=zoo, warmup=False, max_wait_ms=5))
    with TestClient(app) as c:
        assert app.state.engine.wait_ready(120)
        info = next(a for t in c.get("/v1/tasks").json()["tasks"] for a in t["adapters"] if a["name"] == "depth-g")
        assert info["guidance"] == [1.0, 0.0, 2.0]  # architectures' default w, the training range's defaults
        assert info["guidance_steps"] == {"1": 0.0}
        assert "guidance" in str(c.get("/openapi.json").json()["components"])
        default, one, two = (post(c, "depth", png(8, 8), seed=3, prompt="a red cube", **g)
                             for g in ({}, {"guidance": 1}, {"guidance": 2}))
        assert default.status_code == one.status_code == two.status_code == 200
        assert default.headers["x-cdd-guidance"] == "1" and two.headers["x-cdd-guidance"] == "2"
        assert default.content == one.content
        one_step, at_zero = (post(c, "depth", png(8, 8), seed=3, prompt="a red cube", steps=1, **g)
                             for g in ({}, {"guidance": 0}))
        assert one_step.headers["x-cdd-guidance"] == "0" and one_step.content == at_zero.content
        j = c.post("/v1/tasks/depth", files={"image": ("in.png", png(8, 8), "image/png")},
                   data={"guidance": "0.5", "seed": "3"}, headers={"accept": "application/json"}).json()
        assert j["guidance"] == 0.5
        assert "range [0, 2]" in error(post(c, "depth", png(8, 8), guidance=2.5), 422, "invalid_parameter")
        error(post(c, "depth", png(8, 8), guidance="lots"), 422, "invalid_parameter")
        assert "takes no guidance" in error(post(c, "edit", png(8, 8), prompt="make it red", guidance=1), 422,
                                            "invalid_parameter")
    assert adapter.exists()


def test_same_request_same_seed_same_bytes_and_random_seed_is_returned(client):
    r1 = post(client, "super-resolution", png(6, 6, seed=3))
    seed = int(r1.headers["x-cdd-seed"])
    r2 = post(client, "super-resolution", png(6, 6, seed=3), seed=seed)
    r3 = post(client, "super-resolution", png(6, 6, seed=3), seed=seed + 1)
    assert r1.content == r2.content != r3.content


def test_json_answer_carries_the_same_png(client):
    r = post(client, "depth", png(RES, RES), seed=11)
    j = post(client, "depth", png(RES, RES), seed=11, headers={"Accept": "application/json"})
    assert j.headers["content-type"] == "application/json"
    body = j.json()
    assert base64.b64decode(body["image"]) == r.content
    assert {k: body[k] for k in ("adapter", "steps", "seed", "sampler", "width", "height")} == {
        "adapter": "depth", "steps": 4, "seed": 11, "sampler": "ddim", "width": RES, "height": RES}
    assert set(body["timings"]) == {"queue_ms", "execute_ms", "total_ms", "batch_size", "batch_rows"}


def test_depth_resizes_to_the_adapter_pixel_count_and_says_so(client):
    r = post(client, "depth", png(40, 20), seed=1, adapter="depth-t2i", steps=1, sampler="ddim")
    assert r.status_code == 200, r.text
    assert r.headers["x-cdd-resized"] == "40x20->24x12"  # aspect 2 at RES x RES pixels, sides multiples of 4
    assert (r.headers["x-cdd-adapter"], r.headers["x-cdd-steps"], r.headers["x-cdd-sampler"]) == ("depth-t2i", "1", "ddim")
    assert decode(r.content).shape == (12, 24, 3)


def test_every_sampler_and_step_count(client):
    outs = {}
    for sampler in ("prev", "ddim", "cm"):
        for steps in (1, 4):
            r = post(client, "depth", png(RES, RES), seed=2, sampler=sampler, steps=steps)
            assert r.status_code == 200 and r.headers["x-cdd-sampler"] == sampler
            outs[sampler, steps] = r.content
    assert len(set(outs.values())) == len(outs)


def test_edit_uses_its_instruction_and_backbone_lora(client):
    a = post(client, "edit", png(RES, RES), seed=4, prompt="make it red")
    b = post(client, "edit", png(RES, RES), seed=4, prompt="make it blue")
    assert a.status_code == b.status_code == 200 and a.content != b.content
    message = error(post(client, "edit", png(RES, RES), seed=4), 422, "invalid_parameter")
    assert "instruction" in message


def test_swapping_a_b_a_leaves_a_unchanged(app):
    _, client = app
    engine = app[0].state.engine
    swaps = engine.metrics.adapter_swaps._value.get()
    a1 = post(client, "super-resolution", png(4, 4), seed=5, adapter="sr")
    b = post(client, "super-resolution", png(4, 4), seed=5, adapter="sr-b")
    a2 = post(client, "super-resolution", png(4, 4), seed=5, adapter="sr")
    assert a1.content == a2.content != b.content
    assert engine.metrics.adapter_swaps._value.get() >= swaps + 2
    slots = [s for s in engine.pool.slots().values() if s.key.startswith("controlnet:")]
    assert len(slots) == 1  # sr, sr-b and depth share one live slot


@pytest.fixture(scope="module")
def exact_app(world):
    """Exact batching: every adapter and backbone call at max_batch rows, so bytes cannot depend on company."""
    app = create_app(settings(world, exact_batching=True, warmup=False))
    with TestClient(app) as client:
        assert app.state.engine.wait_ready(120)
        yield app, client


def test_mixed_tasks_concurrently_give_the_bytes_of_requests_sent_one_by_one(exact_app):
    service, client = exact_app
    engine = service.state.engine
    requests = [
        ("super-resolution", png(4, 4, 1), {"seed": 1}),
        ("super-resolution", png(7, 3, 2), {"seed": 2}),
        ("super-resolution", png(4, 4, 3), {"seed": 3, "adapter": "sr-b"}),
        ("depth", png(RES, RES, 4), {"seed": 4}),
        ("depth", png(RES, RES, 5), {"seed": 5}),
        ("depth", png(RES, RES, 6), {"seed": 6, "adapter": "depth-t2i"}),
        ("depth", png(30, 12, 7), {"seed": 7, "adapter": "depth-t2i"}),
        ("edit", png(RES, RES, 8), {"seed": 8, "prompt": "make it red"}),
        ("edit", png(RES, RES, 9), {"seed": 9, "prompt": "remove the sphere"}),
        ("super-resolution", png(4, 4, 10), {"seed": 10, "sampler": "cm"}),
    ]
    alone = [post(client, t, img, **form).content for t, img, form in requests]

    engine.pause()  # queue everything first, so batches really mix requests
    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(post, client, t, img, {"Accept": "application/json"}, **form) for t, img, form in requests]
        deadline = time.monotonic() + 30
        while len(engine.scheduler) < len(requests) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(engine.scheduler) == len(requests)
        engine.resume()
        together = [f.result().json() for f in futures]
    assert [base64.b64decode(j["image"]) for j in together] == alone
    assert max(j["timings"]["batch_size"] for j in together) > 1


# -- client errors -----------------------------------------------------------------------


def test_unknown_task_is_404_even_with_bad_parameters(client):
    assert "tasks: depth, edit, super-resolution" in error(post(client, "colorize", png(4, 4)), 404, "unknown_task")
    error(post(client, "colorize", png(4, 4), steps=9), 404, "unknown_task")
    error(client.get("/v2/nothing"), 404, "not_found")


def test_not_an_image_is_415_and_a_corrupt_one_400(client):
    error(post(client, "depth", b"definitely not an image"), 415, "unsupported_media_type")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"  # PIL could open it, but runs ghostscript
    error(post(client, "depth", eps), 415, "unsupported_media_type")
    good = png(RES, RES)
    error(post(client, "depth", good[: len(good) // 2]), 400, "corrupt_image")
    error(post(client, "depth", b""), 400, "empty_image")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb(width: int, height: int, rows: int | None = None) -> bytes:
    """A PNG whose header claims width x height RGB; its data is `rows` rows of zeros, compressed."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    z = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)
    data = b"".join(z.compress(row) for _ in range(height if rows is None else rows)) + z.flush()
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def test_too_many_pixels_is_413_before_decoding(client):
    assert "65x64" in error(post(client, "super-resolution", png(65, 64)), 413, "too_many_pixels")
    assert "513x512" in error(post(client, "depth", png(513, 512)), 413, "too_many_pixels")  # the decode limit
    # decompression bombs: the header is checked before a pixel is decoded, so nothing big is allocated
    full = bomb(3000, 3000)  # 27 MB of pixels in a 26 KB file
    assert len(full) < 100_000
    error(post(client, "depth", full), 413, "too_many_pixels")
    error(post(client, "depth", bomb(100_000, 100_000, rows=1)), 413, "too_many_pixels")  # 30 GB claimed
    error(post(client, "super-resolution", bomb(5000, 1, rows=1)), 413, "too_many_pixels")


def test_depth_and_edit_take_an_ordinary_photo_and_a_width_and_height(client):
    """Tasks that resize accept any image up to the decode-safety limit (a 300x200 photo is over max_pixels),
    by default at the input's aspect ratio; width and height (multiples of the size factor) as diffusers
    pipelines take them; super-resolution, whose output is 4x its input, takes neither."""
    r = post(client, "depth", png(300, 200), seed=1, steps=1)
    assert r.status_code == 200, r.text
    assert decode(r.content).shape == (12, 20, 3)  # aspect 1.5 at 16 x 16 pixels, sides multiples of 4
    r = post(client, "depth", png(16, 16), seed=1, steps=1, width=24, height=16, headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (24, 16) and body["resized"] == "16x16->24x16"
    assert decode(base64.b64decode(body["image"])).shape == (16, 24, 3)
    assert "multiple of 4" in error(post(client, "depth", png(16, 16), width=18), 422, "invalid_parameter")
    error(post(client, "super-resolution", png(4, 4), width=16), 422, "invalid_parameter")
    error(post(client, "depth", png(16, 16), width=128, height=128), 422, "invalid_parameter")  # over max_pixels


def test_body_larger_than_the_upload_limit_is_413(client):
    big = bytes(2 * 1024 * 1024)
    error(post(client, "depth", big), 413, "payload_too_large")  # refused on its Content-Length

    def chunks():  # no Content-Length: refused while it streams in
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        for _ in range(40):
            yield bytes(64 * 1024)
        yield b"\r\n--b--\r\n"

    r = client.post("/v1/tasks/depth", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    error(r, 413, "payload_too_large")


@pytest.mark.parametrize(
    "form, field",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 5}, "steps"),
        ({"steps": "two"}, "steps"),
        ({"seed": -1}, "seed"),
        ({"seed": "x"}, "seed"),
        ({"sampler": "euler"}, "sampler"),
        ({"adapter": "edit"}, "adapter"),
        ({"prompt": "x" * 3000}, "prompt"),
    ],
)
def test_bad_parameters_are_422(client, form, field):
    assert field in error(post(client, "depth", png(RES, RES), **form), 422, "invalid_parameter")


def test_missing_image_is_422(client):
    message = error(client.post("/v1/tasks/depth", data={"seed": "1"}), 422, "invalid_parameter")
    assert "image" in message


@pytest.mark.parametrize("request_kw, sent", [
    (dict(files={"file": ("in.png", b"x", "image/png")}, data={"seed": "1"}), "this form has 'seed' (text), 'file' (file)"),
    (dict(json={"image": "aGVsbG8=", "seed": 1}), "body is application/json (a JSON body is not read)"),
    (dict(data={"image": "in.png"}), "body is application/x-www-form-urlencoded"),
    (dict(files={"image": (None, "in.png")}), "this form has 'image' (text)"),
    (dict(), "body is untyped"),
])
def test_a_form_without_an_image_file_says_what_the_api_takes(client, request_kw, sent):
    """A wrong field name, a JSON body, a text field for the file, no body: the 422 says what the route takes
    and what this request sent."""
    message = error(client.post("/v1/tasks/depth", **request_kw), 422, "invalid_parameter")
    assert "multipart/form-data form with the condition image as a file field named 'image'" in message
    assert "curl -F image=@condition.png http://SERVER/v1/tasks/depth" in message and sent in message, message


def test_a_colour_or_raw_depth_image_for_depth_is_served_with_a_warning(client):
    """A depth condition is grey: a colour photograph or a 16-bit raw depth map (cdd-scenes' depth/) gets a 200 with
    X-CDD-Warning (and `warning` in JSON) saying what the task takes; a grey image, or colour for another task, none."""
    r = post(client, "depth", png(RES, RES), seed=1, headers={"Accept": "application/json"})
    assert r.status_code == 200 and "depth condition is grey" in r.headers["x-cdd-warning"]
    assert r.json()["warning"] == r.headers["x-cdd-warning"] and "example-depth.png" in r.json()["warning"]
    grey = png(RES, RES, mode="L")
    r = post(client, "depth", grey, seed=1)
    assert r.status_code == 200 and "x-cdd-warning" not in r.headers
    jpeg = io.BytesIO()  # JPEG's chroma error on a grey picture is no colour
    Image.open(io.BytesIO(grey)).convert("RGB").save(jpeg, format="JPEG", quality=75)
    assert "x-cdd-warning" not in post(client, "depth", jpeg.getvalue(), seed=1).headers
    raw = io.BytesIO()
    Image.fromarray((np.arange(RES * RES).reshape(RES, RES) * 40).astype(np.uint16)).save(raw, format="PNG")
    r = post(client, "depth", raw.getvalue(), seed=1)
    assert r.status_code == 200 and "16-bit" in r.headers["x-cdd-warning"] and "depth_condition/" in r.headers["x-cdd-warning"]
    assert "x-cdd-warning" not in post(client, "super-resolution", png(4, 4), seed=1).headers


def test_favicon_and_the_playground_examples(client):
    r = client.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (32, 32)
    examples = client.get("/examples").json()["examples"]
    assert set(examples) == {"super-resolution", "depth", "edit"}
    for task, ex in examples.items():
        image = client.get(f"/examples/{ex['image']}")
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        if task in ("depth", "edit"):  # this test's zoo has them; the example is the task's input, with no warning
            r = post(client, task, image.content, seed=1, steps=1, prompt=ex["prompt"])
            assert r.status_code == 200 and "x-cdd-warning" not in r.headers, r.text
    error(client.get("/examples/..%2Fapp.py"), 404, "not_found")
    error(client.get("/examples/index.html"), 404, "not_found")


def test_the_playground_examples_are_the_scenes_world_as_cdd_scenes_writes_it(tmp_path):
    from importlib.resources import files

    from cdd.training.data import cli as scenes_cli

    static = files("cdd.runtime.serving") / "static"
    shipped = json.loads((static / "examples.json").read_text())
    assert "--n 2 --seed 0 --sr" in shipped["source"]
    assert scenes_cli.main(["--n", "2", "--seed", "0", "--sr", "--out", str(tmp_path / "scenes")]) == 0
    scene = [json.loads(line) for line in (tmp_path / "scenes" / "metadata.jsonl").read_text().splitlines()][1]
    for task, folder, prompt in (("super-resolution", "lr", "text"), ("depth", "depth_condition", "text"),
                                 ("edit", "images", "instruction")):
        ex = shipped["examples"][task]
        ours = np.asarray(Image.open(io.BytesIO((static / ex["image"]).read_bytes())))
        theirs = np.asarray(Image.open(tmp_path / "scenes" / folder / "000001.png"))
        np.testing.assert_array_equal(ours, theirs)
        assert ex["prompt"] == scene[prompt]


def test_bad_deadline_header_is_422(client):
    error(post(client, "depth", png(RES, RES), headers={"X-CDD-Deadline-Ms": "-5"}), 422, "invalid_parameter")


def test_client_errors_do_not_disturb_other_requests(client):
    good = post(client, "depth", png(RES, RES), seed=21).content
    with ThreadPoolExecutor(6) as pool:
        bad = [pool.submit(post, client, "depth", b"junk") for _ in range(3)]
        ok = [pool.submit(post, client, "depth", png(RES, RES), seed=21) for _ in range(3)]
        assert all(f.result().status_code == 415 for f in bad)
        assert all(f.result().content == good for f in ok)


# -- admin -------------------------------------------------------------------------------


def test_admin_needs_the_key(client, world):
    body = {"path": str(world["zoo"] / "sr")}
    r = client.post("/v1/adapters", json=body)
    error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    error(client.post("/v1/adapters", json=body, headers={"Authorization": "Bearer wrong"}), 403, "forbidden")
    error(client.delete("/v1/adapters/sr"), 401, "unauthorized")
    error(client.delete("/v1/adapters/sr", headers={"X-API-Key": "wrong"}), 403, "forbidden")
    assert "sr" in [a["name"] for t in client.get("/v1/tasks").json()["tasks"] for a in t["adapters"]]


def test_register_serve_and_delete_an_adapter(client, world, tmp_path):
    auth = {"Authorization": f"Bearer {KEY}"}
    entry = save_adapter(world["backbone"], tmp_path / "zoo", "colorize-v1", "colorize", "controlnet", 31, steps=1)
    r = client.post("/v1/adapters", json={"path": str(entry)}, headers=auth)
    assert r.status_code == 201, r.text
    assert [a["name"] for a in r.json()["registered"]] == ["colorize-v1"]
    error(client.post("/v1/adapters", json={"path": str(entry)}, headers=auth), 409, "adapter_exists")
    tasks = {t["task"] for t in client.get("/v1/tasks").json()["tasks"]}
    assert "colorize" in tasks
    r = post(client, "colorize", png(RES, RES), seed=1)
    assert r.status_code == 200 and r.headers["x-cdd-adapter"] == "colorize-v1" and r.headers["x-cdd-steps"] == "1"
    r = client.delete("/v1/adapters/colorize-v1", headers={"X-API-Key": KEY})
    assert r.status_code == 200 and r.json() == {"deleted": "colorize-v1"}
    error(post(client, "colorize", png(RES, RES)), 404, "unknown_task")
    error(client.delete("/v1/adapters/colorize-v1", headers=auth), 404, "unknown_adapter")


def test_register_refuses_bad_entries(client, world, tmp_path):
    auth = {"Authorization": f"Bearer {KEY}"}
    error(client.post("/v1/adapters", json={"path": str(tmp_path / "nothing")}, headers=auth), 422, "invalid_zoo_entry")
    entry = save_adapter(world["backbone"], tmp_path / "zoo", "tampered", "depth", "controlnet", 32)
    f = entry / ADAPTER_FILE
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert "tampered" in error(client.post("/v1/adapters", json={"path": str(entry)}, headers=auth), 422, "invalid_zoo_entry")
    other = make_backbone("latent", resolution=RES, seed=99)
    foreign = save_adapter(other, tmp_path / "zoo", "foreign", "depth", "controlnet", 33)
    assert "made for backbone" in error(client.post("/v1/adapters", json={"path": str(foreign)}, headers=auth),
                                        422, "invalid_zoo_entry")
    error(client.post("/v1/adapters", json={"nope": 1}, headers=auth), 422, "invalid_parameter")


# -- logs --------------------------------------------------------------------------------


def test_one_json_log_line_per_request(client, caplog):
    with caplog.at_level(logging.INFO, logger="cdd.serve.access"):
        post(client, "depth", png(RES, RES), seed=77)
        post(client, "depth", b"junk")
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == "cdd.serve.access"]
    assert len(lines) == 2
    ok, bad = lines
    assert ok["status"] == 200 and ok["task"] == "depth" and ok["seed"] == 77 and ok["adapter"] == "depth"
    assert ok["route"] == "/v1/tasks/{task}" and ok["duration_ms"] > 0 and ok["batch_size"] >= 1
    assert bad["status"] == 415


# -- backpressure, deadlines, no key: a second, small app --------------------------------


@pytest.fixture(scope="module")
def small(world):
    app = create_app(settings(world, queue_size=1, max_batch=1, max_wait_ms=0, api_key=None, warmup=False))
    with TestClient(app) as client:
        assert app.state.engine.wait_ready(60)
        yield app, client


def test_queue_full_is_429_with_retry_after(small):
    app, client = small
    engine = app.state.engine
    engine.pause()
    try:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(post, client, "depth", png(RES, RES), seed=1)
            while len(engine.scheduler) < 1:
                time.sleep(0.01)
            refused = [post(client, "depth", png(RES, RES), seed=s) for s in (2, 3)]
            for r in refused:
                error(r, 429, "queue_full")
                assert int(r.headers["retry-after"]) >= 1
            engine.resume()
            assert first.result().status_code == 200
    finally:
        engine.resume()


def test_deadline_passed_before_execution_is_504(small):
    app, client = small
    engine = app.state.engine
    engine.pause()
    try:
        # The deadline must be past admission's estimate (learnt from the batches run so far: 0.4 s on a
        # busy 2-core CI machine refused a 300 ms deadline with 429), so the request is admitted and waits.
        t0 = time.monotonic()
        r = post(client, "depth", png(RES, RES), seed=1, headers={"X-CDD-Deadline-Ms": "3000"})
        error(r, 504, "deadline_exceeded")
        assert 2.9 < time.monotonic() - t0 < 30
        assert len(engine.scheduler) == 0  # withdrawn from the queue
        error(post(client, "depth", png(RES, RES), headers={"X-CDD-Deadline-Ms": "0.001"}), 504, "deadline_exceeded")
    finally:
        engine.resume()
    assert post(client, "depth", png(RES, RES), seed=1).status_code == 200


def test_admin_is_refused_without_a_configured_key(small):
    _, client = small
    body = {"path": "/nowhere"}
    assert "no API key" in error(client.post("/v1/adapters", json=body, headers={"Authorization": "Bearer x"}),
                                 403, "admin_disabled")
    error(client.delete("/v1/adapters/depth"), 403, "admin_disabled")


def test_shutdown_finishes_admitted_requests(world):
    app = create_app(settings(world, warmup=False, max_batch=2))
    results = []
    with TestClient(app) as client:
        engine = app.state.engine
        engine.pause()
        threads = [threading.Thread(target=lambda s=s: results.append(post(client, "depth", png(RES, RES), seed=s)))
                   for s in range(3)]
        for t in threads:
            t.start()
        while len(engine.scheduler) < 3:
            time.sleep(0.01)
        stopper = threading.Thread(target=engine.stop)  # what the lifespan does on shutdown
        stopper.start()
        for t in threads:
            t.join(60)
        stopper.join(60)
        error(post(client, "depth", png(RES, RES)), 503, "shutting_down")
    assert [r.status_code for r in results] == [200, 200, 200]
