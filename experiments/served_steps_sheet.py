# Experiment script. Produced docs/images/served_depth_steps.png (docs/results.md, "The distribution term on the guided depth student").
"""What a running `cdd-serve` answers for one image of the user's at 1, 2 and 4 steps (each at the entry's own w for
that step count), per prompt and with no prompt: one row per prompt, one column per step count.

    cdd-serve --port 8765 &
    python experiments/served_steps_sheet.py --url http://localhost:8765 --task depth --image docs/images/own_depth_map.png \
        --prompt "a yellow sphere and a green cube on a checkered floor at noon" --prompt "" --out sheet.png

The requests go over HTTP to the server as a user's would (seed 0, the `steps` form field only); an empty --prompt
is a request without one. A column `K@S` is K steps at `strength` S (super-resolution, edit: from the input):

    python experiments/served_steps_sheet.py --task super-resolution --image low.png --prompt "" --steps 4@1,1@0.5,1@0.25 --out sr.png
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from serve_default_zoo_sheet import save_sheet


def ask(url: str, task: str, image: bytes, **form: str) -> np.ndarray:
    r = httpx.post(f"{url}/v1/tasks/{task}", files={"image": ("in.png", image, "image/png")}, data=form, timeout=300)
    if r.status_code != 200:
        raise SystemExit(f"{task} {form}: HTTP {r.status_code}: {r.text}")
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://localhost:8765")
    p.add_argument("--task", default="depth")
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--prompt", action="append", required=True, help="one row each; '' for no prompt")
    p.add_argument("--steps", default="1,2,4", help="columns: K (K steps) or K@S (K steps at strength S)")
    p.add_argument("--seed", default="0")
    p.add_argument("--adapter", help="the zoo entry (default: the task's default adapter)")
    p.add_argument("--scale", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    image = a.image.read_bytes()
    source = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    steps = a.steps.split(",")
    rows = []
    for prompt in a.prompt:
        form = {"seed": a.seed, **({"prompt": prompt} if prompt else {}), **({"adapter": a.adapter} if a.adapter else {})}
        outs = [ask(a.url, a.task, image, steps=s.split("@")[0], **form,
                    **({"strength": s.split("@")[1]} if "@" in s else {})) for s in steps]
        size = outs[0].shape[:2]
        rows.append(np.concatenate([np.asarray(Image.fromarray(source).resize(size[::-1]))] + outs, axis=1))
    cell = rows[0].shape[0] * a.scale
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    sheet = grid.resize((grid.width * a.scale, grid.height * a.scale), Image.NEAREST)
    def title(s: str) -> str:
        k, _, strength = s.partition("@")
        from_input = strength and float(strength) < 1
        return f"{k} step{'s' if k != '1' else ''}" + (f" from the input, strength {strength}" if from_input else
                                                        " from noise" if strength else "")

    save_sheet(sheet, ["input"] + [title(s) for s in steps], cell,
               [pr or "(no prompt)" for pr in a.prompt], a.out)


if __name__ == "__main__":
    main()
