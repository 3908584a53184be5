"""`cdd-train-autoencoder`: train the embedded backbone's `AutoencoderKL` on scenes and photo patches.

The first stage of the embedded miniature Stable Diffusion: a diffusers
`AutoencoderKL` that maps 64x64 images to 16x16x4 latents (factor 4), trained from scratch on the
scenes stream mixed with patches of the bundled photographs (training/data/photos.py).

Loss, per image in [-1, 1] (`autoencoder_loss`):

    L = |x - x_rec|_1 + w_grad * |grad x - grad x_rec|_1 + w_kl * KL(q(z|x) || N(0, I)) / (3 H W)

L1 rather than L2 because L2 averages edges into blur; the finite-difference term weights edges and
texture (the scenes' object outlines and floor patterns, the photographs' detail) that a pixel
loss under-counts. The KL term is Latent Diffusion's (Rombach et al., "High-Resolution Image
Synthesis with Latent Diffusion Models": weight 1e-6 against a per-pixel reconstruction sum), only
there to keep the latents near N(0, I) in shape; their scale is set afterwards from the measured
standard deviation (`scaling_factor = 1 / std`), as Stable Diffusion does. There is no
adversarial or perceptual term: LPIPS needs downloaded weights, and a GAN is not worth its
instability at this size.

Checkpoints are atomic and `--resume` continues from the last one; every checkpoint also writes
`<output>/vae` (a diffusers folder, float32) and appends held-out PSNR to `<output>/eval.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ..adapters.atomic import atomic_directory, write_text
from .data.photos import PhotoPatches
from .data.scenes import render, sample_scene
from .metrics import psnr
from .pretrain import build_config, config_parser, scene_batch

HELD_OUT_SEED = 10_000  # scenes for evaluation come from a stream no training step draws from


@dataclass
class AutoencoderConfig:
    output: str = "runs/autoencoder"
    resolution: int = 64
    channels: tuple[int, ...] = (32, 64, 128)  # len - 1 downsamplings: (32, 64, 128) is factor 4
    layers_per_block: int = 1
    latent_channels: int = 4
    photo_fraction: float = 0.5
    batch_size: int = 16
    lr: float = 3e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    grad_weight: float = 0.5
    kl_weight: float = 1e-6
    max_train_steps: int = 20000
    checkpoint_every: int = 100
    eval_images: int = 64
    seed: int = 0
    photos: str = ""  # a folder of your own photographs instead of the bundled ones
    init_from: str = ""  # an AutoencoderKL folder to start from (a fresh optimiser)
    decoder_only: bool = False  # freeze the encoder (and the latent space a backbone was trained on)
    caption_dropout: float = 0.0  # unused by the autoencoder; scene_batch reads it

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if self.resolution % (2 ** (len(self.channels) - 1)):
            raise ValueError(f"resolution {self.resolution} is not divisible by 2^{len(self.channels) - 1}")
        if not 0 <= self.photo_fraction <= 1:
            raise ValueError(f"photo_fraction must be in [0, 1], got {self.photo_fraction}")
        if self.decoder_only and not self.init_from:
            raise ValueError("decoder_only needs init_from: an autoencoder whose encoder to keep")


def make_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL:
    n = len(cfg.channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.channels,
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(32, min(cfg.channels) // 2),
        sample_size=cfg.resolution,
    )


def _gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def autoencoder_loss(vae: AutoencoderKL, x: torch.Tensor, grad_weight: float, kl_weight: float,
                     decoder_only: bool = False) -> tuple[torch.Tensor, dict]:
    """The loss of the module docstring on a batch x in [-1, 1]; a sampled latent, as in training a VAE.
    decoder_only: the encoder is frozen and the decoder sees the latent mean, as a backbone's latents
    are decoded (Stable Diffusion's decoder fine-tuning)."""
    with torch.set_grad_enabled(not decoder_only):
        posterior = vae.encode(x).latent_dist
    x_rec = vae.decode(posterior.mean if decoder_only else posterior.sample()).sample
    rec = F.l1_loss(x_rec, x)
    grad = sum(F.l1_loss(a, b) for a, b in zip(_gradients(x_rec), _gradients(x)))
    kl = posterior.kl().mean() / x[0].numel()
    loss = rec + grad_weight * grad + kl_weight * kl
    return loss, {"rec": rec.item(), "grad": grad.item(), "kl": kl.item()}


def held_out_images(num: int, resolution: int, photos: PhotoPatches | None = None) -> torch.Tensor:
    """`num` held-out scenes (or photo patches, when `photos` is given) in [-1, 1], fixed for every call."""
    if photos is not None:
        return torch.stack([photos[i]["image"] for i in range(num)])
    images = [render(sample_scene(np.random.default_rng([HELD_OUT_SEED, i])), resolution).image for i in range(num)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() * 2 - 1


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Encode to the latent mean and decode, as the diffusion model's inputs and outputs are used."""
    out = []
    for chunk in x.split(batch):
        z = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist.mean
        out.append(vae.decode(z).sample.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def latent_std(vae: AutoencoderKL, x: torch.Tensor, batch: int = 32) -> float:
    z = torch.cat([vae.encode(c.to(vae.device, vae.dtype)).latent_dist.mean.float().cpu() for c in x.split(batch)])
    return float(z.std())


def reconstruction_psnr(vae: AutoencoderKL, x: torch.Tensor) -> float:
    """Mean PSNR (dB) of the reconstructions, images compared in [0, 1] after clamping."""
    rec = reconstruct(vae, x)
    return float(psnr(((rec + 1) / 2).clamp(0, 1), (x + 1) / 2).mean())


def train(cfg: AutoencoderConfig, resume: bool = False) -> Path:
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    photos = PhotoPatches.from_folder(cfg.photos, size=cfg.resolution) if cfg.photos else PhotoPatches.bundled(
        "train", size=cfg.resolution)
    eval_sets = {
        "scenes": held_out_images(cfg.eval_images, cfg.resolution),
        "photos": held_out_images(cfg.eval_images, cfg.resolution,
                                  PhotoPatches.bundled("held-out", size=cfg.resolution, seed=HELD_OUT_SEED)),
    }
    vae = make_autoencoder(cfg).train()
    if cfg.init_from:
        source = AutoencoderKL.from_pretrained(cfg.init_from, torch_dtype=torch.float32, local_files_only=True)
        try:
            vae.load_state_dict(source.state_dict())
        except RuntimeError as e:
            raise ValueError(f"--init-from {cfg.init_from}: not this config's architecture: {e}") from e
        vae.register_to_config(scaling_factor=source.config.scaling_factor)
    if cfg.decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))

    step, ckpt = 0, out / "checkpoint"
    if resume and (ckpt / "state.json").is_file():
        state = torch.load(ckpt / "training_state.pt", weights_only=False)
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step = json.loads((ckpt / "state.json").read_text())["step"]
        print(f"resumed from {ckpt} at step {step}", flush=True)
    elif resume:
        print(f"--resume: no checkpoint in {ckpt}, starting from scratch", flush=True)
    write_text(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    n_params = sum(p.numel() for p in vae.parameters())
    print(f"training a {n_params / 1e6:.2f}M-parameter AutoencoderKL for {cfg.max_train_steps} steps "
          f"of batch {cfg.batch_size}", flush=True)

    t_start, losses = time.time(), []
    while step < cfg.max_train_steps:
        x, _ = scene_batch(cfg, step, photos=photos)
        loss, parts = autoencoder_loss(vae, x, cfg.grad_weight, cfg.kl_weight, cfg.decoder_only)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; last good checkpoint kept in {ckpt}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(parts)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_train_steps:
            vae.eval()
            record = {"step": step, "seconds": round(time.time() - t_start, 1),
                      **{k: float(np.mean([p[k] for p in losses])) for k in losses[0]},
                      **{f"psnr_{k}": reconstruction_psnr(vae, v) for k, v in eval_sets.items()},
                      "latent_std": latent_std(vae, torch.cat(list(eval_sets.values())))}
            vae.train()
            losses = []
            with atomic_directory(ckpt) as tmp:
                torch.save({"vae": vae.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()},
                           tmp / "training_state.pt")
                (tmp / "state.json").write_text(json.dumps(record) + "\n")
            # a frozen encoder keeps its latent space, and so the scaling factor a backbone was trained with
            export_autoencoder(vae, out / "vae", 1 / vae.config.scaling_factor if cfg.decoder_only else record["latent_std"])
            with open(out / "eval.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    return out / "vae"


def export_autoencoder(vae: AutoencoderKL, path: Path, std: float, fp16: bool = False) -> Path:
    """A diffusers AutoencoderKL folder with `scaling_factor = 1 / std` (Stable Diffusion's convention)."""
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    with atomic_directory(path) as tmp:
        if fp16:
            vae.to(torch.float16)
        vae.save_pretrained(tmp, safe_serialization=True)
        if fp16:
            vae.to(torch.float32)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(AutoencoderConfig, "cdd-train-autoencoder", __doc__.split("\n\n")[0])
    args = vars(parser.parse_args(argv))
    resume, dry = args.pop("resume"), args.pop("dry_run")
    cfg = build_config(parser, AutoencoderConfig, args)
    if dry:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    final = train(cfg, resume=resume)
    print(f"autoencoder written to {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
