# Experiment script. Installed the super-resolution entry with its fidelity module into the embedded zoo (2026-12-06;
# again with `--sampler prev+ilvr-out` and the module trained on that sampler's outputs, 2026-12-06; the DMD adapter
# with the same module, served one step from the input, as `super-resolution-1step`, 2026-12-07).
"""Install a super-resolution entry that carries a fidelity module as the embedded zoo's `super-resolution` (or
`--name`), with the cdd-eval rows measured at the served weight as its manifest's metrics.

    python experiments/install_sr_fidelity.py --entry runs/fidelity/entry --results runs/fidelity/eval [--weight 1]
        [--sampler prev+ilvr-out]

`--results` holds `scenes-mild-64px/seed0`, `photos-mild-64px/seed0` and `photos-bicubic/seed0` (experiments/
sr_fidelity.sh eval): the rows of the entry at fidelity `--weight` become metrics["cdd-eval"] (scenes),
["cdd-eval-photos"] (photographs, mild-64px) and ["cdd-eval-photos-bicubic"]; the entry is installed as float16,
its served default steps unchanged and its sampler `--sampler` (default: unchanged); the rows recorded are the
served sampler's; the module's served weight must be `--weight` (the entry's own).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cdd.adapters.zoo import default_zoo_dir, install_entry, verify_entry, write_metrics
from cdd.training.eval_report import record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entry", type=Path, required=True)
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--zoo", type=Path, default=default_zoo_dir())
    p.add_argument("--name", default="super-resolution", help="the entry's name in the zoo (default super-resolution)")
    p.add_argument("--sampler", default=None, help="the served default sampler (default: the entry's)")
    p.add_argument("--steps", type=int, default=None, help="the served default steps (default: the entry's)")
    p.add_argument("--strength", type=float, default=None, help="the served default strength (default: the entry's)")
    p.add_argument("--chosen-by", default=None, help="where the rows that chose --steps / --strength are (docs/results.md)")
    args = p.parse_args()
    served = verify_entry(args.entry).fidelity
    if served is None or served["default"] != args.weight:
        raise SystemExit(f"{args.entry}: its fidelity module is served at {served and served['default']}, not --weight "
                         f"{args.weight} (cdd-train-fidelity --fidelity-default sets it)")
    dest = install_entry(args.entry, args.zoo, name=args.name, half=True, replace=True, sampler=args.sampler,
                         steps=args.steps, strength=args.strength)
    sampler = verify_entry(dest).sampler
    for folder, key in (("scenes-mild-64px", "cdd-eval"), ("photos-mild-64px", "cdd-eval-photos"),
                        ("photos-bicubic", "cdd-eval-photos-bicubic")):
        path = args.results / folder / "seed0" / "results.json"
        results = json.loads(path.read_text())
        rows = [r for r in results["rows"] if r.get("fidelity") == args.weight and r["sampler"] == sampler]
        if not rows:
            raise SystemExit(f"{path}: no rows of {sampler} at fidelity {args.weight}")
        record(dest, results, rows, key)
    manifest = json.loads((dest / "manifest.json").read_text())
    default = {**manifest["metrics"].get("default", {}), "fidelity": args.weight,
               "fidelity_chosen_by": "docs/results.md, super-resolution fidelity (2026-12-06)"}
    if args.sampler is not None:
        default.update(sampler=sampler, sampler_chosen_by="docs/results.md, ILVR on the output only (2026-12-06)")
    if args.steps is not None or args.strength is not None:
        m = verify_entry(dest)
        default.update(steps=m.steps, strength=m.strength, steps_chosen_by=args.chosen_by)
    write_metrics(dest, "default", default)
    print(f"installed {dest}")


if __name__ == "__main__":
    main()
