"""`cdd-train-adapter`: distil a task adapter with Conditional Diffusion Distillation (or fine-tune it).

    cdd-train-adapter --task depth                      # the embedded backbone and scenes world
    cdd-train-adapter --task depth --resume             # continue the killed run in runs/depth-controlnet-codi
    accelerate launch --num_processes 8 -m cdd.training.train_adapter --task edit --mixed-precision bf16

Every option maps onto one field of cdd.training.config.TrainConfig; `--dry-run` prints the
validated config. See docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..adapters.architectures import ADAPTER_KINDS
from ..adapters.zoo import MODES, ZooError
from ..runtime.diffusion.backbone import BackboneError
from .config import (
    COND_WEIGHTINGS,
    CONSISTENCY_SPACES,
    DISTANCES,
    GUIDED_COND_TARGETS,
    METHODS,
    MIXED_PRECISION,
    PREV_PREDICTORS,
    TASKS,
    ConfigError,
    TrainConfig,
    run_dir,
    saved_config,
)
from .data.degradations import DEFAULT_TRAINING_PRESET, DEGRADATION_PRESETS

CODI_OPTIONS = ("prev_predictor", "consistency_space", "distance", "huber_c", "cond_weight", "cond_weighting", "same_t",
                "steps")
GD_OPTIONS = ("gd_stage", "gd_steps", "guidance_min", "guidance_max", "guidance")
GUIDED_CODI_ONLY = ("guided_cond_term", "guided_cond_target", "guidance_unconditional", "guidance_lr_scale")  # the guided teacher of CoDi; GD has its own loss
GUIDED_CODI_OPTIONS = ("guidance_min", "guidance_max", "guidance") + GUIDED_CODI_ONLY  # codi with --adapter controlnet-guided
# Options a method has no use for (given anyway, they are refused rather than silently ignored).
EDIT_WEIGHT = ("changed_weight",)  # finetune's diffusion loss and codi's guidance term
UNUSED = {
    "codi": GD_OPTIONS + GUIDED_CODI_ONLY,
    "finetune": CODI_OPTIONS + GD_OPTIONS + GUIDED_CODI_ONLY,
    "cm": ("prev_predictor", "consistency_space", "cond_weight", "cond_weighting") + GD_OPTIONS + GUIDED_CODI_ONLY
          + EDIT_WEIGHT,  # fixed by the method
    "gd": CODI_OPTIONS + GUIDED_CODI_ONLY + EDIT_WEIGHT,
}


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(task="depth")  # for the defaults shown in --help
    p = argparse.ArgumentParser(
        prog="cdd-train-adapter",
        description="Distil a task adapter with CoDi (Algorithm 1 of 'Conditional Diffusion Distillation') or "
        "fine-tune it, and write a zoo entry.",
        argument_default=argparse.SUPPRESS,  # only options given on the command line reach the config
    )
    g = p.add_argument_group("what to train")
    g.add_argument("--task", choices=TASKS, help="required unless --resume PATH names a run")
    g.add_argument("--backbone", help="diffusers backbone folder (default: the embedded one, cdd.adapters.zoo.default_backbone_dir())")
    g.add_argument("--data", help=f"'scenes' (the procedural world) or a dataset path (default {d.data})")
    g.add_argument("--data-option", dest="data_options", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="option for build_dataset, e.g. caption_column=prompt (repeatable)")
    g.add_argument("--adapter", choices=ADAPTER_KINDS, help=f"adapter architecture (default {d.adapter})")
    g.add_argument("--mode", choices=MODES, help="pe: adapter only; lora: + backbone LoRA; full: + the whole UNet (default pe)")
    g.add_argument("--method", choices=METHODS, help="codi (distillation), finetune (plain diffusion loss: the teacher), "
                   "cm (consistency distillation of a fine-tuned entry) or gd (guided distillation) (default codi)")
    g.add_argument("--init-from", metavar="ENTRY", help="cm, gd: the zoo entry to distil (the fine-tuned teacher; "
                   "gd stage 2: the previous round); codi: optional, the student starts as that entry; finetune: optional, "
                   "continue that entry's adapter (e.g. with another --caption-dropout), or another task's with the same kind "
                   "of condition image (transfer)")
    g.add_argument("--teacher", metavar="ENTRY", help="codi --adapter controlnet-guided continued from a "
                   "controlnet-guided entry (--init-from): the controlnet entry that is its guided teacher; codi "
                   "--adapter controlnet with --dmd-weight: the fine-tuned controlnet entry that is DMD's real score")
    g.add_argument("--adapter-rank", type=int, help=f"LoRA rank inside controlnet-lora (default {d.adapter_rank})")
    g.add_argument("--lora-rank", type=int, help=f"backbone LoRA rank, mode lora (default {d.lora_rank})")
    g.add_argument("--caption-dropout", type=float, help="probability of training on the empty caption; a teacher meant "
                   f"for Guided Distillation needs it, e.g. 0.1, and so does a super-resolution adapter meant to work "
                   f"without a prompt (default {d.caption_dropout})")
    g.add_argument("--changed-weight", type=float, help="edit, finetune or codi (its guidance term): weigh the loss "
                   "inside the region the edit changes (source and target differ) by 1 + this against 1 outside, "
                   "normalised per image; small local "
                   f"edits (an object's colour, a removal) otherwise weigh a few percent of the loss (default {d.changed_weight})")
    g.add_argument("--degradation", choices=tuple(DEGRADATION_PRESETS), help="super-resolution: the degradation preset "
                   f"that makes the low-resolution inputs (default {DEFAULT_TRAINING_PRESET}; realesrgan: the published "
                   "settings)")
    g.add_argument("--photo-fraction", type=float, help="super-resolution on scenes: the share of photo patches (the "
                   f"bundled training photographs, captioned 'a photo') in the data stream (default {d.photo_fraction})")

    g = p.add_argument_group("CoDi (Algorithm 1)")
    g.add_argument("--prev-predictor", choices=PREV_PREDICTORS, help="how z_hat_s is predicted: prev (eq. 12, the real noise), "
                   "ddim (eps_hat_t), teacher (the frozen backbone's DDIM step) (default prev)")
    g.add_argument("--consistency-space", choices=CONSISTENCY_SPACES, help="eps, or x: boundary-scaled signal predictions (default eps)")
    g.add_argument("--distance", choices=DISTANCES, help="l2 or pseudo-Huber (default l2)")
    g.add_argument("--huber-c", type=float, help=f"pseudo-Huber c (default {d.huber_c})")
    g.add_argument("--cond-weight", type=float, help="r in eq. 11; 0 = no conditional guidance (default 1)")
    g.add_argument("--cond-weighting", choices=COND_WEIGHTINGS, help="x: the guidance term d_x(x_hat_t, x) of eq. 11; "
                   "truncated-snr: weighted by max(alpha_t^2 / sigma_t^2, 1), the larger of the x-space and eps-space "
                   "denoising losses, which keeps the noise removal at small t anchored (default x)")
    g.add_argument("--same-t", dest="same_t", action="store_true", help="one t for the whole batch (default)")
    g.add_argument("--per-sample-t", dest="same_t", action="store_false", help="one t per sample (ablation)")
    g.add_argument("--ema", type=float, help=f"EMA rate mu of the target theta^- and of the exported weights (default {d.ema})")
    g.add_argument("--steps", type=int, help=f"N, the number of intervals of [0, T) (default {d.steps})")

    g = p.add_argument_group("the distribution-level term (codi, mode pe; training/adversarial.py)")
    g.add_argument("--adversarial-weight", type=float, help="W: add W x the adversarial term of a discriminator on the "
                   "frozen backbone's features of the student's re-noised one-step prediction; 0 = plain CoDi "
                   f"(default {d.adversarial_weight})")
    g.add_argument("--adversarial-lr", type=float, help=f"the discriminator's learning rate (default {d.adversarial_lr})")
    g.add_argument("--adversarial-t-max", type=int, help="the discriminator re-noises at t' ~ U{0..t_max} "
                   f"(default {d.adversarial_t_max})")
    g.add_argument("--adversarial-start", type=int, help="the term is on from this optimizer step; a run without "
                   "the term may be resumed with it from a checkpoint at or before this step (default "
                   f"{d.adversarial_start})")
    g.add_argument("--adversarial-text", action="store_true", help="the discriminator's heads also read the caption "
                   "(a projection term per head); default: only the condition image and the UNet's features")

    g = p.add_argument_group("distribution matching (DMD: guidance-aware CoDi from an entry; "
                             "training/distribution_matching.py)")
    g.add_argument("--dmd-weight", type=float, help="W: add W x the DMD loss, the guided teacher's score against a fake "
                   f"score adapter trained on the student's outputs; 0 = plain CoDi (default {d.dmd_weight})")
    g.add_argument("--dmd-lr", type=float, help=f"the fake score adapter's learning rate (default {d.dmd_lr})")
    g.add_argument("--dmd-t-min", type=int, help=f"the scores are compared at t >= this (default {d.dmd_t_min})")
    g.add_argument("--dmd-t-max", type=int, help=f"... and t <= this (default {d.dmd_t_max})")
    g.add_argument("--dmd-one-step", type=float, help="the share of the student's predictions judged from the 1-step "
                   f"timestep (999), the rest from 749 / 499 / 249 (default {d.dmd_one_step})")
    g.add_argument("--dmd-fake-steps", type=int, help="fake score updates per student step, each extra one on fresh "
                   f"student outputs (DMD2 takes 5; default {d.dmd_fake_steps})")
    g.add_argument("--dmd-from-input", type=float, help="the share of the student's DMD predictions made one step from "
                   "the input, as a request with `strength` runs (super-resolution, edit; default "
                   f"{d.dmd_from_input})")
    g.add_argument("--dmd-from-input-t", type=int, help="... from the input noised to this timestep (default "
                   f"{d.dmd_from_input_t}: strength 0.5)")

    g = p.add_argument_group("Guided Distillation (--method gd), and guidance-aware CoDi (--method codi --adapter "
                             "controlnet-guided: the w range and the served w)")
    g.add_argument("--gd-stage", type=int, choices=(1, 2), help="1: distil the guided teacher into a student taking w; "
                   "2: one round of progressive distillation, halving the steps (default 1)")
    g.add_argument("--gd-steps", type=int, help=f"the student's sampling steps; its teacher takes twice as many (default {d.gd_steps})")
    g.add_argument("--guidance-min", type=float, help=f"w ~ U[min, max] in training (default {d.guidance_min})")
    g.add_argument("--guidance-max", type=float, help=f"(default {d.guidance_max})")
    g.add_argument("--guidance", type=float, help=f"the w the entry is served with (default {d.guidance})")
    g.add_argument("--plain-cond-term", dest="guided_cond_term", action="store_false",
                   help="guidance-aware CoDi: the conditional term's target is the data at every w (ablation); by "
                        "default it is x + w (x_c - x_u), the data moved along the guided teacher's direction")
    g.add_argument("--guidance-lr-scale", type=float,
                   help="guidance-aware CoDi: the student's w branch (the adapter's projection of w into its time "
                        f"embedding, zero at the start) learns at --lr x this (default {d.guidance_lr_scale})")
    g.add_argument("--guided-cond-target", choices=GUIDED_COND_TARGETS,
                   help="guidance-aware CoDi: the conditional term's target is the data moved along the guided "
                        "teacher's direction, x + w (x_c - x_u), or the guided teacher's own prediction, "
                        f"x_c + w (x_c - x_u) (default {d.guided_cond_target})")
    g.add_argument("--guidance-unconditional", choices=("text", "text+condition", "text+condition-if-empty"),
                   help="guidance-aware CoDi: what the guided teacher's unconditional branch drops: the text (the "
                        "condition image goes to both branches), the text and the condition (the backbone alone "
                        "with \"\", so the guidance also follows the condition, with the empty prompt too), or the "
                        "text and the condition only where the prompt is \"\" (caption dropout's samples) "
                        f"(default {d.guidance_unconditional})")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, help=f"constant learning rate (default {d.lr}; SD-class: 1e-5)")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay})")
    g.add_argument("--adam-beta1", type=float, help=f"(default {d.adam_betas[0]})")
    g.add_argument("--adam-beta2", type=float, help=f"(default {d.adam_betas[1]})")
    g.add_argument("--adam-eps", type=float, help=f"(default {d.adam_eps})")
    g.add_argument("--grad-clip", type=float, help=f"max gradient norm (default {d.grad_clip})")
    g.add_argument("--batch-size", type=int, help=f"per process (default {d.batch_size})")
    g.add_argument("--grad-accum", type=int, help=f"gradient accumulation steps (default {d.grad_accum})")
    g.add_argument("--max-train-steps", type=int, help=f"optimizer steps (default {d.max_train_steps})")
    g.add_argument("--seed", type=int, help=f"(default {d.seed})")
    g.add_argument("--resolution", type=int, help="image size in pixels (default: the backbone's)")
    g.add_argument("--mixed-precision", choices=MIXED_PRECISION, help="auto: bf16 on a CUDA GPU, else no (default auto)")
    g.add_argument("--num-workers", type=int, help=f"DataLoader workers (default {d.num_workers})")

    g = p.add_argument_group("run")
    g.add_argument("--output", help="run folder (default runs/<task>-<adapter>-<method>)")
    g.add_argument("--zoo-out", help="zoo entry folder (default <output>/entry)")
    g.add_argument("--name", help="zoo entry name (default <task>-<adapter>-<method>[-<mode>])")
    g.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 0: by time, "
                   "--checkpoint-minutes)")
    g.add_argument("--checkpoint-minutes", type=float, help=f"minutes between checkpoints, whatever a step takes; "
                   f"0: by --checkpoint-every only (default {d.checkpoint_minutes:g}); Ctrl-C and SIGTERM also "
                   "write one, after the step in progress")
    g.add_argument("--keep-checkpoints", type=int, help=f"newest checkpoints kept (default {d.keep_checkpoints})")
    g.add_argument("--sample-every", type=int, help=f"steps between sample grids, 0: only at the end (default {d.sample_every})")
    g.add_argument("--log-every", type=int, help=f"steps between logged scalars (default {d.log_every})")
    g.add_argument("--resume", nargs="?", const="latest", metavar="PATH",
                   help="continue a run: alone, the latest checkpoint in --output; or a checkpoint / run folder")
    g.add_argument("--dry-run", action="store_true", help="print the validated config and exit")
    return p


def config_from_args(given: dict) -> TrainConfig:
    """The run's config: the options given; when resuming, the checkpoint's config with them on top."""
    given = dict(given)
    if "data_options" in given:
        given["data_options"] = dict(given["data_options"])
    betas = {i: given.pop(k) for i, k in enumerate(("adam_beta1", "adam_beta2")) if k in given}
    method = given.get("method", "codi")
    unused = UNUSED.get(method, ())
    if method == "codi" and given.get("adapter") == "controlnet-guided":  # guidance-aware CoDi draws w and serves one
        unused = tuple(k for k in unused if k not in GUIDED_CODI_OPTIONS)
    wrong = [k for k in unused if k in given]
    if wrong:
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        raise ConfigError(f"{flags}: option(s) that --method {method} does not use")
    base: dict = {}
    if "resume" in given:
        checkpoint = _checkpoint_for(given)
        if checkpoint is not None:
            base = saved_config(json.loads((checkpoint / "config.json").read_text()))
            base["output"] = given.get("output", str(checkpoint.parent.parent))
    merged = {**base, **given}
    if merged.get("method", "codi") == "gd" and "adapter" not in merged:
        merged["adapter"] = "controlnet-guided"  # the GD student takes w: the only architecture it has (also when
        # --resume finds no checkpoint yet and the run starts fresh)
    if "task" not in merged:
        raise ConfigError("--task is required (or --resume PATH naming a run to continue)")
    if betas:
        current = list(merged.get("adam_betas", TrainConfig(task=merged["task"]).adam_betas))
        merged["adam_betas"] = tuple(betas.get(i, current[i]) for i in range(2))
    return TrainConfig.from_dict(merged)


def _checkpoint_for(given: dict) -> Path | None:
    """The checkpoint `--resume` points at, found before the config is known (None: nothing to resume yet)."""
    from .run_checkpoints import checkpoint_dirs

    if given["resume"] != "latest":
        path = Path(given["resume"])
        if (path / "state.json").is_file():
            return path
        found = checkpoint_dirs(path)
        if not found:
            raise ConfigError(f"--resume {path}: neither a checkpoint folder (with state.json) nor a run folder with checkpoints/")
        given["resume"] = str(found[-1])
        return found[-1]
    if "task" not in given and "output" not in given:
        raise ConfigError("--resume without a PATH needs --task (and the same --adapter/--method/--output as the run)")
    # Only the run folder is needed here: a full config would be validated before the checkpoint's settings
    # (init_from, ...) are merged in, and refuse a resume that gives just --task/--method/--output.
    method = given.get("method", TrainConfig.method)
    adapter = given.get("adapter") or ("controlnet-guided" if method == "gd" else TrainConfig.adapter)
    folder = run_dir(given.get("task", "depth"), adapter, method, given.get("output"))
    found = checkpoint_dirs(folder)
    return found[-1] if found else None


def checkpoint_dirs(output: Path) -> list[Path]:
    from .run_checkpoints import checkpoint_dirs as dirs

    return dirs(output)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    dry_run = given.pop("dry_run", False)
    try:
        config = config_from_args(given)
        config.check_backbone()
        if dry_run:
            print(config.to_json(), end="")
            sampler, steps = config.sampling
            print(f"# output {config.output_dir}, zoo entry {config.entry_dir} ({config.entry_name}, served with "
                  f"{sampler} x {steps}), backbone {config.backbone_dir}")
            return 0
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        from .checkpoints import OutputWriteError
        from .data.datasets import DataError
        from .loop import TrainingInterrupted, TrainingStopped, train

        diffusers_logging.disable_progress_bar()  # one progress bar: the training loop's
        transformers_logging.disable_progress_bar()

        try:
            result = train(config)
        except (DataError, BackboneError, ZooError) as e:
            raise ConfigError(str(e)) from e
        except TrainingStopped as e:
            print(f"cdd-train-adapter: stopped: {e}", file=sys.stderr)
            return 1
        except TrainingInterrupted as e:  # SIGINT / SIGTERM: the step in progress was finished and saved
            print(f"cdd-train-adapter: {e}", file=sys.stderr)
            return 128 + e.signum
        except KeyboardInterrupt:  # before the loop, or a second Ctrl-C: nothing more was saved
            last = checkpoint_dirs(config.output_dir)
            print("cdd-train-adapter: interrupted; " + (f"the last checkpoint is {last[-1]}: continue the run with "
                  f"cdd-train-adapter --resume {last[-1]}" if last else "no checkpoint was written"), file=sys.stderr)
            return 130
        except (OutputWriteError, OSError) as e:  # a full disk, an unwritable --output: the path, in one line
            if isinstance(e, OSError):
                e = f"cannot write {e.filename or config.output_dir}: {e.strerror or e}"
            last = checkpoint_dirs(config.output_dir) if config.output_dir.is_dir() else []
            hint = f"; the last checkpoint is {last[-1]} (--resume it once there is room)" if last else ""
            print(f"cdd-train-adapter: error: {e}{hint}", file=sys.stderr)
            return 1
    except ConfigError as e:
        print(f"cdd-train-adapter: error: {e}", file=sys.stderr)
        return 2
    if result.entry is not None:
        loss = ", ".join(f"{k} {result.first_loss.get(k, float('nan')):.4f} -> {v:.4f}" for k, v in result.last_loss.items())
        print(f"done: step {result.step}; loss {loss}; zoo entry {result.entry}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
