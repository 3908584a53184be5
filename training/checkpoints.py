"""Checksummed checkpoints: every file of a checkpoint folder has its sha256 in `state.json`, verified
before anything is loaded on resume, as zoo entries are. A failure names the checkpoint, the file and
what is wrong with it, and the newest older checkpoint that is intact (to resume from instead)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from ..adapters.zoo import sha256_file
from .config import ConfigError

STATE = "state.json"
T = TypeVar("T")


class CheckpointError(ConfigError):
    """A checkpoint is incomplete, corrupt or tampered with."""


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file of `folder` except state.json (which records them)."""
    return {f.name: sha256_file(f) for f in sorted(folder.iterdir()) if f.is_file() and f.name != STATE}


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """state.json with the hashes of the folder's other files (written last)."""
    state = {**state, "files": file_hashes(folder)}
    (folder / STATE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def read_state(folder: Path) -> dict[str, Any]:
    """state.json, after every file it lists is checked against its sha256. Checkpoints written before
    hashes were recorded (no `files`) are read as they are."""
    try:
        state = json.loads((folder / STATE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder}: {STATE} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {folder}: {STATE} is not valid JSON ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint {folder}: {STATE} holds no integer 'step'")
    for name, expected in (state.get("files") or {}).items():
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {folder}: {name} is missing")
        actual = sha256_file(f)
        if actual != expected:
            raise CheckpointError(f"checkpoint {folder}: {name} is corrupt (sha256 {actual[:16]}..., "
                                  f"{STATE} says {expected[:16]}...)")
    return state


def loading(folder: Path, name: str, load: Callable[[], T]) -> T:
    """`load()` a checkpoint file; any failure becomes a CheckpointError naming the folder and file."""
    try:
        return load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - torch, safetensors and pickle raise many types on a bad file
        missing = isinstance(e, FileNotFoundError)
        raise CheckpointError(f"checkpoint {folder}: {name} " + ("is missing" if missing else
                              f"cannot be loaded ({type(e).__name__}: {str(e)[:200]})")) from e


def with_fallback(err: CheckpointError, older: Iterable[Path]) -> CheckpointError:
    """`err` with the newest intact checkpoint among `older` (newest first) named."""
    for folder in older:
        try:
            read_state(folder)
        except CheckpointError:
            continue
        return CheckpointError(f"{err}; the newest intact checkpoint is {folder}: resume from it with --resume {folder}")
    return CheckpointError(f"{err}; no older checkpoint is intact")
