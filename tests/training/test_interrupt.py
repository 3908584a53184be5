"""Stopping a training run loses nothing: SIGINT / SIGTERM finish the step in progress, write a checkpoint
of it and exit with one line saying how to resume; --resume then continues bit for bit. Checkpoints come
by time as well as by steps; a newest checkpoint without its state.json is reported; a file the run cannot
write is one line naming it."""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from torch.utils.data import IterableDataset

from cdd.training.config import TrainConfig
from cdd.training.loop import TrainingInterrupted, train
from cdd.training.train_adapter import main

TINY = ["--task", "depth", "--batch-size", "2", "--num-workers", "0", "--resolution", "16"]


class TinySet(IterableDataset):
    """Deterministic random samples at 16 px: sample k depends on k alone (like cdd.training.data)."""

    def sample(self, k):
        target = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(k)) * 2 - 1
        return {"condition": (target + 1) / 2, "target": target, "text": "a red sphere"}

    def __iter__(self):
        k = 0
        while True:
            yield self.sample(k)
            k += 1


def config(tmp_path, backbone_dir, **kw):
    options = dict(task="depth", backbone=str(backbone_dir), output=str(tmp_path / "run"), batch_size=2,
                   max_train_steps=2, num_workers=0, sample_every=0, checkpoint_every=100, log_every=1)
    return TrainConfig(**{**options, **kw})


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/training/conftest.py


def same_weights(a_dir, b_dir):
    for name in ("trainable.safetensors", "ema.safetensors"):
        a, b = load_file(a_dir / name), load_file(b_dir / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # bitwise


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_checkpoints_the_step_and_resume_continues_bit_for_bit(tmp_path, pixel_backbone_dir, sig):
    common = dict(max_train_steps=5, checkpoint_every=0, checkpoint_minutes=0, keep_checkpoints=5)
    straight = train(config(tmp_path / "a", pixel_backbone_dir, **common), dataset=TinySet())

    def signal_at_3(step):
        if step == 3:
            os.kill(os.getpid(), sig)
    cfg = config(tmp_path / "b", pixel_backbone_dir, **common)
    before = signal.getsignal(sig)  # whatever the process had (another test's library may have installed one)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(cfg, dataset=TinySet(), on_step=signal_at_3)
    ck = tmp_path / "b" / "run" / "checkpoints"
    assert stopped.value.step == 3 and stopped.value.checkpoint == ck / "step-000003"
    assert f"--resume {ck / 'step-000003'}" in str(stopped.value)
    assert [p.name for p in ck.iterdir()] == ["step-000003"]  # no interval checkpoint: only the signal's
    assert signal.getsignal(sig) is before  # handlers restored
    resumed = train(cfg.replace(resume=str(ck / "step-000003")), dataset=TinySet())
    assert resumed.step == straight.step == 5
    same_weights(tmp_path / "a" / "run" / "checkpoints" / "step-000005", ck / "step-000005")


def test_checkpoints_come_by_time_whatever_a_step_takes(tmp_path, pixel_backbone_dir):
    cfg = config(tmp_path, pixel_backbone_dir, max_train_steps=3, checkpoint_every=0, checkpoint_minutes=1e-6,
                 keep_checkpoints=5)
    train(cfg, dataset=TinySet())
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())] == [
        "step-000001", "step-000002", "step-000003"]
    # the default is by time (minutes), not every N steps
    from cdd.training.config import TrainConfig

    d = TrainConfig(task="depth")
    assert d.checkpoint_every == 0 and d.checkpoint_minutes > 0


def test_a_newest_checkpoint_without_its_state_is_reported(tmp_path, pixel_backbone_dir, capsys):
    cfg = config(tmp_path, pixel_backbone_dir, max_train_steps=4, checkpoint_every=2, keep_checkpoints=5)
    train(cfg, dataset=TinySet())
    ck = tmp_path / "run" / "checkpoints"
    (ck / "step-000004" / "state.json").unlink()
    capsys.readouterr()
    resumed = train(cfg.replace(resume="latest", max_train_steps=5), dataset=TinySet())
    out = capsys.readouterr().out
    assert f"{ck / 'step-000004'} have no state.json" in out and f"resuming from {ck / 'step-000002'}" in out
    assert "resumed from" in out and resumed.step == 5


def test_an_unwritable_output_is_one_line_naming_it(tmp_path, pixel_backbone_dir, capsys):
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "a-file" / "run"
    code = main([*TINY, "--backbone", str(pixel_backbone_dir), "--output", str(out), "--max-train-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("cdd-train-adapter: error: cannot write") and str(tmp_path / "a-file") in err[-1]
    assert not any("Traceback" in line for line in err)


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))  # a disk that fills up: writes past 60 kB fail


@pytest.mark.slow
def test_signals_and_a_full_disk_in_the_cli(pixel_backbone_dir, tmp_path):
    common = [*TINY, "--backbone", str(pixel_backbone_dir), "--sample-every", "0", "--log-every", "1"]
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "cdd.training.train_adapter", *common, "--output", str(out),
                             "--max-train-steps", "100000"], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 180
    while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("cdd-train-adapter: SIGTERM at step ") and "--resume" in last
    step = int(last.split("at step ")[1].split(":")[0])
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert step >= max(logged) >= 2  # nothing logged was lost
    assert json.loads((out / "checkpoints" / f"step-{step:06d}" / "state.json").read_text())["step"] == step

    full = tmp_path / "full"
    done = subprocess.run([sys.executable, "-m", "cdd.training.train_adapter", *common, "--output", str(full),
                           "--max-train-steps", "2", "--checkpoint-every", "1"], env=env(), capture_output=True,
                          text=True, timeout=300, preexec_fn=_limit_file_size)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[-1].startswith(f"cdd-train-adapter: error: cannot write {full / 'checkpoints'}"), lines[-1]
