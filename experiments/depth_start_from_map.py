# Experiment script (2026-12-07). Tried one depth-to-image step that starts from a picture made of the depth map
# instead of from noise (SDEdit from a guide image); docs/results.md "One step from the input, as served".
"""One depth step from the depth map itself as the start picture: z_t = alpha_t E(2 map - 1) + sigma_t eps at
t = round(strength T) - 1, one prediction of the entry there at guidance w; against the same entry's 1- and
4-step rows from noise (4 steps at the entry's own 4-step w). The map is a grey picture of the scene's layout
(near is bright): its edges are where the objects are, its colours are not the caption's, so strength trades the
layout it gives against the colours the caption must bring.

    python experiments/depth_start_from_map.py adapters/embedded/zoo/depth --data-seed 7 --seeds 0 \
        --strengths 0.6,0.75,0.9 --out tuning.json [--sheet sheet.png]

64 scenes of the stream, each with its caption, `prev`; the metrics of cdd-eval (`training.evaluate.measure`).
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
from cdd.training.condition_metrics import ConditionMetrics
from cdd.training.eval_report import to_uint8
from cdd.training.evaluate import EVAL_SEED, AttributeMetrics, OptionalMetrics, generate, held_out, measure, quantise
from cdd.training.sample_grid import save_grid

KEYS = ("depth_edge_match", "attr_recall", "attr_precision", "attr_all", "kid_attr", "swd", "psnr")


@torch.no_grad()
def from_map(model, backbone, data, text, strength: float, seed: int, batch_size: int = 32) -> torch.Tensor:
    n = data["condition"].shape[0]
    latent = data["condition"].shape[-1] // backbone.vae_scale_factor
    timesteps = backbone.schedule.trailing_timesteps(1, strength)
    out = []
    for start in range(0, n, batch_size):
        cond = data["condition"][start : start + batch_size]
        eps = samplers.initial_noise(range(seed + start, seed + start + cond.shape[0]),
                                     (backbone.model_channels, latent, latent))
        z = samplers.start_from(backbone.to_model_space(cond.float() * 2 - 1), eps, timesteps, backbone.schedule)
        bound = model.bind(cond, text[start : start + batch_size])
        z_0 = samplers.sample_prev(bound, eps, timesteps, backbone.schedule, z_start=z)
        out.append(backbone.from_model_space(z_0).float())
    return quantise(torch.cat(out))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("entry")
    p.add_argument("--seeds", default="0,1000,2000")
    p.add_argument("--strengths", default="0.6,0.75,0.9")
    p.add_argument("--guidance", type=float, default=None, help="w of the one step (default: the entry's 1-step w)")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--data-seed", type=int, default=EVAL_SEED)
    p.add_argument("--backbone", default="adapters/embedded/backbone")
    p.add_argument("--out", required=True)
    p.add_argument("--sheet", help="map | 1 from noise | each strength | 4 from noise | truth (first seed, 4 scenes)")
    a = p.parse_args()
    torch.set_num_threads(1)
    backbone = load_backbone(a.backbone)
    data = held_out("depth", a.num_images, backbone.resolution, seed=a.data_seed)
    truth = quantise(data["target"])
    text = backbone.encode_text(list(data["text"]))
    optional = OptionalMetrics(truth, backbone.device)
    attribute = AttributeMetrics(truth, data["caption"], default_dir(), caption_fields=True)
    follow = ConditionMetrics("depth", data)
    entry = load_entry(a.entry, backbone.unet, backbone.fingerprint)
    model = ConditionedDenoiser(backbone.unet, backbone.schedule, entry.adapter)
    m = entry.manifest
    w1 = m.default_guidance(1) if a.guidance is None else a.guidance
    rows = []
    for seed in (int(s) for s in a.seeds.split(",")):
        runs = {}
        for k in (1, 4):
            model.adapter.set_default_guidance(m.default_guidance(k))
            runs[f"noise x{k}"] = generate(model, backbone, data, text, "prev", k, seed, 32)[0]
        model.adapter.set_default_guidance(w1)
        runs.update({f"map strength={s} x1": from_map(model, backbone, data, text, float(s), seed)
                     for s in a.strengths.split(",")})
        if a.sheet and not rows:
            cols = [quantise(data["condition"] * 2 - 1), runs["noise x1"]] + [v for k, v in runs.items() if "map" in k]
            sheet = np.concatenate([to_uint8(c[:4]) for c in cols + [runs["noise x4"], truth]], axis=1)
            save_grid(a.sheet, sheet.repeat(2, axis=0).repeat(2, axis=1))
        for name, images in runs.items():
            r = measure(images, truth, optional, attribute, follow)
            rows.append({"seed": seed, "row": name, **{k: r.get(k) for k in KEYS}})
            print(f"seed {seed} {name}: " + ", ".join(f"{k} {r.get(k):.3f}" for k in KEYS if r.get(k) is not None),
                  flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    for name in dict.fromkeys(r["row"] for r in rows):
        sel = [r for r in rows if r["row"] == name]
        print(f"mean {name}: " + ", ".join(f"{k} {np.mean([r[k] for r in sel]):.3f}" for k in KEYS))


if __name__ == "__main__":
    main()
