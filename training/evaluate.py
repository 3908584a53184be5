"""`cdd-eval`: measure zoo adapters per (method, sampler, steps), as Table 1 and Figure 5 of the CoDi paper.

    cdd-eval --task depth --adapters codi=runs/depth/entry,finetune=runs/depth-ft/entry --steps 1,2,4

Held-out data: the first N samples of the scenes world drawn with EVAL_SEED = 20261125, a seed no
training run uses by default (training streams use seed 0, their validation grids seed 1; `--data-seed` draws
another stream, e.g. 7, a tuning stream to choose a setting on before it is measured on the held-out one); for
super-resolution, `--dataset photos` takes N patches of the held-out photographs instead (astronaut,
chelsea, flower; positions from EVAL_SEED), degraded with `--degradation` (default realesrgan, the
published settings). Every adapter, sampler and step count sees the same N conditions, the same prompts
(`--prompt`: the ground-truth captions, or none, the empty prompt the API sends when a user gives none;
super-resolution's default is none) and the same initial noise (image i from seed --seed + i), so rows are
comparable. `--bicubic` (super-resolution) adds the row every SR method must beat: the low-resolution input
upsampled bicubically, which is the condition itself. A sampler `NAME+ilvr` (super-resolution) runs the
few-step sampler NAME with the ILVR consistency step (runtime/diffusion/samplers.py `ilvr`), `NAME+ilvr-out`
with ILVR's update on the decoded output only (`ilvr_output`). Generated and ground-truth images are quantised to 8 bits (what a saved PNG
holds) before measuring: PSNR, SSIM and the sliced Wasserstein distance (training/metrics.py) always;
LPIPS and FID through torchmetrics only when their weights are already on this disk (nothing is
downloaded). Depth and edit rows also say whether the output follows its condition (training/condition_metrics.py:
edges against the depth map; PSNR inside and outside the region the edit changes), beside reference rows
cdd-eval always writes for them (depth: the ground-truth renders, the ceiling; edit: the unedited source). seconds_per_image is the wall clock of sampling only (the k sampler steps and decoding,
text embeddings precomputed), divided by N.

Outputs in --out: results.json, results.md (the table), plot_<metric>.png (metric against steps, one
line per method and sampler), grid.png (condition | each row's samples | ground truth, for the first
GRID_EXAMPLES examples) and images/ (the per-row samples the grid is rebuilt from on --append).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..adapters.zoo import (
    MANIFEST,
    Manifest,
    ZooError,
    default_backbone_dir,
    default_zoo_dir,
    load_entry,
    load_fidelity,
    verify_entry,
)
from ..runtime.diffusion import samplers
from ..runtime.diffusion.backbone import Backbone, BackboneError, load_backbone
from ..runtime.diffusion.denoiser import ClassifierFreeGuided, ConditionedDenoiser
from ..runtime.serving.tasks import check_strength
from .condition_metrics import CAPTION_FIELDS, ConditionMetrics
from .data.datasets import TASKS, DataError, _sr_from_hr, build_dataset
from .data.degradations import DEGRADATION_PRESETS, degradation_preset
from .eval_report import (
    BICUBIC,
    COMPARABLE,
    DATASETS,
    EVAL_SEED,
    GRID_EXAMPLES,
    LABELS,
    LEGACY,
    LPIPS_MIN_SIZE,
    NO_SAMPLER,
    PROBE,
    PROBE_BLUR,
    PROBE_NOISE,
    PROMPTS,
    SUPER_RESOLUTION,
    TEXT_ONLY,
    EvalError,
    fmt,
    image_name,
    merge_rows,
    ordered,
    record,
    row_metrics,
    table,
    to_uint8,
    write_outputs,
)
from .metrics import flat_hf_energy, psnr, sliced_wasserstein, ssim
from .sample_grid import save_grid

# Weight files torchmetrics would download into the torch hub cache (torch.hub.get_dir()/checkpoints).
LPIPS_BACKBONE_FILE = "alexnet-owt-7be5be79.pth"  # torchvision AlexNet_Weights.IMAGENET1K_V1
FID_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's InceptionV3 (TF FID net)
OTHER_SCENE_SETS = 4  # sets of other scenes measured against the ground truth (swd_other_scenes)
METRIC_BATCH = 64  # images per LPIPS / Inception forward


@dataclass
class Candidate:
    """One --adapters item: the entry folder, its manifest, and the row label."""

    method: str
    path: Path
    manifest: Manifest
    samplers: list[str]


# ---------------------------------------------------------------------------------------------
# Command-line values


def parse_guidance(text: str, flag: str = "--guidance") -> list[float]:
    """--guidance, --cfg: one w or a comma-separated list of them."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EvalError(f"{flag} takes numbers separated by commas, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise EvalError(f"{flag} takes finite numbers, got {text!r}")
    return values


def parse_steps(text: str) -> list[int]:
    steps = []
    for item in text.split(","):
        if not item.strip().isdigit() or int(item) < 1:
            raise EvalError(f"--steps: {item.strip()!r} is not a positive integer (expected e.g. 1,2,4)")
        steps.append(int(item))
    return sorted(set(steps))


