"""float32 against bfloat16 (or any two dtypes) on one device: time per request and how far the served images
differ, every task of the embedded default zoo (or --zoo), same inputs and seeds, requests alternating.

    python benchmarks/serve_dtype.py --sheet /tmp/dtype.png [--threads 1] [--repeats 6]

Inputs are procedural scenes (seed --seed): the super-resolution input degraded to 16 px (mild-64px, what the
default zoo was trained for) and a 48 px one (9 tiles), the depth map with the scene's caption, the scene
with an edit instruction. Each request runs at the engine (queue, text, sampling, decode; no HTTP), one at a
time. Differences are on the served 8-bit images: the largest and mean absolute difference in levels, and
PSNR between the two (training/metrics.py). `--sheet` writes, per task, the input, both outputs and their
difference x10. CPU times depend on the machine's load: compare the columns of one run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as cdd-serve sets it (see runtime/serving/cli.py)

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cdd.runtime.serving.engine import Engine  # noqa: E402
from cdd.runtime.serving.settings import ServeSettings  # noqa: E402
from cdd.runtime.serving.tasks import assemble  # noqa: E402
from cdd.training.data import scenes  # noqa: E402
from cdd.training.data.degradations import degradation_preset, make_sr_pair  # noqa: E402
from cdd.training.metrics import psnr  # noqa: E402


def inputs(seed: int) -> list[tuple[str, str, torch.Tensor, str]]:
    """(label, task, image [3, H, W] in [0, 1], prompt) per request."""
    rng = np.random.default_rng(seed)
    spec = scenes.sample_scene(rng)
    source = scenes.render(spec, 64)
    hr = torch.from_numpy(source.image).permute(2, 0, 1).float()
    lr = make_sr_pair(hr[None], torch.Generator().manual_seed(seed), degradation_preset("mild-64px")).lr[0]
    big = scenes.render(scenes.sample_scene(rng), 192)
    big_lr = make_sr_pair(torch.from_numpy(big.image).permute(2, 0, 1).float()[None], torch.Generator().manual_seed(seed),
                          degradation_preset("mild-64px")).lr[0]
    depth = torch.from_numpy(scenes.depth_to_condition(source.depth)).float()[None].expand(3, -1, -1).contiguous()
    edit = scenes.sample_edit(spec, rng)
    return [
        ("super-resolution 16 px", "super-resolution", lr.clamp(0, 1), ""),
        (f"super-resolution {big_lr.shape[-1]} px", "super-resolution", big_lr.clamp(0, 1), ""),
        ("depth", "depth", depth, scenes.caption(spec)),
        ("edit", "edit", hr, edit.instruction),
    ]


def serve(engine: Engine, task: str, image: torch.Tensor, prompt: str) -> tuple[np.ndarray, float]:
    reg = engine.pool.get(task)
    work = engine.prepare(reg, image, steps=reg.manifest.steps, sampler=reg.manifest.sampler, seed=0, prompt=prompt)
    t0 = time.perf_counter()
    rows = engine.run(work, timeout=600).rows
    return assemble(work, rows), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone")
    p.add_argument("--zoo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", default="float32,bfloat16", help="two dtypes, the reference first")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=6, help="timed requests per task and dtype, alternating")
    p.add_argument("--seed", type=int, default=7, help="scene seed")
    p.add_argument("--sheet", type=Path, help="write the side-by-side images here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ref, other = args.dtypes.split(",")
    engines = {d: Engine(ServeSettings(backbone=args.backbone, zoo=args.zoo, device=args.device, dtype=d,
                                       warmup=False)).start() for d in (ref, other)}
    rows = []
    try:
        for e in engines.values():
            e.wait_ready(600)
        print(f"{args.device}, {torch.get_num_threads()} thread(s); {other} against {ref}, {args.repeats} requests each, "
              "alternating; median seconds")
        print(f"{'request':26} {ref:>9} {other:>9} {'ratio':>6} {'max |diff|':>10} {'mean |diff|':>11} {'PSNR dB':>8}")
        for label, task, image, prompt in inputs(args.seed):
            out = {d: serve(e, task, image, prompt)[0] for d, e in engines.items()}  # also warms each shape up
            times = {d: [] for d in engines}
            for r in range(args.repeats):
                for d in (engines if r % 2 == 0 else reversed(list(engines))):
                    times[d].append(serve(engines[d], task, image, prompt)[1])
            a, b = (torch.from_numpy(out[d]).permute(2, 0, 1)[None].float() / 255 for d in (ref, other))
            diff = np.abs(out[ref].astype(int) - out[other].astype(int))
            t_ref, t_other = statistics.median(times[ref]), statistics.median(times[other])
            print(f"{label:26} {t_ref:9.3f} {t_other:9.3f} {t_other / t_ref:6.2f} {diff.max():10d} {diff.mean():11.2f} "
                  f"{float(psnr(b, a)[0]):8.1f}", flush=True)
            shown = image if task != "super-resolution" else torch.nn.functional.interpolate(
                image[None], size=out[ref].shape[:2], mode="nearest")[0]
            rows.append([(shown.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), out[ref], out[other],
                         np.clip(diff * 10, 0, 255).astype(np.uint8)])
    finally:
        for e in engines.values():
            e.stop()
    if args.sheet:  # one row per request, tiles left-aligned in cells as wide as the widest output
        side = max(t.shape[1] for r in rows for t in r)
        heights = [max(t.shape[0] for t in r) for r in rows]
        canvas = np.full((sum(heights), side * 4, 3), 255, np.uint8)
        y = 0
        for r, h in zip(rows, heights):
            for j, tile in enumerate(r):
                canvas[y : y + tile.shape[0], j * side : j * side + tile.shape[1]] = tile
            y += h
        args.sheet.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(canvas).resize((canvas.shape[1] * 2, canvas.shape[0] * 2), Image.NEAREST).save(args.sheet)
        print(f"wrote {args.sheet}: per row input, {ref}, {other}, |difference| x10")


if __name__ == "__main__":
    main()
