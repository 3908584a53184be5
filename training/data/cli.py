"""`cdd-scenes`: write a folder of rendered scenes with depth, edits and a contact sheet.

    cdd-scenes --n 16 --out scenes16 [--size 64] [--seed 0] [--sr]

The folder is an imagefolder (`metadata.jsonl`, `file_name` = the render) that
`build_dataset` reads back, e.g. for depth with conditioning_image_column="depth_condition"
or for editing with image_column="edited", conditioning_image_column="image",
caption_column="instruction". It is written to a sibling staging folder and renamed into
place at the end, so an error never leaves a partial dataset behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from cdd.training.data import scenes
from cdd.training.data.degradations import DegradationConfig, make_sr_pair

DEPTH_SCALE = 1000.0  # 16-bit depth PNG value = round(depth * DEPTH_SCALE)
SHEET_MAX = 64  # contact sheets show at most this many tiles


def _uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def contact_sheet(images, captions, columns: int = 4, tile: int = 192) -> Image.Image:
    """A grid of images (float [0, 1] or uint8, H x W x 3) each scaled (nearest, so the
    pixels stay visible) to `tile` pixels wide, with its caption wrapped underneath."""
    font_size = max(10, tile // 15)
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", font_size)
    except OSError:  # no DejaVu on this system
        font = ImageFont.load_default(size=font_size)
    line_h = int(font_size * 1.25)
    pad = 6

    def wrap(text: str, width: int) -> list[str]:
        lines, line = [], ""
        for word in text.split():
            trial = f"{line} {word}".strip()
            if line and font.getlength(trial) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        return lines + [line] if line else lines

    tiles = [np.asarray(im if np.asarray(im).dtype == np.uint8 else _uint8(np.asarray(im))) for im in images]
    scaled = [Image.fromarray(t).resize((tile, round(tile * t.shape[0] / t.shape[1])), Image.NEAREST)
              for t in tiles]
    wrapped = [wrap(c, tile) for c in captions]
    text_h = max(len(w) for w in wrapped) * line_h + pad
    img_h = max(s.height for s in scaled)
    rows = -(-len(scaled) // columns)
    cell_w, cell_h = tile + 2 * pad, img_h + text_h + 2 * pad
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (s, lines) in enumerate(zip(scaled, wrapped)):
        x, y = (i % columns) * cell_w + pad, (i // columns) * cell_h + pad
        sheet.paste(s, (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + img_h + pad // 2 + j * line_h), line, fill="black", font=font)
    return sheet


def _save_png(array_or_image, path: Path) -> None:
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    img.save(path, format="PNG")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cdd-scenes", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, required=True, help="number of scenes")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not exist, or be empty)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="scene k is drawn from (seed, k)")
    p.add_argument("--supersample", type=int, default=2, help="rays per pixel side (default 2)")
    p.add_argument("--sr", action="store_true",
                   help="also write Real-ESRGAN-degraded x4 low-resolution images and their sheet")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.n < 1:
        _parser().error(f"--n must be at least 1, got {args.n}")
    if args.size < 8 or (args.sr and args.size % 4):
        _parser().error(f"--size must be at least 8 (and divisible by 4 with --sr), got {args.size}")
    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        _parser().error(f"{out} exists and is not empty (pass --overwrite to replace it)")

    stage = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        _write(stage, args)
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    print(f"wrote {args.n} scenes to {out}")
    return 0


def _write(root: Path, args) -> None:
    for sub in ("images", "depth", "depth_condition", "edits") + (("lr",) if args.sr else ()):
        (root / sub).mkdir(parents=True)
    sheet_images, sheet_captions, sr_tiles, sr_captions = [], [], [], []
    lines = []
    for k in range(args.n):
        # The same draws as ScenesDataset("edit").sample(k): the scene, then its edit.
        rng = np.random.default_rng([args.seed, k])
        spec = scenes.sample_scene(rng)
        edit = scenes.sample_edit(spec, rng)
        r = scenes.render(spec, args.size, args.supersample)
        e = scenes.render(edit.spec, args.size, args.supersample)
        name = f"{k:06d}.png"
        image = _uint8(r.image)
        _save_png(image, root / "images" / name)
        _save_png(np.round(r.depth * DEPTH_SCALE).astype(np.uint16), root / "depth" / name)
        _save_png(_uint8(scenes.depth_to_condition(r.depth)), root / "depth_condition" / name)
        _save_png(_uint8(e.image), root / "edits" / name)
        text = scenes.caption(spec)
        row = {
            "file_name": f"images/{name}",
            "text": text,
            "depth_file_name": f"depth/{name}",
            "depth_condition_file_name": f"depth_condition/{name}",
            "edited_file_name": f"edits/{name}",
            "instruction": edit.instruction,
            "edited_text": scenes.caption(edit.spec),
            "index": k,
            "seed": args.seed,
            "depth_scale": DEPTH_SCALE,
            "depth_max": scenes.DEPTH_MAX,
            "spec": spec.to_dict(),
            "edited_spec": edit.spec.to_dict(),
        }
        if args.sr:
            g = torch.Generator().manual_seed(int(rng.integers(2**62)))
            hr = torch.from_numpy(r.image).permute(2, 0, 1)[None]
            pair = make_sr_pair(hr, g, DegradationConfig())
            lr = pair.lr[0].permute(1, 2, 0).numpy()
            _save_png(_uint8(lr), root / "lr" / name)
            row["lr_file_name"] = f"lr/{name}"
            if k < SHEET_MAX:
                up = pair.condition[0].permute(1, 2, 0).numpy()
                sr_tiles.append(np.concatenate([image, _uint8(up)], axis=1))
                sr_captions.append(f"{k}: HR {args.size}px | LR {args.size // 4}px, bicubic up")
        lines.append(json.dumps(row))
        if k < SHEET_MAX:
            sheet_images.append(image)
            sheet_captions.append(text)

    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    info = {
        "n": args.n, "size": args.size, "seed": args.seed, "supersample": args.supersample,
        "depth_scale": DEPTH_SCALE, "depth_max": scenes.DEPTH_MAX,
        "depth": "depth/*.png: uint16 = round(d * depth_scale), d = distance in scene units "
                 "from the camera centre to the surface along the pixel-centre ray, "
                 "clipped to depth_max (sky = depth_max)",
        "depth_condition": "depth_condition/*.png: normalised inverse depth, near = bright "
                           f"(depth {scenes.DEPTH_NEAR} -> 255, depth_max -> 0)",
        "vocabulary": scenes.scene_vocabulary(),
    }
    (root / "info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    contact_sheet(sheet_images, sheet_captions).save(root / "contact_sheet.png")
    if args.sr:
        contact_sheet(sr_tiles, sr_captions, tile=256).save(root / "sr_pairs_contact_sheet.png")


if __name__ == "__main__":
    sys.exit(main())
