# Experiment script. Produced docs/images/degradations_64px.png, the degradation presets' contact sheet in docs/data.md.
"""A contact sheet of the super-resolution degradation presets at 64 -> 16 px.

    python experiments/degradation_sheet.py --out docs/images/degradations_64px.png [--scenes 8] [--photos 4]

One tile per image: HR (64 px) | the published `realesrgan` preset's LR | the `mild-64px` preset's LR, each
LR image (16 px) enlarged x4 with nearest neighbours so its pixels stay visible. Scenes are the
super-resolution training stream's first renders (seed --seed); photo patches come from the held-out
photographs (astronaut, chelsea, flower: what `cdd-eval --dataset photos` measures). Both presets degrade
an image with the same generator seed, so a tile compares settings, not luck.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from cdd.training.data import scenes
from cdd.training.data.cli import contact_sheet
from cdd.training.data.degradations import degrade, degradation_preset
from cdd.training.data.photos import PhotoPatches

SIZE = 64


def _u8(x: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> uint8 H x W x 3."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def tile(hr: torch.Tensor, seed: int) -> np.ndarray:
    """HR | realesrgan LR | mild-64px LR (nearest x4), side by side with 2-pixel white gaps."""
    columns = [_u8(hr)]
    for preset in ("realesrgan", "mild-64px"):
        lr = degrade(hr[None], torch.Generator().manual_seed(seed), degradation_preset(preset))[0]
        columns.append(_u8(lr.repeat_interleave(SIZE // lr.shape[-1], -1).repeat_interleave(SIZE // lr.shape[-2], -2)))
    gap = np.full((SIZE, 2, 3), 255, np.uint8)
    return np.concatenate([columns[0], gap, columns[1], gap, columns[2]], axis=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--photos", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    tiles, captions = [], []
    for k in range(args.scenes):
        spec = scenes.sample_scene(np.random.default_rng([args.seed, k]))
        hr = torch.from_numpy(scenes.render(spec, SIZE).image).permute(2, 0, 1).float()
        tiles.append(tile(hr, 1000 + k))
        captions.append(f"scene {k}: HR | realesrgan | mild-64px")
    photos = PhotoPatches.bundled("held-out", size=SIZE, seed=args.seed)
    for i in range(args.photos):
        hr = (photos[i]["image"] + 1) / 2
        tiles.append(tile(hr, 2000 + i))
        captions.append(f"held-out photo patch {i}: HR | realesrgan | mild-64px")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(tiles, captions, columns=3, tile=3 * 196).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
