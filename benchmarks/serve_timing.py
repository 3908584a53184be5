"""Wall-clock time of a few requests per task against `cdd-serve` with no settings (the embedded default), end to
end through the app (FastAPI's TestClient), three requests each, one at a time (`--repeats`); a request with form
fields is also given as a ratio of its median to the median of the same task and input size with none (its entry's
defaults), measured in the same run.

    OMP_NUM_THREADS=1 python benchmarks/serve_timing.py

`--keepalive N`: instead, the real server (uvicorn on a loopback port, as `cdd-serve` runs it; `--loop asyncio`
is what runs where uvloop is not installed) and one keep-alive connection alternating a super-resolution
request, a depth request and GET /healthz, N rounds: each request's round trip against its own server time
(Server-Timing total) and against its pure model compute (text encoder + adapter + UNet x steps + VAE on the
same modules at batch 1, no queue, no HTTP), and /healthz's round trip; medians.

    python benchmarks/serve_timing.py --keepalive 10 --loop asyncio

CPU figures depend on the machine's load: compare rows of one run, never with GPU numbers.
"""

from __future__ import annotations

import argparse
import http.client
import io
import statistics
import threading
import time
import uuid

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from cdd.runtime.serving.app import create_app
from cdd.runtime.serving.settings import ServeSettings

REQUESTS = [  # task, (width, height) of the input, form fields
    ("depth", (64, 64), {"prompt": "a red sphere on a plain floor at noon"}),
    ("depth", (64, 64), {"prompt": "a red sphere on a plain floor at noon", "steps": "1"}),
    ("edit", (64, 64), {"prompt": "make it sunset"}),
    ("edit", (64, 64), {"prompt": "make it sunset", "sampler": "prev"}),  # without the default's +keep step (its cost)
    ("super-resolution", (16, 16), {}),
    ("super-resolution", (48, 48), {}),
    # the one-step entry: one step from the input (img2img strength 0.5), against the default's four from noise
    ("super-resolution", (16, 16), {"adapter": "super-resolution-1step"}),
    ("super-resolution", (48, 48), {"adapter": "super-resolution-1step"}),
]


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _multipart(image: bytes, form: dict) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="in.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + image
    for k, v in form.items():
        body += f'\r\n--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}'.encode()
    return body + f"\r\n--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


def pure_compute(engine, task: str, side: int, form: dict) -> float:
    """Seconds of one request's model work at batch 1: its prompt encoded (uncached), then the adapter, the UNet
    at every step and the VAE (decode, and ILVR's or keep's round trips) through the engine's executor."""
    import torch

    from cdd.runtime.serving.executor import Batch

    reg = engine.pool.get(task)
    work = engine.prepare(reg, torch.rand(3, side, side), steps=reg.manifest.steps, sampler=reg.manifest.sampler,
                          seed=0, prompt=form.get("prompt", ""), strength=reg.manifest.strength)
    with engine._lock:  # the worker is idle between requests; the lock keeps it off the modules meanwhile
        t0 = time.perf_counter()
        text = engine.backbone.encode_text([work.prompt]).expand(work.rows, -1, -1)
        slot, reg = engine.pool.activate(reg.name)
        engine.executor.run(slot, reg, Batch(work.z_T, work.cond, text, work.fresh, work.steps, work.sampler,
                                             strength=work.strength))
        return time.perf_counter() - t0


