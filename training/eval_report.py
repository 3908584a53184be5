"""The rows cdd-eval measures and what it writes of them: results.md (the table and its notes),
plot_<metric>.png, grid.png, and the rows recorded in an entry's manifest. Split from training/evaluate.py,
which measures; everything here only formats rows that are already measured.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..adapters.atomic import write_bytes, write_text
from ..adapters.zoo import write_metrics
from ..runtime.diffusion import samplers
from .condition_metrics import FIELDS as CONDITION_FIELDS
from .condition_metrics import notes as condition_notes
from .sample_grid import _with_header, save_grid

EVAL_SEED = 20261125
GRID_EXAMPLES = 4
# The headline distance comes first: KID on the scenes-attribute classifier's features (docs/evaluation.md
# shows it ranks the probes right, where SWD prefers blur to grain).
METRICS = ("kid_attr", "fid_attr", "swd", "psnr", "ssim", "attr_all", "lpips", "fid", "seconds_per_image")
LOWER_IS_BETTER = {"kid_attr", "fid_attr", "swd", "lpips", "fid", "seconds_per_image"}
LABELS = {"psnr": "PSNR", "ssim": "SSIM", "swd": "SWD", "lpips": "LPIPS", "fid": "FID", "seconds_per_image": "s/image",
          "kid_attr": "KID-attr", "fid_attr": "FID-attr", "attr_all": "caption",
          "depth_edge_corr": "edges own", "depth_edge_other": "edges other", "depth_edge_match": "edge match",
          "psnr_in": "PSNR in", "psnr_out": "PSNR out", "attr_recall": "obj recall", "attr_precision": "obj precision",
          "attr_floor": "floor", "attr_time": "time", "flat_hf": "flat HF"}
FORMATS = {"psnr": ".2f", "ssim": ".4f", "swd": ".2f", "lpips": ".4f", "fid": ".2f", "seconds_per_image": ".4g",
           "kid_attr": ".4g", "fid_attr": ".4g", "attr_all": ".3f", "depth_edge_corr": ".3f", "depth_edge_other": ".3f",
           "depth_edge_match": ".3f", "psnr_in": ".2f", "psnr_out": ".2f", "attr_recall": ".3f", "attr_precision": ".3f",
           "attr_floor": ".3f", "attr_time": ".3f", "flat_hf": ".3g"}
# depth_edge_other: a reference level for the column beside it; flat_hf (super-resolution): invented detail where the
# truth is flat, read against the truth's own and bicubic's (the blur scores lowest, the truth is no zero either)
UNRANKED = {"depth_edge_other", "flat_hf"}
PROBE = "probe"  # the sampler of the probe rows (--probes, and depth / edit references): image sets, not generated
BICUBIC = "bicubic"  # the method of the --bicubic row (super-resolution): the condition itself, nothing sampled
NO_SAMPLER = "-"  # its sampler
TEXT_ONLY = "backbone (text only)"  # the method of the --text-only row: the backbone with no adapter, the prompt alone
SUPER_RESOLUTION = "super-resolution"
DATASETS = ("scenes", "photos")
PROMPTS = ("caption", "none")
PROBE_NOISE = 0.02  # sigma of the noisy probe, in [0, 1] image units
PROBE_BLUR = 4  # the blurred probe: the truth downsampled this much (area) and upsampled bilinearly
# Must match between runs merged by --append: otherwise their rows were measured on different things.
COMPARABLE = ("task", "num_images", "seed", "data_seed", "resolution", "backbone_fingerprint", "dataset", "degradation",
              "prompt")
# What a results.json written before a COMPARABLE field existed measured (degradation: for super-resolution only).
LEGACY = {"dataset": "scenes", "degradation": "realesrgan", "prompt": "caption"}
LPIPS_MIN_SIZE = 64  # AlexNet's strides leave nothing of a 16 px image


class EvalError(ValueError):
    """A bad command-line value, or entries that cannot be evaluated together."""




def row_key(row: dict) -> tuple[str, str, int]:
    return row["method"], row["sampler"], int(row["steps"])


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Old rows with the new ones replacing those of the same (method, sampler, steps), new ones appended."""
    fresh = {row_key(r): r for r in new}
    merged = [fresh.pop(row_key(r), r) for r in old]
    return merged + [r for r in new if row_key(r) in fresh]


