"""The manifest model: safe names, typed fields named in errors, files inside the entry, deterministic bytes."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from cdd.adapters.architectures import build_adapter
from cdd.adapters.zoo import ADAPTER_FILE, MANIFEST, Manifest, ZooError, save_entry, save_file, verify_entry


@pytest.fixture
def entry(pixel_backbone, tmp_path):
    adapter = build_adapter("controlnet", pixel_backbone.unet)
    save_entry(tmp_path / "a", adapter, name="a", task="depth", backbone_fingerprint=pixel_backbone.fingerprint,
               condition={"channels": 3, "range": [0, 1], "resolution": 16})
    return tmp_path / "a"


def rewrite(entry, **fields):
    m = json.loads((entry / MANIFEST).read_text())
    (entry / MANIFEST).write_text(json.dumps({**m, **fields}))


@pytest.mark.parametrize("field,value", [
    ("name", "depth-✓"), ("name", ".."), ("name", "a/b"), ("name", "a\nb"), ("name", "x" * 100_000),
    ("name", "<b>x</b>"), ("name", ["x"]), ("task", "de pth"), ("steps", "abc"), ("steps", 0),
    ("files", ["adapter.safetensors"]), ("files", {"../../etc/shadow": "0" * 64}),
    ("files", {"adapter.safetensors": "not-a-sha"}), ("condition", {"resolution": 65536}),
    ("condition", {"resolution": 16, "channels": 2}), ("kind", "resnet"), ("architecture", "x"),
])
def test_bad_fields_are_refused_naming_the_field(entry, field, value):
    rewrite(entry, **{field: value})
    with pytest.raises(ZooError, match=f"manifest field '{field}"):
        verify_entry(entry)


def test_unreadable_manifests_are_refused_with_a_message(entry):
    (entry / MANIFEST).write_bytes(b'{"name": "\xff\xfe"}')
    with pytest.raises(ZooError, match="not UTF-8"):
        verify_entry(entry)
    (entry / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ZooError, match="nested too deeply|must hold a JSON object"):
        verify_entry(entry)
    (entry / MANIFEST).write_text(json.dumps({"pad": "x" * (2 << 20)}))
    with pytest.raises(ZooError, match="larger than"):
        verify_entry(entry)


def test_a_file_that_is_a_symlink_leaving_the_entry_is_refused(entry, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((entry / ADAPTER_FILE).read_bytes())
    (entry / ADAPTER_FILE).unlink()
    os.symlink(outside, entry / ADAPTER_FILE)
    with pytest.raises(ZooError, match="symbolic link that leaves the entry"):
        verify_entry(entry)


def test_constructing_a_manifest_names_the_field():
    with pytest.raises(ZooError, match="manifest field 'name'"):
        Manifest(name="a b", task="t", kind="controlnet", architecture={}, backbone_fingerprint="f",
                 condition={"resolution": 16})


def test_public_manifest_has_no_paths(entry):
    m = verify_entry(entry)
    m.training = {"method": "codi", "backbone": "/srv/models/backbone", "config": {"output": "/srv/runs/x"}}
    m.metrics = {"eval": {"data": "/data/scenes", "psnr": 17.0, "rel": "docs/results.json"}}
    public = json.dumps(m.public())
    assert "/srv" not in public and "/data" not in public
    assert m.public()["training"] == {"method": "codi"} and m.public()["metrics"]["eval"] == {"psnr": 17.0,
                                                                                            "rel": "docs/results.json"}


def test_safetensors_bytes_do_not_depend_on_the_process_hash_seed(tmp_path):
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(5, dtype=torch.int64)}
    metadata = {f"key{i}": str(i) for i in range(12)}
    digests = set()
    for i in range(6):
        save_file(tensors, tmp_path / f"{i}.safetensors", metadata=metadata)
        digests.add(hashlib.sha256((tmp_path / f"{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    back = load_file(tmp_path / "0.safetensors")
    assert torch.equal(back["b"], tensors["b"]) and torch.equal(back["a"], tensors["a"])
    from safetensors import safe_open

    with safe_open(tmp_path / "0.safetensors", "pt") as f:
        assert f.metadata() == metadata