def keepalive(rounds: int, loop: str) -> None:
    from cdd.runtime.serving import server

    settings = ServeSettings()
    app = create_app(settings)
    sock = server.bind("127.0.0.1", 0)
    config = server.config(app, settings)
    config.loop = loop
    srv = server.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while getattr(app.state, "engine", None) is None or not app.state.engine.wait_ready(1):
            time.sleep(0.1)
        engine = app.state.engine
        conn = http.client.HTTPConnection("127.0.0.1", sock.getsockname()[1], timeout=300)
        tasks = [("super-resolution", 16, {}), ("depth", 64, {"prompt": "a red sphere on a plain floor at noon"})]
        bodies = {t: _multipart(png(side, side), form) for t, side, form in tasks}
        figures = {t: {"round trip": [], "server": [], "compute": []} for t, _, _ in tasks}
        healthz = []
        for r in range(rounds + 1):  # the first round warms the connection and every shape up
            for task, side, form in tasks:
                body, content_type = bodies[task]
                t0 = time.perf_counter()
                conn.request("POST", f"/v1/tasks/{task}", body=body, headers={"Content-Type": content_type})
                resp = conn.getresponse()
                resp.read()
                trip = time.perf_counter() - t0
                if resp.status != 200:
                    raise SystemExit(f"{task}: HTTP {resp.status}")
                timing = dict(p.strip().split(";dur=") for p in resp.getheader("Server-Timing").split(","))
                if r:
                    figures[task]["round trip"].append(trip)
                    figures[task]["server"].append(float(timing["total"]) / 1e3)
            t0 = time.perf_counter()
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            if r:
                healthz.append(time.perf_counter() - t0)
        # then pairs of one request and its pure compute, for their ratio on a machine whose load drifts (apart
        # from the rounds above, which stay back to back as a client's traffic is)
        for r in range(rounds):
            for task, side, form in tasks:
                body, content_type = bodies[task]
                t0 = time.perf_counter()
                conn.request("POST", f"/v1/tasks/{task}", body=body, headers={"Content-Type": content_type})
                conn.getresponse().read()
                trip = time.perf_counter() - t0
                figures[task]["compute"].append(trip / pure_compute(engine, task, side, form))
        conn.close()
    finally:
        srv.should_exit = True
        thread.join(60)
    print(f"one keep-alive connection, {rounds} rounds of super-resolution, depth, /healthz; {loop} loop; medians")
    for task, f in figures.items():
        trip, server_s, over_compute = (statistics.median(f[k]) for k in ("round trip", "server", "compute"))
        print(f"{task:17} round trip {trip * 1e3:7.1f} ms, server {server_s * 1e3:7.1f} ms (round trip / server "
              f"{trip / server_s:.2f}); round trip / pure compute, median of {rounds} pairs: {over_compute:.2f}")
    print(f"/healthz round trip {statistics.median(healthz) * 1e3:.1f} ms (max {max(healthz) * 1e3:.1f})")


