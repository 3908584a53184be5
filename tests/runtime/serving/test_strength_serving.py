"""`strength` over HTTP (diffusers' img2img): super-resolution and edit requests may start from their input; the
entry's manifest gives the default; the response says what ran; depth, a strength out of (0, 1] and more steps than
the strength covers are 422s naming what is wrong; an entry whose manifest asks depth to start from its input is
not served."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from cdd.adapters.architectures import build_adapter
from cdd.adapters.zoo import save_entry
from cdd.runtime.diffusion.factory import make_backbone, save_backbone
from cdd.runtime.serving.app import create_app
from cdd.runtime.serving.settings import ServeSettings

RES = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("strength-serve")
    bb = make_backbone("latent", resolution=RES, seed=5)
    save_backbone(bb, root / "backbone")
    adapter = build_adapter("controlnet", bb.unet, bb.vae_scale_factor)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.03)
    common = dict(backbone_fingerprint=bb.fingerprint, condition={"channels": 3, "range": [0, 1], "resolution": RES})
    zoo = root / "zoo"
    save_entry(zoo / "sr", adapter, name="sr", task="super-resolution", steps=2, **common)
    save_entry(zoo / "sr-input", adapter, name="sr-input", task="super-resolution", steps=1, strength=0.5, **common)
    save_entry(zoo / "depth", adapter, name="depth", task="depth", steps=2, **common)
    save_entry(zoo / "edit", adapter, name="edit", task="edit", steps=2, **common)
    save_entry(zoo / "depth-input", adapter, name="depth-input", task="depth", steps=1, strength=0.5, **common)
    return {"backbone_dir": root / "backbone", "zoo": zoo}


def png(w, h, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def post(c, task, data, **form):
    return c.post(f"/v1/tasks/{task}", files={"image": ("in.png", data, "image/png")},
                  data={k: str(v) for k, v in form.items()})


@pytest.mark.parametrize("mode", ["request", "step"])
def test_strength_per_request_and_by_the_manifest(world, mode):
    app = create_app(ServeSettings(backbone=world["backbone_dir"], zoo=world["zoo"], warmup=False, max_wait_ms=5,
                                   batching=mode))
    small = png(RES // 4, RES // 4, seed=1)
    with TestClient(app) as c:
        assert app.state.engine.wait_ready(120)
        listing = c.get("/v1/tasks").json()
        tasks = {t["task"]: t for t in listing["tasks"]}
        assert tasks["super-resolution"]["starts_from_input"] and tasks["edit"]["starts_from_input"]
        assert not tasks["depth"]["starts_from_input"]
        infos = {x["name"]: x for t in listing["tasks"] for x in t["adapters"]}
        assert infos["sr"]["strength"] == 1 and infos["sr-input"]["strength"] == 0.5
        # a depth entry whose manifest starts from the depth map is not served, and says why
        gone = {u["name"]: u["reason"] for u in listing["unavailable"]}
        assert "depth-input" not in infos and "task 'depth' cannot start from its input" in gone["depth-input"]

        noise = post(c, "super-resolution", small, seed=3, adapter="sr", steps=1)
        half = post(c, "super-resolution", small, seed=3, adapter="sr", steps=1, strength=0.5)
        by_manifest = post(c, "super-resolution", small, seed=3, adapter="sr-input")
        for r in (noise, half, by_manifest):
            assert r.status_code == 200, r.text
        assert "x-cdd-strength" not in noise.headers and half.headers["x-cdd-strength"] == "0.5"
        assert by_manifest.headers["x-cdd-strength"] == "0.5" and by_manifest.headers["x-cdd-steps"] == "1"
        assert half.content == by_manifest.content  # the same weights, steps, strength and seed
        assert half.content != noise.content
        as_json = c.post("/v1/tasks/super-resolution", files={"image": ("in.png", small, "image/png")},
                         data={"seed": "3", "adapter": "sr", "steps": "1", "strength": "0.5"},
                         headers={"Accept": "application/json"}).json()
        assert as_json["strength"] == 0.5 and base64.b64decode(as_json["image"]) == half.content
        back_to_noise = post(c, "super-resolution", small, seed=3, adapter="sr-input", strength=1)
        assert back_to_noise.status_code == 200 and back_to_noise.content == noise.content

        edit = post(c, "edit", png(RES, RES, seed=2), seed=3, prompt="make the cube red", strength=0.5)
        assert edit.status_code == 200 and edit.headers["x-cdd-strength"] == "0.5"

        for task, form, message in [
            ("depth", {"strength": 0.5}, "task 'depth' cannot start from its input (only super-resolution, edit can"),
            ("super-resolution", {"strength": 0.002, "steps": 3}, "strength 0.002 covers 2 timestep(s): at most 2"),
            ("super-resolution", {"strength": 0}, "strength"),
            ("super-resolution", {"strength": 1.5}, "strength"),
        ]:
            r = post(c, task, small if task == "super-resolution" else png(RES, RES), **form)
            assert r.status_code == 422 and message in r.json()["error"]["message"], (form, r.text)
    schema = app.openapi()
    form_schema = next(v for k, v in schema["components"]["schemas"].items() if "strength" in v.get("properties", {})
                       and "image" in v.get("properties", {}))
    assert "img2img" in str(form_schema["properties"]["strength"])
