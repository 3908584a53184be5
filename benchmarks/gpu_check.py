"""The GPU check: one command, under a wall-clock limit, that runs what only a CUDA device can tell us.

    python benchmarks/gpu_check.py --out DIR            # on a CUDA device: SD-1.5 shapes, bfloat16, 8 minutes at most
    python benchmarks/gpu_check.py --dry-run --out DIR  # the same code path on the CPU, tiny shapes, seconds
    bash benchmarks/gpu_check.sh                        # on the lent device machine (carried wheels, $OUT); see docs/performance.md

Parts, each with a time budget (a part, or the rest of one, is skipped with a note when its time is spent; the
whole run is cut at --limit-s, keeping what it measured):

  tests   the suite's CUDA tests (`pytest -m gpu`): capture, replay, zero recaptures on adapter swaps, graph output
          equal to eager, step-level batching under graphs. They skip without CUDA.
  serve   our engine against diffusers' StableDiffusionControlNetPipeline on the same weights, steps (DDIM), seeds
          and dtype (serve_vs_diffusers.py's functions), for each steps x batch: images/s, batch latency p50 / p99,
          the ratio, and the fraction of the measured matmul peak (FLOPs from torch.utils.flop_counter).
  mixed   step-level against per-adapter batching on mixed traffic (serve_mixed.py's modes and `serve`): three
          adapters, steps 1, 2 or 4 drawn per request; capacity, and an open loop at 80% of per-adapter capacity.
  swap    the time of an adapter swap to a resident adapter (a copy into the live slot) and to one that is not
          resident (read from the zoo on disk), the floor a host-memory tier would have (pinned copy), graph
          captures over N requests switching adapters, device memory before and after.
  train   one CoDi training step against one ControlNet fine-tuning step (the conditional diffusion loss): same
          backbone, adapter, batch and precision (bfloat16 autocast, float32 adapter weights, as the loop trains).

The full run builds Stable Diffusion 1.5's shapes with random weights (UNet 859.5M parameters, ControlNet 361.3M,
VAE 83.7M, a 12-layer 768-wide CLIP text encoder over the project's local word tokenizer): nothing is downloaded.
The dry run uses the tests' tiny latent backbone on the CPU in float32; CUDA-graph figures are then absent and say so.

Everything lands in the output folder (at most 8 files, so it comes back from the device machine whole):
  summary.json     every part's status (ok, partial, skipped, failed, cut), seconds, notes and figures
  summary.md       the same as Markdown tables (also printed last)
  gpu_check.log    the log of the whole run (the engine's logs included)
  pytest.log       the CUDA tests' output;  pytest.xml  their JUnit report
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as cdd-serve sets it
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, also when imported
import serve_mixed  # noqa: E402
import serve_vs_diffusers as svd  # noqa: E402

from cdd.runtime.diffusion.backbone import Backbone  # noqa: E402
from cdd.runtime.diffusion.factory import TINY_VOCABULARY, make_backbone, make_text_encoder, scheduler_config  # noqa: E402
from cdd.runtime.diffusion.text import build_word_tokenizer  # noqa: E402
from cdd.runtime.serving.settings import DTYPES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARTS = ("tests", "serve", "mixed", "swap", "train")
ADAPTERS = ("a", "b", "c")  # three random ControlNet entries of one backbone: the world of parts serve, mixed, swap
log = logging.getLogger("gpu_check")


@dataclass(frozen=True)
class Shapes:
    """What one run measures: the full run on a CUDA device, or the dry run's tiny CPU version of it."""

    backbone: str  # sd15 | tiny
    device: str
    dtype: str  # a ServeSettings dtype name
    batches: tuple[int, ...]  # serve: requests per batch
    steps: tuple[int, ...]  # serve: sampling steps
    repeats: int  # serve: timed batches per (steps, batch) and side
    mixed_requests: int
    mixed_max_batch: int
    switch_requests: int  # swap: requests switching adapters
    swaps: int  # swap: timed swaps to a resident adapter
    train_batch: int
    train_steps: int  # timed optimizer steps per objective (after two untimed)
    matmul: int  # side of the square matmul that measures the peak
    budgets: dict = field(default_factory=dict)  # part -> seconds


FULL = Shapes("sd15", "cuda", "bfloat16", (1, 4, 16), (1, 4), 10, 48, 8, 1000, 50, 4, 5, 8192,
              {"tests": 90, "serve": 130, "mixed": 70, "swap": 90, "train": 50})  # 430 s; serve builds the world
