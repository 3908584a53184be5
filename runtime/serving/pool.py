"""The adapter pool: which zoo entries are registered, which are resident on the device, and the
live slots the denoiser runs.

- Registered: verified zoo entries (sha256 of every file, backbone fingerprint) by name.
- Resident: an entry's weights on the device, kept up to a memory budget in bytes, least recently
  used dropped first.
- Live slots: one adapter module per architecture (kind + architecture config hash). Serving an
  entry copies its resident weights into its architecture's slot in place (`param.copy_`), so the
  slot's tensors keep their addresses and a CUDA graph captured against the slot stays valid.
- Backbone LoRA (mode `lora`) lives on the shared UNet under the entry's peft adapter name and is
  switched with `set_backbone_lora` before each batch.

Not thread-safe by itself beyond registration: `activate`, `load`, `evict` and `unregister` are called
by the engine's worker, or under the engine's execution lock.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ...adapters.architectures import (
    Adapter,
    adapter_from_config,
    backbone_lora_name,
    load_backbone_lora,
    set_backbone_lora,
)
from ...adapters.fidelity import FidelityNet
from ...adapters.zoo import ADAPTER_FILE, BACKBONE_LORA_FILE, Manifest, ZooError, load_fidelity, verify_entry
from ..diffusion.backbone import Backbone
from ..diffusion.denoiser import ConditionedDenoiser
from .metrics import Metrics
from ..diffusion.samplers import servable_samplers
from .tasks import check_strength

MAX_STEPS = 4  # what a request may ask for
MAX_MANIFEST_STEPS = 64  # an entry's own default may be more (a Guided Distillation stage-1 student: 16)


class AdapterConflict(ZooError):
    """An entry with the same name is already registered."""


class AdapterGone(KeyError):
    """The named entry is not (or no longer) registered."""


@dataclass(frozen=True)
class Registered:
    name: str
    path: Path
    manifest: Manifest
    architecture: str  # the live-slot key: kind + architecture config hash

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def resolution(self) -> int:
        return int(self.manifest.condition["resolution"])

    @property
    def channels(self) -> int:
        return int(self.manifest.condition.get("channels", 3))

    @property
    def lora_name(self) -> str | None:
        return backbone_lora_name(self.name) if self.manifest.backbone_lora is not None else None


@dataclass
class Resident:
    state: dict[str, torch.Tensor]  # the slot's stored keys, on the device
    nbytes: int
    lora: str | None = None  # peft adapter name on the shared UNet
    fidelity: FidelityNet | None = None  # super-resolution's fidelity module, on the device


@dataclass
class LiveSlot:
    """The one module of an architecture that the denoiser (and any captured graph) runs."""

    key: str
    adapter: Adapter
    denoiser: ConditionedDenoiser
    stored_keys: frozenset[str]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # views sharing the module's storage
    current: str | None = None

    def copy_in(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, v in state.items():
                self.tensors[k].copy_(v)

    def live_tensors(self) -> dict[str, torch.Tensor]:
        """The module's tensors as they are now (a rebound parameter shows up here, not in `tensors`)."""
        return {k: v for k, v in self.adapter.state_dict().items() if k in self.stored_keys}

    def data_ptrs(self) -> dict[str, int]:
        return {k: t.data_ptr() for k, t in self.live_tensors().items()}


def architecture_key(manifest: Manifest) -> str:
    """kind + a hash of the architecture config without diffusers' bookkeeping (`_use_default_values`,
    `_diffusers_version`, ...: keys starting with `_`, whose content and order vary between entries of one
    architecture). What is left builds the module, so entries with equal keys share a live slot."""
    blob = json.dumps(_without_bookkeeping(manifest.architecture), sort_keys=True, separators=(",", ":"))
    return f"{manifest.kind}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _without_bookkeeping(config):
    if isinstance(config, dict):
        return {k: _without_bookkeeping(v) for k, v in config.items() if not str(k).startswith("_")}
    if isinstance(config, list):
        return [_without_bookkeeping(v) for v in config]
    return config


