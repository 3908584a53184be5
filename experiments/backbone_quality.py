# Experiment script. Produced the backbone quality tables and contact sheets of docs/backbone.md (docs/backbone/, docs/backbone-latent/).
"""Quality of a text-to-image backbone on the scenes world.

1. A contact sheet: 8 fixed captions x 8 seeds, 50 DDIM steps (rows = captions).
2. The sliced Wasserstein distance (x 1e3, Laplacian-pyramid patches) between N generated images
   (one per caption of N random scenes) and the N renders of those scenes, next to the floor: the
   same distance between two disjoint sets of N renders.
3. Caption following: the scenes-attribute classifier (`cdd.training.attributes`, shipped in
   adapters/embedded/attributes) reads each generated image and is scored against the attributes its
   caption names (floor, time of day, objects found); the same score on the renders themselves is the
   ceiling, and for a latent backbone also on the renders passed through its autoencoder (what its
   decoder can show at best). KID-attr and FID-attr (the classifier's features) of the generated set
   against the renders go beside the SWD.

With --guidance W > 1 the samples use classifier-free guidance (the backbone is trained with 10%
of its captions dropped); the default 1 is the plain conditional model.

    python experiments/backbone_quality.py [--backbone DIR] [--n 512] [--steps 50] [--guidance 1] [--out docs/backbone]
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
from cdd.runtime.diffusion.backbone import load_backbone
from cdd.runtime.diffusion.denoiser import ConditionedDenoiser
from cdd.runtime.diffusion.samplers import initial_noise, sample_with_scheduler
from cdd.training import attributes
from cdd.training.data.scenes import caption, render, sample_scene
from cdd.training.metrics import sliced_wasserstein
from cdd.training.pretrain import GRID_CAPTIONS


def guided(denoiser, text, empty, w):
    """Classifier-free guidance on (x_hat, eps_hat): both are linear in the network output for a given
    (z_t, t), so guiding them equals guiding the output itself."""
    if w == 1:
        return denoiser.bind(None, text)

    def model(z_t, t):
        x_c, e_c = denoiser(z_t, t, None, text)
        x_u, e_u = denoiser(z_t, t, None, empty.expand(z_t.shape[0], -1, -1))
        return x_u + w * (x_c - x_u), e_u + w * (e_c - e_u)

    return model


@torch.no_grad()
def generate(backbone, captions, seeds, steps, batch=64, guidance=1.0):
    denoiser = ConditionedDenoiser(backbone.unet, backbone.schedule)
    size = backbone.unet.config.sample_size
    empty = backbone.encode_text([""])
    out = []
    for i in range(0, len(captions), batch):
        text = backbone.encode_text(captions[i : i + batch])
        z = initial_noise(seeds[i : i + batch], (backbone.model_channels, size, size))
        x = sample_with_scheduler(guided(denoiser, text, empty, guidance), z, steps, backbone.schedule,
                                  backbone.scheduler_config, "ddim")
        out.append((backbone.from_model_space(x).clamp(-1, 1) + 1) / 2)
    return torch.cat(out)


@torch.no_grad()
def caption_following(net, backbone, fake, real, floor_set, captions) -> dict:
    """The classifier's agreement with the captions on the generated images, on the renders (the ceiling)
    and, for a latent backbone, on the renders through its autoencoder; KID-attr and FID-attr against the
    renders, with the floor (a disjoint set of renders) beside them."""
    out = {"attr_generated": attributes.caption_agreement(net, fake, captions),
           "attr_renders_ceiling": attributes.caption_agreement(net, real, captions)}
    if backbone.latent:
        recon = torch.cat([(backbone.from_model_space(backbone.to_model_space(x * 2 - 1)).clamp(-1, 1) + 1) / 2
                           for x in real.split(64)])
        out["attr_autoencoded_renders"] = attributes.caption_agreement(net, recon, captions)
    f_fake, f_real, f_floor = (attributes.features(net, x) for x in (fake, real, floor_set))
    out.update(kid_attr=attributes.kernel_distance(f_fake, f_real), kid_attr_floor=attributes.kernel_distance(f_floor, f_real),
               fid_attr=attributes.frechet_distance(f_fake, f_real), fid_attr_floor=attributes.frechet_distance(f_floor, f_real))
    ceiling = out["attr_renders_ceiling"]
    out["attr_fraction_of_ceiling"] = {k: (out["attr_generated"][k] / ceiling[k] if ceiling[k] else None) for k in ceiling}
    return out


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
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default 1: none)")
    p.add_argument("--attributes", type=Path, default=attributes.default_dir(), help="the attribute classifier")
    p.add_argument("--out", type=Path, default=Path("docs/backbone"))
    args = p.parse_args()
    torch.manual_seed(0)
    bb = load_backbone(args.backbone)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    suffix = "" if args.guidance == 1 else f"_w{args.guidance:g}"
    sheet_imgs = generate(bb, [c for c in GRID_CAPTIONS for _ in range(8)], [s for _ in GRID_CAPTIONS for s in range(8)],
                          args.steps, guidance=args.guidance)
    contact_sheet(sheet_imgs, GRID_CAPTIONS, 8).save(args.out / f"samples_{args.steps}_ddim{suffix}.png")
    print(f"contact sheet: {time.time() - t0:.0f} s", flush=True)

    specs, real = renders(1000, args.n, bb.resolution)
    _, floor_set = renders(2000, args.n, bb.resolution)
    t0 = time.time()
    captions = [caption(s) for s in specs]
    fake = generate(bb, captions, list(range(10_000, 10_000 + args.n)), args.steps, guidance=args.guidance)
    gen_s = time.time() - t0
    result = {
        "backbone": str(args.backbone),
        "fingerprint": bb.fingerprint,
        "n": args.n,
        "ddim_steps": args.steps,
        "guidance_scale": args.guidance,
        "swd_generated_vs_rendered": sliced_wasserstein(fake, real),
        "swd_rendered_vs_rendered_floor": sliced_wasserstein(floor_set, real),
        "generation_seconds": round(gen_s, 1),
    }
    result.update(caption_following(attributes.load(args.attributes), bb, fake, real, floor_set, captions))
    (args.out / f"quality{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