DRY = Shapes("tiny", "cpu", "float32", (1, 2), (1, 2), 2, 6, 2, 6, 4, 2, 2, 256,
             {"tests": 60, "serve": 30, "mixed": 30, "swap": 20, "train": 20})

# Stable Diffusion 1.5's VAE (diffusers' AutoencoderKL defaults are a one-level toy)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)


def sd15_backbone(device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> Backbone:
    """Stable Diffusion 1.5's shapes with random weights, built from configs directly on `device`: the UNet
    (diffusers' defaults are SD-1.5's layout; cross-attention 768, 64x64 latents), the 8x VAE, and a CLIP text
    encoder 768 wide and 12 layers deep over the project's word tokenizer at 77 tokens (24 heads of 32 where
    CLIP-L has 12 of 64: the same FLOPs). The fingerprint names the construction instead of hashing 3.4 GB."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(TINY_VOCABULARY, max_length=77)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = make_text_encoder(len(tokenizer), 77, 768, 12, tokenizer.eos_token_id)
    bb = Backbone(unet=unet, scheduler_config=scheduler_config(), text_encoder=text_encoder, tokenizer=tokenizer,
                  vae=vae, fingerprint=f"random-sd15-seed{seed}")
    return bb.to(device, dtype)


def build_backbone(shapes: Shapes) -> Backbone:
    dtype = DTYPES[shapes.dtype]
    if shapes.backbone == "sd15":
        return sd15_backbone(shapes.device, dtype)
    return make_backbone("latent", resolution=16, seed=0).to(shapes.device, dtype)  # the tests' latent backbone


def sync(device: torch.device) -> None:
    svd.sync(device)


def memory(device: torch.device) -> dict:
    """Device memory in MiB (CUDA), or the process's resident memory (CPU)."""
    mib = 1024 * 1024
    if device.type == "cuda":
        sync(device)
        return {"allocated_mib": torch.cuda.memory_allocated(device) / mib,
                "reserved_mib": torch.cuda.memory_reserved(device) / mib,
                "peak_allocated_mib": torch.cuda.max_memory_allocated(device) / mib}
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return {"process_rss_mib": pages * os.sysconf("SC_PAGE_SIZE") / mib}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> dict:
    """FLOP/s of an n x n x n matmul on random data (median of `repeats` after 3 warm-ups): the ceiling the serve
    figures are a fraction of."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "seconds": t, "tflops": 2 * n**3 / t / 1e12}


def pass_flops(bb: Backbone, controlnet: torch.nn.Module) -> dict:
    """FLOPs of one UNet pass, one ControlNet pass and one VAE decode at batch 1 (torch's flop counter: matmuls,
    convolutions and attention), counted on the modules as they run."""
    from torch.utils.flop_counter import FlopCounterMode

    device, dtype = bb.device, bb.dtype
    h = bb.resolution // bb.vae_scale_factor
    z = torch.randn(1, bb.model_channels, h, h, device=device, dtype=dtype)
    t = torch.tensor([999], device=device)
    text = bb.encode_text([svd.PROMPT])
    cond = torch.rand(1, 3, bb.resolution, bb.resolution, device=device, dtype=dtype)
    out = {}
    for name, fn in (("unet", lambda: bb.unet(z, t, text)),
                     ("controlnet", lambda: controlnet(z, t, text, controlnet_cond=cond)),
                     ("vae_decode", lambda: bb.vae.decode(z))):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        out[name] = counter.get_total_flops()
    return out


class Run:
    """The run's clock, its output folder and the summary, written after every part (and by the watchdog that cuts
    the run at its limit), so a run stopped anywhere leaves what it measured."""

    def __init__(self, out: Path, shapes: Shapes, limit_s: float, dry_run: bool):
        self.out, self.shapes, self.dry_run = out, shapes, dry_run
        self.t0 = time.monotonic()
        self.deadline = self.t0 + limit_s
        self.part_deadline = self.deadline
        self.device = torch.device(shapes.device)
        self.summary = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "dry_run": dry_run,
                        "limit_s": limit_s, "shapes": asdict(shapes), "device": {}, "parts": {}}
        self.current: str | None = None
        self.child: subprocess.Popen | None = None  # the tests part's pytest, killed with a cut run
        self._lock = threading.Lock()
        self._world = None

    def left(self) -> float:
        """Seconds left in the current part (and in the run)."""
        return self.part_deadline - time.monotonic()

    def enough(self, seconds: float, what: str, notes: list[str]) -> bool:
        """Whether `seconds` fit in what is left of the part; if not, a note says what is skipped."""
        if self.left() >= seconds:
            return True
        notes.append(f"skipped {what}: {self.left():.0f} s left of the part's budget, about {seconds:.0f} s needed")
        log.warning(notes[-1])
        return False

    def world(self):
        if self._world is None:
            self._world = World.build(self)
        return self._world

    def write(self) -> None:
        with self._lock:
            self.summary["wall_s"] = round(time.monotonic() - self.t0, 2)
            (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2, default=str) + "\n")
            (self.out / "summary.md").write_text(markdown(self.summary))

    def cut(self) -> None:
        """The watchdog: the run is past its limit. Mark the running part cut, write the summary, exit 124."""
        part, limit = self.current, self.summary["limit_s"]
        if self.child is not None:
            self.child.kill()
        if part is not None:
            self.summary["parts"][part].update(status="cut")
            self.summary["parts"][part]["notes"].append(f"cut at the run's limit of {limit:.0f} s")
        for name in PARTS:
            if name not in self.summary["parts"]:
                self.summary["parts"][name] = {"status": "skipped", "budget_s": self.shapes.budgets[name],
                                               "notes": [f"not reached: the run was cut at its limit of {limit:.0f} s"]}
        log.error(f"the run reached its limit of {limit:.0f} s; cut {f'during part {part}' if part else 'between parts'}")
        self.write()
        for h in logging.getLogger().handlers:
            h.flush()
        os._exit(124)  # a part may be inside a device call that cannot be interrupted: exit the process


@dataclass
class World:
    """The backbone, a zoo of three random ControlNet entries (a, b, c) in a temporary folder, and diffusers'
    pipeline on entry a's weights: shared by parts serve, mixed and swap."""

    bb: Backbone
    zoo: Path
    pipe: object
    folder: Path

    @classmethod
    def build(cls, run: Run) -> World:
        t0 = time.perf_counter()
        bb = build_backbone(run.shapes)
        folder = Path(tempfile.mkdtemp(prefix="cdd-gpu-check-"))
        for i, name in enumerate(ADAPTERS):
            svd.add_entry(bb, folder / "zoo", name, steps=max(run.shapes.steps), seed=i)
        pipe = svd.diffusers_pipeline(bb, folder / "zoo" / "a", folder / "controlnet", run.device, bb.dtype)
        log.info(f"world: {run.shapes.backbone} backbone ({sum(p.numel() for p in bb.unet.parameters()) / 1e6:.1f}M "
                 f"UNet parameters), {bb.resolution}px, {len(ADAPTERS)} ControlNet entries, built in "
                 f"{time.perf_counter() - t0:.1f} s")
        return cls(bb, folder / "zoo", pipe, folder)

    def engine(self, run: Run, max_batch: int, **settings):
        return svd.start_engine(self.bb, self.zoo, run.shapes.device, run.shapes.dtype, max_batch,
                                memory_budget_mb=16384, request_deadline_s=3600, **settings)