def _check_finite(path: Path, fname: str, state: dict[str, torch.Tensor]) -> None:
    """ZooError naming the first tensors with NaN or infinite values: such weights only make garbage."""
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise ZooError(f"zoo entry {path}: {fname} has non-finite values (NaN or inf) in {len(bad)} tensor(s): "
                       f"{', '.join(bad[:3])}")


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class AdapterPool:
    def __init__(
        self,
        backbone: Backbone,
        budget_bytes: int,
        metrics: Metrics | None = None,
        on_lora_dropped: Callable[[str], None] | None = None,
    ):
        self.backbone = backbone
        self.budget_bytes = budget_bytes
        self.metrics = metrics
        self.on_lora_dropped = on_lora_dropped
        self._registered: dict[str, Registered] = {}
        self._resident: OrderedDict[str, Resident] = OrderedDict()  # LRU: oldest first
        self._slots: dict[str, LiveSlot] = {}
        self._active_lora: str | None = None
        self._lock = threading.RLock()  # guards _registered and _resident (read by the HTTP layer)

    # -- registry ------------------------------------------------------------------------

    def register(self, path: str | Path) -> Registered:
        """Verify a zoo entry folder against the loaded backbone and make it servable (loaded lazily)."""
        path = Path(path)
        manifest = verify_entry(path, self.backbone.fingerprint)
        self._check_servable(path, manifest)
        reg = Registered(manifest.name, path.resolve(), manifest, architecture_key(manifest))
        with self._lock:
            if manifest.name in self._registered:
                raise AdapterConflict(
                    f"an adapter named {manifest.name!r} is already registered (from {self._registered[manifest.name].path})"
                )
            self._registered[manifest.name] = reg
        return reg

    def _check_servable(self, path: Path, m: Manifest) -> None:
        where = f"zoo entry {path} ({m.name})"
        if m.mode == "full":
            raise ZooError(
                f"{where} was trained in mode 'full' and replaces the whole backbone UNet; cdd-serve shares one "
                "backbone between adapters and serves modes 'pe' and 'lora' only"
            )
        if not 1 <= m.steps <= MAX_MANIFEST_STEPS:
            raise ZooError(f"{where}: manifest steps is {m.steps}; the runtime serves 1-{MAX_MANIFEST_STEPS} steps")
        if m.sampler not in servable_samplers(m.task):
            raise ZooError(f"{where}: manifest sampler {m.sampler!r} is not one of {', '.join(servable_samplers(m.task))}")
        try:
            check_strength(m.task, m.strength, m.steps, self.backbone.schedule.num_train_timesteps)
        except ValueError as e:
            raise ZooError(f"{where}: manifest {e}") from None
        res = m.condition.get("resolution")
        factor = self.backbone.size_factor
        if not isinstance(res, int) or res < factor or res % factor:
            raise ZooError(f"{where}: condition resolution {res!r} must be a positive multiple of {factor} for this backbone")
        if m.condition.get("channels", 3) not in (1, 3):
            raise ZooError(f"{where}: condition channels {m.condition.get('channels')!r} must be 1 or 3")

    def unregister(self, name: str) -> Registered:
        with self._lock:
            reg = self._registered.pop(name, None)
            if reg is None:
                raise AdapterGone(name)
            if name in self._resident:
                self._evict(name)
            for slot in self._slots.values():
                if slot.current == name:
                    slot.current = None
            if all(r.architecture != reg.architecture for r in self._registered.values()):
                self._slots.pop(reg.architecture, None)  # its last entry left: the module's memory goes too
        return reg

    def get(self, name: str) -> Registered:
        with self._lock:
            if name not in self._registered:
                raise AdapterGone(name)
            return self._registered[name]

    def entries(self) -> list[Registered]:
        with self._lock:
            return sorted(self._registered.values(), key=lambda r: (r.task, r.name))

    # -- residency and live slots ----------------------------------------------------------

    def activate(self, name: str) -> tuple[LiveSlot, Registered]:
        """Make `name` the adapter its architecture's live slot runs (and its backbone LoRA, if any, the
        active one): load it if it is not resident, then copy its weights in place when the slot holds
        another entry."""
        reg, slot, resident = self._make_resident(name)
        if slot.current != name:
            slot.copy_in(resident.state)
            slot.current = name
            if self.metrics:
                self.metrics.adapter_swaps.inc()
        self._set_lora(resident.lora)
        return slot, reg

    def load(self, name: str) -> Registered:
        """Make `name` resident (its weights on the device) without serving it yet."""
        return self._make_resident(name)[0]

    def fidelity(self, name: str) -> FidelityNet | None:
        """`name`'s fidelity module on the device (loading the entry if it is not resident), None when it has none."""
        return self._make_resident(name)[2].fidelity

    def evict(self, name: str) -> bool:
        """Drop `name`'s weights from the device (it stays registered; serving it loads it again).
        False when it was not resident."""
        with self._lock:
            if name not in self._resident:
                return False
            self._evict(name)
            return True

    def _make_resident(self, name: str) -> tuple[Registered, LiveSlot, Resident]:
        reg = self.get(name)
        slot = self._slot(reg)
        with self._lock:
            resident = self._resident.get(name)
            if resident is None:
                resident = self._load(reg, slot)
            self._resident.move_to_end(name)
        return reg, slot, resident

    def _slot(self, reg: Registered) -> LiveSlot:
        slot = self._slots.get(reg.architecture)
        if slot is None:
            m = reg.manifest
            try:
                adapter = adapter_from_config(m.kind, m.architecture, _unet_without_lora(self.backbone.unet))
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise ZooError(f"zoo entry {reg.path}: cannot build its {m.kind} architecture: {e}") from e
            stored = frozenset(adapter.weights())  # before freezing: LoRA kinds store what is trainable
            adapter.to(self.backbone.device, self.backbone.dtype).requires_grad_(False).eval()
            tensors = {k: v for k, v in adapter.state_dict().items() if k in stored}
            denoiser = ConditionedDenoiser(self.backbone.unet, self.backbone.schedule, adapter)
            slot = LiveSlot(reg.architecture, adapter, denoiser, stored, tensors)
            self._slots[reg.architecture] = slot
        return slot

    def _load(self, reg: Registered, slot: LiveSlot) -> Resident:
        t0 = time.perf_counter()
        manifest = verify_entry(reg.path, self.backbone.fingerprint)  # the files may have changed since register
        if manifest.to_json() != reg.manifest.to_json():
            raise ZooError(f"zoo entry {reg.path} changed on disk since it was registered; register it again")
        try:
            state = load_file(reg.path / ADAPTER_FILE, device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types on a file it cannot parse
            raise ZooError(f"zoo entry {reg.path}: {ADAPTER_FILE} cannot be loaded: {type(e).__name__}: {e}") from e
        _check_finite(reg.path, ADAPTER_FILE, state)
        missing, unexpected = sorted(slot.stored_keys - set(state)), sorted(set(state) - slot.stored_keys)
        bad = [k for k in slot.stored_keys & set(state) if tuple(state[k].shape) != tuple(slot.tensors[k].shape)]
        if missing or unexpected or bad:
            raise ZooError(
                f"zoo entry {reg.path}: weights do not fit the {manifest.kind} architecture: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shape {sorted(bad)[:5]}"
            )
        device, dtype = self.backbone.device, self.backbone.dtype
        state = {k: v.to(device=device, dtype=slot.tensors[k].dtype) for k, v in state.items()}
        nbytes = _nbytes(state)
        lora = None
        if reg.lora_name is not None:
            try:
                lora_state = load_file(reg.path / BACKBONE_LORA_FILE, device="cpu")
            except Exception as e:  # noqa: BLE001
                raise ZooError(f"zoo entry {reg.path}: {BACKBONE_LORA_FILE} cannot be loaded: {type(e).__name__}: {e}") from e
            _check_finite(reg.path, BACKBONE_LORA_FILE, lora_state)
            load_backbone_lora(self.backbone.unet, reg.lora_name, manifest.backbone_lora, lora_state)
            _place_lora(self.backbone.unet, reg.lora_name, device, dtype)
            set_backbone_lora(self.backbone.unet, self._active_lora)
            lora, nbytes = reg.lora_name, nbytes + _nbytes(lora_state)
        fidelity = None
        if manifest.fidelity is not None:
            fidelity = load_fidelity(reg.path, manifest).to(device, dtype)
            nbytes += sum(p.numel() * p.element_size() for p in fidelity.parameters())
        resident = Resident(state, nbytes, lora, fidelity)
        self._resident[reg.name] = resident
        self._fit_budget(keep=reg.name)
        if self.metrics:
            self.metrics.adapter_load_seconds.observe(time.perf_counter() - t0)
            self._gauge()
        return resident

    def _fit_budget(self, keep: str) -> None:
        """Drop least recently used residents until within budget (never the one being activated)."""
        while self.resident_bytes() > self.budget_bytes:
            victim = next((n for n in self._resident if n != keep), None)
            if victim is None:
                return  # one adapter larger than the budget still serves
            self._evict(victim)
            if self.metrics:
                self.metrics.adapter_evictions.inc()

    def _evict(self, name: str) -> None:
        resident = self._resident.pop(name)
        if resident.lora is not None:
            _delete_backbone_lora(self.backbone.unet, resident.lora)
            if self._active_lora == resident.lora:
                self._active_lora = None
            if self.on_lora_dropped:
                self.on_lora_dropped(resident.lora)
        for slot in self._slots.values():
            if slot.current == name:
                slot.current = None  # its content stays valid but is re-copied when next served
        self._gauge()

    def _set_lora(self, lora: str | None) -> None:
        if lora != self._active_lora:
            set_backbone_lora(self.backbone.unet, lora)
            self._active_lora = lora

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.resident_adapters.set(len(self._resident))
            self.metrics.resident_bytes.set(self.resident_bytes())

    @property
    def active_lora(self) -> str | None:
        """The backbone LoRA the shared UNet runs with now (None: the plain backbone)."""
        return self._active_lora

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(r.nbytes for r in self._resident.values())

    def resident_names(self) -> list[str]:
        """Resident entries, least recently used first."""
        with self._lock:
            return list(self._resident)

    def slots(self) -> dict[str, LiveSlot]:
        return dict(self._slots)


def _tuner_layers(unet: torch.nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def _unet_without_lora(unet):
    """The UNet itself, or (when backbone LoRA layers are injected) a plain copy of its base weights:
    ControlNetModel.from_unet copies the UNet's modules and cannot read peft-wrapped ones."""
    if not _tuner_layers(unet):
        return unet
    from diffusers import UNet2DConditionModel

    plain = UNet2DConditionModel.from_config(unet.config).to(unet.device, unet.dtype)
    state = {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if "lora_" not in k}
    plain.load_state_dict(state, strict=True)
    return plain


def _place_lora(unet, name: str, device, dtype) -> None:
    """Move one backbone LoRA's new layers to the UNet's device and dtype (the base weights stay put)."""
    for layer in _tuner_layers(unet):
        for group in (getattr(layer, "lora_A", {}), getattr(layer, "lora_B", {})):
            if name in group:
                group[name].to(device, dtype)


def _delete_backbone_lora(unet, name: str) -> None:
    for layer in _tuner_layers(unet):
        if name in getattr(layer, "lora_A", {}):
            layer.delete_adapter(name)
