"""`cdd-pretrain-backbone`: train the embedded default text-to-image backbone on the scenes world.

The "unconditional pretraining" every adapter is distilled from (the CoDi paper's starting point): a
diffusers `UNet2DConditionModel` with cross-attention to a small `CLIPTextModel`, both trained
jointly with the plain diffusion loss, and caption dropout so that the empty prompt is a real
unconditional model. Two kinds:

- pixel (no `--vae`): the UNet works on 64x64 images, a word-level tokenizer;
- latent (`--vae FOLDER`, an AutoencoderKL from `cdd-train-autoencoder`): a miniature Stable
  Diffusion on the frozen autoencoder's latents, a standard `CLIPTokenizer`, and with `--zero-snr`
  a schedule rescaled to zero terminal SNR with trailing timesteps (Lin et al., "Common Diffusion
  Noise Schedules and Sample Steps are Flawed"; needs v-prediction). Its folder loads with plain
  `StableDiffusionPipeline.from_pretrained`. Scenes and photo patches are encoded once into a
  latent pool on disk that grows while training (`--pool-*`), since rendering and encoding a batch
  costs more than the latent UNet's step.

Checkpoints are atomic and `--resume` continues a killed run from the last one: the data stream is
a pure function of (seed, step) (and the pool's chunks of (seed, chunk)), so nothing else needs
restoring but weights, optimiser, EMA and RNG. `--export FOLDER` writes the last checkpoint's EMA
weights as a backbone folder from another process while the run goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ..adapters.atomic import atomic_directory, atomic_file, write_text
from ..runtime.diffusion.backbone import Backbone
from ..runtime.diffusion.denoiser import ConditionedDenoiser
from ..runtime.diffusion.factory import make_text_encoder, make_unet, save_backbone, scheduler_config
from ..runtime.diffusion.samplers import initial_noise, sample_with_scheduler
from ..runtime.diffusion.text import build_clip_tokenizer, build_word_tokenizer
from .checkpoints import CheckpointError, loading, read_state, with_fallback, write_state
from .data.photos import PHOTO_CAPTION, PhotoPatches
from .data.scenes import caption, render, sample_scene, scene_vocabulary

GRID_CAPTIONS = [
    "a red sphere on a checkered floor at noon",
    "a blue cube on a plain floor at sunset",
    "a green cylinder on a striped floor at night",
    "a yellow sphere and a purple cube on a plain floor at noon",
    "a white cube on a checkered floor at sunset",
    "an orange cylinder and a cyan sphere on a striped floor at noon",
    "a pink sphere and a brown cube and a blue cylinder on a plain floor at night",
    "a red cube and a green sphere on a checkered floor at sunset",
]


@dataclass
class PretrainConfig:
    output: str = "runs/backbone"
    resolution: int = 64
    channels: tuple[int, ...] = (32, 64, 128, 128)
    layers_per_block: int = 1
    self_attention_from: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    max_length: int = 24
    prediction_type: str = "v_prediction"
    beta_schedule: str = "squaredcos_cap_v2"
    batch_size: int = 16
    lr: float = 3e-4
    warmup_steps: int = 200
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    ema: float = 0.999
    max_train_steps: int = 3000
    checkpoint_every: int = 100
    sample_every: int = 500
    sample_steps: int = 50
    seed: int = 0
    mixed_precision: str = "no"
    init_from: str = ""  # a backbone folder to start from (continue pretraining with a fresh optimiser)
    vae: str = ""  # an AutoencoderKL folder: train a latent backbone on its latents (copied into the run)
    tokenizer: str = "word"  # word (tokenizer.json) or clip (standard CLIPTokenizer vocab.json + merges.txt)
    zero_snr: bool = False  # rescale the betas to zero terminal SNR, trailing timesteps
    photo_fraction: float = 0.0  # share of photo patches (captioned "a photo") among the scenes
    photos: str = ""  # a folder of your own photographs instead of the bundled ones
    pool_size: int = 65536  # latent backbones: distinct items in the latent pool at most
    pool_start: int = 2048  # items encoded before the first step
    pool_growth: float = 4.0  # items added per training step until pool_size
    pool_chunk: int = 256

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if self.resolution % (2 ** (len(self.channels) - 1)):
            raise ValueError(f"resolution {self.resolution} is not divisible by 2^{len(self.channels) - 1}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type {self.prediction_type!r} is not epsilon, v_prediction or sample")
        if self.zero_snr and self.prediction_type == "epsilon":
            raise ValueError("zero_snr needs prediction_type v_prediction or sample: at alpha_T = 0 epsilon says nothing of x")
        if self.tokenizer not in ("word", "clip"):
            raise ValueError(f"tokenizer must be 'word' or 'clip', got {self.tokenizer!r}")
        if not 0 <= self.photo_fraction <= 1:
            raise ValueError(f"photo_fraction must be in [0, 1], got {self.photo_fraction}")
        if self.vae and not (Path(self.vae) / "config.json").is_file():
            raise ValueError(f"vae {self.vae!r} is not an AutoencoderKL folder (no config.json)")


def mixed_images(rng: np.random.Generator, n: int, resolution: int, photos: PhotoPatches | None = None,
                 photo_fraction: float = 0.0) -> tuple[np.ndarray, list[str]]:
    """n items, each a photo patch with p = photo_fraction (when `photos` is given), else a rendered scene
    with its caption; images float32 [n, H, W, 3] in [0, 1]."""
    photo_fraction = photo_fraction if photos is not None else 0.0
    images, texts = [], []
    for _ in range(n):
        if photo_fraction and rng.random() < photo_fraction:
            images.append(photos.patch(rng))
            texts.append(photos.caption)
        else:
            spec = sample_scene(rng)
            images.append(render(spec, resolution).image)
            texts.append(caption(spec))
    return np.stack(images), texts


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() * 2 - 1


def scene_batch(cfg, step: int, rank: int = 0, photos: PhotoPatches | None = None) -> tuple[torch.Tensor, list[str]]:
    """Batch `step` of the stream: a pure function of (seed, step, rank), so a resumed run sees the
    same data an uninterrupted one would. Images in [-1, 1]; captions dropped to "" with
    p = `cfg.caption_dropout`."""
    rng = np.random.default_rng([cfg.seed, step, rank])
    photo_fraction = getattr(cfg, "photo_fraction", 0.0) if photos is not None else 0.0
    images, texts = [], []
    for _ in range(cfg.batch_size):
        image, (text,) = mixed_images(rng, 1, cfg.resolution, photos, photo_fraction)
        images.append(image[0])
        texts.append("" if rng.random() < cfg.caption_dropout else text)
    return _to_tensor(np.stack(images)), texts


class LatentPool:
    """Scenes and photo patches encoded once by the frozen autoencoder (latent mean x scaling factor),
    in chunks of `cfg.pool_chunk` items saved under `folder`; chunk c is a pure function of (seed, c).
    The pool grows with the step (`available`), so training starts at once and sees ever more items."""

    def __init__(self, folder: Path, backbone: Backbone, cfg: PretrainConfig, photos: PhotoPatches | None):
        self.folder, self.backbone, self.cfg, self.photos = folder, backbone, cfg, photos
        self.latents: list[torch.Tensor] = []
        self.texts: list[str] = []
        folder.mkdir(parents=True, exist_ok=True)

    def available(self, step: int) -> int:
        cfg = self.cfg
        n = min(cfg.pool_size, cfg.pool_start + int(step * cfg.pool_growth))
        return max(cfg.pool_chunk, n // cfg.pool_chunk * cfg.pool_chunk)

    def _chunk(self, c: int) -> dict:
        path = self.folder / f"chunk_{c:05d}.pt"
        if path.is_file():
            return torch.load(path)
        rng = np.random.default_rng([self.cfg.seed, 1_000_003, c])
        images, texts = mixed_images(rng, self.cfg.pool_chunk, self.cfg.resolution, self.photos, self.cfg.photo_fraction)
        with torch.no_grad():
            latents = torch.cat([self.backbone.to_model_space(x).float() for x in _to_tensor(images).split(64)])
        chunk = {"latents": latents.half(), "texts": texts}
        with atomic_file(path) as f:
            torch.save(chunk, f)
        return chunk

    def batch(self, step: int, batch_size: int, caption_dropout: float) -> tuple[torch.Tensor, list[str]]:
        n = self.available(step)
        while len(self.texts) < n:
            chunk = self._chunk(len(self.texts) // self.cfg.pool_chunk)
            self.latents.append(chunk["latents"])
            self.texts.extend(chunk["texts"])
        if len(self.latents) > 1:
            self.latents = [torch.cat(self.latents)]
        rng = np.random.default_rng([self.cfg.seed, step])
        idx = rng.integers(0, n, batch_size)
        texts = ["" if rng.random() < caption_dropout else self.texts[i] for i in idx]
        return self.latents[0][torch.from_numpy(idx)].float(), texts


def build_backbone(cfg: PretrainConfig, vae: AutoencoderKL | None = None) -> Backbone:
    torch.manual_seed(cfg.seed)
    vocabulary = scene_vocabulary() + (PHOTO_CAPTION.split() if cfg.photo_fraction else [])
    if cfg.tokenizer == "clip":
        tokenizer = build_clip_tokenizer(vocabulary, max_length=cfg.max_length)
    else:
        tokenizer = build_word_tokenizer(vocabulary, max_length=cfg.max_length)
    sched = scheduler_config(cfg.prediction_type)
    sched["beta_schedule"] = cfg.beta_schedule
    if cfg.zero_snr:
        sched.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    size, channels = cfg.resolution, 3
    if vae is not None:
        size, channels = cfg.resolution // 2 ** (len(vae.config.block_out_channels) - 1), vae.config.latent_channels
    return Backbone(
        unet=make_unet(size, channels, cfg.channels, cfg.text_hidden, cfg.layers_per_block, 8, cfg.self_attention_from),
        scheduler_config=sched,
        text_encoder=make_text_encoder(len(tokenizer), cfg.max_length, cfg.text_hidden, cfg.text_layers,
                                       tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id),
        tokenizer=tokenizer,
        vae=vae,
    )


@torch.no_grad()
def sample_grid(backbone: Backbone, captions: list[str], steps: int, seed: int = 0) -> np.ndarray:
    """50-step DDIM samples for fixed captions, one row of images, uint8 HxWx3."""
    denoiser = ConditionedDenoiser(backbone.unet, backbone.schedule)
    text = backbone.encode_text(captions)
    size, channels = backbone.unet.config.sample_size, backbone.model_channels
    z = initial_noise(range(seed, seed + len(captions)), (channels, size, size), backbone.device, backbone.dtype)
    z = sample_with_scheduler(denoiser.bind(None, text), z, steps, backbone.schedule, backbone.scheduler_config, "ddim")
    x = backbone.from_model_space(z)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return np.concatenate(list(x), axis=1)


def _tokens(backbone: Backbone, texts: list[str], device) -> torch.Tensor:
    return backbone.tokenizer(
        texts, padding="max_length", max_length=backbone.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def train(cfg: PretrainConfig, resume: bool = False) -> Path:
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel
    from PIL import Image
    from tqdm.auto import tqdm

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with="tensorboard", project_dir=str(out / "logs"))
    backbone = build_backbone(cfg, _run_vae(cfg, out))
    photos = None
    if cfg.photo_fraction:
        photos = (PhotoPatches.from_folder(cfg.photos, size=cfg.resolution) if cfg.photos
                  else PhotoPatches.bundled("train", size=cfg.resolution))
    pool = None
    if backbone.latent:
        backbone.vae.to(accelerator.device)
        pool = LatentPool(out / "pool", backbone, cfg, photos)
    init_record = _init_from(backbone, Path(cfg.init_from)) if cfg.init_from else {}
    unet, text_encoder = backbone.unet, backbone.text_encoder
    for m in (unet, text_encoder):
        m.requires_grad_(True).train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    ema = EMAModel(params, decay=cfg.ema, use_ema_warmup=True, power=2 / 3)
    unet, text_encoder, optimizer, scheduler = accelerator.prepare(unet, text_encoder, optimizer, scheduler)

    step, ckpt, seconds_before = 0, out / "checkpoint", 0.0
    if resume and (ckpt / "state.json").is_file():
        try:  # sha256 of every file first (state.json records them), then each part names itself on failure
            previous = read_state(ckpt)
            step, seconds_before = previous["step"], previous.get("seconds", 0.0)
            state = loading(ckpt, "training_state.pt", lambda: torch.load(ckpt / "training_state.pt", weights_only=False))
            loading(ckpt, "training_state.pt (unet)", lambda: accelerator.unwrap_model(unet).load_state_dict(state["unet"]))
            loading(ckpt, "training_state.pt (text_encoder)",
                    lambda: accelerator.unwrap_model(text_encoder).load_state_dict(state["text_encoder"]))
            loading(ckpt, "training_state.pt (optimizer)", lambda: optimizer.load_state_dict(state["optimizer"]))
            loading(ckpt, "training_state.pt (scheduler)", lambda: scheduler.load_state_dict(state["scheduler"]))
            loading(ckpt, "training_state.pt (ema)", lambda: ema.load_state_dict(state["ema"]))
            loading(ckpt, "training_state.pt (torch_rng)", lambda: torch.set_rng_state(state["torch_rng"]))
        except CheckpointError as e:
            raise with_fallback(e, []) from e.__cause__  # one checkpoint is kept: there is no older one
        accelerator.print(f"resumed from {ckpt} at step {step}")
    elif init_record.get("step"):  # continue the source's step count: the data stream and images seen go on
        step, seconds_before = int(init_record["step"]), float(init_record.get("seconds") or 0.0)
        if step >= cfg.max_train_steps:
            raise ValueError(f"--init-from {cfg.init_from} is at step {step}, not below --max-train-steps {cfg.max_train_steps}")
        accelerator.print(f"continuing {cfg.init_from} from its step {step} with a fresh optimiser")
    elif resume:
        accelerator.print(f"--resume: no checkpoint in {ckpt}, starting from scratch")
    write_text(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    accelerator.init_trackers("pretrain", config={k: str(v) for k, v in dataclasses.asdict(cfg).items()})
    schedule = backbone.schedule
    n_params = sum(p.numel() for p in params)
    accelerator.print(f"training {n_params / 1e6:.2f}M parameters for {cfg.max_train_steps} steps of batch {cfg.batch_size}")

    bar = tqdm(total=cfg.max_train_steps, initial=step, disable=not accelerator.is_local_main_process, desc="pretrain")
    t_start, steps_timed = time.time(), 0
    while step < cfg.max_train_steps:
        if pool is not None:
            x, texts = pool.batch(step, cfg.batch_size, cfg.caption_dropout)
        else:
            x, texts = scene_batch(cfg, step, accelerator.process_index, photos)
        x = x.to(accelerator.device)
        eps = torch.randn_like(x)
        t = torch.randint(0, schedule.num_train_timesteps, (x.shape[0],), device=x.device)
        z_t = schedule.add_noise(x, eps, t)  # eq. 1
        with accelerator.autocast():
            text_emb = text_encoder(_tokens(backbone, texts, x.device))[0]
            out_ = unet(z_t, t, encoder_hidden_states=text_emb).sample
            loss = F.mse_loss(out_.float(), schedule.target(x, eps, t).float())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; last good checkpoint kept in {ckpt}")
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        step += 1
        steps_timed += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        accelerator.log({"loss": loss.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}, step=step)
        if steps_timed == 5:
            per = (time.time() - t_start) / 5
            accelerator.print(f"{per:.2f} s/step; about {per * (cfg.max_train_steps - step) / 60:.0f} min to go")
        if accelerator.is_main_process and (step % cfg.checkpoint_every == 0 or step == cfg.max_train_steps):
            with atomic_directory(ckpt) as tmp:
                torch.save(
                    {
                        "unet": accelerator.unwrap_model(unet).state_dict(),
                        "text_encoder": accelerator.unwrap_model(text_encoder).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "ema": ema.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                    },
                    tmp / "training_state.pt",
                )
                write_state(tmp, {"step": step, "loss": loss.item(), "seconds": round(seconds_before + time.time() - t_start, 1)})
        if accelerator.is_main_process and (step % cfg.sample_every == 0 or step == cfg.max_train_steps):
            with _ema_weights(ema, params):
                grid = sample_grid(_eval_view(backbone), GRID_CAPTIONS, cfg.sample_steps)
            (out / "samples").mkdir(exist_ok=True)
            Image.fromarray(grid).save(out / "samples" / f"step_{step:06d}.png")
    bar.close()
    accelerator.end_training()

    final = out / "backbone"
    if accelerator.is_main_process:
        with _ema_weights(ema, params):
            save_backbone(_eval_view(backbone), final, fp16=True)
    return final


def _run_vae(cfg: PretrainConfig, out: Path) -> AutoencoderKL | None:
    """The frozen autoencoder of a latent run: `cfg.vae` is copied into the run folder on the first
    start, so that the pool, a resumed run and every export use the same weights even if the
    autoencoder's own run goes on."""
    if not cfg.vae:
        return None
    run_vae = out / "vae"
    if not run_vae.is_dir():
        with atomic_directory(run_vae) as tmp:
            for f in Path(cfg.vae).iterdir():
                if f.is_file():
                    shutil.copyfile(f, tmp / f.name)
    return AutoencoderKL.from_pretrained(run_vae, torch_dtype=torch.float32, local_files_only=True)


