"""Wall-clock time of a few requests per task against `cdd-serve` with no settings (the embedded default), end to
end through the app (FastAPI's TestClient), three requests each, one at a time.

    OMP_NUM_THREADS=1 python benchmarks/serve_timing.py

CPU figures depend on the machine's load: compare rows of one run, never with GPU numbers.
"""

from __future__ import annotations

import io
import time

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
]


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def main() -> None:
    app = create_app(ServeSettings())
    with TestClient(app) as client:
        if not app.state.engine.wait_ready(300):
            raise SystemExit("the engine did not get ready in 300 s")
        for task, (w, h), form in REQUESTS:
            seconds = []
            for seed in range(3):
                t0 = time.perf_counter()
                r = client.post(f"/v1/tasks/{task}", files={"image": ("in.png", png(w, h), "image/png")},
                                data={"seed": str(seed), **form})
                seconds.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise SystemExit(f"{task} {w}x{h}: HTTP {r.status_code}: {r.text}")
            print(f"{task} {w}x{h}, sampler {r.headers['x-cdd-sampler']} x {r.headers['x-cdd-steps']}, "
                  f"tiles {r.headers.get('x-cdd-tiles', 1)}: " + " ".join(f"{t:.2f}" for t in seconds) + " s", flush=True)


if __name__ == "__main__":
    main()
