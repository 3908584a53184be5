"""Real-ESRGAN's second-order degradation model (Wang et al. 2021), for super-resolution
pairs: high resolution H x W -> low resolution H/4 x W/4.

basicsr (which holds the published implementation) does not import with current
torchvision (it imports the removed `torchvision.transforms.functional_tensor`), so the
published pipeline — `basicsr/data/degradations.py`, `realesrgan/data/realesrgan_dataset.py`
and `RealESRGANModel.feed_data` — is re-implemented here in torch, with Pillow for JPEG.
The settings are those of `options/train_realesrnet_x4plus.yml` except two choices for
64-pixel images, both in `DegradationConfig`:

- kernel sizes are odd 7..13 instead of 7..21. Blur sigmas stay in high-resolution
  pixels (so the blur relative to the low-resolution grid is the published one), but a
  21-tap kernel is a third of a 64-pixel image and its reflect padding would not fit
  the 9-pixel image a 0.15 down-scale leaves. A sigma-3 Gaussian is truncated at two
  sigmas by a 13-tap kernel, much as the published 7-tap kernels truncate it.
- each image draws its own resize scale and mode (the published code draws one per
  batch); this makes `degrade` of a batch equal `degrade` of each image in turn.

The published model also sharpens the ground truth (`gt_usm`) before degrading it; that
is left out: the targets here are clean renders and the pairs are (clean, degraded).

Presets (`DEGRADATION_PRESETS`, `degradation_preset(name)`):

- `realesrgan`: the published settings above, `DegradationConfig()`. At 64 -> 16 px they are
  severe: a 0.15 first-stage down-scale leaves a 9-pixel image, a 0.3 second-stage one a
  5-pixel image, and sigma-30 noise on a 16-pixel image buries 3-5 pixel objects. An adapter
  trained on them learns that its input is often useless, and ignores it.
- `mild-64px`: every range scaled to a 64-pixel image so that the 16-pixel result still shows
  what the scene holds (`mild_64px` says why each number).
- `bicubic`: no blur, noise or JPEG: the image scaled down x4 with an antialiased bicubic filter (PIL's
  and most tools' "resize") and rounded to 8 bits: what a user's photograph that was only made smaller is.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


@dataclass(frozen=True)
class DegradationConfig:
    scale: int = 4
    kernel_range: tuple[int, ...] = (7, 9, 11, 13)  # published: 7..21, see module docstring
    # first degradation
    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    # second degradation
    second_blur_prob: float = 0.8
    kernel_list2: tuple[str, ...] = KERNEL_TYPES
    kernel_prob2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)
    second_stage_prob: float = 1.0  # of applying stage 2 (blur, resize, noise) at all; published: always
    # final sinc filter
    final_sinc_prob: float = 0.8
    # True: none of the above, only an antialiased bicubic down-scale (the `bicubic` preset); draws nothing
    plain: bool = False

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):  # accept lists (e.g. from JSON), store tuples
                object.__setattr__(self, f.name, v := tuple(v))
            if f.name.endswith("_prob") or f.name[:-1].endswith("_prob"):
                probs = v if isinstance(v, tuple) else (v,)
                if any(not 0 <= p <= 1 for p in probs):
                    raise ValueError(f"DegradationConfig.{f.name} must lie in [0, 1], got {v}")
            elif f.name.endswith(("_range", "_range2", "_sigma", "_sigma2")) and f.name != "kernel_range":
                if len(v) != 2 or v[0] > v[1]:
                    raise ValueError(f"DegradationConfig.{f.name} must be (low, high), got {v}")
        for name in ("kernel_prob", "kernel_prob2", "resize_prob", "resize_prob2"):
            if abs(sum(getattr(self, name)) - 1) > 1e-6:
                raise ValueError(f"DegradationConfig.{name} must sum to 1, got {getattr(self, name)}")
        for kinds, probs in (("kernel_list", "kernel_prob"), ("kernel_list2", "kernel_prob2")):
            if len(getattr(self, kinds)) != len(getattr(self, probs)):
                raise ValueError(f"DegradationConfig.{kinds} and {probs} differ in length")
            unknown = set(getattr(self, kinds)) - set(KERNEL_TYPES)
            if unknown:
                raise ValueError(f"DegradationConfig.{kinds}: unknown kernels {sorted(unknown)}")
        if not self.kernel_range or any(k < 3 or k % 2 == 0 for k in self.kernel_range):
            raise ValueError(f"DegradationConfig.kernel_range must be odd sizes >= 3, got {self.kernel_range}")
        if self.scale < 1:
            raise ValueError(f"DegradationConfig.scale must be >= 1, got {self.scale}")


def mild_64px() -> DegradationConfig:
    """The Real-ESRGAN pipeline with every range scaled to a 64-pixel image, so that the
    16-pixel result still shows the scene's objects, colours and floor (an input worth
    following). Kernel shapes, their probabilities, the sinc chances and the order of
    operations stay published: the variety of degradations is kept, only their strength
    shrinks. Blur sigmas are in pixels of the image the blur is applied to.
    """
    return DegradationConfig(
        # Sigma at most 1.5 HR px, so a 7-tap kernel reaches 2 sigma (as the 13-tap kernels
        # of `realesrgan` do for its sigma 3); 5 taps for the smaller sigmas.
        kernel_range=(5, 7),
        # 1.5 HR px is ~0.4 LR px: on top of the x4 down-scale's own averaging it softens
        # edges without merging a 3-5 LR-pixel object into the floor (published: up to 3
        # HR px, three quarters of an LR pixel).
        blur_sigma=(0.2, 1.5),
        # Never below half size (32 px, still twice the LR grid), at most 1.2x; published
        # 0.15 leaves 9 px, fewer pixels than the 16-pixel result. "down" less often and
        # "keep" more often than published (0.7 / 0.1).
        resize_prob=(0.2, 0.5, 0.3),
        resize_range=(0.5, 1.2),
        # Gaussian sigma up to 10/255 (published 30/255). Stage-1 noise is added at 32..77 px
        # and averaged by the down-scale to 16 px, so it reaches the LR image weaker still.
        # Poisson noise at scale 1 has a standard deviation of about 11/255 at mid-grey
        # (256 photon levels), so its scale stops at 0.8 (published 3).
        noise_range=(1.0, 10.0),
        poisson_scale_range=(0.05, 0.8),
        # JPEG 60..95 (published 30..95): quality 30 on noise turns the 16x16-pixel chroma
        # blocks (a quarter of a 64-pixel side) into colour blobs.
        jpeg_range=(60.0, 95.0),
        # Stage 2 (blur, resize, noise) on 40% of the images instead of all: a second order
        # of degradation stays in the mix, but most inputs are one degradation deep.
        second_stage_prob=0.4,
        second_blur_prob=0.5,
        # Applied at the stage-1 size (32..77 px): at most 1 px of sigma.
        blur_sigma2=(0.2, 1.0),
        # Around the LR size: 0.75 of 16 px is 12 px (published 0.3: 5 px, a blob).
        resize_range2=(0.75, 1.25),
        # Stage-2 noise lands on the ~16-pixel image itself, with no down-scale to average
        # it: sigma at most 6/255, Poisson at most 0.5.
        noise_range2=(1.0, 6.0),
        poisson_scale_range2=(0.05, 0.5),
        # The last JPEG compresses the 16-pixel image, where one 8x8 block is half a side.
        jpeg_range2=(70.0, 95.0),
        # The final sinc's cut-off goes down to pi/3, a third of the 16-pixel grid's Nyquist
        # frequency: a strong blur at this size. One image in five (published 0.8).
        final_sinc_prob=0.2,
    )


def plain_bicubic() -> DegradationConfig:
    """Only the x4 antialiased bicubic down-scale, rounded to 8 bits (`plain`): the other fields are unused."""
    return DegradationConfig(plain=True)


DEGRADATION_PRESETS = {"realesrgan": DegradationConfig, "mild-64px": mild_64px, "bicubic": plain_bicubic}
DEFAULT_TRAINING_PRESET = "mild-64px"  # what cdd-train-adapter uses for super-resolution unless told


def degradation_preset(name: str) -> DegradationConfig:
    """The named preset's settings (`realesrgan`: published; `mild-64px`: sized for 64 px)."""
    if name not in DEGRADATION_PRESETS:
        raise ValueError(f"unknown degradation preset {name!r}; choose one of {', '.join(DEGRADATION_PRESETS)}")
    return DEGRADATION_PRESETS[name]()


