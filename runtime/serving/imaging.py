"""Image input and output for the service: decoding uploads safely, and PNG encoding.

An upload's header is read first (`open_image`: PIL's `Image.open` reads only the header; frames are
counted without decoding, up to one past the limit) and everything a request will cost is checked on it and
on the form (`tasks.admit`: the pixels, every frame of a file of several counted, the output size and the
work) before a single pixel is decoded, so a decompression bomb never allocates. Tasks that resize their
input anyway take images up to a larger decode-safety limit and downscale them. The EXIF orientation is
applied (a phone photo comes out upright); a float image (TIFF mode F) is read as values in [0, 1]; a file
with several frames (animated GIF, WebP, multi-page TIFF) gives its first frame, after its last frame has
been read (a truncated file is 400)."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

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


# The first bytes of each accepted format: a file that starts like one but that PIL cannot open has a
# corrupt header (400), not an unsupported format (415).
SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
EXIF_ORIENTATION = 0x0112
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass
class Upload:
    """An opened upload of which only the header has been read: the size it is served at (after the EXIF
    orientation) and how many frames decoding it reads (a file of several frames is read to its last frame,
    so a truncated one is refused)."""

    img: Image.Image
    width: int
    height: int
    frames: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def open_image(data: bytes, max_frames: int = MAX_FRAMES) -> Upload:
    """Read the header of an upload (no pixel is decoded). 415: not an image in an accepted format; 400: an
    empty file, a corrupt header, no pixels, or more than `max_frames` frames (counted up to one past the
    limit, so a file of a million frames costs no more than one of `max_frames`)."""
    if not data:
        raise ImageError(400, "empty_image", "the uploaded image is empty")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:  # PIL's own ceiling (2 x Image.MAX_IMAGE_PIXELS)
        raise ImageError(413, "too_many_pixels", f"the image is too large: {e}") from e
    except Image.UnidentifiedImageError as e:
        if data.startswith(SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise ImageError(400, "corrupt_image", "the image header cannot be read (an accepted format's "
                             "signature, but a header PIL refuses, e.g. a 0x0 size)") from e
        raise ImageError(
            415, "unsupported_media_type", f"the upload is not an image in an accepted format ({', '.join(FORMATS)})"
        ) from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types on a bad header
        raise ImageError(400, "corrupt_image", f"the image header cannot be read: {type(e).__name__}: {e}") from e
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(400, "corrupt_image", f"the image has no pixels ({width}x{height})")
    try:
        frames = _count_frames(img, max_frames)
        if frames > 1 and img.format == "TIFF":  # a multi-page TIFF's pages differ in size: the largest counts
            sizes = []
            for i in range(frames):
                img.seek(i)
                sizes.append(img.size)
            img.seek(0)
            width, height = max(sizes, key=lambda wh: wh[0] * wh[1])
        orientation = _orientation(img)
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ImageError(400, "corrupt_image", f"the image header cannot be read: {type(e).__name__}: {e}") from e
    if orientation in TRANSPOSED:
        width, height = height, width
    return Upload(img, width, height, frames)


def _orientation(img: Image.Image) -> int | None:
    """The EXIF orientation the header holds (`getexif` would decode a PNG to look for a late eXIf chunk)."""
    if img.format == "TIFF":
        return img.tag_v2.get(EXIF_ORIENTATION)
    if "exif" not in img.info:
        return None
    exif = Image.Exif()
    exif.load(img.info["exif"])
    return exif.get(EXIF_ORIENTATION)


def _count_frames(img: Image.Image, limit: int) -> int:
    """Frames of `img`, counted up to limit + 1 and refused above `limit`, without decoding any: GIF's
    `n_frames` walks the whole file, and seeking a GIF decodes every frame before the one sought."""
    if not getattr(img, "is_animated", False):
        return 1
    if img.format == "GIF":
        n = 1
        try:
            while n <= limit:
                img._seek(n, False)  # what GifImageFile.n_frames does, frame by frame, without decoding
                n += 1
        except EOFError:
            pass
        img.seek(0)
    elif img.format == "TIFF":  # `n_frames` walks every page directory: stop one past the limit
        n = 1
        try:
            while n <= limit:
                img.seek(n)  # reads the page's directory only
                n += 1
        except EOFError:
            pass
        img.seek(0)
    else:  # WebP keeps the count in its header
        n = img.n_frames
    if n > limit:
        raise ImageError(400, "too_many_frames", f"the image has more than {limit} frames; at most {limit} are read")
    return n


def decode(upload: Upload, channels: int = 3, max_pixels: int | None = None) -> torch.Tensor:
    """An admitted upload -> float32 [channels, H, W] in [0, 1]; over `max_pixels`, downscaled to fit
    (bicubic, antialiased, aspect ratio kept: `fit(width, height, max_pixels)`). 400: corrupt or truncated
    data. 8-bit images are divided by 255, 16-bit grayscale (a depth map) by 65535; float images are taken
    as they are (clamped to [0, 1])."""
    img = upload.img
    try:
        if upload.frames > 1:  # truncation shows in the last frame; the first is the one used
            img.seek(upload.frames - 1)
            img.load()
            img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        x = _to_tensor(img, channels)
    except Exception as e:  # noqa: BLE001 - truncated / corrupt data surfaces here
        raise ImageError(400, "corrupt_image", f"the image cannot be decoded: {type(e).__name__}: {e}") from e
    height, width = x.shape[-2:]
    if max_pixels is not None and width * height > max_pixels:
        w, h = fit(width, height, max_pixels)
        x = F.interpolate(x[None], size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 1)
    return x


def fit(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled down, aspect ratio kept, to at most `max_pixels` (each side at least 1)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def check_pixels(upload: Upload, limit: int) -> None:
    """413 when the upload, or the decoding of all its frames, is over `limit` pixels (from the header)."""
    if upload.pixels > limit:
        raise ImageError(413, "too_many_pixels", f"the image is {upload.width}x{upload.height} = {upload.pixels} "
                         f"pixels; the limit is {limit}")
    if upload.frames * upload.pixels > limit:
        raise ImageError(413, "too_many_pixels", f"the image has {upload.frames} frames of {upload.width}x"
                         f"{upload.height}, all decoded: {upload.frames * upload.pixels} pixels; the limit is {limit}")


def decode_image(data: bytes, max_pixels: int, channels: int = 3, max_decode_pixels: int | None = None,
                 check: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Bytes of an image file -> float32 [channels, H, W] in [0, 1] (`open_image`, the checks, `decode`).

    413: more than `max_pixels` pixels (frames x pixels, for a file of several frames), checked on the
    header before decoding. `check(width, height)` runs on the header too and may raise ImageError. With
    `max_decode_pixels` (for tasks that resize their input anyway) the limit is that instead, and an image
    larger than `max_pixels` is downscaled to fit in it."""
    upload = open_image(data)
    check_pixels(upload, max(max_pixels, max_decode_pixels or 0))
    if check is not None:
        check(upload.width, upload.height)
    return decode(upload, channels, max_pixels)


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
