"""A small attribute classifier of the scenes world, and the distances on its features.

The network reads a 64 px image and predicts what a caption of the scenes world says: the floor
(plain, checkered, striped), the time of day (noon, sunset, night) and which of the 30 (colour, shape)
objects are in the scene. Objects are found densely: an 8x8 map of per-cell (colour, shape) logits,
trained on the renderer's object masks, whose maximum over the cells is the image's logit. A first
version that predicted the 30 presences from globally pooled features learned floor and time at once
but found objects badly (on 1000 held-out renders: recall 0.83 at precision 0.39 after 8 epochs of
20,000 renders); the object masks are the supervision the renderer gives for free. It is trained here, on renders of the world (`python -m cdd.training.attributes
train`), and its weights ship beside the embedded backbone (`adapters/embedded/attributes`, about 1 MB).

Two uses:
- caption following: `caption_agreement(net, images, captions)` scores generated images against the
  attributes their captions name (floor, time, objects);
- distribution distances that see structure, as FID on MNIST uses a LeNet: `frechet_distance` and
  `kernel_distance` (KID, the unbiased polynomial-kernel MMD^2) between the penultimate features of two
  image sets (`AttributeNet.features`). Noise, blur and wrong scene content all move these features.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters.atomic import write_text
from .data import scenes

SIZE = 64  # the classifier's input resolution; other sizes are resized to it
OBJECTS = [(c, s) for c in scenes.COLORS for s in scenes.SHAPES]  # 30 (colour, shape) pairs
FEATURES = 64  # the feature dimension FID and KID are computed on
CELLS = 8  # the object map's grid: CELLS x CELLS cells of SIZE / CELLS pixels
CELL_MIN_PIXELS = 3  # a cell holds an object when at least this many of its pixel centres show it
TRAIN_SEED, HELD_OUT_SEED = 7001, 7002  # scene streams; cdd-eval's held-out scenes use 20261125
WEIGHTS = "attributes.safetensors"
CONFIG = "config.json"


def default_dir() -> Path:
    """The shipped classifier: adapters/embedded/attributes."""
    return Path(__file__).resolve().parent.parent / "adapters" / "embedded" / "attributes"


# ---------------------------------------------------------------------------------------------
# Labels


def labels_of(floor: str, time_of_day: str, objects) -> dict[str, torch.Tensor]:
    present = torch.zeros(len(OBJECTS))
    for o in objects:
        present[OBJECTS.index(o)] = 1
    return {"floor": torch.tensor(scenes.FLOORS.index(floor)), "time": torch.tensor(scenes.TIMES.index(time_of_day)),
            "objects": present}


def labels_of_spec(spec: scenes.SceneSpec) -> dict[str, torch.Tensor]:
    return labels_of(spec.floor, spec.time, [(o.color, o.shape) for o in spec.objects])


_CAPTION = re.compile(r"^(?P<things>.+) on an? (?P<floor>\w+) floor at (?P<time>\w+)$")
_THING = re.compile(r"^an? (?P<color>\w+) (?P<shape>\w+)$")


def parse_caption(text: str) -> dict[str, torch.Tensor]:
    """The labels a scenes-world caption names ('a red sphere and a blue cube on a striped floor at night')."""
    m = _CAPTION.match(text.strip())
    floors = {word: floor for floor, word in scenes.FLOOR_WORDS.items()}
    if m is None or m["floor"] not in floors or m["time"] not in scenes.TIMES:
        raise ValueError(f"not a scenes-world caption: {text!r}")
    objects = []
    for thing in m["things"].split(" and "):
        t = _THING.match(thing)
        if t is None or (t["color"], t["shape"]) not in OBJECTS:
            raise ValueError(f"not a scenes-world object {thing!r} in caption {text!r}")
        objects.append((t["color"], t["shape"]))
    return labels_of(floors[m["floor"]], m["time"], objects)


def stack_labels(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def object_cells(spec: scenes.SceneSpec, ids: np.ndarray) -> torch.Tensor:
    """[30, CELLS, CELLS] 0/1: which (colour, shape) objects each cell shows, from the renderer's id map
    (object index per pixel centre; -1 floor, -2 sky)."""
    cell = ids.shape[0] // CELLS
    cells = torch.zeros(len(OBJECTS), CELLS, CELLS)
    for k, o in enumerate(spec.objects):
        counts = (ids == k).reshape(CELLS, cell, CELLS, cell).sum(axis=(1, 3))
        cells[OBJECTS.index((o.color, o.shape))] += torch.from_numpy(counts >= CELL_MIN_PIXELS).float()
    return cells.clamp_(max=1)


def render_set(n: int, seed: int, size: int = SIZE) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n renders of the world (scene k from the generator seeded [seed, k]) as uint8 [n, 3, size, size], and labels
    (with "cells", the object map of `object_cells`)."""
    images, labels = [], []
    for k in range(n):
        spec = scenes.sample_scene(np.random.default_rng([seed, k]))
        r = scenes.render(spec, size)
        images.append(torch.from_numpy((r.image * 255).round().astype(np.uint8)).permute(2, 0, 1))
        labels.append({**labels_of_spec(spec), "cells": object_cells(spec, r.ids)})
    return torch.stack(images), stack_labels(labels)


