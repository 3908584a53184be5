"""experiments/average_entries.py: the averaged entry holds the mean of its ingredients' adapter weights, verifies
against the backbone, and entries of another kind are refused."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cdd.adapters.architectures import build_adapter
from cdd.adapters.zoo import save_entry, verify_entry

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "average_entries.py"
spec = importlib.util.spec_from_file_location("average_entries", SCRIPT)
average_entries = importlib.util.module_from_spec(spec)
spec.loader.exec_module(average_entries)


def _entry(path, backbone, kind, seed, perturb):
    adapter = perturb(build_adapter(kind, backbone.unet, backbone.vae_scale_factor), seed=seed)
    save_entry(path, adapter, name="depth", task="depth", backbone_fingerprint=backbone.fingerprint,
               condition={"channels": 3, "range": [0, 1], "resolution": backbone.resolution}, steps=2)
    return path


def _run(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["average_entries.py", *map(str, argv)])
    average_entries.main()


def test_the_mean_of_two_entries(tmp_path, latent_backbone, latent_backbone_dir, perturb, monkeypatch):
    a = _entry(tmp_path / "a", latent_backbone, "controlnet", 1, perturb)
    b = _entry(tmp_path / "b", latent_backbone, "controlnet", 2, perturb)
    _run(monkeypatch, a, b, "--out", tmp_path / "soup", "--backbone", latent_backbone_dir)
    manifest = verify_entry(tmp_path / "soup", latent_backbone.fingerprint)
    assert manifest.kind == "controlnet" and manifest.steps == 2 and manifest.training["averaged"] == [str(a), str(b)]
    wa, wb = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    mean = load_file(tmp_path / "soup" / "adapter.safetensors")
    assert set(mean) == set(wa) and any(not torch.equal(wa[k], wb[k]) for k in wa)
    for k in wa:
        assert torch.allclose(mean[k], (wa[k] + wb[k]) / 2, atol=1e-6), k


def test_entries_of_another_kind_are_refused(tmp_path, latent_backbone, latent_backbone_dir, perturb, monkeypatch):
    a = _entry(tmp_path / "a", latent_backbone, "controlnet", 1, perturb)
    b = _entry(tmp_path / "b", latent_backbone, "t2i", 2, perturb)
    with pytest.raises(SystemExit, match="not the task, kind and mode"):
        _run(monkeypatch, a, b, "--out", tmp_path / "soup", "--backbone", latent_backbone_dir)
    assert not (tmp_path / "soup").exists()
