# Experiment script. Produced docs/images/guided_depth.png and docs/images/guided_edit.png (docs/results.md,
# "Guidance-aware CoDi"): what cdd-serve answers for unseen scenes at each guidance weight.
"""A contact sheet of what `cdd-serve` answers for a task, today's entry against a guidance-aware CoDi entry at
several w, on scenes drawn from a seed no training stream uses, through the HTTP API (the real app, in-process).

    python experiments/guided_sheet.py --task depth --served adapters/embedded/zoo/depth \
        --guided runs/guided/depth-gcodi2/entry --out docs/images/guided_depth.png

Per scene (one row), depth: the depth map, the render its caption describes, today's entry with the caption,
the guided entry at each --w with the caption, the guided entry with no prompt (at its default w); edit: the
source, the edited scene asked for, today's entry, the guided entry at each --w. Seed 0 for every request.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from cdd.adapters.zoo import install_entry
from cdd.runtime.serving.app import create_app
from cdd.runtime.serving.settings import ServeSettings
from cdd.training.data import scenes

from serve_default_zoo_sheet import ask, save_sheet, u8  # noqa: E402 (experiments/ is the script's folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("depth", "edit"), required=True)
    p.add_argument("--served", type=Path, required=True, help="today's entry")
    p.add_argument("--guided", type=Path, required=True, help="a controlnet-guided entry of the task")
    p.add_argument("--w", default="0,1,2,3")
    p.add_argument("--no-prompt-w", default=None, help="depth: the w of the no-prompt columns (default: one column "
                   "at the entry's default)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--scenes", type=int, default=6)
    p.add_argument("--seed", type=int, default=4242, help="scene seed (no training or evaluation stream uses it)")
    args = p.parse_args()
    ws = [float(w) for w in args.w.split(",")]
    empty_ws = [float(w) for w in args.no_prompt_w.split(",")] if args.no_prompt_w else [None]
    rng = np.random.default_rng(args.seed)
    rows, captions = [], []
    with tempfile.TemporaryDirectory() as zoo:
        for name, entry in (("a-served", args.served), ("b-guided", args.guided)):
            install_entry(entry, zoo, name=name)  # named apart: both may be the task's name
        with TestClient(create_app(ServeSettings(zoo=zoo))) as client:
            assert client.app.state.engine.wait_ready(300)
            names = {r.path.name: r.name for r in client.app.state.engine.pool.entries()}
            served, guided = names["a-served"], names["b-guided"]
            for _ in range(args.scenes):
                spec = scenes.sample_scene(rng)
                source = scenes.render(spec, 64)
                if args.task == "depth":
                    text = scenes.caption(spec)
                    cond = np.repeat(u8(scenes.depth_to_condition(source.depth))[..., None], 3, -1)
                    tiles = [cond, u8(source.image)]
                else:
                    edit = scenes.sample_edit(spec, rng)
                    text, cond = edit.instruction, u8(source.image)
                    tiles = [cond, u8(scenes.render(edit.spec, 64).image)]
                tiles.append(ask(client, args.task, cond, prompt=text, adapter=served))
                tiles += [ask(client, args.task, cond, prompt=text, adapter=guided, guidance=str(w)) for w in ws]
                if args.task == "depth":
                    tiles += [ask(client, args.task, cond, adapter=guided, **({} if w is None else {"guidance": str(w)}))
                              for w in empty_ws]
                rows.append(np.concatenate(tiles, axis=1))
                captions.append(text)
    first = ["depth map", "render"] if args.task == "depth" else ["source", "asked"]
    no_prompt = ["no prompt" if w is None else f"no prompt w={w:g}" for w in empty_ws]
    columns = first + ["today"] + [f"guided w={w:g}" for w in ws] + (no_prompt if args.task == "depth" else [])
    scale = 2
    sheet = np.concatenate(rows, axis=0)
    from PIL import Image

    sheet = Image.fromarray(sheet).resize((sheet.shape[1] * scale, sheet.shape[0] * scale), Image.NEAREST)
    save_sheet(sheet, columns, 64 * scale, captions, args.out)


if __name__ == "__main__":
    main()
