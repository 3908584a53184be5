"""What each task does with an uploaded image, before and after sampling (CPU only, no model).

- super-resolution: the output is 4x the input. The low-resolution image is bicubic-upsampled x4
  exactly as training builds its condition (`F.interpolate(..., mode="bicubic", align_corners=False)`,
  clamped to [0, 1]), then cut into overlapping tiles (`sr_tile`: cdd-serve's are twice the adapter's resolution,
  `served_sr_tile`; an output that fits in one adapter-resolution tile is that one tile), all sampled as one job.
  The noise of every tile is a crop of one noise image drawn from the seed over the whole (padded)
  canvas, so overlapping tiles start from the same noise, and an input that is exactly one tile gets
  exactly the noise of a plain sample (and exactly a plain sample's image). With more than one tile, every
  denoising step averages the tiles' estimates where they overlap, in latent space (`LatentBlend`,
  MultiDiffusion), so the tiles stay one consistent latent and no seam can form; the decoded tiles are then
  blended with smooth weights in pixels (`assemble`: only the decoder's edge effects differ there).
  `blend="pixels"` keeps the older independent tiles (blended only in pixels) for comparison.
- depth, edit and any other task: the output is `width` x `height` (multiples of the backbone's size
  factor, as diffusers pipelines take them); by default the input's aspect ratio at the adapter's pixel
  count (a square input: the adapter's resolution). The condition is resized (bicubic, antialiased) to
  the output size when it is not already that size, and the response says so (X-CDD-Resized).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..diffusion.samplers import fresh_noise, initial_noise
from ..diffusion.schedule import strength_span

SUPER_RESOLUTION = "super-resolution"
EDIT = "edit"
SR_SCALE = 4
SERVED_TILE_SCALE = 2  # cdd-serve samples super-resolution in tiles of twice the adapter's resolution (docs/results.md)
LATENT, PIXELS = "latent", "pixels"  # how super-resolution tiles are blended: every step in latent space, or once


FROM_INPUT_TASKS = (SUPER_RESOLUTION, EDIT)  # tasks whose input is a picture of the output: a run can start from it


def starts_from_input(task: str) -> bool:
    """Whether a run of `task` can start from its input (`strength` < 1, diffusers' img2img): the input is a picture
    of the output (super-resolution's enlarged low-resolution image, the edit's source), not a depth map."""
    return task in FROM_INPUT_TASKS


def check_strength(task: str, strength: float | None, steps: int, num_train_timesteps: int | None = None) -> None:
    """ValueError naming what is wrong when a request's `strength` cannot be served: in (0, 1], < 1 only for
    a task whose input is a picture of the output, and (given the backbone's `num_train_timesteps`) at least `steps`
    training timesteps to cover."""
    if strength is None or strength == 1:
        return
    if not math.isfinite(strength) or not 0 < strength <= 1:
        raise ValueError(f"strength {strength:g} is outside (0, 1] (1: from noise)")
    if not starts_from_input(task):
        raise ValueError(f"task {task!r} cannot start from its input (only {', '.join(FROM_INPUT_TASKS)} can: their "
                         "input is a picture of the output); leave strength out")
    if num_train_timesteps is not None and steps > (span := strength_span(strength, num_train_timesteps)):
        raise ValueError(f"strength {strength:g} covers {span} timestep(s): at most {span} step(s), got {steps}")


def prompt_required(task: str) -> bool:
    """An edit's prompt is its instruction: there is no edit without one."""
    return task == EDIT


@dataclass(frozen=True)
class Tile:
    x: int
    y: int


@dataclass(frozen=True)
class TileLayout:
    """Tiles of size `tile` over a canvas of `canvas` (W, H) pixels; the output is cropped to `out` (W, H)."""

    tile: int
    overlap: int
    canvas: tuple[int, int]
    out: tuple[int, int]
    tiles: tuple[Tile, ...]
    blend: str = LATENT

    def weights(self, factor: int = 1) -> torch.Tensor:
        """[tile/factor, tile/factor] blending weights (factor: the latent's, for `LatentBlend`): a raised-cosine
        ramp over the overlap, strictly positive so that every canvas pixel has weight (at the canvas border a
        single tile covers it: weight / weight = 1)."""
        tile, overlap = self.tile // factor, self.overlap // factor
        i = torch.arange(tile, dtype=torch.float64)
        if overlap == 0:
            w = torch.ones(tile, dtype=torch.float64)
        else:
            d = torch.minimum(i, tile - 1 - i) + 0.5
            w = 0.5 - 0.5 * torch.cos(math.pi * torch.clamp(d / overlap, max=1.0))
        return (w[:, None] * w[None, :]).to(torch.float32)

    @property
    def latent_blend(self) -> bool:
        """Whether sampling averages the tiles every step (`LatentBlend`): blend "latent" and more than one tile."""
        return self.blend == LATENT and len(self.tiles) > 1


class LatentBlend:
    """MultiDiffusion's step (Bar-Tal et al., "MultiDiffusion: Fusing Diffusion Paths for Controlled Image
    Generation", eq. 5) for the tiles of one `TileLayout`: the canvas value that best agrees with every tile's
    estimate in the weighted least-squares sense, sum_i w_i F_i(x) / sum_i w_i, cropped back into the tiles.

    Applied to each step's (x_hat, eps_hat) of a request's tiles: every few-step sampler's next sample is linear
    in them with per-step scalars, and z_T, z_t and any fresh noise are crops of one canvas, so averaging the
    estimates is averaging the next samples and the tiles remain crops of one latent after every step."""

    def __init__(self, layout: TileLayout, factor: int, device=None):
        self.size = layout.tile // factor
        self.canvas = (layout.canvas[1] // factor, layout.canvas[0] // factor)  # (h, w)
        self.starts = [(t.y // factor, t.x // factor) for t in layout.tiles]
        w = layout.weights(factor)
        total = torch.zeros(self.canvas)
        for y, x in self.starts:
            total[y : y + self.size, x : x + self.size] += w
        # each tile's share of every canvas pixel it covers: w_i / sum_j w_j (the shares of a pixel sum to 1)
        self.shares = torch.stack([w / total[y : y + self.size, x : x + self.size] for y, x in self.starts])[:, None]
        self.shares = self.shares.to(device)

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        """[tiles, C, s, s] estimates -> the same tiles cut from their weighted average over the canvas."""
        s = self.size
        canvas = tiles.new_zeros((tiles.shape[1], *self.canvas))
        weighted = tiles * self.shares.to(tiles.dtype)
        for (y, x), part in zip(self.starts, weighted):
            canvas[:, y : y + s, x : x + s] += part
        return torch.stack([canvas[:, y : y + s, x : x + s] for y, x in self.starts])


def tile_starts(length: int, tile: int, overlap: int, align: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length), neighbours overlapping by at least
    about `overlap`, every start a multiple of `align` (length, tile and overlap are multiples of it)."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    starts = [(i * (length - tile) // (n - 1)) // align * align for i in range(n)]
    starts[-1] = length - tile
    return starts


def sr_layout(width: int, height: int, tile: int, align: int, overlap_fraction: float, blend: str = LATENT) -> TileLayout:
    if blend not in (LATENT, PIXELS):
        raise ValueError(f"unknown super-resolution blend {blend!r}; choose {LATENT} or {PIXELS}")
    if tile < align or tile % align:
        raise ValueError(f"a super-resolution tile of {tile} px is not a multiple of the backbone's factor {align}")
    out = (width * SR_SCALE, height * SR_SCALE)
    canvas = tuple(max(tile, math.ceil(v / align) * align) for v in out)
    overlap = 0
    if canvas[0] > tile or canvas[1] > tile:
        overlap = min(max(align, round(overlap_fraction * tile / align) * align), tile - align)
    xs = tile_starts(canvas[0], tile, overlap, align)
    ys = tile_starts(canvas[1], tile, overlap, align)
    return TileLayout(tile, overlap, canvas, out, tuple(Tile(x, y) for y in ys for x in xs), blend)


def served_sr_tile(setting: int | None, resolution: int) -> int:
    """The super-resolution tile side cdd-serve asks for: its `sr_tile` setting, else SERVED_TILE_SCALE x the adapter's
    resolution (measured in docs/results.md, "Large super-resolution inputs": 128 px tiles averaged in latent space
    invent fewer marks on flat regions than 64 px ones, as few as the whole latent in one row, at bounded shapes)."""
    return setting if setting is not None else SERVED_TILE_SCALE * resolution


def sr_tile(width: int, height: int, resolution: int, tile: int | None, size_factor: int) -> int:
    """The side of the tiles a `width` x `height` super-resolution input is sampled in: the adapter's `resolution`
    when the output fits in one such tile (so that input is sampled exactly as a plain sample), else `tile` (None:
    the adapter's resolution), but no larger than the output's longer side rounded up to the backbone's
    `size_factor` (an output that fits in one tile is one row, padded as little as the backbone allows)."""
    out = max(width, height) * SR_SCALE
    if out <= resolution or tile is None:
        return resolution
    if tile % size_factor:
        raise ValueError(f"a super-resolution tile of {tile} px is not a multiple of the backbone's size factor "
                         f"{size_factor}")
    return max(resolution, min(tile, math.ceil(out / size_factor) * size_factor))


def task_work(task: str, width: int, height: int, steps: int, resolution: int, align: int, overlap_fraction: float,
              tile: int | None = None, size_factor: int | None = None) -> tuple[int, int]:
    """(rows, work) of a `width` x `height` input: the rows (tiles, or one image) `prepare` makes of it and its
    compute in tile-steps, one tile-step being one denoising step of one row at the adapter's `resolution` (the
    backbone's cost grows with the pixels it computes: a row of `tile` px counts (tile / resolution)^2). Known
    from the image header, before anything is decoded or prepared."""
    if task != SUPER_RESOLUTION:
        return 1, steps
    tile = sr_tile(width, height, resolution, tile, size_factor or align)
    rows = len(sr_layout(width, height, tile, align, overlap_fraction).tiles)
    return rows, math.ceil(rows * tile * tile / (resolution * resolution)) * steps


@dataclass
class Work:
    """One request, ready for the engine: `rows` conditions and their starting noise."""

    task: str
    adapter: str
    steps: int
    sampler: str
    seed: int
    prompt: str
    resolution: int
    cond: torch.Tensor  # [rows, c, H, W] in [0, 1], CPU float32 (H = W = R for super-resolution tiles)
    z_T: torch.Tensor  # [rows, C, H/f, W/f], CPU float32
    fresh: list[torch.Tensor] | None = None  # cm: per step [rows, C, R/f, R/f]
    layout: TileLayout | None = None  # super-resolution
    resized: str | None = None  # "WxH->wxh" when the condition was resized
    guidance: float | None = None  # w for a controlnet-guided adapter; None: the entry's default
    fidelity: float | None = None  # super-resolution's fidelity weight; None: the entry's default
    strength: float = 1.0  # the share of the schedule the run covers: 1 from noise, < 1 from the input (img2img)
    info: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.cond.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of a row in pixels."""
        return int(self.cond.shape[-2]), int(self.cond.shape[-1])

    @property
    def key(self) -> tuple:
        """What must be equal for requests to share a batch (per-adapter batching)."""
        return (self.task, self.adapter, self.steps, self.sampler, self.strength, self.size)


def output_size(width: int, height: int, resolution: int, factor: int) -> tuple[int, int]:
    """The default (width, height) for an input of width x height: its aspect ratio at resolution^2 pixels,
    each side rounded to a multiple of `factor` (at least one factor). An input narrower than that allows
    (a 1x100000 strip) gets the short side one factor and the long side resolution^2 / factor: never more
    pixels than resolution^2."""
    aspect = width / height
    h = resolution / math.sqrt(aspect)
    w = resolution * math.sqrt(aspect)
    longest = max(factor, resolution * resolution // factor // factor * factor)
    w, h = max(factor, round(w / factor) * factor), max(factor, round(h / factor) * factor)
    return min(w, longest), min(h, longest)


def output_dims(in_width: int, in_height: int, width: int | None, height: int | None, resolution: int,
                factor: int) -> tuple[int, int]:
    """The output (width, height) of a task other than super-resolution for a `in_width` x `in_height` input:
    the request's width and height, one side given keeping the input's aspect ratio, or `output_size`.
    ValueError for a side that is not a positive multiple of `factor`."""
    if width is not None and height is None:  # one side given: the other keeps the input's aspect ratio
        height = max(factor, round(width * in_height / in_width / factor) * factor)
    elif height is not None and width is None:
        width = max(factor, round(height * in_width / in_height / factor) * factor)
    if width is None:
        width, height = output_size(in_width, in_height, resolution, factor)
    for name, v in (("width", width), ("height", height)):
        if v < factor or v % factor:
            raise ValueError(f"{name} {v} must be a positive multiple of {factor} for this backbone")
    return width, height


@dataclass(frozen=True)
class Admission:
    """What an admitted request will compute: known from the image header and the form, before decoding."""

    rows: int
    decode_pixels: int | None  # the decoded image is downscaled to at most this many pixels (None: kept)
    out: tuple[int, int] | None  # (width, height) of the output; None for super-resolution (4x its input)


def admit(task: str, upload, *, width: int | None, height: int | None, steps: int, resolution: int, scale_factor: int,
          size_factor: int, max_pixels: int, max_decode_pixels: int, max_work: int,
          overlap_fraction: float = 0.25, tile: int | None = None) -> Admission:
    """The one admission check of a task request, on the header of `upload` (imaging.Upload) and the form
    fields, before a pixel is decoded or anything allocated: the pixels decoded (every frame counted), the
    output size and the work (`task_work`: tile-steps). Raises imaging.ImageError with the HTTP status and code."""
    from .imaging import ImageError, check_pixels, fit

    if task == SUPER_RESOLUTION:
        if width is not None or height is not None:
            raise ImageError(422, "invalid_parameter", "super-resolution's output is 4x its input: it takes no width or height")
        check_pixels(upload, max_pixels)
        out, decode_pixels = None, None
    else:
        # tasks that resize their input accept any image up to the decode-safety limit, downscaled on decoding
        check_pixels(upload, max(max_pixels, max_decode_pixels))
        for name, v in (("width", width), ("height", height)):
            if v is not None and v > max_pixels:  # before the other side is derived from it
                raise ImageError(422, "invalid_parameter", f"{name} {v} is over the limit of {max_pixels} pixels")
        try:
            out = output_dims(*fit(upload.width, upload.height, max_pixels), width, height, resolution, size_factor)
        except ValueError as e:
            raise ImageError(422, "invalid_parameter", str(e)) from e
        if out[0] * out[1] > max_pixels:
            raise ImageError(422, "invalid_parameter", f"the output {out[0]}x{out[1]} is over the limit of "
                             f"{max_pixels} pixels")
        decode_pixels = max_pixels
    rows, work = task_work(task, upload.width, upload.height, steps, resolution, scale_factor, overlap_fraction, tile,
                           size_factor)
    if work > max_work:
        per_step = work // steps
        fits = [f"steps={max_work // per_step} or fewer"] if per_step <= max_work else []
        if task == SUPER_RESOLUTION:
            side = largest_sr_input(steps, max_work, resolution, scale_factor, overlap_fraction, tile, size_factor)
            if side:
                fits.append(f"an input of at most {side}x{side} pixels at {steps} step(s)")
        raise ImageError(
            413, "too_much_work",
            f"a {upload.width}x{upload.height} image is {rows} row(s) for {task}, "
            f"{per_step} tile-step(s) per step (one tile-step: one step of a {resolution} px tile) x {steps} step(s) = "
            f"{work} tile-steps; the limit per request (max_work) is {max_work}: send "
            + "".join(f"{f}, or " for f in fits)
            + "a smaller image, or raise the limit on the server (cdd-serve --max-work N, or CDD_MAX_WORK=N)",
        )
    return Admission(rows, decode_pixels, out)


def largest_sr_input(steps: int, max_work: int, resolution: int, align: int, overlap_fraction: float,
                     tile: int | None = None, size_factor: int | None = None) -> int:
    """The side of the largest square super-resolution input whose `task_work` at `steps` fits `max_work` (0: none)."""
    def fits(side: int) -> bool:
        return task_work(SUPER_RESOLUTION, side, side, steps, resolution, align, overlap_fraction, tile,
                         size_factor)[1] <= max_work

    lo, hi = 0, 1
    while fits(hi) and hi < 1 << 14:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # work grows with the side: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def prepare(
    task: str,
    image: torch.Tensor,
    *,
    adapter: str,
    resolution: int,
    model_channels: int,
    scale_factor: int,
    steps: int,
    sampler: str,
    seed: int,
    prompt: str,
    overlap_fraction: float = 0.25,
    width: int | None = None,
    height: int | None = None,
    size_factor: int | None = None,
    guidance: float | None = None,
    fidelity: float | None = None,
    tile: int | None = None,
    blend: str = LATENT,
    strength: float = 1.0,
) -> Work:
    """The condition rows and noise for `image` ([c, H, W] in [0, 1]) under `task`'s semantics. `width` and
    `height` (tasks other than super-resolution) must be multiples of `size_factor` (default: scale_factor).
    Super-resolution: tiles of `sr_tile(..., tile, size_factor)` px, blended `blend` (LATENT, PIXELS). `strength` < 1:
    the run starts from the condition (a task of `FROM_INPUT_TASKS`), noised with z_T (the executor does it)."""
    check_strength(task, strength, steps)
    common = dict(task=task, adapter=adapter, steps=steps, sampler=sampler, seed=seed, prompt=prompt, resolution=resolution,
                  guidance=guidance, fidelity=fidelity, strength=float(strength))
    c, in_height, in_width = image.shape
    if task == SUPER_RESOLUTION:
        if width is not None or height is not None:
            raise ValueError("super-resolution's output is 4x its input: it takes no width or height")
        tile = sr_tile(in_width, in_height, resolution, tile, size_factor or scale_factor)
        layout = sr_layout(in_width, in_height, tile, scale_factor, overlap_fraction, blend)
        (ow, oh), (cw, ch) = layout.out, layout.canvas
        up = F.interpolate(image[None], size=(oh, ow), mode="bicubic", align_corners=False).clamp(0, 1)
        up = F.pad(up, (0, cw - ow, 0, ch - oh), mode="replicate") if (cw, ch) != (ow, oh) else up
        shape = (model_channels, ch // scale_factor, cw // scale_factor)
        noise = initial_noise([seed], shape)
        fresh = fresh_noise(sampler, [seed], shape, steps)
        r, f = layout.tile, scale_factor
        crop = [(t.y, t.x) for t in layout.tiles]
        cond = torch.stack([up[0, :, y : y + r, x : x + r] for y, x in crop])
        z_T = torch.stack([noise[0, :, y // f : (y + r) // f, x // f : (x + r) // f] for y, x in crop])
        if fresh is not None:
            fresh = [torch.stack([xi[0, :, y // f : (y + r) // f, x // f : (x + r) // f] for y, x in crop]) for xi in fresh]
        return Work(**common, cond=cond.contiguous(), z_T=z_T.contiguous(), fresh=fresh, layout=layout)
    factor = size_factor or scale_factor
    out_w, out_h = output_dims(in_width, in_height, width, height, resolution, factor)
    resized = None
    if (in_height, in_width) != (out_h, out_w):
        image = F.interpolate(
            image[None], size=(out_h, out_w), mode="bicubic", align_corners=False, antialias=True
        )[0].clamp(0, 1)
        resized = f"{in_width}x{in_height}->{out_w}x{out_h}"
    shape = (model_channels, out_h // scale_factor, out_w // scale_factor)
    z_T = initial_noise([seed], shape)
    fresh = fresh_noise(sampler, [seed], shape, steps)
    return Work(**common, cond=image[None].contiguous(), z_T=z_T, fresh=fresh, resized=resized)


def check_guidance(name: str, range_: tuple[float, float, float] | None, guidance: float | None) -> None:
    """ValueError naming the entry and its range when a request's guidance weight w cannot be served:
    `range_` is the entry's Manifest.guidance, (default, w_min, w_max), or None for an entry that takes no w."""
    if guidance is None:
        return
    if range_ is None:
        raise ValueError(f"adapter {name!r} takes no guidance weight (only controlnet-guided entries do); "
                         "leave guidance out")
    if not math.isfinite(guidance) or not range_[1] <= guidance <= range_[2]:
        raise ValueError(f"guidance {guidance:g} is outside adapter {name!r}'s range [{range_[1]:g}, {range_[2]:g}] "
                         f"(default {range_[0]:g})")


def check_fidelity(name: str, fidelity: dict | None, w: float | None) -> None:
    """ValueError naming the entry when a request's fidelity weight cannot be served: `fidelity` is the entry's
    Manifest.fidelity (None for an entry without the module)."""
    if w is None:
        return
    if fidelity is None:
        raise ValueError(f"adapter {name!r} has no fidelity module (only super-resolution entries trained with "
                         "cdd-train-fidelity do); leave fidelity out")
    if not math.isfinite(w) or not 0 <= w <= 1:
        raise ValueError(f"fidelity {w:g} is outside [0, 1] (adapter {name!r}'s default {fidelity['default']:g})")


def blank_work(adapter: str, task: str, resolution: int, channels: int, model_channels: int, scale_factor: int,
               steps: int, sampler: str, strength: float = 1.0) -> Work:
    """One row of zeros and seed-0 noise (warm-up)."""
    shape = (model_channels, resolution // scale_factor, resolution // scale_factor)
    return Work(task=task, adapter=adapter, steps=steps, sampler=sampler, seed=0, prompt="", resolution=resolution,
                cond=torch.zeros(1, channels, resolution, resolution), z_T=initial_noise([0], shape),
                fresh=fresh_noise(sampler, [0], shape, steps), strength=strength)


def assemble(work: Work, rows: torch.Tensor) -> np.ndarray:
    """The sampled rows ([rows, 3, R, R] in [0, 1]) -> the response image, uint8 HWC."""
    from .imaging import to_uint8

    if work.layout is None:
        return to_uint8(rows[0])
    layout, r = work.layout, work.layout.tile
    (cw, ch), (ow, oh) = layout.canvas, layout.out
    w = layout.weights()
    acc = torch.zeros(3, ch, cw, dtype=torch.float32)
    total = torch.zeros(1, ch, cw, dtype=torch.float32)
    for tile, out in zip(layout.tiles, rows.to(torch.float32)):
        acc[:, tile.y : tile.y + r, tile.x : tile.x + r] += w * out
        total[:, tile.y : tile.y + r, tile.x : tile.x + r] += w
    return to_uint8((acc / total)[:, :oh, :ow])