def graph_captures(engine) -> int | None:
    graphs = engine.executor.graphs
    return None if graphs is None else graphs.captures


def conditions(bb: Backbone, n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, bb.resolution, bb.resolution, generator=torch.Generator().manual_seed(seed))


# -- part 1: the suite's CUDA tests ------------------------------------------------------------


def part_tests(run: Run) -> dict:
    """`pytest -m gpu` on the test files that hold gpu-marked tests. On CUDA in a child process (a test that brings
    the device down cannot take the check with it); in the dry run in this process (nothing to isolate, and it
    saves a second interpreter's imports)."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                   if "pytest.mark.gpu" in p.read_text())
    xml_path = run.out / "pytest.xml"
    xml_path.unlink(missing_ok=True)
    options = ["-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml_path}"]
    notes = [f"`python -m pytest -q -m gpu {' '.join(files)}`" + (" (in process)" if run.dry_run else "")]
    timeout = max(run.left() - 2, 1)
    with open(run.out / "pytest.log", "w") as f:
        if run.dry_run:
            import contextlib

            import pytest

            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                rc = int(pytest.main([f"--rootdir={REPO}", *options, *[str(REPO / f) for f in files]]))
        else:
            run.child = subprocess.Popen([sys.executable, "-m", "pytest", *options, *files], cwd=REPO, stdout=f,
                                         stderr=subprocess.STDOUT)
            try:
                rc = run.child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                run.child.kill()
                run.child.wait()
                notes.append(f"pytest stopped at the part's budget ({timeout:.0f} s)")
                return {"status": "partial", "notes": notes, "figures": junit(xml_path)}
            finally:
                run.child = None
    figures = junit(xml_path)
    figures["exit_code"] = rc
    if not torch.cuda.is_available():
        notes.append("no CUDA device: the gpu-marked tests skip")
    failed = rc not in (0, 5) or figures.get("failures", 0) or figures.get("errors", 0)
    return {"status": "failed" if failed else "ok", "notes": notes, "figures": figures}


def junit(path: Path) -> dict:
    """Counts and the failing tests of a JUnit report."""
    if not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
    return counts


# -- part 2: our engine against diffusers' pipeline -------------------------------------------


def part_serve(run: Run) -> dict:
    w = run.world()
    s, device, notes = run.shapes, run.device, []
    flops = pass_flops(w.bb, w.pipe.controlnet)
    peak = run.summary["device"]["matmul_peak"]["tflops"] * 1e12
    figures = {"flops_per_pass_tflop": {k: v / 1e12 for k, v in flops.items()}, "rows": []}
    n = max(s.batches)
    conds, seeds = conditions(w.bb, n), list(range(n))
    engine = w.engine(run, max_batch=n, batching="step")
    try:
        figures["graph_captures_at_warmup"] = graph_captures(engine)
        if figures["graph_captures_at_warmup"] is None:
            notes.append("no CUDA: our engine runs eager (no graphs captured)")
        last = 0.0
        for steps in s.steps:
            for batch in s.batches:
                if not run.enough(4 * last, f"steps {steps} batch {batch} and after", notes):
                    break
                t0 = time.perf_counter()
                figures["rows"].append(serve_row(run, w, engine, conds, seeds, steps, batch, flops, peak))
                last = time.perf_counter() - t0
        figures["graph_captures_after"] = graph_captures(engine)
    finally:
        engine.stop()
    done = len(figures["rows"]) == len(s.steps) * len(s.batches)
    return {"status": "ok" if done else "partial", "notes": notes, "figures": figures}


def serve_row(run: Run, w: World, engine, conds, seeds, steps: int, batch: int, flops: dict, peak: float) -> dict:
    device, idx = run.device, list(range(batch))
    ours = lambda: svd.submit_together(engine, "a", conds, seeds, idx, steps)  # noqa: E731
    theirs = lambda: svd.diffusers_images(w.pipe, conds, seeds, idx, steps)  # noqa: E731
    ours(), theirs()  # warm-up (a new bucket's first batch, diffusers' first call at this size)
    lat_ours, lat_diff, worst = [], [], 0
    for _ in range(run.shapes.repeats):  # interleaved: a drifting machine hurts both sides alike
        t, ours_img = svd.timed_on(device, ours)
        lat_ours.append(t)
        t, ref_img = svd.timed_on(device, theirs)
        lat_diff.append(t)
        worst = max(worst, max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(ours_img, ref_img)))
    per_image = steps * (flops["unet"] + flops["controlnet"]) + flops["vae_decode"]
    row = {"steps": steps, "batch": batch, "samples": len(lat_ours), "tflop_per_image": per_image / 1e12,
           "max_abs_diff_uint8": worst}
    for side, lat in (("ours", lat_ours), ("diffusers", lat_diff)):
        ips = batch / float(np.median(lat))
        row.update({f"{side}_images_per_s": ips, f"{side}_p50_ms": float(np.percentile(lat, 50)) * 1e3,
                    f"{side}_p99_ms": float(np.percentile(lat, 99)) * 1e3, f"{side}_peak_fraction": ips * per_image / peak})
    row["ratio_ours_over_diffusers"] = row["ours_images_per_s"] / row["diffusers_images_per_s"]
    log.info(f"serve steps {steps} batch {batch}: ours {row['ours_images_per_s']:.2f} img/s, diffusers "
             f"{row['diffusers_images_per_s']:.2f} img/s, x{row['ratio_ours_over_diffusers']:.2f}")
    return row


# -- part 3: step-level against per-adapter batching on mixed traffic ---------------------------


def mixed_requests(engine, bb: Backbone, n: int, seed: int) -> list:
    """n prepared requests over the three adapters, steps drawn from serve_mixed.STEPS (its request mix)."""
    rng = random.Random(seed)
    conds = conditions(bb, n, seed)
    out = []
    for i in range(n):
        reg = engine.pool.get(rng.choice(ADAPTERS))
        out.append(engine.prepare(reg, conds[i], steps=rng.choice(serve_mixed.STEPS), sampler=reg.manifest.sampler,
                                  seed=1000 + i, prompt=svd.PROMPT))
    return out


def replays(engine) -> float | None:
    if engine.executor.graphs is None:
        return None
    return engine.metrics.registry.get_sample_value("cdd_cuda_graph_replays_total")


def part_mixed(run: Run) -> dict:
    w, s, notes = run.world(), run.shapes, []
    modes = ("request", "step")
    engines = {}
    figures: dict = {"modes": {}}
    try:
        for mode in modes:
            engines[mode] = w.engine(run, s.mixed_max_batch, max_wait_ms=10.0, queue_size=2 * s.mixed_requests,
                                     **serve_mixed.MODES[mode])
        works = mixed_requests(engines["step"], w.bb, s.mixed_requests, seed=0)
        if engines["step"].executor.graphs is None:
            notes.append("no CUDA: both modes run eager")
        else:
            notes.append("rows per UNet call are not counted under CUDA graphs (replays bypass module hooks)")
        for mode, engine in engines.items():  # untimed: per-adapter batching captures a graph per steps and bucket
            if not run.enough(5, f"the warm-up of {mode} and after", notes):
                return {"status": "partial", "notes": notes, "figures": figures}
            serve_mixed.serve(engine, works, [0.0] * len(works))
        for mode, engine in engines.items():
            if not run.enough(5, f"{mode} capacity and after", notes):
                return {"status": "partial", "notes": notes, "figures": figures}
            r0 = replays(engine)
            row = serve_mixed.serve(engine, works, [0.0] * len(works))
            figures["modes"][mode] = {"capacity": trim(row, engine, r0), "graph_captures": graph_captures(engine)}
        rate = 0.8 * figures["modes"]["request"]["capacity"]["throughput_rps"]
        rng = random.Random(1)
        arrivals, at = [], 0.0
        for _ in works:
            arrivals.append(at)
            at += rng.expovariate(rate)
        figures["open_rate_rps"] = rate
        for mode, engine in engines.items():
            if not run.enough(at * 1.5, f"{mode} open loop", notes):
                return {"status": "partial", "notes": notes, "figures": figures}
            r0 = replays(engine)
            figures["modes"][mode]["open"] = trim(serve_mixed.serve(engine, works, arrivals), engine, r0)
            figures["modes"][mode]["graph_captures"] = graph_captures(engine)
        c = {m: figures["modes"][m]["capacity"]["throughput_rps"] for m in modes}
        o = {m: figures["modes"][m]["open"] for m in modes}
        figures["step_over_request"] = {"capacity": c["step"] / c["request"],
                                        "open_p50": o["step"]["p50_s"] / o["request"]["p50_s"],
                                        "open_p99": o["step"]["p99_s"] / o["request"]["p99_s"]}
    finally:
        for engine in engines.values():
            engine.stop()
    return {"status": "ok", "notes": notes, "figures": figures}


def trim(row: dict, engine, replays_before: float | None) -> dict:
    """serve_mixed.serve's figures; under graphs, the replays instead of the (hook-counted) UNet calls."""
    if replays_before is not None:
        row = {k: v for k, v in row.items() if k not in ("unet_calls", "rows_per_unet_call")}
        row["graph_replays"] = replays(engine) - replays_before
    return row


