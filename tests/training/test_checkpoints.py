"""Checksummed checkpoints: a damaged checkpoint is refused on resume with a message naming the file at
fault and the newest intact checkpoint; two identical runs write byte-identical zoo entries."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from torch.utils.data import IterableDataset

from cdd.training.checkpoints import CheckpointError, read_state
from cdd.training.config import TrainConfig
from cdd.training.loop import train

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/training/conftest.py


class TinySet(IterableDataset):
    def __iter__(self):
        k = 0
        while True:
            g = torch.Generator().manual_seed(k)
            target = torch.rand(3, 16, 16, generator=g) * 2 - 1
            yield {"condition": (target + 1) / 2, "target": target, "text": "a red sphere"}
            k += 1


def config(out, backbone_dir, **kw):
    return TrainConfig(task="depth", backbone=str(backbone_dir), output=str(out), batch_size=2, num_workers=0,
                       sample_every=0, log_every=1, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory, pixel_backbone_dir):
    from accelerate.state import AcceleratorState, GradientState

    out = tmp_path_factory.mktemp("ckpt") / "run"
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train(config(out, pixel_backbone_dir, max_train_steps=2, checkpoint_every=1, keep_checkpoints=3), dataset=TinySet())
    return out


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "bit flip in trainable.safetensors": ("trainable.safetensors", lambda p: flip_last_byte(p), "corrupt"),
    "truncated ema.safetensors": ("ema.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100]), "corrupt"),
    "truncated optimizer.pt": ("optimizer.pt", lambda p: p.write_bytes(p.read_bytes()[:50]), "corrupt"),
    "missing rng.pt": ("rng.pt", lambda p: p.unlink(), "missing"),
    "garbage state.json": ("state.json", lambda p: p.write_text("{garbage"), "not valid JSON"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_names_the_file_and_the_newest_intact_one(run, tmp_path, pixel_backbone_dir, case):
    name, damage, what = DAMAGE[case]
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    damage(copy / "checkpoints" / "step-000002" / name)
    with pytest.raises(CheckpointError) as e:
        train(config(copy, pixel_backbone_dir, max_train_steps=3, checkpoint_every=1, keep_checkpoints=3,
                     resume="latest"), dataset=TinySet())
    message = str(e.value)
    assert f"step-000002: {name} " in message and what in message
    assert f"the newest intact checkpoint is {copy / 'checkpoints' / 'step-000001'}" in message


def test_state_json_records_every_file_hash(run):
    folder = run / "checkpoints" / "step-000002"
    state = read_state(folder)
    assert set(state["files"]) == {f.name for f in folder.iterdir()} - {"state.json"}
    for name, digest in state["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest


def test_two_identical_runs_write_identical_entries(run, tmp_path, pixel_backbone_dir):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    again = tmp_path / "again"
    train(config(again, pixel_backbone_dir, max_train_steps=2, checkpoint_every=1, keep_checkpoints=3), dataset=TinySet())
    a, b = json.loads((run / "entry" / "manifest.json").read_text()), json.loads((again / "entry" / "manifest.json").read_text())
    assert a["files"] == b["files"]  # the same weights give the same bytes, so the same hashes


def test_pretrain_resume_refuses_a_damaged_checkpoint_naming_the_file(tmp_path, capsys):
    from cdd.training.pretrain import main

    out = tmp_path / "bb"
    tiny = ["--output", str(out), "--resolution", "16", "--channels", "8,16", "--self-attention-from", "1",
            "--text-hidden", "16", "--text-layers", "1", "--batch-size", "2", "--warmup-steps", "1",
            "--checkpoint-every", "1", "--sample-every", "1000", "--sample-steps", "1"]
    assert main([*tiny, "--max-train-steps", "1"]) == 0
    assert set(read_state(out / "checkpoint")["files"]) == {"training_state.pt"}
    flip_last_byte(out / "checkpoint" / "training_state.pt")
    assert main([*tiny, "--max-train-steps", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {out / 'checkpoint'}: training_state.pt is corrupt" in err and "no older checkpoint" in err
