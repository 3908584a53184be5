"""Real-ESRGAN degradations: kernels against their formulas, ranges, shapes, determinism."""

import math

import numpy as np
import pytest
import torch

from cdd.training.data.degradations import (
    DEGRADATION_PRESETS, KERNEL_TYPES, DegradationConfig, degradation_preset, degrade, filter2d,
    gaussian_kernel, jpeg, make_sr_pair, random_kernel, sinc_kernel,
)


def _images(b=4, size=32, seed=0):
    """Smooth random images with edges, like renders."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")


@pytest.mark.parametrize("kind", KERNEL_TYPES)
@pytest.mark.parametrize("size", [7, 13])
def test_every_kernel_type_is_normalised(kind, size):
    cfg = DegradationConfig()
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        k = random_kernel(kind, size, g, cfg.blur_sigma, cfg.betag_range, cfg.betap_range)
        assert k.shape == (size, size)
        assert torch.all(k >= 0)
        assert abs(k.sum().item() - 1) < 1e-9
        # Every kernel is symmetric under a half turn (centred, even in x).
        assert torch.allclose(k, k.flip(0, 1), atol=1e-12)
        if kind.endswith("iso") and not kind.endswith("aniso"):
            assert torch.allclose(k, k.T, atol=1e-12)


@pytest.mark.parametrize("cutoff", [math.pi / 5, math.pi / 2, math.pi])
def test_sinc_kernel_is_normalised_and_padded(cutoff):
    k = sinc_kernel(cutoff, 9, pad_to=13)
    assert k.shape == (13, 13)
    assert abs(k.sum().item() - 1) < 1e-9
    assert k[0].abs().sum() == 0 and k[:, -1].abs().sum() == 0  # the padding


def test_gaussian_kernel_matches_reference():
    """Against the textbook formula, rotated by hand."""
    size, sx, sy, theta = 9, 2.0, 0.7, 0.4
    ax = np.arange(size) - size // 2
    xx, yy = np.meshgrid(ax, ax)
    # rotate coordinates into the kernel's principal axes
    u = np.cos(theta) * xx + np.sin(theta) * yy
    v = -np.sin(theta) * xx + np.cos(theta) * yy
    ref = np.exp(-0.5 * (u**2 / sx**2 + v**2 / sy**2))
    ref /= ref.sum()
    np.testing.assert_allclose(gaussian_kernel(size, sx, sy, theta).numpy(), ref, atol=1e-12)


def test_filter2d_identity_and_small_images():
    img = _images(1, 8)
    pulse = torch.zeros(13, 13, dtype=torch.float64)
    pulse[6, 6] = 1
    assert torch.allclose(filter2d(img, pulse), img, atol=1e-6)
    tiny = _images(1, 4)  # too small to reflect-pad a 13-tap kernel: replicate instead
    out = filter2d(tiny, gaussian_kernel(13, 3.0, 3.0, 0.0))
    assert out.shape == tiny.shape


def test_jpeg_round_trip():
    img = _images(1, 32)
    out = jpeg(img, 95)
    assert out.shape == img.shape and out.dtype == img.dtype
    assert (out - img).abs().mean() < 0.04  # 4:2:0 chroma subsampling blurs colour edges
    assert (jpeg(img, 30) - img).abs().mean() > (out - img).abs().mean()


def test_degrade_shapes_ranges_and_quantisation():
    hr = _images(6, 32)
    lr = degrade(hr, torch.Generator().manual_seed(0))
    assert lr.shape == (6, 3, 8, 8) and lr.dtype == torch.float32
    assert lr.min() >= 0 and lr.max() <= 1
    assert torch.allclose(lr * 255, (lr * 255).round(), atol=1e-4)  # 8-bit, as published


def test_degrade_is_deterministic_and_seed_dependent():
    hr = _images(3, 32)
    a = degrade(hr, torch.Generator().manual_seed(1))
    b = degrade(hr, torch.Generator().manual_seed(1))
    c = degrade(hr, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_degrade_batch_equals_one_by_one():
    hr = _images(3, 32)
    batch = degrade(hr, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    single = torch.cat([degrade(hr[i:i + 1], g) for i in range(3)])
    assert torch.equal(batch, single)


def test_many_draws_stay_in_range():
    """Exercise every branch (kernels, resize modes, noise kinds, final order)."""
    hr = _images(24, 64, seed=3)
    lr = degrade(hr, torch.Generator().manual_seed(9))
    assert lr.shape == (24, 3, 16, 16)
    assert 0 <= lr.min() and lr.max() <= 1
    # degraded, but still related to its source: closer to its own image than to others
    down = torch.nn.functional.interpolate(hr, size=(16, 16), mode="area")
    own = (lr - down).abs().mean(dim=(1, 2, 3))
    other = (lr - down.roll(1, 0)).abs().mean(dim=(1, 2, 3))
    assert (own < other).float().mean() > 0.7


def test_make_sr_pair():
    hr = _images(2, 32)
    pair = make_sr_pair(hr, torch.Generator().manual_seed(0))
    assert pair.lr.shape == (2, 3, 8, 8)
    assert pair.condition.shape == hr.shape
    assert 0 <= pair.condition.min() and pair.condition.max() <= 1
    assert torch.equal(pair.lr, degrade(hr, torch.Generator().manual_seed(0)))


def test_published_settings_and_validation():
    cfg = DegradationConfig()
    assert cfg.kernel_prob == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert (cfg.sinc_prob, cfg.blur_sigma, cfg.resize_prob, cfg.resize_range) == (0.1, (0.2, 3.0), (0.2, 0.7, 0.1), (0.15, 1.5))
    assert (cfg.second_blur_prob, cfg.blur_sigma2, cfg.resize_prob2, cfg.final_sinc_prob) == (0.8, (0.2, 1.5), (0.3, 0.4, 0.3), 0.8)
    assert cfg.noise_range == (1.0, 30.0) and cfg.noise_range2 == (1.0, 25.0) and cfg.jpeg_range2 == (30.0, 95.0)
    assert all(k % 2 == 1 for k in cfg.kernel_range)
    with pytest.raises(ValueError, match="kernel_prob"):
        DegradationConfig(kernel_prob=(0.5, 0.5, 0.1, 0, 0, 0))
    with pytest.raises(ValueError, match="kernel_range"):
        DegradationConfig(kernel_range=(7, 8))
    with pytest.raises(ValueError, match="noise_range"):
        DegradationConfig(noise_range=(30, 1))
    with pytest.raises(ValueError, match="divisible"):
        degrade(_images(1, 30), torch.Generator())


def test_presets_published_and_mild():
    assert set(DEGRADATION_PRESETS) == {"realesrgan", "mild-64px", "bicubic"}
    assert degradation_preset("realesrgan") == DegradationConfig()
    assert DegradationConfig().second_stage_prob == 1  # published: stage 2 always runs
    mild, pub = degradation_preset("mild-64px"), DegradationConfig()
    assert mild.scale == pub.scale and mild.kernel_list == pub.kernel_list and mild.kernel_prob == pub.kernel_prob
    assert mild.blur_sigma[1] <= 1.5 and mild.noise_range[1] <= 10 and mild.noise_range2[1] <= 10
    assert mild.jpeg_range[0] >= 60 and mild.jpeg_range2[0] >= 60
    assert mild.resize_range[0] * 64 >= 2 * 16  # stage 1 never below twice the 16 px result
    assert mild.second_stage_prob < 1 and mild.final_sinc_prob < pub.final_sinc_prob
    with pytest.raises(ValueError, match="unknown degradation preset 'harsh'.*realesrgan, mild-64px, bicubic"):
        degradation_preset("harsh")
    with pytest.raises(ValueError, match="second_stage_prob"):
        DegradationConfig(second_stage_prob=1.5)


def test_bicubic_preset_is_the_antialiased_down_scale_in_8_bits_and_draws_nothing():
    hr = _images(3, 32, seed=5)
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    lr = degrade(hr, g, degradation_preset("bicubic"))
    assert torch.equal(g.get_state(), state)  # no random draw: a photograph only made smaller
    by_hand = torch.nn.functional.interpolate(hr, size=(8, 8), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(lr, (by_hand * 255).round().clamp(0, 255) / 255)


def test_mild_preset_keeps_the_input_closer_to_its_source():
    """At 64 -> 16 px the mild preset's LR images are nearer the clean down-scale than the published ones."""
    hr = torch.nn.functional.interpolate(_images(12, 16, seed=4), size=(64, 64), mode="bilinear")
    down = torch.nn.functional.interpolate(hr, size=(16, 16), mode="area")
    err = {name: (degrade(hr, torch.Generator().manual_seed(2), degradation_preset(name)) - down).pow(2).mean()
           for name in DEGRADATION_PRESETS}
    assert err["mild-64px"] < 0.5 * err["realesrgan"]


def test_second_stage_prob_zero_skips_stage_two():
    """With stage 2 off, the image goes from stage 1 straight to the final resize: its size never strays."""
    cfg = DegradationConfig(second_stage_prob=0.0, final_sinc_prob=0.0)
    lr = degrade(_images(4, 32), torch.Generator().manual_seed(0), cfg)
    assert lr.shape == (4, 3, 8, 8)
    a = degrade(_images(4, 32), torch.Generator().manual_seed(0), cfg)
    assert torch.equal(lr, a)
