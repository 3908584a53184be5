"""Export a zoo entry as a diffusers model folder (`ControlNetModel` / `T2IAdapter`.from_pretrained)."""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import atomic_directory
from .zoo import ZooEntry, ZooError


def export_entry(entry: ZooEntry, out: str | Path) -> Path:
    """Write `entry` as a diffusers folder. controlnet: the ControlNetModel as trained; controlnet-lora:
    the LoRA merged into the copied weights; t2i: the T2IAdapter with the per-level gates written to
    `cdd_gates.json` (diffusers' adapter pipelines take one global `adapter_conditioning_scale`, so the
    export reproduces our output exactly only when the gates are equal: pass that value).
    controlnet-gated blends the backbone's own features (eq. 10), which no diffusers class expresses."""
    kind = entry.manifest.kind
    adapter = entry.adapter
    if entry.manifest.mode != "pe":
        raise ZooError(
            f"{entry.manifest.name} was trained in mode {entry.manifest.mode!r} and changes the backbone; "
            "only mode 'pe' entries export as a stand-alone diffusers adapter"
        )
    with atomic_directory(out) as tmp:
        if kind == "controlnet":
            adapter.controlnet.save_pretrained(tmp, safe_serialization=True)
        elif kind == "controlnet-lora":
            adapter.merged_controlnet().save_pretrained(tmp, safe_serialization=True)
        elif kind == "t2i":
            adapter.adapter.save_pretrained(tmp, safe_serialization=True)
            gates = [float(g) for g in adapter.gates.detach().cpu()]
            (tmp / "cdd_gates.json").write_text(json.dumps({"gates": gates}, indent=2) + "\n")
        else:
            raise ZooError(
                f"{entry.manifest.name} is a {kind} adapter: its eq. 10 blend of the backbone's own features "
                "has no diffusers ControlNetModel equivalent, so it cannot be exported"
            )
    return Path(out)
