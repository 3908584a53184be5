"""Probe a running `cdd-serve` as an attacker and a careless operator would; print the figures as JSON.

  fuzz       N hostile requests (garbage and truncated images, pixel bombs, bad fields, unknown tasks and
             routes, lying Content-Length, huge headers, admin without a key, ...), plus a few valid
             ones: the count of answers by status (the point: no 5xx, no dropped connection)
  amplify    requests that are few pixels but much work (a 1x65536 PNG and a 4098x2 GIF to
             super-resolution): how long until they are refused (the point: 413 in well under 100 ms)
  overload   small super-resolution requests arriving open-loop at K x the measured capacity for S
             seconds, each with a deadline: 200 / 429 / 504 counts, p50/p99 of the accepted, and
             whether every answer came within its deadline (plus one batch)
  slowloris  C connections that send their headers a byte at a time, while /healthz is timed
  soak       N requests cycling every task and adapter; the server's resident memory (--pid) sampled
  admission  requests whose cost is in the header or the form (a lone width=65536, a 64-frame GIF of a
             4096x4096 screen, a GIF of 300k frames, a 1x100000 strip, a 0x0 PNG): status, time and the
             server's peak resident memory growth per request (--pid; the point: refused from the header)
  slowread   C clients that ask for the 1.5 MB Swagger bundle and never read: how soon the server drops
             them (write_timeout_s) and its memory meanwhile (--pid)
  port       a second cdd-serve on the --url server's port: how soon it exits, its status and message
  zoo        its own cdd-serve on a zoo of the embedded entries plus broken copies (a flipped byte,
             weights that do not load, NaN weights): what /readyz and GET /v1/tasks say, each task's status
  shutdown   its own cdd-serve (--drain-s 5): SIGTERM under a backlog of 40 concurrent requests; the
             count of answers by status (0: a connection closed without one) and the exit status
  register   its own cdd-serve with an API key: refused registrations of an entry of a new architecture,
             the server's resident memory before and after

Loopback only, bounded: every phase has a request count or a duration. The first six phases probe the
server at --url; the last three start their own (on the embedded backbone, --threads 1). Start one first, e.g.

  nice -n 10 python -m cdd.runtime.serving.cli --port 18017 --threads 1 &
  nice -n 10 python benchmarks/hardening.py --url http://127.0.0.1:18017 --pid $! all
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import socket
import statistics
import struct
import sys
import time
import zlib
from collections import Counter
from urllib.parse import quote, urlparse

import httpx
import numpy as np
from PIL import Image


PHASES = ("fuzz", "amplify", "overload", "slowloris", "soak", "admission", "slowread", "port", "zoo", "shutdown",
          "register")


def image_bytes(w: int, h: int, fmt: str = "PNG", seed: int = 0, **kw) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h and whose data is junk (a pixel bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
            + struct.pack(">I", 64) + b"IDAT" + bytes(64))


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def task_names(url: str) -> dict:
    return {t["task"]: t for t in httpx.get(f"{url}/v1/tasks", timeout=30).json()["tasks"]}


# -- fuzz ------------------------------------------------------------------------------------


def fuzz_cases(rng: random.Random, tasks: list[str]):
    """Yield (label, request kwargs) forever."""
    small = image_bytes(16, 16, seed=1)
    formats = {f: image_bytes(24, 24, f, seed=2) for f in ("PNG", "JPEG", "GIF", "TIFF", "BMP", "WEBP")}
    weird = ["..", "%2e%2e", "a" * 3000, "depth\x00", "dépth", "<script>", "super-resolution/../edit", " ", "DEPTH"]
    bad_fields = [("steps", "0"), ("steps", "5"), ("steps", "abc"), ("steps", "1e9"), ("seed", "-1"),
                  ("seed", str(2**64)), ("seed", "x"), ("sampler", "euler"), ("sampler", ""), ("adapter", "nope"),
                  ("adapter", "../depth"), ("prompt", "p" * 5000)]
    while True:
        kind = "valid" if rng.random() < 0.02 else rng.choice(
            ["garbage", "truncated", "bomb", "field", "task", "route", "admin", "length", "multipart", "deadline", "header"])
        task = rng.choice(tasks)
        if kind == "garbage":
            body = rng.randbytes(rng.randint(0, 3000))
            yield kind, dict(method="POST", url=f"/v1/tasks/{task}", files={"image": ("x", body)})
        elif kind == "truncated":
            fmt, data = rng.choice(list(formats.items()))
            cut = data[: rng.randint(1, max(1, len(data) - 1))]
            yield kind, dict(method="POST", url=f"/v1/tasks/{task}", files={"image": (f"x.{fmt.lower()}", cut)})
        elif kind == "bomb":
            w, h = rng.choice([(100_000, 100_000), (65536, 1), (1, 65536), (4098, 2), (300, 300), (2**31 - 1, 1)])
            yield kind, dict(method="POST", url=f"/v1/tasks/{task}", files={"image": ("b.png", png_header(w, h))})
        elif kind == "field":
            k, v = rng.choice(bad_fields)
            yield kind, dict(method="POST", url=f"/v1/tasks/{task}", files={"image": ("s.png", small)}, data={k: v})
        elif kind == "task":
            yield kind, dict(method="POST", url=f"/v1/tasks/{quote(rng.choice(weird), safe='')}",
                             files={"image": ("s.png", small)})
        elif kind == "route":
            method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "POST"])
            path = rng.choice(["/v1", "/v1/tasks/", "/v1/adapters", "/admin", "/../../etc/passwd", "/metrics/x",
                               "/v1/tasks/depth/x", "/%00", "/docs/..", "/healthz/"])
            yield kind, dict(method=method, url=path)
        elif kind == "admin":
            headers = rng.choice([{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": ""}, {"Authorization": "Basic x"}])
            body = rng.choice([b"{}", b"[", b'{"path": "/etc"}', b'{"path": ' + json.dumps("a" * 20000).encode() + b"}"])
            yield kind, dict(method=rng.choice(["POST", "DELETE"]), url=rng.choice(["/v1/adapters", "/v1/adapters/depth"]),
                             content=body, headers={"Content-Type": "application/json", **headers})
        elif kind == "length":  # a Content-Length that lies (sent raw: HTTP clients refuse to)
            head = (f"POST /v1/tasks/{task} HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                    f"Content-Length: {rng.choice([10**9, 10**6, 200])}\r\nConnection: close\r\n\r\n").encode()
            yield kind, dict(raw=head + b"x" * 100)
        elif kind == "multipart":
            body = rng.choice([b"--b\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc",
                               b"not multipart at all", b"--b--\r\n", rng.randbytes(500)])
            ctype = rng.choice(["multipart/form-data; boundary=b", "multipart/form-data", "application/json", "text/plain"])
            yield kind, dict(method="POST", url=f"/v1/tasks/{task}", content=body, headers={"Content-Type": ctype})
        elif kind == "deadline":
            v = rng.choice(["-1", "0", "nan", "abc", "1e400", "inf"])
            yield kind, dict(method="POST", url=f"/v1/tasks/{task}", files={"image": ("s.png", small)},
                             headers={"X-CDD-Deadline-Ms": v})
        elif kind == "header":
            yield kind, dict(method="GET", url="/healthz", headers={"X-Big": "a" * rng.choice([1000, 40_000, 70_000])})
        else:  # a few valid requests: they run the model
            data = {"prompt": "make it blue"} if task == "edit" else {}
            yield kind, dict(method="POST", url=f"/v1/tasks/{task}", files={"image": ("s.png", small)},
                             data={**data, "steps": "1"})


async def raw_request(url: str, data: bytes, timeout: float = 30.0) -> int:
    """Send bytes as they are; the status of the answer (0: the connection closed without one)."""
    u = urlparse(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        writer.write(data)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        return int(line.split()[1]) if line.startswith(b"HTTP/") else 0
    finally:
        writer.close()


async def fuzz(url: str, n: int, concurrency: int, seed: int) -> dict:
    rng = random.Random(seed)
    tasks = sorted(task_names(url))
    cases = fuzz_cases(rng, tasks)
    statuses, by_kind, errors = Counter(), {}, Counter()
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        queue = [next(cases) for _ in range(n)]

        async def worker():
            while queue:
                kind, kw = queue.pop()
                try:
                    status = await raw_request(url, kw["raw"]) if "raw" in kw else (await client.request(**kw)).status_code
                    statuses[status] += 1
                    by_kind.setdefault(kind, Counter())[status] += 1
                except (httpx.HTTPError, OSError, asyncio.TimeoutError) as e:  # a dropped connection is a finding
                    errors[f"{kind}: {type(e).__name__}"] += 1

        await asyncio.gather(*[worker() for _ in range(concurrency)])
    five = sum(v for k, v in statuses.items() if k >= 500)
    return {"requests": n, "seconds": round(time.monotonic() - t0, 1), "by_status": dict(sorted(statuses.items())),
            "5xx": five, "connection_errors": dict(errors),
            "by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())}}


# -- amplification ---------------------------------------------------------------------------


def amplify(url: str) -> dict:
    probes = {"png_1x65536": ("a.png", image_bytes(65536, 1)), "png_65536x1": ("a.png", image_bytes(1, 65536)),
              "gif_4098x2": ("a.gif", image_bytes(4098, 2, "GIF")), "png_256x256": ("a.png", image_bytes(256, 256))}
    out = {}
    with httpx.Client(base_url=url, timeout=120) as client:
        client.get("/healthz")
        for name, (fname, data) in probes.items():
            times, status = [], None
            for _ in range(5):
                t0 = time.perf_counter()
                r = client.post("/v1/tasks/super-resolution", files={"image": (fname, data)})
                times.append((time.perf_counter() - t0) * 1e3)
                status = r.status_code
            out[name] = {"status": status, "code": r.json().get("error", {}).get("code") if status != 200 else None,
                         "ms_median": round(statistics.median(times), 1), "ms_max": round(max(times), 1),
                         "bytes": len(data)}
    return out


# -- overload --------------------------------------------------------------------------------


async def overload(url: str, factor: float, seconds: float, deadline_ms: float, calibrate: int) -> dict:
    image = image_bytes(16, 16, seed=3)  # one 64-px tile at the embedded default
    async with httpx.AsyncClient(base_url=url, timeout=deadline_ms / 1000 + 120,
                                 limits=httpx.Limits(max_connections=1000)) as client:

        async def one(i: int, deadline: bool = True) -> tuple[int, float, str, float]:
            t0 = time.monotonic()
            r = await client.post("/v1/tasks/super-resolution", files={"image": ("a.png", image)}, data={"seed": str(i)},
                                  headers={"X-CDD-Deadline-Ms": str(deadline_ms)} if deadline else {})
            timing = dict(part.strip().split(";dur=") for part in r.headers.get("server-timing", "").split(",") if ";dur=" in part)
            return r.status_code, time.monotonic() - t0, r.headers.get("retry-after", ""), float(timing.get("queue", 0)) / 1e3

        # capacity: closed loops keeping every batch full (no deadline: none is refused), after a warm-up
        await one(0, deadline=False)
        t0 = time.monotonic()
        launched, served = 0, 0

        async def loop():
            nonlocal launched, served
            while launched < calibrate:
                launched += 1
                status = (await one(launched, deadline=False))[0]
                served += status == 200

        await asyncio.gather(*[loop() for _ in range(8)])
        capacity = served / (time.monotonic() - t0)
        rate = factor * capacity
        n = int(rate * seconds)
        rng = random.Random(0)
        tasks, start = [], time.monotonic()
        for i in range(n):  # Poisson arrivals at `rate`
            start += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, start - time.monotonic()))
            tasks.append(asyncio.create_task(one(10_000 + i)))
        results = await asyncio.gather(*tasks, return_exceptions=True)
    statuses = Counter(r[0] if isinstance(r, tuple) else type(r).__name__ for r in results)
    ok = [r[1] for r in results if isinstance(r, tuple) and r[0] == 200]
    refused = [r[1] for r in results if isinstance(r, tuple) and r[0] == 429]
    retry = [int(r[2]) for r in results if isinstance(r, tuple) and r[0] == 429 and r[2].isdigit()]
    budget = deadline_ms / 1000
    return {"capacity_rps": round(capacity, 2), "offered_rps": round(rate, 2), "seconds": seconds, "requests": n,
            "deadline_ms": deadline_ms, "by_status": {str(k): v for k, v in sorted(statuses.items(), key=str)},
            "accepted_p50_s": percentile(ok, 50), "accepted_p99_s": percentile(ok, 99),
            "accepted_max_s": max(ok) if ok else None,
            "accepted_over_deadline": sum(t > budget for t in ok),
            "accepted_started_after_deadline": sum(r[3] > budget for r in results if isinstance(r, tuple) and r[0] == 200),
            "refused_p99_ms": round(percentile(refused, 99) * 1e3, 1) if refused else None,
            "retry_after_s": {"min": min(retry), "max": max(retry)} if retry else None}


# -- slowloris -------------------------------------------------------------------------------


def slowloris(url: str, connections: int, seconds: float) -> dict:
    u = urlparse(url)
    socks, closed_after = [], []
    t0 = time.monotonic()
    for _ in range(connections):
        s = socket.create_connection((u.hostname, u.port), timeout=5)
        s.setblocking(False)
        socks.append([s, t0])
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
    sent = 0
    lat = []
    with httpx.Client(base_url=url, timeout=10) as client:
        while time.monotonic() - t0 < seconds:
            for entry in socks:
                s = entry[0]
                if s is None:
                    continue
                try:
                    if s.recv(1) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    pass
                except OSError:
                    closed_after.append(time.monotonic() - t0)
                    s.close()
                    entry[0] = None
                    continue
                try:
                    s.send(head[sent % len(head) : sent % len(head) + 1])
                except OSError:
                    closed_after.append(time.monotonic() - t0)
                    s.close()
                    entry[0] = None
            sent += 1
            t1 = time.perf_counter()
            client.get("/healthz", headers={"Connection": "close"})
            lat.append((time.perf_counter() - t1) * 1e3)
            time.sleep(0.2)
    still_open = sum(1 for e in socks if e[0] is not None)
    for e in socks:
        if e[0] is not None:
            e[0].close()
    return {"connections": connections, "seconds": seconds, "healthz_probes": len(lat),
            "healthz_ms_p50": round(percentile(lat, 50), 2), "healthz_ms_p99": round(percentile(lat, 99), 2),
            "healthz_ms_max": round(max(lat), 2), "closed_by_server": len(closed_after),
            "closed_after_s": {"min": round(min(closed_after), 1), "max": round(max(closed_after), 1)} if closed_after else None,
            "still_open_at_end": still_open}


# -- memory soak -----------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def soak(url: str, n: int, pid: int | None, concurrency: int = 4) -> dict:
    tasks = task_names(url)
    plan = [(t, a["name"]) for t, info in sorted(tasks.items()) for a in info["adapters"]]
    images = {"super-resolution": image_bytes(16, 16, seed=4), "depth": image_bytes(64, 64, seed=5),
              "edit": image_bytes(64, 64, seed=6)}
    samples, statuses = [], Counter()
    from concurrent.futures import ThreadPoolExecutor

    def one(client: httpx.Client, i: int) -> int:
        task, adapter = plan[i % len(plan)]
        data = {"adapter": adapter, "seed": str(i), "steps": "1"}
        if task == "edit":
            data["prompt"] = "make it red"
        files = {"image": ("a.png", images.get(task, images["depth"]))}
        return client.post(f"/v1/tasks/{task}", files=files, data=data).status_code

    with httpx.Client(base_url=url, timeout=300) as client, ThreadPoolExecutor(concurrency) as pool:
        step = max(1, n // 20)
        for start in range(0, n, step):  # a memory sample after every twentieth of the requests
            if pid:
                samples.append((start, rss_mb(pid)))
            statuses.update(pool.map(lambda i: one(client, i), range(start, min(n, start + step))))
    if pid:
        samples.append((n, rss_mb(pid)))
    mem = [m for _, m in samples if m is not None]
    half = mem[len(mem) // 2 :]
    return {"requests": n, "adapters_cycled": len(plan), "by_status": dict(statuses),
            "rss_mb": {"first": round(mem[0], 1), "last": round(mem[-1], 1), "max": round(max(mem), 1),
                       "second_half_growth": round(half[-1] - half[0], 1)} if mem else None,
            "samples": [(i, round(m, 1)) for i, m in samples if m is not None]}


# -- admission: what a request costs, from its header and form -------------------------------------


def gif_screen(frames: int, size: int) -> bytes:
    """A GIF whose logical screen is size x size, with `frames` frames of one pixel each: a few bytes per
    frame, but each frame decodes onto the whole screen."""
    head = b"GIF89a" + struct.pack("<HHBBB", size, size, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"  # LZW: clear, 0, end
    return head + frame * frames + b";"


def peak_reset(pid: int | None) -> float | None:
    """Reset the server's peak resident memory (VmHWM) and return its current RSS in MB."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return rss_mb(pid)


