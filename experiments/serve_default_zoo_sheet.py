# Experiment script. Produced docs/images/serve_default_zoo.png, the default zoo through cdd-serve (docs/results.md).
"""A contact sheet of what `cdd-serve` with no settings answers, one request per task, through its HTTP API.

    python experiments/serve_default_zoo_sheet.py --out docs/images/serve_default_zoo.png [--scenes 3]

The app is the real one (`create_app` with no settings: the embedded backbone and zoo), driven in-process
by FastAPI's TestClient. Per scene (one row): the SR input (degraded to 16 px with --degradation,
by default the mild-64px preset the default zoo was trained for; shown enlarged), the SR output, the ground truth; the depth map, the depth output; the edit source, the edit
output, and the edited scene the instruction asks for. Seed 0 for every request.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from cdd.runtime.serving.app import create_app
from cdd.runtime.serving.settings import ServeSettings
from cdd.training.data import scenes
from cdd.training.data.degradations import DEGRADATION_PRESETS, degradation_preset, make_sr_pair

COLUMNS = ["SR input", "SR output", "truth", "depth map", "depth output", "edit source", "edit output", "edit target"]


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def ask(client: TestClient, task: str, image: np.ndarray, **form: str) -> np.ndarray:
    r = client.post(f"/v1/tasks/{task}", files={"image": ("in.png", png(image), "image/png")}, data={"seed": "0", **form})
    if r.status_code != 200:
        raise SystemExit(f"{task}: HTTP {r.status_code}: {r.text}")
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scenes", type=int, default=3)
    p.add_argument("--seed", type=int, default=7, help="scene seed")
    p.add_argument("--degradation", choices=tuple(DEGRADATION_PRESETS), default="mild-64px")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    rows, captions = [], []
    with TestClient(create_app(ServeSettings())) as client:
        assert client.app.state.engine.wait_ready(300)
        for i in range(args.scenes):
            spec = scenes.sample_scene(rng)
            source = scenes.render(spec, 64)
            hr = torch.from_numpy(source.image).permute(2, 0, 1).float()[None]
            lr = u8(make_sr_pair(hr, torch.Generator().manual_seed(i), degradation_preset(args.degradation)).lr[0].permute(1, 2, 0).numpy())
            depth = np.repeat(u8(scenes.depth_to_condition(source.depth))[..., None], 3, -1)
            edit = scenes.sample_edit(spec, rng)
            tiles = [
                np.asarray(Image.fromarray(lr).resize((64, 64), Image.NEAREST)),
                ask(client, "super-resolution", lr), u8(source.image),
                depth, ask(client, "depth", depth, prompt=scenes.caption(spec)),
                u8(source.image), ask(client, "edit", u8(source.image), prompt=edit.instruction),
                u8(scenes.render(edit.spec, 64).image),
            ]
            rows.append(np.concatenate(tiles, axis=1))
            captions.append(f"{scenes.caption(spec)} | edit: {edit.instruction}")
    scale = 2
    sheet = Image.fromarray(np.concatenate(rows, axis=0)).resize((64 * len(COLUMNS) * scale, 64 * len(rows) * scale),
                                                                   Image.NEAREST)
    save_sheet(sheet, COLUMNS, 64 * scale, captions, args.out)


def save_sheet(sheet: Image.Image, columns: list[str], cell: int, captions: list[str], out: Path) -> None:
    """`sheet` (rows of `cell`-wide tiles) with the column names above and one caption line per row below."""
    head, line = 14, 12
    canvas = Image.new("RGB", (sheet.width, head + sheet.height + line * len(captions)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(columns):
        draw.text((j * cell + 4, 1), name, fill="black")
    canvas.paste(sheet, (0, head))
    for i, text in enumerate(captions):
        draw.text((4, head + sheet.height + i * line), f"row {i + 1}: {text}", fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
