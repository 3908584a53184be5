# Experiment script. Produced the "one step from the input" rows (docs/results.md "Distribution matching on super-resolution").
"""One super-resolution step that starts from the input instead of from noise: z_t = alpha_t E(input) + sigma_t eps at
t < 999 (the input is the degraded image at full size, as the adapter's condition), x_hat = the student's one
prediction there; against the entry's own 1- and 4-step rows from noise (`prev`). One-step super-resolution models
start from the input's latent (OSEDiff); a CoDi student was trained to predict x_0 from z_t of real images at its
grid's timesteps (749, 499, 249 among them), not from a blurred image's, so whether it helps is measured here.

    python experiments/sr_start_from_input.py ENTRY [ENTRY ...] --seeds 0,1000,2000 --starts 749,499,249 --out results.json
    python experiments/sr_start_from_input.py ENTRY --data-seed 7 --seeds 0 --out tuning.json     # choose t here

Rows as cdd-eval's (held-out scenes, `mild-64px`, no prompt, image i from noise seed SEED + i, the same metrics via
`training.evaluate.measure`); a super-resolution entry's fidelity module is not applied.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cdd.adapters.zoo import load_entry
from cdd.runtime.diffusion import samplers
from cdd.runtime.diffusion.backbone import load_backbone
from cdd.runtime.diffusion.denoiser import ConditionedDenoiser
from cdd.training.attributes import default_dir
from cdd.training.eval_report import to_uint8
from cdd.training.evaluate import EVAL_SEED, AttributeMetrics, OptionalMetrics, generate, held_out, measure, quantise
from cdd.training.sample_grid import save_grid

KEYS = ("kid_attr", "swd", "psnr", "ssim", "flat_hf", "attr_all")


@torch.no_grad()
def from_input(model, backbone, data, text, t: int, seed: int, batch_size: int = 32) -> torch.Tensor:
    n = data["condition"].shape[0]
    latent = data["condition"].shape[-1] // backbone.vae_scale_factor
    out = []
    for start in range(0, n, batch_size):
        cond = data["condition"][start : start + batch_size]
        seeds = range(seed + start, seed + start + cond.shape[0])
        eps = samplers.initial_noise(seeds, (backbone.model_channels, latent, latent))
        z = backbone.schedule.add_noise(backbone.to_model_space(cond.float() * 2 - 1), eps, t)
        bound = model.bind(cond, text[start : start + batch_size])
        x_hat, _ = bound(z, torch.full((cond.shape[0],), t, dtype=torch.long))
        out.append(backbone.from_model_space(x_hat).float())
    return quantise(torch.cat(out))


def save_sheet(path: str, columns: list[torch.Tensor], n: int = 4) -> None:
    sheet = np.concatenate([to_uint8(c[:n]) for c in columns], axis=1)
    save_grid(path, sheet.repeat(2, axis=0).repeat(2, axis=1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("entries", nargs="+")
    p.add_argument("--seeds", default="0,1000,2000")
    p.add_argument("--starts", default="749,499,249")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--data-seed", type=int, default=EVAL_SEED, help="the stream (default the held-out one; 7 tunes)")
    p.add_argument("--backbone", default="adapters/embedded/backbone")
    p.add_argument("--out", required=True)
    p.add_argument("--sheet", help="also a sheet of the first 4 images of each row (first entry, first seed): "
                   "input | each row | truth")
    a = p.parse_args()
    torch.set_num_threads(1)
    backbone = load_backbone(a.backbone)
    data = held_out("super-resolution", a.num_images, backbone.resolution, seed=a.data_seed, degradation="mild-64px")
    truth = quantise(data["target"])
    text = backbone.encode_text([""] * a.num_images)
    optional, attribute = OptionalMetrics(truth, backbone.device), AttributeMetrics(truth, data["caption"], default_dir())
    rows = []
    for path in a.entries:
        entry = load_entry(path, backbone.unet, backbone.fingerprint)
        model = ConditionedDenoiser(backbone.unet, backbone.schedule, entry.adapter)
        for seed in (int(s) for s in a.seeds.split(",")):
            runs = {f"noise x{k}": generate(model, backbone, data, text, "prev", k, seed, 32)[0] for k in (1, 4)}
            runs.update({f"input t={t} x1": from_input(model, backbone, data, text, int(t), seed)
                         for t in a.starts.split(",")})
            if a.sheet and path == a.entries[0] and seed == int(a.seeds.split(",")[0]):
                save_sheet(a.sheet, [quantise(data["condition"] * 2 - 1)] + list(runs.values()) + [truth])
            for name, images in runs.items():
                m = measure(images, truth, optional, attribute, sr=True)
                rows.append({"entry": path, "seed": seed, "row": name, **{k: m[k] for k in KEYS}})
                print(f"{Path(path).parent.name}/{Path(path).name} seed {seed} {name}: "
                      + ", ".join(f"{k} {m[k]:.3f}" for k in KEYS), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    for path in a.entries:  # the mean over seeds
        for name in dict.fromkeys(r["row"] for r in rows):
            sel = [r for r in rows if r["entry"] == path and r["row"] == name]
            print(f"mean {path} {name}: " + ", ".join(f"{k} {sum(r[k] for r in sel) / len(sel):.3f}" for k in KEYS))


if __name__ == "__main__":
    main()
