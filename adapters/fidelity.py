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


class FidelityNet(nn.Module):
    """R of `out = y + w R([y, c, y - c])`; the last convolution starts at zero, so an untrained module is
    the identity on y at every w."""

    def __init__(self, width: int = 64, blocks: int = 6, head: int = 32):
        super().__init__()
        if width < 1 or blocks < 0 or head < 1:
            raise ValueError(f"FidelityNet needs width >= 1, blocks >= 0, head >= 1, got {width}, {blocks}, {head}")
        self.width, self.blocks, self.head_width = width, blocks, head
        self.head = nn.Conv2d(9, head, 3, padding=1)
        self.down = nn.Conv2d(4 * head, width, 1)
        self.body = nn.Sequential(*[_Block(width) for _ in range(blocks)])
        self.up = nn.Conv2d(width, 4 * head, 1)
        self.tail = nn.Conv2d(head, 3, 3, padding=1)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def config(self) -> dict[str, Any]:
        return {"width": self.width, "blocks": self.blocks, "head": self.head_width}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FidelityNet:
        unknown = set(config) - {"width", "blocks", "head"}
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
        if isinstance(w, torch.Tensor):
            w = w.to(r.dtype).reshape(-1, 1, 1, 1)
        return y + w * r
