"""Decoding uploads: EXIF orientation, float images, truncated multi-frame files, the header check."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cdd.runtime.serving.imaging import ImageError, decode_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    a = np.zeros((8, 16, 3), np.uint8)
    a[:, :8] = 255  # left half white
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # stored rotated: display after a 90 degree clockwise turn
    x = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=100), 10_000)
    assert tuple(x.shape) == (3, 16, 8)
    assert x[:, :8].mean() > 0.9 and x[:, 8:].mean() < 0.1  # the white half is now on top
    plain = decode_image(encode(img, "JPEG", quality=100), 10_000)
    assert tuple(plain.shape) == (3, 8, 16)


def test_float_tiff_is_read_as_values_in_0_1():
    f = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    x = decode_image(encode(Image.fromarray(f), "TIFF"), 10_000)
    assert tuple(x.shape) == (3, 8, 8)
    np.testing.assert_allclose(x[0].numpy(), f, atol=1e-6)
    wild = np.array([[np.nan, -3.0], [0.25, 7.0]], np.float32)
    assert decode_image(encode(Image.fromarray(wild), "TIFF"), 10_000, channels=1)[0].tolist() == [[0.0, 0.0], [0.25, 1.0]]


def test_a_truncated_animated_gif_is_400_and_a_whole_one_gives_its_first_frame():
    a = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    frames = [Image.fromarray(a), Image.fromarray(255 - a)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    first = decode_image(encode(frames[0], "GIF"), 10_000)
    assert np.array_equal(decode_image(data, 10_000).numpy(), first.numpy())
    with pytest.raises(ImageError) as e:
        decode_image(data[:-20], 10_000)
    assert e.value.status == 400


def test_the_check_runs_on_the_header_before_decoding():
    data = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (2, 40, 3), dtype=np.uint8)), "PNG")
    seen = []

    def check(w, h):
        seen.append((w, h))
        raise ImageError(413, "too_much_work", "no")

    with pytest.raises(ImageError) as e:
        decode_image(data[:-20], 10_000, check=check)  # truncated: decoding it would be a 400
    assert e.value.status == 413 and seen == [(40, 2)]


def test_frames_are_counted_up_to_one_past_the_limit():
    pages = [Image.fromarray(np.full((2, 2, 3), i, np.uint8)) for i in range(70)]
    for fmt in ("TIFF", "GIF"):
        data = encode(pages[0], fmt, save_all=True, append_images=pages[1:])
        with pytest.raises(ImageError) as e:
            decode_image(data, 10_000)
        assert e.value.status == 400 and e.value.code == "too_many_frames"
        assert decode_image(encode(pages[0], fmt, save_all=True, append_images=pages[1:64]), 10_000).shape == (3, 2, 2)
