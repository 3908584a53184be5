# Benchmark. Super-resolution of held-out photographs at the sizes people send, through cdd-serve, against bicubic.
"""What `cdd-serve` returns for a photograph it never saw, at the sizes people send, against bicubic.

    python benchmarks/sr_photos.py [--backbone B] [--zoo Z] [--adapter NAME] [--fidelity 0,1] \
        [--seeds 0,1000,2000] [--crops64 4] [--crops128 1] [--whole] [--degradations bicubic,mild-64px] \
        --out docs/results/sr-photos

Cases, from the held-out photographs (training/data/photos.py HELD_OUT: astronaut, chelsea, flower; never trained
on), at their own pixel scale (no resampling of the truth):
- `--crops64` crops of 256 x 256 per photograph (64 px inputs) and `--crops128` crops of 512 x 512 (128 px inputs,
  where a photograph is that large; chelsea and flower are cropped to 448 / 424 high), positions from a fixed seed;
- `--whole`: each whole photograph, its sides cut to multiples of 16 (astronaut 128 x 128 in, chelsea 112 x 75,
  flower 160 x 106).
Flat HF: the high-frequency energy of the answer on the truth's flat regions (training/metrics.py
`flat_hf_energy`, x 1e4: invented speckles), averaged over the cases that have flat pixels.
Each truth is made small by each degradation: `bicubic` (antialiased bicubic x4 down, 8-bit: a photograph only
made smaller) and `mild-64px` (the served training degradation: blur, noise, JPEG).

Every request goes through the real app (`create_app`, FastAPI's TestClient) with no prompt and a fixed seed, once
per fidelity weight (an entry without a fidelity module is asked plainly), and the server's limits raised so that
every size is admitted (the default limits are what they are; this measures quality). Per case: PSNR and SSIM
against the truth (8-bit, whole image) for bicubic (torch, as the service makes its condition) and each weight;
the summary gives the means, the share of cases at or above bicubic, and the seconds per request.
Writes results.json, results.md and sheet.png (input, bicubic, each weight, truth; one row per whole photograph
and the first crop of each size) to --out.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image

from cdd.adapters.zoo import default_backbone_dir, default_zoo_dir
from cdd.runtime.serving.app import create_app
from cdd.runtime.serving.settings import ServeSettings
from cdd.training.data.degradations import degradation_preset, degrade, upsample
from cdd.training.data.photos import HELD_OUT, bundled_photo
from cdd.training.metrics import flat_hf_energy, psnr, ssim

SCALE = 4
METRICS = ("psnr", "ssim", "flat_hf")  # flat_hf: the mean over the cases that have flat pixels


def cases(crops64: int, crops128: int, whole: bool) -> list[tuple[str, np.ndarray]]:
    """(label, truth uint8 HxWx3), sides multiples of 16."""
    rng = np.random.default_rng(20261206)
    out = []
    for name in HELD_OUT:
        photo = bundled_photo(name)
        h, w = photo.shape[:2]
        for size, n in ((256, crops64), (512, crops128)):
            sh, sw = min(size, h // 16 * 16), min(size, w // 16 * 16)
            for i in range(n):
                y, x = int(rng.integers(h - sh + 1)), int(rng.integers(w - sw + 1))
                out.append((f"{name.split(':')[1]} {sw // SCALE}x{sh // SCALE} crop {i}", photo[y : y + sh, x : x + sw]))
        if whole:
            out.append((f"{name.split(':')[1]} whole {w // 16 * 16 // SCALE}x{h // 16 * 16 // SCALE}",
                        photo[: h // 16 * 16, : w // 16 * 16]))
    return out


def to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float()[None] / 255


def to_u8(x: torch.Tensor) -> np.ndarray:
    return (x[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def scores(out: np.ndarray, truth: np.ndarray) -> dict:
    """PSNR, SSIM and the high-frequency energy on the truth's flat regions (flat_hf, x 1e4; NaN without any)."""
    a, b = to_tensor(out), to_tensor(truth)
    return {"psnr": float(psnr(a, b)[0]), "ssim": float(ssim(a, b)[0]), "flat_hf": float(flat_hf_energy(a, b)[0])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", type=Path, default=default_backbone_dir())
    p.add_argument("--zoo", type=Path, default=default_zoo_dir())
    p.add_argument("--adapter", default=None, help="zoo name (default: the task's default)")
    p.add_argument("--fidelity", default=None, help="weights to ask for, comma-separated (default: the entry's own)")
    p.add_argument("--seeds", default="0,1000,2000")
    p.add_argument("--crops64", type=int, default=4)
    p.add_argument("--crops128", type=int, default=1)
    p.add_argument("--whole", action="store_true")
    p.add_argument("--degradations", default="bicubic,mild-64px")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    weights = [float(w) for w in args.fidelity.split(",")] if args.fidelity else [None]
    degradations = args.degradations.split(",")
    todo = cases(args.crops64, args.crops128, args.whole)
    settings = ServeSettings(backbone=args.backbone, zoo=args.zoo, warmup=False, max_work=1 << 20,
                             max_pixels=1 << 22, request_deadline_s=3600)
    records, sheet_rows = [], []
    with TestClient(create_app(settings)) as client:
        assert client.app.state.engine.wait_ready(300)
        for deg in degradations:
            for k, (label, truth) in enumerate(todo):
                hr = to_tensor(truth)
                lr_t = degrade(hr, torch.Generator().manual_seed(k), degradation_preset(deg))
                lr = to_u8(lr_t)
                bicubic = to_u8(upsample(lr_t, tuple(hr.shape[-2:])))
                row = {"degradation": deg, "case": label, "input": list(lr.shape[1::-1]), "bicubic": scores(bicubic, truth)}
                outputs = {}
                for seed in seeds:
                    for w in weights:
                        form = {"seed": str(seed), **({"adapter": args.adapter} if args.adapter else {}),
                                **({"fidelity": str(w)} if w is not None else {}),
                                **({"steps": str(args.steps)} if args.steps else {})}
                        t0 = time.perf_counter()
                        r = client.post("/v1/tasks/super-resolution", files={"image": ("in.png", png(lr), "image/png")},
                                        data=form)
                        seconds = time.perf_counter() - t0
                        if r.status_code != 200:
                            print(f"{label}: HTTP {r.status_code}: {r.text}", file=sys.stderr)
                            return 1
                        out = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
                        key = "served" if w is None else f"fidelity={w:g}"
                        row.setdefault(key, []).append({"seed": seed, "seconds": seconds, **scores(out, truth)})
                        outputs.setdefault(key, out)
                records.append(row)
                print(f"{deg} {label}: bicubic {row['bicubic']['psnr']:.2f} dB, " + ", ".join(
                    f"{key} {np.mean([s['psnr'] for s in row[key]]):.2f}" for key in outputs), flush=True)
                if label.endswith("crop 0") or "whole" in label:
                    sheet_rows.append((f"{deg}, {label}", lr, bicubic, list(outputs.values()), truth, list(outputs)))
    summary = summarise(records, [("served" if w is None else f"fidelity={w:g}") for w in weights])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                                       "summary": summary, "cases": records}, indent=2) + "\n")
    (args.out / "results.md").write_text(table(summary))
    print(table(summary))
    save_sheet(sheet_rows, args.out / "sheet.png")
    return 0


