# Experiment script. Produced the autoencoder's reconstruction numbers (PSNR, SWD) and sheets of docs/backbone.md, under docs/backbone-latent/.
"""Reconstruction quality of an AutoencoderKL (the latent backbone's first stage) on held-out data.

PSNR (dB, mean over images) and the sliced Wasserstein distance (x 1e3, Laplacian-pyramid patches)
between the reconstructions (encode to the latent mean, decode) and the originals, on N held-out
scenes and on N patches of the held-out photographs (training/data/photos.py HELD_OUT), plus a PNG
of originals (odd rows) above their reconstructions (even rows).

    python experiments/autoencoder_quality.py --vae runs/autoencoder/vae [--n 256] [--out docs/backbone-latent] \
        [--fidelity adapters/embedded/zoo/super-resolution]

`--fidelity ENTRY`: also the round trip followed by a super-resolution entry's fidelity module (adapters/fidelity.py),
which reads the image's own x4-smaller version (`bicubic` preset: antialiased bicubic down, 8-bit) brought back up
bicubically: the decoder's ceiling when it may look at the low-resolution input, as served super-resolution does
(the module was trained on sampled outputs, not on round trips: this is what it does to a decoder error alone).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from cdd.training.autoencoder import HELD_OUT_SEED, held_out_images, reconstruct
from cdd.training.data.photos import HELD_OUT, PhotoPatches
from cdd.training.metrics import psnr, sliced_wasserstein


def pairs_png(x: torch.Tensor, rec: torch.Tensor, cols: int = 16, scale: int = 2) -> Image.Image:
    """Rows of `cols` originals, each followed by a row of their reconstructions; images in [0, 1]."""
    rows = []
    for i in range(0, x.shape[0], cols):
        for batch in (x[i : i + cols], rec[i : i + cols]):
            rows.append(np.concatenate(list((batch.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)), axis=1))
    image = Image.fromarray(np.concatenate(rows, axis=0))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", type=Path, required=True)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path("docs/backbone-latent"))
    p.add_argument("--fidelity", type=Path, default=None, help="a super-resolution entry with a fidelity module")
    args = p.parse_args()
    vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=torch.float32, local_files_only=True).eval()
    size = int(vae.config.sample_size)
    sets = {
        "scenes": held_out_images(args.n, size),
        "photos": held_out_images(args.n, size, PhotoPatches.bundled("held-out", size=size, seed=HELD_OUT_SEED)),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"vae": str(args.vae), "n": args.n, "resolution": size, "held_out_photos": list(HELD_OUT)}
    for name, x in sets.items():
        x01 = (x + 1) / 2
        rec = ((reconstruct(vae, x) + 1) / 2).clamp(0, 1)
        result[name] = {"psnr": float(psnr(rec, x01).mean()), "swd": sliced_wasserstein(rec, x01)}
        pairs_png(x01[:32], rec[:32]).save(args.out / f"reconstructions_{name}.png")
        if args.fidelity is not None:
            from cdd.adapters.zoo import Manifest, load_fidelity
            from cdd.training.data.degradations import degradation_preset, make_sr_pair

            net = load_fidelity(args.fidelity, Manifest.from_file(args.fidelity / "manifest.json"))
            cond = make_sr_pair(x01, torch.Generator().manual_seed(0), degradation_preset("bicubic")).condition
            with torch.no_grad():
                fixed = ((net(rec * 2 - 1, cond * 2 - 1, 1.0) + 1) / 2).clamp(0, 1)
            result[f"{name} + fidelity"] = {"psnr": float(psnr(fixed, x01).mean()), "swd": sliced_wasserstein(fixed, x01),
                                            "bicubic_psnr": float(psnr(cond, x01).mean()), "entry": str(args.fidelity)}
    (args.out / "autoencoder_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
