"""The zoo format: one folder per adapter, `manifest.json` + safetensors.

    <entry>/manifest.json               what the adapter is, for which backbone, how to sample it
    <entry>/adapter.safetensors         the adapter's own weights
    <entry>/backbone_lora.safetensors   optional: a peft LoRA on the backbone UNet (mode `lora`)
    <entry>/unet.safetensors            optional: a whole fine-tuned UNet (mode `full`)

Loading verifies every file's sha256 and the backbone fingerprint and refuses a mismatch with a
message that names the file or value at fault. Writes are atomic (temporary folder + rename).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .architectures import (
    ADAPTER_KINDS,
    Adapter,
    adapter_from_config,
    backbone_lora_name,
    load_backbone_lora,
    set_backbone_lora,
)
from .atomic import atomic_directory, write_text

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ADAPTER_FILE = "adapter.safetensors"
BACKBONE_LORA_FILE = "backbone_lora.safetensors"
UNET_FILE = "unet.safetensors"
MODES = ("pe", "lora", "full")


class ZooError(ValueError):
    """A zoo entry is missing, malformed, tampered with, or made for another backbone."""


@dataclass
class Manifest:
    name: str
    task: str
    kind: str
    architecture: dict[str, Any]
    backbone_fingerprint: str
    condition: dict[str, Any]  # {"channels": 3, "range": [0, 1], "resolution": 64}
    sampler: str = "prev"
    steps: int = 4
    mode: str = "pe"
    backbone_lora: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    format_version: int = FORMAT_VERSION
    created: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ZooError(f"manifest field 'kind' is {self.kind!r}; expected one of {', '.join(ADAPTER_KINDS)}")
        if self.mode not in MODES:
            raise ZooError(f"manifest field 'mode' is {self.mode!r}; expected one of {', '.join(MODES)}")
        if not 1 <= int(self.steps) <= 1000:
            raise ZooError(f"manifest field 'steps' is {self.steps!r}; expected an integer >= 1")
        if not self.name or "/" in self.name:
            raise ZooError(f"manifest field 'name' is {self.name!r}; expected a non-empty name without '/'")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> Manifest:
        if not path.is_file():
            raise ZooError(f"{path.parent} is not a zoo entry: {MANIFEST} is missing")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ZooError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ZooError(f"{path} must hold a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ZooError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        known = set(cls.__dataclass_fields__)
        missing = [k for k in ("name", "task", "kind", "architecture", "backbone_fingerprint", "condition") if k not in data]
        if missing:
            raise ZooError(f"{path} lacks required field(s): {', '.join(missing)}")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ZooError(f"{path} has unknown field(s): {', '.join(unknown)}")
        return cls(**data)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_entry(
    path: str | Path,
    adapter: Adapter,
    *,
    name: str,
    task: str,
    backbone_fingerprint: str,
    condition: dict[str, Any],
    sampler: str = "prev",
    steps: int = 4,
    mode: str = "pe",
    backbone_lora: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None,
    unet_state: dict[str, torch.Tensor] | None = None,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Manifest:
    """Write a zoo entry atomically: readers see the old entry or the complete new one."""
    manifest = Manifest(
        name=name,
        task=task,
        kind=adapter.kind,
        architecture=json.loads(json.dumps(adapter.config(), default=_jsonable)),
        backbone_fingerprint=backbone_fingerprint,
        condition=condition,
        sampler=sampler,
        steps=int(steps),
        mode=mode,
        backbone_lora=backbone_lora[0] if backbone_lora else None,
        training=json.loads(json.dumps(training or {}, default=_jsonable)),
        metrics=metrics or {},
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    if mode == "lora" and backbone_lora is None:
        raise ZooError("mode 'lora' needs the backbone LoRA weights")
    if mode == "full" and unet_state is None:
        raise ZooError("mode 'full' needs the fine-tuned UNet weights")
    with atomic_directory(path) as tmp:
        save_file(_contiguous(adapter.weights()), tmp / ADAPTER_FILE, metadata={"format": "pt", "kind": adapter.kind})
        if backbone_lora is not None:
            save_file(_contiguous(backbone_lora[1]), tmp / BACKBONE_LORA_FILE, metadata={"format": "pt"})
        if unet_state is not None:
            save_file(_contiguous(unet_state), tmp / UNET_FILE, metadata={"format": "pt"})
        manifest.files = {f.name: sha256_file(f) for f in sorted(tmp.glob("*.safetensors"))}
        (tmp / MANIFEST).write_text(manifest.to_json())
    return manifest


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def verify_entry(path: str | Path, backbone_fingerprint: str | None = None) -> Manifest:
    """Check the manifest, every listed file's sha256, and (when given) the backbone fingerprint."""
    root = Path(path)
    if not root.is_dir():
        raise ZooError(f"zoo entry {root} does not exist")
    manifest = Manifest.from_file(root / MANIFEST)
    if ADAPTER_FILE not in manifest.files:
        raise ZooError(f"{root / MANIFEST} lists no {ADAPTER_FILE}")
    for fname, expected in manifest.files.items():
        f = root / fname
        if not f.is_file():
            raise ZooError(f"zoo entry {root}: {fname} is missing")
        actual = sha256_file(f)
        if actual != expected:
            raise ZooError(
                f"zoo entry {root}: {fname} is tampered or corrupt (sha256 {actual[:16]}..., manifest says {expected[:16]}...)"
            )
    if backbone_fingerprint is not None and manifest.backbone_fingerprint != backbone_fingerprint:
        raise ZooError(
            f"zoo entry {root} ({manifest.name}) was made for backbone {manifest.backbone_fingerprint[:16]}..., "
            f"not for the loaded backbone {backbone_fingerprint[:16]}..."
        )
    return manifest


