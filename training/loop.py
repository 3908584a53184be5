"""The adapter training loop: CoDi (Algorithm 1) or conditional fine-tuning, with accelerate.

    train(config) -> TrainResult

One run writes, under `config.output_dir`:
    config.json                       the TrainConfig
    checkpoints/step-NNNNNN/          atomic: trainable weights, EMA, optimizer, RNG states, data position
    logs/                             TensorBoard scalars (each loss term, lr, grad norm) and sample grids
    metrics.jsonl                     the same scalars, one JSON object per logged step
    samples/step-NNNNNN.png           condition | 1, 2, 4 steps (EMA weights) | target
    entry/ (or config.zoo_out)        the zoo entry, with the EMA weights

Multi-GPU / multi-node: run the same command under `accelerate launch`; every process trains on its own
slice of the data stream, DDP averages the gradients of the trainable parameters only.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..adapters.architectures import (
    GuidedControlNetAdapter,
    adapter_from_config,
    add_backbone_lora,
    backbone_lora_name,
    backbone_lora_state,
    build_adapter,
)
from ..adapters.atomic import write_text
from ..adapters.zoo import Manifest, load_entry, save_entry
from ..runtime.diffusion.backbone import Backbone, load_backbone
from ..runtime.diffusion.denoiser import ConditionedDenoiser
from .checkpoints import StopSignals, writing
from .run_checkpoints import (
    CHECKPOINTS,
    checkpoint_dirs,
    checkpoint_step,
    incomplete_report,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    source_fingerprint,
)
from .adversarial import build_adversarial
from .codi import build_objective, changed_region_weight, noise_removed
from .distribution_matching import build_distribution_matching
from .config import ConfigError, TrainConfig

NOISE_REMOVED_AT = (19, 99, 249)  # timesteps at which the EMA weights' noise-removed fraction is logged
ETA_STEPS = 3  # steps timed (after the first, which pays one-off costs) before the ETA is printed
ETA_SMOOTHING = 0.1  # weight of the newest step in the moving average of seconds per step
GRID_ROWS = 4


class TrainingStopped(RuntimeError):
    """The run cannot go on (a non-finite loss or gradient); the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run after the step in progress, with a checkpoint of that step."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        import signal

        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        if checkpoint is None:
            super().__init__(f"{name} before the first step: nothing to save")
        else:
            super().__init__(f"{name} at step {step}: checkpoint {checkpoint}; continue the run with "
                             f"cdd-train-adapter --resume {checkpoint}")


@dataclass
class TrainResult:
    step: int
    entry: Path | None
    checkpoint: Path | None
    first_loss: dict[str, float] = field(default_factory=dict)
    last_loss: dict[str, float] = field(default_factory=dict)
    seconds_per_step: float | None = None
    student: ConditionedDenoiser | None = None  # holds the EMA weights once the entry is written
    trainable: list[str] = field(default_factory=list)  # names of the trained parameters in `student`


# ---------------------------------------------------------------------------------------------
W_BRANCH = "time_embedding.cond_proj."  # the controlnet-guided adapter's only w-specific weights (its w projection)


def parameter_groups(trainable: dict[str, nn.Parameter], config: TrainConfig) -> list[dict]:
    """The optimizer's parameter groups: one at `lr`, and with `guidance_lr_scale` != 1 the w branch of a
    controlnet-guided student (`W_BRANCH`) in a second group at lr x that scale. The groups' order is fixed, so a
    resumed optimizer state lands on the same parameters."""
    w_branch = [p for name, p in trainable.items() if W_BRANCH in name] if config.guidance_lr_scale != 1 else []
    if not w_branch:
        return [{"params": list(trainable.values())}]
    return [{"params": [p for name, p in trainable.items() if W_BRANCH not in name]},
            {"params": w_branch, "lr": config.lr * config.guidance_lr_scale}]


# theta^-: the EMA of the trainable parameters, and forwards with substituted weights


class EMA:
    """An exponential moving average of the trainable parameters only: frozen ones are shared, never copied.

    `warmup`: the rate of update n is min(mu, (1 + n) / (10 + n)), as diffusers' EMAModel has it, so that the
    average forgets its starting point within a short run (with a constant mu = 0.999 the weights after 1500
    steps still hold 0.999^1500 = 22% of the start: for a fine-tuned ControlNet, its zero convolutions). The
    fine-tuning teacher uses it; CoDi, cm and GD keep Algorithm 1's constant mu for the target theta^-."""

    def __init__(self, trainable: dict[str, nn.Parameter], rate: float, warmup: bool = False):
        self.rate, self.warmup = rate, warmup
        self.shadow = {name: p.detach().clone() for name, p in trainable.items()}

    def rate_at(self, n: int) -> float:
        """mu for the n-th update (n = 1, 2, ...)."""
        return min(self.rate, (1 + n) / (10 + n)) if self.warmup else self.rate

    @torch.no_grad()
    def update(self, trainable: dict[str, nn.Parameter], n: int = 1) -> None:
        """theta^- <- mu theta^- + (1 - mu) theta, mu = `rate_at(n)` for the n-th update."""
        mu = self.rate_at(n)
        ema = list(self.shadow.values())
        torch._foreach_mul_(ema, mu)
        torch._foreach_add_(ema, [trainable[name].detach() for name in self.shadow], alpha=1 - mu)

    @torch.no_grad()
    def copy_to(self, trainable: dict[str, nn.Parameter]) -> None:
        for name, value in self.shadow.items():
            trainable[name].copy_(value)


