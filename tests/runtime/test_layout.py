"""The runtime's two halves: the diffusion library imports nothing of the service, and the library's old
module names (before 2026-12-06) still import, with a DeprecationWarning, as the same module objects."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

LIBRARY = ["backbone", "schedule", "samplers", "denoiser", "text", "factory", "pixel_pipeline"]


def test_library_half_imports_nothing_of_the_service():
    code = ("import sys\n"
            + "".join(f"import cdd.runtime.diffusion.{m}\n" for m in LIBRARY)
            + "print(sorted(m for m in sys.modules if m.startswith('cdd.runtime.serving')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", ["backbone", "schedule", "samplers", "denoiser", "text", "factory"])
def test_old_names_are_deprecated_aliases(name):
    sys.modules.pop(f"cdd.runtime.{name}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module(f"cdd.runtime.{name}")
    assert old is importlib.import_module(f"cdd.runtime.diffusion.{name}")
    assert any(issubclass(w.category, DeprecationWarning) and f"cdd.runtime.diffusion.{name}" in str(w.message)
               for w in caught)
