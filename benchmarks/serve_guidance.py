"""What a guidance weight costs a served request: a controlnet-guided entry (any w, one adapter pass per step)
against a plain controlnet entry of the same task, through the engine (prepare, queue, sampler, decode), requests
alternating between the two, one at a time; and the same request with two-pass classifier-free guidance, which
the w input replaces. Prints the median seconds and their ratios.

    OMP_NUM_THREADS=1 python benchmarks/serve_guidance.py --guided runs/guided/depth-gcodi2/entry \
        --plain adapters/embedded/zoo/depth --rounds 20

CPU figures depend on the machine's load: compare rows of one run, never with GPU numbers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cdd.adapters.zoo import default_backbone_dir, install_entry
from cdd.runtime.diffusion.denoiser import ClassifierFreeGuided
from cdd.runtime.diffusion.samplers import initial_noise, sample_prev
from cdd.runtime.serving.engine import Engine
from cdd.runtime.serving.settings import ServeSettings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--guided", type=Path, required=True, help="a controlnet-guided zoo entry")
    p.add_argument("--plain", type=Path, required=True, help="a controlnet entry of the same task")
    p.add_argument("--backbone", type=Path, default=default_backbone_dir())
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--prompt", default="a red sphere and a blue cube on a plain floor at noon")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as zoo:
        for name, entry in (("guided", args.guided), ("plain", args.plain)):  # named apart: both may be `depth`
            install_entry(entry, zoo, name=name)
        engine = Engine(ServeSettings(backbone=args.backbone, zoo=zoo, max_batch=1, max_wait_ms=0, warmup=False)).start()
        try:
            regs = {r.path.name: r for r in engine.pool.entries()}
            guided, plain = regs["guided"], regs["plain"]
            res = guided.resolution
            cond = torch.rand(3, res, res, generator=torch.Generator().manual_seed(0))
            times: dict[str, list[float]] = {"plain": [], "guided w=1": [], "guided w=3": [], "plain, two-pass CFG": []}
            bb = engine.backbone
            text, empty = bb.encode_text([args.prompt]), bb.encode_text([""])
            shape = (1, bb.model_channels, res // bb.vae_scale_factor, res // bb.vae_scale_factor)
            timesteps = bb.schedule.trailing_timesteps(args.steps)

            def cfg_request(seed: int) -> None:  # the same work through the library, with both passes each step
                with engine._lock:
                    slot, _ = engine.pool.activate(plain.name)
                    model = ClassifierFreeGuided(slot.denoiser, empty, 1.0).bind(cond[None].to(bb.dtype), text)
                    z = sample_prev(model, initial_noise([seed], shape[1:]), timesteps, bb.schedule)
                    bb.from_model_space(z)

            for r in range(args.rounds + 1):  # round 0 warms every path up and is not counted
                for label, reg, w in (("plain", plain, None), ("guided w=1", guided, 1.0), ("guided w=3", guided, 3.0)):
                    t0 = time.perf_counter()
                    engine.run(engine.prepare(reg, cond, steps=args.steps, sampler="prev", seed=r, prompt=args.prompt,
                                              guidance=w), timeout=600)
                    if r:
                        times[label].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                cfg_request(r)
                if r:
                    times["plain, two-pass CFG"].append(time.perf_counter() - t0)
        finally:
            engine.stop()
    base = statistics.median(times["plain"])
    print(f"{args.steps} steps, {args.rounds} requests each, alternating; median seconds and ratio to the plain entry")
    for label, ts in times.items():
        m = statistics.median(ts)
        print(f"  {label:22s} {m * 1e3:8.1f} ms   x{m / base:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
