"""Image input and output for the service: decoding uploads safely, and PNG encoding.

An upload's header is read first (PIL's `Image.open` reads only the header) and its size is checked
against the pixel limit (and the caller's work limit) before a single pixel is decoded, so a
decompression bomb never allocates. Tasks that resize their input anyway take images up to a larger
decode-safety limit and downscale them. The EXIF orientation is applied (a phone photo comes out upright);
a float image (TIFF mode F) is read as values in [0, 1]; a file with several frames (animated GIF, WebP,
multi-page TIFF) gives its first frame, after its last frame has been read (a truncated file is 400).
"""

from __future__ import annotations

import io
import io
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

MAX_FRAMES = 64

# Raster formats only: PIL can also open formats whose decoders run external programs (EPS).
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


class ImageError(ValueError):
    """An upload that cannot be used; `status` is the HTTP status it maps to."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


def decode_image(data: bytes, max_pixels: int, channels: int = 3, max_decode_pixels: int | None = None,
                 check: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Bytes of an image file -> float32 [channels, H, W] in [0, 1].

    415: not an image in an accepted format; 413: more than `max_pixels` pixels (checked on the header,
    before decoding); 400: a corrupt or truncated file. `check(width, height)` (the stored size) runs on
    the header too and may raise ImageError. 8-bit images are divided by 255, 16-bit grayscale (a depth
    map) by 65535; float images are taken as they are (clamped to [0, 1]). With `max_decode_pixels` (for
    tasks that resize their input anyway) the limit is that instead, and an image larger than `max_pixels`
    is downscaled to fit in it (bicubic, antialiased, aspect ratio kept)."""
    limit = max(max_pixels, max_decode_pixels or 0)
    if not data:
        raise ImageError(400, "empty_image", "the uploaded image is empty")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's own ceiling (2 x Image.MAX_IMAGE_PIXELS)
        raise ImageError(413, "too_many_pixels", f"the image is too large: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(
            415, "unsupported_media_type", f"the upload is not an image in an accepted format ({', '.join(FORMATS)})"
        ) from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types on a bad header
        raise ImageError(400, "corrupt_image", f"the image header cannot be read: {type(e).__name__}: {e}") from e
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(400, "corrupt_image", f"the image has no pixels ({width}x{height})")
    if width * height > limit:
        raise ImageError(
            413, "too_many_pixels", f"the image is {width}x{height} = {width * height} pixels; the limit is {limit}"
        )
    if check is not None:
        check(width, height)
    try:
        frames = getattr(img, "n_frames", 1)
    except Exception as e:  # noqa: BLE001
        raise ImageError(400, "corrupt_image", f"the image header cannot be read: {type(e).__name__}: {e}") from e
    if frames > MAX_FRAMES:
        raise ImageError(400, "corrupt_image", f"the image has {frames} frames; at most {MAX_FRAMES} are read")
    try:
        if frames > 1:  # truncation shows in the last frame; the first is the one used
            img.seek(frames - 1)
            if img.size[0] * img.size[1] > limit:  # a multi-page TIFF's pages differ in size
                raise ImageError(413, "too_many_pixels", f"the image's last frame is {img.size[0]}x{img.size[1]} "
                                 f"pixels; the limit is {limit}")
            img.load()
            img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        x = _to_tensor(img, channels)
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated / corrupt data surfaces here
        raise ImageError(400, "corrupt_image", f"the image cannot be decoded: {type(e).__name__}: {e}") from e
    height, width = x.shape[-2:]  # after the EXIF transpose
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        size = (max(1, int(height * scale)), max(1, int(width * scale)))
        x = F.interpolate(x[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 1)
    return x


def _to_tensor(img: Image.Image, channels: int) -> torch.Tensor:
    if img.mode in ("I;16", "I;16L", "I;16B", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        arr = np.nan_to_num(arr if img.mode == "F" else arr / 65535.0, nan=0.0)
        x = torch.from_numpy(np.clip(arr, 0.0, 1.0))[None]
        return x.expand(channels, -1, -1).contiguous() if channels != 1 else x
    arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(np.ascontiguousarray(arr))
    return x[None] if channels == 1 else x.permute(2, 0, 1).contiguous()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] or [3, H, W] floats in [0, 1] -> uint8 HWC, as diffusers' image processor does
    (`(x * 255).round().astype("uint8")` on float32)."""
    x = images.detach().to("cpu", torch.float32).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8)
    return x.permute(*range(x.ndim - 3), -2, -1, -3).numpy()


def encode_png(image: np.ndarray) -> bytes:
    """uint8 HWC (or HW) -> PNG bytes; the same array always gives the same bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()
