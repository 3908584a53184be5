"""Task semantics without a model: super-resolution tiling, blending and noise; resizing; image decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cdd.runtime.serving.imaging import ImageError, decode_image, encode_png, to_uint8
from cdd.runtime.diffusion.samplers import initial_noise, step_noise
from cdd.runtime.serving.tasks import assemble, prepare, sr_layout, tile_starts


@pytest.mark.parametrize("length, tile, overlap, align", [(64, 16, 4, 2), (100, 16, 4, 4), (17 * 8, 64, 16, 8), (48, 16, 8, 8)])
def test_tiles_cover_the_canvas_aligned_and_overlapping(length, tile, overlap, align):
    starts = tile_starts(length, tile, overlap, align)
    assert starts[0] == 0 and starts[-1] == length - tile
    assert all(s % align == 0 for s in starts)
    assert all(0 < b - a <= tile - overlap + align for a, b in zip(starts, starts[1:]))  # overlapping, no gaps


def test_one_tile_when_the_output_is_the_adapter_resolution():
    layout = sr_layout(16, 16, tile=64, align=8, overlap_fraction=0.25)
    assert layout.tiles == (layout.tiles[0],) and layout.canvas == layout.out == (64, 64) and layout.overlap == 0
    small = sr_layout(5, 3, tile=64, align=8, overlap_fraction=0.25)  # smaller than a tile: padded canvas
    assert small.out == (20, 12) and small.canvas == (64, 64) and len(small.tiles) == 1


def test_blending_reproduces_an_image_whose_tiles_agree():
    """If every tile's output is the crop of one image, the smooth blend gives that image back."""
    image = torch.rand(3, 3 * 4 * 4, 3 * 4 * 7, generator=torch.Generator().manual_seed(0))
    work = prepare("super-resolution", torch.rand(3, 12, 21), adapter="x", resolution=16, model_channels=4,
                   scale_factor=2, steps=1, sampler="prev", seed=0, prompt="")
    layout = work.layout
    assert layout.out == (84, 48) and len(layout.tiles) == work.rows > 1
    canvas = F.pad(image[None], (0, layout.canvas[0] - 84, 0, layout.canvas[1] - 48))[0]
    rows = torch.stack([canvas[:, t.y : t.y + 16, t.x : t.x + 16] for t in layout.tiles])
    np.testing.assert_array_equal(assemble(work, rows), to_uint8(image))
    w = layout.weights()
    assert w.min() > 0 and w.max() == 1 and torch.equal(w, w.T)


