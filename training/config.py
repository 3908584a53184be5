"""The one typed configuration of an adapter training run (`cdd-train-adapter`).

Validated on construction (errors name the field and the value at fault), saved as
`<output>/config.json` beside the run and inside every checkpoint, printed by `--dry-run`.
Defaults are tuned for the embedded 64x64 scenes world on a CPU; the published Stable-Diffusion-class
settings are AdamW (0.9, 0.999), weight decay 1e-2, gradient clip 1.0, constant lr 1e-5, batch 2 per device.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters.architectures import ADAPTER_KINDS
from ..adapters.zoo import MODES, default_backbone_dir
from .data.degradations import DEFAULT_TRAINING_PRESET, DEGRADATION_PRESETS

TASKS = ("super-resolution", "depth", "edit")
METHODS = ("codi", "finetune", "cm", "gd")
PREV_PREDICTORS = ("prev", "ddim", "teacher")
CONSISTENCY_SPACES = ("eps", "x")
DISTANCES = ("l2", "huber")
GUIDED_COND_TARGETS = ("data", "teacher")  # guidance-aware CoDi: what its conditional term moves along the guidance
COND_WEIGHTINGS = ("x", "truncated-snr")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")

# Fields that may change when a run is resumed; every other field defines the run and must match
# the checkpoint's config (see `TrainConfig.resume_conflicts`). A moved backbone folder is allowed: the
# loop checks the backbone fingerprint instead of its path.
RESUMABLE_CHANGES = frozenset(
    {"max_train_steps", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints", "sample_every", "log_every", "num_workers", "resume",
     "zoo_out", "output", "backbone", "mixed_precision"}
)

ADVERSARIAL_FIELDS = frozenset(  # the distribution-level term (training/adversarial.py)
    {"adversarial_weight", "adversarial_lr", "adversarial_t_max", "adversarial_text", "adversarial_start"})

# Fields added after runs were saved without them, with the value those runs used when it differs from today's
# default: a saved config.json lacking one is read with this value, so resuming it changes nothing.
LEGACY_DEFAULTS = {"degradation": "realesrgan"}

# The sampler and step count a trained entry is served with, by training method (the zoo manifest's default).
DEFAULT_SAMPLING = {"codi": ("prev", 4), "finetune": ("ddim", 50), "cm": ("cm", 4)}
# Methods that start from a trained zoo entry (`init_from`): the fine-tuned teacher, or the previous GD round.
FROM_ENTRY = ("cm", "gd")
# Methods that may start from a trained entry (codi: "finetune-first", the student starts as that entry;
# finetune: a teacher continued with another recipe, e.g. more caption dropout).
MAY_INIT_FROM = ("codi", "cm", "gd", "finetune")


def run_dir(task: str, adapter: str, method: str, output: str | None) -> Path:
    """Where a run writes: --output, or runs/<task>-<adapter>-<method>."""
    return Path(output) if output is not None else Path("runs") / f"{task}-{adapter}-{method}"


class ConfigError(ValueError):
    """A training option that cannot be used as given."""


@dataclass
class TrainConfig:
    task: str
    backbone: str | None = None  # None: the embedded default backbone (cdd.adapters.zoo.default_backbone_dir())
    data: str = "scenes"
    data_options: dict[str, Any] = field(default_factory=dict)  # passed to build_dataset (column names, ...)
    adapter: str = "controlnet"
    mode: str = "pe"  # pe: adapter only; lora: + backbone LoRA; full: + the whole backbone UNet
    method: str = "codi"
    output: str | None = None  # None: runs/<task>-<adapter>-<method>
    zoo_out: str | None = None  # None: <output>/entry
    name: str | None = None  # zoo entry name; None: <task>-<adapter>-<method>
    init_from: str | None = None  # cm, gd: the zoo entry distilled from (the fine-tuned teacher, or GD's previous
    # round); codi: optional, the student starts as that entry (its teacher stays the frozen backbone)
    teacher: str | None = None  # guidance-aware CoDi continued from a controlnet-guided entry (init_from): the
    # controlnet entry that is its guided teacher (a guided entry started from a controlnet one is its own teacher);
    # plain CoDi with dmd_weight: the conditional controlnet entry (the fine-tuned teacher) that is DMD's real score

    # CoDi, Algorithm 1
    prev_predictor: str = "prev"
    consistency_space: str = "eps"
    distance: str = "l2"
    huber_c: float = 1e-3  # pseudo-Huber c, per element (the diffusers LCM scripts' default)
    cond_weight: float = 1.0  # r in eq. 11
    cond_weighting: str = "x"  # x: d_x(x_hat_t, x) as eq. 11; truncated-snr: times max(alpha_t^2 / sigma_t^2, 1),
    # the larger of the x-space and the eps-space denoising losses (codi.CoDiLoss)
    same_t: bool = True  # one n per batch (Algorithm 1); False: one per sample (ablation)
    ema: float = 0.999  # mu, the EMA rate of the target theta^-
    steps: int = 48  # N, intervals of [0, T): the grid round(n T/N) - 1 holds the served 1, 2 and 4-step timesteps

    # Guided Distillation: stage 1 distils the guided teacher into a w-conditioned student,
    # stage 2 halves the sampling steps, one round per run (`gd_steps` student steps = 2 x gd_steps teacher steps)
    gd_stage: int = 1
    gd_steps: int = 4
    guidance_min: float = 0.0  # w ~ U[guidance_min, guidance_max] during training
    guidance_max: float = 2.0
    guidance: float = 0.0  # the w the entry is served with: 0 is the conditional teacher's own distribution
    guided_cond_term: bool = True  # guidance-aware codi: the r d_x term's target is x + w (x_c - x_u), not x alone
    guidance_lr_scale: float = 1.0  # guidance-aware codi: the w branch (the adapter's w projection) learns at lr x this
    guided_cond_target: str = "data"  # guidance-aware codi: that target moves the data (x + w (x_c - x_u)) or the
    # guided teacher's own prediction ("teacher": x_c + w (x_c - x_u), no spread of the data around x_c)
    guidance_unconditional: str = "text"  # guidance-aware codi: what the teacher's unconditional branch drops: the
    # text (the condition image goes to both branches), text+condition (the backbone alone with "": the guidance then
    # also pushes along the condition, and still does with the empty prompt), or text+condition-if-empty (the
    # backbone alone only for the samples whose prompt is "")

    caption_dropout: float = 0.0  # the probability of training on the empty caption instead of the sample's: a
    # teacher meant for Guided Distillation needs it (0.1), since GD's unconditional branch runs it on "" (On Distillation of Guided Diffusion Models)
    # and a super-resolution adapter needs it to work with the empty prompt the API sends when a user gives none

    changed_weight: float = 0.0  # edit (finetune: the diffusion loss; codi: its guidance term): the loss inside the
    # region the edit changes weighs 1 + changed_weight against 1 outside, per image normalised to mean 1
    # (`changed_region_weight`); 0: the plain loss

    # the distribution-level term (training/adversarial.py): a discriminator on the frozen backbone's features of
    # the student's re-noised one-step prediction; 0: plain CoDi, bit for bit
    adversarial_weight: float = 0.0  # W, the weight of the student's adversarial term in the loss
    adversarial_lr: float = 1e-3  # the discriminator heads' AdamW learning rate (1e-4: it had not learnt after 530 steps)
    adversarial_t_max: int = 249  # the discriminator's re-noising timestep t' ~ U{0..t_max}
    adversarial_text: bool = False  # the heads also read the caption (a projection term per head)
    adversarial_start: int = 0  # the term is on from this optimizer step (distil first, then add it);
    # a run without the term may be resumed with it from a checkpoint at or before this step

    # distribution matching (training/distribution_matching.py, CoDi from an entry): the reverse-KL gradient of DMD,
    # the teacher's score against a fake score adapter trained on the student's outputs; the teacher is guidance-aware
    # CoDi's guided one, or for plain CoDi (--adapter controlnet) the conditional entry named by `teacher`, at w = 0
    dmd_weight: float = 0.0  # W, the weight of the student's DMD loss; 0: plain CoDi, bit for bit
    dmd_lr: float = 3e-4  # the fake score adapter's AdamW learning rate
    dmd_t_min: int = 20  # the scores are compared at t ~ U{dmd_t_min..dmd_t_max} (DMD's 0.02 T .. 0.98 T)
    dmd_t_max: int = 980
    dmd_one_step: float = 0.5  # the share of the student's predictions taken from the 1-step timestep (999); the rest
    # from the 2- and 4-step ones (749, 499, 249): 1.0 leaves the 2- and 4-step paths to CoDi alone
    dmd_fake_steps: int = 1  # fake score updates per student step, each extra one on fresh student outputs (DMD2: 5)
    dmd_from_input: float = 0.0  # the share of those predictions made one step from the input instead (the served
    # `strength`: z = alpha_t E(2 c - 1) + sigma_t eps at t = dmd_from_input_t; super-resolution and edit); 0: none
    dmd_from_input_t: int = 499  # ... at this timestep (strength 0.5: 499)

    # super-resolution data
    degradation: str | None = None  # the degradation preset (training/data/degradations.py); None: mild-64px for
    # super-resolution (the published realesrgan leaves many 16 px inputs unrecognisable), unused by the other tasks
    photo_fraction: float = 0.0  # share of photo patches (bundled training photographs, captioned "a photo") mixed
    # into the scenes stream; super-resolution only (a photo has no depth map or edit)

    # architecture sizes
    adapter_rank: int = 8  # LoRA rank inside a controlnet-lora adapter
    lora_rank: int = 4  # backbone LoRA rank (mode lora)

    # optimisation: AdamW as published, lr raised for the tiny world (1e-5 is the SD-class setting)
    lr: float = 1e-4
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    batch_size: int = 4  # per process
    grad_accum: int = 1
    max_train_steps: int = 1000
    seed: int = 0
    resolution: int | None = None  # None: the backbone's native resolution
    mixed_precision: str = "auto"  # auto: bf16 on a CUDA device that supports it, else no
    num_workers: int = 2  # DataLoader workers rendering / reading data ahead of the model

    # long runs
    checkpoint_every: int = 0  # steps between checkpoints; 0: by time only (checkpoint_minutes)
    checkpoint_minutes: float = 10.0  # minutes between checkpoints, whatever a step takes; 0: by steps only
    keep_checkpoints: int = 2
    sample_every: int = 250  # 0: only at the end
    log_every: int = 10
    resume: str | None = None  # "latest" (in <output>/checkpoints), a checkpoint folder or a run folder

    def __post_init__(self) -> None:
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        self.data = str(self.data)
        for name in ("backbone", "output", "zoo_out", "resume", "init_from", "teacher"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, str(value))
        _choice("task", self.task, TASKS)
        _choice("adapter", self.adapter, ADAPTER_KINDS)
        _choice("mode", self.mode, MODES)
        _choice("method", self.method, METHODS)
        _choice("prev_predictor", self.prev_predictor, PREV_PREDICTORS)
        _choice("consistency_space", self.consistency_space, CONSISTENCY_SPACES)
        _choice("distance", self.distance, DISTANCES)
        _choice("cond_weighting", self.cond_weighting, COND_WEIGHTINGS)
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _check("gd_stage", self.gd_stage, self.gd_stage in (1, 2), "must be 1 (guidance distillation) or 2 (halving the steps)")
        _check("gd_steps", self.gd_steps, 1 <= self.gd_steps <= 500, "must be in 1..500 (the student's steps; the teacher takes twice as many)")
        _check("guidance_max", self.guidance_max, self.guidance_min <= self.guidance_max,
               f"must be >= guidance_min ({self.guidance_min})")
        _check("guidance_unconditional", self.guidance_unconditional,
               self.guidance_unconditional in ("text", "text+condition", "text+condition-if-empty"),
               "must be text, text+condition or text+condition-if-empty")
        _check("guidance_lr_scale", self.guidance_lr_scale, self.guidance_lr_scale > 0, "must be positive")
        _check("guided_cond_target", self.guided_cond_target, self.guided_cond_target in GUIDED_COND_TARGETS,
               "must be " + " or ".join(GUIDED_COND_TARGETS))
        _check("guidance", self.guidance, self.guidance_min <= self.guidance <= self.guidance_max,
               f"must be in [guidance_min, guidance_max] = [{self.guidance_min}, {self.guidance_max}]")
        if self.method in FROM_ENTRY and not self.init_from:
            raise ConfigError(f"method {self.method} distils a trained entry: give init_from (--init-from ENTRY), "
                              "the fine-tuned teacher" + (" or the previous GD round" if self.method == "gd" else ""))
        if self.method not in MAY_INIT_FROM and self.init_from:
            raise ConfigError(f"init_from is for methods {', '.join(MAY_INIT_FROM)}, not {self.method}")
        if self.init_from and not Path(self.init_from).is_dir():
            raise ConfigError(f"init_from {self.init_from!r} is not a zoo entry folder")
        plain_dmd = self.method == "codi" and self.adapter == "controlnet" and self.init_from and self.dmd_weight
        if self.teacher and not (self.method == "codi" and self.adapter == "controlnet-guided" and self.init_from
                                 or plain_dmd):
            raise ConfigError("teacher is the guided teacher of guidance-aware CoDi continued from a controlnet-guided "
                              "entry: it needs --method codi --adapter controlnet-guided --init-from ENTRY (or, with "
                              "--adapter controlnet and --dmd-weight, the conditional entry that is DMD's real score)")
        if self.teacher and not Path(self.teacher).is_dir():
            raise ConfigError(f"teacher {self.teacher!r} is not a zoo entry folder")
        if self.method == "gd" and self.adapter != "controlnet-guided":
            raise ConfigError(f"method gd trains a controlnet-guided adapter (the student takes w), not {self.adapter!r}")
        if self.init_from and self.mode != "pe" and not (self.method == "codi" and self.mode == "lora"):
            raise ConfigError(f"init_from continues an adapter-only entry: mode must be pe (or lora with method codi, "
                              f"which adds a zero-initialised backbone LoRA), not {self.mode!r}")
        _check("ema", self.ema, 0 <= self.ema < 1, "must be in [0, 1)")
        _check("caption_dropout", self.caption_dropout, 0 <= self.caption_dropout < 1, "must be in [0, 1)")
        if self.task == "super-resolution":
            self.degradation = self.degradation or DEFAULT_TRAINING_PRESET
            _choice("degradation", self.degradation, tuple(DEGRADATION_PRESETS))
        elif self.degradation is not None:
            raise ConfigError(f"degradation {self.degradation!r}: degradation presets are for super-resolution, "
                              f"not {self.task}")
        _check("photo_fraction", self.photo_fraction, 0 <= self.photo_fraction <= 1, "must be in [0, 1]")
        if self.photo_fraction and (self.task != "super-resolution" or self.data != "scenes"):
            raise ConfigError(f"photo_fraction {self.photo_fraction} mixes photo patches into the scenes stream of "
                              f"super-resolution, not into {self.task} on data {self.data!r}")
        _check("changed_weight", self.changed_weight, self.changed_weight >= 0, "must be >= 0")
        if self.changed_weight and (self.task != "edit" or self.method not in ("finetune", "codi")):
            raise ConfigError(f"changed_weight {self.changed_weight} weighs the region an edit changes in the data "
                              f"term of the loss: it is for --task edit with --method finetune or codi, not "
                              f"{self.task} {self.method}")
        _check("adversarial_weight", self.adversarial_weight, self.adversarial_weight >= 0, "must be >= 0")
        _check("adversarial_lr", self.adversarial_lr, self.adversarial_lr > 0, "must be > 0")
        _check("adversarial_t_max", self.adversarial_t_max, 0 <= self.adversarial_t_max <= 999,
               "must be in 0..999 (the discriminator's re-noising timesteps)")
        if self.adversarial_weight and (self.method != "codi" or self.mode != "pe"):
            raise ConfigError(f"adversarial_weight {self.adversarial_weight}: the discriminator term is built for "
                              f"--method codi in mode pe (its features come from the frozen backbone UNet), not "
                              f"{self.method} / mode {self.mode}")
        _check("adversarial_start", self.adversarial_start, self.adversarial_start >= 0, "must be >= 0")
        if self.adversarial_text and not self.adversarial_weight:
            raise ConfigError("adversarial_text: the discriminator reads the caption only when there is one "
                              "(--adversarial-weight > 0)")
        _check("dmd_weight", self.dmd_weight, self.dmd_weight >= 0, "must be >= 0")
        _check("dmd_lr", self.dmd_lr, self.dmd_lr > 0, "must be > 0")
        _check("dmd_t_max", self.dmd_t_max, 0 <= self.dmd_t_min <= self.dmd_t_max <= 999,
               f"must be in dmd_t_min ({self.dmd_t_min})..999 (the timesteps the scores are compared at)")
        _check("dmd_one_step", self.dmd_one_step, 0 <= self.dmd_one_step <= 1, "must be in [0, 1]")
        _check("dmd_fake_steps", self.dmd_fake_steps, self.dmd_fake_steps >= 1, "must be >= 1")
        _check("dmd_from_input", self.dmd_from_input, 0 <= self.dmd_from_input <= 1, "must be in [0, 1]")
        _check("dmd_from_input_t", self.dmd_from_input_t, 0 <= self.dmd_from_input_t <= 999, "must be in 0..999")
        if self.dmd_from_input and not self.dmd_weight:
            raise ConfigError("dmd_from_input: the predictions made from the input are DMD's (--dmd-weight > 0)")
        if self.dmd_from_input and self.task not in ("super-resolution", "edit"):
            raise ConfigError(f"dmd_from_input: task {self.task!r} has no input to start from (its condition is not "
                              "a picture of the output; super-resolution and edit are)")
        if self.dmd_weight and not (self.method == "codi" and self.init_from and self.mode == "pe" and (
                self.adapter == "controlnet-guided" or self.adapter == "controlnet" and self.teacher)):
            raise ConfigError(f"dmd_weight {self.dmd_weight}: distribution matching compares the student with the "
                              "guided teacher of guidance-aware CoDi: it needs --method codi --adapter controlnet-guided "
                              "--init-from ENTRY in mode pe (or --adapter controlnet --init-from ENTRY --teacher ENTRY: "
                              "plain CoDi, whose teacher is the backbone alone, with a conditional entry as the real score)")
        _check("steps", self.steps, 1 <= self.steps <= 1000, "must be in 1..1000 (N intervals of the T timesteps)")
        _check("huber_c", self.huber_c, self.huber_c > 0, "must be > 0")
        _check("cond_weight", self.cond_weight, self.cond_weight >= 0, "must be >= 0")
        _check("lr", self.lr, self.lr > 0, "must be > 0")
        _check("weight_decay", self.weight_decay, self.weight_decay >= 0, "must be >= 0")
        _check("adam_betas", self.adam_betas, len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
               "must be two numbers in [0, 1)")
        _check("adam_eps", self.adam_eps, self.adam_eps > 0, "must be > 0")
        _check("grad_clip", self.grad_clip, self.grad_clip > 0, "must be > 0")
        for name in ("batch_size", "grad_accum", "max_train_steps", "keep_checkpoints", "log_every",
                     "adapter_rank", "lora_rank"):
            _check(name, getattr(self, name), int(getattr(self, name)) >= 1, "must be >= 1")
        _check("checkpoint_minutes", self.checkpoint_minutes, self.checkpoint_minutes >= 0, "must be >= 0")
        for name in ("sample_every", "num_workers", "checkpoint_every"):
            _check(name, getattr(self, name), int(getattr(self, name)) >= 0, "must be >= 0")
        _check("resolution", self.resolution, self.resolution is None or self.resolution >= 8, "must be >= 8")
        if self.name is not None and (not self.name or "/" in self.name):
            raise ConfigError(f"name {self.name!r}: a zoo entry name must be non-empty and contain no '/'")
        if self.data != "scenes" and not Path(self.data).exists():
            raise ConfigError(f"data {self.data!r} is neither 'scenes' nor an existing path")

    # ----------------------------------------------------------------------------------------
    # derived values (not stored: the saved config is what the user chose)

    @property
    def backbone_dir(self) -> Path:
        return Path(self.backbone) if self.backbone is not None else default_backbone_dir()

    @property
    def output_dir(self) -> Path:
        return run_dir(self.task, self.adapter, self.method, self.output)

    @property
    def entry_dir(self) -> Path:
        return Path(self.zoo_out) if self.zoo_out is not None else self.output_dir / "entry"

    @property
    def entry_name(self) -> str:
        return self.name or f"{self.task}-{self.adapter}-{self.method}" + ("" if self.mode == "pe" else f"-{self.mode}")

    @property
    def sampling(self) -> tuple[str, int]:
        """The default sampler and steps recorded in the zoo manifest."""
        if self.method == "gd":
            # stage 2's student is trained to take deterministic DDIM steps of T/k (two teacher steps of T/2k each):
            # it is served with exactly those; the stochastic `gd` sampler takes steps it was not trained for
            return ("ddim", 2 * self.gd_steps) if self.gd_stage == 1 else ("ddim", self.gd_steps)
        return DEFAULT_SAMPLING[self.method]

    def check_backbone(self) -> Path:
        """The backbone folder, or a clear error naming it (the default one is produced by cdd-pretrain-backbone)."""
        path = self.backbone_dir
        if not (path / "model_index.json").is_file():
            hint = (
                "the embedded default backbone has not been built yet (cdd-pretrain-backbone writes it); "
                "pass --backbone PATH to a diffusers backbone folder"
                if self.backbone is None
                else "pass --backbone PATH to a diffusers backbone folder (with model_index.json)"
            )
            raise ConfigError(f"backbone folder {path} has no model_index.json: {hint}")
        return path

    # ----------------------------------------------------------------------------------------

    def dataset_options(self) -> dict[str, Any]:
        """build_dataset's options: data_options, plus the super-resolution degradation and photo share (a
        `degradation` given in data_options wins)."""
        opts = dict(self.data_options)
        if self.task == "super-resolution":
            from .data.degradations import degradation_preset

            opts.setdefault("degradation", degradation_preset(self.degradation))
            if self.photo_fraction:
                opts["photo_fraction"] = self.photo_fraction
        return opts

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        if "task" not in data:
            raise ConfigError("config lacks the required field 'task'")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """A saved config.json (fields it predates read as LEGACY_DEFAULTS)."""
        path = Path(path)
        try:
            return cls.from_dict(saved_config(json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def resume_conflicts(self, saved: TrainConfig, step: int | None = None) -> list[str]:
        """Run-defining fields whose value differs from the checkpoint's config, as 'field: saved -> now'. The
        adversarial term's fields may be added to a checkpoint (at `step`) of a run without it when the term starts
        at or after that step: until then the run with the term takes the same steps (the term draws nothing from
        the run's generator while it is off)."""
        mine, theirs = self.to_dict(), saved.to_dict()
        free = set(RESUMABLE_CHANGES)
        if not saved.adversarial_weight and step is not None and self.adversarial_start >= step:
            free |= ADVERSARIAL_FIELDS
        return [f"{k}: {theirs[k]!r} -> {mine[k]!r}" for k in mine if k not in free and mine[k] != theirs[k]]


def saved_config(data: dict[str, Any]) -> dict[str, Any]:
    """A config saved by an earlier version, with the fields it lacks set to what that version did
    (`LEGACY_DEFAULTS`): a super-resolution run from before presets was trained on realesrgan."""
    data = dict(data)
    if data.get("task") == "super-resolution":
        for name, value in LEGACY_DEFAULTS.items():
            data.setdefault(name, value)
    return data


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} {value!r} is not one of {', '.join(choices)}")


def _check(name: str, value: Any, ok: bool, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name} {value!r} {why}")
