# Experiment script (2026-12-07): the weight average of restarts of one recipe from one start (a "model soup",
# Wortsman et al. 2022), measured against each restart (docs/results.md, "Two restarts averaged").
"""Average the adapter weights of zoo entries of one architecture into a new entry (uniform weights).

    python experiments/average_entries.py runs/dmd/adv-1500/entry runs/dmd/adv-1500-s2/entry --out runs/soup/entry

The entries must share the backbone, task, kind, architecture and mode `pe` (only the adapter is averaged); the new
entry keeps the first one's manifest (sampler, steps, guidance) and records its ingredients under `training`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cdd.adapters.zoo import default_backbone_dir, load_entry, save_entry, verify_entry
from cdd.runtime.diffusion.backbone import load_backbone


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("entries", type=Path, nargs="+", help="two or more zoo entry folders")
    p.add_argument("--out", type=Path, required=True, help="the new entry's folder")
    p.add_argument("--backbone", type=Path, default=None, help="the backbone folder (default: the embedded one)")
    args = p.parse_args()
    if len(args.entries) < 2:
        raise SystemExit("average_entries: give two or more entries")
    backbone = load_backbone(args.backbone or default_backbone_dir())
    manifests = [verify_entry(e, backbone.fingerprint) for e in args.entries]
    first = manifests[0]
    for path, m in zip(args.entries[1:], manifests[1:], strict=True):
        if (m.task, m.kind, m.mode) != (first.task, first.kind, first.mode):
            raise SystemExit(f"average_entries: {path} is not the task, kind and mode of {args.entries[0]}")
    if first.mode != "pe":
        raise SystemExit(f"average_entries: mode {first.mode!r}; only adapters (mode pe) are averaged")
    loaded = [load_entry(e, backbone.unet, backbone.fingerprint) for e in args.entries]
    states = [e.adapter.weights() for e in loaded]
    for path, state in zip(args.entries[1:], states[1:], strict=True):
        # the architecture by its weights (diffusers' config lists its defaults in no fixed order)
        if {k: v.shape for k, v in state.items()} != {k: v.shape for k, v in states[0].items()}:
            raise SystemExit(f"average_entries: {path}'s adapter weights are not shaped as {args.entries[0]}'s")
    mean = {k: torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype) for k in states[0]}
    adapter = loaded[0].adapter
    adapter.load_weights(mean)
    training = {**first.training, "averaged": [str(e) for e in args.entries]}
    save_entry(args.out, adapter, name=first.name, task=first.task, backbone_fingerprint=backbone.fingerprint,
               condition=first.condition, sampler=first.sampler, steps=first.steps, mode=first.mode, training=training)
    print(f"{args.out}: the mean of {len(args.entries)} entries' adapters")


if __name__ == "__main__":
    main()
