"""Plot a metric against training budget from cdd-eval results (one sampling step count, several runs).

    python benchmarks/plot_budget.py --results docs/results/super-resolution/results.json --steps 4 \
        --series "codi-ft=0:finetune/prev,400:codi-ft,1000:codi-ft-1000" \
        --reference finetune/ddim/4 --reference finetune/ddim/50 --out docs/results/super-resolution/budget_swd.png

A series is LABEL=STEPS:METHOD[/SAMPLER],...: each point is the row of METHOD (and SAMPLER, when given)
at --steps sampling steps, placed at STEPS training steps. A reference METHOD/SAMPLER/STEPS is drawn as a
horizontal line. Only rows that cdd-eval measured are plotted; a missing one is an error, not a gap.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

from cdd.adapters.atomic import write_bytes
from cdd.training.evaluate import LABELS, LOWER_IS_BETTER, _colours


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
    p.add_argument("--steps", type=int, default=4, help="sampling steps of the rows to plot")
    p.add_argument("--metric", default="swd", choices=sorted(LABELS))
    p.add_argument("--series", action="append", required=True)
    p.add_argument("--reference", action="append", default=[], metavar="METHOD/SAMPLER/STEPS")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = json.loads(args.results.read_text())
    rows, metric = results["rows"], args.metric
    fig = Figure(figsize=(7.5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = _colours(len(args.series) + len(args.reference))
    for i, text in enumerate(args.series):
        label, points = parse_series(text)
        xy = sorted((n, find_row(rows, m, s, args.steps)[metric]) for n, m, s in points)
        ax.plot(*zip(*xy), marker="o", color=colours[i], label=f"{label} ({args.steps} steps)")
        for x, y in xy:
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize="x-small")
    for j, ref in enumerate(args.reference):
        method, sampler, steps = ref.split("/")
        y = find_row(rows, method, sampler, int(steps))[metric]
        ax.axhline(y, linestyle="--", color=colours[len(args.series) + j], label=f"{method} {sampler} {steps} ({y:.1f})")
    ax.set_xlabel("adapter training steps")
    ax.set_ylabel(f"{LABELS[metric]} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)")
    ax.set_title(f"{results['task']}: {LABELS[metric]} against training budget (N = {results['num_images']})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes(args.out, buf.getvalue())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
