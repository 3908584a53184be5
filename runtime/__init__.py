"""The runtime, in two halves.

- `cdd.runtime.diffusion`: the diffusion library that training, evaluation and users import (backbone
  loading, noise schedule, samplers, the conditioned denoiser, text encoders, the backbone factory). It
  imports nothing from the serving half.
- `cdd.runtime.serving`: the HTTP service `cdd-serve` (app, engine, executor, scheduler, adapter pool,
  CUDA graphs, settings, metrics, Ray Serve).

The library modules were importable as `cdd.runtime.<module>` before 2026-12-06; those names still work, with
a DeprecationWarning, until the next release (`runtime/_moved.py`).
"""