# -- part 4: swaps, recaptures and memory --------------------------------------------------------


def part_swap(run: Run) -> dict:
    w, s, device, notes = run.world(), run.shapes, run.device, []
    figures: dict = {"memory_before": memory(device)}
    engine = w.engine(run, s.mixed_max_batch, batching="step")
    try:
        pool = engine.pool
        engine.pause()  # the worker takes no work while the pool is driven from here (under the engine's lock)
        try:
            with engine._lock:
                for name in ADAPTERS:
                    pool.activate(name)  # resident, and the slot's first fill
                slot, _ = pool.activate("a")
                nbytes = sum(t.numel() * t.element_size() for t in slot.tensors.values())
                resident = [svd.timed_on(device, pool.activate, ADAPTERS[1 + i % 2])[0] for i in range(s.swaps)]
                disk = []
                for _ in range(3):
                    pool.activate("a")
                    pool.evict("c")
                    disk.append(svd.timed_on(device, pool.activate, "c")[0])
                # a host-memory tier's floor (the pool has none: a non-resident entry is read from the zoo on disk)
                host = {k: v.detach().to("cpu") for k, v in slot.tensors.items()}
                if device.type == "cuda":
                    host = {k: v.pin_memory() for k, v in host.items()}
                host_copy = [svd.timed_on(device, slot.copy_in, host)[0] for _ in range(3)]
                slot.current = None  # its content is the copy's now: the next activate copies the entry back in
        finally:
            engine.resume()
        figures["adapter_mib"] = nbytes / 2**20
        figures["swap_resident_ms"] = {"p50": float(np.median(resident)) * 1e3, "max": max(resident) * 1e3,
                                       "samples": len(resident)}
        figures["swap_from_disk_ms"] = {"p50": float(np.median(disk)) * 1e3, "samples": len(disk)}
        figures["host_pinned_copy_ms"] = {"p50": float(np.median(host_copy)) * 1e3, "samples": len(host_copy)}
        notes.append("swap_from_disk: an entry that is not resident is verified (sha256) and read from the zoo on "
                     "disk; host_pinned_copy is the floor of a host-memory tier, which the pool does not have")

        captures0, mem0 = graph_captures(engine), memory(device)
        rng = random.Random(0)
        conds = conditions(w.bb, 8)
        times = []
        for i in range(s.switch_requests):
            if i % 50 == 0 and not run.enough(2 + 2 * float(np.median(times or [0.1])), f"requests {i}..", notes):
                break
            reg = pool.get(ADAPTERS[i % len(ADAPTERS)])
            work = engine.prepare(reg, conds[i % len(conds)], steps=rng.choice(serve_mixed.STEPS), sampler="ddim",
                                  seed=i, prompt=svd.PROMPT)
            times.append(svd.timed_on(device, engine.run, work, 600)[0])
        figures["switching"] = {
            "requests": len(times), "adapters": len(ADAPTERS), "steps_drawn_from": list(serve_mixed.STEPS),
            "graph_captures_before": captures0, "graph_captures_after": graph_captures(engine),
            "recaptures": None if captures0 is None else graph_captures(engine) - captures0,
            "request_ms_p50": float(np.median(times)) * 1e3 if times else None,
            "memory_before": mem0, "memory_after": memory(device)}
        if captures0 is None:
            notes.append("no CUDA: eager, so no graph captures to count")
    finally:
        engine.stop()
    figures["memory_after_stop"] = memory(device)
    partial = figures["switching"]["requests"] < s.switch_requests
    return {"status": "partial" if partial else "ok", "notes": notes, "figures": figures}


