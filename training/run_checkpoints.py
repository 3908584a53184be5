"""A training run's checkpoint folders (`<output>/checkpoints/step-N/`): which to resume, writing one atomically
with the sha256 of every file, and reading one back (weights, EMA, optimizer, RNG states, the discriminator when the
run has a distribution-level term: the discriminator, the fake score). training/checkpoints.py holds the file-level pieces these use."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from ..adapters.atomic import atomic_directory
from ..adapters.zoo import save_file
from .checkpoints import (
    CheckpointError,
    incomplete_checkpoints,
    loading,
    read_state,
    with_fallback,
    write_state,
    writing,
)
from .config import ConfigError, TrainConfig

if TYPE_CHECKING:
    from .loop import EMA

CHECKPOINTS = "checkpoints"


def checkpoint_dirs(output: Path, complete: bool = True) -> list[Path]:
    """The checkpoint folders of a run, oldest first: those with a state.json, or (complete=False) all."""
    root = output / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and (not complete or (p / "state.json").is_file()))


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder is named for (step-N)."""
    return int(path.name.removeprefix("step-"))


def incomplete_report(output: Path, chosen: Path | None) -> str | None:
    """What to say when checkpoints newer than `chosen` lack their state.json (a resume does not use them)."""
    bad = incomplete_checkpoints(checkpoint_dirs(output, complete=False), chosen)
    if not bad:
        return None
    names = ", ".join(str(b) for b in bad)
    return (f"checkpoint(s) {names} have no state.json (incomplete or damaged) and are not used; "
            + (f"resuming from {chosen}" if chosen is not None else "no complete checkpoint: starting a new run"))