def peak_mb(pid: int | None) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        return None
    return None


def admission(url: str, pid: int | None) -> dict:
    small = image_bytes(64, 64)
    zero = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)
            + struct.pack(">I", zlib.crc32(b"IHDR" + struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0))))
    probes = {
        "width_65536": (small, {"width": "65536"}), "width_16384": (small, {"width": "16384"}),
        "height_4096_alone": (small, {"height": "4096"}), "gif_64_frames_4096x4096": (gif_screen(64, 4096), {}),
        "gif_300k_frames": (gif_screen(300_000, 16), {}), "png_1x100000": (image_bytes(100_000, 1), {}),
        "png_0x0": (zero, {}), "png_64x64_valid": (small, {"steps": "1"}),
    }
    out = {}
    with httpx.Client(base_url=url, timeout=300) as client:
        for name, (data, form) in probes.items():
            before = peak_reset(pid)
            t0 = time.perf_counter()
            r = client.post("/v1/tasks/depth", files={"image": ("a", data)}, data=form)
            ms = (time.perf_counter() - t0) * 1e3
            peak = peak_mb(pid)
            out[name] = {"status": r.status_code, "code": r.json().get("error", {}).get("code") if r.status_code != 200
                         else None, "ms": round(ms, 1), "bytes": len(data),
                         "peak_rss_growth_mb": round(peak - before, 1) if peak is not None and before else None}
    out["5xx"] = sum(v["status"] >= 500 for v in out.values())
    return out