def known_samplers(task: str | None = None) -> list[str]:
    """The few-step and teacher samplers; each few-step one also with the task's own steps where it has some:
    ILVR for super-resolution (`prev+ilvr`, `prev+ilvr-out`), the source-keeping step for edit (`prev+keep`)."""
    names = [*samplers.FEW_STEP, *(s for s in samplers.TEACHER_SAMPLERS if s not in samplers.FEW_STEP)]
    return names + [s + step for step in samplers.TASK_STEPS.get(task or "", ()) for s in samplers.FEW_STEP]


def check_sampler(name: str, where: str, task: str | None = None) -> str:
    if name not in known_samplers(task):
        base, step = samplers.split_sampler(name)
        if samplers.keeps_low_frequencies(step) and base in samplers.FEW_STEP:
            raise EvalError(f"{where}: {name!r}: the ILVR step keeps a super-resolution input's low frequencies; "
                            f"task {task!r} has no low-resolution input")
        if step == samplers.KEEP and base in samplers.FEW_STEP:
            raise EvalError(f"{where}: {name!r}: the keep step gives an edit back its source's detail; "
                            f"task {task!r} edits no picture")
        raise EvalError(f"{where}: unknown sampler {name!r}; choose one of {', '.join(known_samplers(task))}")
    return name


def resolve_adapters(items: str | None, zoo: Path, task: str, samplers_given: list[str] | None) -> list[Candidate]:
    """`[LABEL=]entry` items -> candidates, each with a valid manifest for `task` and a known sampler."""
    out: list[Candidate] = []
    for item in (i.strip() for i in (items.split(",") if items is not None else [])):
        label, _, ref = item.partition("=") if "=" in item.split("/")[0] else ("", "", item)
        if not ref:
            raise EvalError(f"--adapters: empty entry in {items!r}")
        path = Path(ref)
        if not path.exists() and not any(c in ref for c in "/\\") and (zoo / ref).exists():
            path = zoo / ref
        if not path.exists():
            raise EvalError(f"--adapters: {ref!r} is neither a zoo entry folder nor an entry of the zoo {zoo}")
        manifest = Manifest.from_file(path / MANIFEST)  # ZooError names what is wrong; hashes are checked below
        if manifest.task != task:
            raise EvalError(f"zoo entry {path} ({manifest.name}) is for task {manifest.task!r}, not --task {task!r}")
        method = label or manifest.name
        if any(c.method == method for c in out):
            raise EvalError(f"--adapters: method {method!r} is given twice; label them (LABEL=entry)")
        chosen = samplers_given or [check_sampler(manifest.sampler, f"zoo entry {path} (manifest sampler)", task)]
        out.append(Candidate(method, path, manifest, chosen))
    return out


# ---------------------------------------------------------------------------------------------
# Data, models, sampling


def held_out(task: str, num_images: int, resolution: int, seed: int = EVAL_SEED, dataset: str = "scenes",
             degradation: str | None = None) -> dict:
    """The first `num_images` samples of the evaluation stream (seed EVAL_SEED), collated: scenes, or (super-resolution)
    patches of the held-out photographs. `degradation`: the preset that makes super-resolution's inputs (None: the
    published realesrgan)."""
    options = {"degradation": degradation_preset(degradation)} if task == SUPER_RESOLUTION and degradation else {}
    try:
        if dataset == "photos":
            items = held_out_photos(num_images, resolution, seed, options.get("degradation"))
        else:
            items = list(itertools.islice(iter(build_dataset(task, "scenes", size=resolution, seed=seed, **options)),
                                          num_images))
    except DataError as e:
        raise EvalError(str(e)) from e
    return {
        "condition": torch.stack([s["condition"] for s in items]),
        "target": torch.stack([s["target"] for s in items]),
        "text": [s["text"] for s in items],
        "caption": [s.get("caption", s["text"]) for s in items],  # edit: the edited scene's caption
    }


def held_out_photos(num_images: int, resolution: int, seed: int, degradation=None) -> list[dict]:
    """Super-resolution samples from patches of the held-out photographs (photos.HELD_OUT, never trained on):
    patch i and its degradation are drawn from (seed, i), so the set is the same on every run."""
    from .data.photos import PhotoPatches

    photos = PhotoPatches.bundled("held-out", size=resolution, seed=seed)
    items = []
    for i in range(num_images):
        hr = (photos[i]["image"] + 1) / 2
        item = _sr_from_hr(hr.permute(1, 2, 0).numpy(), np.random.default_rng([seed, i, 1]), degradation)
        item["text"] = photos.caption
        items.append(item)
    return items


@contextlib.contextmanager
def entry_model(candidate: Candidate, backbone: Backbone, index: int) -> Iterator[ConditionedDenoiser]:
    """The entry's ConditionedDenoiser, as the runtime would serve it: mode `lora` switches the entry's
    backbone LoRA on for the duration (and deletes it afterwards), mode `full` runs on its own UNet."""
    from ..adapters.architectures import set_backbone_lora

    lora = f"cdd_eval_{index}"
    entry = load_entry(candidate.path, backbone.unet, backbone.fingerprint, lora_name=lora)
    unet = backbone.unet
    if entry.unet_state is not None:
        unet = _full_unet(backbone, entry.unet_state, candidate.path)
    elif entry.manifest.backbone_lora is not None:
        backbone.unet.to(backbone.device, backbone.dtype)  # the new LoRA layers are created on the CPU
        set_backbone_lora(backbone.unet, lora)
    try:
        yield ConditionedDenoiser(unet, backbone.schedule, entry.adapter)
    finally:
        if entry.manifest.backbone_lora is not None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            set_backbone_lora(backbone.unet, None)
            for module in backbone.unet.modules():
                if isinstance(module, BaseTunerLayer) and lora in getattr(module, "lora_A", {}):
                    module.delete_adapter(lora)


