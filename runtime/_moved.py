"""Old import paths of the diffusion library's modules (`cdd.runtime.backbone`, ...), kept for one release.

Each shim module calls `alias`, which puts the real module in its place in `sys.modules`, so that
`cdd.runtime.backbone` *is* `cdd.runtime.diffusion.backbone` (same functions, same module state)."""

from __future__ import annotations

import importlib
import sys
import warnings


def alias(old: str) -> None:
    name = old.rsplit(".", 1)[1]
    new = f"cdd.runtime.diffusion.{name}"
    warnings.warn(f"{old} moved to {new} on 2026-12-06; the old name goes in the next release", DeprecationWarning,
                  stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