# -- part 5: one CoDi step against one ControlNet fine-tuning step -----------------------------


def part_train(run: Run) -> dict:
    from cdd.training.codi import build_objective
    from cdd.training.config import TrainConfig
    from cdd.training.loop import EMA, WithWeights, build_roles

    w, s, device, notes = run.world(), run.shapes, run.device, []
    bb = w.bb  # frozen, already in the run's dtype (the loop casts the frozen backbone to the mixed precision)
    autocast = bb.dtype != torch.float32  # the loop: bf16 autocast over the frozen bf16 backbone
    h = bb.resolution // bb.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.train_batch, bb.model_channels, h, h, generator=g).to(device)  # model space (the loop: float32)
    c = conditions(bb, s.train_batch).to(device)
    text = bb.encode_text([svd.PROMPT] * s.train_batch)
    figures: dict = {"batch": s.train_batch, "resolution": bb.resolution,
                     "precision": f"{str(bb.dtype).removeprefix('torch.')} autocast" if autocast else "float32"}
    notes.append("one optimizer step: the objective, backward, gradient clipping, AdamW, the EMA update; the data "
                 "and the frozen encoders (VAE, text) are outside it")
    for method in ("codi", "finetune"):
        if not run.enough(5, f"the {method} step", notes):
            break
        config = TrainConfig(task="depth", method=method, batch_size=s.train_batch)
        roles = build_roles(config, bb)
        roles.adapter.to(torch.float32)  # trainable weights in float32, as the loop keeps them
        trainable = roles.trainable
        optimizer = torch.optim.AdamW(trainable.values(), lr=config.lr, betas=config.adam_betas,
                                      eps=config.adam_eps, weight_decay=config.weight_decay)
        ema = EMA(trainable, config.ema, warmup=method == "finetune")
        ema_target = WithWeights(roles.student, ema.shadow)
        objective = build_objective(config, bb.schedule)
        gen = torch.Generator().manual_seed(0)

        def step(n: int) -> float:
            with torch.autocast(device.type, dtype=bb.dtype, enabled=autocast):
                terms = objective(roles.student, ema_target, roles.teacher, x, c, text, gen)
            terms.loss.backward()
            torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(trainable, n)
            return float(terms.loss.detach())

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        losses = [step(1), step(2)]  # untimed: lazy optimizer state, kernels
        times = []
        for n in range(s.train_steps):
            t, loss = svd.timed_on(device, step, 3 + n)
            times.append(t)
            losses.append(loss)
        figures[method] = {"step_ms_p50": float(np.median(times)) * 1e3, "samples": len(times),
                           "trainable_m": sum(p.numel() for p in trainable.values()) / 1e6,
                           "losses_finite": bool(np.isfinite(losses).all()), "memory": memory(device)}
        del roles, optimizer, ema, ema_target, trainable
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "codi" in figures and "finetune" in figures:
        figures["codi_over_finetune"] = figures["codi"]["step_ms_p50"] / figures["finetune"]["step_ms_p50"]
    done = "codi" in figures and "finetune" in figures
    failed = any(not figures[m]["losses_finite"] for m in ("codi", "finetune") if m in figures)
    return {"status": "failed" if failed else ("ok" if done else "partial"), "notes": notes, "figures": figures}


