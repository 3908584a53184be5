"""One table from several cdd-eval runs that differ only in their noise seed (--seed): for each row
(method, sampler, steps) the mean of every metric over the runs and its spread (max - min), so that a
difference between rows can be read against the noise-seed spread.

    python benchmarks/seed_table.py docs/results/super-resolution-n64-codi-3000-fixed/seed{0,1000,2000} \
        [--metrics kid_attr,fid_attr,swd,psnr,ssim,attr_all] [--out table.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_METRICS = "kid_attr,fid_attr,swd,psnr,ssim,attr_all"
LABELS = {"kid_attr": "KID-attr", "fid_attr": "FID-attr", "swd": "SWD", "psnr": "PSNR", "ssim": "SSIM",
          "attr_all": "caption"}


def seed_rows(folders: list[Path], metrics: list[str]) -> tuple[list[int], dict[tuple, dict[str, list[float]]]]:
    """The runs' seeds and, per (method, sampler, steps) present in every run, each metric's values."""
    runs = [json.loads((f / "results.json").read_text()) for f in folders]
    keys = [{(r["method"], r["sampler"], r["steps"]) for r in run["rows"]} for run in runs]
    common = set.intersection(*keys)
    order = [k for k in ((r["method"], r["sampler"], r["steps"]) for r in runs[0]["rows"]) if k in common]
    table = {k: {m: [] for m in metrics} for k in order}
    for run in runs:
        for r in run["rows"]:
            key = (r["method"], r["sampler"], r["steps"])
            if key in table:
                for m in metrics:
                    if r.get(m) is not None:
                        table[key][m].append(float(r[m]))
    return [run["seed"] for run in runs], table


def markdown(seeds: list[int], table: dict, metrics: list[str]) -> str:
    head = "| method | sampler | steps | " + " | ".join(f"{LABELS.get(m, m)} (mean, spread)" for m in metrics) + " |"
    lines = [f"Noise seeds {', '.join(map(str, seeds))}; each cell: the mean over the seeds and (max - min).", "",
             head, "|" + "---|" * (3 + len(metrics))]
    for (method, sampler, steps), values in table.items():
        cells = []
        for m in metrics:
            v = values[m]
            digits = 3 if m in ("kid_attr", "ssim", "attr_all") else 2
            cells.append(f"{sum(v) / len(v):.{digits}f} ({max(v) - min(v):.{digits}f})" if v else "–")
        lines.append(f"| {method} | {sampler} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="cdd-eval output folders (each with a results.json)")
    p.add_argument("--metrics", default=DEFAULT_METRICS)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    metrics = args.metrics.split(",")
    text = markdown(*seed_rows(args.runs, metrics), metrics)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
