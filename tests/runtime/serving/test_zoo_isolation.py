"""A bad zoo entry is isolated: one that fails its hashes, its load, its warm-up or holds non-finite weights
is marked unavailable with the reason (log, GET /v1/tasks, /readyz) and the rest is served; only a zoo with
nothing servable stops the start, in one line."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from cdd.adapters.architectures import build_adapter
from cdd.adapters.zoo import ADAPTER_FILE, MANIFEST, save_entry, sha256_file
from cdd.runtime.diffusion.factory import make_backbone, save_backbone
from cdd.runtime.serving.app import create_app
from cdd.runtime.serving.cli import main
from cdd.runtime.serving.settings import ServeSettings

RES = 16


def save(bb, zoo, name, task, nan=False):
    adapter = build_adapter("controlnet", bb.unet, bb.vae_scale_factor)
    if nan:
        with torch.no_grad():
            next(p for p in adapter.parameters() if p.requires_grad).view(-1)[0] = float("nan")
    save_entry(zoo / name, adapter, name=name, task=task, backbone_fingerprint=bb.fingerprint,
               condition={"channels": 3, "range": [0, 1], "resolution": RES}, steps=1)
    return zoo / name


def rehash(entry):
    m = json.loads((entry / MANIFEST).read_text())
    m["files"][ADAPTER_FILE] = sha256_file(entry / ADAPTER_FILE)
    (entry / MANIFEST).write_text(json.dumps(m))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("isolation")
    bb = make_backbone("latent", resolution=RES, seed=5)
    save_backbone(bb, root / "backbone")
    zoo = root / "zoo"
    save(bb, zoo, "depth", "depth")
    flipped = save(bb, zoo, "flipped", "edit")  # one flipped byte: its sha256 fails
    data = bytearray((flipped / ADAPTER_FILE).read_bytes())
    data[-1] ^= 1
    (flipped / ADAPTER_FILE).write_bytes(bytes(data))
    unloadable = save(bb, zoo, "unloadable", "colorize")  # hashes pass, the weights are not safetensors
    (unloadable / ADAPTER_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    rehash(unloadable)
    save(bb, zoo, "nan", "super-resolution", nan=True)  # a NaN weight: served, it would make garbage
    bad = root / "bad-zoo"
    save(bb, bad, "nan", "depth", nan=True)
    return {"root": root, "zoo": zoo, "bad": bad}


def png(w, h):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("warmup", [True, False])
def test_bad_entries_are_served_around_and_named(world, caplog, warmup):
    s = ServeSettings(backbone=world["root"] / "backbone", zoo=world["zoo"], max_batch=2, warmup=warmup)
    with caplog.at_level(logging.ERROR, logger="cdd.serve"), TestClient(create_app(s)) as client:
        assert client.app.state.engine.wait_ready(120)
        ok = client.post("/v1/tasks/depth", files={"image": ("a.png", png(16, 16), "image/png")}, data={"seed": "1"})
        assert ok.status_code == 200, ok.text
        for task in ("super-resolution", "colorize"):  # without warm-up, found at their first request
            r = client.post(f"/v1/tasks/{task}", files={"image": ("a.png", png(8, 8), "image/png")})
            assert r.status_code == 503 and r.json()["error"]["code"] == "adapter_unavailable", r.text
        tasks = client.get("/v1/tasks").json()
        ready = client.get("/readyz")
    assert {t["task"] for t in tasks["tasks"]} == {"depth"}
    reasons = {u["name"]: u["reason"] for u in tasks["unavailable"]}
    assert set(reasons) == {"flipped", "unloadable", "nan"}
    assert "tampered or corrupt" in reasons["flipped"]
    assert "cannot be loaded" in reasons["unloadable"]
    assert "non-finite" in reasons["nan"]
    assert str(world["root"]) not in json.dumps(tasks)  # no server paths
    assert ready.status_code == 200 and set(ready.json()["unavailable"]) == set(reasons)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert all(f"zoo entry {name} is not served" in logged for name in reasons)


def test_a_zoo_with_nothing_servable_stops_the_start_in_one_line(world, capsys):
    code = main(["--backbone", str(world["root"] / "backbone"), "--zoo", str(world["bad"]), "--port", "0"])
    err = capsys.readouterr().err
    assert code == 3, err
    plain = [line for line in err.strip().splitlines() if not line.startswith("{")]  # the rest: JSON log lines
    assert len(plain) == 1 and "no entry of" in plain[0] and "non-finite" in plain[0], err
    assert "Traceback" not in err
