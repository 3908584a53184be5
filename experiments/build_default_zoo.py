# Experiment script. Produced the embedded default zoo, adapters/embedded/zoo (each manifest with its cdd-eval rows and served default).
"""Build the embedded default zoo (adapters/embedded/zoo) from trained runs and their cdd-eval results.

    python experiments/build_default_zoo.py --entry super-resolution=runs/zoo-v2/sr-codi/entry \
        --entry depth=runs/zoo-v2/depth-codi/entry ... \
        --results runs/zoo-v2/results/super-resolution-scenes/seed0/results.json \
        --results runs/zoo-v2/results/depth/seed0/results.json ...

For each NAME=ENTRY: the rows that cdd-eval measured for that entry (matched by its folder) become the
manifest's `metrics["cdd-eval"]` (rows of a second held-out set, e.g. super-resolution's photographs, under
`metrics["cdd-eval-photos"]`), the served default is the measured (sampler, steps) with the lowest
sliced Wasserstein distance among the samplers cdd-serve serves (ties: fewer steps), or the measured row
`--default NAME=SAMPLER:STEPS` names (e.g. super-resolution=prev+ilvr:4, chosen on held-out photos, which the
scenes table this script reads does not hold), and the entry is installed as float16 under NAME
(`cdd.adapters.zoo.install_entry`). An entry without measured rows is refused: the zoo ships what
was measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cdd.adapters.zoo import default_zoo_dir, install_entry, write_metrics
from cdd.runtime.diffusion.samplers import servable_samplers
from cdd.training.eval_report import record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--entry", action="append", required=True, metavar="NAME=ENTRY")
    p.add_argument("--results", action="append", required=True, type=Path)
    p.add_argument("--zoo", type=Path, default=default_zoo_dir())
    p.add_argument("--default", action="append", default=[], metavar="NAME=SAMPLER:STEPS",
                   help="serve NAME with this measured row instead of the lowest-SWD one")
    args = p.parse_args()
    chosen = {}
    for item in args.default:
        name, _, row = item.partition("=")
        sampler, _, steps = row.rpartition(":")
        if not (name and sampler and steps.isdigit()):
            raise SystemExit(f"--default {item!r}: expected NAME=SAMPLER:STEPS")
        chosen[name] = (sampler, int(steps))

    measured = []  # (results.json header, row)
    for path in args.results:
        data = json.loads(path.read_text())
        header = {k: v for k, v in data.items() if k != "rows"}
        measured += [(header, row, path) for row in data["rows"]]

    for item in args.entry:
        name, _, entry = item.partition("=")
        entry = Path(entry).resolve()
        rows = [(h, r, src) for h, r, src in measured
                if r.get("adapter") and Path(r["adapter"]).resolve() == entry]  # probe and bicubic rows have none
        if not rows:
            raise SystemExit(f"{entry}: no cdd-eval rows measure it in {', '.join(map(str, args.results))}")
        header, _, src = rows[0]
        # rows of another held-out set (super-resolution: the photographs) go under their own key
        others = [(h, r, s) for h, r, s in rows if h.get("dataset") != header.get("dataset")]
        rows = [(h, r, s) for h, r, s in rows if h.get("dataset") == header.get("dataset")]
        for dataset in dict.fromkeys(h.get("dataset") for h, _, _ in others):
            block = [(h, r) for h, r, _ in others if h.get("dataset") == dataset]
            record(entry, block[0][0], [r for _, r in block], key=f"cdd-eval-{dataset}")
        ok = servable_samplers(header["task"])
        servable = [r for _, r, _ in rows + others if r["sampler"] in ok]
        if not servable:
            raise SystemExit(f"{entry}: no measured row with a sampler cdd-serve serves ({', '.join(ok)})")
        if name in chosen:
            named = [r for r in servable if (r["sampler"], int(r["steps"])) == chosen[name]]
            if not named:
                raise SystemExit(f"--default {name}={chosen[name][0]}:{chosen[name][1]}: no such measured, servable row for "
                                 f"{entry}")
            best, why = named[0], "named on the command line (--default)"
        else:
            best = min([r for _, r, _ in rows if r["sampler"] in ok] or servable, key=lambda r: (r["swd"], r["steps"]))
            why = "lowest sliced Wasserstein distance among the measured rows (ties: fewer steps)"
        record(entry, header, [r for _, r, _ in rows])  # the same metrics["cdd-eval"] as `cdd-eval --record`
        write_metrics(entry, "default", {"sampler": best["sampler"], "steps": best["steps"], "results": str(src),
                                         "chosen_by": why})
        dest = install_entry(entry, args.zoo, name=name, half=True, replace=True,
                             sampler=best["sampler"], steps=best["steps"])
        print(f"{name}: {best['sampler']} x {best['steps']} (SWD {best['swd']:.1f}, PSNR {best['psnr']:.2f}) -> {dest}")


if __name__ == "__main__":
    main()
