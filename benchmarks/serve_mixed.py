"""Mixed traffic: step-level batching across tasks vs per-adapter batching, side by side in one run.

Three tasks (super-resolution, depth, edit) of the embedded zoo (or --zoo), each request with 1, 2 or 4
steps drawn at random, arrive as a Poisson process. Both batching modes of the engine serve the same
request sequence (same images, seeds, steps and arrival times):

  request  per-adapter batching: a batch holds requests of one adapter with the same steps and sampler,
           and runs its whole sampling loop before the next batch starts
  step     step-level batching: one backbone call per denoising step for every row in flight, whatever
           its task, steps or sampler; a request joins at the next step and leaves after its last

`--modes request-exact,request,step` adds the per-adapter batching as it shipped before (every batch
zero-padded to max_batch rows, `exact_batching=true`), so that the gain of buckets that fit the device
(no padding on a CPU) and the gain of step-level batching show apart.

Two measurements per mode:
  capacity  all requests queued at once (a closed burst): completed requests per second
  open      arrivals at --load (default 0.8) of the first mode's capacity, bounded to --requests:
            throughput, and latency (arrival to answer) p50 / p99

Measured at the engine (queue, text, sampling, decode), without HTTP. Absolute times mean little on a
shared CPU; compare the two rows of one run. Examples:

  nice -n 10 python benchmarks/serve_mixed.py                       # embedded zoo, CPU, 1 thread
  python benchmarks/serve_mixed.py --device cuda --requests 400

`--clients 1,2,4,8,16` measures closed-loop throughput instead (each client sends its next request when its
last is answered), for every mode and, with `--threads-list 1,2`, every torch thread count, in turn at each
client count; `--tasks super-resolution --entry-steps` restricts it to one task at its entry's steps:

  python benchmarks/serve_mixed.py --clients 1,2,4,8 --threads-list 1,2 --tasks super-resolution --entry-steps
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as cdd-serve sets it (see runtime/serving/cli.py)

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import wait  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cdd.runtime.serving.engine import Engine  # noqa: E402
from cdd.runtime.serving.settings import ServeSettings  # noqa: E402

TASKS = {  # task -> (adapter, input side in pixels, prompt)
    "super-resolution": ("super-resolution", 16, ""),
    "depth": ("depth", 64, "a red sphere on a checkered floor"),
    "edit": ("edit", 64, "make the sphere blue"),
}
STEPS = (1, 2, 4)


def requests(engine: Engine, n: int, seed: int, tasks: list[str] | None = None, steps: tuple[int, ...] = STEPS) -> list:
    """n prepared requests (Work), tasks and steps drawn uniformly (steps None: each entry's own)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        task = rng.choice(sorted(tasks or TASKS))
        adapter, side, prompt = TASKS[task]
        reg = engine.pool.get(adapter)
        image = torch.rand(3, side, side, generator=g)
        out.append(engine.prepare(reg, image, steps=rng.choice(steps or (reg.manifest.steps,)), sampler=reg.manifest.sampler, seed=1000 + i,
                                  prompt=prompt))
    return out


def serve(engine: Engine, works: list, arrivals: list[float]) -> dict:
    """Submit works[i] at arrivals[i] seconds from now; wait for all. Throughput and latency figures, and
    how many backbone (UNet) calls served how many rows."""
    calls = []
    hook = engine.backbone.unet.register_forward_pre_hook(lambda m, args: calls.append(int(args[0].shape[0])))
    try:
        out = _serve(engine, works, arrivals)
    finally:
        hook.remove()
    out["unet_calls"] = len(calls)
    out["rows_per_unet_call"] = sum(calls) / max(len(calls), 1)
    return out


def _serve(engine: Engine, works: list, arrivals: list[float]) -> dict:
    done: list[float | None] = [None] * len(works)
    submitted: list[float] = [0.0] * len(works)
    jobs = []
    t0 = time.perf_counter()
    for i, (work, at) in enumerate(zip(works, arrivals)):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submitted[i] = time.perf_counter()
        job = engine.submit(work)

        def finished(_, i=i):
            done[i] = time.perf_counter()

        job.future.add_done_callback(finished)
        jobs.append(job)
    wait([j.future for j in jobs], timeout=3600)
    for j in jobs:
        j.future.result(timeout=0)  # raise what failed
    latency = np.array([d - s for d, s in zip(done, submitted)])
    span = max(done) - t0
    return {
        "requests": len(works),
        "seconds": span,
        "throughput_rps": len(works) / span,
        "p50_s": float(np.percentile(latency, 50)),
        "p99_s": float(np.percentile(latency, 99)),
        "mean_s": float(latency.mean()),
    }


def closed_loop(engine: Engine, works: list, clients: int) -> dict:
    """`clients` clients, each sending its next request as soon as its last is answered, until every work
    has been served once: throughput and latency."""
    lock = threading.Lock()
    todo = list(range(len(works)))
    latency = []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            t0 = time.perf_counter()
            engine.run(works[i], timeout=3600)
            with lock:
                latency.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    span = time.perf_counter() - t0
    lat = np.array(latency)
    return {"clients": clients, "requests": len(works), "seconds": span, "throughput_rps": len(works) / span,
            "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99))}


def clients_table(args, engines: dict, works: list) -> list:
    """Closed-loop throughput at each --clients count, every (mode, threads) pair measured in turn at each count."""
    threads = [int(t) for t in args.threads_list.split(",")] if args.threads_list else [args.threads]
    rows = []
    print(f"closed loop: {len(works)} requests, tasks {args.tasks}, max_batch {args.max_batch}, {args.device} "
          f"{args.dtype}; requests/s (p50 s)")
    head = [f"{mode} {t}t" for t in threads for mode in engines]
    print(f"{'clients':>8}" + "".join(f"{h:>20}" for h in head))
    for c in [int(x) for x in args.clients.split(",")]:
        row = {}
        for t in threads:
            torch.set_num_threads(t)
            for mode, engine in engines.items():
                row[f"{mode} {t}t"] = closed_loop(engine, works, c)
        rows.append(row)
        print(f"{c:8d}" + "".join(f"{row[h]['throughput_rps']:12.2f} ({row[h]['p50_s']:5.2f})" for h in head), flush=True)
    torch.set_num_threads(args.threads)
    return rows


MODES = {  # name -> settings
    "request-exact": {"batching": "request", "exact_batching": True},  # per-adapter batching as it shipped
    "request": {"batching": "request"},  # per-adapter batching, buckets that fit the device
    "step": {"batching": "step"},
}


def engine_for(args, mode: str) -> Engine:
    s = ServeSettings(backbone=args.backbone, zoo=args.zoo, device=args.device, dtype=args.dtype, **MODES[mode],
                      max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=max(64, 2 * args.requests),
                      request_deadline_s=3600)
    engine = Engine(s).start()
    if not engine.wait_ready(600) or engine.warmup_error:
        raise SystemExit(f"{mode}: warm-up failed: {engine.warmup_error}")
    return engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", help="backbone folder (default: the embedded backbone)")
    p.add_argument("--zoo", help="zoo folder with super-resolution, depth and edit entries (default: the embedded zoo)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-batch", type=int, default=4, help="rows per batch (request) / rows in flight (step)")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--requests", type=int, default=48, help="requests per measurement (bounded)")
    p.add_argument("--load", type=float, default=0.8, help="arrival rate as a fraction of the first mode's capacity")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: immune to a busy shared CPU)")
    p.add_argument("--modes", default="request,step",
                   help="request-exact (per-adapter, every batch padded to max_batch: the shipped default before "
                   "step-level batching), request (per-adapter, buckets that fit the device), step")
    p.add_argument("--rounds", type=int, default=1, help="repeat both modes' measurements, alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--clients", help="instead of the capacity and open-loop rows: closed-loop throughput at these "
                   "client counts, e.g. 1,2,4,8,16")
    p.add_argument("--tasks", default=",".join(sorted(TASKS)), help="tasks to draw from (--clients)")
    p.add_argument("--entry-steps", action="store_true", help="each entry's own steps instead of 1, 2 or 4 (--clients)")
    p.add_argument("--threads-list", help="with --clients: torch thread counts to compare, e.g. 1,2")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    modes = args.modes.split(",")
    if "request" not in modes or "step" not in modes or set(modes) - set(MODES):
        raise SystemExit(f"--modes: a comma-separated list of {', '.join(MODES)}, with request and step")
    engines = {mode: engine_for(args, mode) for mode in modes}
    rounds = []
    if args.clients:
        try:
            works = requests(engines["step"], args.requests, args.seed, args.tasks.split(","),
                             None if args.entry_steps else STEPS)
            for engine in engines.values():  # every shape once before timing
                for w in works[:4]:
                    engine.run(w, timeout=3600)
            rows = clients_table(args, engines, works)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"args": vars(args), "clients": rows}, f, indent=2)
        finally:
            for engine in engines.values():
                engine.stop()
        return
    try:
        works = requests(engines["step"], args.requests, args.seed)
        # the modes alternate, measurement by measurement: a shared CPU's load drifts over minutes
        for r in range(args.rounds):
            rows = {}
            for mode, engine in engines.items():  # capacity: everything queued at once
                rows[mode] = {"capacity": serve(engine, works, [0.0] * len(works))}
            rate = args.load * rows[modes[0]]["capacity"]["throughput_rps"]
            rng = random.Random(args.seed + 1 + r)
            arrivals, at = [], 0.0
            for _ in works:
                arrivals.append(at)
                at += rng.expovariate(rate)
            for mode, engine in engines.items():
                rows[mode]["open"] = serve(engine, works, arrivals)
            rounds.append({"rate_rps": rate, "rows": rows})
            report(args, len(works), r, rate, rows)
            if args.json:  # after every round: a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump({"args": vars(args), "rounds": rounds}, f, indent=2)
    finally:
        for engine in engines.values():
            engine.stop()


