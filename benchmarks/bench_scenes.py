"""Scenes renderer throughput on one CPU core (the target is >= 200 images/s at 64x64).

    python benchmarks/bench_scenes.py [--size 64] [--supersample 2] [--n 500]

Reports images per second for rendering alone (image + exact depth), for scene sampling
plus caption plus render, and for the three task datasets' samples, which add an edited
render (edit) or the Real-ESRGAN degradation (super-resolution). Two rates per line:
wall clock, and this process's CPU time (what the rate would be on an idle core; the two
agree on a quiet machine, and the CPU rate is the fair one on a busy shared machine).
"""

import argparse
import itertools
import time

import torch

from cdd.training.data import scenes
from cdd.training.data.datasets import build_dataset


def rate(fn, n: int) -> str:
    wall, cpu = time.perf_counter(), time.process_time()
    fn(n)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return f"{n / wall:8.1f} /s wall   {n / cpu:8.1f} /s cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--supersample", type=int, default=2)
    p.add_argument("--n", type=int, default=500)
    args = p.parse_args()
    torch.set_num_threads(1)

    specs = [scenes.sample_scene(s) for s in range(args.n)]
    # Warm the per-resolution caches (rays, floor and sky backdrops) once, as a run does.
    for f in scenes.FLOORS:
        for t in scenes.TIMES:
            scenes._backdrop(args.size * args.supersample, f, t)
    scenes.render(specs[0], args.size, args.supersample)

    def render_only(n):
        for s in specs[:n]:
            scenes.render(s, args.size, args.supersample)

    def sample_and_render(n):
        for s in range(n):
            spec = scenes.sample_scene(s)
            scenes.caption(spec)
            scenes.render(spec, args.size, args.supersample)

    print(f"{args.size}x{args.size}, supersample {args.supersample}, 1 thread, {args.n} scenes")
    print(f"render (image + depth)           {rate(render_only, args.n)}")
    print(f"sample + caption + render        {rate(sample_and_render, args.n)}")
    for task in ("depth", "edit", "super-resolution"):
        ds = build_dataset(task, size=args.size, supersample=args.supersample)
        n = max(args.n // 4, 20)
        print(f"dataset sample, {task:<17}{rate(lambda n: list(itertools.islice(iter(ds), n)), n)}")


if __name__ == "__main__":
    main()