# ---------------------------------------------------------------------------------------------
# The network


class AttributeNet(nn.Module):
    """Four stride-2 conv blocks (32-64-128-128 channels, GroupNorm, SiLU), global average and max pooling
    (the max keeps small objects that the average washes out), a FEATURES-wide layer (the features FID and KID
    use) and the floor and time heads; the object map (`CELLS` x `CELLS` (colour, shape) logits) comes from the
    third block's output, and an object's image logit is its maximum over the cells."""

    def __init__(self, width: int = 32, features: int = FEATURES):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        blocks = []
        for a, b in zip(chans[:-1], chans[1:]):
            blocks += [nn.Conv2d(a, b, 3, padding=1), nn.GroupNorm(8, b), nn.SiLU(),
                       nn.Conv2d(b, b, 3, stride=2, padding=1), nn.GroupNorm(8, b), nn.SiLU()]
        self.body = nn.Sequential(*blocks[:18])  # three blocks: 8x8 cells at SIZE = 64
        self.top = nn.Sequential(*blocks[18:])
        self.embed = nn.Linear(2 * chans[-1], features)
        self.floor = nn.Linear(features, len(scenes.FLOORS))
        self.time = nn.Linear(features, len(scenes.TIMES))
        self.cells = nn.Sequential(nn.Conv2d(chans[3], chans[3], 3, padding=1), nn.SiLU(), nn.Conv2d(chans[3], len(OBJECTS), 1))
        self.config = {"width": width, "features": features, "cells": CELLS}

    def _trunk(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float()
        if x.shape[-2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        h3 = self.body(x * 2 - 1)
        h = self.top(h3)
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return F.silu(self.embed(h)), h3

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, FEATURES] for images in [0, 1] ([B, 3, H, W], resized to SIZE when H or W differ)."""
        return self._trunk(images)[0]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f, h3 = self._trunk(images)
        cells = self.cells(h3)
        return {"floor": self.floor(f), "time": self.time(f), "objects": cells.amax(dim=(2, 3)), "cells": cells}


CELL_POS_WEIGHT = 4.0  # an object covers a few of the 64 cells: weigh the cells that show one up


def loss_of(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy for floor and time; binary cross-entropy for the object map (dense, from the masks) and for
    the image-level presences (the cells' maximum, as the caption names them)."""
    pos_weight = torch.full((len(OBJECTS), 1, 1), CELL_POS_WEIGHT)
    return (F.cross_entropy(logits["floor"], labels["floor"]) + F.cross_entropy(logits["time"], labels["time"])
            + F.binary_cross_entropy_with_logits(logits["cells"], labels["cells"], pos_weight=pos_weight)
            + F.binary_cross_entropy_with_logits(logits["objects"], labels["objects"]))


@torch.no_grad()
def predict(net: AttributeNet, images: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
    """Predicted labels: floor and time indices, objects as 0/1 per (colour, shape)."""
    outs = [net(chunk) for chunk in images.split(batch)]
    logits = {k: torch.cat([o[k] for o in outs]) for k in ("floor", "time", "objects")}
    return {"floor": logits["floor"].argmax(1), "time": logits["time"].argmax(1),
            "objects": (logits["objects"] > 0).float()}


def agreement(pred: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """floor / time: accuracy; objects: the fraction of named objects found (recall), of found objects that are
    named (precision; 1 when none is found) and of images whose object set is exactly right; all: images with
    floor, time and object set all right."""
    floor = pred["floor"] == labels["floor"]
    time_ = pred["time"] == labels["time"]
    named, found = labels["objects"].sum(), pred["objects"].sum()
    hits = (pred["objects"] * labels["objects"]).sum()
    objects_exact = (pred["objects"] == labels["objects"]).all(1)
    return {"floor": float(floor.float().mean()), "time": float(time_.float().mean()),
            "objects_recall": float(hits / named), "objects_precision": float(hits / found) if found else 1.0,
            "objects_exact": float(objects_exact.float().mean()),
            "all": float((floor & time_ & objects_exact).float().mean())}


def caption_agreement(net: AttributeNet, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """How well images in [0, 1] show what their scenes-world captions say (see `agreement`)."""
    return agreement(predict(net, images), stack_labels([parse_caption(c) for c in captions]))


# ---------------------------------------------------------------------------------------------
# Distances on the features


@torch.no_grad()
def features(net: AttributeNet, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([net.features(chunk) for chunk in images.split(batch)]).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID's formula on two feature sets [N, D]: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(s_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross)


def kernel_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """KID (Binkowski et al., "Demystifying MMD GANs"): an unbiased MMD^2 estimate with the polynomial kernel
    k(x, y) = (x.y / D + 1)^3. For sets of equal size it is Gretton et al.'s U-statistic, which leaves out the
    pairs (x_i, y_i) from the cross term as well: cdd-eval's sets are paired (image i of both from the same
    condition), and a set against itself gives exactly 0. Unequal sizes: all cross pairs."""
    a, b = a.double(), b.double()
    d = a.shape[1]
    k_aa, k_bb, k_ab = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
    m, n = a.shape[0], b.shape[0]
    cross = (k_ab.sum() - k_ab.trace()) / (m * (m - 1)) if m == n else k_ab.mean()
    return float((k_aa.sum() - k_aa.trace()) / (m * (m - 1)) + (k_bb.sum() - k_bb.trace()) / (n * (n - 1)) - 2 * cross)


# ---------------------------------------------------------------------------------------------
# Training, saving, loading


def save(net: AttributeNet, folder: Path, info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # float16 on disk (1.2 MB, package data); loaded back to float32
    save_file({k: v.detach().half().contiguous() for k, v in net.state_dict().items()}, str(folder / WEIGHTS))
    write_text(folder / CONFIG, json.dumps({**net.config, **info}, indent=2) + "\n")


def load(folder: str | Path | None = None) -> AttributeNet:
    """The classifier in `folder` (default: the shipped one), in eval mode, on the CPU."""
    folder = Path(folder) if folder is not None else default_dir()
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"no attribute classifier in {folder}: train one with "
                                f"`python -m cdd.training.attributes train --out {folder}`")
    config = json.loads((folder / CONFIG).read_text())
    if config.get("cells") != CELLS:
        raise ValueError(f"the attribute classifier in {folder} predates the object map (its config has no cells: "
                         f"{CELLS}); train it again with `python -m cdd.training.attributes train --out {folder}`")
    net = AttributeNet(config["width"], config["features"])
    net.load_state_dict({k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()})
    return net.eval().requires_grad_(False)


def cached_render_set(n: int, seed: int, cache: Path | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """render_set, kept in `cache` (a folder) when given: renders are most of a training run's time on a CPU."""
    path = cache / f"scenes-{seed}-{n}-{SIZE}-cells{CELLS}.pt" if cache is not None else None
    if path is not None and path.is_file():
        saved = torch.load(path)
        return saved["images"], saved["labels"]
    images, labels = render_set(n, seed)
    if path is not None:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save({"images": images, "labels": labels}, path)
    return images, labels


def train(out: Path, n_train: int, n_held_out: int, epochs: int, batch: int = 64, lr: float = 1e-3,
          seed: int = 0, log=print, cache: Path | None = None) -> dict[str, float]:
    """Render the sets, train with AdamW (one-cycle lr), save the net and its held-out agreement to `out`."""
    torch.manual_seed(seed)
    t0 = time.time()
    x_train, y_train = cached_render_set(n_train, TRAIN_SEED, cache)
    x_val, y_val = cached_render_set(n_held_out, HELD_OUT_SEED, cache)
    log(f"rendered {n_train} + {n_held_out} scenes in {time.time() - t0:.0f} s")
    net = AttributeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(n_train / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(n_train, generator=g)
        total = 0.0
        for i in range(0, n_train, batch):
            idx = order[i : i + batch]
            images = x_train[idx].float() / 255
            flip = torch.rand(len(idx), 1, 1, 1, generator=g) < 0.5  # mirror: the image and its object map
            labels = {k: v[idx] for k, v in y_train.items()}
            images = torch.where(flip, images.flip(-1), images)
            labels["cells"] = torch.where(flip, labels["cells"].flip(-1), labels["cells"])
            loss = loss_of(net(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        net.eval()
        scores = agreement(predict(net, x_val.float() / 255), y_val)
        log(f"epoch {epoch + 1}/{epochs}: loss {total / n_train:.4f}; held-out " +
            ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) + f" ({time.time() - t0:.0f} s)")
    info = {"held_out": scores, "n_train": n_train, "n_held_out": n_held_out, "epochs": epochs,
            "train_seed": TRAIN_SEED, "held_out_seed": HELD_OUT_SEED, "size": SIZE}
    save(net, out, info)
    return scores


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cdd.training.attributes", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="render scenes, train the classifier, write it to --out")
    t.add_argument("--out", type=Path, default=default_dir())
    t.add_argument("--train", type=int, default=6000, help="training renders (default 6000)")
    t.add_argument("--held-out", type=int, default=1000, help="held-out renders (default 1000)")
    t.add_argument("--epochs", type=int, default=12)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--cache", type=Path, default=None, help="a folder to keep the rendered sets in, for reruns")
    e = sub.add_parser("eval", help="the classifier's agreement on N held-out renders")
    e.add_argument("--model", type=Path, default=default_dir())
    e.add_argument("--num-images", type=int, default=1000)
    args = p.parse_args(argv)
    if args.command == "train":
        scores = train(args.out, args.train, args.held_out, args.epochs, args.batch_size, args.lr, cache=args.cache)
        print(f"written to {args.out}: held-out {scores}")
        return 0
    net = load(args.model)
    x, y = render_set(args.num_images, HELD_OUT_SEED)
    print(json.dumps(agreement(predict(net, x.float() / 255), y), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