def ordered(rows: list[dict]) -> list[dict]:
    """Grouped by method and sampler in order of first appearance, steps ascending."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    groups = list(dict.fromkeys((r["method"], r["sampler"]) for r in rows))
    return sorted(rows, key=lambda r: (methods.index(r["method"]), groups.index((r["method"], r["sampler"])), int(r["steps"])))


def image_name(row: dict) -> str:
    slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{row['method']}-{row['sampler']}-{row['steps']}")
    digest = hashlib.sha1(json.dumps(row_key(row)).encode()).hexdigest()[:8]
    return f"images/{slug}-{digest}.png"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[n, 3, H, W] in [0, 1] -> one column [n * H, W, 3] uint8."""
    n, _, h, w = images.shape
    return (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).reshape(n * h, w, 3).numpy()


def fmt(value, metric: str) -> str:
    return "–" if value is None else format(value, FORMATS[metric])


def row_metrics(rows: list[dict]) -> list[str]:
    """METRICS, with the condition-following fields (condition_metrics.FIELDS) any of the rows carries after the
    caption column: only depth and edit tables get them."""
    extra = list(dict.fromkeys(m for fields in CONDITION_FIELDS.values() for m in fields if any(m in r for r in rows)))
    at = METRICS.index("attr_all") + 1
    sr = ["flat_hf"] if any("flat_hf" in r for r in rows) else []  # super-resolution rows: after SSIM
    at_sr = METRICS.index("ssim") + 1
    return [*METRICS[:at_sr], *sr, *METRICS[at_sr:at], *extra, *METRICS[at:]]


def _arrow(metric: str) -> str:
    return "" if metric in UNRANKED else " ↓" if metric in LOWER_IS_BETTER else " ↑"