# ---------------------------------------------------------------------------------------
# Random draws, all from one torch.Generator


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g, dtype=torch.float64).item()


def _choice(g: torch.Generator, items, probs=None):
    if probs is None:
        return items[int(torch.randint(len(items), (), generator=g))]
    i = int(torch.multinomial(torch.tensor(probs, dtype=torch.float64), 1, generator=g))
    return items[i]


# ---------------------------------------------------------------------------------------
# Blur kernels (basicsr/data/degradations.py)


def _mesh(size: int) -> torch.Tensor:
    ax = torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return torch.stack([xx, yy], dim=-1)  # [k, k, 2], (x, y) per tap


def _quadratic_form(size: int, sig_x: float, sig_y: float, theta: float) -> torch.Tensor:
    """x^T Sigma^-1 x over the tap grid, Sigma = R diag(sig_x^2, sig_y^2) R^T."""
    c, s = math.cos(theta), math.sin(theta)
    u = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    sigma = u @ torch.diag(torch.tensor([sig_x**2, sig_y**2], dtype=torch.float64)) @ u.T
    grid = _mesh(size)
    return ((grid @ torch.linalg.inv(sigma)) * grid).sum(-1)


def gaussian_kernel(size: int, sig_x: float, sig_y: float, theta: float) -> torch.Tensor:
    """Bivariate Gaussian (isotropic when sig_x == sig_y), normalised to sum 1."""
    k = torch.exp(-0.5 * _quadratic_form(size, sig_x, sig_y, theta))
    return k / k.sum()


