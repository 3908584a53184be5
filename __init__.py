"""cdd: Conditional Diffusion Distillation adapter zoo and multi-task serving runtime.

The repository root is this package: `adapters/`, `runtime/` and `training/` install as
`cdd.adapters`, `cdd.runtime` and `cdd.training` (see pyproject.toml).
"""

__version__ = "0.1.0"