def report(args, n: int, r: int, rate: float, rows: dict) -> None:
    print(f"round {r + 1}: {n} requests, tasks {', '.join(sorted(TASKS))}, steps {STEPS}, max_batch {args.max_batch}, "
          f"{args.device} {args.dtype}, {args.threads} thread(s); open loop at {rate:.3f} req/s "
          f"({args.load:.0%} of the capacity of {next(iter(rows))})")
    print(f"{'batching':13} {'capacity req/s':>15} {'rows/UNet call':>15} {'open req/s':>11} {'p50 s':>7} {'p99 s':>7}"
          f" {'UNet calls':>11}")
    for mode, row in rows.items():
        c, o = row["capacity"], row["open"]
        print(f"{mode:13} {c['throughput_rps']:15.3f} {c['rows_per_unet_call']:15.2f} {o['throughput_rps']:11.3f} "
              f"{o['p50_s']:7.2f} {o['p99_s']:7.2f} {o['unet_calls']:11d}")
    s = rows["step"]
    for base in [m for m in rows if m != "step"]:
        q = rows[base]
        print(f"step / {base}: capacity x{s['capacity']['throughput_rps'] / q['capacity']['throughput_rps']:.2f}, "
              f"open-loop throughput x{s['open']['throughput_rps'] / q['open']['throughput_rps']:.2f}, "
              f"p50 x{s['open']['p50_s'] / q['open']['p50_s']:.2f}, p99 x{s['open']['p99_s'] / q['open']['p99_s']:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