@dataclass
class ZooEntry:
    path: Path
    manifest: Manifest
    adapter: Adapter
    unet_state: dict[str, torch.Tensor] | None = None  # mode `full`


def load_entry(path: str | Path, unet, backbone_fingerprint: str, *, lora_name: str | None = None) -> ZooEntry:
    """Verify and load an entry onto `unet`'s device and dtype. A backbone LoRA (mode `lora`) is added to
    the shared UNet under `lora_name` (default: `backbone_lora_name(name)`) and left inactive."""
    root = Path(path)
    manifest = verify_entry(root, backbone_fingerprint)
    try:
        adapter = adapter_from_config(manifest.kind, manifest.architecture, unet)
        state = load_file(root / ADAPTER_FILE, device="cpu")
        adapter.load_weights(state)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise ZooError(f"zoo entry {root}: weights do not fit the {manifest.kind} architecture: {e}") from e
    adapter.requires_grad_(False).eval()
    if manifest.backbone_lora is not None:
        load_backbone_lora(unet, lora_name or backbone_lora_name(manifest.name), manifest.backbone_lora, load_file(root / BACKBONE_LORA_FILE))
        set_backbone_lora(unet, None)
    unet_state = load_file(root / UNET_FILE) if UNET_FILE in manifest.files else None
    return ZooEntry(root, manifest, adapter, unet_state)


def install_entry(src: str | Path, zoo: str | Path, *, name: str | None = None, half: bool = False,
                  replace: bool = False, sampler: str | None = None, steps: int | None = None) -> Path:
    """Copy a verified entry into `zoo` as `<zoo>/<name>` (default: its manifest name), atomically.
    `half` stores floating-point weights as float16 (loading casts them back to the model's dtype): how the
    embedded zoo is kept small. `sampler` / `steps` replace the default the entry is served with (e.g. the
    one cdd-eval measured best). The manifest keeps everything else and records where the entry came from."""
    src = Path(src)
    manifest = verify_entry(src)
    name = name or manifest.name
    if not name or "/" in name or name.startswith("."):
        raise ZooError(f"entry name {name!r}: expected a non-empty name without '/' that does not start with '.'")
    dest = Path(zoo) / name
    if dest.exists() and not replace:
        raise ZooError(f"{dest} already exists (pass replace to overwrite it)")
    manifest.name = name
    if sampler is not None:
        from ..runtime.samplers import FEW_STEP_SAMPLERS

        if sampler not in FEW_STEP_SAMPLERS:
            raise ZooError(f"sampler {sampler!r} is not one of {', '.join(FEW_STEP_SAMPLERS)}")
        manifest.sampler = sampler
    if steps is not None:
        if not 1 <= int(steps) <= 1000:
            raise ZooError(f"steps {steps!r}: expected an integer in 1..1000")
        manifest.steps = int(steps)
    manifest.training = {**manifest.training, "installed_from": {"path": str(src), "float16": half}}
    with atomic_directory(dest) as tmp:
        for fname in manifest.files:
            state = load_file(src / fname)
            if half:
                state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
            save_file(_contiguous(state), tmp / fname, metadata={"format": "pt", "kind": manifest.kind})
        manifest.files = {f.name: sha256_file(f) for f in sorted(tmp.glob("*.safetensors"))}
        (tmp / MANIFEST).write_text(manifest.to_json())
    return dest


def write_metrics(path: str | Path, key: str, value: Any) -> Manifest:
    """Record measurements under `metrics[key]` of an entry's manifest, atomically; the weights (and so the
    hashes `verify_entry` checks) are untouched."""
    root = Path(path)
    manifest = verify_entry(root)
    manifest.metrics = {**manifest.metrics, key: json.loads(json.dumps(value, default=_jsonable))}
    write_text(root / MANIFEST, manifest.to_json())
    return manifest


def list_entries(zoo: str | Path) -> list[tuple[Path, Manifest | ZooError]]:
    """Every entry folder under `zoo` with its manifest (or the error that reading it gave)."""
    out: list[tuple[Path, Manifest | ZooError]] = []
    root = Path(zoo)
    if not root.is_dir():
        raise ZooError(f"zoo folder {root} does not exist")
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            out.append((d, Manifest.from_file(d / MANIFEST)))
        except ZooError as e:
            out.append((d, e))
    return out


EMBEDDED = Path(__file__).parent / "embedded"


def default_zoo_dir() -> Path:
    """The zoo that ships with the package (adapters/embedded/zoo)."""
    return EMBEDDED / "zoo"


def default_backbone_dir() -> Path:
    """The small pretrained backbone that ships with the package (adapters/embedded/backbone)."""
    return EMBEDDED / "backbone"