# -- slow readers ------------------------------------------------------------------------------


def slowread(url: str, clients: int, seconds: float, pid: int | None) -> dict:
    u = urlparse(url)
    socks = []
    rss0 = rss_mb(pid) if pid else None
    for _ in range(clients):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((u.hostname, u.port))
        s.sendall(b"GET /docs/assets/swagger-ui-bundle.js HTTP/1.1\r\nHost: x\r\n\r\n")
        socks.append(s)
    time.sleep(1.0)
    rss_held = rss_mb(pid) if pid else None
    time.sleep(max(0.0, seconds - 1.0))
    dropped, received = 0, []
    for s in socks:  # now read: a dropped client ends before the whole answer (reset or EOF)
        s.settimeout(5)
        n = 0
        try:
            while chunk := s.recv(65536):
                n += len(chunk)
        except OSError:
            pass
        received.append(n)
        dropped += n < 1_526_593
        s.close()
    return {"clients": clients, "held_s": seconds, "dropped_before_the_whole_answer": dropped,
            "received_kb_max": round(max(received) / 1024, 1),
            "rss_mb": {"before": rss0, "while_held": rss_held, "after": rss_mb(pid) if pid else None}}


# -- servers of its own ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], env: dict | None = None, wait: bool = True):
    """A cdd-serve process on a free port (its url, its process); waits until /healthz answers."""
    import os
    import subprocess

    import tempfile

    port = free_port()
    log = tempfile.TemporaryFile("w+")  # a pipe nobody reads would block the server once its logs fill it
    proc = subprocess.Popen([sys.executable, "-m", "cdd.runtime.serving.cli", "--port", str(port), "--threads", "1",
                             *args], env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log = log
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while wait:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"cdd-serve exited with {proc.returncode}: {log.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code in (200, 503) and httpx.get(
                    f"{url}/readyz", timeout=5).json().get("status") != "warming up":
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("cdd-serve did not start in 600 s")
        time.sleep(0.5)
    return url, proc


