# Benchmark script. Ways of sampling a large super-resolution input through the engine: quality, seams, flat-region HF, cost.
"""Large super-resolution inputs, four ways, through the real engine (the default backbone and zoo entry).

    OMP_NUM_THREADS=1 python benchmarks/sr_large.py --out experiments/out/sr_large [--seeds 0,1000,2000]
        [--sizes 32,64,128] [--ways a,b,c64,c128] [--photos astronaut] [--sheet docs/images/sr_large_sheet.png]
    # timing, one photo, alternating: --photos astronaut --sizes 128 --seeds 0 --ways ref16,a,b,c64,c128,ref16,a,b,c64,c128
    # a 128x128 request through the app, cdd-serve's defaults against the old way: --served 2

Ways (docs/results.md, "Large super-resolution inputs"):
- a: 64 px tiles (the adapter's resolution), 25% overlap, sampled independently, blended once in pixels (the old way);
- b: the whole latent as one row (no tiles);
- c64, c128: 64 / 128 px tiles, 25% overlap, their estimates averaged in latent space every step (MultiDiffusion,
  `tasks.LatentBlend`), then decoded per tile and blended in pixels.

Inputs per held-out photograph (astronaut, chelsea, flower): the centre 128x128 crop of the photo as the truth
(a 32 px input), and the centre square of the whole photo resized (area) to 256 / 512 px as the truth (64 / 128 px
inputs); every input is the truth bicubic-downscaled x4 (antialiased), quantised to uint8 as a PNG would carry it.
Each row: PSNR / SSIM against the truth (and bicubic's), flat_hf (training/metrics.py flat_hf_energy, x 1e4; the
truth's own and bicubic's beside it), seam (mean |step| of output - bicubic across the 64 px tile layout's edges over
its mean across all pixel lines: 1 is no seam) and wall seconds. The cost ratio divides a way's seconds by the
seconds of the same output pixels as non-overlapping 64 px tiles at batch 16 (`ref16`, timed in the same run).
Engine: per-adapter batching, max_batch 16, float32 on the CPU, the request's seed per row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from cdd.adapters.zoo import default_backbone_dir, default_zoo_dir
from cdd.runtime.serving.engine import Engine
from cdd.runtime.serving.settings import ServeSettings
from cdd.runtime.serving.tasks import LATENT, PIXELS, SUPER_RESOLUTION, assemble, prepare, sr_layout
from cdd.training.data.photos import HELD_OUT, bundled_photo
from cdd.training.metrics import flat_hf_energy, psnr, ssim

WAYS = {"a": (64, PIXELS, 0.25), "c64": (64, LATENT, 0.25), "c128": (128, LATENT, 0.25), "c256": (256, LATENT, 0.25),
        "b": (None, LATENT, 0.25)}
REF = "ref16"  # the same output pixels as non-overlapping 64 px rows, batch 16: the cost unit


def ref_work(work, lr: torch.Tensor):
    """`work`'s output pixels cut into non-overlapping 64 px rows, independent (no layout): what the same pixels
    cost as plain samples at batch 16 (max_batch 16)."""
    from cdd.runtime.serving.tasks import Work

    up = bicubic_up(lr)
    h, w = up.shape[-2:]
    crops = [(y, x) for y in range(0, h - 63, 64) for x in range(0, w - 63, 64)]
    z = work.z_T.new_zeros(len(crops), *work.z_T.shape[1:2], 16, 16)
    z.normal_(generator=torch.Generator().manual_seed(work.seed))
    return Work(task=work.task, adapter=work.adapter, steps=work.steps, sampler=work.sampler, seed=work.seed, prompt="",
                resolution=work.resolution, cond=torch.stack([up[:, y : y + 64, x : x + 64] for y, x in crops]), z_T=z)


def cases(sizes: list[int]) -> list[tuple[str, np.ndarray]]:
    """(label, truth uint8 HxWx3) per photo and input size."""
    out = []
    for name in HELD_OUT:
        photo = bundled_photo(name)
        h, w = photo.shape[:2]
        side = min(h, w)
        square = Image.fromarray(photo[(h - side) // 2 : (h + side) // 2, (w - side) // 2 : (w + side) // 2])
        for s in sizes:
            if s == 32:
                truth = photo[(h - 128) // 2 : (h + 128) // 2, (w - 128) // 2 : (w + 128) // 2]
                out.append((f"{name.split(':')[1]} crop128 (32 px in)", np.ascontiguousarray(truth)))
            else:
                out.append((f"{name.split(':')[1]} whole ({s} px in)", np.asarray(square.resize((4 * s, 4 * s), Image.BOX))))
    return out


def to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(x)).permute(2, 0, 1).float() / 255


def degrade(truth: torch.Tensor) -> torch.Tensor:
    """Bicubic x4 down (antialiased), quantised to uint8 levels: the input a user sends."""
    lr = F.interpolate(truth[None], scale_factor=0.25, mode="bicubic", align_corners=False, antialias=True)[0]
    return (lr.clamp(0, 1) * 255).round() / 255


def bicubic_up(lr: torch.Tensor) -> torch.Tensor:
    h, w = lr.shape[-2:]
    return F.interpolate(lr[None], size=(4 * h, 4 * w), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def seam(out: torch.Tensor, bic: torch.Tensor, edges_x: list[int], edges_y: list[int]) -> float:
    """Mean |step| of the residual (output - bicubic) across the given pixel lines over its mean across all lines."""
    r = (out - bic).mean(0)
    dx, dy = (r[:, 1:] - r[:, :-1]).abs(), (r[1:] - r[:-1]).abs()
    at = torch.cat([dx[:, [e - 1 for e in edges_x]].flatten(), dy[[e - 1 for e in edges_y]].flatten()])
    return float(at.mean() / torch.cat([dx.flatten(), dy.flatten()]).mean())


def edges(width: int, height: int) -> tuple[list[int], list[int]]:
    """The 64 px layout's tile edges inside the output (where a tile starts or ends), the lines a seam would follow."""
    layout = sr_layout(width, height, 64, 4, 0.25)
    ow, oh = layout.out
    xs = sorted({e for t in layout.tiles for e in (t.x, t.x + 64)} - {0} - set(range(ow, 10**6)))
    ys = sorted({e for t in layout.tiles for e in (t.y, t.y + 64)} - {0} - set(range(oh, 10**6)))
    return xs, ys


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", type=Path, default=default_backbone_dir())
    p.add_argument("--zoo", type=Path, default=default_zoo_dir())
    p.add_argument("--adapter", default="super-resolution")
    p.add_argument("--seeds", default="0,1000,2000")
    p.add_argument("--sizes", default="32,64,128")
    p.add_argument("--ways", default="a,b,c64,c128")
    p.add_argument("--photos", default=None, help="only these held-out photos, e.g. astronaut (default: all three)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sampler", default="prev+ilvr")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sheet", type=Path, default=None, help="contact sheet of the largest size, first seed")
    p.add_argument("--served", type=int, default=0, metavar="ROUNDS", help="instead: a 128x128 input through the app "
                   "(cdd-serve's defaults) against the old 64 px tiles blended in pixels, ROUNDS alternating requests")
    args = p.parse_args()
    if args.served:
        return served_latency(args.backbone, args.zoo, args.served)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    ways = args.ways.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    engine = Engine(ServeSettings(backbone=args.backbone, zoo=args.zoo, batching="request", max_batch=16,
                                  warmup=False, max_work=10**9)).start()
    reg = engine.pool.get(args.adapter)
    rows, sheet = [], {}
    try:
        for label, truth_u8 in cases(sizes):
            if args.photos and label.split()[0] not in args.photos.split(","):
                continue
            truth = to_tensor(truth_u8)
            lr = degrade(truth)
            bic = bicubic_up(lr)
            ex, ey = edges(lr.shape[-1], lr.shape[-2])
            base = {"case": label, "input": f"{lr.shape[-1]}x{lr.shape[-2]}",
                    "bicubic_psnr": float(psnr(bic[None], truth[None])), "bicubic_ssim": float(ssim(bic[None], truth[None])),
                    "bicubic_flat_hf": float(flat_hf_energy(bic[None], truth[None])),
                    "truth_flat_hf": float(flat_hf_energy(truth[None], truth[None]))}
            sheet.setdefault(label, {"bicubic": bic, "truth": truth})
            extra = [REF] if lr.shape[-1] == max(sizes) and REF not in ways else []
            for way in ways + extra:  # a way named twice is run (and timed) twice
                tile, blend, overlap = WAYS.get(way, WAYS["a"])
                tile = tile or 4 * max(lr.shape[-2:])
                for seed in seeds if way != REF else seeds[:1]:
                    work = prepare(SUPER_RESOLUTION, lr, adapter=reg.name, resolution=reg.resolution,
                                   model_channels=engine.backbone.model_channels, scale_factor=engine.backbone.vae_scale_factor,
                                   steps=args.steps, sampler=args.sampler, seed=seed, prompt="", overlap_fraction=overlap,
                                   tile=tile, blend=blend)
                    if way == REF:
                        t0 = time.perf_counter()
                        engine.run(ref := ref_work(work, lr), timeout=3600)
                        rows.append({**base, "way": way, "seed": seed, "tiles": ref.rows, "tile": 64,
                                     "seconds": time.perf_counter() - t0})
                        print(json.dumps(rows[-1]), flush=True)
                        continue
                    t0 = time.perf_counter()
                    result = engine.run(work, timeout=3600)
                    seconds = time.perf_counter() - t0
                    out = to_tensor(assemble(work, result.rows))
                    row = {**base, "way": way, "seed": seed, "tiles": work.rows, "tile": tile, "seconds": seconds,
                           "psnr": float(psnr(out[None], truth[None])), "ssim": float(ssim(out[None], truth[None])),
                           "flat_hf": float(flat_hf_energy(out[None], truth[None])), "seam": seam(out, bic, ex, ey)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if seed == seeds[0]:
                        sheet[label][way] = out
                        Image.fromarray(assemble(work, result.rows)).save(
                            args.out / f"{label.split()[0]}_{lr.shape[-1]}_{way}.png")
            (args.out / "rows.json").write_text(json.dumps(rows, indent=1))
    finally:
        engine.stop()
    if args.sheet:
        save_sheet(args.sheet, {k: v for k, v in sheet.items() if f"({max(sizes)} px in)" in k}, ["bicubic", *ways, "truth"])


def served_latency(backbone: Path, zoo: Path, rounds: int) -> None:
    """Wall time of a 128x128 super-resolution request (astronaut, the 128 px case's input) through the app with no
    settings, against the same app with the old way (CDD_SR_TILE=64, CDD_SR_BLEND=pixels, max_work raised)."""
    import io

    from fastapi.testclient import TestClient

    from cdd.runtime.serving.app import create_app

    torch.set_num_threads(1)
    label, truth = next(c for c in cases([128]) if c[0].startswith("astronaut"))
    lr = (degrade(to_tensor(truth)).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(lr).save(buf, format="PNG")
    apps = {"served (c128)": ServeSettings(backbone=backbone, zoo=zoo, warmup=False),
            "before (a)": ServeSettings(backbone=backbone, zoo=zoo, warmup=False, sr_tile=64, sr_blend="pixels",
                                        max_work=10**6)}
    clients = {name: TestClient(create_app(s)).__enter__() for name, s in apps.items()}
    times: dict[str, list[float]] = {name: [] for name in apps}
    try:
        for _ in range(rounds):
            for name, client in clients.items():
                t0 = time.perf_counter()
                r = client.post("/v1/tasks/super-resolution", files={"image": ("in.png", buf.getvalue(), "image/png")},
                                data={"seed": "0"})
                times[name].append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise SystemExit(f"{name}: HTTP {r.status_code}: {r.text}")
                print(json.dumps({"way": name, "seconds": times[name][-1], "size": Image.open(io.BytesIO(r.content)).size}),
                      flush=True)
    finally:
        for client in clients.values():
            client.__exit__(None, None, None)


def save_sheet(path: Path, cases_: dict, columns: list[str], cell: int = 192, zoom: int = 96) -> None:
    """Per case two rows: each column's whole image at `cell` px, then the truth's flattest `zoom` px window of it
    (where invented marks show) enlarged 2x (nearest); columns: bicubic, each way, truth."""
    from cdd.training.metrics import flat_mask

    width = len(columns) * cell
    canvas = Image.new("RGB", (width, 14 + len(cases_) * (cell + 2 * zoom + 14)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(columns):
        draw.text((j * cell + 4, 1), name, fill="black")
    y = 14
    for label, images in cases_.items():
        flat = flat_mask(images["truth"][None])[0, 0].float()
        score = F.avg_pool2d(flat[None, None], zoom, zoom // 4)[0, 0]  # flat fraction of each window, on a grid
        i = int(score.flatten().argmax())
        wy, wx = (i // score.shape[1]) * zoom // 4, (i % score.shape[1]) * zoom // 4
        for j, name in enumerate(columns):
            arr = (images[name].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
            canvas.paste(Image.fromarray(arr).resize((cell, cell), Image.LANCZOS), (j * cell, y))
            crop = Image.fromarray(arr[wy : wy + zoom, wx : wx + zoom]).resize((2 * zoom, 2 * zoom), Image.NEAREST)
            canvas.paste(crop, (j * cell, y + cell))
        draw.text((4, y + cell + 2 * zoom + 1), f"{label}; below: the {zoom} px window at x={wx}, y={wy} "
                  "(the truth's flattest), 2x", fill="black")
        y += cell + 2 * zoom + 14
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    canvas.save(tmp)
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
