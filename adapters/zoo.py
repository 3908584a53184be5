"""The zoo format: one folder per adapter, `manifest.json` + safetensors.

    <entry>/manifest.json               what the adapter is, for which backbone, how to sample it
    <entry>/adapter.safetensors         the adapter's own weights
    <entry>/backbone_lora.safetensors   optional: a peft LoRA on the backbone UNet (mode `lora`)
    <entry>/unet.safetensors            optional: a whole fine-tuned UNet (mode `full`)

A manifest is parsed by a pydantic model with constraints: names (entry, task, sampler) match one safe
pattern, file names are plain `*.safetensors` names with sha256 hex digests; a type error is refused with
a message naming the field. Loading verifies every file's sha256 (files inside the entry: a symbolic link
that leaves it is refused) and the backbone fingerprint and refuses a mismatch with a message that names
the file or value at fault. Writes are atomic (temporary folder + rename) and deterministic: the same
weights give the same bytes (safetensors metadata in sorted order).
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .architectures import (
    ADAPTER_KINDS,
    Adapter,
    adapter_from_config,
    backbone_lora_name,
    load_backbone_lora,
    set_backbone_lora,
)
from .atomic import atomic_directory, write_text
from .fidelity import FIDELITY_FILE, FidelityNet

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ADAPTER_FILE = "adapter.safetensors"
BACKBONE_LORA_FILE = "backbone_lora.safetensors"
UNET_FILE = "unet.safetensors"
MODES = ("pe", "lora", "full")
# entry, task and sampler names: they become URL path segments, metric labels, headers and file names
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SAMPLER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"  # and '+': NAME+ilvr, NAME+keep (a header, a label)
FILE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\.safetensors$"
MAX_MANIFEST_BYTES = 1 << 20
MAX_RESOLUTION = 4096
PUBLIC_TRAINING = ("method", "step", "weights", "loss")  # what GET /v1/tasks shows of `training`

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
SamplerName = Annotated[str, Field(pattern=SAMPLER_PATTERN)]


class ZooError(ValueError):
    """A zoo entry is missing, malformed, tampered with, or made for another backbone."""


class Manifest(BaseModel):
    """`manifest.json`. Constructing one with a bad field raises ZooError naming the field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: Name
    task: Name
    kind: str
    architecture: dict[str, Any]
    backbone_fingerprint: str = Field(max_length=128)
    condition: dict[str, Any]  # {"channels": 3, "range": [0, 1], "resolution": 64}
    sampler: SamplerName = "prev"
    steps: int = Field(4, ge=1, le=1000)
    # the share of the noise schedule a request runs when it gives none: 1 from noise, < 1 from the input
    # (diffusers' img2img `strength`; tasks whose input is a picture of the output: super-resolution, edit)
    strength: float = Field(1.0, gt=0, le=1)
    mode: str = "pe"
    backbone_lora: dict[str, Any] | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    files: dict[Annotated[str, Field(pattern=FILE_PATTERN)], Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = Field(
        default_factory=dict, description="file name -> sha256"
    )
    # super-resolution's fidelity module (adapters/fidelity.py) in fidelity.safetensors: {"architecture": {...},
    # "default": w served when a request gives none, "training": {...}}; None: the entry has none
    fidelity: dict[str, Any] | None = None
    # controlnet-guided only: the default w for a step count where it differs from the entry's own default
    # ({"1": 0.0}: a 1-step request served at w = 0 when it gives no guidance); None: one default for every count
    guidance_steps: dict[str, float] | None = None
    format_version: int = FORMAT_VERSION
    created: str = Field("", max_length=64)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ZooError(describe(e)) from None

    @property
    def guidance(self) -> tuple[float, float, float] | None:
        """(default, w_min, w_max) for an entry that takes the classifier-free guidance weight w (controlnet-guided):
        the w it is served with when a request gives none, and the range it was trained on; None for other kinds."""
        if self.kind != "controlnet-guided":
            return None
        config = self.training.get("config", {})
        return (float(self.architecture.get("guidance", 0.0)), float(config.get("guidance_min", 0.0)),
                float(config.get("guidance_max", 2.0)))

    def default_guidance(self, steps: int) -> float | None:
        """The w a request of `steps` steps is served with when it gives none (`guidance_steps`, else the entry's
        default); None for an entry that takes no w."""
        g = self.guidance
        if g is None:
            return None
        return float((self.guidance_steps or {}).get(str(int(steps)), g[0]))

    @model_validator(mode="after")
    def _guidance_steps(self) -> "Manifest":
        if self.guidance_steps is None:
            return self
        g = self.guidance
        if g is None:
            raise ValueError(f"guidance_steps: a {self.kind} entry takes no guidance weight")
        for k, w in self.guidance_steps.items():
            if not k.isdigit() or not 1 <= int(k) <= 1000:
                raise ValueError(f"guidance_steps: key {_short(k)} is not a step count in 1..1000")
            if type(w) not in (int, float) or not g[1] <= w <= g[2]:
                raise ValueError(f"guidance_steps[{k}]: {_short(w)} is not a number in the trained range "
                                 f"[{g[1]:g}, {g[2]:g}]")
        return self

    @field_validator("fidelity")
    @classmethod
    def _fidelity(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        w = v.get("default")
        if type(w) not in (int, float) or not 0 <= w <= 1:
            raise ValueError(f"'default' must be a number in [0, 1], got {_short(w)}")
        if not isinstance(v.get("architecture"), dict):
            raise ValueError("'architecture' must be an object (FidelityNet's config)")
        return v

    @field_validator("kind", "mode")
    @classmethod
    def _one_of(cls, v: str, info: ValidationInfo) -> str:
        choices = {"kind": ADAPTER_KINDS, "mode": MODES}[info.field_name]
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return v

    @field_validator("condition")
    @classmethod
    def _condition(cls, v: dict[str, Any]) -> dict[str, Any]:
        res, channels = v.get("resolution"), v.get("channels", 3)
        if type(res) is not int or not 1 <= res <= MAX_RESOLUTION:
            raise ValueError(f"'resolution' must be an integer in 1..{MAX_RESOLUTION}, got {_short(res)}")
        if type(channels) is not int or channels not in (1, 3):
            raise ValueError(f"'channels' must be 1 or 3, got {_short(channels)}")
        return v

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"

    def public(self) -> dict[str, Any]:
        """The manifest as GET /v1/tasks shows it: no server paths (training folders, absolute paths)."""
        data = self.model_dump(mode="json")
        data["training"] = {k: data["training"][k] for k in PUBLIC_TRAINING if k in data["training"]}
        return _without_paths(data)

    @classmethod
    def from_file(cls, path: Path) -> Manifest:
        if not path.is_file():
            raise ZooError(f"{path.parent} is not a zoo entry: {MANIFEST} is missing")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ZooError(f"{path} is larger than {MAX_MANIFEST_BYTES >> 10} KiB")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ZooError(f"{path} is not UTF-8 text: {e}") from e
        except json.JSONDecodeError as e:
            raise ZooError(f"{path} is not valid JSON: {e}") from e
        except RecursionError as e:
            raise ZooError(f"{path} is nested too deeply") from e
        if not isinstance(data, dict):
            raise ZooError(f"{path} must hold a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ZooError(f"{path}: format_version {_short(version)} is not supported (expected {FORMAT_VERSION})")
        missing = [k for k in ("name", "task", "kind", "architecture", "backbone_fingerprint", "condition") if k not in data]
        if missing:
            raise ZooError(f"{path} lacks required field(s): {', '.join(missing)}")
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            raise ZooError(f"{path} has unknown field(s): {', '.join(_short(k) for k in unknown[:10])}")
        try:
            return cls(**data)
        except ZooError as e:
            raise ZooError(f"{path}: {e}") from None
        except RecursionError as e:
            raise ZooError(f"{path} is nested too deeply") from e


def describe(err: ValidationError) -> str:
    """A pydantic error as one line naming each field at fault, with (a short form of) its value."""
    parts = []
    for e in err.errors()[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()))
        msg = e.get("msg", "").removeprefix("Value error, ")
        parts.append(f"manifest field '{where}' is {_short(e.get('input'))}: {msg}")
    return "; ".join(parts)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _without_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items() if not _is_path(v)}
    if isinstance(value, list):
        return [_without_paths(v) for v in value if not _is_path(v)]
    return value


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith(("/", "~", "\\")) or value[1:3] in (":\\", ":/"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file with deterministic bytes: safetensors writes its metadata in hash-map
    order, which differs between processes; the header is rewritten with sorted keys (the tensor data and
    its offsets are unchanged)."""
    data = safetensors_bytes(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.write(memoryview(data)[8 + n :])


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
    strength: float = 1.0,
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
        strength=float(strength),
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
    if manifest.fidelity is not None and FIDELITY_FILE not in manifest.files:
        raise ZooError(f"{root / MANIFEST} has a fidelity module but lists no {FIDELITY_FILE}")
    inside = root.resolve()
    for fname, expected in manifest.files.items():
        f = root / fname
        if f.is_symlink() and not f.resolve().is_relative_to(inside):
            raise ZooError(f"zoo entry {root}: {fname} is a symbolic link that leaves the entry")
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
    fidelity: FidelityNet | None = None  # super-resolution's fidelity module, when the entry has one


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
    return ZooEntry(root, manifest, adapter, unet_state, load_fidelity(root, manifest))


def load_fidelity(root: Path, manifest: Manifest) -> FidelityNet | None:
    """The entry's fidelity module (float32, frozen, on the CPU), or None when it has none."""
    if manifest.fidelity is None:
        return None
    try:
        net = FidelityNet.from_config(manifest.fidelity["architecture"])
        net.load_state_dict({k: v.float() for k, v in load_file(root / FIDELITY_FILE, device="cpu").items()})
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise ZooError(f"zoo entry {root}: {FIDELITY_FILE} does not fit its fidelity architecture: {e}") from e
    if not all(torch.isfinite(p).all() for p in net.parameters()):
        raise ZooError(f"zoo entry {root}: {FIDELITY_FILE} holds non-finite weights")
    return net.requires_grad_(False).eval()


def add_fidelity(src: str | Path, dest: str | Path, net: FidelityNet, *, default: float, training: dict[str, Any],
                 replace: bool = False) -> Path:
    """`src` (a super-resolution entry) copied to `dest` with `net` as its fidelity module, atomically: the
    manifest's `fidelity` records the architecture, the default weight and how it was trained."""
    src, dest = Path(src), Path(dest)
    manifest = verify_entry(src)
    if manifest.task != "super-resolution":
        raise ZooError(f"{src} is a {manifest.task} entry; a fidelity module is for super-resolution")
    if dest.exists() and dest.resolve() != src.resolve() and not replace:
        raise ZooError(f"{dest} already exists (pass replace to overwrite it)")
    manifest.fidelity = {"architecture": net.config(), "default": float(default),
                         "training": json.loads(json.dumps(training, default=_jsonable))}
    with atomic_directory(dest) as tmp:
        for fname in manifest.files:
            if fname != FIDELITY_FILE:
                (tmp / fname).write_bytes((src / fname).read_bytes())
        save_file(_contiguous({k: v.detach() for k, v in net.state_dict().items()}), tmp / FIDELITY_FILE,
                  metadata={"format": "pt", "kind": "fidelity"})
        manifest.files = {f.name: sha256_file(f) for f in sorted(tmp.glob("*.safetensors"))}
        (tmp / MANIFEST).write_text(manifest.to_json())
    return dest


def install_entry(src: str | Path, zoo: str | Path, *, name: str | None = None, half: bool = False,
                  replace: bool = False, sampler: str | None = None, steps: int | None = None,
                  guidance: float | None = None, guidance_steps: dict[int, float] | None = None,
                  strength: float | None = None) -> Path:
    """Copy a verified entry into `zoo` as `<zoo>/<name>` (default: its manifest name), atomically.
    `half` stores floating-point weights as float16 (loading casts them back to the model's dtype): how the
    embedded zoo is kept small. `sampler` / `steps` replace the default the entry is served with (e.g. the
    one cdd-eval measured best); `guidance`, the default w of an entry that takes one, within its trained range, and
    `guidance_steps` ({steps: w}) the default for step counts where another w is better; `strength`, the share of the
    schedule a request runs (below 1: from the input; super-resolution and edit). The manifest keeps everything else
    and records where the entry came from."""
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
        from ..runtime.diffusion.samplers import servable_samplers

        if sampler not in servable_samplers(manifest.task):
            raise ZooError(f"sampler {sampler!r} is not one of {', '.join(servable_samplers(manifest.task))}")
        manifest.sampler = sampler
    if steps is not None:
        if not 1 <= int(steps) <= 1000:
            raise ZooError(f"steps {steps!r}: expected an integer in 1..1000")
        manifest.steps = int(steps)
    if strength is not None:
        from ..runtime.serving.tasks import check_strength

        try:
            check_strength(manifest.task, strength, manifest.steps)  # the span against the steps: when registered
        except ValueError as e:
            raise ZooError(str(e)) from None
        manifest.strength = float(strength)
    if guidance is not None:
        range_ = manifest.guidance
        if range_ is None:
            raise ZooError(f"guidance {guidance:g}: {src} is a {manifest.kind} entry, which takes no guidance weight")
        if not range_[1] <= guidance <= range_[2]:
            raise ZooError(f"guidance {guidance:g} is outside the range the entry was trained on, "
                           f"[{range_[1]:g}, {range_[2]:g}]")
        manifest.architecture = {**manifest.architecture, "guidance": float(guidance)}
    if guidance_steps:
        try:
            manifest = Manifest(**{**manifest.model_dump(), "guidance_steps": {str(int(k)): float(w)
                                                                               for k, w in guidance_steps.items()}})
        except ZooError as e:
            raise ZooError(f"{src}: {e}") from None
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
        except OSError as e:  # unreadable: that entry, not the zoo
            out.append((d, ZooError(f"{d / MANIFEST} cannot be read: {e.strerror or type(e).__name__}")))
    return out


EMBEDDED = Path(__file__).parent / "embedded"


def default_zoo_dir() -> Path:
    """The zoo that ships with the package (adapters/embedded/zoo)."""
    return EMBEDDED / "zoo"


def default_backbone_dir() -> Path:
    """The small pretrained backbone that ships with the package (adapters/embedded/backbone)."""
    return EMBEDDED / "backbone"
