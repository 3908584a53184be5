"""The super-resolution fidelity module: a small network that reads the low-resolution input beside the
decoded output and corrects what the autoencoder and the few-step sampler got wrong about it.

    out = y + w * R([y, c, y - c])

`y` is the decoded output (after ILVR's last update), `c` the condition (the input's bicubic up-sampling),
both in [-1, 1]; `w` in [0, 1] is the fidelity weight a request may set (0: the decoded output as it is,
1: the module's full correction). It is StableSR's idea (its "controllable feature wrapping" lets the
decoder read the low-resolution input, with a fidelity weight per request) done after the decoder instead
of inside it, for two reasons measured or required here:

- The ceiling it moves is the autoencoder's: its photo round trip is 24.0 dB (docs/backbone.md), about
  bicubic's own PSNR at x4, so no latent sampler could beat bicubic on a photograph. The module sees the
  pixels the latent cannot hold (the input's own colours and edges) and is trained on the served sampler's
  real outputs, so it learns which of their details to keep (edges the input supports) and which to drop
  (speckles on flat regions, colour drift).
- The backbone folder stays what plain diffusers loads (its `AutoencoderKL` is untouched); the module is
  a file of the super-resolution zoo entry (`fidelity.safetensors`, hashed with the rest, its settings in
  the manifest's `fidelity`), so an entry without one serves as before.

Fully convolutional: any even height and width, tiles or whole images. The body works at half resolution
(pixel unshuffle), which keeps its cost near one UNet step of the same pixels.

An optional **flat guard** (`flat_guard`: a threshold, part of the architecture so the manifest records it) takes
out texture the input cannot support: where the input itself is flat (the local std of c's luminance under the
threshold, fading out up to twice it: mask m), the corrected output's difference to the input is blurred,
out = y' - m HP(y' - c) with y' = y + R and HP = 1 - G_1 (G_1 a Gaussian blur of sigma 1 pixel, the scale
`training/metrics.flat_hf_energy` measures), so that where m = 1, out = c + G_1(y' - c): a colour or brightness
correction stays, speckle is blurred away. A flat 16 px input says nothing about texture at that scale, so any
there is invented; where the input has texture or noise (m = 0) the module's output is unchanged. At a weight w
the correction and the guard are both scaled by w.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

FIDELITY_FILE = "fidelity.safetensors"


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(x)))


GUARD_WINDOW = 7  # pixels: the window of the input's local std (training/metrics.FLAT_WINDOW)
GUARD_SIGMA = 1.0  # the Gaussian blur whose residual is the high-frequency part (training/metrics.HF_SIGMA)


def luminance(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] RGB in [0, 1] -> [B, 1, H, W] Rec. 601 luma, float32 (one channel is returned as it is)."""
    if x.shape[1] == 1:
        return x.float()
    r, g, b = x.float().unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b)[:, None]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (radius 3 sigma), reflect-padded: the image's size and dtype are kept."""
    radius = max(1, round(3 * sigma))
    k = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float64) ** 2) / (2 * sigma**2))
    k = (k / k.sum()).to(x.device, x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def local_std(y: torch.Tensor, window: int, padding: str = "replicate") -> torch.Tensor:
    """The standard deviation of `y` ([B, 1, H, W]) over each pixel's `window` x `window` neighbourhood, the borders
    padded by `padding` (F.pad's mode)."""
    pad = window // 2
    padded = F.pad(y, (pad, pad, pad, pad), mode=padding)
    mean = F.avg_pool2d(padded, window, 1)
    return (F.avg_pool2d(padded * padded, window, 1) - mean * mean).clamp_min(0).sqrt()


def input_flatness(cond: torch.Tensor, threshold: float, window: int = GUARD_WINDOW) -> torch.Tensor:
    """[B, 1, H, W] in [0, 1]: 1 where the condition ([-1, 1]) is flat, its luminance's local std (in [0, 1]) over
    `window` x `window` under `threshold`, falling linearly to 0 at twice the threshold."""
    std = local_std(luminance((cond + 1) / 2), window, "reflect")
    return ((2 * threshold - std) / threshold).clamp(0, 1).to(cond.dtype)


class FidelityNet(nn.Module):
    """R of `out = y + w R([y, c, y - c])`; the last convolution starts at zero, so an untrained module is
    the identity on y at every w. `flat_guard`: the input-flatness threshold of the guard (None: none)."""

    def __init__(self, width: int = 64, blocks: int = 6, head: int = 32, flat_guard: float | None = None):
        super().__init__()
        if width < 1 or blocks < 0 or head < 1:
            raise ValueError(f"FidelityNet needs width >= 1, blocks >= 0, head >= 1, got {width}, {blocks}, {head}")
        if flat_guard is not None and not 0 < flat_guard < 1:
            raise ValueError(f"FidelityNet flat_guard must be in (0, 1) (a local std of luminance), got {flat_guard}")
        self.width, self.blocks, self.head_width, self.flat_guard = width, blocks, head, flat_guard
        self.head = nn.Conv2d(9, head, 3, padding=1)
        self.down = nn.Conv2d(4 * head, width, 1)
        self.body = nn.Sequential(*[_Block(width) for _ in range(blocks)])
        self.up = nn.Conv2d(width, 4 * head, 1)
        self.tail = nn.Conv2d(head, 3, 3, padding=1)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def config(self) -> dict[str, Any]:
        config = {"width": self.width, "blocks": self.blocks, "head": self.head_width}
        if self.flat_guard is not None:
            config["flat_guard"] = self.flat_guard
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FidelityNet:
        unknown = set(config) - {"width", "blocks", "head", "flat_guard"}
        if unknown:
            raise ValueError(f"unknown fidelity architecture keys {sorted(unknown)}")
        return cls(**config)

    def correction(self, y: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """R([y, c, y - c]), [B, 3, H, W]; H and W even."""
        if y.shape != cond.shape or y.ndim != 4 or y.shape[1] != 3:
            raise ValueError(f"fidelity: output {tuple(y.shape)} and condition {tuple(cond.shape)} must both be [B, 3, H, W]")
        if y.shape[-1] % 2 or y.shape[-2] % 2:
            raise ValueError(f"fidelity: height and width must be even, got {y.shape[-2]}x{y.shape[-1]}")
        h = F.silu(self.head(torch.cat([y, cond, y - cond], 1)))
        b = self.down(F.pixel_unshuffle(h, 2))
        b = self.body(b)  # residual blocks
        h = h + F.pixel_shuffle(self.up(b), 2)
        return self.tail(F.silu(h))

    def forward(self, y: torch.Tensor, cond: torch.Tensor, w: torch.Tensor | float = 1.0) -> torch.Tensor:
        """y + w R: `y` the decoded output and `cond` the condition, both [B, 3, H, W] in [-1, 1]; `w` a float or
        one weight per row ([B])."""
        r = self.correction(y, cond)
        if self.flat_guard is not None:
            d = y + r - cond
            r = r - input_flatness(cond, self.flat_guard) * (d - gaussian_blur(d, GUARD_SIGMA))
        if isinstance(w, torch.Tensor):
            w = w.to(r.dtype).reshape(-1, 1, 1, 1)
        return y + w * r