def stop_server(proc) -> int:
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except Exception:  # noqa: BLE001
        proc.kill()
        proc.wait()
    proc.log.close()
    return proc.returncode


def port_probe(url: str) -> dict:
    import subprocess

    port = urlparse(url).port
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cdd.runtime.serving.cli", "--port", str(port)],
                          capture_output=True, text=True, timeout=600)
    lines = done.stderr.strip().splitlines()
    return {"exit_status": done.returncode, "seconds": round(time.monotonic() - t0, 2), "stderr_lines": len(lines),
            "message": lines[-1] if lines else None}


def zoo_with_broken_entries(folder) -> None:
    """The embedded zoo's entries, and broken copies of its depth entry."""
    import shutil
    from pathlib import Path

    import torch
    from safetensors.torch import load_file, save_file

    from cdd.adapters.zoo import ADAPTER_FILE, MANIFEST, default_zoo_dir, sha256_file

    folder = Path(folder)
    for e in default_zoo_dir().iterdir():
        if (e / MANIFEST).is_file():
            shutil.copytree(e, folder / e.name)

    def copy(name, task):
        shutil.copytree(folder / "depth", folder / name)
        m = json.loads((folder / name / MANIFEST).read_text())
        m.update(name=name, task=task)
        return folder / name, m

    def rehash(entry, m):
        m["files"][ADAPTER_FILE] = sha256_file(entry / ADAPTER_FILE)
        (entry / MANIFEST).write_text(json.dumps(m))

    entry, m = copy("flipped-byte", "flipped")
    (entry / MANIFEST).write_text(json.dumps(m))
    data = bytearray((entry / ADAPTER_FILE).read_bytes())
    data[len(data) // 2] ^= 1
    (entry / ADAPTER_FILE).write_bytes(bytes(data))
    entry, m = copy("unloadable", "unloadable")
    (entry / ADAPTER_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a safetensors header")
    rehash(entry, m)
    entry, m = copy("nan-weights", "nan")
    state = load_file(entry / ADAPTER_FILE)
    first = sorted(state)[0]
    state[first] = state[first].clone().view(-1).index_fill_(0, torch.tensor([0]), float("nan")).view(state[first].shape)
    save_file(state, entry / ADAPTER_FILE)
    rehash(entry, m)


def zoo(tmp: str) -> dict:
    from pathlib import Path

    zoo_dir = Path(tmp) / "zoo"
    zoo_with_broken_entries(zoo_dir)
    t0 = time.monotonic()
    url, proc = start_server(["--zoo", str(zoo_dir)])
    try:
        started = round(time.monotonic() - t0, 1)
        ready = httpx.get(f"{url}/readyz", timeout=30)
        listing = httpx.get(f"{url}/v1/tasks", timeout=30).json()
        statuses = {}
        for task in ("depth", "edit", "super-resolution", "flipped", "unloadable", "nan"):
            data = {"steps": "1", "seed": "1", **({"prompt": "make it blue"} if task == "edit" else {})}
            r = httpx.post(f"{url}/v1/tasks/{task}", files={"image": ("a.png", image_bytes(16, 16))}, data=data,
                           timeout=300)
            statuses[task] = r.status_code if r.status_code == 200 else f"{r.status_code} {r.json()['error']['code']}"
    finally:
        code = stop_server(proc)
    return {"start_s": started, "readyz": ready.status_code, "readyz_unavailable": sorted(ready.json().get("unavailable", {})),
            "served_tasks": sorted(t["task"] for t in listing["tasks"]),
            "unavailable": {u["name"]: u["reason"][:90] for u in listing["unavailable"]}, "requests": statuses,
            "exit_status": code}


async def backlog(url: str, n: int, proc, after_s: float) -> tuple[Counter, list]:
    import signal

    image = image_bytes(64, 64, seed=9)
    statuses, retry = Counter(), []
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=n + 10)) as client:

        async def one(i: int):
            try:
                r = await client.post("/v1/tasks/depth", files={"image": ("a.png", image)}, data={"seed": str(i)})
                statuses[r.status_code] += 1
                if r.status_code == 503:
                    retry.append(r.headers.get("retry-after"))
            except httpx.HTTPError as e:
                statuses[0 if not isinstance(e, httpx.TimeoutException) else -1] += 1  # closed, or no answer in 120 s

        async def term():
            await asyncio.sleep(after_s)
            proc.send_signal(signal.SIGTERM)

        await asyncio.gather(*[one(i) for i in range(n)], term())
    return statuses, retry


