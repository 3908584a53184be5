"""ILVR's cost against its benefit: super-resolution of held-out photograph patches with ILVR's per-step
correction (decode, low-pass swap, encode) on every step, on the last few only, or on none, always with its
last update on the decoded output (`ilvr_output`, no VAE call). The served entry's steps and the `prev`
sampler, as `prev+ilvr` serves it, at batch 1 on the embedded default backbone and zoo.

    python benchmarks/sr_ilvr_steps.py [--patches 12] [--threads 1]

Per row: which steps are corrected, PSNR against the truth (training/metrics.py, mean over the patches),
the time per request (median), and the VAE calls per request. Patches: `PhotoPatches.bundled("held-out")`
degraded to 16 px with the mild-64px preset, as `cdd-eval --dataset photos` does; seed 0 for every request.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cdd.runtime.diffusion import samplers
from cdd.runtime.serving.engine import Engine
from cdd.runtime.serving.settings import ServeSettings
from cdd.runtime.serving.tasks import SR_SCALE, prepare
from cdd.training.data.degradations import degradation_preset, make_sr_pair
from cdd.training.data.photos import PhotoPatches
from cdd.training.metrics import psnr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patches", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine(ServeSettings(warmup=False)).start()
    try:
        engine.wait_ready(300)
        reg = engine.pool.get("super-resolution")
        steps = reg.manifest.steps
        bb = engine.backbone
        slot, _ = engine.pool.activate(reg.name)
        timesteps = bb.schedule.trailing_timesteps(steps)
        text = bb.encode_text([""])
        patches = PhotoPatches.bundled("held-out", size=64, seed=1234)
        cases = []
        for i in range(args.patches):
            hr = patches[i]["image"][None] * 0.5 + 0.5
            lr = make_sr_pair(hr, torch.Generator().manual_seed(i), degradation_preset("mild-64px")).lr[0].clamp(0, 1)
            work = prepare("super-resolution", lr, adapter=reg.name, resolution=reg.resolution,
                           model_channels=bb.model_channels, scale_factor=bb.vae_scale_factor, steps=steps,
                           sampler="prev", seed=0, prompt="")
            cases.append((work, hr))
        vae_calls = []
        for name in ("encode", "decode"):
            fn = getattr(bb.vae, name)
            setattr(bb.vae, name, lambda *a, _fn=fn, **k: (vae_calls.append(1), _fn(*a, **k))[1])

        def run(work, corrected: set[int]) -> torch.Tensor:
            reference = work.cond * 2 - 1
            low = samplers.LowPass(reference.shape[-2], reference.shape[-1], SR_SCALE)
            reference_low = low(reference)
            bound = slot.denoiser.bind(work.cond.to(bb.dtype), text)

            def model(z_t, t):
                x_hat, eps_hat = bound(z_t, t)
                if timesteps.index(int(t)) in corrected:
                    x_hat = samplers.ilvr_correct(x_hat.float(), reference_low, low, to_pixels=bb.from_model_space,
                                                  to_model=bb.to_model_space)
                return x_hat, eps_hat

            with torch.no_grad():
                z_0 = samplers.sample_prev(model, work.z_T, timesteps, bb.schedule)
                x = samplers.ilvr_output(bb.from_model_space(z_0).float(), reference_low, low)
            return (x * 0.5 + 0.5).clamp(0, 1)

        variants = [(f"every step ({steps}), as served", set(range(steps)))]
        variants += [(f"last {k}", set(range(steps - k, steps))) for k in range(steps - 1, 0, -1)]
        variants += [("first 1", {0}), ("none (output update only)", set())]
        print(f"super-resolution, entry {reg.name}: {steps} steps prev, {args.patches} held-out patches 16 -> 64 px, "
              f"{torch.get_num_threads()} thread(s)")
        print(f"{'ILVR on':30} {'PSNR dB':>8} {'ms/request':>11} {'VAE calls':>10}")
        for label, corrected in variants:
            scores, times = [], []
            for work, hr in cases:
                vae_calls.clear()
                t0 = time.perf_counter()
                out = run(work, corrected)
                times.append(time.perf_counter() - t0)
                scores.append(float(psnr(out, hr)[0]))
            print(f"{label:30} {statistics.mean(scores):8.2f} {statistics.median(times) * 1e3:11.0f} {len(vae_calls):10d}",
                  flush=True)
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
