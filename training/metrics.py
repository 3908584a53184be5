"""Quality metrics that need no downloaded weights.

- PSNR and SSIM (fidelity to the ground truth), on images in [0, 1].
- Sliced Wasserstein distance over Laplacian-pyramid patches (distribution distance), as in
  Karras et al., "Progressive Growing of GANs" (their `sliced_wasserstein.py`): at each pyramid
  level, random 7x7 patches are described by their normalised pixels and the SWD between the two
  sets of descriptors is estimated with random projections. Reported x 1e3 and averaged over levels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..adapters.fidelity import gaussian_blur, local_std, luminance  # noqa: F401 (also this module's API)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1], shape [B, C, H, W]."""
    mse = (pred.float() - target.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(pred: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004; Gaussian 11x11, sigma 1.5, K1 = 0.01, K2 = 0.03), images in [0, 1],
    averaged over channels and valid positions."""
    c1, c2 = 0.01**2, 0.03**2
    x, y = pred.float(), target.float()
    channels = x.shape[1]
    w = _gaussian_window(window, sigma).to(x.device)[None, None].expand(channels, 1, window, window)

    def blur(v):
        return F.conv2d(v, w, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16


def _pyr_down(x: torch.Tensor) -> torch.Tensor:
    k = (_BINOMIAL[:, None] * _BINOMIAL[None, :]).to(x)[None, None].expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=x.shape[1])[:, :, ::2, ::2]


def _pyr_up(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    up = torch.zeros(b, c, h * 2, w * 2, dtype=x.dtype, device=x.device)
    up[:, :, ::2, ::2] = x
    k = (_BINOMIAL[:, None] * _BINOMIAL[None, :] * 4).to(x)[None, None].expand(c, 1, 5, 5)
    return F.conv2d(F.pad(up, (2, 2, 2, 2), mode="reflect"), k, groups=c)


def laplacian_pyramid(x: torch.Tensor, min_size: int = 16) -> list[torch.Tensor]:
    """Band-pass levels from fine to coarse, ending with the low-pass image at >= min_size."""
    levels = []
    while x.shape[-1] > min_size:
        down = _pyr_down(x)
        levels.append(x - _pyr_up(down))
        x = down
    levels.append(x)
    return levels


def _patches(level: torch.Tensor, n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    b, c, h, w = level.shape
    idx = torch.randint(0, b, (n,), generator=generator)
    ys = torch.randint(0, h - size + 1, (n,), generator=generator)
    xs = torch.randint(0, w - size + 1, (n,), generator=generator)
    out = torch.stack([level[i, :, y : y + size, x : x + size] for i, y, x in zip(idx.tolist(), ys.tolist(), xs.tolist())])
    return out.reshape(n, -1)


def _normalise(desc: torch.Tensor, channels: int) -> torch.Tensor:
    d = desc.reshape(desc.shape[0], channels, -1)
    d = (d - d.mean(dim=(0, 2), keepdim=True)) / d.std(dim=(0, 2), keepdim=True).clamp_min(1e-8)
    return d.reshape(desc.shape[0], -1)


def _swd(a: torch.Tensor, b: torch.Tensor, directions: int, repeats: int, generator: torch.Generator) -> float:
    results = []
    for _ in range(repeats):
        dirs = torch.randn(a.shape[1], directions, generator=generator, dtype=torch.float64)
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        # each direction's projections sorted along a contiguous row: the same values as sorting the [N, D]
        # projections along dim 0, 4x faster on a CPU (a strided sort dominated cdd-eval's time)
        pa = torch.sort((a.double() @ dirs).T.contiguous(), dim=1).values
        pb = torch.sort((b.double() @ dirs).T.contiguous(), dim=1).values
        results.append((pa - pb).abs().mean().item())
    return sum(results) / len(results)


def sliced_wasserstein(
    images_a: torch.Tensor,
    images_b: torch.Tensor,
    patches_per_image: int = 128,
    patch_size: int = 7,
    directions: int = 512,
    repeats: int = 4,
    seed: int = 0,
) -> dict[str, float]:
    """SWD x 1e3 between two sets of images in [0, 1] ([N, 3, H, W], same N), per pyramid level and the mean.
    Descriptors are normalised per level and channel with each set's own statistics, as the reference does."""
    if images_a.shape[0] != images_b.shape[0]:
        raise ValueError(f"SWD needs sets of equal size, got {images_a.shape[0]} and {images_b.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    pa, pb = laplacian_pyramid(images_a.float()), laplacian_pyramid(images_b.float())
    out = {}
    n = images_a.shape[0] * patches_per_image
    for level, (la, lb) in enumerate(zip(pa, pb)):
        da = _normalise(_patches(la, n, patch_size, g), la.shape[1])
        db = _normalise(_patches(lb, n, patch_size, g), lb.shape[1])
        out[f"swd_{la.shape[-1]}"] = 1e3 * _swd(da, db, directions, repeats, g)
    out["swd"] = sum(out.values()) / len(out)
    return out


FLAT_STD = 0.02  # local std of the truth's luminance in [0, 1] below which a pixel is "flat"
FLAT_WINDOW = 7  # pixels: the window of that local std
FLAT_ERODE = 3  # pixels: the flat mask shrunk this far, so an edge's blur never counts as flat
HF_SIGMA = 1.0  # the Gaussian blur whose residual is the high-frequency part


def flat_mask(truth: torch.Tensor, threshold: float = FLAT_STD, window: int = FLAT_WINDOW,
              erode: int = FLAT_ERODE) -> torch.Tensor:
    """[B, 1, H, W] bool: where the truth is flat, its luminance's std over a `window` x `window` neighbourhood
    under `threshold`, the mask then eroded by `erode` pixels (a pixel stays flat only if all within `erode` are)."""
    flat = (local_std(luminance(truth), window) < threshold).float()
    if erode:
        flat = -F.max_pool2d(-F.pad(flat, (erode,) * 4, value=1.0), 2 * erode + 1, 1)
    return flat > 0.5


def flat_hf_energy(output: torch.Tensor, truth: torch.Tensor, *, threshold: float = FLAT_STD, window: int = FLAT_WINDOW,
                   erode: int = FLAT_ERODE, sigma: float = HF_SIGMA) -> torch.Tensor:
    """Invented detail on flat regions, per image ([B] float, x 1e4): the mean over the pixels where the TRUTH is flat
    (`flat_mask`) of the output's high-frequency energy, (Y - G_sigma * Y)^2 with Y its luminance in [0, 1] and
    G_sigma a Gaussian blur. Speckles, streaks or a tile's edge on a patch of sky score; detail where the truth has
    detail is not counted. NaN for an image with no flat pixel. The truth scored against itself is the floor (its
    own noise); bicubic, blurred, scores below the truth."""
    mask = flat_mask(truth, threshold, window, erode)
    y = luminance(output)
    energy = (y - gaussian_blur(y, sigma)).square()
    n = mask.flatten(1).sum(1)
    total = (energy * mask).flatten(1).sum(1)
    return torch.where(n > 0, total / n.clamp_min(1) * 1e4, torch.full_like(total, float("nan")))
