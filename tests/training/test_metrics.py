import math

import pytest
import torch

from cdd.training.metrics import laplacian_pyramid, psnr, sliced_wasserstein, ssim


def test_psnr_analytic():
    a = torch.zeros(2, 3, 8, 8)
    b = torch.full((2, 3, 8, 8), 0.1)
    assert psnr(a, b).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)  # mse 0.01 -> 20 dB


def test_ssim_identity_and_ordering():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    slight = (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    heavy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert (ssim(x, slight) > ssim(x, heavy)).all() and (ssim(x, heavy) < 0.9).all()


def test_laplacian_pyramid_reconstructs():
    from cdd.training.metrics import _pyr_up

    x = torch.rand(1, 3, 64, 64)
    levels = laplacian_pyramid(x, min_size=16)
    assert [lv.shape[-1] for lv in levels] == [64, 32, 16]
    rec = levels[-1]
    for band in reversed(levels[:-1]):
        rec = _pyr_up(rec) + band
    torch.testing.assert_close(rec, x, atol=1e-5, rtol=0)


def test_swd_small_for_same_distribution_large_for_different():
    g = torch.Generator().manual_seed(1)

    def blobs(n, sharp):
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
        c = torch.rand(n, 2, 1, 1, generator=g) - 0.5
        r = ((xx - c[:, :1]) ** 2 + (yy - c[:, 1:]) ** 2).sqrt()
        img = torch.sigmoid((0.3 - r) * sharp)
        return img.expand(n, 3, 32, 32).clone()

    same = sliced_wasserstein(blobs(64, 40), blobs(64, 40), patches_per_image=16)["swd"]
    diff = sliced_wasserstein(blobs(64, 40), blobs(64, 4), patches_per_image=16)["swd"]
    assert math.isfinite(same) and diff > 2 * same
    with pytest.raises(ValueError, match="equal size"):
        sliced_wasserstein(blobs(4, 40), blobs(5, 40))


def test_flat_hf_energy_counts_speckles_on_flat_truth_and_ignores_texture():
    """By hand: the truth is flat grey on the left half and noise on the right. An output with speckles on the flat
    half scores higher than the clean output; the same speckles on the textured half are not counted (the mask
    excludes it, eroded by FLAT_ERODE px from the boundary); the score is the masked mean of (Y - blur(Y))^2 x 1e4."""
    from cdd.training.metrics import FLAT_ERODE, FLAT_WINDOW, flat_hf_energy, flat_mask, gaussian_blur, luminance

    g = torch.Generator().manual_seed(0)
    truth = torch.full((1, 3, 48, 48), 0.5)
    truth[..., 24:] = torch.rand(1, 3, 48, 24, generator=g)
    mask = flat_mask(truth)
    assert mask[..., : 24 - FLAT_WINDOW // 2 - FLAT_ERODE].all() and not mask[..., 24 - FLAT_WINDOW // 2:].any()
    speckles = torch.zeros(1, 3, 48, 48)
    speckles[..., 4:44:5, 4:18:5] = 0.3  # on the flat half
    textured = torch.zeros(1, 3, 48, 48)
    textured[..., 4:44:5, 30:44:5] = 0.3  # on the noise
    clean = float(flat_hf_energy(truth, truth))
    assert clean < 1e-6
    assert float(flat_hf_energy(truth + speckles, truth)) > 10
    assert float(flat_hf_energy(truth + textured, truth)) == pytest.approx(clean, abs=1e-6)
    y = luminance(truth + speckles)
    hand = ((y - gaussian_blur(y, 1.0)) ** 2)[mask].mean() * 1e4
    assert float(flat_hf_energy(truth + speckles, truth)) == pytest.approx(float(hand), rel=1e-5)
    assert math.isnan(float(flat_hf_energy(truth, torch.rand(1, 3, 48, 48, generator=g))))  # no flat pixel