def test_sr_condition_and_noise_are_crops_of_one_upsampled_image_and_one_noise_image():
    lr = torch.rand(3, 7, 5, generator=torch.Generator().manual_seed(1))
    work = prepare("super-resolution", lr, adapter="x", resolution=16, model_channels=4, scale_factor=2,
                   steps=3, sampler="cm", seed=9, prompt="")
    up = F.interpolate(lr[None], size=(28, 20), mode="bicubic", align_corners=False).clamp(0, 1)[0]
    cw, ch = work.layout.canvas
    noise = initial_noise([9], (4, ch // 2, cw // 2))[0]
    fresh = step_noise([9], (4, ch // 2, cw // 2), 3)
    for i, t in enumerate(work.layout.tiles):
        h, w = min(16, 28 - t.y), min(16, 20 - t.x)
        assert torch.equal(work.cond[i, :, :h, :w], up[:, t.y : t.y + h, t.x : t.x + w])
        assert torch.equal(work.z_T[i], noise[:, t.y // 2 : t.y // 2 + 8, t.x // 2 : t.x // 2 + 8])
        assert torch.equal(work.fresh[2][i], fresh[2][0, :, t.y // 2 : t.y // 2 + 8, t.x // 2 : t.x // 2 + 8])


def test_a_single_tile_gets_the_noise_of_a_plain_sample():
    work = prepare("super-resolution", torch.rand(3, 4, 4), adapter="x", resolution=16, model_channels=4,
                   scale_factor=2, steps=2, sampler="prev", seed=5, prompt="")
    assert work.rows == 1 and torch.equal(work.z_T, initial_noise([5], (4, 8, 8)))


def test_resize_tasks_resize_and_report_it():
    """By default the output keeps the input's aspect ratio at the adapter's pixel count (16 x 16 = 256 here:
    30x10 -> 28x10, sides multiples of the size factor); a square input gets the adapter's resolution."""
    work = prepare("depth", torch.rand(3, 10, 30), adapter="x", resolution=16, model_channels=4, scale_factor=2,
                   steps=2, sampler="prev", seed=0, prompt="")
    assert work.cond.shape == (1, 3, 10, 28) and work.resized == "30x10->28x10" and work.layout is None
    assert work.z_T.shape == (1, 4, 5, 14) and torch.equal(work.z_T, initial_noise([0], (4, 5, 14)))
    same = prepare("edit", torch.rand(3, 16, 16), adapter="x", resolution=16, model_channels=4, scale_factor=2,
                   steps=2, sampler="prev", seed=0, prompt="make it red")
    assert same.resized is None and same.key == ("edit", "x", 2, "prev", 1.0, (16, 16))


@pytest.mark.parametrize("width, height, expected", [
    (32, 8, (8, 32)), (24, None, (8, 24)), (None, 8, (8, 24)), (None, None, (8, 24)),
])
def test_width_and_height_for_resize_tasks(width, height, expected):
    """width/height as diffusers pipelines take them; one side alone keeps the input's aspect ratio."""
    image = torch.rand(3, 20, 60)  # aspect 3: at 16 x 16 pixels the default is 27.7 x 9.2 -> 24 x 8 (factor 8)
    work = prepare("depth", image, adapter="x", resolution=16, model_channels=4, scale_factor=2, steps=1,
                   sampler="cm", seed=0, prompt="", width=width, height=height, size_factor=8)
    h, w = expected
    assert work.size == expected and work.z_T.shape == (1, 4, h // 2, w // 2) and work.fresh[0].shape == work.z_T.shape
    assert work.resized == f"60x20->{w}x{h}"


def test_width_and_height_must_fit_the_backbone():
    common = dict(adapter="x", resolution=16, model_channels=4, scale_factor=2, steps=1, sampler="prev", seed=0,
                  prompt="", size_factor=8)
    with pytest.raises(ValueError, match="width 20 must be a positive multiple of 8"):
        prepare("depth", torch.rand(3, 16, 16), width=20, height=16, **common)
    with pytest.raises(ValueError, match="no width or height"):
        prepare("super-resolution", torch.rand(3, 4, 4), width=16, **common)


def _encode(array, mode=None, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format=fmt)
    return buf.getvalue()


def test_decode_image_modes_and_limits():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = decode_image(_encode(rgb), max_pixels=35)
    assert x.shape == (3, 5, 7) and torch.equal((x * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(rgb))
    depth16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    d = decode_image(_encode(depth16), max_pixels=100)
    assert d.shape == (3, 3, 4) and torch.allclose(d[0], torch.from_numpy(depth16 / 65535.0).float())
    gray = decode_image(_encode(rgb[..., 0]), max_pixels=100, channels=1)
    assert gray.shape == (1, 5, 7)
    with pytest.raises(ImageError) as e:
        decode_image(_encode(rgb), max_pixels=34)
    assert e.value.status == 413
    assert decode_image(_encode(rgb, fmt="JPEG"), max_pixels=35).shape == (3, 5, 7)


def test_tasks_that_resize_take_large_images_downscaled_up_to_the_decode_limit():
    """An ordinary photo over max_pixels is accepted (and downscaled, aspect kept) by a task that resizes
    anyway; the decode-safety limit still refuses with 413 before decoding."""
    rgb = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    with pytest.raises(ImageError) as e:
        decode_image(_encode(rgb), max_pixels=64 * 64)
    assert e.value.status == 413
    x = decode_image(_encode(rgb), max_pixels=64 * 64, max_decode_pixels=400 * 300)
    assert x.shape == (3, 55, 73) and x.shape[1] * x.shape[2] <= 64 * 64 and 0 <= x.min() and x.max() <= 1
    ref = F.interpolate(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255, size=(55, 73), mode="bicubic",
                        antialias=True)[0]
    assert (x - ref.clamp(0, 1)).abs().max() < 1e-5
    with pytest.raises(ImageError) as e:
        decode_image(_encode(rgb), max_pixels=64 * 64, max_decode_pixels=400 * 300 - 1)
    assert e.value.status == 413


def test_png_encoding_is_deterministic():
    a = to_uint8(torch.rand(3, 9, 11, generator=torch.Generator().manual_seed(0)))
    assert a.shape == (9, 11, 3) and encode_png(a) == encode_png(a.copy())
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(a)))), a)


def test_a_decompression_bomb_is_refused_without_decoding(monkeypatch):
    """The pixel limit is checked on the header: the decoder never runs, so nothing is allocated."""
    from PIL import ImageFile

    big = Image.new("L", (3000, 3000))
    buf = io.BytesIO()
    big.save(buf, format="PNG")  # 9 Mpx of zeros: a few KB
    assert len(buf.getvalue()) < 50_000
    calls = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append(self))
    with pytest.raises(ImageError) as e:
        decode_image(buf.getvalue(), max_pixels=256 * 256)
    assert e.value.status == 413 and "3000x3000" in str(e.value) and calls == []
