# Experiment script. Produced docs/images/sr_dmd_flat_hf.png (docs/results.md "Distribution matching on super-resolution").
"""The held-out super-resolution outputs of one entry with the most invented detail on flat regions: per-image
`flat_hf_energy` (cdd-eval's `flat HF` is its mean), printed, and a sheet of the worst images above their truths.

    python experiments/flat_hf_worst.py ENTRY --seed 2000 --steps 4 --out sheet.png

The images are cdd-eval's (`training.evaluate.held_out` and `generate`: the held-out scenes, `mild-64px`, no prompt,
`prev`, image i from noise seed SEED + i), so the printed mean is the row's `flat HF`.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from cdd.adapters.zoo import load_entry
from cdd.runtime.diffusion.backbone import load_backbone
from cdd.runtime.diffusion.denoiser import ConditionedDenoiser
from cdd.training.eval_report import to_uint8
from cdd.training.evaluate import generate, held_out, quantise
from cdd.training.metrics import flat_hf_energy
from cdd.training.sample_grid import save_grid


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("entry")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--show", type=int, default=6, help="how many of the worst images the sheet shows")
    p.add_argument("--backbone", default="adapters/embedded/backbone")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    backbone = load_backbone(a.backbone)
    data = held_out("super-resolution", a.num_images, backbone.resolution, degradation="mild-64px")
    entry = load_entry(a.entry, backbone.unet, backbone.fingerprint)
    model = ConditionedDenoiser(backbone.unet, backbone.schedule, entry.adapter)
    images, _ = generate(model, backbone, data, backbone.encode_text([""] * a.num_images), "prev", a.steps, a.seed, 32)
    truth = quantise(data["target"])
    energy = flat_hf_energy(images, truth)
    finite = energy[torch.isfinite(energy)]
    order = torch.argsort(torch.nan_to_num(energy, nan=-1.0), descending=True)[: a.show]
    print(f"flat HF: mean {float(finite.mean()):.3f}, median {float(finite.median()):.3f}; worst (image, energy): "
          + ", ".join(f"({int(i)}, {float(energy[i]):.2f})" for i in order))
    sheet = np.concatenate([to_uint8(torch.stack([images[i], truth[i]])) for i in order], axis=1)  # output over truth
    save_grid(a.out, sheet.repeat(3, axis=0).repeat(3, axis=1))
    print(f"written {a.out} (top: outputs, bottom: truths)")


if __name__ == "__main__":
    main()