def profile(repeats: int) -> None:
    """Where one request's time goes, per task at its entry's steps and sampler, one at a time: each
    module's own calls timed (text encoder, adapter, UNet, VAE encode / decode), the rest of the engine (sampler
    maths, ILVR's low-pass, copies), and the HTTP layer's CPU work (image decode, rows and noise, PNG)."""
    import collections

    import torch

    from cdd.runtime.serving.imaging import decode_image, encode_png
    from cdd.runtime.serving.tasks import assemble

    app = create_app(ServeSettings())
    with TestClient(app):
        engine = app.state.engine
        if not engine.wait_ready(300):
            raise SystemExit("the engine did not get ready in 300 s")
        spent: dict[str, float] = collections.defaultdict(float)
        calls: collections.Counter = collections.Counter()

        def timed(name: str, fn):
            def wrapper(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    spent[name] += time.perf_counter() - t0
                    calls[name] += 1
            return wrapper

        bb = engine.backbone
        bb.text_encoder.forward = timed("text encoder", bb.text_encoder.forward)
        bb.unet.forward = timed("UNet", bb.unet.forward)
        bb.vae.encode = timed("VAE encode", bb.vae.encode)
        bb.vae.decode = timed("VAE decode", bb.vae.decode)
        wrapped = set()
        for reg in engine.pool.entries():
            slot, _ = engine.pool.activate(reg.name)
            if id(slot.adapter) not in wrapped:  # the adapter's residuals for the UNet (a ControlNet's forward, ...)
                slot.adapter.unet_kwargs = timed("adapter", slot.adapter.unet_kwargs)
                wrapped.add(id(slot.adapter))
        print(f"one request at a time, {torch.get_num_threads()} thread(s); median of {repeats} (ms, share of "
              "the request, calls)")
        for task, (w, h), form in [r for r in REQUESTS if not {"sampler", "steps"} & set(r[2])]:
            reg = engine.pool.get(task)
            rows = []
            for seed in range(repeats + 1):
                engine._text.clear()  # every prompt encoded, as a new one is
                spent.clear()
                calls.clear()
                data = png(w, h)
                t0 = time.perf_counter()
                image = decode_image(data, 256 * 256)
                work = engine.prepare(reg, image, steps=reg.manifest.steps, sampler=reg.manifest.sampler, seed=seed,
                                      prompt=form.get("prompt", ""))
                t1 = time.perf_counter()
                result = engine.run(work, timeout=300)
                t2 = time.perf_counter()
                encode_png(assemble(work, result.rows))
                t3 = time.perf_counter()
                models = sum(spent.values())
                rows.append({**dict(spent), "engine, other": (t2 - t1) - result.queue_s - models,
                             "HTTP-side CPU (decode, noise, PNG)": (t1 - t0) + (t3 - t2), "total": t3 - t0 - result.queue_s,
                             "calls": dict(calls)})
            rows = rows[1:]
            total = statistics.median(r["total"] for r in rows)
            print(f"{task} {w}x{h} ({work.rows} rows), {reg.manifest.steps} steps {reg.manifest.sampler}: {total * 1e3:.0f} ms")
            names = [k for k in rows[0] if k not in ("total", "calls")]
            for name in sorted(names, key=lambda k: -statistics.median(r.get(k, 0.0) for r in rows)):
                ms = statistics.median(r.get(name, 0.0) for r in rows)
                n = rows[0]["calls"].get(name)
                print(f"    {name:36} {ms * 1e3:7.1f} ms {ms / total:5.0%}" + (f"  {n} calls" if n else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keepalive", type=int, metavar="ROUNDS", help="the keep-alive pattern over the real server")
    p.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"), help="uvicorn's event loop")
    p.add_argument("--profile", type=int, metavar="REPEATS", help="where one request's time goes, per task")
    p.add_argument("--repeats", type=int, default=3, help="requests of each kind (default 3)")
    args = p.parse_args()
    if args.profile:
        return profile(args.profile)
    if args.keepalive:
        return keepalive(args.keepalive, args.loop)
    app = create_app(ServeSettings())
    with TestClient(app) as client:
        if not app.state.engine.wait_ready(300):
            raise SystemExit("the engine did not get ready in 300 s")
        medians = {}
        for task, (w, h), form in REQUESTS:
            seconds = []
            for seed in range(args.repeats):
                t0 = time.perf_counter()
                r = client.post(f"/v1/tasks/{task}", files={"image": ("in.png", png(w, h), "image/png")},
                                data={"seed": str(seed), **form})
                seconds.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise SystemExit(f"{task} {w}x{h}: HTTP {r.status_code}: {r.text}")
            medians[task, w, h, tuple(sorted(form.items()))] = statistics.median(seconds)
            base = medians.get((task, w, h, ()))
            ratio = f"; median / {task} {w}x{h} with no fields: {statistics.median(seconds) / base:.2f}" if form and base else ""
            print(f"{task} {w}x{h}, {r.headers['x-cdd-adapter']}, sampler {r.headers['x-cdd-sampler']} x {r.headers['x-cdd-steps']}"
                  + (f", strength {r.headers['x-cdd-strength']}" if "x-cdd-strength" in r.headers else "")
                  + f", tiles {r.headers.get('x-cdd-tiles', 1)}: " + " ".join(f"{t:.2f}" for t in seconds) + " s"
                  + ratio, flush=True)


if __name__ == "__main__":
    main()
