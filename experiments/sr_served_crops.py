# Experiment script. Produced docs/images/sr_one_step_served.png (docs/results.md, "One step from the input, as served").
"""What a running `cdd-serve` answers for photographs made small, per (adapter, steps, strength) column: a crop of
each output beside the same crop of the bicubic enlargement and of the original, and each whole output's PSNR
against the original.

    cdd-serve --port 8765 &
    python experiments/sr_served_crops.py --url http://localhost:8765 --out sheet.png \
        --column super-resolution-codi:4:1 --column super-resolution:1:0.5

The photographs: chelsea (scikit-image) cropped at (60, 20, 348, 308) and made 72x72, the flower (scikit-learn)
cropped at (100, 100, 356, 356) and made 64x64, both with bicubic (the held-out photographs of docs/data.md).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from serve_default_zoo_sheet import save_sheet


def photographs() -> list[tuple[str, Image.Image, Image.Image, tuple[int, int]]]:
    """(name, small input, original, top-left of the crop shown) for the two photographs."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    cat = Image.fromarray(data.chelsea()).crop((60, 20, 348, 308))
    flower = Image.fromarray(load_sample_image("flower.jpg")).crop((100, 100, 356, 356))
    return [("chelsea", cat.resize((72, 72), Image.BICUBIC), cat, (40, 60)),
            ("flower", flower.resize((64, 64), Image.BICUBIC), flower, (70, 70))]


def ask(url: str, image: Image.Image, adapter: str, steps: str, strength: str, seed: str) -> np.ndarray:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    r = httpx.post(f"{url}/v1/tasks/super-resolution", files={"image": ("in.png", buf.getvalue(), "image/png")},
                   data={"adapter": adapter, "steps": steps, "strength": strength, "seed": seed}, timeout=300)
    if r.status_code != 200:
        raise SystemExit(f"{adapter} {steps} {strength}: HTTP {r.status_code}: {r.text}")
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://localhost:8765")
    p.add_argument("--column", action="append", required=True, metavar="ADAPTER:STEPS:STRENGTH")
    p.add_argument("--seed", default="0")
    p.add_argument("--crop", type=int, default=110)
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    columns = [c.split(":") for c in a.column]
    rows, captions = [], []
    for name, small, original, (x, y) in photographs():
        truth = np.asarray(original.convert("RGB"))
        bicubic = np.asarray(small.resize(original.size, Image.BICUBIC))
        outs = [ask(a.url, small, *c, a.seed) for c in columns]
        scores = [psnr(bicubic, truth)] + [psnr(o, truth) for o in outs]
        print(f"{name}: PSNR " + ", ".join(f"{label} {s:.2f}" for label, s in zip(["bicubic"] + a.column, scores)))
        crops = [im[y : y + a.crop, x : x + a.crop] for im in [bicubic, *outs, truth]]
        rows.append(np.concatenate(crops, axis=1))
        captions.append(f"{name}, PSNR of the whole output: " + " / ".join(f"{s:.2f}" for s in scores) + " dB")
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    sheet = grid.resize((grid.width * a.scale, grid.height * a.scale), Image.NEAREST)
    titles = ["bicubic"] + [f"{ad} {k} step{'s' if k != '1' else ''}, " + ("from noise" if float(s) == 1 else f"strength {s}")
                            for ad, k, s in columns] + ["original"]
    save_sheet(sheet, titles, a.crop * a.scale, captions, a.out)


if __name__ == "__main__":
    main()
