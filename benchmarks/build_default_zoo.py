"""Build the embedded default zoo (adapters/embedded/zoo) from trained runs and their cdd-eval results.

    python benchmarks/build_default_zoo.py --entry super-resolution=runs/sr-controlnet-codi/entry \
        --entry depth=runs/depth-controlnet-codi-z/entry ... \
        --results docs/results/super-resolution/results.json --results docs/results/depth/results.json ...

For each NAME=ENTRY: the rows that cdd-eval measured for that entry (matched by its folder) become the
manifest's `metrics["cdd-eval"]`, the served default is the measured (sampler, steps) with the lowest
sliced Wasserstein distance among the samplers cdd-serve serves (ties: fewer steps), and the entry is installed as float16 under NAME
(`cdd.adapters.zoo.install_entry`). An entry without measured rows is refused: the zoo ships what
was measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cdd.adapters.zoo import default_zoo_dir, install_entry, write_metrics
from cdd.runtime.samplers import FEW_STEP_SAMPLERS
from cdd.training.eval_report import record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--entry", action="append", required=True, metavar="NAME=ENTRY")
    p.add_argument("--results", action="append", required=True, type=Path)
    p.add_argument("--zoo", type=Path, default=default_zoo_dir())
    args = p.parse_args()

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
        servable = [r for _, r, _ in rows if r["sampler"] in FEW_STEP_SAMPLERS]  # not NAME+ilvr: eval-only for now
        if not servable:
            raise SystemExit(f"{entry}: no measured row with a sampler cdd-serve serves ({', '.join(FEW_STEP_SAMPLERS)})")
        best = min(servable, key=lambda r: (r["swd"], r["steps"]))
        record(entry, header, [r for _, r, _ in rows])  # the same metrics["cdd-eval"] as `cdd-eval --record`
        write_metrics(entry, "default", {
            "sampler": best["sampler"], "steps": best["steps"], "results": str(src),
            "chosen_by": "lowest sliced Wasserstein distance among the measured rows (ties: fewer steps)",
        })
        dest = install_entry(entry, args.zoo, name=name, half=True, replace=True,
                             sampler=best["sampler"], steps=best["steps"])
        print(f"{name}: {best['sampler']} x {best['steps']} (SWD {best['swd']:.1f}, PSNR {best['psnr']:.2f}) -> {dest}")


if __name__ == "__main__":
    main()