RUNNERS = {"tests": part_tests, "serve": part_serve, "mixed": part_mixed, "swap": part_swap, "train": part_train}


# -- the summary as Markdown -------------------------------------------------------------------


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown(summary: dict) -> str:
    d = summary["device"]
    out = [f"# GPU check, {summary['date']}{' (dry run)' if summary['dry_run'] else ''}\n",
           f"`{summary['command']}`: {d.get('name', '?')}, torch {d.get('torch', '?')}, {summary['shapes']['backbone']} "
           f"backbone, {summary['shapes']['dtype']}; matmul peak {fmt(d.get('matmul_peak', {}).get('tflops'))} TFLOP/s; "
           f"wall {fmt(summary.get('wall_s'))} s of {fmt(summary['limit_s'])}\n\n",
           table(["part", "status", "seconds", "budget s", "notes"],
                 [[name, p.get("status"), p.get("seconds"), p.get("budget_s"),
                  "; ".join(p.get("notes", []) + ([p["error"]] if p.get("error") else []))]
                  for name, p in summary["parts"].items()])]
    parts = summary["parts"]
    f = parts.get("tests", {}).get("figures", {})
    if f:
        out.append("\n## tests\n\n" + table(["tests", "failures", "errors", "skipped", "failed"],
                                            [[f.get("tests"), f.get("failures"), f.get("errors"), f.get("skipped"),
                                              ", ".join(f.get("failed", [])) or "–"]]))
    f = parts.get("serve", {}).get("figures", {})
    if f.get("rows"):
        fl = f["flops_per_pass_tflop"]
        out.append(f"\n## serve (TFLOP per pass at batch 1: UNet {fmt(fl['unet'])}, ControlNet {fmt(fl['controlnet'])}, "
                   f"VAE decode {fmt(fl['vae_decode'])})\n\n")
        out.append(table(["steps", "batch", "ours img/s", "p50 ms", "p99 ms", "peak %", "diffusers img/s", "p50 ms",
                          "p99 ms", "peak %", "ours / diffusers", "max diff /255"],
                         [[r["steps"], r["batch"], r["ours_images_per_s"], r["ours_p50_ms"], r["ours_p99_ms"],
                           100 * r["ours_peak_fraction"], r["diffusers_images_per_s"], r["diffusers_p50_ms"],
                           r["diffusers_p99_ms"], 100 * r["diffusers_peak_fraction"], r["ratio_ours_over_diffusers"],
                           r["max_abs_diff_uint8"]] for r in f["rows"]]))
    f = parts.get("mixed", {}).get("figures", {})
    if f.get("modes"):
        rows = []
        for mode, m in f["modes"].items():
            cap, opn = m.get("capacity", {}), m.get("open", {})
            rows.append([mode, cap.get("throughput_rps"), opn.get("throughput_rps"), opn.get("p50_s"), opn.get("p99_s"),
                         m.get("graph_captures")])
        out.append(f"\n## mixed (open loop at {fmt(f.get('open_rate_rps'))} req/s)\n\n"
                   + table(["batching", "capacity req/s", "open req/s", "p50 s", "p99 s", "graph captures"], rows))
    f = parts.get("swap", {}).get("figures", {})
    if "swap_resident_ms" in f:
        sw = f.get("switching", {})
        mem_b, mem_a = sw.get("memory_before", {}), sw.get("memory_after", {})
        key = "allocated_mib" if "allocated_mib" in mem_b else "process_rss_mib"
        out.append("\n## swap\n\n" + table(
            ["adapter MiB", "resident swap ms p50", "max", "from disk ms", "pinned host copy ms", "requests",
             "recaptures", f"{key} before", "after"],
            [[f["adapter_mib"], f["swap_resident_ms"]["p50"], f["swap_resident_ms"]["max"], f["swap_from_disk_ms"]["p50"],
              f["host_pinned_copy_ms"]["p50"], sw.get("requests"), sw.get("recaptures"), mem_b.get(key),
              mem_a.get(key)]]))
    f = parts.get("train", {}).get("figures", {})
    if "codi" in f:
        rows = [[m, f[m]["step_ms_p50"], f[m]["trainable_m"], f[m]["memory"].get("peak_allocated_mib")]
                for m in ("codi", "finetune") if m in f]
        out.append(f"\n## train (batch {f['batch']}, {f['resolution']}px, {f['precision']}; codi / finetune "
                   f"{fmt(f.get('codi_over_finetune'))})\n\n"
                   + table(["objective", "step ms p50", "trainable M", "peak MiB"], rows))
    return "".join(out)


