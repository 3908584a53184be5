# Experiment script. Produced the chosen-row sample grids, e.g. docs/results/super-resolution/grid_4_steps.png (docs/results.md, Table 1).
"""A sample grid of chosen rows of a cdd-eval results folder (its grid.png holds every row, which gets wide).

    python experiments/results_grid.py docs/results/super-resolution --name grid_4_steps.png \
        --rows codi/prev/4,finetune/ddim/4,finetune/ddim/200,cm/cm/4,gd/gd/4

Columns: condition, the rows in the order given, ground truth; the images are the ones cdd-eval saved.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cdd.training.eval_report import write_grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path, help="a cdd-eval --out folder (results.json and images/)")
    p.add_argument("--rows", required=True, help="METHOD/SAMPLER/STEPS,...")
    p.add_argument("--name", required=True, help="file name inside the folder, e.g. grid_4_steps.png")
    args = p.parse_args()
    if args.name == "grid.png":
        raise SystemExit("--name grid.png would replace cdd-eval's own grid of every row; choose another name")
    results = json.loads((args.folder / "results.json").read_text())
    index = {(r["method"], r["sampler"], str(r["steps"])): r for r in results["rows"]}
    wanted = [tuple(item.split("/")) for item in args.rows.split(",")]
    missing = [("/".join(w)) for w in wanted if w not in index]
    if missing:
        raise SystemExit(f"not in {args.folder / 'results.json'}: {', '.join(missing)}")
    print(write_grid(args.folder, {**results, "rows": [index[w] for w in wanted]}, name=args.name))


if __name__ == "__main__":
    main()
