# Experiment script. Produced docs/images/serve_sr_photos_default_zoo.png, held-out photographs through cdd-serve (docs/results.md).
"""What `cdd-serve` answers for super-resolution of held-out photographs, through its HTTP API.

    python experiments/serve_sr_photos_sheet.py [--backbone adapters/embedded/backbone] \
        [--zoo adapters/embedded/zoo] --out docs/images/serve_sr_photos.png [--patches 6] [--samplers prev,prev+ilvr]

The app is the real one (`create_app` with the given backbone and zoo), driven in-process by FastAPI's
TestClient, seed 0 for every request and no prompt (what a user sends). Rows:

- patches of the held-out photographs (astronaut, chelsea, flower; never trained on), 64 px, degraded to
  16 px with the `mild-64px` preset as `cdd-eval --dataset photos` does;
- one whole held-out photograph area-downscaled to `--whole` px (a small image as a user has one, no added
  noise), answered 4x larger in overlapping tiles: seams would show here.

Columns: the input (enlarged, nearest), its bicubic 4x up-sampling, the served output per sampler, the truth.
Each row's PSNR against the truth is printed.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image
from serve_default_zoo_sheet import png, save_sheet, u8  # the sibling script (experiments/ is sys.path[0])

from cdd.adapters.zoo import default_backbone_dir, default_zoo_dir
from cdd.runtime.serving.app import create_app
from cdd.runtime.serving.settings import ServeSettings
from cdd.training.data.degradations import degradation_preset, make_sr_pair, upsample
from cdd.training.data.photos import HELD_OUT, PhotoPatches, bundled_photo


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2)
    return float(10 * np.log10(1 / max(mse, 1e-12)))


def ask(client: TestClient, image: np.ndarray, adapter: str | None, sampler: str) -> np.ndarray:
    form = {"seed": "0", "sampler": sampler, **({"adapter": adapter} if adapter else {})}
    r = client.post("/v1/tasks/super-resolution", files={"image": ("in.png", png(image), "image/png")}, data=form)
    if r.status_code != 200:
        raise SystemExit(f"super-resolution ({sampler}): HTTP {r.status_code}: {r.text}")
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def bicubic(lr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    x = torch.from_numpy(lr.copy()).permute(2, 0, 1).float()[None] / 255
    return u8(upsample(x, size)[0].permute(1, 2, 0).numpy())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", type=Path, default=default_backbone_dir())
    p.add_argument("--zoo", type=Path, default=default_zoo_dir())
    p.add_argument("--adapter", default=None, help="zoo name (default: the task's first)")
    p.add_argument("--samplers", default="prev,prev+ilvr")
    p.add_argument("--patches", type=int, default=6)
    p.add_argument("--whole", type=int, default=48, help="side of the whole-photograph input (0: none)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    samplers = args.samplers.split(",")

    patches = PhotoPatches.bundled("held-out", size=64, seed=1234)
    cases = []  # (label, low-resolution uint8, truth uint8)
    for i in range(args.patches):
        hr = patches[i]["image"][None] * 0.5 + 0.5
        lr = make_sr_pair(hr, torch.Generator().manual_seed(i), degradation_preset("mild-64px")).lr[0]
        cases.append((f"held-out patch {i}", u8(lr.permute(1, 2, 0).numpy()), u8(hr[0].permute(1, 2, 0).numpy())))
    if args.whole:
        name = HELD_OUT[0]
        photo = Image.fromarray(bundled_photo(name))
        truth = np.asarray(photo.resize((4 * args.whole, 4 * args.whole), Image.BICUBIC))
        lr = np.asarray(photo.resize((args.whole, args.whole), Image.BOX))
        cases.append((f"{name} whole, {args.whole} px", lr, truth))

    settings = ServeSettings(backbone=args.backbone, zoo=args.zoo, warmup=False)
    rows, labels, side = [], [], 128
    with TestClient(create_app(settings)) as client:
        assert client.app.state.engine.wait_ready(300)
        for label, lr, truth in cases:
            size = truth.shape[:2]
            tiles = [np.asarray(Image.fromarray(lr).resize(size[::-1], Image.NEAREST)), bicubic(lr, size)]
            tiles += [ask(client, lr, args.adapter, s) for s in samplers]
            tiles.append(truth)
            scores = [f"{n} {psnr(t, truth):.2f}" for n, t in zip(["bicubic", *samplers], tiles[1:-1])]
            print(f"{label}: PSNR " + ", ".join(scores))
            rows.append(np.concatenate([np.asarray(Image.fromarray(t).resize((side, side), Image.LANCZOS))
                                        for t in tiles], axis=1))
            labels.append(f"{label}: PSNR " + ", ".join(scores))
    columns = ["input", "bicubic", *[f"served {s}" for s in samplers], "truth"]
    save_sheet(Image.fromarray(np.concatenate(rows, axis=0)), columns, side, labels, args.out)


if __name__ == "__main__":
    main()
