# Experiment script (2026-12-06): the sheet of docs/results.md "A flat guard on the fidelity module" from two
# benchmarks/sr_photos.py sheets (served before, guard 0.01), whole photographs, mild-64px.
"""Columns bicubic | served before | flat guard | truth of the whole photographs, each with a flat window enlarged.

    python experiments/guard_sheet.py [BEFORE_SHEET GUARD_SHEET [OUT]]

The sheets are benchmarks/sr_photos.py's (input | bicubic | fidelity=1 | truth; 768 px wide; the row spans below
are those sheets' whole-photograph rows).
"""

from __future__ import annotations

import sys

from PIL import Image, ImageDraw

BEFORE = "/work/runs/fid2/serve-flat3k-mild-64px/sheet.png"
GUARD = "/work/runs/guard/serve-g0.01-mild-64px/sheet.png"
OUT = "docs/images/sr_guard_photos.jpg"
ROWS = {  # name: (the row's y span in the sheets, the flat window (x0, y0, x1, y1) within its 192 px tile)
    "astronaut whole (128x128 in)": ((426, 618), (120, 0, 192, 72)),
    "chelsea whole (112x72 in)": ((975, 1098), (130, 10, 190, 70)),
    "flower whole (160x104 in)": ((1488, 1612), (0, 60, 64, 124)),
}


def main() -> None:
    before_path, guard_path, out_path = (sys.argv[1:] + [BEFORE, GUARD, OUT][len(sys.argv) - 1 :])[:3]
    before, guard = Image.open(before_path).convert("RGB"), Image.open(guard_path).convert("RGB")
    w = before.size[0] // 4
    columns = [("bicubic", before, 1), ("served before", before, 2), ("flat guard 0.01", guard, 2), ("truth", before, 3)]
    blocks = []
    for name, ((y0, y1), (x0, wy0, x1, wy1)) in ROWS.items():
        tiles = [sheet.crop((c * w, y0, (c + 1) * w, y1)) for _, sheet, c in columns]
        size = (w, (wy1 - wy0) * w // (x1 - x0))  # the window as wide as a tile
        zooms = [t.crop((x0, wy0, x1, wy1)).resize(size, Image.NEAREST) for t in tiles]
        blocks.append((name, tiles, zooms))
    height = 14 + sum(14 + t[0].size[1] + z[0].size[1] + 4 for _, t, z in blocks)
    out = Image.new("RGB", (4 * w, height), "white")
    draw = ImageDraw.Draw(out)
    draw.text((2, 1), "mild-64px through cdd-serve, seed 0: " + " | ".join(c[0] for c in columns)
              + "; under each, a flat window enlarged", fill="black")
    y = 14
    for name, tiles, zooms in blocks:
        draw.text((2, y + 1), name, fill="black")
        y += 14
        for row in (tiles, zooms):
            for i, t in enumerate(row):
                out.paste(t, (i * w, y))
            y += row[0].size[1]
        y += 4
    out.save(out_path, quality=90)
    print(f"wrote {out_path} {out.size}")


if __name__ == "__main__":
    main()
