# Experiment script. Produced docs/results/guided-uncond/against_w.png (docs/results.md, "The unconditional branch
# without the map"): each measure of a guidance-aware entry against its guidance weight w.
"""Each measure of a controlnet-guided entry's `cdd-eval --guidance` rows against w, one line per step count, the
mean over noise seeds with its min-max bar, from the same cdd-eval folders seed_table.py reads (rows labelled
'METHOD w=W'); an optional reference (e.g. the entry the guided one replaced) as a dashed line per step count,
or as a dashed curve against w where its rows are 'REFERENCE w=W' too.

    python experiments/plot_against_w.py docs/results/guided-uncond/depth-caption-ifempty6000/seed{0,1000,2000} \
        --method guided-ifempty-6000 --metrics attr_recall,depth_edge_match,kid_attr,swd --out against_w.png
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from seed_table import label, mean, means_and_bars, seed_rows  # noqa: E402 (experiments/ is the script's folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--method", required=True, help="the entry's method name (rows 'METHOD w=W')")
    p.add_argument("--metrics", default="attr_recall,depth_edge_match,kid_attr,swd")
    p.add_argument("--reference", nargs="*", type=Path, default=[], help="cdd-eval folders (one per seed) of a "
                   "reference entry, drawn as a dashed line per step count")
    p.add_argument("--reference-method", default=None, help="its method name")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    metrics = args.metrics.split(",")
    _, table = seed_rows(args.runs, metrics)
    pattern = re.compile(rf"^{re.escape(args.method)} w=([0-9.]+)$")
    lines: dict[int, list[tuple[float, dict]]] = {}
    for (method, _sampler, steps), values in table.items():
        m = pattern.match(method)
        if m:
            lines.setdefault(steps, []).append((float(m.group(1)), values))
    if not lines:
        raise SystemExit(f"no rows labelled '{args.method} w=W' in {args.runs[0]}")
    reference = seed_rows(args.reference, metrics)[1] if args.reference else {}
    ref_pattern = re.compile(rf"^{re.escape(args.reference_method)} w=([0-9.]+)$") if args.reference_method else None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.4))
    for ax, metric in zip(axes, metrics):
        for i, steps in enumerate(sorted(lines)):
            pts = sorted(lines[steps], key=lambda x: x[0])
            ws = [w for w, _ in pts]
            y, err = means_and_bars([v[metric] for _, v in pts])
            ax.errorbar(ws, y, yerr=err, marker="o", capsize=3, color=f"C{i}", label=f"{steps} steps")
            ref_curve = []  # a guided reference (rows 'REFERENCE w=W'): a dashed curve; else a dashed level
            for (method, _s, k), values in reference.items():
                if k != steps:
                    continue
                m = ref_pattern.match(method) if ref_pattern else None
                if m:
                    ref_curve.append((float(m.group(1)), mean(values[metric])))
                elif args.reference_method is None or method == args.reference_method:
                    ax.axhline(mean(values[metric]), color=f"C{i}", linestyle="--", linewidth=1)
            if ref_curve:
                ax.plot(*zip(*sorted(ref_curve)), color=f"C{i}", linestyle="--", linewidth=1, marker=".")
        ax.set_xlabel("guidance weight w")
        ax.set_title(label(metric))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if reference:
        fig.suptitle(f"{args.method}; dashed: {args.reference_method or 'reference'} at the same steps", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