class WithWeights:
    """`module`'s forward with some of its parameters replaced by other tensors (torch.func.functional_call):
    the EMA target is the student's own ConditionedDenoiser evaluated at theta^-, without copying the
    frozen backbone or the adapter module."""

    def __init__(self, module: nn.Module, tensors: dict[str, torch.Tensor]):
        self.module, self.tensors = module, tensors

    @torch.no_grad()
    def __call__(self, z_t, t, cond, text_emb):
        return torch.func.functional_call(self.module, self.tensors, (z_t, t, cond, text_emb), strict=False)

    def bind(self, cond, text_emb):
        return lambda z_t, t: self(z_t, t, cond, text_emb)


# ---------------------------------------------------------------------------------------------
# The data stream: a pure function of (seed, position), so a resumed run sees what an uninterrupted one would


def collate(samples: list[dict]) -> dict[str, Any]:
    return {
        "condition": torch.stack([s["condition"] for s in samples]),
        "target": torch.stack([s["target"] for s in samples]),
        "text": [s["text"] for s in samples],
    }


class BatchStream(IterableDataset):
    """Micro-batches of this process: micro-batch m holds samples k = (m * world_size + rank) * B + b,
    b < B, of the dataset's global sequence, starting at m = `start`. DataLoader worker w of W makes
    m = start + w, start + w + W, ...; the DataLoader's round-robin over workers restores the order.

    Datasets with `sample(k)` (cdd.training.data) are read at those indices directly; any other
    IterableDataset is iterated from its start and the consumed micro-batches are skipped."""

    def __init__(self, dataset, batch_size: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.dataset, self.batch_size = dataset, batch_size
        self.rank, self.world_size, self.start = rank, world_size, start

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        B = self.batch_size
        if hasattr(self.dataset, "sample"):
            for m in itertools.count(self.start + worker, workers):
                g = m * self.world_size + self.rank
                yield collate([self.dataset.sample(g * B + b) for b in range(B)])
        else:
            it = iter(self.dataset)
            for g in itertools.count():
                samples = list(itertools.islice(it, B))
                if len(samples) < B:
                    return
                m, r = divmod(g, self.world_size)
                if r == self.rank and m >= self.start and (m - self.start) % workers == worker:
                    yield collate(samples)


def first_samples(dataset, n: int) -> dict[str, Any]:
    if hasattr(dataset, "sample"):
        return collate([dataset.sample(k) for k in range(n)])
    return collate(list(itertools.islice(iter(dataset), n)))


# ---------------------------------------------------------------------------------------------
# Building the run


def resolve_precision(mixed_precision: str) -> str:
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _cast_frozen(module: nn.Module | None, dtype: torch.dtype) -> None:
    """Store the frozen weights of a backbone module in `dtype` (trainable ones, e.g. a LoRA, stay float32)."""
    if module is None or dtype == torch.float32:
        return
    for p in module.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


def _check_resolution(config: TrainConfig, backbone: Backbone) -> int:
    resolution = config.resolution or backbone.resolution
    multiple = backbone.vae_scale_factor * 2 ** (len(backbone.unet.config.block_out_channels) - 1)
    if resolution % multiple:
        raise ConfigError(f"resolution {resolution} must be a multiple of {multiple} for backbone {config.backbone_dir}")
    return resolution


@dataclass
class Roles:
    student: ConditionedDenoiser  # the trained forward: the shared UNet plus the adapter (and LoRA / UNet by mode)
    trainable: dict[str, nn.Parameter]  # by name in `student`
    teacher: Any  # the frozen backbone without the adapter, or None when the objective does not need one
    adapter: Any
    lora: Any = None  # peft LoraConfig of the backbone LoRA (mode lora)
    lora_name: str | None = None
    set_w: Callable[[torch.Tensor | None], None] | None = None  # GD: the guidance weight of student and teacher
    source: Manifest | None = None  # the entry the student started from (`init_from`)
    teacher_source: Manifest | None = None  # guided CoDi continued from its entry: the teacher named apart (`teacher`)
    real_score: Any = None  # plain CoDi with DMD: the conditional entry (`teacher`), frozen, whose score DMD follows


def _fresh_adapter(config: TrainConfig, backbone: Backbone):
    options = {"rank": config.adapter_rank} if config.adapter == "controlnet-lora" else {}
    return build_adapter(config.adapter, backbone.unet, backbone.vae_scale_factor, **options)


IMAGE_CONDITION = {"channels": 3, "range": [0, 1]}  # every task's condition (the manifest adds its resolution)


def _same_condition(condition: dict) -> bool:
    """Whether an entry's condition is the kind this loop feeds every task's adapter (`IMAGE_CONDITION`: the SR
    input upsampled, the depth map as grey RGB, the edit source), so that a finetune may start from another task's
    adapter (transfer: one that already reproduces its input image is a start for an edit teacher, which must keep
    most of its source). A condition of another kind is refused."""
    return all(condition.get(k) == v for k, v in IMAGE_CONDITION.items())


def _guided_copy(entry, config: TrainConfig, unet):
    """A trainable copy of a controlnet-guided entry's adapter, serving `config.guidance` by default (GD stage 2's
    next round, or a guided CoDi student continued)."""
    adapter = adapter_from_config(entry.manifest.kind, entry.manifest.architecture, unet)
    adapter.load_weights(entry.adapter.weights())
    adapter.set_default_guidance(config.guidance)
    return adapter


def _guided_codi_start(config: TrainConfig, backbone: Backbone, entry, where: str):
    """Guidance-aware CoDi's student adapter and the entry that is its guided teacher: from a controlnet entry, the
    student is its copy with a zero-initialised w branch and the entry is the teacher; a controlnet-guided entry is
    a student continued (after its run's checkpoints are gone, say), its teacher named by `config.teacher`."""
    m = entry.manifest
    if m.kind == "controlnet-guided":
        if config.teacher is None:
            raise ConfigError(f"{where} is a controlnet-guided student: continuing it needs its guided teacher, "
                              "the controlnet entry it was distilled from (--teacher ENTRY)")
        teacher_entry = load_entry(config.teacher, backbone.unet, backbone.fingerprint)
        tm = teacher_entry.manifest
        if tm.kind != "controlnet" or tm.task != config.task:
            raise ConfigError(f"teacher {config.teacher} is a {tm.task} {tm.kind} adapter; the guided teacher of a "
                              f"{config.task} student is a {config.task} controlnet entry")
        adapter = _guided_copy(entry, config, backbone.unet)
    elif m.kind == "controlnet":
        if config.teacher is not None:
            raise ConfigError(f"{where} is a controlnet adapter: started from it, the student's guided teacher is "
                              "that entry itself (--teacher is for continuing a controlnet-guided student)")
        teacher_entry = entry
        adapter = GuidedControlNetAdapter.from_controlnet(entry.adapter, config.guidance).requires_grad_(True)
    else:
        raise ConfigError(f"{where} is a {m.kind} adapter; guidance-aware CoDi starts from a controlnet entry, which "
                          "is also its guided teacher, or continues a controlnet-guided one (--teacher)")
    if not teacher_entry.manifest.training.get("config", {}).get("caption_dropout"):
        warnings.warn(f"the guided teacher {teacher_entry.manifest.name} was trained without caption dropout: its "
                      "unconditional branch runs it on the empty caption, which it never saw", stacklevel=2)
    return adapter, teacher_entry


def _real_score_entry(config: TrainConfig, backbone: Backbone):
    """Plain CoDi with DMD: the conditional entry named by `config.teacher` (the fine-tuned teacher), whose score at
    the student's re-noised outputs is DMD's real one."""
    entry = load_entry(config.teacher, backbone.unet, backbone.fingerprint)
    tm = entry.manifest
    if tm.kind != "controlnet" or tm.task != config.task or tm.mode != "pe":
        raise ConfigError(f"teacher {config.teacher} is a {tm.task} {tm.kind} adapter (mode {tm.mode}); DMD's real "
                          f"score for a {config.task} student is a {config.task} controlnet entry in mode pe (the "
                          "fine-tuned teacher)")
    return entry


def roles_from_entry(config: TrainConfig, backbone: Backbone) -> Roles:
    """cm and gd distil a trained zoo entry (`init_from`): it becomes the frozen teacher, and the student starts
    as a copy of it (gd stage 1: plus the zero-initialised w branch). codi and finetune only start from it."""
    unet, schedule = backbone.unet, backbone.schedule
    entry = load_entry(config.init_from, unet, backbone.fingerprint)  # verifies hashes and the backbone
    m, where = entry.manifest, f"init_from {config.init_from} ({entry.manifest.name})"
    if m.task != config.task and not (config.method == "finetune" and _same_condition(m.condition)):
        raise ConfigError(f"{where} is a {m.task} adapter, not {config.task}"
                          + (" (finetune starts from another task's entry only when its condition is the same kind: "
                             f"{m.condition})" if config.method == "finetune" else ""))
    if m.mode != "pe":
        raise ConfigError(f"{where} has mode {m.mode}; {config.method} distils adapter-only (pe) entries")
    torch.manual_seed(config.seed)
    guided_codi = config.method == "codi" and config.adapter == "controlnet-guided"
    teacher_entry = entry  # cm, gd, guided codi: the frozen entry whose (guided) prediction is the teacher's
    real_score = None
    if guided_codi:
        adapter, teacher_entry = _guided_codi_start(config, backbone, entry, where)
    elif config.method in ("cm", "codi", "finetune"):
        if m.kind != config.adapter:
            raise ConfigError(f"{where} is a {m.kind} adapter: continue it with --adapter {m.kind}")
        adapter = _fresh_adapter(config, backbone)
        adapter.load_weights(entry.adapter.weights())
    elif config.gd_stage == 1:
        if m.kind != "controlnet":
            raise ConfigError(f"{where} is a {m.kind} adapter; GD stage 1 starts from a fine-tuned controlnet entry")
        if not m.training.get("config", {}).get("caption_dropout"):
            warnings.warn(f"{where} was trained without caption dropout: GD's unconditional branch runs it on the empty "
                          "caption, which it never saw (train the teacher with --caption-dropout 0.1)", stacklevel=2)
        adapter = GuidedControlNetAdapter.from_controlnet(entry.adapter, config.guidance).requires_grad_(True)
    else:
        if m.kind != "controlnet-guided":
            raise ConfigError(f"{where} is a {m.kind} adapter; GD stage 2 continues a controlnet-guided entry "
                              "(GD stage 1 or an earlier round)")
        adapter = _guided_copy(entry, config, unet)
    lora = lora_name = None
    if config.mode == "lora":  # codi only (TrainConfig): the backbone LoRA starts at zero, so the student starts as the entry
        lora_name = backbone_lora_name(config.entry_name)
        lora = add_backbone_lora(unet, lora_name, rank=config.lora_rank)
    student = ConditionedDenoiser(unet, schedule, adapter)
    adapter.train()
    trainable = {name: p for name, p in student.named_parameters() if p.requires_grad}
    if config.method == "finetune":  # the plain diffusion loss: no teacher, the entry is only where it starts
        teacher = None
    elif guided_codi:  # the controlnet entry, frozen, is the teacher whose guided prediction takes the step
        teacher = ConditionedDenoiser(unet, schedule, teacher_entry.adapter)
    elif config.method == "codi":  # CoDi's teacher is the unconditional backbone, whatever the student starts from
        teacher = None
        if config.teacher is not None:  # ... and DMD's real score a conditional entry (TrainConfig: dmd_weight > 0)
            teacher_entry = _real_score_entry(config, backbone)
            real_score = ConditionedDenoiser(unet, schedule, teacher_entry.adapter)
        if config.prev_predictor == "teacher":
            base = ConditionedDenoiser(unet, schedule)
            zeros = {n: torch.zeros_like(p) for n, p in base.named_parameters() if "lora_B" in n}
            teacher = WithWeights(base, zeros) if zeros else base
    else:
        teacher = ConditionedDenoiser(unet, schedule, entry.adapter)
    guided = [a for a in (adapter, teacher_entry.adapter) if isinstance(a, GuidedControlNetAdapter)]

    def set_w(w):
        for a in guided:
            a.set_guidance(w)

    return Roles(student, trainable, teacher, adapter, lora, lora_name, set_w=set_w, source=m,
                 teacher_source=teacher_entry.manifest if teacher_entry is not entry else None, real_score=real_score)


def build_roles(config: TrainConfig, backbone: Backbone) -> Roles:
    """The student (a ConditionedDenoiser over the shared UNet), its trainable parameters by mode, and the
    frozen teacher when the `teacher` predictor needs one."""
    if config.init_from is not None:
        return roles_from_entry(config, backbone)
    unet, schedule = backbone.unet, backbone.schedule
    torch.manual_seed(config.seed)  # adapter initialisation (gates, LoRA) belongs to the run's seed
    adapter = _fresh_adapter(config, backbone)
    # guidance-aware CoDi from a fresh adapter: the guided teacher is the frozen backbone alone (its text guidance)
    guided = config.method == "codi" and config.adapter == "controlnet-guided"
    needs_teacher = config.method == "codi" and (config.prev_predictor == "teacher" or guided)
    teacher = lora = lora_name = None
    if config.mode == "full":
        # The student owns the UNet now; only a teacher needs the original frozen weights kept aside.
        teacher = ConditionedDenoiser(copy.deepcopy(unet), schedule) if needs_teacher else None
        unet.requires_grad_(True).train()
    elif config.mode == "lora":
        lora_name = backbone_lora_name(config.entry_name)
        lora = add_backbone_lora(unet, lora_name, rank=config.lora_rank)
    student = ConditionedDenoiser(unet, schedule, adapter)
    adapter.train()
    trainable = {name: p for name, p in student.named_parameters() if p.requires_grad}
    if needs_teacher and teacher is None:
        base = ConditionedDenoiser(unet, schedule)
        # mode lora: the shared UNet carries the student's LoRA; a zero lora_B turns it off exactly.
        zeros = {n: torch.zeros_like(p) for n, p in base.named_parameters() if "lora_B" in n}
        teacher = WithWeights(base, zeros) if zeros else base
    return Roles(student, trainable, teacher, adapter, lora, lora_name, set_w=adapter.set_guidance if guided else None)


# ---------------------------------------------------------------------------------------------


def train(config: TrainConfig, *, dataset: IterableDataset | None = None, backbone: Backbone | None = None,
          on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train one adapter as `config` says. `dataset` overrides config.data (any IterableDataset of
    {"condition", "target", "text"} samples); `backbone` is a backbone already loaded from config.backbone,
    used in place (mode lora adds its LoRA to the UNet, mode full trains the UNet); `on_step(step)` is
    called after each optimizer step."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from .sample_grid import sample_grid, save_grid

    # 1. Processes, precision, run folder. `accelerate launch` sets the processes; nothing else changes.
    precision = resolve_precision(config.mixed_precision)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=config.grad_accum)
    main, device = accelerator.is_main_process, accelerator.device
    out = config.output_dir
    resume_from = resolve_resume(config)
    if config.resume is not None and (report := incomplete_report(out, resume_from)):
        accelerator.print(f"warning: {report}")
    if resume_from is not None:
        saved = TrainConfig.from_file(resume_from / "config.json")
        conflicts = config.resume_conflicts(saved, checkpoint_step(resume_from))
        if conflicts:
            raise ConfigError(f"cannot resume {resume_from} with other run settings: {'; '.join(conflicts)}")

    # 2. The frozen backbone, shared by every role; the trainable parameters by mode.
    if backbone is None:
        backbone = load_backbone(config.check_backbone(), device=device)
    resolution = _check_resolution(config, backbone)
    roles = build_roles(config, backbone)
    student_module, trainable, teacher = roles.student, roles.trainable, roles.teacher
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    for module in backbone.modules():
        _cast_frozen(module, weight_dtype)
    if isinstance(teacher, ConditionedDenoiser) and teacher.unet is not backbone.unet:  # mode full's kept-aside copy
        _cast_frozen(teacher.unet, weight_dtype)
    for frozen in (teacher, roles.real_score):  # cm / gd: the distilled entry; plain CoDi with DMD: its real score
        if isinstance(frozen, ConditionedDenoiser) and frozen.adapter is not None:
            _cast_frozen(frozen.adapter, weight_dtype)

    # 3. Optimizer on the trainable parameters only; theta^- the EMA of exactly those.
    optimizer = torch.optim.AdamW(parameter_groups(trainable, config), lr=config.lr, betas=config.adam_betas,
                                  eps=config.adam_eps, weight_decay=config.weight_decay)
    ema = EMA(trainable, config.ema, warmup=config.method == "finetune")
    student, optimizer = accelerator.prepare(student_module, optimizer)
    ema_target = WithWeights(student_module, ema.shadow)
    guided = config.method == "gd" or config.adapter == "controlnet-guided"
    empty_text = backbone.encode_text([""]) if guided else None
    objective = build_objective(config, backbone.schedule, empty_text=empty_text, set_w=roles.set_w)
    adversarial = build_adversarial(config, backbone.unet, backbone.schedule, resolution // backbone.vae_scale_factor,
                                    backbone.unet.config.cross_attention_dim, device, set_w=roles.set_w)
    matching = build_distribution_matching(config, roles, objective, device, encode=backbone.to_model_space)

    # 4. Resume: weights, EMA, optimizer, RNG states; the data stream restarts at the saved position. The
    # --init-from entry is pinned by its files' hashes: installing over that folder must not change a run's teacher.
    source = source_fingerprint(_pinned_files(roles)) if roles.source is not None else None
    rank, world = accelerator.process_index, accelerator.num_processes
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([config.seed, rank]).generate_state(1)[0]))
    step = 0
    if resume_from is not None:
        restore = adversarial if saved.adversarial_weight else None  # its discriminator, if the run had the term
        if adversarial is not None and restore is None:  # a run continued with the term added (adversarial_start)
            accelerator.print(f"{resume_from} was written without the adversarial term: the discriminator starts fresh")
        step = load_checkpoint(accelerator, resume_from, trainable=trainable, ema=ema, optimizer=optimizer,
                               generator=generator, fingerprint=backbone.fingerprint,
                               extra=[term for term in (restore, matching) if term is not None],
                               source=source, source_path=config.init_from + (f" (with the --teacher entry {config.teacher})"
                                                                              if config.teacher else "")
                               if config.init_from else None)
        accelerator.print(f"resumed from {resume_from} at step {step}")
    elif config.resume == "latest":
        accelerator.print(f"--resume: no checkpoint in {out / CHECKPOINTS} yet, starting a new run")

    if dataset is None:
        from .data.datasets import build_dataset

        options = config.dataset_options()
        dataset = build_dataset(config.task, config.data, size=resolution, seed=config.seed, **options)
        val_dataset = build_dataset(config.task, config.data, size=resolution, seed=config.seed + 1, **options)
    else:
        val_dataset = dataset
    stream = BatchStream(dataset, config.batch_size, rank, world, start=step * config.grad_accum)
    loader = DataLoader(stream, batch_size=None, num_workers=config.num_workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(config.seed))
    val = first_samples(val_dataset, GRID_ROWS) if main else None

    writer = None
    if main:
        writing(out, lambda: (out.mkdir(parents=True, exist_ok=True), write_text(out / "config.json", config.to_json())))
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "logs"), purge_step=step + 1 if step else None)
        _trim_metrics(out / "metrics.jsonl", step)
    n_trainable = sum(p.numel() for p in trainable.values())
    n_frozen = sum(p.numel() for p in student_module.parameters()) - n_trainable
    accelerator.print(
        f"{config.method} {config.task}: {config.adapter} adapter, mode {config.mode}, backbone {config.backbone_dir} "
        f"({backbone.fingerprint[:12]}), {resolution}px\n"
        f"  {n_trainable / 1e6:.2f}M trainable / {n_frozen / 1e6:.2f}M frozen parameters; {world} process(es) on "
        f"{device.type}, precision {precision}; batch {config.batch_size} x {config.grad_accum} accumulation x {world}\n"
        f"  steps {step} -> {config.max_train_steps}; output {out}; timing the first steps for an ETA ..."
    )

    def encode(batch, caption_dropout: float = 0.0):
        """Model-space targets, conditions and text embeddings (each caption replaced by "" with probability
        `caption_dropout`, drawn from the run's generator); the frozen encoders run without grad."""
        texts = list(batch["text"])
        if caption_dropout > 0:
            drop = torch.rand(len(texts), generator=generator) < caption_dropout
            texts = ["" if d else text for d, text in zip(drop.tolist(), texts)]
        with torch.no_grad():
            x = backbone.to_model_space(batch["target"].to(device)).float()
            text_emb = backbone.encode_text(texts)
        return x, batch["condition"].to(device), text_emb

    def checkpoint(loss):
        path = out / CHECKPOINTS / f"step-{step:06d}"
        save_checkpoint(accelerator, path, step=step, config=config, trainable=trainable, ema=ema,
                        optimizer=optimizer, generator=generator, fingerprint=backbone.fingerprint, loss=loss,
                        extra=[term for term in (adversarial, matching) if term is not None], source=source)
        return path

    probe = None
    if main and backbone.schedule.num_train_timesteps > max(NOISE_REMOVED_AT):
        x_val, c_val, text_val = encode(val)
        probe_eps = torch.randn(x_val.shape, generator=torch.Generator().manual_seed(config.seed)).to(device)
        probe = (x_val, c_val, text_val, probe_eps)

    def removed() -> dict[str, float]:
        """codi.noise_removed of the EMA weights at NOISE_REMOVED_AT, on the validation rows with fixed noise."""
        if probe is None:
            return {}
        x, c, text_emb, eps = probe
        with accelerator.autocast():
            return {f"noise_removed/t{t}": noise_removed(ema_target, x, c, text_emb, t, eps, backbone.schedule)
                    for t in NOISE_REMOVED_AT}

    def grid():
        if main:
            sampler, steps = config.sampling
            with accelerator.autocast():
                image = sample_grid(ema_target, backbone, val, sampler, sorted({1, 2, 4, steps}), seed=config.seed)
            save_grid(out / "samples" / f"step-{step:06d}.png", image)
            writer.add_image("samples", image, step, dataformats="HWC")
        accelerator.wait_for_everyone()

    # 5. The loop. One iteration = one micro-batch; an optimizer step every grad_accum of them. SIGINT and
    # SIGTERM let the step in progress finish, then write a checkpoint of it and stop (TrainingInterrupted).
    last_ckpt = checkpoint_dirs(out)[-1] if checkpoint_dirs(out) else None
    window: dict[str, list[float]] = {}
    first_loss: dict[str, float] = {}
    last_loss: dict[str, float] = {}
    grad_norm = torch.tensor(0.0)
    seconds_per_step, tick = None, None
    postfix: dict[str, str] = {}  # the progress bar's loss and time left
    last_save = time.monotonic()
    start_step = step
    bar = tqdm(total=config.max_train_steps, initial=step, disable=not main, desc=f"{config.method} {config.task}",
               dynamic_ncols=True)
    data = iter(loader)
    stop = StopSignals(announce=accelerator.print)
    with stop, bar:  # the bar is closed before any error is printed
        while step < config.max_train_steps:
            if _any_process(accelerator, stop.signal is not None) and accelerator.sync_gradients:
                if step > start_step:
                    last_ckpt = checkpoint(last_loss)
                raise TrainingInterrupted(stop.signal or signal.SIGTERM, step, last_ckpt)
            try:
                batch = next(data)
            except Exception:  # noqa: BLE001 - a DataLoader worker that took the signal too: stop above
                if stop.signal is None:
                    raise
                continue
            x, c, text_emb = encode(batch, config.caption_dropout)
            extra = {}
            if config.changed_weight:  # edit teachers: the source is the condition, in [0, 1]
                extra["weight"] = changed_region_weight(batch["target"].to(device), c * 2 - 1, x.shape[-2:],
                                                        config.changed_weight)
            with accelerator.accumulate(student):
                with accelerator.autocast():
                    terms = objective(student, ema_target, teacher, x, c, text_emb, generator, **extra)
                    if adversarial is not None and step >= config.adversarial_start:  # + W x the discriminator
                        # term, after one discriminator step
                        terms = adversarial(terms, student, x, c, text_emb, generator)
                    if matching is not None:  # + W x the DMD loss, after it took one fake score step
                        terms = matching(terms, student, x, c, text_emb, generator)
                _stop_if_not_finite(accelerator, terms.loss, "loss", step + 1, terms.parts, last_ckpt)
                accelerator.backward(terms.loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(list(trainable.values()), config.grad_clip)
                    if precision != "fp16":  # fp16's grad scaler skips overflowing steps by design
                        _stop_if_not_finite(accelerator, grad_norm, "gradient norm", step + 1, terms.parts, last_ckpt)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in {"total": terms.loss.detach(), **terms.parts}.items():
                window.setdefault(k, []).append(float(v))
            if not accelerator.sync_gradients:
                continue

            ema.update(trainable, step + 1)  # theta^- <- mu theta^- + (1 - mu) theta
            step += 1
            bar.update(1)

            # Logging: means over the window and over processes.
            if step % config.log_every == 0 or step == start_step + 1 or step == config.max_train_steps:
                means = accelerator.reduce(torch.tensor([np.mean(v) for v in window.values()], device=device), "mean")
                last_loss = dict(zip(window, means.tolist()))
                first_loss = first_loss or last_loss
                window = {}
                if main:
                    scalars = {f"loss/{k}": v for k, v in last_loss.items()}
                    scalars.update({"train/lr": optimizer.param_groups[0]["lr"], "train/grad_norm": float(grad_norm)})
                    scalars.update(removed())
                    for k, v in scalars.items():
                        writer.add_scalar(k, v, step)
                    writing(out / "metrics.jsonl", lambda: _append_line(out / "metrics.jsonl",
                                                                        {"step": step, **scalars, "time": time.time()}))
                    postfix["loss"] = f"{last_loss['total']:.4f}"

            # The ETA: a moving average of the seconds per step, from the second step on (the first pays for
            # warm-up), checkpoints and sample grids left out; printed once after a few steps, then in the bar.
            now = time.perf_counter()
            if tick is not None:
                spent = now - tick
                seconds_per_step = spent if seconds_per_step is None else (
                    ETA_SMOOTHING * spent + (1 - ETA_SMOOTHING) * seconds_per_step)
            tick = now
            remaining = (seconds_per_step or 0) * (config.max_train_steps - step)
            if seconds_per_step is not None and step == min(start_step + 1 + ETA_STEPS, config.max_train_steps) \
                    and remaining > 0:
                accelerator.print(
                    f"\n{seconds_per_step:.2f} s/step on this machine: {config.max_train_steps - start_step} steps take about "
                    f"{_duration(seconds_per_step * (config.max_train_steps - start_step))} "
                    f"(done around {time.strftime('%H:%M', time.localtime(time.time() + remaining))}; "
                    "checkpoints and sample grids not counted)"
                )
            if seconds_per_step is not None:
                postfix["left"] = _duration(remaining)
            bar.set_postfix(postfix, refresh=False)

            timed = bool(config.checkpoint_minutes) and time.monotonic() - last_save >= config.checkpoint_minutes * 60
            if (_any_process(accelerator, timed) or (config.checkpoint_every and step % config.checkpoint_every == 0)
                    or step == config.max_train_steps):
                last_ckpt = checkpoint(last_loss)
                last_save = time.monotonic()
            if (config.sample_every and step % config.sample_every == 0) or step == config.max_train_steps:
                grid()
            if on_step is not None:
                on_step(step)
            tick = time.perf_counter() if tick is not None else None  # checkpoint and grid time is not a step's
    bar.close()

    # 6. The zoo entry: the EMA weights, the config, the backbone fingerprint, the default sampler.
    entry = None
    if main:
        entry = export_entry(config, backbone, roles, ema, resolution, step, last_loss)
        accelerator.print(f"zoo entry written to {entry}")
    accelerator.wait_for_everyone()
    if writer is not None:
        writer.close()
    accelerator.end_training()
    return TrainResult(step, entry, last_ckpt, first_loss, last_loss, seconds_per_step, student_module, list(trainable))


def export_entry(config: TrainConfig, backbone: Backbone, roles: Roles, ema: EMA, resolution: int, step: int,
                 loss: dict[str, float]) -> Path:
    """Write the zoo entry with the EMA weights (copied into the live modules: training is over)."""
    ema.copy_to(roles.trainable)
    sampler, steps = config.sampling
    backbone_lora = unet_state = None
    if config.mode == "lora":
        cfg = {"r": roles.lora.r, "lora_alpha": roles.lora.lora_alpha, "target_modules": sorted(roles.lora.target_modules)}
        backbone_lora = (cfg, backbone_lora_state(backbone.unet, roles.lora_name))
    elif config.mode == "full":
        unet_state = {k: v.float() for k, v in backbone.unet.state_dict().items()}
    save_entry(
        config.entry_dir,
        roles.adapter,
        name=config.entry_name,
        task=config.task,
        backbone_fingerprint=backbone.fingerprint,
        condition={**IMAGE_CONDITION, "resolution": resolution},
        sampler=sampler,
        steps=steps,
        mode=config.mode,
        backbone_lora=backbone_lora,
        unet_state=unet_state,
        training={"method": config.method, "config": config.to_dict(), "step": step, "loss": loss,
                  "weights": "ema", "backbone": str(config.backbone_dir), **_init_from(config, roles)},
    )
    return config.entry_dir


def _init_from(config: TrainConfig, roles: Roles) -> dict[str, Any]:
    """The manifest's record of the entries a run started from: `init_from`, and a guided student's `teacher`."""
    out = {}
    for key, path, m in (("init_from", config.init_from, roles.source), ("teacher", config.teacher, roles.teacher_source)):
        if m is not None:
            out[key] = {"path": str(path), "name": m.name, "method": m.training.get("method")}
    return out


def _pinned_files(roles: Roles) -> dict[str, str]:
    """The files (name -> sha256) a checkpoint pins: the `init_from` entry's, and the teacher's when one is named
    apart (under "teacher/"), so that neither can change under a resumed run."""
    files = dict(roles.source.files)
    if roles.teacher_source is not None:
        files.update({f"teacher/{k}": v for k, v in roles.teacher_source.files.items()})
    return files


def _stop_if_not_finite(accelerator, value: torch.Tensor, what: str, step: int, parts: dict, last_ckpt: Path | None):
    """Stop every process together when any of them sees a NaN/inf; nothing is saved from this step."""
    value = value.detach()
    bad = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    if bad.item() == 0:
        return
    terms = ", ".join(f"{k} {float(v):.4g}" for k, v in parts.items())
    kept = (f"the last good checkpoint {last_ckpt} is intact; continue from it with --resume (e.g. with a lower --lr)"
            if last_ckpt is not None else "no checkpoint had been written yet")
    raise TrainingStopped(f"{what} is {float(value):.4g} at step {step} ({terms}); training stopped: {kept}")


def _any_process(accelerator, flag: bool) -> bool:
    """True when `flag` is true on any process (every process takes the same branch)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item())


def _append_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _trim_metrics(path: Path, step: int) -> None:
    """A resumed run rewrites the steps after its checkpoint: drop their old lines."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    write_text(path, "".join(ln + "\n" for ln in lines))


def _duration(seconds: float) -> str:
    seconds = int(math.ceil(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"
