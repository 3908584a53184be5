import pytest
import torch
from diffusers import DDIMScheduler

from cdd.runtime.denoiser import ConditionedDenoiser
from cdd.runtime.factory import make_backbone
from cdd.runtime.samplers import (
    few_step_sampler,
    initial_noise,
    sample_cm,
    sample_ddim,
    sample_prev,
    sample_with_scheduler,
    sampler_step,
    step_noise,
)


class Recorder:
    """Wraps a sampler model and records the z_t it is called with."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, z_t, t):
        self.calls.append((z_t.clone(), t.clone()))
        return self.model(z_t, t)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_ddim_equals_diffusers_step_for_step(prediction_type, k):
    backbone = make_backbone("latent", resolution=16, prediction_type=prediction_type, seed=3)
    denoiser = ConditionedDenoiser(backbone.unet, backbone.schedule)
    text = backbone.encode_text(["a red sphere on a checkered floor"])
    z_T = initial_noise([7], (4, 8, 8))

    rec = Recorder(denoiser.bind(None, text))
    ours = sample_ddim(rec, z_T, backbone.schedule.trailing_timesteps(k), backbone.schedule)

    ref = DDIMScheduler.from_config(backbone.scheduler_config, timestep_spacing="trailing")
    ref.set_timesteps(k)
    z = z_T.clone()
    for i, t in enumerate(ref.timesteps):
        assert rec.calls[i][1].tolist() == [int(t)]
        assert _rel(rec.calls[i][0], z) < 1e-5, f"step {i} input differs"
        with torch.no_grad():
            out = backbone.unet(z, t, encoder_hidden_states=text).sample
        z = ref.step(out, t, z).prev_sample
    assert _rel(ours, z) < 1e-5


def _analytic_model(schedule, x_fixed):
    """A model whose x_hat is a fixed image: makes the sampler formulas checkable exactly."""

    def model(z_t, t):
        alpha, sigma = schedule.alpha_sigma(t, z_t)
        return x_fixed.expand_as(z_t), (z_t - alpha * x_fixed) / sigma

    return model


def test_prev_reuses_initial_noise(pixel_backbone):
    schedule = pixel_backbone.schedule
    x_fixed = torch.rand(1, 3, 4, 4)
    z_T = initial_noise([1, 2], (3, 4, 4))
    rec = Recorder(_analytic_model(schedule, x_fixed))
    out = sample_prev(rec, z_T, [999, 749, 499, 249], schedule)
    for (z_in, _), s in zip(rec.calls[1:], [749, 499, 249]):
        alpha_s, sigma_s = schedule.alpha_sigma(s, z_T)
        torch.testing.assert_close(z_in, alpha_s * x_fixed + sigma_s * z_T)
    alpha_0, sigma_0 = schedule.alpha_sigma(-1, z_T)
    torch.testing.assert_close(out, alpha_0 * x_fixed + sigma_0 * z_T)


def test_cm_applies_the_boundary_scalings_and_fresh_noise_each_step(pixel_backbone):
    schedule = pixel_backbone.schedule
    x_fixed = torch.rand(1, 3, 4, 4)
    z_T = initial_noise([5], (3, 4, 4))
    xi = step_noise([5], (3, 4, 4), 2)
    rec = Recorder(_analytic_model(schedule, x_fixed))
    out = sample_cm(rec, z_T, [999, 1], schedule, fresh_noise=xi)  # steps go t -> t - T // k: 999 -> 499, 1 -> final

    def f(z, t):  # c_skip z + c_out x_hat, on the integer timestep scaled by 10 (public CoDi / LCM code)
        u = 10.0 * t
        return 0.25 / (u**2 + 0.25) * z + u / (u**2 + 0.25) ** 0.5 * x_fixed

    alpha_s, sigma_s = schedule.alpha_sigma(499, z_T)
    z_1 = alpha_s * f(z_T, 999) + sigma_s * xi[0]
    torch.testing.assert_close(rec.calls[1][0], z_1)
    alpha_0, sigma_0 = schedule.alpha_sigma(-1, z_T)
    torch.testing.assert_close(out, alpha_0 * f(z_1, 1) + sigma_0 * xi[1])
    assert not torch.allclose(f(z_1, 1), x_fixed, atol=1e-4)  # at t = 1 c_skip (2.5e-3) still shows
    with pytest.raises(ValueError, match="fresh noise"):
        sample_cm(rec, z_T, [999, 499], schedule)


def test_step_noise_is_independent_of_every_initial_noise():
    seeds = list(range(8))
    z_T = initial_noise(seeds, (3, 4, 4))
    xi = step_noise(seeds, (3, 4, 4), 3)
    draws = torch.cat([z_T, *xi]).flatten(1)  # 32 rows that must all be different draws
    corr = torch.corrcoef(draws)
    assert (corr - torch.eye(len(draws))).abs().max() < 0.9  # no row repeats another (the old seed + 1 did)
    assert torch.equal(step_noise([3], (3, 4, 4), 3)[1][0], xi[1][3])  # a row's stream depends on its seed only


def test_seed_convention_matches_diffusers_randn():
    from diffusers.utils.torch_utils import randn_tensor

    ours = initial_noise([42], (4, 8, 8))
    ref = randn_tensor((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(42))
    assert torch.equal(ours, ref)
    batch = initial_noise([42, 43], (4, 8, 8))
    assert torch.equal(batch[:1], ref) and not torch.equal(batch[0], batch[1])


@pytest.mark.parametrize("name", ["ddim", "dpm-solver++"])
def test_teacher_samplers_converge_on_analytic_model(pixel_backbone, name):
    """With x_hat fixed the probability-flow ODE is solved exactly: eps = (z_T - alpha_T x) / sigma_T stays
    constant, DDIM lands on alpha_0 x + sigma_0 eps (its final alpha), DPM-Solver++ on x (final sigma 0)."""
    schedule = pixel_backbone.schedule
    x_fixed = torch.rand(1, 3, 4, 4) * 2 - 1
    z_T = initial_noise([0], (3, 4, 4))
    out = sample_with_scheduler(_analytic_model(schedule, x_fixed), z_T, 20, schedule, pixel_backbone.scheduler_config, name)
    alpha_T, sigma_T = schedule.alpha_sigma(999, z_T)
    alpha_0, sigma_0 = schedule.alpha_sigma(-1, z_T)
    expected = alpha_0 * x_fixed + sigma_0 * (z_T - alpha_T * x_fixed) / sigma_T if name == "ddim" else x_fixed
    torch.testing.assert_close(out, expected.expand_as(out), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown teacher sampler"):
        sample_with_scheduler(_analytic_model(schedule, x_fixed), z_T, 2, schedule, pixel_backbone.scheduler_config, "euler")


@pytest.mark.parametrize("name", ["ddim", "prev", "cm", "gd"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_sampler_step_one_at_a_time_equals_the_sampler(latent_backbone, name, k):
    """Step-level batching takes each request's steps one at a time (`sampler_step`), interleaved with other
    requests; the steps in a row give the sampler's own result exactly."""
    bb = latent_backbone
    schedule = bb.schedule
    denoiser = ConditionedDenoiser(bb.unet, schedule)
    model = denoiser.bind(None, bb.encode_text(["a red sphere", "night"]))
    z_T = initial_noise([7, 8], (4, 8, 8))
    fresh = step_noise([7, 8], (4, 8, 8), k)
    timesteps = schedule.trailing_timesteps(k)
    whole = few_step_sampler(name)(model, z_T, timesteps, schedule, fresh_noise=fresh)
    z = z_T
    for i, t in enumerate(timesteps):
        x_hat, eps_hat = model(z, torch.full((2,), t))
        z = sampler_step(name, i, timesteps, z, x_hat, eps_hat, schedule, z_T, fresh)
    assert torch.equal(z, whole)
