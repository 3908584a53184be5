"""benchmarks/gpu_check.py: the dry run (the device command's code path on the CPU, tiny shapes) writes a summary
with every part's status and figures; the time budget skips with a note; the full run's backbone has Stable
Diffusion 1.5's shapes and FLOPs (built on the meta device: no memory, no download)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_writes_every_part(tmp_path, monkeypatch, capsys):
    """In this process (the suite has paid for the imports); the device runs the same `main` as a script."""
    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    assert _module().main(["--dry-run"]) == 0, (out / "gpu_check.log").read_text()[-5000:]
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "pytest.log", "pytest.xml", "summary.json",
                                                    "summary.md"]
    summary = json.loads((out / "summary.json").read_text())
    parts = summary["parts"]
    assert list(parts) == ["tests", "serve", "mixed", "swap", "train"]
    assert {name: p["status"] for name, p in parts.items()} == dict.fromkeys(parts, "ok"), parts
    assert summary["dry_run"] and summary["device"]["matmul_peak"]["tflops"] > 0

    tests = parts["tests"]["figures"]  # the gpu-marked tests ran and skipped (no CUDA here)
    assert tests["tests"] >= 3 and tests["skipped"] == tests["tests"] and tests["failures"] == tests["errors"] == 0

    serve = parts["serve"]["figures"]
    shapes = summary["shapes"]
    assert [(r["steps"], r["batch"]) for r in serve["rows"]] == [(k, b) for k in shapes["steps"] for b in shapes["batches"]]
    flops = serve["flops_per_pass_tflop"]
    for r in serve["rows"]:
        assert r["ours_images_per_s"] > 0 and r["diffusers_images_per_s"] > 0 and r["samples"] == shapes["repeats"]
        assert r["ours_p50_ms"] <= r["ours_p99_ms"] and 0 < r["ours_peak_fraction"]
        assert r["tflop_per_image"] == pytest.approx(r["steps"] * (flops["unet"] + flops["controlnet"]) + flops["vae_decode"])
        assert r["max_abs_diff_uint8"] <= 1  # the same weights, steps and seeds give the same images
    assert serve["graph_captures_at_warmup"] is None  # eager on the CPU, and the notes say so
    assert any("eager" in n for n in parts["serve"]["notes"])

    mixed = parts["mixed"]["figures"]
    for mode in ("request", "step"):
        assert mixed["modes"][mode]["capacity"]["requests"] == shapes["mixed_requests"]
        assert mixed["modes"][mode]["open"]["p50_s"] > 0
    assert mixed["step_over_request"]["capacity"] > 0

    swap = parts["swap"]["figures"]
    assert swap["swap_resident_ms"]["samples"] == shapes["swaps"] and swap["swap_from_disk_ms"]["p50"] > 0
    assert swap["switching"]["requests"] == shapes["switch_requests"] and swap["switching"]["recaptures"] is None

    train = parts["train"]["figures"]
    for method in ("codi", "finetune"):
        assert train[method]["step_ms_p50"] > 0 and train[method]["losses_finite"]
        assert train[method]["samples"] == shapes["train_steps"]
    assert train["codi"]["trainable_m"] == train["finetune"]["trainable_m"]  # the same adapter trains

    md = (out / "summary.md").read_text()
    for name in parts:
        assert f"| {name} | ok |" in md
    assert "## serve" in md and "## train" in md
    assert printed.rstrip().endswith(md.rstrip())  # the tables are printed last


def test_budget_skips_with_a_note_and_parts_are_checked(tmp_path):
    gpu_check = _module()
    run = gpu_check.Run(tmp_path, gpu_check.DRY, limit_s=60, dry_run=True)
    run.part_deadline = time.monotonic() + 2
    notes: list[str] = []
    assert run.enough(1, "the first row", notes) and notes == []
    assert not run.enough(30, "steps 4 batch 16 and after", notes)
    assert notes[0].startswith("skipped steps 4 batch 16 and after:")
    run.summary["parts"]["serve"] = {"status": "partial", "seconds": 1.0, "budget_s": 30, "notes": notes}
    run.write()
    assert json.loads((tmp_path / "summary.json").read_text())["parts"]["serve"]["status"] == "partial"
    assert "| serve | partial |" in (tmp_path / "summary.md").read_text()
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--out", str(tmp_path), "--parts", "serve,nope"])


def test_a_run_cut_at_its_limit_keeps_what_it_measured(tmp_path, monkeypatch):
    gpu_check = _module()
    run = gpu_check.Run(tmp_path, gpu_check.DRY, limit_s=60, dry_run=True)
    run.summary["parts"]["tests"] = {"status": "ok", "budget_s": 60, "notes": [], "figures": {"tests": 3}}
    run.summary["parts"]["serve"] = {"status": "skipped", "budget_s": 30, "notes": []}
    run.current = "serve"

    def exit_(code):
        raise SystemExit(code)

    monkeypatch.setattr(gpu_check.os, "_exit", exit_)
    with pytest.raises(SystemExit) as stop:
        run.cut()
    assert stop.value.code == 124
    parts = json.loads((tmp_path / "summary.json").read_text())["parts"]
    assert parts["tests"] == {"status": "ok", "budget_s": 60, "notes": [], "figures": {"tests": 3}}
    assert parts["serve"]["status"] == "cut" and "cut at the run's limit of 60 s" in parts["serve"]["notes"]
    assert [parts[p]["status"] for p in ("mixed", "swap", "train")] == ["skipped"] * 3
    assert "not reached" in parts["train"]["notes"][0]


@pytest.mark.slow
def test_full_backbone_has_sd15_shapes_and_flops():
    gpu_check = _module()
    from diffusers import ControlNetModel

    bb = gpu_check.sd15_backbone("meta", torch.float32)
    assert bb.resolution == 512 and bb.vae_scale_factor == 8 and bb.tokenizer.model_max_length == 77
    assert sum(p.numel() for p in bb.unet.parameters()) == 859_520_964  # SD-1.5's UNet
    assert sum(p.numel() for p in bb.vae.parameters()) == 83_653_863  # SD-1.5's VAE
    with torch.device("meta"):
        controlnet = ControlNetModel.from_unet(bb.unet)
    assert sum(p.numel() for p in controlnet.parameters()) == 361_279_120  # SD-1.5's ControlNet
    flops = gpu_check.pass_flops(bb, controlnet)
    assert flops["unet"] / 1e12 == pytest.approx(0.803, abs=0.005)
    assert flops["controlnet"] / 1e12 == pytest.approx(0.283, abs=0.005)
    assert flops["vae_decode"] / 1e12 == pytest.approx(2.51, abs=0.01)