def generalized_gaussian_kernel(size: int, sig_x: float, sig_y: float, theta: float, beta: float) -> torch.Tensor:
    """exp(-0.5 (x^T Sigma^-1 x)^beta), normalised."""
    k = torch.exp(-0.5 * _quadratic_form(size, sig_x, sig_y, theta) ** beta)
    return k / k.sum()


def plateau_kernel(size: int, sig_x: float, sig_y: float, theta: float, beta: float) -> torch.Tensor:
    """1 / ((x^T Sigma^-1 x)^beta + 1), normalised."""
    k = 1.0 / (_quadratic_form(size, sig_x, sig_y, theta) ** beta + 1)
    return k / k.sum()


def sinc_kernel(cutoff: float, size: int, pad_to: int = 0) -> torch.Tensor:
    """Circular low-pass (2-D sinc) kernel with cutoff frequency `cutoff` (rad/pixel)."""
    r = _mesh(size).norm(dim=-1)
    safe = torch.where(r == 0, torch.ones_like(r), r)
    k = cutoff * torch.special.bessel_j1(cutoff * safe) / (2 * math.pi * safe)
    k = torch.where(r == 0, torch.full_like(r, cutoff**2 / (4 * math.pi)), k)
    k = k / k.sum()
    if pad_to > size:
        p = (pad_to - size) // 2
        k = F.pad(k, (p, p, p, p))
    return k


def _random_beta(g: torch.Generator, beta_range: tuple[float, float]) -> float:
    # Published: half the draws below 1 (heavier tails), half above (flatter tops).
    if _uniform(g, 0, 1) < 0.5:
        return _uniform(g, beta_range[0], 1)
    return _uniform(g, 1, beta_range[1])


def random_kernel(kind: str, size: int, g: torch.Generator, sigma_range: tuple[float, float],
                  betag_range: tuple[float, float], betap_range: tuple[float, float]) -> torch.Tensor:
    """One random kernel of a named type (`random_mixed_kernels`, noise_range=None)."""
    if kind not in KERNEL_TYPES:
        raise ValueError(f"unknown kernel type {kind!r}, expected one of {KERNEL_TYPES}")
    sig_x = _uniform(g, *sigma_range)
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sig_y, theta = sig_x, 0.0
    else:
        sig_y, theta = _uniform(g, *sigma_range), _uniform(g, -math.pi, math.pi)
    if kind.startswith("generalized"):
        return generalized_gaussian_kernel(size, sig_x, sig_y, theta, _random_beta(g, betag_range))
    if kind.startswith("plateau"):
        return plateau_kernel(size, sig_x, sig_y, theta, _random_beta(g, betap_range))
    return gaussian_kernel(size, sig_x, sig_y, theta)


