"""cdd-train-fidelity: train a super-resolution entry's fidelity module (adapters/fidelity.py) on the entry's
own served outputs, and install it into the entry.

    cdd-train-fidelity --entry adapters/embedded/zoo/super-resolution --output runs/fidelity --resume
    cdd-train-fidelity --entry adapters/embedded/zoo/super-resolution --output runs/fidelity --install DEST

1. The pool (`<output>/pool/chunk-NNN.pt`, made once, chunk by chunk, so a stopped run resumes): samples of the
   super-resolution training stream (`photo_fraction` of them patches of the bundled training photographs at
   random scales, the rest scenes; every held-out photograph stays out), each degraded by one of the presets
   (default: `mild-64px`, what the entries are trained on, and `bicubic`, a photograph that was only made
   smaller), and the entry's served output for it: its default sampler (ILVR's step included) at a step count
   drawn from `--pool-steps`, no prompt, as a user sends it. The module learns from what the sampler really
   returns, as StableSR trains its fidelity wrapper on the diffusion model's own latents: trained on the
   autoencoder's round trips of the truth instead, it would learn to trust details the sampler invents.
   `--sampler` picks another servable super-resolution sampler (the one the entry will serve with); the pool's
   settings are kept beside it (`pool/settings.json`) and a pool made with other settings is refused.
2. Training: L1 between y + R(y, c) and the truth (w = 1; `--pixel-loss rmse`: the root of the batch's mean
   squared error, the error PSNR counts, at the L1's scale so `--flat-weight` keeps its meaning; `l1+rmse`: their
   mean), random flips and quarter turns of all three images
   together, AdamW; a checkpoint every `--checkpoint-every` steps (atomic; `--resume` continues the newest).
   `--flat-weight` adds the L1 of the error's high frequencies where the truth is flat (`flat_error`): speckle
   on a patch of sky is a small share of a per-pixel loss and the most visible thing the decoder invents.
3. `--install DEST`: the entry copied to DEST with `fidelity.safetensors` and the manifest's `fidelity`
   (architecture, default weight, the run's settings), hashed like its other files.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..adapters.atomic import atomic_file
from ..adapters.fidelity import FidelityNet
from .checkpoints import StopSignals
from .metrics import FLAT_STD, HF_SIGMA, flat_mask, gaussian_blur, luminance, psnr

POOL_CHUNK = 256
DEFAULT_PRESETS = ("mild-64px", "bicubic")


class FidelityError(ValueError):
    """A setting or file that cannot be used, with what is wrong."""


class FidelityInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped training after the step in progress, with a checkpoint of that step: the module is
    not finished, so nothing is installed."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        import signal

        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint {checkpoint}; nothing installed; "
                         "run the same command with --resume to continue")


def _save(obj, path: Path) -> None:
    with atomic_file(path) as f:
        torch.save(obj, f)


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 (what the service returns and the pool stores)."""
    return ((x.float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def _from_u8(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1


def pool_items(k0: int, n: int, seed: int, presets: tuple[str, ...], photo_fraction: float, size: int) -> dict:
    """Training pairs k0 .. k0 + n - 1: item k is degraded with presets[k % len(presets)] (its own stream)."""
    from .data.datasets import ScenesDataset
    from .data.degradations import degradation_preset

    streams = [ScenesDataset("super-resolution", size=size, seed=seed + 7919 * j, sr_caption=False,
                             degradation=degradation_preset(p), photo_fraction=photo_fraction)
               for j, p in enumerate(presets)]
    items = [streams[k % len(presets)].sample(k) for k in range(k0, k0 + n)]
    return {"condition": torch.stack([s["condition"] for s in items]), "target": torch.stack([s["target"] for s in items])}


def make_pool(entry: Path, backbone_dir: Path | None, out: Path, size: int, seed: int, presets: tuple[str, ...],
              photo_fraction: float, steps_choices: tuple[int, ...], batch_size: int, log=print,
              sampler: str | None = None) -> list[Path]:
    """Write the pool's missing chunks; returns every chunk's path. `sampler`: the one the outputs are sampled with
    (default: the entry's manifest sampler)."""
    from ..adapters.zoo import Manifest
    from ..runtime.diffusion.backbone import load_backbone
    from ..runtime.diffusion.samplers import servable_samplers
    from .evaluate import Candidate, entry_model, generate

    manifest = Manifest.from_file(entry / "manifest.json")
    if manifest.task != "super-resolution":
        raise FidelityError(f"{entry} is a {manifest.task} entry; the fidelity module is for super-resolution")
    sampler = sampler or manifest.sampler
    if sampler not in servable_samplers("super-resolution"):
        raise FidelityError(f"--sampler {sampler!r} is not a super-resolution sampler; choose one of "
                            f"{', '.join(servable_samplers('super-resolution'))}")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"entry": manifest.name, "sampler": sampler, "seed": seed, "presets": list(presets),
                "photo_fraction": photo_fraction, "steps": list(steps_choices)}
    settings_file = out / "settings.json"
    if settings_file.exists():
        made = json.loads(settings_file.read_text())
        if made != settings:
            changed = sorted(k for k in settings if made.get(k) != settings[k])
            raise FidelityError(f"the pool in {out} was made with other settings ({', '.join(f'{k}: {made.get(k)!r}' for k in changed)}"
                                f"; this run: {', '.join(f'{k}: {settings[k]!r}' for k in changed)}); give a new --output")
    elif any(out.glob("chunk-*.pt")):
        raise FidelityError(f"{out} holds pool chunks without their settings.json; give a new --output")
    else:
        with atomic_file(settings_file) as f:
            f.write((json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())
    chunks = [out / f"chunk-{i:03d}.pt" for i in range(math.ceil(size / POOL_CHUNK))]
    missing = [i for i, c in enumerate(chunks) if not c.exists()]
    if not missing:
        return chunks
    from ..adapters.zoo import default_backbone_dir

    backbone = load_backbone(backbone_dir or default_backbone_dir())
    resolution = int(manifest.condition["resolution"])
    candidate = Candidate(manifest.name, entry, manifest, [sampler])
    with entry_model(candidate, backbone, 0) as model:
        for i in missing:
            t0 = time.perf_counter()
            n = min(POOL_CHUNK, size - i * POOL_CHUNK)
            data = pool_items(i * POOL_CHUNK, n, seed, presets, photo_fraction, resolution)
            text = backbone.encode_text([""] * n)
            rng = np.random.default_rng([seed, i, 2])
            outputs, steps = [], []
            for a in range(0, n, batch_size):  # one step count per batch, drawn per batch
                k = int(rng.choice(steps_choices))
                part = {"condition": data["condition"][a : a + batch_size]}
                images, _ = generate(model, backbone, part, text[a : a + batch_size], sampler, k,
                                     seed * 100_003 + i * POOL_CHUNK + a, batch_size)
                outputs.append(images)
                steps += [k] * images.shape[0]
            _save({"condition": (data["condition"] * 255).round().to(torch.uint8), "target": _to_u8(data["target"]),
                   "output": (torch.cat(outputs) * 255).round().to(torch.uint8), "steps": torch.tensor(steps)}, chunks[i])
            log(f"pool chunk {i + 1}/{len(chunks)}: {n} samples in {time.perf_counter() - t0:.1f} s")
    return chunks


def load_pool(chunks: list[Path]) -> dict[str, torch.Tensor]:
    parts = [torch.load(c, weights_only=True) for c in chunks]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def augment(batch: list[torch.Tensor], g: torch.Generator) -> list[torch.Tensor]:
    """The same random flip and quarter turn of every tensor in `batch` ([B, C, H, W], square)."""
    turns = int(torch.randint(4, (1,), generator=g))
    flip = bool(torch.randint(2, (1,), generator=g))
    out = []
    for x in batch:
        x = torch.rot90(x, turns, dims=(-2, -1))
        out.append(torch.flip(x, dims=(-1,)) if flip else x)
    return out


def flat_error(out: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """The mean absolute high-frequency error of the luminance over the pixels where the truth is flat (both
    [B, 3, H, W] in [-1, 1]): |HP(Y_out - Y_truth)| with HP = 1 - G_sigma, on `metrics.flat_mask(truth)`, the
    regions and the high-pass `metrics.flat_hf_energy` measures; 0 for a batch with no flat pixel."""
    mask = flat_mask((truth.detach() + 1) / 2, FLAT_STD).float()
    d = luminance(out) - luminance(truth)
    hf = (d - gaussian_blur(d, HF_SIGMA)).abs()
    return (hf * mask).sum() / mask.sum().clamp_min(1.0)


PIXEL_LOSSES = ("l1", "rmse", "l1+rmse")


def pixel_error(out: torch.Tensor, truth: torch.Tensor, kind: str) -> torch.Tensor:
    """The per-pixel term: "l1" the mean absolute error (its minimiser a median, which keeps an uncertain edge
    sharp); "rmse" the root of the mean squared error (its minimiser the mean, which PSNR rewards: an edge whose
    place the input does not fix comes out as soft as the uncertainty), the root so its size is the L1's;
    "l1+rmse" their mean (measured: rmse alone raises PSNR and lowers SSIM, docs/results.md)."""
    if kind == "l1":
        return F.l1_loss(out, truth)
    rmse = F.mse_loss(out, truth).clamp_min(1e-12).sqrt()
    return rmse if kind == "rmse" else 0.5 * (F.l1_loss(out, truth) + rmse)


def train(pool: dict[str, torch.Tensor], out: Path, *, steps: int, batch_size: int, lr: float, seed: int,
          checkpoint_every: int, architecture: dict, resume: bool, holdout: int | None = None, flat_weight: float = 0.0,
          pixel_loss: str = "l1", log=print) -> Path:
    """Train R on the pool (its last `holdout` samples, default an eighth up to 256, kept for validation); returns
    the final checkpoint. `pixel_loss`: one of PIXEL_LOSSES (`pixel_error`); `flat_weight`: the weight of `flat_error`
    beside it. SIGINT / SIGTERM: the step in
    progress is finished, checkpointed, and `FidelityInterrupted` raised."""
    if pixel_loss not in PIXEL_LOSSES:
        raise FidelityError(f"pixel loss {pixel_loss!r}: choose from {', '.join(PIXEL_LOSSES)}")
    out.mkdir(parents=True, exist_ok=True)
    n = pool["target"].shape[0]
    holdout = min(256, n // 8) if holdout is None else holdout
    if n <= holdout + batch_size:
        raise FidelityError(f"the pool has {n} samples: too few for a validation set of {holdout} and batch {batch_size}")
    torch.manual_seed(seed)
    net = FidelityNet(**architecture)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    step, history = 0, []
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["architecture"] != architecture:
            raise FidelityError(f"{ckpt} is of architecture {state['architecture']}, not {architecture}")
        if state.get("flat_weight", 0.0) != flat_weight:  # one run, one objective
            raise FidelityError(f"{ckpt} was trained with --flat-weight {state.get('flat_weight', 0.0):g}, not "
                                f"{flat_weight:g}; resume with the same weight or give a new --output")
        if state.get("pixel_loss", "l1") != pixel_loss:
            raise FidelityError(f"{ckpt} was trained with --pixel-loss {state.get('pixel_loss', 'l1')}, not {pixel_loss}; "
                                "resume with the same loss or give a new --output")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
        step, history = state["step"], state["history"]
        log(f"resumed at step {step}")
    val = {k: v[n - holdout :] for k, v in pool.items()}
    train_n = n - holdout

    def validate() -> dict:
        net.eval()
        with torch.no_grad():
            y, c, x = _from_u8(val["output"]), val["condition"].float() / 127.5 - 1, _from_u8(val["target"])
            fixed = torch.cat([net(y[a : a + 64], c[a : a + 64]) for a in range(0, holdout, 64)])
        net.train()
        truth = (x + 1) / 2  # training/metrics.psnr takes images in [0, 1]
        return {"psnr_output": float(psnr((y + 1) / 2, truth).mean()), "psnr_bicubic": float(psnr((c + 1) / 2, truth).mean()),
                "psnr_fixed": float(psnr((fixed.clamp(-1, 1) + 1) / 2, truth).mean())}

    def checkpoint() -> None:
        _save({"model": net.state_dict(), "optimizer": opt.state_dict(), "generator": g.get_state(), "step": step,
               "history": history, "architecture": architecture, "flat_weight": flat_weight,
               "pixel_loss": pixel_loss}, ckpt)

    stop = StopSignals()
    t0 = time.perf_counter()
    with stop:
        while step < steps and stop.signal is None:
            idx = torch.randint(train_n, (batch_size,), generator=g)
            y, c, x = augment([_from_u8(pool["output"][idx]), pool["condition"][idx].float() / 127.5 - 1,
                               _from_u8(pool["target"][idx])], g)
            lr_now = lr * min(1.0, (step + 1) / min(100, steps // 10 + 1)) * 0.5 * (1 + math.cos(math.pi * step / steps))
            for group in opt.param_groups:
                group["lr"] = lr_now
            fixed = net(y, c)
            loss = pixel_error(fixed, x, pixel_loss)
            if flat_weight:
                loss = loss + flat_weight * flat_error(fixed, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            step += 1
            if step % checkpoint_every == 0 or step == steps:
                v = validate()
                history.append({"step": step, "loss": loss.item(), **v, "seconds": time.perf_counter() - t0})
                checkpoint()
                log(f"step {step}: loss {loss.item():.4f}, validation PSNR output {v['psnr_output']:.2f} / bicubic "
                    f"{v['psnr_bicubic']:.2f} / fixed {v['psnr_fixed']:.2f} dB")
    if stop.signal is not None:
        checkpoint()
        log(f"stopped by a signal at step {step}; checkpoint written, --resume continues")
        raise FidelityInterrupted(stop.signal, step, ckpt)
    return ckpt


def install(entry: Path, checkpoint: Path, dest: Path, default: float, settings: dict) -> Path:
    """`entry` copied to `dest` with the trained module (atomically, hashed like the entry's other files)."""
    from ..adapters.zoo import add_fidelity

    state = torch.load(checkpoint, weights_only=False)
    net = FidelityNet(**state["architecture"])
    net.load_state_dict(state["model"])
    return add_fidelity(entry, dest, net, default=default,
                        training={**settings, "step": state["step"], "validation": state["history"][-1:]})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cdd-train-fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--entry", type=Path, required=True, help="the super-resolution zoo entry whose outputs it corrects")
    p.add_argument("--backbone", type=Path, default=None, help="the backbone folder (default: the embedded one)")
    p.add_argument("--output", type=Path, required=True, help="the run folder (pool/, checkpoint.pt, log)")
    p.add_argument("--pool-size", type=int, default=4096)
    p.add_argument("--pool-steps", default="1,2,4", help="step counts the pool's outputs are sampled at (drawn per batch)")
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="degradation presets, comma-separated")
    p.add_argument("--photo-fraction", type=float, default=0.75)
    p.add_argument("--sampler", default=None, help="the sampler the pool's outputs are made with (default: the entry's; "
                   "the one it will serve with)")
    p.add_argument("--flat-weight", type=float, default=0.0,
                   help="weight of the high-frequency error on the truth's flat regions beside the L1 (default 0)")
    p.add_argument("--pixel-loss", choices=PIXEL_LOSSES, default="l1",
                   help="the per-pixel term: l1 (default), rmse (the root of the mean squared error) or l1+rmse (their mean)")
    p.add_argument("--max-train-steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--resume", action="store_true", help="continue the run in --output")
    p.add_argument("--install", type=Path, default=None, help="write the entry with the trained module here")
    p.add_argument("--fidelity-default", type=float, default=1.0, help="the weight w served when a request gives none")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .data.degradations import DEGRADATION_PRESETS

    try:
        presets = tuple(s for s in args.presets.split(",") if s)
        unknown = [s for s in presets if s not in DEGRADATION_PRESETS]
        if unknown or not presets:
            raise FidelityError(f"--presets: unknown {unknown}; choose from {', '.join(DEGRADATION_PRESETS)}")
        steps_choices = tuple(int(s) for s in args.pool_steps.split(","))
        if not args.entry.is_dir():
            raise FidelityError(f"--entry {args.entry} is not a zoo entry folder")
        if args.install is not None and args.install.exists():  # found now, not after the training
            raise FidelityError(f"--install {args.install} already exists; give a folder that does not")
        if not args.flat_weight >= 0:
            raise FidelityError(f"--flat-weight must be >= 0, got {args.flat_weight}")
        if not 0 <= args.fidelity_default <= 1:
            raise FidelityError(f"--fidelity-default must be in [0, 1], got {args.fidelity_default}")
        args.output.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("install",)}
        logf = open(args.output / "log.txt", "a")

        def log(msg: str) -> None:
            print(msg, flush=True)
            logf.write(msg + "\n")
            logf.flush()

        chunks = make_pool(args.entry, args.backbone, args.output / "pool", args.pool_size, args.seed, presets,
                           args.photo_fraction, steps_choices, 32, log, sampler=args.sampler)
        ckpt = train(load_pool(chunks), args.output, steps=args.max_train_steps, batch_size=args.batch_size, lr=args.lr,
                     seed=args.seed, checkpoint_every=args.checkpoint_every,
                     architecture={"width": args.width, "blocks": args.blocks, "head": 32}, resume=args.resume,
                     flat_weight=args.flat_weight, pixel_loss=args.pixel_loss, log=log)
        (args.output / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        if args.install is not None:
            dest = install(args.entry, ckpt, args.install, args.fidelity_default, settings)
            log(f"installed {dest}")
    except FidelityError as e:
        print(f"cdd-train-fidelity: {e}", file=sys.stderr)
        return 2
    except FidelityInterrupted as e:  # the step in progress was finished and saved; an unfinished module is not installed
        print(f"cdd-train-fidelity: {e}", file=sys.stderr)
        return 128 + e.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