def resolve_resume(config: TrainConfig) -> Path | None:
    """The checkpoint folder to continue from (None: a fresh run)."""
    existing = checkpoint_dirs(config.output_dir)
    if config.resume is None:
        if existing or checkpoint_dirs(config.output_dir, complete=False):
            raise ConfigError(
                f"output folder {config.output_dir} already holds checkpoints "
                f"({checkpoint_dirs(config.output_dir, complete=False)[-1].name}); "
                "pass --resume to continue that run, or choose another --output"
            )
        return None
    if config.resume == "latest":
        return existing[-1] if existing else None
    path = Path(config.resume)
    if (path / "state.json").is_file():
        return path
    found = checkpoint_dirs(path)
    if found:
        return found[-1]
    raise ConfigError(f"resume {config.resume!r}: neither a checkpoint folder (with state.json) nor a run folder with {CHECKPOINTS}/")


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def source_fingerprint(files: dict[str, str]) -> str:
    """One sha256 over a zoo entry's file hashes (its manifest's `files`): which weights `--init-from` held when a
    run started (for codi with a guided student, cm and gd they are also its frozen teacher)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def save_checkpoint(accelerator, path: Path, *, step: int, config: TrainConfig, trainable, ema: EMA, optimizer,
                    generator: torch.Generator, fingerprint: str, loss: dict[str, float], extra=(),
                    source: str | None = None) -> None:
    """Every process contributes its RNG state; the main process writes the folder atomically. `source`: the
    `source_fingerprint` of the `--init-from` entry, checked on resume."""
    rng = _gather_objects(accelerator, _rng_state(generator))
    if accelerator.is_main_process:
        writing(path, lambda: _write_checkpoint(accelerator, path, step=step, config=config, trainable=trainable,
                                                ema=ema, optimizer=optimizer, rng=rng, fingerprint=fingerprint, loss=loss,
                                                extra=extra, source=source))
        for old in checkpoint_dirs(path.parent.parent)[: -config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _write_checkpoint(accelerator, path: Path, *, step: int, config: TrainConfig, trainable, ema: EMA, optimizer,
                      rng: list, fingerprint: str, loss: dict[str, float], extra=(),
                      source: str | None = None) -> None:
    with atomic_directory(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        save_file({k: v.cpu().contiguous() for k, v in ema.shadow.items()}, tmp / "ema.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        torch.save(rng, tmp / "rng.pt")
        for term in extra:  # the distribution-level terms' own networks and optimizers (a discriminator, a fake score)
            term.save(tmp)
        (tmp / "config.json").write_text(config.to_json())
        state = {  # with the sha256 of every file, verified on resume
            "step": step,
            "micro_batches": step * config.grad_accum,
            "num_processes": accelerator.num_processes,
            "seed": config.seed,
            "backbone_fingerprint": fingerprint,
            "loss": loss,
        }
        if source is not None:
            state["init_from_fingerprint"] = source
        write_state(tmp, state)


def load_checkpoint(accelerator, path: Path, *, trainable, ema: EMA, optimizer, generator: torch.Generator,
                    fingerprint: str, extra=(), source: str | None = None, source_path: str | None = None) -> int:
    """Restore weights, EMA, optimizer and this process's RNG states; returns the step. Every file is
    checked against its sha256 first; a bad one raises CheckpointError naming it and the newest intact
    older checkpoint. `source`: the `source_fingerprint` of the `--init-from` entry (at `source_path`) as loaded
    now; a checkpoint that recorded another is refused (the run's teacher or start would change under it)."""
    try:
        step = _load_checkpoint(accelerator, path, trainable=trainable, ema=ema, optimizer=optimizer,
                                generator=generator, fingerprint=fingerprint, source=source, source_path=source_path)
        for term in extra:
            term.load(path)
        return step
    except CheckpointError as e:
        older = [p for p in reversed(checkpoint_dirs(path.parent.parent)) if p.name < path.name]
        raise with_fallback(e, older) from e.__cause__


def _load_checkpoint(accelerator, path: Path, *, trainable, ema: EMA, optimizer, generator: torch.Generator,
                     fingerprint: str, source: str | None = None, source_path: str | None = None) -> int:
    state = read_state(path)
    if state.get("num_processes") != accelerator.num_processes:
        raise ConfigError(
            f"checkpoint {path} was written by {state.get('num_processes')} process(es); this run has "
            f"{accelerator.num_processes}: the data stream and RNG states are per process, resume with the same count"
        )
    if state.get("backbone_fingerprint") != fingerprint:
        raise ConfigError(f"checkpoint {path} was trained on backbone {str(state.get('backbone_fingerprint'))[:16]}..., "
                          f"not on the loaded one ({fingerprint[:16]}...)")
    recorded = state.get("init_from_fingerprint")  # absent in checkpoints written before it was recorded
    if recorded is not None and source is not None and recorded != source:
        raise ConfigError(f"checkpoint {path} was trained from the --init-from entry {source_path} as it held files "
                          f"{recorded[:16]}...; that folder now holds other weights ({source[:16]}...), so the run's "
                          "teacher / start would change under it: put that entry back, or start a new --output")
    weights = loading(path, "trainable.safetensors", lambda: load_file(path / "trainable.safetensors"))
    shadow = loading(path, "ema.safetensors", lambda: load_file(path / "ema.safetensors"))
    if set(weights) != set(trainable) or set(shadow) != set(ema.shadow):
        raise ConfigError(f"checkpoint {path} holds other trainable parameters than this run builds")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(weights[name])
        for name, v in ema.shadow.items():
            v.copy_(shadow[name])
    optimizer.load_state_dict(loading(path, "optimizer.pt",
                                      lambda: torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(loading(path, "scaler.pt", lambda: torch.load(path / "scaler.pt", weights_only=True)))
    rng = loading(path, "rng.pt", lambda: torch.load(path / "rng.pt", weights_only=True)[accelerator.process_index])
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"])


def _gather_objects(accelerator, obj) -> list:
    from accelerate.utils import gather_object

    return gather_object([obj]) if accelerator.num_processes > 1 else [obj]
