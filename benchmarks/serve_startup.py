"""Start-up of `cdd-serve` on the embedded default: `cdd-serve --help`, launch to `/readyz`, and the first
requests of each task against the ones after, for one or more code trees side by side, alternating.

    python benchmarks/serve_startup.py                                   # the installed / PYTHONPATH code
    python benchmarks/serve_startup.py --code before=/path/a --code after=/path/b --variant warm= \\
        --variant cold=--no-warmup --repeats 2

`--code LABEL=DIR` runs `cdd-serve` with PYTHONPATH=DIR (a folder holding a `cdd` package); `--variant
LABEL=FLAGS` adds flags to the launch. Every (code, variant) pair runs once per repeat, in turn, so a shared
machine's drifting load falls on all of them alike: compare rows of one run.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid

import numpy as np
from PIL import Image

REQUESTS = [  # task, input side, form fields
    ("super-resolution", 16, {}),
    ("depth", 64, {"prompt": "a red sphere on a plain floor at noon"}),
    ("edit", 64, {"prompt": "make it sunset"}),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(side: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _post(base: str, task: str, image: bytes, form: dict) -> float:
    b = uuid.uuid4().hex
    body = (f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + image
    for k, v in form.items():
        body += f'\r\n--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}'.encode()
    body += f"\r\n--{b}--\r\n".encode()
    req = urllib.request.Request(f"{base}/v1/tasks/{task}", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={b}"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()
    return time.perf_counter() - t0


def _command(code: str | None) -> tuple[list[str], dict]:
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = code
    return [sys.executable, "-m", "cdd.runtime.serving.cli"], env


def time_help(code: str | None) -> float:
    cmd, env = _command(code)
    t0 = time.perf_counter()
    subprocess.run(cmd + ["--help"], env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def start(code: str | None, flags: list[str], threads: int | None, later: int) -> dict:
    """Launch, wait for /readyz, then each task's first request and `later` more of each."""
    cmd, env = _command(code)
    port = _free_port()
    extra = ["--threads", str(threads)] if threads else []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd + ["--port", str(port), "--log-level", "warning", *extra, *flags], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"cdd-serve exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.05)
        out = {"ready_s": time.perf_counter() - t0}
        for task, side, form in REQUESTS:
            out[f"{task} first"] = _post(base, task, _png(side, 0), form)
        for task, side, form in REQUESTS:
            out[f"{task} later"] = statistics.median(_post(base, task, _png(side, i), form) for i in range(1, later + 1))
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", action="append", default=[], help="LABEL=DIR: run with PYTHONPATH=DIR (repeatable)")
    p.add_argument("--variant", action="append", default=[], help="LABEL=FLAGS added to the launch (repeatable)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--later", type=int, default=3, help="requests per task after the first (median)")
    p.add_argument("--threads", type=int, help="--threads for cdd-serve (default: torch's)")
    args = p.parse_args()
    codes = [tuple(c.split("=", 1)) for c in args.code] or [("installed", None)]
    variants = [(v.split("=", 1)[0], shlex.split(v.split("=", 1)[1])) for v in args.variant] or [("default", [])]

    helps = {label: [] for label, _ in codes}
    runs = {(c, v): [] for c, _ in codes for v, _ in variants}
    for r in range(args.repeats):
        for label, code in codes:
            helps[label].append(time_help(code))
        for label, code in codes:
            for name, flags in variants:
                runs[label, name].append(start(code, flags, args.threads, args.later))
                print(f"repeat {r + 1}: {label} {name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in runs[label, name][-1].items()),
                      flush=True)
    print()
    for label, _ in codes:
        print(f"cdd-serve --help, {label}: median {statistics.median(helps[label]):.2f} s of {len(helps[label])}")
    keys = list(next(iter(runs.values()))[0])
    print(f"{'code / variant':24}" + "".join(f"{k:>24}" for k in keys))
    for (label, name), rows in runs.items():
        print(f"{label + ' / ' + name:24}" + "".join(f"{statistics.median(r[k] for r in rows):23.2f}s" for k in keys))


if __name__ == "__main__":
    main()