def _full_unet(backbone: Backbone, state: dict, path: Path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(backbone.unet.config)
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ZooError(f"zoo entry {path}: unet.safetensors does not fit the backbone UNet: {e}") from e
    return unet.to(backbone.device, backbone.dtype).requires_grad_(False).eval()


@torch.no_grad()
def generate(model: ConditionedDenoiser, backbone: Backbone, data: dict, text_emb: torch.Tensor, sampler: str,
             steps: int, seed: int, batch_size: int, sr_scale: int = 4, fidelity=None,
             strength: float = 1.0) -> tuple[torch.Tensor, float]:
    """All N images for one row, in [0, 1] on the CPU, and the seconds spent sampling them. A `NAME+ilvr` sampler
    runs NAME with the ILVR step towards the condition's low frequencies at down-scale `sr_scale` (on a latent
    backbone x_hat is decoded, corrected and encoded again each step), `NAME+ilvr-out` with ILVR's update on the
    decoded output only; a `NAME+keep` sampler runs NAME and gives
    its decoded output the source's detail where the edit kept it (`samplers.keep_source`). `fidelity`:
    (FidelityNet, [w, ...]), a super-resolution entry's fidelity module applied to the decoded output at each weight
    w: the images are then [len(ws), N, 3, H, W], one sample through the module at each w. `strength` < 1: a few-step
    sampler's run starts from the condition noised to the first of its timesteps over that share of the schedule
    (`samplers.start_from`, as cdd-serve's `strength`)."""
    device, schedule = backbone.device, backbone.schedule
    sampler, step = samplers.split_sampler(sampler)
    consistent = samplers.keeps_low_frequencies(step)
    n, size = data["condition"].shape[0], data["condition"].shape[-1]
    latent = size // backbone.vae_scale_factor
    shape = (backbone.model_channels, latent, latent)
    images, seconds = [], 0.0
    for start in range(0, n, batch_size):
        seeds = range(seed + start, seed + min(n, start + batch_size))
        cond = data["condition"][start : start + batch_size].to(device, backbone.dtype)
        bound = model.bind(cond, text_emb[start : start + batch_size])
        if consistent:
            latent_io = {"to_pixels": backbone.from_model_space, "to_model": backbone.to_model_space} if backbone.latent else {}
            low = samplers.LowPass(cond.shape[-2], cond.shape[-1], sr_scale)
            reference_low = low(cond.float() * 2 - 1)
            if step == samplers.ILVR:  # NAME+ilvr-out: only the update on the decoded output below
                bound = samplers.ilvr(bound, cond.float() * 2 - 1, sr_scale, low=low, reference_low=reference_low,
                                      **latent_io)
        z_T = samplers.initial_noise(seeds, shape, device, backbone.dtype)
        fresh = samplers.fresh_noise(sampler, seeds, shape, steps, device, backbone.dtype)
        _sync(device)
        t0 = time.perf_counter()
        if sampler in samplers.FEW_STEP:
            timesteps = schedule.trailing_timesteps(steps, strength)
            z_start = (samplers.start_from(backbone.to_model_space(cond.float() * 2 - 1), z_T, timesteps, schedule)
                       if strength < 1 else None)
            z_0 = samplers.FEW_STEP[sampler](bound, z_T, timesteps, schedule, fresh_noise=fresh, z_start=z_start)
        else:
            if strength < 1:
                raise ValueError(f"the teacher sampler {sampler!r} runs from noise only (strength 1)")
            z_0 = samplers.sample_with_scheduler(bound, z_T, steps, schedule, backbone.scheduler_config, sampler)
        x = backbone.from_model_space(z_0)
        if consistent:
            x = samplers.ilvr_output(x.float(), reference_low, low)
        if step == samplers.KEEP:
            source = cond.float() * 2 - 1
            x = samplers.keep_source(x.float(), source, samplers.source_roundtrip(source, backbone))
        if fidelity is not None:  # as served: on the clamped output
            net, ws = fidelity
            x = torch.stack([net.to(device)(x.float().clamp(-1, 1), cond.float() * 2 - 1, w) for w in ws])
        _sync(device)
        seconds += time.perf_counter() - t0
        images.append(x.float().cpu())
    return quantise(torch.cat(images, dim=1 if fidelity is not None else 0)), seconds


@torch.no_grad()
def warm_up(model: ConditionedDenoiser, backbone: Backbone, data: dict, text_emb: torch.Tensor, batch_size: int) -> None:
    """One untimed forward, so lazy initialisation (CUDA kernels, allocator) is not billed to the first row."""
    cond = data["condition"][:batch_size].to(backbone.device, backbone.dtype)
    size = cond.shape[-1] // backbone.vae_scale_factor
    z = torch.zeros(cond.shape[0], backbone.model_channels, size, size, device=backbone.device, dtype=backbone.dtype)
    model(z, backbone.schedule.num_train_timesteps - 1, cond, text_emb[:batch_size])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantise(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> 8-bit levels in [0, 1]: what a saved PNG holds, and what is measured."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 255


# ---------------------------------------------------------------------------------------------
# Metrics


def _hub_file(name: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def optional_metric_status() -> dict[str, str | None]:
    """{"lpips": None or why it cannot be computed here, "fid": ...}: checked before anything is constructed,
    since constructing the metrics without their weights would try to download them."""
    needs = {
        "lpips": [("torchmetrics", "torchmetrics (pip install -e .[eval])"), ("torchvision", "torchvision")],
        "fid": [("torchmetrics", "torchmetrics (pip install -e .[eval])"), ("torch_fidelity", "torch-fidelity")],
    }
    files = {"lpips": ("the AlexNet weights", LPIPS_BACKBONE_FILE), "fid": ("the InceptionV3 weights", FID_INCEPTION_FILE)}
    status: dict[str, str | None] = {}
    for metric, modules in needs.items():
        missing = [f"{label} is not installed" for module, label in modules if importlib.util.find_spec(module) is None]
        what, name = files[metric]
        if not _hub_file(name).is_file():
            missing.append(f"{what} {_hub_file(name)} are not on this disk")
        status[metric] = "; ".join(missing) or None
    return status


class OptionalMetrics:
    """LPIPS (AlexNet, mean over images) and FID (InceptionV3 pool features, generated set vs ground truth)
    through torchmetrics, each only when `optional_metric_status` found everything it needs."""

    def __init__(self, truth: torch.Tensor, device: torch.device):
        self.status = optional_metric_status()
        self.truth, self.lpips_metric, self.fid_metric = truth, None, None
        if self.status["lpips"] is None:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            self.lpips_metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(device)
        if self.status["fid"] is None:
            from torchmetrics.image.fid import FrechetInceptionDistance

            self.fid_metric = FrechetInceptionDistance(
                feature=2048, normalize=True, reset_real_features=False,
                feature_extractor_weights_path=str(_hub_file(FID_INCEPTION_FILE)),
            ).to(device)
            for chunk in truth.split(METRIC_BATCH):
                self.fid_metric.update(chunk.to(device), real=True)

    @torch.no_grad()
    def lpips(self, images: torch.Tensor) -> float | None:
        if self.lpips_metric is None:
            return None
        a, b = images, self.truth
        if a.shape[-1] < LPIPS_MIN_SIZE:
            a, b = (torch.nn.functional.interpolate(v, size=LPIPS_MIN_SIZE, mode="bilinear") for v in (a, b))
        self.lpips_metric.reset()
        device = self.lpips_metric.device
        for x, y in zip(a.split(METRIC_BATCH), b.split(METRIC_BATCH)):
            self.lpips_metric.update(x.to(device), y.to(device))
        return float(self.lpips_metric.compute())

    @torch.no_grad()
    def fid(self, images: torch.Tensor) -> float | None:
        if self.fid_metric is None:
            return None
        self.fid_metric.reset()  # keeps the ground truth's features
        for chunk in images.split(METRIC_BATCH):
            self.fid_metric.update(chunk.to(self.fid_metric.device), real=False)
        return float(self.fid_metric.compute())


class AttributeMetrics:
    """KID and FID on the scenes-attribute classifier's features (training/attributes.py) between a set
    and the ground truth, and `attr_all`: the fraction of images whose floor, time of day and object set all
    match their captions. Null, with `status` saying why, when no classifier is given or found."""

    def __init__(self, truth: torch.Tensor, captions: list[str], folder: Path | None, skip: str | None = None,
                 caption_fields: bool = False):
        from . import attributes

        self.net, self.status, self.labels = None, None, None
        self.caption_fields = caption_fields  # depth, edit: also recall, precision, floor and time (CAPTION_FIELDS)
        if skip is not None:  # why the classifier does not apply to this data (e.g. photographs)
            self.status = skip
            return
        if folder is None:
            self.status = "no attribute classifier was given (--attributes none)"
            return
        try:
            self.net = attributes.load(folder)
        except (FileNotFoundError, ValueError) as e:  # missing, or from before the object map
            self.status = str(e)
            return
        self.truth_features = attributes.features(self.net, truth)
        try:
            self.labels = attributes.stack_labels([attributes.parse_caption(c) for c in captions])
        except ValueError:
            self.labels = None  # captions that are not the world's (e.g. instructions): no caption agreement

    def __call__(self, images: torch.Tensor) -> dict[str, float | None]:
        from . import attributes

        fields = CAPTION_FIELDS if self.caption_fields else ()
        if self.net is None:
            return {"kid_attr": None, "fid_attr": None, "attr_all": None, **dict.fromkeys(fields)}
        f = attributes.features(self.net, images)
        agree = attributes.agreement(attributes.predict(self.net, images), self.labels) if self.labels else None
        parts = {"attr_recall": "objects_recall", "attr_precision": "objects_precision", "attr_floor": "floor",
                 "attr_time": "time"}
        return {"kid_attr": attributes.kernel_distance(f, self.truth_features),
                "fid_attr": attributes.frechet_distance(f, self.truth_features),
                "attr_all": agree["all"] if agree else None,
                **{k: agree[parts[k]] if agree else None for k in fields}}


def measure(images: torch.Tensor, truth: torch.Tensor, optional: OptionalMetrics,
            attribute: AttributeMetrics, follow: ConditionMetrics | None = None, sr: bool = False) -> dict:
    """A row's metrics; `sr` (super-resolution) adds flat_hf, the mean `flat_hf_energy` over the images that have
    flat pixels in their truth (None when none has)."""
    swd = sliced_wasserstein(images, truth)
    return {
        "psnr": float(psnr(images, truth).mean()),
        "ssim": float(ssim(images, truth).mean()),
        **({"flat_hf": mean_flat_hf(images, truth)} if sr else {}),
        "swd": float(swd["swd"]),
        "swd_levels": {k: float(v) for k, v in swd.items() if k != "swd"},  # per pyramid level (resolution in px)
        **attribute(images),
        "lpips": optional.lpips(images),
        "fid": optional.fid(images),
        **(follow(images) if follow is not None else {}),  # depth / edit: does the output follow its condition
    }


def mean_flat_hf(images: torch.Tensor, truth: torch.Tensor) -> float | None:
    e = flat_hf_energy(images, truth)
    e = e[torch.isfinite(e)]
    return float(e.mean()) if len(e) else None


def probe_sets(truth: torch.Tensor, other: torch.Tensor, other_name: str = "other scenes") -> dict[str, torch.Tensor]:
    """Reference sets every distance should rank (docs/evaluation.md): the truth itself, the truth with Gaussian
    noise of sigma PROBE_NOISE, the truth blurred (PROBE_BLUR x down, bilinear up), and other scenes of the world
    (or other patches of the held-out photographs, `other_name`)."""
    import torch.nn.functional as F

    noise = torch.randn(truth.shape, generator=torch.Generator().manual_seed(EVAL_SEED))
    small = F.interpolate(truth, scale_factor=1 / PROBE_BLUR, mode="area")
    return {
        "truth": truth,
        f"truth + noise {PROBE_NOISE}": quantise((truth + PROBE_NOISE * noise) * 2 - 1),
        f"truth blurred x{PROBE_BLUR}": quantise(F.interpolate(small, size=truth.shape[-2:], mode="bilinear") * 2 - 1),
        other_name: other,
    }


def other_scene_sets(task: str, num_images: int, resolution: int, dataset: str = "scenes",
                     data_seed: int = EVAL_SEED) -> list[torch.Tensor]:
    """The targets of `num_images` *other* scenes of the world (or patches of the held-out photographs),
    OTHER_SCENE_SETS sets (streams data_seed + 1, + 2, ...)."""
    return [quantise(held_out(task, num_images, resolution, seed=data_seed + i, dataset=dataset)["target"])
            for i in range(1, OTHER_SCENE_SETS + 1)]


def swd_other_scenes(task: str, num_images: int, resolution: int, truth: torch.Tensor,
                     sets: list[torch.Tensor] | None = None, dataset: str = "scenes") -> list[float]:
    """SWD between the ground truth and each of `other_scene_sets` (rendered unless given): the scale of the metric
    at this N, and how much it moves between sets."""
    sets = sets if sets is not None else other_scene_sets(task, num_images, resolution, dataset)
    return [float(sliced_wasserstein(other, truth)["swd"]) for other in sets]


# ---------------------------------------------------------------------------------------------
# The command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cdd-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--adapters", default=None, help="comma-separated [LABEL=]entry: a zoo entry folder or a name in --zoo "
                   "(may be left out with --bicubic)")
    p.add_argument("--steps", default="1,2,4", help="comma-separated step counts (default 1,2,4)")
    p.add_argument("--samplers", default=None, help="comma-separated samplers (default: each entry's manifest sampler); "
                   "super-resolution also takes NAME+ilvr, e.g. prev+ilvr: the few-step sampler with the ILVR step, and "
                   "NAME+ilvr-out: ILVR's update on the decoded output only")
    p.add_argument("--bicubic", action="store_true", help="super-resolution: add the 'bicubic' row, the low-resolution "
                   "input upsampled bicubically (sampler '-', steps 0)")
    p.add_argument("--prompt", choices=PROMPTS, default=None, help="caption: each image's ground-truth caption; none: the "
                   "empty prompt, as the API sends it when a user gives none (default: none for super-resolution, "
                   "caption for the other tasks)")
    p.add_argument("--dataset", choices=DATASETS, default="scenes", help="scenes (the held-out scenes stream) or, for "
                   "super-resolution, photos: patches of the held-out photographs (default scenes)")
    p.add_argument("--degradation", choices=tuple(DEGRADATION_PRESETS), default=None, help="super-resolution: the "
                   "degradation preset that makes the inputs (default realesrgan, the published settings)")
    p.add_argument("--num-images", type=int, default=64, help="held-out images per row (default 64; at least 2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="image i starts from the noise of seed SEED + i (default 0)")
    p.add_argument("--data-seed", type=int, default=EVAL_SEED,
                   help=f"the stream the images and conditions come from (default {EVAL_SEED}, the held-out stream); "
                        "another seed, e.g. 7, is a tuning stream to choose a setting on before measuring it on the "
                        "held-out one")
    p.add_argument("--resolution", type=int, default=None, help="default: the entries' condition resolution")
    p.add_argument("--backbone", type=Path, default=default_backbone_dir())
    p.add_argument("--zoo", type=Path, default=default_zoo_dir())
    p.add_argument("--out", type=Path, default=None, help="output folder (default eval/<task>)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--append", action="store_true", help="merge into the results.json already in --out")
    p.add_argument("--record", action="store_true", help="write each entry's rows into its manifest's metrics")
    p.add_argument("--attributes", default="default", help="the scenes-attribute classifier folder for KID-attr, FID-attr "
                   "and caption agreement (default: the shipped one; 'none': skip them)")
    p.add_argument("--guidance", default=None, metavar="W[,W...]",
                   help="sample controlnet-guided entries at each of these w instead of their manifest's; their rows "
                        "are labelled 'METHOD w=W' (e.g. 0,0.5,1,2,3 for rows over the trained range)")
    p.add_argument("--cfg", default=None, metavar="W[,W...]",
                   help="also sample each entry with classifier-free guidance at each w, two passes per step "
                        "((1 + w) f(text) - w f(\"\"); diffusers' guidance_scale 1 + w): rows 'METHOD cfg=W'")
    p.add_argument("--cfg-unconditional", choices=("text", "text+condition"), default="text",
                   help="what --cfg's unconditional branch drops: the text (the condition image goes to both branches) "
                        "or the text and the condition (the backbone alone with \"\"; rows 'METHOD cfg-both=W')")
    p.add_argument("--fidelity", default=None, metavar="W[,W...]",
                   help="super-resolution entries with a fidelity module: rows at each of these weights w instead of "
                        "the manifest's default, labelled 'METHOD fidelity=W' (0: the module off)")
    p.add_argument("--strength", default=None, metavar="S[,S...]",
                   help="super-resolution and edit: rows at each of these strengths instead of each entry's manifest's "
                        "(1: from noise; 0.5: from the input noised to timestep 499, the steps taken over that half, as "
                        "cdd-serve's strength), labelled 'METHOD strength=S'")
    p.add_argument("--probes", action="store_true", help="also measure the probe sets (truth, noisy, blurred, other "
                   "scenes) as rows with sampler 'probe'")
    p.add_argument("--text-only", action="store_true", help=f"also sample the backbone with no adapter (the prompt alone) "
                   f"with --samplers (default ddim) and --steps: the row '{TEXT_ONLY}', what a condition has to add")
    return p


def evaluate(args: argparse.Namespace) -> tuple[dict, Path]:
    """Run the evaluation `args` describe; returns the results (as written to results.json) and the folder."""
    # 1. Everything that can be checked without a model, first.
    if args.task not in TASKS:
        raise EvalError(f"--task: unknown task {args.task!r}; choose one of {', '.join(TASKS)}")
    steps = parse_steps(args.steps)
    args.guidance = parse_guidance(args.guidance) if args.guidance is not None else None
    args.cfg = parse_guidance(args.cfg, "--cfg") if args.cfg is not None else None
    args.fidelity = parse_guidance(args.fidelity, "--fidelity") if args.fidelity is not None else None
    if args.fidelity is not None and any(not 0 <= w <= 1 for w in args.fidelity):
        raise EvalError(f"--fidelity: every weight must be in [0, 1], got {args.fidelity}")
    args.strength = parse_guidance(args.strength, "--strength") if args.strength is not None else None
    for s in args.strength or ():
        try:
            check_strength(args.task, s, max(steps))
        except ValueError as e:
            raise EvalError(f"--strength: {e}") from None
    chosen = [check_sampler(s.strip(), "--samplers", args.task) for s in args.samplers.split(",")] if args.samplers else None
    sr = args.task == SUPER_RESOLUTION
    for flag, given in (("--bicubic", args.bicubic), ("--dataset photos", args.dataset == "photos"),
                        ("--degradation", args.degradation is not None)):
        if given and not sr:
            raise EvalError(f"{flag} is for super-resolution (photographs and degradations make SR inputs), not {args.task}")
    if args.adapters is None and not (args.bicubic or args.text_only):
        raise EvalError("--adapters is required (only --bicubic, for super-resolution, and --text-only measure something "
                        "without one)")
    text_only_samplers = [s for s in (chosen or ["ddim"]) if not samplers.split_sampler(s)[1]] if args.text_only else []
    if args.text_only and not text_only_samplers:
        raise EvalError("--text-only: the backbone alone has no low-resolution input for NAME+ilvr and no source picture "
                        "for NAME+keep; name a plain sampler")
    prompt = args.prompt or ("none" if sr else "caption")
    degradation = (args.degradation or LEGACY["degradation"]) if sr else None
    if args.num_images < 2:
        raise EvalError(f"--num-images is {args.num_images}; at least 2 are needed (SWD and FID compare sets)")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size is {args.batch_size}; expected a positive integer")
    out = args.out or Path("eval") / args.task
    candidates = resolve_adapters(args.adapters, args.zoo, args.task, chosen)
    resolutions = {c.manifest.condition.get("resolution") for c in candidates}
    resolution = args.resolution
    if resolution is None and not candidates:
        raise EvalError("--bicubic or --text-only without --adapters: pass --resolution (the high-resolution size)")
    if resolution is None:
        if len(resolutions) != 1:
            raise EvalError(f"the entries' condition resolutions differ ({sorted(map(str, resolutions))}); pass --resolution")
        resolution = resolutions.pop()
        if not isinstance(resolution, int):
            raise EvalError(f"the entries' manifests give condition resolution {resolution!r}; pass --resolution")
    if resolution < 16:
        raise EvalError(f"resolution {resolution} is below 16 px (SSIM's 11x11 window, SWD's 7x7 patches)")

    # 2. The backbone; every entry's hashes and fingerprint are checked before any sampling starts.
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        backbone = load_backbone(args.backbone, device=device)
    except BackboneError as e:
        raise EvalError(str(e)) from e
    for c in candidates:
        verify_entry(c.path, backbone.fingerprint)
    if steps[-1] > backbone.schedule.num_train_timesteps:
        raise EvalError(f"--steps: {steps[-1]} exceeds the backbone's {backbone.schedule.num_train_timesteps} timesteps")

    results = {"task": args.task, "num_images": args.num_images, "rows": [], "seed": args.seed, "data_seed": args.data_seed,
               "resolution": resolution, "backbone_fingerprint": backbone.fingerprint, "device": str(device),
               "dataset": args.dataset, "degradation": degradation, "prompt": prompt, "notes": {}}
    previous = None
    if args.append and (out / "results.json").is_file():
        previous = json.loads((out / "results.json").read_text())
        legacy = {**LEGACY, "degradation": LEGACY["degradation"] if previous.get("task") == SUPER_RESOLUTION else None}
        for key in COMPARABLE:
            if previous.get(key, legacy.get(key)) != results[key]:
                raise EvalError(f"--append: {out / 'results.json'} has {key} {previous.get(key, legacy.get(key))!r}, this run "
                                f"{results[key]!r}; its rows would not be comparable")

    # 3. The held-out set, its text embeddings, and the reference images (saved for the grid).
    data = held_out(args.task, args.num_images, resolution, seed=args.data_seed, dataset=args.dataset,
                    degradation=degradation)
    truth = quantise(data["target"])
    # The prompts the rows are sampled with; the captions stay the ground truth the attribute agreement checks.
    text_emb = backbone.encode_text(data["text"] if prompt == "caption" else [""] * args.num_images)
    optional = OptionalMetrics(truth, device)
    from .attributes import default_dir

    folder = None if args.attributes == "none" else default_dir() if args.attributes == "default" else Path(args.attributes)
    skip = ("the scenes-attribute classifier reads scenes, not photographs (--dataset photos)"
            if args.dataset == "photos" else None)
    # The captions of the scenes the outputs should show (edit: the edited scene's, not the instruction)
    attribute = AttributeMetrics(truth, data["caption"], folder, skip=skip, caption_fields=args.task in ("depth", "edit"))
    follow = ConditionMetrics(args.task, data)
    results["swd_truth_vs_itself"] = float(sliced_wasserstein(truth, truth)["swd"])  # the estimator's own floor
    if sr:  # the truth's own high-frequency energy where it is flat: what a faithful output has there
        results["flat_hf_truth"] = mean_flat_hf(truth, truth)
    others = other_scene_sets(args.task, args.num_images, resolution, args.dataset, data_seed=args.data_seed)
    results["swd_other_scenes"] = swd_other_scenes(args.task, args.num_images, resolution, truth, others)
    save_grid(out / "images" / "condition.png", to_uint8(data["condition"][:GRID_EXAMPLES]))
    save_grid(out / "images" / "target.png", to_uint8(truth[:GRID_EXAMPLES]))

    # 4. One row per (method, sampler, steps), every row from the same conditions and noise.
    ws = lambda c: ((len(args.guidance) if args.guidance is not None and c.manifest.kind == "controlnet-guided" else
                     len(args.fidelity) if args.fidelity is not None and c.manifest.fidelity is not None else 1)
                    + len(args.cfg or ()))
    total = (sum(len(c.samplers) * ws(c) * len(args.strength or (1,)) for c in candidates)
             + len(text_only_samplers)) * len(steps)
    print(f"cdd-eval: {args.task}, {len(candidates)} entr{'y' if len(candidates) == 1 else 'ies'}, {total} rows of "
          f"{args.num_images} held-out {args.dataset} at {resolution} px on {device}, prompt {prompt}", flush=True)
    rows: list[dict] = []

    def reference_row(method: str, name: str, sampler: str, images: torch.Tensor) -> None:
        """A row measured on a given image set (bicubic, the probes, the depth / edit references): nothing sampled."""
        row = {"method": method, "sampler": sampler, "steps": 0, **measure(images, truth, optional, attribute, follow, sr),
               "seconds_per_image": None, "adapter": None, "name": name, "training_method": None, "kind": None,
               "mode": None, "device": str(device)}
        row["image"] = image_name(row)
        save_grid(out / row["image"], to_uint8(images[:GRID_EXAMPLES]))
        rows.append(row)
        label = name if sampler != PROBE else f"probe {name}"
        print(f"{label}: " + ", ".join(f"{LABELS[m]} {fmt(row[m], m)}" for m in row_metrics([row])), flush=True)

    if args.bicubic:  # the condition is the LR input's bicubic upsampling
        reference_row(BICUBIC, BICUBIC, NO_SAMPLER, quantise(data["condition"] * 2 - 1))
    # The condition-following references (depth: the renders, the ceiling; edit: the unedited source) are always
    # measured: they are cheap, and a depth or edit table cannot be read without them.
    if args.probes or follow.references():
        other_name = "other photo patches" if args.dataset == "photos" else "other scenes"
        probes = probe_sets(truth, others[0], other_name) if args.probes else {}
        for name, images in {**probes, **follow.references()}.items():
            reference_row(f"probe: {name}", name, PROBE, images)
    def sampled_rows(model: ConditionedDenoiser, method: str, names: list[str], entry: dict, fidelity=None,
                     labels=None, before=None, strength: float = 1.0) -> None:
        """A row per (sampler, steps), and per strength with --strength (else at `strength`, the entry's served one);
        with `fidelity` (net, [w, ...]) one sample per (sampler, steps) measured at each w, the rows labelled
        labels[i] and their entry fields entry[i]. `before(k)`: called before each row of k steps (a guided entry's
        served w for that step count)."""
        warm_up(model, backbone, data, text_emb, args.batch_size)
        runs = [(sampler, k, st) for sampler, k in itertools.product(names, steps)  # teachers run from noise only
                for st in ((args.strength or [strength]) if samplers.split_sampler(sampler)[0] in samplers.FEW_STEP
                           else [1.0])]
        for sampler, k, st in runs:
            if before is not None:
                before(k)
            images, seconds = generate(model, backbone, data, text_emb, sampler, k, args.seed, args.batch_size,
                                       degradation_preset(degradation).scale if sr else 4, fidelity, st)
            tag = f" strength={st:g}" if args.strength is not None else ""
            if fidelity is None:
                one_row(method + tag, sampler, k, images, seconds, {**entry, "strength": st})
            else:
                for i, part in enumerate(images):
                    one_row(labels[i] + tag, sampler, k, part, seconds, {**entry[i], "strength": st})

    def one_row(method: str, sampler: str, k: int, images: torch.Tensor, seconds: float, entry: dict) -> None:
        row = {"method": method, "sampler": sampler, "steps": k, **measure(images, truth, optional, attribute, follow, sr),
               "seconds_per_image": seconds / args.num_images, **entry, "device": str(device)}
        row["image"] = image_name(row)
        save_grid(out / row["image"], to_uint8(images[:GRID_EXAMPLES]))
        rows.append(row)
        print(f"[{sum(r['sampler'] not in (PROBE, NO_SAMPLER) for r in rows)}/{total}] {method} {sampler} x{k}: "
              + ", ".join(f"{LABELS[m]} {fmt(row[m], m)}" for m in row_metrics([row])), flush=True)
        if not all(math.isfinite(row[m]) for m in ("psnr", "ssim", "swd")):
            print(f"warning: {method} {sampler} x{k} gave non-finite metrics", file=sys.stderr)

    if text_only_samplers:  # the backbone alone: the condition image is not used
        sampled_rows(ConditionedDenoiser(backbone.unet, backbone.schedule), TEXT_ONLY, text_only_samplers,
                     {"adapter": None, "name": TEXT_ONLY, "training_method": None, "kind": None, "mode": None})
    for index, c in enumerate(candidates):
        with entry_model(c, backbone, index) as model:
            entry = {"adapter": str(c.path), "name": c.manifest.name, "training_method": c.manifest.training.get("method"),
                     "kind": c.manifest.kind, "mode": c.manifest.mode}
            for w in args.cfg or ():  # the entry with real classifier-free guidance: two passes per step
                both = args.cfg_unconditional == "text+condition"
                sampled_rows(ClassifierFreeGuided(model, backbone.encode_text([""]), w, drop_condition=both),
                             f"{c.method} cfg{'-both' if both else ''}={w:g}", c.samplers,
                             {**entry, "cfg": w, "cfg_unconditional": args.cfg_unconditional}, strength=c.manifest.strength)
            net = load_fidelity(c.path, c.manifest)
            if args.guidance is not None and c.manifest.kind == "controlnet-guided":
                for w in args.guidance:
                    model.adapter.set_default_guidance(w)
                    sampled_rows(model, f"{c.method} w={w:g}", c.samplers, {**entry, "guidance": w},
                                 strength=c.manifest.strength)
            elif net is not None:  # measured as served (its default weight), or at each --fidelity weight
                ws = args.fidelity if args.fidelity is not None else [c.manifest.fidelity["default"]]
                labels = [f"{c.method} fidelity={w:g}" for w in ws] if args.fidelity is not None else [c.method]
                sampled_rows(model, c.method, c.samplers, [{**entry, "fidelity": w} for w in ws], (net, ws), labels,
                             strength=c.manifest.strength)
            elif c.manifest.guidance_steps:  # served at the entry's default w for each step count
                sampled_rows(model, c.method, c.samplers, entry,
                             before=lambda k, m=c.manifest: model.adapter.set_default_guidance(m.default_guidance(k)),
                             strength=c.manifest.strength)
            else:
                sampled_rows(model, c.method, c.samplers, entry, strength=c.manifest.strength)

    # 5. Merge (--append), write, record.
    results["notes"] = {m: why for m, why in optional.status.items() if why}
    if attribute.status:
        results["notes"]["attributes"] = attribute.status
    measured = rows
    if previous is not None:
        rows = merge_rows(previous["rows"], rows)
        notes = {**previous.get("notes", {}), **results["notes"]}
        results["notes"] = {m: why for m, why in notes.items() if any(r.get(m) is None for r in rows)}
    results["rows"] = ordered(rows)
    write_outputs(out, results)
    if args.record:  # an entry given twice (under two labels) gets both labels' rows
        for path in dict.fromkeys(c.path.resolve() for c in candidates):
            record(path, results, [r for r in measured if r["adapter"] and Path(r["adapter"]).resolve() == path])
    return results, out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results, out = evaluate(args)
    except (EvalError, ZooError) as e:
        print(f"cdd-eval: error: {e}", file=sys.stderr)
        return 2
    print()
    print(table(results["rows"]), end="")
    print(f"\nwritten to {out}: results.json, results.md, plot_*.png, grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
