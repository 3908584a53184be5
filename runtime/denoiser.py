"""Deprecated: moved to `cdd.runtime.diffusion.denoiser` (2026-12-06); this name goes in the next release."""
from ._moved import alias

alias(__name__)
