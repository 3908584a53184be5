"""Super-resolution inputs larger than a tile: one job whose tiles are averaged in latent space every step
(tasks.LatentBlend), in both batching modes; the work measure in tile-steps and its admission."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cdd.adapters.architectures import build_adapter
from cdd.adapters.zoo import save_entry
from cdd.runtime.diffusion import samplers
from cdd.runtime.diffusion.factory import make_backbone, save_backbone
from cdd.runtime.serving.engine import Engine
from cdd.runtime.serving.imaging import ImageError, open_image
from cdd.runtime.serving.settings import ServeSettings
from cdd.runtime.serving.tasks import (SUPER_RESOLUTION, LatentBlend, admit, prepare, served_sr_tile, sr_layout, sr_tile,
                                      task_work)

RES = 16  # the tiny latent backbone: scale factor 2, a tile is 8 x 8 latents


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("sr_large")
    bb = make_backbone("latent", resolution=RES, seed=31)
    save_backbone(bb, root / "backbone")
    adapter = build_adapter("controlnet", bb.unet, bb.vae_scale_factor)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.03)
    save_entry(root / "zoo" / "sr", adapter, name="sr", task=SUPER_RESOLUTION, backbone_fingerprint=bb.fingerprint,
               condition={"channels": 3, "range": [0, 1], "resolution": RES}, steps=2, sampler="prev+ilvr")
    return root


@pytest.fixture(scope="module")
def engines(zoo):
    common = dict(backbone=zoo / "backbone", zoo=zoo / "zoo", max_batch=3, warmup=False)  # 4 tiles: two chunks
    made = {mode: Engine(ServeSettings(batching=mode, **common)).start() for mode in ("step", "request")}
    made["pixels"] = Engine(ServeSettings(batching="request", sr_blend="pixels", **common)).start()
    yield made
    for e in made.values():
        e.stop()


def hand_blend(x: torch.Tensor, layout, factor: int) -> torch.Tensor:
    """LatentBlend written out pixel by pixel: each canvas position's weighted mean over the tiles covering it."""
    w = layout.weights(factor)
    s = layout.tile // factor
    starts = [(t.y // factor, t.x // factor) for t in layout.tiles]
    out = torch.empty_like(x)
    for i, (y0, x0) in enumerate(starts):
        for a in range(s):
            for b in range(s):
                num, den = 0, 0
                for j, (y1, x1) in enumerate(starts):
                    u, v = y0 + a - y1, x0 + b - x1
                    if 0 <= u < s and 0 <= v < s:
                        num, den = num + w[u, v] * x[j, :, u, v], den + w[u, v]
                out[i, :, a, b] = num / den
    return out


def test_latent_blend_is_the_weighted_average_of_the_tiles_over_the_canvas():
    layout = sr_layout(6, 5, RES, 2, 0.25)  # 24 x 20 output: 2 x 2 tiles of 16 px, 8 px apart
    assert len(layout.tiles) == 4 and layout.latent_blend
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    blend = LatentBlend(layout, 2)
    got = blend(x)
    torch.testing.assert_close(got, hand_blend(x, layout, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blend(got), got, rtol=1e-5, atol=1e-6)  # tiles cut from one canvas pass unchanged
    assert (got - x).abs().max() > 0.1
    assert not sr_layout(4, 4, RES, 2, 0.25).latent_blend  # one tile: nothing to blend


def sr_work(engine, image, sampler="prev+ilvr", **kw):
    return prepare(SUPER_RESOLUTION, image, adapter="sr", resolution=RES, model_channels=4, scale_factor=2, steps=2,
                   sampler=sampler, seed=7, prompt="", overlap_fraction=engine.settings.sr_tile_overlap,
                   blend=engine.settings.sr_blend, **kw)


def test_an_input_of_one_tile_is_sampled_exactly_as_before(engines):
    """One tile: no blending, the same bytes as the independent tiles of the old way, in both modes."""
    image = torch.rand(3, RES // 4, RES // 4, generator=torch.Generator().manual_seed(1))
    old = engines["pixels"].run(sr_work(engines["pixels"], image), timeout=300).rows
    for mode in ("request", "step"):
        w = sr_work(engines[mode], image)
        assert w.rows == 1 and not w.layout.latent_blend
        assert torch.equal(engines[mode].run(w, timeout=300).rows, old), mode


@pytest.mark.parametrize("sampler", ["prev+ilvr", "ddim"])
def test_two_by_two_tiles_are_the_hand_blended_sampler_in_both_modes(engines, sampler):
    """A 2 x 2-tile input: each step's (x_hat, eps_hat), after ILVR, averaged over the canvas as `hand_blend` writes
    it out, then the sampler's step; the final latents decoded per tile (and ILVR's last update). Step-level and
    per-adapter batching (which runs blended requests step by step over chunks of max_batch rows) both give it."""
    engine = engines["step"]
    image = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(2))
    w = sr_work(engine, image, sampler)
    assert w.rows == 4 and w.layout.latent_blend
    bb = engine.backbone
    slot, _ = engine.pool.activate("sr")
    with torch.no_grad():
        model = slot.denoiser.bind(w.cond, bb.encode_text([""]).expand(4, -1, -1))
        low = samplers.LowPass(RES, RES, 4)
        if sampler.endswith("+ilvr"):
            model = samplers.ilvr(model, w.cond * 2 - 1, 4, to_pixels=bb.from_model_space, to_model=bb.to_model_space)

        def blended(z_t, t):
            x_hat, eps_hat = model(z_t, t)
            return hand_blend(x_hat, w.layout, 2), hand_blend(eps_hat, w.layout, 2)

        base = samplers.split_sampler(sampler)[0]
        z_0 = samplers.few_step_sampler(base)(blended, w.z_T, bb.schedule.trailing_timesteps(2), bb.schedule)
        x = bb.from_model_space(z_0)
        if sampler.endswith("+ilvr"):
            x = samplers.ilvr_output(x, low(w.cond * 2 - 1), low)
        want = (x * 0.5 + 0.5).clamp(0, 1)
    for mode in ("step", "request"):
        got = engines[mode].run(w, timeout=300).rows
        assert (got - want).abs().max() < 1e-4, mode
    assert (engines["pixels"].run(sr_work(engines["pixels"], image, sampler), timeout=300).rows - want).abs().max() > 1e-2


def test_two_by_two_tiles_have_no_seam(engines):
    """Seams are where neighbouring tiles disagree. Sampled the new way, the tiles are crops of one latent after every
    step (their final latents agree exactly over the overlap; independent tiles, the old way, do not). In the
    assembled image the step across the lines where a tile begins or ends is no larger than across the other lines.
    (The decoded tiles still differ over the overlap by the decoder's reach, which `assemble` blends smoothly: the
    tiny test autoencoder's attention sees a whole tile.)"""
    from cdd.runtime.serving.tasks import assemble

    image = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(4))
    final = {}
    for name in ("step", "pixels"):
        engine = engines[name]
        w = sr_work(engine, image)
        flight = engine.executor.board(None, engine.pool.get("sr"), z_T=w.z_T, cond=w.cond,
                                       text_emb=engine.backbone.encode_text([""]).expand(4, -1, -1), fresh=None,
                                       steps=w.steps, sampler=w.sampler, layout=w.layout)
        while not flight.done:
            engine.executor.evaluate(engine.pool, [flight])
        z = flight.z  # 2 x 2 tiles of 8 x 8 latents, 4 apart: tile 0's columns 4..7 are tile 1's 0..3
        final[name] = float((z[0, :, :, 4:] - z[1, :, :, :4]).abs().max() + (z[0, :, 4:] - z[2, :, :4]).abs().max())
    assert final["step"] < 1e-6 < 0.05 < final["pixels"]

    w = sr_work(engines["step"], image)
    out = torch.from_numpy(assemble(w, engines["step"].run(w, timeout=300).rows)).float().mean(-1)  # 24 x 24
    steps = torch.cat([(out[:, 1:] - out[:, :-1]).abs(), (out[1:] - out[:-1]).abs().T])  # [lines, 23]
    lines = [7, 8, 15, 16]  # the steps across x = 8 and x = 16 (where tiles begin or end), and the same for y
    crossing = steps[:, lines].mean()
    interior = steps[:, [i for i in range(23) if i not in lines]].mean()
    assert crossing < 1.25 * interior


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_the_default_budget_admits_a_128_pixel_input_at_4_steps_and_refuses_far_larger():
    """The served defaults (the embedded backbone's factors: VAE 4, size factor 16; 64 px adapters): a 128x128
    input is 25 tiles of 128 px, 4 tile-steps each per step, 400 at 4 steps; a 256x256 one is 413."""
    s = ServeSettings()
    tile = served_sr_tile(s.sr_tile, 64)
    assert tile == 128
    common = dict(width=None, height=None, steps=4, resolution=64, scale_factor=4, size_factor=16,
                  max_pixels=s.max_pixels, max_decode_pixels=s.max_decode_pixels, max_work=s.max_work,
                  overlap_fraction=s.sr_tile_overlap, tile=tile)
    assert admit(SUPER_RESOLUTION, open_image(png(128, 128)), **common).rows == 25  # 512 x 512 out
    assert task_work(SUPER_RESOLUTION, 128, 128, 4, 64, 4, s.sr_tile_overlap, tile, 16) == (25, 400)
    # the older 64 px tiles: 121 of them, 484 tile-steps, admitted too
    assert admit(SUPER_RESOLUTION, open_image(png(128, 128)), **{**common, "tile": None}).rows == 121
    with pytest.raises(ImageError) as e:
        admit(SUPER_RESOLUTION, open_image(png(256, 256)), **common)
    assert e.value.status == 413 and e.value.code == "too_much_work"
    message = str(e.value)
    assert f"max_work) is {s.max_work}" in message and "1936 tile-steps" in message  # 121 tiles x 4 x 4 steps
    assert "send steps=1 or fewer, or an input of at most 128x128 pixels at 4 step(s), or a smaller image" in message


def test_served_tiles_leave_an_input_of_one_adapter_tile_alone():
    """sr_tile: the adapter's resolution for an output that fits in one adapter tile (the plain sample, as before);
    the whole output as one row when it fits in one served tile; tiles of the served size beyond."""
    assert sr_tile(16, 16, 64, 128, 16) == 64 and sr_tile(16, 10, 64, 128, 16) == 64
    assert sr_tile(20, 20, 64, 128, 16) == 80 and sr_tile(24, 17, 64, 128, 16) == 96
    assert sr_tile(128, 128, 64, 128, 16) == 128 and sr_tile(128, 128, 64, None, 16) == 64
    with pytest.raises(ValueError, match="size factor 16"):
        sr_tile(128, 128, 64, 120, 16)
