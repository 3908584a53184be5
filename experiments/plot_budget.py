# Experiment script. Produced the SWD-against-training-budget plot of the pixel backbone's history (docs/history.md).
"""Plot a metric against training budget from cdd-eval results (one sampling step count, several runs).

    python experiments/plot_budget.py --results docs/results/super-resolution/results.json --steps 1,2,4 \
        --series "codi-ft=0:finetune/prev,400:codi-ft,1000:codi-ft-1000" \
        --reference finetune/ddim/4 --reference finetune/ddim/50 --out docs/results/super-resolution/budget_swd.png

A series is LABEL=STEPS:METHOD[/SAMPLER],...: each point is the row of METHOD (and SAMPLER, when given)
at each of --steps sampling steps (one line each), placed at STEPS training steps. A reference METHOD/SAMPLER/STEPS is drawn as a
horizontal line. Only rows that cdd-eval measured are plotted; a missing one is an error, not a gap.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cdd.training.eval_report import LABELS, _colours, new_plot, save_plot


def find_row(rows: list[dict], method: str, sampler: str | None, steps: int) -> dict:
    hits = [r for r in rows if r["method"] == method and int(r["steps"]) == steps
            and (sampler is None or r["sampler"] == sampler)]
    if len(hits) != 1:
        what = f"{method}{'/' + sampler if sampler else ''} at {steps} steps"
        raise SystemExit(f"{len(hits)} rows match {what} (need exactly one; give the sampler to choose)")
    return hits[0]


def parse_series(text: str) -> tuple[str, list[tuple[int, str, str | None]]]:
    label, _, points = text.partition("=")
    if not points:
        raise SystemExit(f"--series {text!r}: expected LABEL=STEPS:METHOD[/SAMPLER],...")
    out = []
    for item in points.split(","):
        steps, _, ref = item.partition(":")
        method, _, sampler = ref.partition("/")
        out.append((int(steps), method, sampler or None))
    return label, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--steps", default="4", help="sampling steps of the rows to plot: one line per series and count, e.g. 1,2,4")
    p.add_argument("--metric", default="swd", choices=sorted(LABELS))
    p.add_argument("--series", action="append", required=True)
    p.add_argument("--reference", action="append", default=[], metavar="METHOD/SAMPLER/STEPS")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    results = json.loads(args.results.read_text())
    rows, metric = results["rows"], args.metric
    fig, ax = new_plot()
    counts = [int(k) for k in args.steps.split(",")]
    lines = [(parse_series(text), k) for text in args.series for k in counts]
    colours = _colours(len(lines) + len(args.reference))
    for i, ((label, points), k) in enumerate(lines):
        xy = sorted((n, find_row(rows, m, s, k)[metric]) for n, m, s in points)
        ax.plot(*zip(*xy), marker="os^D"[counts.index(k) % 4], color=colours[i], label=f"{label}, {k} step{'s' * (k > 1)}")
        for x, y in xy:
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize="x-small")
    for j, ref in enumerate(args.reference):
        method, sampler, steps = ref.split("/")
        y = find_row(rows, method, sampler, int(steps))[metric]
        ax.axhline(y, linestyle="--", color=colours[len(lines) + j], label=f"{method} {sampler} {steps} ({y:.1f})")
    save_plot(fig, ax, args.out, metric, "adapter training steps",
              f"{results['task']}: {LABELS[metric]} against training budget (N = {results['num_images']})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