# -- the run -----------------------------------------------------------------------------------


def device_info(run: Run) -> dict:
    device = run.device
    info = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=p.total_memory / 2**30,
                    multiprocessors=p.multi_processor_count)
    else:
        info.update(name=f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
    info["matmul_peak"] = matmul_peak(device, DTYPES[run.shapes.dtype], run.shapes.matmul)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    p.add_argument("--dry-run", action="store_true", help="the same code path on the CPU with tiny shapes")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--limit-s", type=float, default=480.0, help="wall-clock limit of the whole run (seconds)")
    args = p.parse_args(argv)
    if not args.out:
        p.error("--out DIR is needed (or $OUT set)")
    parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    shapes = DRY if args.dry_run else FULL
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: the full check needs one (use --dry-run on a CPU)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the whole run's log (the engine's included) to the file, gpu_check's own lines to the console too
    root = logging.getLogger()
    handlers = [logging.FileHandler(out / "gpu_check.log", mode="w"), logging.StreamHandler()]
    handlers[1].addFilter(lambda record: record.name == log.name or record.levelno >= logging.WARNING)
    for h in handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(h)
    level, threads = root.level, torch.get_num_threads()
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    if args.dry_run:
        torch.set_num_threads(1)  # tiny shapes: one thread, immune to a loaded CPU
    try:
        return check(args, parts, shapes, out)
    finally:
        logging.captureWarnings(False)
        for h in handlers:
            root.removeHandler(h)
            h.close()
        root.setLevel(level)
        torch.set_num_threads(threads)


