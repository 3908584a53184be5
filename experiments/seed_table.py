# Experiment script. Produced every seeds.md (mean and spread over noise seeds) under docs/results/, e.g. Table 1's docs/results/super-resolution/seeds.md.
"""One table from several cdd-eval runs that differ only in their noise seed (--seed): for each row
(method, sampler, steps) the mean of every metric over the runs and its spread (max - min), so that a
difference between rows can be read against the noise-seed spread.

    python experiments/seed_table.py docs/results/super-resolution docs/results/super-resolution/seed{1000,2000} \
        [--metrics kid_attr,fid_attr,swd,psnr,ssim,attr_all] [--out table.md] \
        [--gap finetune/ddim/4:finetune/ddim/50 --gap-metrics kid_attr,swd] [--plot kid_attr.png --plot-metric kid_attr]

A metric may name a nested value with dots, e.g. `edit_kinds.color.psnr`: the whole-image PSNR of the colour
edits, from the per-kind block edit rows carry.

`--gap FROM:TO` adds, for each of `--gap-metrics`, the share of the gap between two rows' means that each row
closes: (FROM - row) / (FROM - TO), e.g. how much of the teacher's 4 -> 50 step gap a 4-step student closes
(1 = level with TO, 0 = level with FROM, negative = behind FROM).
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
                    value = lookup(r, m)
                    if value is not None:
                        table[key][m].append(float(value))
    return [run["seed"] for run in runs], table


def lookup(row: dict, metric: str):
    """row[metric], or for a dotted name the nested value (row["edit_kinds"]["color"]["psnr"]); None when absent."""
    value = row
    for part in metric.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def label(metric: str) -> str:
    return LABELS.get(metric, metric.removeprefix("edit_kinds."))


def parse_row(text: str) -> tuple[str, str, int]:
    """'finetune/ddim/4' -> ("finetune", "ddim", 4) (a method name may itself hold '/': the last two parts are
    the sampler and the steps)."""
    method, sampler, steps = text.rsplit("/", 2)
    return method, sampler, int(steps)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def means_and_bars(groups: list[list[float]]) -> tuple[list[float], list[list[float]]]:
    """Each group's mean and its distances down to the lowest and up to the highest value: matplotlib's
    (y, yerr) for a bar from min to max."""
    y = [mean(v) for v in groups]
    return y, [[m - min(v) for m, v in zip(y, groups)], [max(v) - m for m, v in zip(y, groups)]]


def gap_closed(table: dict, metric: str, start: tuple, end: tuple) -> dict[tuple, float | None]:
    """Per row: (mean at `start` - row's mean) / (mean at `start` - mean at `end`) for `metric`."""
    for row in (start, end):
        if row not in table or not table[row][metric]:
            raise SystemExit(f"--gap: row {'/'.join(map(str, row))} has no {metric} in every run")
    a, b = mean(table[start][metric]), mean(table[end][metric])
    if a == b:
        raise SystemExit(f"--gap: the two rows have the same mean {metric} ({a}); there is no gap")
    return {k: (a - mean(v[metric])) / (a - b) if v[metric] else None for k, v in table.items()}


def markdown(seeds: list[int], table: dict, metrics: list[str], gap: tuple | None = None,
             gap_metrics: list[str] = ()) -> str:
    closed = {m: gap_closed(table, m, *gap) for m in gap_metrics} if gap else {}
    head = ("| method | sampler | steps | " + " | ".join(f"{label(m)} (mean, spread)" for m in metrics)
            + "".join(f" | {label(m)}: gap closed" for m in closed) + " |")
    lines = [f"Noise seeds {', '.join(map(str, seeds))}; each cell: the mean over the seeds and (max - min)."
             + (f" Gap closed: the share of the gap from {'/'.join(map(str, gap[0]))} to {'/'.join(map(str, gap[1]))}"
                " that the row closes." if gap else ""), "",
             head, "|" + "---|" * (3 + len(metrics) + len(closed))]
    for (method, sampler, steps), values in table.items():
        cells = []
        for m in metrics:
            v = values[m]
            digits = 3 if m in ("kid_attr", "ssim", "attr_all") else 2
            cells.append(f"{mean(v):.{digits}f} ({max(v) - min(v):.{digits}f})" if v else "–")
        for m in closed:
            c = closed[m][(method, sampler, steps)]
            cells.append("–" if c is None else f"{c:.2f}")
        lines.append(f"| {method} | {sampler} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict, metric: str, out: Path, skip: tuple[str, ...] = ()) -> None:
    """`metric` against sampling steps, one line per (method, sampler), each point the mean over the runs with a bar
    from the lowest to the highest; rows without steps (bicubic, probes) and samplers in `skip` are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list] = {}
    for (method, sampler, steps), values in table.items():
        if steps and values[metric] and sampler not in skip:
            series.setdefault((method, sampler), []).append((steps, values[metric]))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for (method, sampler), points in series.items():
        points.sort()
        x = [k for k, _ in points]
        y, err = means_and_bars([v for _, v in points])
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{method} ({sampler})")
    ax.set_xscale("log")
    ticks: list[int] = []
    for k in sorted({k for pts in series.values() for k, _ in pts}):
        if not ticks or k >= ticks[-1] * 1.5:  # log axis: neighbours closer than that would print over each other
            ticks.append(k)
    ax.set_xticks(ticks)
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(f"{label(metric)} (mean, bar: min to max over the seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="cdd-eval output folders (each with a results.json)")
    p.add_argument("--metrics", default=DEFAULT_METRICS)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--gap", default=None, help="FROM:TO rows as METHOD/SAMPLER/STEPS, e.g. finetune/ddim/4:finetune/ddim/50")
    p.add_argument("--plot", type=Path, default=None, help="also plot --plot-metric against steps to this PNG")
    p.add_argument("--plot-metric", default="kid_attr")
    p.add_argument("--plot-skip", default="", help="samplers left out of the plot, e.g. prev+ilvr")
    p.add_argument("--gap-metrics", default="kid_attr", help="the metrics whose gap each row closes (default kid_attr)")
    args = p.parse_args()
    metrics = args.metrics.split(",")
    gap = tuple(parse_row(r) for r in args.gap.split(":")) if args.gap else None
    gap_metrics = args.gap_metrics.split(",") if gap else []
    missing = [m for m in gap_metrics if m not in metrics]
    if missing:
        raise SystemExit(f"--gap-metrics {','.join(missing)}: not among --metrics {args.metrics}")
    seeds, table = seed_rows(args.runs, metrics)
    text = markdown(seeds, table, metrics, gap, gap_metrics)
    if args.plot:
        if args.plot_metric not in metrics:
            raise SystemExit(f"--plot-metric {args.plot_metric}: not among --metrics {args.metrics}")
        plot(table, args.plot_metric, args.plot, tuple(filter(None, args.plot_skip.split(","))))
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
