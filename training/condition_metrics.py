"""Does an adapter follow its condition? Measures for `cdd-eval` (training/evaluate.py) on the depth and edit tasks.

PSNR, SSIM and the distribution distances say how close an output is to its ground truth, not whether it
follows *its* condition: a model that draws a plausible scene of the world and ignores the depth map, or that
copies the edit's source unchanged, can still score a fair PSNR. These measures look at the condition itself.

Depth: structure follows the map (`depth_follow`).
    The output's edges are the Sobel gradient magnitude of each RGB channel, the largest of the three per pixel
    (`image_edges`); the map's edges are the depth discontinuities: |Laplacian| of the map (`depth_edges`),
    which is zero on every plane (inverse depth, what the condition holds, is affine in image coordinates on a
    plane, so the floor's steady gradient vanishes) and large where one surface occludes another. For N outputs
    and their N maps, C[i, j] is the Pearson correlation of output i's edges with map j's edges:
      depth_edge_corr   mean of C[i, i]: the output's edges against its own map's;
      depth_edge_other  mean of C[i, j], j != i: against the other maps of the set (what ignoring the map gives);
      depth_edge_match  the fraction of outputs whose own map correlates best, strictly, of all N (chance: 1/N).
    Chosen by measuring on the 64 held-out depth renders at 64 px (EVAL_SEED, evaluate.held_out): with these
    edges the renders themselves score corr 0.544, other 0.145, match 1.000 (64 other scenes against these maps:
    0.118, 0.118, 0.016); grayscale Sobel instead of the per-channel maximum gave match 0.875 (object and floor
    are often alike in luminance, not in colour); the map's Sobel magnitude instead of its Laplacian 0.984, with
    other 0.205 (the floor's gradient, the same in every map, raises every correlation; with grayscale output
    edges it fell to 0.703); Gaussian blur of both edge maps (sigma 0.5 / 1.0 px) 0.984 / 0.922. The measure is
    strict about position: the renders shifted by one pixel diagonally score corr 0.296, match 0.734, by two
    pixels 0.101, 0.016; blurred (4x area down, bilinear up) 0.403, 0.781.
    At lower resolution the renders separate less (match 0.953 at 32 px, 0.53 at 16 px): the ceiling row that
    cdd-eval writes beside the adapters' rows is what to read a row against.

Edit: change what the instruction names, keep the rest (`edit_follow`).
    The changed region of an item is where its source and target renders differ: any channel by more than
    EDIT_THRESHOLD (4/255) in 8 bits, dilated by EDIT_DILATE pixels (a 3x3 maximum), so that anti-aliased
    borders count as changed. psnr_in is the PSNR of the output against the target inside that region, psnr_out
    outside it; both per image, as `metrics.psnr` (MSE clamped at 1e-12, so identical pixels give 120 dB), then
    averaged over images, overall and per instruction kind (`edit_kinds`: colour, removal, floor, time of day),
    where `closer` is the share of images whose whole-image PSNR against the target beats the unedited input's
    (the per-image success rate a mean can hide).
    An image whose region holds fewer than MIN_REGION_FRACTION (2%) of its pixels adds nothing to that region's
    mean: a time-of-day edit relights the sky, the floor and every object, so its changed region is the whole
    picture (99.8-100% on the 64 held-out renders at 64 px) and it counts only in psnr_in, which is then its
    whole-image PSNR. With the unedited source as the output ("copy input": cdd-eval's reference row) psnr_in is
    how far the target is from its source and psnr_out is 120 dB where the renders are byte-identical outside
    the change (colour, removal); an edit is followed when psnr_in beats copy input's while psnr_out stays high.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.scenes import edit_kind

EDIT_THRESHOLD = 4 / 255  # a pixel is changed when a channel differs by more than this (8-bit images in [0, 1])
EDIT_DILATE = 1  # pixels the changed region grows by (a (2r+1) x (2r+1) maximum)
MIN_REGION_FRACTION = 0.02  # a region smaller than this share of the image is not scored
PSNR_MSE_FLOOR = 1e-12  # as metrics.psnr: identical pixels give 120 dB, not infinity

DEPTH_FIELDS = ("depth_edge_corr", "depth_edge_other", "depth_edge_match")
EDIT_FIELDS = ("psnr_in", "psnr_out")
# What the scenes-attribute classifier reads in an output against the caption of the scene it should show (depth: the
# prompt's caption; edit: the edited scene's): object recall and precision (colour and shape), floor and time of day.
CAPTION_FIELDS = ("attr_recall", "attr_precision", "attr_floor", "attr_time")
FIELDS = {"depth": DEPTH_FIELDS + CAPTION_FIELDS, "edit": EDIT_FIELDS + CAPTION_FIELDS}  # the table columns each task adds

_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
_LAPLACIAN = torch.tensor([[1.0, 1.0, 1.0], [1.0, -8.0, 1.0], [1.0, 1.0, 1.0]])


def _check_images(images: torch.Tensor, what: str) -> None:
    if images.dim() != 4:
        raise ValueError(f"{what} must be a batch [N, C, H, W], got shape {tuple(images.shape)}")


def _conv3x3(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Each channel of x [N, C, H, W] through each 3x3 kernel [K, 3, 3] -> [N, C, K, H, W] (replicate padding:
    the image border is no edge)."""
    n, c, h, w = x.shape
    k = kernels.to(x)[:, None]
    y = F.conv2d(F.pad(x.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate"), k)
    return y.reshape(n, c, k.shape[0], h, w)


def image_edges(images: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, 1, H, W]: per channel the Sobel gradient magnitude, the largest channel's per pixel
    (colour edges: a red sphere on a grey floor can be nearly invisible in grayscale)."""
    _check_images(images, "images")
    g = _conv3x3(images.float(), torch.stack([_SOBEL, _SOBEL.T]))
    return g.square().sum(2).sqrt().amax(1, keepdim=True)


def depth_edges(conditions: torch.Tensor) -> torch.Tensor:
    """Depth conditions [N, C, H, W] (inverse depth, near bright; channels alike) -> [N, 1, H, W] depth
    discontinuities: |3x3 Laplacian| of the channel mean, zero on planes, large where surfaces occlude."""
    _check_images(conditions, "depth conditions")
    return _conv3x3(conditions.float().mean(1, keepdim=True), _LAPLACIAN[None])[:, :, 0].abs()


def correlation_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, ...] and [M, ...] -> [N, M] Pearson correlations of the flattened maps (0 against a constant map)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (a @ b.T).float()


def edge_statistics(c: torch.Tensor) -> dict[str, float | None]:
    """The depth fields from a square correlation matrix C[i, j] (output i, map j); `other` and `match` are
    null for a single item (there is nothing to tell its map from)."""
    n = c.shape[0]
    if c.shape != (n, n) or n == 0:
        raise ValueError(f"expected a square, non-empty correlation matrix, got shape {tuple(c.shape)}")
    own = c.diagonal()
    if n == 1:
        return {"depth_edge_corr": float(own[0]), "depth_edge_other": None, "depth_edge_match": None}
    off = ~torch.eye(n, dtype=torch.bool)
    best_other = c.masked_fill(~off, float("-inf")).amax(1)
    return {"depth_edge_corr": float(own.mean()),
            "depth_edge_other": float(c[off].mean()),
            "depth_edge_match": float((own > best_other).float().mean())}  # strict: a flat output matches nothing


def depth_follow(images: torch.Tensor, conditions: torch.Tensor) -> dict[str, float | None]:
    """depth_edge_corr, depth_edge_other and depth_edge_match (module docstring) of outputs [N, 3, H, W] in
    [0, 1] against their depth conditions [N, C, H, W], item i's condition being output i's."""
    if images.shape[0] != conditions.shape[0] or images.shape[-2:] != conditions.shape[-2:]:
        raise ValueError(f"outputs {tuple(images.shape)} and depth conditions {tuple(conditions.shape)} differ in "
                         "number or size")
    return edge_statistics(correlation_matrix(image_edges(images), depth_edges(conditions)))


def changed_region(source: torch.Tensor, target: torch.Tensor, threshold: float = EDIT_THRESHOLD,
                   dilate: int = EDIT_DILATE) -> torch.Tensor:
    """Bool [N, 1, H, W]: where source and target [N, C, H, W] in [0, 1] differ in any channel by more than
    `threshold`, grown by `dilate` pixels."""
    if source.shape != target.shape:
        raise ValueError(f"edit sources {tuple(source.shape)} and targets {tuple(target.shape)} differ in shape")
    _check_images(source, "edit sources")
    changed = ((source.float() - target.float()).abs().amax(1, keepdim=True) > threshold).float()
    if dilate:
        changed = F.max_pool2d(changed, 2 * dilate + 1, stride=1, padding=dilate)
    return changed > 0


def region_psnr(images: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: (PSNR in dB over the pixels of `region` [N, 1, H, W], the region's share of the image)."""
    mask = region.float()
    pixels = mask.flatten(1).sum(1)
    se = ((images.float() - target.float()).square() * mask).flatten(1).sum(1)
    mse = se / (pixels * images.shape[1]).clamp_min(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(PSNR_MSE_FLOOR)), pixels / mask[0].numel()


def _mean_where(values: torch.Tensor, keep: torch.Tensor) -> float | None:
    return float(values[keep].mean()) if bool(keep.any()) else None


def edit_follow(images: torch.Tensor, source: torch.Tensor, target: torch.Tensor,
                instructions: list[str]) -> dict:
    """psnr_in, psnr_out and `edit_kinds` (module docstring) of outputs [N, 3, H, W] in [0, 1] against the
    edit targets, the changed regions taken from the (8-bit) sources and targets."""
    if not images.shape == source.shape == target.shape:
        raise ValueError(f"outputs {tuple(images.shape)}, edit sources {tuple(source.shape)} and targets "
                         f"{tuple(target.shape)} must have one shape")
    if len(instructions) != images.shape[0]:
        raise ValueError(f"{len(instructions)} instructions for {images.shape[0]} edit outputs")
    region = changed_region(source, target)
    p_in, f_in = region_psnr(images, target, region)
    p_out, f_out = region_psnr(images, target, ~region)
    everywhere = torch.ones_like(region)
    p_all, _ = region_psnr(images, target, everywhere)
    closer = p_all > region_psnr(source, target, everywhere)[0]  # per image: nearer the target than the unedited input
    ok_in, ok_out = f_in >= MIN_REGION_FRACTION, f_out >= MIN_REGION_FRACTION
    kinds = [edit_kind(t) for t in instructions]
    per_kind = {}
    for kind in sorted(set(kinds)):
        sel = torch.tensor([k == kind for k in kinds])
        per_kind[kind] = {"n": int(sel.sum()), "changed_fraction": float(f_in[sel].mean()),
                          "psnr_in": _mean_where(p_in, sel & ok_in), "psnr_out": _mean_where(p_out, sel & ok_out),
                          "psnr": float(p_all[sel].mean()), "closer": float(closer[sel].float().mean())}
    return {"psnr_in": _mean_where(p_in, ok_in), "psnr_out": _mean_where(p_out, ok_out), "edit_kinds": per_kind}


class ConditionMetrics:
    """The task's condition-following fields for each row's outputs, with the held-out set's conditions
    (evaluate.held_out: condition in [0, 1], target in [-1, 1], text) prepared once. Super-resolution: none."""

    def __init__(self, task: str, data: dict):
        self.task = task
        self.target = quantise(data["target"] * 0.5 + 0.5)
        if task == "depth":
            self.map_edges = depth_edges(data["condition"])
        elif task == "edit":
            self.source = quantise(data["condition"])
            self.instructions = list(data["text"])

    def references(self) -> dict[str, torch.Tensor]:
        """The reference sets cdd-eval scores as probe rows for this task: depth the ground-truth renders
        ("truth": the ceiling), edit the unedited sources ("copy input": what doing nothing scores)."""
        if self.task == "depth":
            return {"truth": self.target}
        if self.task == "edit":
            return {"copy input": self.source}
        return {}

    def __call__(self, images: torch.Tensor) -> dict:
        if self.task == "depth":
            return edge_statistics(correlation_matrix(image_edges(images), self.map_edges))
        if self.task == "edit":
            return edit_follow(images, self.source, self.target, self.instructions)
        return {}


def quantise(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> 8-bit levels in [0, 1], as cdd-eval measures every image (a PNG's values)."""
    return (images.clamp(0, 1) * 255).round() / 255


def notes(rows: list[dict], num_images: int) -> list[str]:
    """results.md lines that say what the condition-following columns of `rows` mean."""
    lines = []
    if any("depth_edge_corr" in r for r in rows):
        lines.append("- edges own / edges other / edge match (depth): the Pearson correlation of each output's edges "
                     "(per-channel Sobel magnitude, the largest channel) with its own depth map's discontinuities "
                     "(|Laplacian|), the mean correlation with the other maps of the set, and the fraction of outputs "
                     f"whose own map correlates best of all {num_images} (chance 1/{num_images}). The row 'probe: "
                     "truth' is the ground-truth renders: the ceiling at this resolution.")
    if any("psnr_in" in r for r in rows):
        lines.append(f"- PSNR in / PSNR out (edit): PSNR against the target inside the changed region (source and "
                     f"target differ by more than {EDIT_THRESHOLD * 255:.0f}/255, dilated {EDIT_DILATE} px) and "
                     f"outside it; regions under {MIN_REGION_FRACTION:.0%} of an image are not scored, so time-of-day "
                     "edits (the whole picture changes) count in PSNR in only. Per instruction kind in results.json "
                     "(`edit_kinds`). The row 'probe: copy input' is the unedited source: an edit is followed where "
                     "PSNR in beats it and PSNR out stays high.")
    return lines