def _stage_kernel(g, cfg: DegradationConfig, sinc_prob, kinds, probs, sigma, betag, betap) -> torch.Tensor:
    """A first- or second-stage kernel, as realesrgan_dataset.py draws it."""
    size = _choice(g, cfg.kernel_range)
    if _uniform(g, 0, 1) < sinc_prob:
        # The published cut-off range widens for large kernels (sizes 13..21 there).
        low = math.pi / 3 if size < 13 else math.pi / 5
        return sinc_kernel(_uniform(g, low, math.pi), size)
    return random_kernel(_choice(g, kinds, probs), size, g, sigma, betag, betap)


def _final_sinc(g, cfg: DegradationConfig) -> torch.Tensor | None:
    if _uniform(g, 0, 1) < cfg.final_sinc_prob:
        return sinc_kernel(_uniform(g, math.pi / 3, math.pi), _choice(g, cfg.kernel_range))
    return None  # the published "pulse" kernel: identity


# ---------------------------------------------------------------------------------------
# Operations on one image [1, 3, h, w]


def filter2d(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate each channel with `kernel` (odd size), reflect padding as published;
    replicate padding when the image is too small to reflect (tiny intermediates)."""
    k = kernel.shape[-1]
    p = k // 2
    mode = "reflect" if p < min(img.shape[-2:]) else "replicate"
    x = F.pad(img, (p, p, p, p), mode=mode)
    w = kernel.to(img.dtype).expand(img.shape[1], 1, k, k)
    return F.conv2d(x, w, groups=img.shape[1])


def _resize(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    size = (max(int(size[0]), 1), max(int(size[1]), 1))
    if mode == "area":
        return F.interpolate(img, size=size, mode="area")
    return F.interpolate(img, size=size, mode=mode, align_corners=False)


def _random_resize(g, img, probs, scale_range, base_hw=None):
    """Stage 1 scales the current image; stage 2 scales the target LR size `base_hw`."""
    updown = _choice(g, ("up", "down", "keep"), probs)
    if updown == "up":
        s = _uniform(g, 1, scale_range[1])
    elif updown == "down":
        s = _uniform(g, scale_range[0], 1)
    else:
        s = 1.0
    mode = _choice(g, ("area", "bilinear", "bicubic"))
    h, w = base_hw if base_hw is not None else img.shape[-2:]
    # int() truncation as published (F.interpolate(scale_factor) floors too).
    return _resize(img, (int(h * s), int(w * s)), mode)


def _gray(img: torch.Tensor) -> torch.Tensor:
    r, gch, b = img[:, 0:1], img[:, 1:2], img[:, 2:3]
    return 0.299 * r + 0.587 * gch + 0.114 * b


def _gaussian_noise(g, img, sigma_range, gray_prob):
    sigma = _uniform(g, *sigma_range) / 255.0
    if _uniform(g, 0, 1) < gray_prob:
        noise = torch.randn(img.shape[0], 1, *img.shape[-2:], generator=g).expand_as(img)
    else:
        noise = torch.randn(img.shape, generator=g)
    return (img + sigma * noise).clamp(0, 1)


def _poisson(g, img):
    """Poisson noise with as many photon levels as the image has distinct values."""
    img = (img * 255).round().clamp(0, 255) / 255
    vals = 2 ** math.ceil(math.log2(max(len(torch.unique(img)), 1)))
    return torch.poisson(img * vals, generator=g) / vals - img


def _poisson_noise(g, img, scale_range, gray_prob):
    scale = _uniform(g, *scale_range)
    if _uniform(g, 0, 1) < gray_prob:
        noise = _poisson(g, _gray(img)).expand_as(img)
    else:
        noise = _poisson(g, img)
    return (img + scale * noise).clamp(0, 1)


def _noise(g, img, gaussian_prob, sigma_range, poisson_range, gray_prob):
    if _uniform(g, 0, 1) < gaussian_prob:
        return _gaussian_noise(g, img, sigma_range, gray_prob)
    return _poisson_noise(g, img, poisson_range, gray_prob)


def jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode and decode [1, 3, h, w] in [0, 1] as a JPEG of the given quality (Pillow)."""
    arr = (img[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    out = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(out).permute(2, 0, 1)[None].to(img.dtype)


def _random_jpeg(g, img, quality_range):
    return jpeg(img.clamp(0, 1), round(_uniform(g, *quality_range)))


def _degrade_one(hr: torch.Tensor, g: torch.Generator, cfg: DegradationConfig) -> torch.Tensor:
    h, w = hr.shape[-2:]
    lr_hw = (h // cfg.scale, w // cfg.scale)
    if cfg.plain:
        out = F.interpolate(hr, size=lr_hw, mode="bicubic", align_corners=False, antialias=True)
        return (out * 255).round().clamp(0, 255) / 255
    # Kernels first, as the published dataset draws them before the model degrades.
    kernel1 = _stage_kernel(g, cfg, cfg.sinc_prob, cfg.kernel_list, cfg.kernel_prob,
                            cfg.blur_sigma, cfg.betag_range, cfg.betap_range)
    kernel2 = _stage_kernel(g, cfg, cfg.sinc_prob2, cfg.kernel_list2, cfg.kernel_prob2,
                            cfg.blur_sigma2, cfg.betag_range2, cfg.betap_range2)
    final_sinc = _final_sinc(g, cfg)

    # 1. first degradation: blur, resize, noise, JPEG
    out = filter2d(hr, kernel1)
    out = _random_resize(g, out, cfg.resize_prob, cfg.resize_range)
    out = _noise(g, out, cfg.gaussian_noise_prob, cfg.noise_range, cfg.poisson_scale_range,
                 cfg.gray_noise_prob)
    out = _random_jpeg(g, out, cfg.jpeg_range)

    # 2. second degradation: blur (sometimes), resize around the LR size, noise. The draw that
    # skips the whole stage is made only when it can skip, so the published setting
    # (second_stage_prob 1) consumes exactly the published draws.
    if cfg.second_stage_prob >= 1 or _uniform(g, 0, 1) < cfg.second_stage_prob:
        if _uniform(g, 0, 1) < cfg.second_blur_prob:
            out = filter2d(out, kernel2)
        out = _random_resize(g, out, cfg.resize_prob2, cfg.resize_range2, base_hw=lr_hw)
        out = _noise(g, out, cfg.gaussian_noise_prob2, cfg.noise_range2, cfg.poisson_scale_range2,
                     cfg.gray_noise_prob2)

    # 3. resize to the LR size + final sinc, and JPEG, in random order
    def resize_and_sinc(x):
        x = _resize(x, lr_hw, _choice(g, ("area", "bilinear", "bicubic")))
        return x if final_sinc is None else filter2d(x, final_sinc)

    if _uniform(g, 0, 1) < 0.5:
        out = _random_jpeg(g, resize_and_sinc(out), cfg.jpeg_range2)
    else:
        out = resize_and_sinc(_random_jpeg(g, out, cfg.jpeg_range2))

    # 4. clamp and round to 8 bits, as the published model does
    return (out * 255).round().clamp(0, 255) / 255


def degrade(hr: torch.Tensor, generator: torch.Generator, config: DegradationConfig | None = None) -> torch.Tensor:
    """Degrade a batch [B, 3, H, W] in [0, 1] to [B, 3, H/scale, W/scale] in [0, 1].

    Every random choice comes from `generator`, image by image, so the same generator
    state gives the same output.
    """
    cfg = config or DegradationConfig()
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"expected a batch [B, 3, H, W], got shape {tuple(hr.shape)}")
    h, w = hr.shape[-2:]
    if h % cfg.scale or w % cfg.scale:
        raise ValueError(f"image size {h}x{w} is not divisible by the scale {cfg.scale}")
    hr = hr.detach().to("cpu", torch.float32)
    return torch.cat([_degrade_one(hr[i:i + 1], generator, cfg) for i in range(hr.shape[0])])


class SRPair(NamedTuple):
    lr: torch.Tensor  # [B, 3, H/scale, W/scale] in [0, 1]
    condition: torch.Tensor  # lr brought back to [B, 3, H, W] (bicubic), in [0, 1]


def upsample(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic up-sampling to `size`, clamped to [0, 1]: the conditioning image."""
    return F.interpolate(lr, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def make_sr_pair(hr: torch.Tensor, generator: torch.Generator,
                 config: DegradationConfig | None = None) -> SRPair:
    """(low-resolution image, its bicubic up-sampling to the size of `hr`)."""
    lr = degrade(hr, generator, config)
    return SRPair(lr, upsample(lr, tuple(hr.shape[-2:])))
