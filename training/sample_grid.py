"""Sample grids for watching a run: one row per validation example,

    condition | k = 1 | k = 2 | k = 4 (| k = 50) | target

each k-step sample drawn by the served few-step sampler (`prev` for CoDi, `ddim` for fine-tuning)
through the same ConditionedDenoiser forward the run trains, from the same initial noise per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..adapters.atomic import atomic_file
from ..runtime.diffusion.backbone import Backbone
from ..runtime.diffusion.samplers import few_step_sampler, fresh_noise, initial_noise


@torch.no_grad()
def sample_grid(model, backbone: Backbone, batch: dict, sampler: str, steps: Sequence[int], seed: int = 0) -> np.ndarray:
    """`model(z_t, t, cond, text_emb) -> (x_hat, eps_hat)`; `batch` as the datasets yield it (collated).
    Returns an uint8 [H, W, 3] image."""
    device = backbone.device
    cond = batch["condition"].to(device)
    text_emb = backbone.encode_text(batch["text"])
    rows, size = cond.shape[0], cond.shape[-1]
    latent = size // backbone.vae_scale_factor
    shape = (backbone.model_channels, latent, latent)
    z_T = initial_noise(range(seed, seed + rows), shape, device)
    sample = few_step_sampler(sampler)
    columns = [cond * 2 - 1]
    for k in steps:
        fresh = fresh_noise(sampler, range(seed, seed + rows), shape, k, device)
        bound = lambda z, t: model(z, t, cond, text_emb)  # noqa: E731
        z_0 = sample(bound, z_T, backbone.schedule.trailing_timesteps(k), backbone.schedule, fresh_noise=fresh)
        columns.append(backbone.from_model_space(z_0).float())
    columns.append(batch["target"].to(device).float())
    images = torch.stack(columns, dim=1).clamp(-1, 1)  # [rows, cols, 3, H, W]
    images = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 3, 1, 4, 2).cpu().numpy()
    grid = images.reshape(rows * size, len(columns) * size, 3)
    return _with_header(grid, size, ["condition", *[f"{k} step{'s' if k > 1 else ''}" for k in steps], "target"])


LINE = 11  # pixels per header line (PIL's default bitmap font)


def _wrap(label: str, width: int, measure) -> list[str]:
    """`label` in lines no wider than `width` pixels: broken at spaces, a word too long for a line at characters."""
    pieces = []
    for word in label.split():
        while len(word) > 1 and measure(word) > width:  # a long word: as many characters as fit, the rest next
            n = max((k for k in range(1, len(word)) if measure(word[:k]) <= width), default=1)
            pieces.append(word[:n])
            word = word[n:]
        pieces.append(word)
    lines: list[str] = []
    for piece in pieces:
        if lines and measure(lines[-1] + " " + piece) <= width:
            lines[-1] += " " + piece
        else:
            lines.append(piece)
    return lines or [""]


def _with_header(grid: np.ndarray, size: int, labels: list[str]) -> np.ndarray:
    """A strip of column labels above the grid, each wrapped to its column (only when the tiles are wide enough
    to read): labels never run into their neighbours."""
    if size < 48:
        return grid
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(label, size - 4, draw.textlength) for label in labels]
    header = Image.new("RGB", (grid.shape[1], LINE * max(map(len, wrapped)) + 1), (255, 255, 255))
    draw = ImageDraw.Draw(header)
    for i, lines in enumerate(wrapped):
        for j, line in enumerate(lines):
            draw.text((i * size + 2, j * LINE), line, fill=(0, 0, 0))
    return np.concatenate([np.asarray(header), grid], axis=0)


def save_grid(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    with atomic_file(path) as f:
        Image.fromarray(image).save(f, format="PNG")
    return path
