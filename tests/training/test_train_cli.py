"""`cdd-train-adapter` end to end on tiny backbones and the scenes world at 16 px: options, outputs,
a real SIGKILL and --resume, and a 2-process `accelerate launch` run."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cdd.adapters.cli import main as zoo_main
from cdd.training.train_adapter import main

TINY = ["--task", "depth", "--batch-size", "2", "--num-workers", "0", "--resolution", "16"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/training/conftest.py


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_dry_run_prints_the_validated_config(pixel_backbone_dir, capsys):
    assert main(["--task", "depth", "--backbone", str(pixel_backbone_dir), "--per-sample-t", "--adam-beta2", "0.99",
                 "--data-option", "caption_column=prompt", "--dry-run"]) == 0
    out = capsys.readouterr().out
    config = json.loads(out[: out.rindex("}") + 1])
    assert config["task"] == "depth" and config["method"] == "codi" and config["adapter"] == "controlnet"
    assert config["same_t"] is False and config["adam_betas"] == [0.9, 0.99] and config["ema"] == 0.999
    assert config["steps"] == 48 and config["prev_predictor"] == "prev" and config["data_options"] == {"caption_column": "prompt"}
    assert "runs/depth-controlnet-codi" in out and "prev x 4" in out


def _dry(argv, capsys) -> dict:
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    return json.loads(out[: out.rindex("}") + 1])


def test_super_resolution_degradation_preset_photos_and_caption_dropout(pixel_backbone_dir, capsys):
    sr = ["--task", "super-resolution", "--backbone", str(pixel_backbone_dir)]
    config = _dry(sr, capsys)
    assert config["degradation"] == "mild-64px" and config["photo_fraction"] == 0.0  # the default for SR training
    config = _dry([*sr, "--degradation", "realesrgan", "--photo-fraction", "0.25", "--caption-dropout", "0.5"], capsys)
    assert (config["degradation"], config["photo_fraction"], config["caption_dropout"]) == ("realesrgan", 0.25, 0.5)
    assert _dry(["--task", "depth", "--backbone", str(pixel_backbone_dir)], capsys)["degradation"] is None


def test_dataset_options_carry_the_preset_and_photo_share_to_build_dataset():
    from cdd.training.config import TrainConfig
    from cdd.training.data.datasets import build_dataset
    from cdd.training.data.degradations import degradation_preset

    options = TrainConfig(task="super-resolution", photo_fraction=0.5).dataset_options()
    assert options == {"degradation": degradation_preset("mild-64px"), "photo_fraction": 0.5}
    ds = build_dataset("super-resolution", size=16, **options)
    assert ds.degradation == degradation_preset("mild-64px") and ds.photo_fraction == 0.5
    assert TrainConfig(task="depth", data_options={"caption_column": "x"}).dataset_options() == {"caption_column": "x"}


def test_a_super_resolution_run_saved_before_presets_resumes_on_realesrgan(tmp_path, monkeypatch, capsys):
    """A config.json without `degradation` was trained on the published settings: resuming must not switch."""
    monkeypatch.chdir(tmp_path)
    step = tmp_path / "runs" / "super-resolution-controlnet-codi" / "checkpoints" / "step-000004"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")
    (step / "config.json").write_text(json.dumps({"task": "super-resolution", "max_train_steps": 4}))
    config = _dry(["--task", "super-resolution", "--resume"], capsys)
    assert config["degradation"] == "realesrgan"
    from cdd.training.config import TrainConfig

    assert TrainConfig.from_file(step / "config.json").degradation == "realesrgan"


@pytest.mark.parametrize("method,adapter", [("cm", "controlnet"), ("gd", "controlnet-guided")])
def test_resume_latest_of_a_distillation_run_finds_its_checkpoint(method, adapter, tmp_path, monkeypatch, capsys):
    """cm and gd need --init-from; `--resume` must find the run folder before that is checked, with or without it."""
    monkeypatch.chdir(tmp_path)
    step = tmp_path / "runs" / f"depth-{adapter}-{method}" / "checkpoints" / "step-000004"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")
    (tmp_path / "teacher").mkdir()  # the dry run checks only that it is a folder
    saved = {"task": "depth", "adapter": adapter, "method": method, "init_from": "teacher", "max_train_steps": 4}
    (step / "config.json").write_text(json.dumps(saved))
    for extra in ([], ["--init-from", "teacher"]):
        assert main(["--task", "depth", "--method", method, "--max-train-steps", "8", "--resume", *extra, "--dry-run"]) == 0
        config = json.loads((out := capsys.readouterr().out)[: out.rindex("}") + 1])
        assert config["init_from"] == "teacher" and config["adapter"] == adapter and config["max_train_steps"] == 8
        assert config["resume"] == "latest"  # init_from came from the checkpoint's config when not given


def test_resume_of_a_gd_run_with_no_checkpoint_yet_starts_fresh_as_controlnet_guided(tmp_path, monkeypatch, capsys):
    """Scripts pass --resume to every run (experiments/zoo_v2.sh): a first GD run must still get GD's adapter."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher").mkdir()
    config = _dry(["--task", "depth", "--method", "gd", "--init-from", "teacher", "--resume"], capsys)
    assert config["adapter"] == "controlnet-guided" and config["resume"] == "latest"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--ema", "1.5"], "ema 1.5 must be in [0, 1)"),
        (["--method", "finetune", "--prev-predictor", "ddim"], "--prev-predictor: option(s) that --method finetune does not use"),
        (["--data", "/nonexistent/folder"], "data '/nonexistent/folder' is neither 'scenes' nor an existing path"),
        (["--resolution", "17"], "resolution 17 must be a multiple of 2"),
        (["--degradation", "mild-64px"], "degradation presets are for super-resolution, not depth"),
        (["--photo-fraction", "0.5"], "mixes photo patches into the scenes stream of super-resolution, not into depth"),
        (["--method", "finetune", "--changed-weight", "4"], "it is for --task edit with --method finetune or codi, not depth finetune"),
        (["--method", "finetune", "--changed-weight", "-1"], "changed_weight -1.0 must be >= 0"),
        (["--method", "gd", "--init-from", ".", "--changed-weight", "4"], "--changed-weight: option(s) that --method gd does not use"),
    ],
)
def test_bad_options_fail_loudly_naming_the_field(argv, message, pixel_backbone_dir, tmp_path, capsys):
    rc = main(["--task", "depth", "--backbone", str(pixel_backbone_dir), "--output", str(tmp_path / "o"),
               "--max-train-steps", "1", *argv])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_missing_default_backbone_names_the_folder(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("cdd.training.config.default_backbone_dir", lambda: tmp_path / "embedded" / "backbone")
    assert main(["--task", "depth", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "embedded" / "backbone") in err and "--backbone" in err and "cdd-pretrain-backbone" in err


def test_a_short_run_writes_checkpoints_logs_samples_and_a_verified_entry(pixel_backbone_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*TINY, "--backbone", str(pixel_backbone_dir), "--output", str(out), "--max-train-steps", "5",
            "--checkpoint-every", "2", "--sample-every", "4", "--log-every", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "s/step on this machine: 5 steps take about" in printed and "zoo entry" in printed
    assert json.loads((out / "config.json").read_text())["max_train_steps"] == 5
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000005"]  # keeps 2
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000004.png", "step-000005.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/total", "loss/distillation", "loss/guidance", "train/lr", "train/grad_norm"} <= tags
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2, 3, 4, 5]
    assert zoo_main(["verify", str(out / "entry"), "--backbone", str(pixel_backbone_dir)]) == 0
    manifest = json.loads((out / "entry" / "manifest.json").read_text())
    assert manifest["training"]["config"]["max_train_steps"] == 5 and manifest["name"] == "depth-controlnet-codi"
    # a second run into the same folder is refused unless it resumes
    assert main(argv) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main([*argv[:-4], "--max-train-steps", "6", "--resume"]) == 0
    assert json.loads((out / "checkpoints" / "step-000006" / "state.json").read_text())["step"] == 6


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_weights_of_an_uninterrupted_one(pixel_backbone_dir, tmp_path):
    common = [*TINY, "--backbone", str(pixel_backbone_dir), "--checkpoint-every", "2", "--keep-checkpoints", "100",
              "--sample-every", "0"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cdd.training.train_adapter", *common, "--output", str(killed),
                             "--max-train-steps", "100000"], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-000002").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert main([*common, "--output", str(killed), "--max-train-steps", "6",
                 "--resume", str(killed / "checkpoints" / "step-000002")]) == 0
    straight = tmp_path / "straight"
    assert main([*common, "--output", str(straight), "--max-train-steps", "6"]) == 0
    for name in ("trainable.safetensors", "ema.safetensors"):
        a = load_file(straight / "checkpoints" / "step-000006" / name)
        b = load_file(killed / "checkpoints" / "step-000006" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_two_process_cpu_run_through_accelerate_launch(pixel_backbone_dir, tmp_path, free_port):
    # accelerate 1.x's `launch --cpu` starts several processes only through MPI (--mpirun_hostfile); its torchrun
    # launcher (--multi_gpu) with ACCELERATE_USE_CPU=1 starts them on any machine and Accelerator(cpu) picks gloo.
    # Its own free rendezvous port, so the run does not depend on what else listens on 29500 (accelerate then falls
    # back to a standalone rendezvous). Should it hang, every process prints its Python stacks (faulthandler, on
    # SIGABRT) before it is killed: one CI run (2026-12-07) hung after training had finished and printed its summary,
    # and 40 runs here (some beside CPU burners or with 29500 taken) did not repeat it.
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "cdd.training.train_adapter",
           *TINY, "--backbone", str(pixel_backbone_dir), "--output", str(out), "--max-train-steps", "3",
           "--checkpoint-every", "2", "--sample-every", "2"]
    proc = subprocess.Popen(cmd, env={**env(), "ACCELERATE_USE_CPU": "1", "PYTHONFAULTHANDLER": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in its own session: signal the launcher's descendants one by one.
        tree = [proc.pid, *_descendants(proc.pid)]
        for pid in reversed(tree):  # the workers first: their stacks, before the launcher stops forwarding
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        time.sleep(5)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the 2-process run did not end in 240 s; its output:\n{stdout[-3000:]}\n{stderr[-12000:]}")
    done = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    state = json.loads((out / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["num_processes"] == 2 and state["step"] == 3
    rng = torch.load(out / "checkpoints" / "step-000003" / "rng.pt")
    assert len(rng) == 2 and not torch.equal(rng[0]["generator"], rng[1]["generator"])  # each process its own draws
    assert (out / "samples" / "step-000002.png").is_file()
    assert zoo_main(["verify", str(out / "entry"), "--backbone", str(pixel_backbone_dir)]) == 0


def _descendants(pid: int) -> list[int]:
    """The processes below `pid` (Linux /proc), parents before children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out