def summarise(records: list[dict], keys: list[str]) -> list[dict]:
    """Per degradation and size group (64 px crops, 128 px crops, whole): means over cases (of each case's mean
    over seeds) and the share of cases whose PSNR / SSIM is at or above bicubic's."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        kind = "whole" if "whole" in r["case"] else "64 px crops" if max(r["input"]) <= 64 else "128 px crops"
        groups.setdefault((r["degradation"], kind), []).append(r)
    out = []
    for (deg, kind), rows in groups.items():
        line = {"degradation": deg, "group": kind, "cases": len(rows),
                "bicubic": {m: float(np.nanmean([r["bicubic"][m] for r in rows])) for m in METRICS}}
        for key in keys:
            mean = {m: [float(np.mean([s[m] for s in r[key]])) for r in rows] for m in METRICS}
            line[key] = {**{m: float(np.nanmean(v)) for m, v in mean.items()},
                         **{f"{m}_at_or_above_bicubic": float(np.mean([v >= r["bicubic"][m] for v, r in zip(mean[m], rows)]))
                            for m in ("psnr", "ssim")},
                         "seconds": float(np.mean([s["seconds"] for r in rows for s in r[key]]))}
        out.append(line)
    return out


def table(summary: list[dict]) -> str:
    keys = [k for k in summary[0] if k not in ("degradation", "group", "cases", "bicubic")]
    head = "| degradation | inputs | n | bicubic PSNR / SSIM / flat HF | " + " | ".join(
        f"{k} PSNR / SSIM / flat HF (share of cases >= bicubic: PSNR / SSIM) | s" for k in keys) + " |"
    lines = [head, "| --- " * (4 + 2 * len(keys)) + "|"]
    for s in summary:
        cells = [f"{s[k]['psnr']:.2f} / {s[k]['ssim']:.3f} / {s[k]['flat_hf']:.3f} ({s[k]['psnr_at_or_above_bicubic']:.0%} / "
                 f"{s[k]['ssim_at_or_above_bicubic']:.0%}) | {s[k]['seconds']:.1f}" for k in keys]
        lines.append(f"| {s['degradation']} | {s['group']} | {s['cases']} | {s['bicubic']['psnr']:.2f} / "
                     f"{s['bicubic']['ssim']:.3f} / {s['bicubic']['flat_hf']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_sheet(rows, path: Path, side: int = 192) -> None:
    """One row per case: input (nearest), bicubic, each answer, truth; each tile `side` px wide, labelled."""
    from PIL import ImageDraw

    tiles = []
    for label, lr, bicubic, outputs, truth, names in rows:
        h = int(side * truth.shape[0] / truth.shape[1])
        cells = [Image.fromarray(a).resize((side, h), Image.NEAREST if a is lr else Image.LANCZOS)
                 for a in (lr, bicubic, *outputs, truth)]
        strip = Image.new("RGB", (side * len(cells), h + 14), "white")
        for i, c in enumerate(cells):
            strip.paste(c, (i * side, 14))
        ImageDraw.Draw(strip).text((2, 1), f"{label}: input | bicubic | {' | '.join(names)} | truth", fill="black")
        tiles.append(strip)
    sheet = Image.new("RGB", (max(t.width for t in tiles), sum(t.height for t in tiles)), "white")
    y = 0
    for t in tiles:
        sheet.paste(t, (0, y))
        y += t.height
    sheet.save(path)


if __name__ == "__main__":
    sys.exit(main())
