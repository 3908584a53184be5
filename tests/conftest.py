"""Shared fixtures: tiny random backbones built locally (nothing is downloaded)."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# cdd-serve without --zoo also serves the user zoo (~/.local/share/cdd/zoo): not this machine's in tests.
os.environ.setdefault("CDD_USER_ZOO", os.path.join(tempfile.gettempdir(), f"cdd-tests-no-user-zoo-{os.getpid()}"))
# One thread: tests are dominated by small ops, and several pytest processes (or a training run
# beside them) on 2 cores with 2 OpenMP threads each slow each other down many times over.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests, whatever a test before it set, and the count restored afterwards
    (serving modules use it: `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def pixel_backbone():
    from cdd.runtime.diffusion.factory import make_backbone

    return make_backbone("pixel", resolution=16, seed=0)


@pytest.fixture(scope="session")
def latent_backbone():
    from cdd.runtime.diffusion.factory import make_backbone

    return make_backbone("latent", resolution=16, seed=1)


@pytest.fixture(scope="session")
def pixel_backbone_dir(tmp_path_factory, pixel_backbone):
    from cdd.runtime.diffusion.factory import save_backbone

    return save_backbone(pixel_backbone, tmp_path_factory.mktemp("bb") / "pixel")


@pytest.fixture(scope="session")
def latent_backbone_dir(tmp_path_factory, latent_backbone):
    from cdd.runtime.diffusion.factory import save_backbone

    return save_backbone(latent_backbone, tmp_path_factory.mktemp("bb") / "latent")


@pytest.fixture(scope="session")
def free_port():
    return free_port_


def free_port_() -> int:
    """A TCP port nothing listens on now (the OS picks it), for a server or a launcher a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def perturb():
    return perturb_


def perturb_(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised parts random values so an adapter's effect is visible in a test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)
    return module