def check(args, parts: list[str], shapes: Shapes, out: Path) -> int:
    run = Run(out, shapes, args.limit_s, args.dry_run)
    watchdog = threading.Timer(args.limit_s, run.cut)
    watchdog.daemon = True
    watchdog.start()
    run.summary["device"] = device_info(run)
    log.info(f"device: {json.dumps(run.summary['device'])}")
    for name in PARTS:
        budget = shapes.budgets[name]
        record = {"status": "skipped", "budget_s": budget, "notes": []}
        run.summary["parts"][name] = record
        if name not in parts:
            record["notes"].append("not selected (--parts)")
            continue
        left = run.deadline - time.monotonic()
        if left < 5:
            record["notes"].append(f"no time left of the run's {args.limit_s:.0f} s")
            continue
        run.part_deadline = min(time.monotonic() + budget, run.deadline - 3)
        run.current = name
        t0 = time.perf_counter()
        log.info(f"part {name}: budget {budget} s ({left:.0f} s left of the run)")
        try:
            record.update(RUNNERS[name](run))
        except Exception as e:  # one part's failure is a result; the others still run
            record.update(status="failed", error=f"{type(e).__name__}: {e}")
            log.error(f"part {name} failed:\n{traceback.format_exc()}")
        record["seconds"] = round(time.perf_counter() - t0, 2)
        run.current = None
        log.info(f"part {name}: {record['status']} in {record['seconds']} s")
        gc.collect()
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
        run.write()
    watchdog.cancel()
    if run._world is not None:
        shutil.rmtree(run._world.folder, ignore_errors=True)  # the zoo and the exported ControlNet (GBs at SD-1.5)
    run.write()
    print("\n" + (out / "summary.md").read_text(), flush=True)
    return 1 if any(r["status"] in ("failed", "cut") for r in run.summary["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