def export(output: str | Path, dest: str | Path) -> Path:
    """Write the EMA weights of `output`'s last checkpoint as a float16 backbone folder at `dest`, with a
    training.json (step, images seen, seconds); safe to run while the run goes on (checkpoints are atomic)."""
    from diffusers.training_utils import EMAModel

    output, dest = Path(output), Path(dest)
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    saved = {k: v for k, v in json.loads((output / "config.json").read_text()).items() if k in fields}
    if saved.get("vae"):
        saved["vae"] = str(output / "vae")
    cfg = PretrainConfig(**saved)
    ckpt = output / "checkpoint"
    if not (ckpt / "state.json").is_file():
        raise FileNotFoundError(f"no checkpoint in {ckpt} to export")
    state = torch.load(ckpt / "training_state.pt", weights_only=False)
    info = json.loads((ckpt / "state.json").read_text())
    backbone = build_backbone(cfg, _run_vae(cfg, output))
    params = list(backbone.unet.parameters()) + list(backbone.text_encoder.parameters())
    ema = EMAModel(params, decay=cfg.ema, use_ema_warmup=True, power=2 / 3)
    ema.load_state_dict(state["ema"])
    ema.copy_to(params)
    notes = (dest / "TRAINING.md").read_text() if (dest / "TRAINING.md").is_file() else None
    save_backbone(backbone, dest, fp16=True)
    if notes is not None:  # the hand-written record of how it was made survives a new snapshot
        write_text(dest / "TRAINING.md", notes)
    record = {"step": info["step"], "images_seen": info["step"] * cfg.batch_size, "seconds": info.get("seconds"),
              "last_loss": info.get("loss")}
    write_text(dest / "training.json", json.dumps(record, indent=2) + "\n")
    return dest


