"""Checksummed checkpoints: every file of a checkpoint folder has its sha256 in `state.json`, verified
before anything is loaded on resume, as zoo entries are. A failure names the checkpoint, the file and
what is wrong with it, and the newest older checkpoint that is intact (to resume from instead). Also what
stopping a run needs: the SIGINT / SIGTERM handlers that let it checkpoint first, and one-line errors for
files it cannot write."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

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


def save_term_state(folder: Path, module, optimizer, weights: str, optimizer_file: str) -> None:
    """A distribution-level term's own network (safetensors) and optimiser (torch.save) into a checkpoint folder."""
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, folder / weights)
    torch.save(optimizer.state_dict(), folder / optimizer_file)


def load_term_state(folder: Path, module, optimizer, weights: str, optimizer_file: str, what: str) -> None:
    """The inverse of `save_term_state`; a missing, unreadable or ill-fitting file is a CheckpointError naming it."""
    state = loading(folder, weights, lambda: load_file(folder / weights))
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {folder}: {weights} does not fit this run's {what} "
                              f"({str(e).splitlines()[0][:200]})") from e
    optimizer.load_state_dict(loading(folder, optimizer_file, lambda: torch.load(
        folder / optimizer_file, map_location="cpu", weights_only=True)))


def with_fallback(err: CheckpointError, older: Iterable[Path]) -> CheckpointError:
    """`err` with the newest intact checkpoint among `older` (newest first) named."""
    for folder in older:
        try:
            read_state(folder)
        except CheckpointError:
            continue
        return CheckpointError(f"{err}; the newest intact checkpoint is {folder}: resume from it with --resume {folder}")
    return CheckpointError(f"{err}; no older checkpoint is intact")


class OutputWriteError(RuntimeError):
    """A file of the run cannot be written (a full disk, a read-only or missing folder): names the path."""


def writing(path: Path, write: Callable[[], T]) -> T:
    """`write()` a file or folder of the run; an OS error, or torch's serializer failing on a full disk
    (`RuntimeError: [enforce fail at inline_container.cc] ... file write failed`), becomes an
    OutputWriteError that names `path`."""
    try:
        return write()
    except OSError as e:
        raise OutputWriteError(f"cannot write {e.filename or path}: {e.strerror or e}") from e
    except RuntimeError as e:
        if "write" not in str(e).lower():
            raise
        raise OutputWriteError(f"cannot write {path}: {str(e).strip().splitlines()[0][:200]}") from e


def incomplete_checkpoints(folders: Iterable[Path], newest_complete: Path | None) -> list[Path]:
    """Checkpoint folders newer than `newest_complete` (all, when None) that have no state.json: a resume
    uses an older one, and says so."""
    return [f for f in folders if not (f / STATE).is_file() and (newest_complete is None or f.name > newest_complete.name)]


class StopSignals:
    """SIGINT and SIGTERM ask the training loop to stop: the first sets `signal` (the loop finishes the step
    in progress, writes a checkpoint and stops); a second SIGINT stops at once (KeyboardInterrupt). Handlers
    are installed only from the main thread, and the previous ones restored on exit."""

    def __init__(self, announce: Callable[[str], None] = print):
        self.signal: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        import signal

        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal = signum
            self.announce(f"\n{signal.Signals(signum).name}: finishing the step in progress and writing a checkpoint "
                          "(Ctrl-C again to stop at once)")