def table(rows: list[dict]) -> str:
    metrics = row_metrics(rows)
    head = ["method", "sampler", "steps"] + [f"{LABELS[m]}{_arrow(m)}" for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["sampler"], str(r["steps"])] + [fmt(r.get(m), m) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(results: dict) -> str:
    rows = results["rows"]
    devices = ", ".join(sorted({r.get("device", "?") for r in rows}))
    dataset, prompt = results.get("dataset", LEGACY["dataset"]), results.get("prompt", LEGACY["prompt"])
    held = ("patches of the held-out photographs (astronaut, chelsea, flower)" if dataset == "photos"
            else "held-out scenes (scenes world")
    degraded = (f"; inputs degraded with the {results.get('degradation') or LEGACY['degradation']} preset"
                if results["task"] == SUPER_RESOLUTION else "")
    prompts = ("the empty prompt (what the API sends when a user gives none)" if prompt == "none"
               else "each image's ground-truth caption")
    lines = [
        f"# cdd-eval: {results['task']}",
        "",
        f"{results['num_images']} {held}, data seed {results['data_seed']}, "
        f"{results['resolution']} px{degraded}), initial noise seeds {results['seed']}..{results['seed'] + results['num_images'] - 1}, "
        f"backbone {results['backbone_fingerprint'][:16]}...; images quantised to 8 bits before measuring.",
        "",
        f"Prompt: {prompt} ({prompts}).",
        "",
        table(rows),
        "Notes:",
        "",
        f"- s/image: wall clock of sampling only (sampler steps and decoding; text embeddings precomputed) divided by "
        f"the number of images, on {devices}"
        + (" (this machine's CPU time: compare rows measured in the same run, never with GPU numbers)." if "cpu" in devices else "."),
        "- SWD: sliced Wasserstein distance x 1e3 over Laplacian-pyramid patches, generated set vs ground-truth set"
        + (f". For scale: the ground truth against itself gives {results['swd_truth_vs_itself']:.1f} (patches are "
           f"drawn at random: the estimator's floor), {results['num_images']} other scenes of the world vs the ground truth: "
           + ", ".join(f"{v:.1f}" for v in results["swd_other_scenes"])
           + f" ({len(results['swd_other_scenes'])} sets: how far the number moves with which scenes are drawn)."
           if results.get("swd_other_scenes") else "."),
        f"- grid.png: the first {min(GRID_EXAMPLES, results['num_images'])} examples; columns: condition, "
        + ", ".join(f"{r['method']} {r['sampler']} {r['steps']}" for r in rows) + ", target (the ground truth).",
    ]
    if any("flat_hf" in r for r in rows):
        truth_hf = results.get("flat_hf_truth")
        lines.append("- flat HF (super-resolution): invented detail, the mean over pixels where the ground truth is flat "
                     "(luminance std under 0.02 in 7x7, eroded 3 px) of the output's high-frequency energy (luminance minus "
                     "its Gaussian blur, sigma 1, squared) x 1e4 (training/metrics.py flat_hf_energy); the ground truth's "
                     "own: " + ("–" if truth_hf is None else f"{truth_hf:.3g}") + ". Read it against that and the "
                     "bicubic row: above both is speckle or streaks on flat patches; bicubic, a blur, scores lowest.")
    if any(r.get("kid_attr") is not None for r in rows):
        lines.append("- KID-attr (the headline distance) and FID-attr: KID and FID between the generated and the "
                     "ground-truth set on the 64 features of the scenes-attribute classifier (training/attributes.py); "
                     "caption: the fraction of images whose floor, time of day and object set, as that classifier reads "
                     "them, all match the caption. SWD per pyramid level is in results.json (`swd_levels`).")
    if any(r.get("kid_attr") is None for r in rows):
        why = results.get("notes", {}).get("attributes", "unavailable when those rows were measured")
        lines.append(f"- KID-attr, FID-attr and caption are empty in some rows: {why}.")
    if any(r["method"] in (f"{PROBE}: other scenes", f"{PROBE}: other photo patches") for r in rows):  # --probes
        others = "patches of the held-out photographs" if dataset == "photos" else "scenes of the world"
        lines.append(f"- probe rows: reference sets, not generated: the ground truth itself, with Gaussian noise of sigma "
                     f"{PROBE_NOISE} (in [0, 1] units), blurred ({PROBE_BLUR}x area downsampling, bilinear upsampling), and "
                     f"{results['num_images']} other {others} (data seed {EVAL_SEED + 1}).")
    lines += condition_notes(rows, results["num_images"])
    if any(r["method"] == TEXT_ONLY for r in rows):
        lines.append(f"- {TEXT_ONLY}: the backbone with no adapter, sampled from the prompt alone (the condition image "
                     "unused): what an adapter's condition has to add.")
    if any(r["method"] == BICUBIC for r in rows):
        lines.append("- bicubic: the low-resolution input upsampled bicubically (the condition every SR adapter is given), "
                     "nothing sampled: the row a super-resolution method has to beat.")
    if any(samplers.split_sampler(r["sampler"])[1] == samplers.ILVR for r in rows):
        lines.append("- NAME+ilvr samplers: NAME with the ILVR step, each x_hat's low frequencies (block means at the SR "
                     "factor) replaced by the input's before the next noise is added.")
    if any(samplers.split_sampler(r["sampler"])[1] == samplers.ILVR_OUT for r in rows):
        lines.append("- NAME+ilvr-out samplers: NAME, then ILVR's update on the decoded output only (its block means at "
                     "the SR factor set to the input's); no correction between steps.")
    if any(samplers.split_sampler(r["sampler"])[1] == samplers.KEEP for r in rows):
        lines.append("- NAME+keep samplers: NAME, then the autoencoder's error on the source added back to the decoded "
                     "output where it is still the source's round trip (samplers.keep_source).")
    for metric in ("lpips", "fid"):
        if any(r.get(metric) is None for r in rows):
            why = results.get("notes", {}).get(metric, "unavailable when those rows were measured")
            lines.append(f"- {LABELS[metric]} is empty (null in results.json): {why}. cdd-eval downloads nothing: "
                         "install what is missing and put the weight file at that path to get it.")
    if any(r.get("lpips") is not None for r in rows):
        lines.append(f"- LPIPS (AlexNet) on images upsampled to at least {LPIPS_MIN_SIZE} px.")
    if any(r.get("fid") is not None for r in rows):
        lines.append(f"- FID between {results['num_images']} generated and {results['num_images']} ground-truth "
                     "images: strongly biased at small N, compare rows only.")
    return "\n".join(lines) + "\n"


def _colours(n: int) -> list:
    """One distinct colour per line: tab10 up to 10 lines, tab20 beyond (the default cycle repeats after 10)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def new_plot():
    """A figure and its axes for one metric plot (matplotlib's object API: no global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.5), dpi=100)  # wide: the legend sits right of the axes
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def save_plot(fig, ax, path: Path, metric: str, xlabel: str, title: str) -> None:
    """Label the axes (the y label says which way is better), put the legend outside, write the PNG atomically."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{LABELS[metric]} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes(path, buf.getvalue())


def write_plots(out: Path, results: dict) -> list[Path]:
    """plot_<metric>.png: the metric against steps (log axis), one line per (method, sampler)."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    references = [r for r in results["rows"] if r["sampler"] == NO_SAMPLER]  # bicubic: one number, a horizontal line
    rows, written = [r for r in results["rows"] if r["sampler"] not in (PROBE, NO_SAMPLER)], []
    groups = list(dict.fromkeys((r["method"], r["sampler"]) for r in rows))
    all_steps = sorted({int(r["steps"]) for r in rows})
    for metric in (m for m in row_metrics(rows) if m not in UNRANKED):
        path = out / f"plot_{metric}.png"
        if all(r.get(metric) is None for r in rows):
            path.unlink(missing_ok=True)  # a stale plot from another machine would contradict the table
            continue
        fig, ax = new_plot()
        colours = _colours(len(groups))
        for i, (method, sampler) in enumerate(groups):
            pts = sorted((int(r["steps"]), r[metric]) for r in rows
                         if (r["method"], r["sampler"]) == (method, sampler) and r.get(metric) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="os^D"[i // 10 % 4], color=colours[i], label=f"{method} ({sampler})")
        for r in references:
            if r.get(metric) is not None and metric != "seconds_per_image":
                ax.axhline(r[metric], color="grey", linestyle="--", label=r["method"])
        ax.set_xscale("log")
        ax.set_xticks(all_steps)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        save_plot(fig, ax, path, metric, "sampling steps", f"{results['task']}: {LABELS[metric]}")
        written.append(path)
    return written


def write_grid(out: Path, results: dict, name: str = "grid.png") -> Path:
    """grid.png: condition | one column per row (method, sampler, steps) | ground truth."""
    columns = [np.asarray(Image.open(out / "images" / "condition.png").convert("RGB"))]
    labels = ["condition"]
    rows = results["rows"]
    short = [_column_label(row, results["resolution"]) for row in rows]
    for row, label in zip(rows, short):
        columns.append(np.asarray(Image.open(out / row["image"]).convert("RGB")))
        labels.append(label if short.count(label) == 1 else _column_label(row, results["resolution"], keep_tail=True))
    columns.append(np.asarray(Image.open(out / "images" / "target.png").convert("RGB")))
    labels.append("target")
    if len({c.shape for c in columns}) != 1:
        raise EvalError(f"the images under {out / 'images'} differ in size; rerun without --append")
    return save_grid(out / name, _with_header(np.concatenate(columns, axis=1), results["resolution"], labels))


def _column_label(row: dict, width: int, keep_tail: bool = False) -> str:
    """`method sampler steps`, the method shortened until the label fits its column (results.md has them whole);
    with `keep_tail`, shortened in its middle, keeping its last three characters, so that labels that would
    otherwise read the same ("codi-long" and "codi-long-w" -> "codi-l.") stay apart."""
    sampler = {"dpm-solver++": "dpm++"}.get(row["sampler"], row["sampler"])
    draw, method, rest = ImageDraw.Draw(Image.new("RGB", (1, 1))), row["method"], f"{sampler} {row['steps']}"
    if row["sampler"] == PROBE:  # "probe: truth + noise 0.02" -> "truth + noise 0.02"
        method, rest = row["method"].removeprefix(f"{PROBE}: "), ""
    elif row["sampler"] == NO_SAMPLER:  # bicubic: no sampler, no steps
        rest = ""
    label = f"{method} {rest}".strip()
    head, tail = (method[:-3], method[-3:]) if keep_tail else (method, "")
    while draw.textlength(label) > width - 4 and len(head) > 1:
        head = head[:-1]
        label = f"{head}.{tail} {rest}".strip()
    return label


def write_outputs(out: Path, results: dict) -> None:
    write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_text(out / "results.md", results_markdown(results))
    write_plots(out, results)
    write_grid(out, results)


def record(entry: Path, results: dict, rows: list[dict], key: str = "cdd-eval") -> None:
    """Put this run's rows for the entry under `metrics[key]` of its manifest (the weight files, and so
    the hashes the entry is verified by, are untouched)."""
    write_metrics(entry, key, {
        **{k: results[k] for k in ("task", "num_images", "seed", "data_seed", "resolution", "dataset", "degradation",
                                   "prompt")},
        "rows": [{k: r[k] for k in ("method", "sampler", "steps", "guidance", "fidelity", "strength", *row_metrics([r]),
                                    "swd_levels", "edit_kinds", "device")
                  if k in r} for r in rows],
    })
