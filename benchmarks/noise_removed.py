"""The fraction of the noise removed (cdd.training.codi.noise_removed) by zoo entries, at t = 19, 99, 249.

    python benchmarks/noise_removed.py ENTRY [ENTRY ...] [--num-images 16]

On the first N super-resolution samples of cdd-eval's held-out stream, with noise from
torch.Generator().manual_seed(0): 1 = x_hat holds none of the added noise, 0 = all of it.
"""

import argparse

import torch

from cdd.adapters.zoo import default_backbone_dir, load_entry
from cdd.runtime.backbone import load_backbone
from cdd.runtime.denoiser import ConditionedDenoiser
from cdd.training.codi import noise_removed
from cdd.training.evaluate import held_out

TIMESTEPS = (19, 99, 249)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("entries", nargs="+")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--backbone", default=str(default_backbone_dir()))
    args = p.parse_args()
    backbone = load_backbone(args.backbone)
    data = held_out("super-resolution", args.num_images, 64)
    x, text = backbone.to_model_space(data["target"]), backbone.encode_text(data["text"])
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    for path in args.entries:
        entry = load_entry(path, backbone.unet, backbone.fingerprint)
        model = ConditionedDenoiser(backbone.unet, backbone.schedule, entry.adapter)
        fractions = [noise_removed(model, x, data["condition"], text, t, eps, backbone.schedule) for t in TIMESTEPS]
        print(path, " ".join(f"t={t}: {f:.3f}" for t, f in zip(TIMESTEPS, fractions)), flush=True)


if __name__ == "__main__":
    main()