def _init_from(backbone: Backbone, folder: Path) -> dict:
    """Start from an existing backbone's weights (same architecture), e.g. the shipped default; returns
    the folder's training.json record (step, images seen, seconds) when it has one, else {}."""
    from ..runtime.diffusion.backbone import load_backbone

    source = load_backbone(folder)
    for name in ("unet", "text_encoder"):
        target = getattr(backbone, name)
        try:
            target.load_state_dict(getattr(source, name).state_dict())
        except RuntimeError as e:
            raise ValueError(f"--init-from {folder}: its {name} does not match this config's architecture: {e}") from e
    if source.tokenizer.get_vocab() != backbone.tokenizer.get_vocab():
        raise ValueError(f"--init-from {folder}: its tokenizer vocabulary differs from the scenes vocabulary")
    record = folder / "training.json"
    return json.loads(record.read_text()) if record.is_file() else {}


def _eval_view(backbone: Backbone) -> Backbone:
    backbone.unet.eval()
    backbone.text_encoder.eval()
    return backbone


class _ema_weights:
    """Temporarily swap the EMA weights into the live parameters."""

    def __init__(self, ema, params):
        self.ema, self.params = ema, params

    def __enter__(self):
        self.ema.store(self.params)
        self.ema.copy_to(self.params)

    def __exit__(self, *exc):
        self.ema.restore(self.params)
        for p in self.params:
            p.requires_grad_(True)
        return False


