"""`fidelity` over HTTP: a super-resolution entry with a fidelity module serves y + w R(y, c) at the request's
weight (the manifest's default when it gives none), the same in both batching modes; a weight out of [0, 1] or
for an entry without the module is a 422 naming it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from PIL import Image

from cdd.adapters.architectures import build_adapter
from cdd.adapters.fidelity import FidelityNet
from cdd.adapters.zoo import add_fidelity, save_entry
from cdd.runtime.diffusion.factory import make_backbone, save_backbone
from cdd.runtime.serving.app import create_app
from cdd.runtime.serving.settings import ServeSettings

RES = 16


def randomised(module, std, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity-serve")
    bb = make_backbone("latent", resolution=RES, seed=5)
    save_backbone(bb, root / "backbone")
    zoo = root / "zoo"
    adapter = randomised(build_adapter("controlnet", bb.unet, bb.vae_scale_factor), 0.03, 1)
    cond = {"channels": 3, "range": [0, 1], "resolution": RES}
    save_entry(root / "plain", adapter, name="sr", task="super-resolution", backbone_fingerprint=bb.fingerprint,
               condition=cond, steps=2, sampler="prev")
    net = randomised(FidelityNet(width=8, blocks=1, head=4), 0.05, 2)
    add_fidelity(root / "plain", zoo / "sr", net, default=0.5, training={})
    save_entry(zoo / "sr-plain", adapter, name="sr-plain", task="super-resolution", backbone_fingerprint=bb.fingerprint,
               condition=cond, steps=2, sampler="prev")
    return {"backbone_dir": root / "backbone", "zoo": zoo, "net": net}


def png(w, h, seed=0):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue(), a


def post(c, data, headers=None, **form):
    return c.post("/v1/tasks/super-resolution", files={"image": ("in.png", data, "image/png")},
                  data={k: str(v) for k, v in form.items()}, headers=headers)


def pixels(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content))).astype(np.float32)


@pytest.mark.parametrize("mode", ["request", "step"])
def test_fidelity_weight_per_request(world, mode):
    app = create_app(ServeSettings(backbone=world["backbone_dir"], zoo=world["zoo"], warmup=False, max_wait_ms=5,
                                   batching=mode))
    data, a = png(RES // 4, RES // 4, seed=1)  # one tile: the output is the decoded row itself
    with TestClient(app) as c:
        assert app.state.engine.wait_ready(120)
        infos = {x["name"]: x for t in c.get("/v1/tasks").json()["tasks"] for x in t["adapters"]}
        assert infos["sr"]["fidelity"] == 0.5 and infos["sr-plain"].get("fidelity") is None
        off, half, full, default = (post(c, data, seed=3, adapter="sr", **f)
                                    for f in ({"fidelity": 0}, {"fidelity": 0.5}, {"fidelity": 1}, {}))
        assert default.headers["x-cdd-fidelity"] == "0.5" and full.headers["x-cdd-fidelity"] == "1"
        assert default.content == half.content
        # fidelity 0 is the entry without the module
        assert off.content == post(c, data, seed=3, adapter="sr-plain").content
        assert "x-cdd-fidelity" not in post(c, data, seed=3, adapter="sr-plain").headers
        # the full weight, by hand from the unrefined output (8-bit: a level or two of rounding)
        y = torch.from_numpy(pixels(off) / 255).permute(2, 0, 1)[None] * 2 - 1
        cond = F.interpolate(torch.from_numpy(a / 255.0).permute(2, 0, 1)[None].float(), size=(RES, RES),
                             mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1
        with torch.no_grad():
            want = ((world["net"](y.float(), cond, 1.0) * 0.5 + 0.5).clamp(0, 1) * 255)[0].permute(1, 2, 0).numpy()
        got = pixels(full)
        assert np.abs(got - pixels(off)).mean() > 1.0  # the module changes the picture
        assert np.abs(got - want).max() <= 3.0
        j = post(c, data, seed=3, adapter="sr", fidelity=0.25, headers={"accept": "application/json"}).json()
        assert j["fidelity"] == 0.25
        assert "outside [0, 1]" in post(c, data, adapter="sr", fidelity=1.5).json()["error"]["message"]
        r = post(c, data, adapter="sr-plain", fidelity=0.5)
        assert r.status_code == 422 and "has no fidelity module" in r.json()["error"]["message"]
        assert "fidelity" in str(c.get("/openapi.json").json()["components"])
    app2 = create_app(ServeSettings(backbone=world["backbone_dir"], zoo=world["zoo"], warmup=False, max_wait_ms=5,
                                    batching="request" if mode == "step" else "step"))
    with TestClient(app2) as c2:  # the other batching mode gives the same bytes
        assert app2.state.engine.wait_ready(120)
        assert post(c2, data, seed=3, adapter="sr", fidelity=1).content == full.content
