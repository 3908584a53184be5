"""Quality of a text-to-image backbone on the scenes world (issue 4's evidence).

1. A contact sheet: 8 fixed captions x 8 seeds, 50 DDIM steps (rows = captions).
2. The sliced Wasserstein distance (x 1e3, Laplacian-pyramid patches) between N generated images
   (one per caption of N random scenes) and the N renders of those scenes, next to the floor: the
   same distance between two disjoint sets of N renders.

    python benchmarks/backbone_quality.py [--backbone DIR] [--n 512] [--steps 50] [--out docs/backbone]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from cdd.adapters.zoo import default_backbone_dir
from cdd.runtime.backbone import load_backbone
from cdd.runtime.denoiser import ConditionedDenoiser
from cdd.runtime.samplers import initial_noise, sample_with_scheduler
from cdd.training.data.scenes import caption, render, sample_scene
from cdd.training.metrics import sliced_wasserstein
from cdd.training.pretrain import GRID_CAPTIONS


@torch.no_grad()
def generate(backbone, captions, seeds, steps, batch=64):
    denoiser = ConditionedDenoiser(backbone.unet, backbone.schedule)
    size = backbone.unet.config.sample_size
    out = []
    for i in range(0, len(captions), batch):
        text = backbone.encode_text(captions[i : i + batch])
        z = initial_noise(seeds[i : i + batch], (backbone.model_channels, size, size))
        x = sample_with_scheduler(denoiser.bind(None, text), z, steps, backbone.schedule, backbone.scheduler_config, "ddim")
        out.append((backbone.from_model_space(x).clamp(-1, 1) + 1) / 2)
    return torch.cat(out)


def renders(seed, n, size):
    rng = np.random.default_rng(seed)
    specs = [sample_scene(rng) for _ in range(n)]
    imgs = torch.from_numpy(np.stack([render(s, size).image for s in specs])).permute(0, 3, 1, 2).float()
    return specs, imgs


def contact_sheet(images: torch.Tensor, rows: list[str], cols: int, scale: int = 2) -> Image.Image:
    size = images.shape[-1] * scale
    label_w = 330
    sheet = Image.new("RGB", (label_w + cols * size, len(rows) * size), "white")
    draw = ImageDraw.Draw(sheet)
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for r, text in enumerate(rows):
        draw.text((4, r * size + size // 2 - 6), text, fill="black")
        for c in range(cols):
            tile = Image.fromarray(arr[r * cols + c]).resize((size, size), Image.NEAREST)
            sheet.paste(tile, (label_w + c * size, r * size))
    return sheet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", type=Path, default=default_backbone_dir())
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("docs/backbone"))
    args = p.parse_args()
    torch.manual_seed(0)
    bb = load_backbone(args.backbone)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    sheet_imgs = generate(bb, [c for c in GRID_CAPTIONS for _ in range(8)], [s for _ in GRID_CAPTIONS for s in range(8)], args.steps)
    contact_sheet(sheet_imgs, GRID_CAPTIONS, 8).save(args.out / "samples_50_ddim.png")
    print(f"contact sheet: {time.time() - t0:.0f} s", flush=True)

    specs, real = renders(1000, args.n, bb.resolution)
    _, floor_set = renders(2000, args.n, bb.resolution)
    t0 = time.time()
    fake = generate(bb, [caption(s) for s in specs], list(range(10_000, 10_000 + args.n)), args.steps)
    gen_s = time.time() - t0
    result = {
        "backbone": str(args.backbone),
        "fingerprint": bb.fingerprint,
        "n": args.n,
        "ddim_steps": args.steps,
        "guidance_scale": 1.0,
        "swd_generated_vs_rendered": sliced_wasserstein(fake, real),
        "swd_rendered_vs_rendered_floor": sliced_wasserstein(floor_set, real),
        "generation_seconds": round(gen_s, 1),
    }
    (args.out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