def config_parser(config_class, prog: str, description: str) -> argparse.ArgumentParser:
    """One flag per field of a config dataclass (tuples comma-separated, booleans --x/--no-x), plus
    --resume and --dry-run."""
    defaults = config_class()
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=f"default {value}")
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=lambda s: tuple(int(v) for v in s.split(",")), default=value,
                                help=f"comma-separated (default {','.join(map(str, value))})")
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"default {value}")
    parser.add_argument("--resume", action="store_true", help="continue from <output>/checkpoint")
    parser.add_argument("--dry-run", action="store_true", help="print the validated config and exit")
    return parser


def build_config(parser: argparse.ArgumentParser, config_class, args: dict):
    """The validated config, or the parser's usage error naming what is wrong."""
    try:
        return config_class(**args)
    except ValueError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(PretrainConfig, "cdd-pretrain-backbone", __doc__.split("\n\n")[0])
    parser.add_argument("--export", metavar="FOLDER", default="",
                        help="write <output>'s last checkpoint (EMA weights, float16) as a backbone folder and exit")
    args = vars(parser.parse_args(argv))
    resume, dry, export_to = args.pop("resume"), args.pop("dry_run"), args.pop("export")
    if export_to:
        print(f"exported to {export(args['output'], export_to)}")
        return 0
    cfg = build_config(parser, PretrainConfig, args)
    if dry:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        return 0
    try:
        final = train(cfg, resume=resume)
    except (CheckpointError, ValueError) as e:  # each names what is wrong
        print(f"cdd-pretrain-backbone: {e}", file=sys.stderr)
        return 2
    print(f"backbone written to {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
