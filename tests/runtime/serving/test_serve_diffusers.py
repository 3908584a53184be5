"""What the service answers equals the references: diffusers' StableDiffusionControlNetPipeline for an
exported ControlNet entry (sampler ddim), and the library's own sampler for a super-resolution tile."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
from fastapi.testclient import TestClient
from PIL import Image

from cdd.adapters.architectures import build_adapter
from cdd.adapters.export import export_entry
from cdd.adapters.zoo import load_entry, save_entry
from cdd.runtime.serving.app import create_app
from cdd.runtime.diffusion.backbone import load_backbone
from cdd.runtime.diffusion.denoiser import ConditionedDenoiser
from cdd.runtime.diffusion.factory import make_backbone, save_backbone
from cdd.runtime.diffusion.samplers import initial_noise, sample_prev
from cdd.runtime.serving.settings import ServeSettings

RES = 16
PROMPT = "a green cylinder on a striped floor at night"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("equiv")
    bb = make_backbone("latent", resolution=RES, seed=11)
    save_backbone(bb, root / "backbone")
    g = torch.Generator().manual_seed(0)
    for name, task in (("depth", "depth"), ("sr", "super-resolution")):
        adapter = build_adapter("controlnet", bb.unet, bb.vae_scale_factor)
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        save_entry(root / "zoo" / name, adapter, name=name, task=task, backbone_fingerprint=bb.fingerprint,
                   condition={"channels": 3, "range": [0, 1], "resolution": RES}, sampler="prev", steps=4)
    app = create_app(ServeSettings(backbone=root / "backbone", zoo=root / "zoo", max_batch=4, warmup=False))
    with TestClient(app) as client:
        yield root, client


def condition_png(w, h, seed=0):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return a, buf.getvalue()


def served_image(client, task, data, **form):
    r = client.post(f"/v1/tasks/{task}", files={"image": ("c.png", data, "image/png")},
                    data={k: str(v) for k, v in form.items()})
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)))


def test_served_controlnet_ddim_equals_the_diffusers_pipeline(served, tmp_path):
    root, client = served
    cond_u8, data = condition_png(RES, RES, seed=3)
    seed = 1234
    ours = served_image(client, "depth", data, prompt=PROMPT, seed=seed, steps=4, sampler="ddim")

    bb = load_backbone(root / "backbone")
    export_entry(load_entry(root / "zoo" / "depth", bb.unet, bb.fingerprint), tmp_path / "exported")
    pipe = StableDiffusionControlNetPipeline(
        vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, unet=bb.unet,
        controlnet=ControlNetModel.from_pretrained(tmp_path / "exported"),
        scheduler=DDIMScheduler.from_config(bb.scheduler_config, timestep_spacing="trailing"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    cond = torch.from_numpy(cond_u8).permute(2, 0, 1)[None].float() / 255
    ref = pipe(PROMPT, image=cond, num_inference_steps=4, guidance_scale=1.0,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    ref_u8 = (ref * 255).round().astype("uint8")  # diffusers' numpy_to_pil conversion

    assert ours.shape == ref_u8.shape == (RES, RES, 3)
    diff = np.abs(ours.astype(int) - ref_u8.astype(int))
    assert diff.max() <= 1, diff.max()  # batching pads to 4 rows: float32 kernels may differ in the last bit
    assert (diff == 0).mean() > 0.98
    # and a different seed is a different image
    other = served_image(client, "depth", data, prompt=PROMPT, seed=seed + 1, steps=4, sampler="ddim")
    assert np.abs(other.astype(int) - ours.astype(int)).max() > 1


def test_one_super_resolution_tile_is_the_plain_sample_of_the_upsampled_condition(served):
    root, client = served
    lr_u8, data = condition_png(RES // 4, RES // 4, seed=5)
    ours = served_image(client, "super-resolution", data, seed=42, sampler="prev", steps=2, prompt="")

    bb = load_backbone(root / "backbone")
    entry = load_entry(root / "zoo" / "sr", bb.unet, bb.fingerprint)
    lr = torch.from_numpy(lr_u8).permute(2, 0, 1)[None].float() / 255
    cond = F.interpolate(lr, size=(RES, RES), mode="bicubic", align_corners=False).clamp(0, 1)  # as training does
    model = ConditionedDenoiser(bb.unet, bb.schedule, entry.adapter).bind(cond, bb.encode_text([""]))
    z_0 = sample_prev(model, initial_noise([42], (4, RES // 2, RES // 2)), bb.schedule.trailing_timesteps(2), bb.schedule)
    with torch.no_grad():
        ref = ((bb.from_model_space(z_0) / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
