# Experiment script. Produced docs/images/onestep_sr.png and docs/images/onestep_depth.png (docs/results.md, "A distribution term for one step").
"""A sample sheet from cdd-eval folders (their images/ strips, GRID_EXAMPLES images each): one column per
(label, row prefix), the condition first and the target last, the examples of every folder stacked, upscaled.

    python experiments/onestep_sheet.py --out sheet.png --column "served 4=served-prev-4" \
        --column "control 1=control-prev-1" --column "term 1=adversarial-prev-1" EVAL_FOLDER...
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw


def strip(folder: Path, prefix: str) -> Image.Image:
    found = sorted((folder / "images").glob(f"{prefix}-*.png")) if prefix not in ("condition", "target") \
        else [folder / "images" / f"{prefix}.png"]
    if len(found) != 1:
        raise SystemExit(f"{folder}/images: {len(found)} files for {prefix!r}")
    return Image.open(found[0]).convert("RGB")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--column", action="append", required=True, help="LABEL=ROW_PREFIX (e.g. 'control 1=control-prev-1')")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scale", type=int, default=3)
    a = p.parse_args()
    columns = [("input", "condition")] + [tuple(c.split("=", 1)) for c in a.column] + [("truth", "target")]
    blocks = [[strip(f, prefix) for _, prefix in columns] for f in a.folders]
    w, h = blocks[0][0].size
    s, head = a.scale, 14
    sheet = Image.new("RGB", (len(columns) * w * s, head + sum(b[0].size[1] for b in blocks) * s), "white")
    draw = ImageDraw.Draw(sheet)
    for j, (label, _) in enumerate(columns):
        draw.text((j * w * s + 3, 1), label, fill="black")
    y = head
    for block in blocks:
        for j, im in enumerate(block):
            sheet.paste(im.resize((im.size[0] * s, im.size[1] * s), Image.NEAREST), (j * w * s, y))
        y += block[0].size[1] * s
    a.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(a.out)
    print(f"written {a.out} ({sheet.size[0]}x{sheet.size[1]})")


if __name__ == "__main__":
    main()