def shutdown(clients: int, drain_s: float) -> dict:
    url, proc = start_server(["--drain-s", str(drain_s), "--max-batch", "2", "--queue-size", str(clients * 2),
                              "--no-warmup"])
    t0 = time.monotonic()
    statuses, retry = asyncio.run(backlog(url, clients, proc, after_s=2.0))
    code = stop_server(proc)
    return {"clients": clients, "drain_s": drain_s, "by_status": {str(k): v for k, v in sorted(statuses.items())},
            "5xx_other_than_503": sum(v for k, v in statuses.items() if k >= 500 and k != 503),
            "closed_without_answer": statuses.get(0, 0), "no_answer_in_120_s": statuses.get(-1, 0),
            "retry_after": sorted(set(retry)),
            "seconds": round(time.monotonic() - t0, 1), "exit_status": code}


def register(tmp: str, tries: int) -> dict:
    import shutil
    from pathlib import Path

    from cdd.adapters.zoo import ADAPTER_FILE, MANIFEST, default_zoo_dir, sha256_file

    zoo_dir, bad = Path(tmp) / "zoo", Path(tmp) / "bad"
    zoo_dir.mkdir()
    shutil.copytree(default_zoo_dir() / "depth", zoo_dir / "depth")
    # an entry of an architecture the server does not serve, with weights of another (their sha256 listed)
    shutil.copytree(default_zoo_dir() / "super-resolution-t2i", bad)
    (bad / ADAPTER_FILE).write_bytes((zoo_dir / "depth" / ADAPTER_FILE).read_bytes())
    m = json.loads((bad / MANIFEST).read_text())
    m["files"][ADAPTER_FILE] = sha256_file(bad / ADAPTER_FILE)
    (bad / MANIFEST).write_text(json.dumps(m))
    url, proc = start_server(["--zoo", str(zoo_dir)], env={"CDD_API_KEY": "bench-key"})
    try:
        statuses, rss = Counter(), [rss_mb(proc.pid)]
        for _ in range(tries):
            r = httpx.post(f"{url}/v1/adapters", json={"path": str(bad)}, headers={"Authorization": "Bearer bench-key"},
                           timeout=300)
            statuses[r.status_code] += 1
            rss.append(rss_mb(proc.pid))
    finally:
        stop_server(proc)
    return {"tries": tries, "by_status": dict(statuses), "rss_mb": [round(x, 1) for x in rss],
            "growth_after_first_mb": round(rss[-1] - rss[1], 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=[*PHASES, "all"])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--pid", type=int, help="the server's process id (soak: resident memory)")
    p.add_argument("--fuzz-requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--overload-factor", type=float, default=4.0)
    p.add_argument("--overload-seconds", type=float, default=60.0)
    p.add_argument("--deadline-ms", type=float, default=60_000, help="each overload request's X-CDD-Deadline-Ms")
    p.add_argument("--calibrate", type=int, default=24, help="requests that measure capacity before the overload")
    p.add_argument("--slow-connections", type=int, default=20)
    p.add_argument("--slow-seconds", type=float, default=30.0)
    p.add_argument("--soak-requests", type=int, default=300)
    p.add_argument("--slow-readers", type=int, default=100)
    p.add_argument("--slow-read-seconds", type=float, default=40.0, help="how long the slow readers hold on")
    p.add_argument("--shutdown-clients", type=int, default=40)
    p.add_argument("--shutdown-drain-s", type=float, default=5.0)
    p.add_argument("--register-tries", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)
    url = a.url.rstrip("/")
    if urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        p.error("loopback only: --url must be a local server")
    phases = list(PHASES) if a.phase == "all" else [a.phase]
    report = {}
    for phase in phases:
        t0 = time.monotonic()
        if phase == "fuzz":
            report[phase] = asyncio.run(fuzz(url, a.fuzz_requests, a.concurrency, a.seed))
        elif phase == "amplify":
            report[phase] = amplify(url)
        elif phase == "overload":
            report[phase] = asyncio.run(overload(url, a.overload_factor, a.overload_seconds, a.deadline_ms, a.calibrate))
        elif phase == "slowloris":
            report[phase] = slowloris(url, a.slow_connections, a.slow_seconds)
        elif phase == "soak":
            report[phase] = soak(url, a.soak_requests, a.pid)
        elif phase == "admission":
            report[phase] = admission(url, a.pid)
        elif phase == "slowread":
            report[phase] = slowread(url, a.slow_readers, a.slow_read_seconds, a.pid)
        elif phase == "port":
            report[phase] = port_probe(url)
        elif phase == "shutdown":
            report[phase] = shutdown(a.shutdown_clients, a.shutdown_drain_s)
        else:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                report[phase] = zoo(tmp) if phase == "zoo" else register(tmp, a.register_tries)
        print(json.dumps({phase: report[phase], "wall_s": round(time.monotonic() - t0, 1)}), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
