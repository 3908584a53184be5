import pytest
import torch
from diffusers import DDIMScheduler

from cdd.runtime.diffusion.denoiser import ConditionedDenoiser
from cdd.runtime.diffusion.factory import make_backbone
from cdd.runtime.diffusion.samplers import (
    LowPass,
    few_step_sampler,
    ilvr,
    ilvr_output,
    initial_noise,
    sample_cm,
    sample_ddim,
    sample_prev,
    sample_with_scheduler,
    sampler_step,
    step_noise,
    split_sampler,
)
from cdd.runtime.diffusion.schedule import NoiseSchedule


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
    _assert_diffusers_steps(backbone, text, rec, ours, ref, ref.timesteps, z_T.clone())


def _assert_diffusers_steps(backbone, text, rec, ours, ref, timesteps, z):
    """diffusers' `ref` scheduler stepped over `timesteps` from z with the backbone's UNet: every step's input equals
    the one our sampler gave the model (`rec`), and the final sample equals ours."""
    for i, t in enumerate(timesteps):
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


def _block_means(x, f):
    """By hand: the mean of each f x f block (what area down-scaling by f gives)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // f, f, w // f, f).mean(dim=(3, 5))


def test_ilvr_low_pass_is_a_projection_onto_the_block_means():
    torch.manual_seed(0)
    low = LowPass(8, 12, 4)  # 2 x 3 blocks
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    torch.testing.assert_close(low(low(x)), low(x))  # a projection
    torch.testing.assert_close(_block_means(low(x), 4), _block_means(x, 4))  # keeps every block's mean
    small = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    up = torch.nn.functional.interpolate(small, size=(8, 12), mode="bicubic", align_corners=False)
    torch.testing.assert_close(low(up), up)  # the SR condition (bicubic from small) passes unchanged
    torch.testing.assert_close(low(torch.full_like(x, 0.3)), torch.full_like(x, 0.3))
    with pytest.raises(ValueError, match="divisible by the factor 4, got 8x10"):
        LowPass(8, 10, 4)
    assert split_sampler("prev+ilvr") == ("prev", "+ilvr") and split_sampler("cm") == ("cm", "")
    assert split_sampler("gd+ilvr-out") == ("gd", "+ilvr-out")
    assert split_sampler("gd+keep") == ("gd", "+keep")


def test_ilvr_replaces_the_low_frequencies_of_x_hat(pixel_backbone):
    schedule = pixel_backbone.schedule
    x_fixed, reference = torch.rand(1, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    model = ilvr(_analytic_model(schedule, x_fixed), reference, 4)
    z = torch.randn(2, 3, 8, 8)
    x_hat, eps_hat = model(z, torch.tensor([500, 500]))
    low = LowPass(8, 8, 4)
    torch.testing.assert_close(_block_means(x_hat, 4), _block_means(reference, 4))  # the input's low frequencies
    torch.testing.assert_close(x_hat - low(x_hat), (x_fixed - low(x_fixed)).expand_as(x_hat))  # x_hat's high ones
    torch.testing.assert_close(eps_hat, _analytic_model(schedule, x_fixed)(z, torch.tensor([500, 500]))[1])


@pytest.mark.parametrize("name", ["prev", "ddim", "cm", "gd"])
def test_ilvr_samples_keep_the_inputs_low_pass(pixel_backbone, name):
    """With a final alpha of 1 the last step returns x_hat itself: the sample's low-pass is the input's."""
    schedule = NoiseSchedule(pixel_backbone.schedule.alphas_cumprod, 1.0, "epsilon")
    x_fixed, reference = torch.rand(1, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    z_T = initial_noise([0, 1], (3, 8, 8))
    fresh = step_noise([0, 1], (3, 8, 8), 2)
    model = ilvr(_analytic_model(schedule, x_fixed), reference, 4)
    out = few_step_sampler(name)(model, z_T, schedule.trailing_timesteps(2), schedule, fresh_noise=fresh)
    low = LowPass(8, 8, 4)
    torch.testing.assert_close(low(out), low(reference), rtol=1e-4, atol=1e-4)
    plain = few_step_sampler(name)(_analytic_model(schedule, x_fixed), z_T, schedule.trailing_timesteps(2), schedule,
                                   fresh_noise=fresh)
    assert (low(plain) - low(reference)).abs().max() > 0.1


def test_ilvr_on_a_latent_backbone_decodes_replaces_and_encodes(latent_backbone):
    bb = latent_backbone
    reference = torch.rand(1, 3, 16, 16) * 2 - 1
    inner = ConditionedDenoiser(bb.unet, bb.schedule).bind(None, bb.encode_text([""]))
    model = ilvr(inner, reference, 4, to_pixels=bb.from_model_space, to_model=bb.to_model_space)
    z = initial_noise([3], (4, 8, 8))
    t = torch.tensor([499])
    with torch.no_grad():
        x_hat, eps_hat = model(z, t)
        plain_x, plain_eps = inner(z, t)
        pixels = bb.from_model_space(plain_x)
        low = LowPass(16, 16, 4)
        expected = bb.to_model_space(pixels - low(pixels) + low(reference))
    torch.testing.assert_close(x_hat, expected)
    torch.testing.assert_close(eps_hat, plain_eps)


def test_ilvr_output_sets_the_decoded_images_block_means_to_the_inputs():
    """The last ILVR update on a decoded output (a latent backbone's decode does not keep the per-step one):
    block means exactly the input's, everything above them kept; an output that has them already is unchanged."""
    images, reference = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    low = LowPass(16, 16, 4)
    out = ilvr_output(images, low(reference), low)
    torch.testing.assert_close(_block_means(out, 4), _block_means(reference, 4))
    torch.testing.assert_close(out - low(out), images - low(images))
    torch.testing.assert_close(ilvr_output(out, low(reference), low), out)


def test_keep_source_gives_back_the_round_trips_error_only_where_the_output_is_the_round_trip(pixel_backbone):
    """keep_source: x + g (source - D(E(source))), g = 1 where the output is within KEEP_GATE[0] of the round trip
    (mean over channels, [0, 1] units, 3 x 3 mean), 0 beyond KEEP_GATE[1], linear between."""
    from cdd.runtime.diffusion.samplers import KEEP_GATE, KEEP_GROW, keep_source, source_roundtrip

    g = torch.Generator().manual_seed(0)
    source = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    roundtrip = source + 0.1 * torch.randn(2, 3, 8, 8, generator=g)  # an autoencoder's error
    torch.testing.assert_close(keep_source(roundtrip, source, roundtrip), source)  # the output kept: the source back
    changed = roundtrip + 2 * (KEEP_GATE[1] + 0.01)  # beyond the gate everywhere (x 2: [-1, 1] units)
    torch.testing.assert_close(keep_source(changed, source, roundtrip), changed)  # an edited output is left alone
    middle = roundtrip + 2 * sum(KEEP_GATE) / 2  # half-way through the gate: half the error back
    torch.testing.assert_close(keep_source(middle, source, roundtrip), middle + 0.5 * (source - roundtrip))
    wide_source = torch.rand(2, 3, 8, 16, generator=g) * 2 - 1
    wide_roundtrip = wide_source + 0.1 * torch.randn(2, 3, 8, 16, generator=g)
    half = wide_roundtrip.clone()
    half[..., 8:] += 1.0  # the right half edited: beyond the 3 x 3 mean and KEEP_GROW px the source is back
    out = keep_source(half, wide_source, wide_roundtrip)
    torch.testing.assert_close(out[..., :8 - 2 - KEEP_GROW], wide_source[..., :8 - 2 - KEEP_GROW])
    assert (out[..., 8 - 2 - KEEP_GROW : 8] - wide_source[..., 8 - 2 - KEEP_GROW : 8]).abs().amax() > 0.05  # the grown rim
    torch.testing.assert_close(out[..., 8:], half[..., 8:])
    x = torch.rand(2, 3, 8, 8, generator=g)  # a pixel backbone: the round trip is the source, nothing changes
    torch.testing.assert_close(keep_source(x, source, source_roundtrip(source, pixel_backbone)), x)


def test_each_task_step_is_servable_for_its_own_task_only():
    from cdd.runtime.diffusion.samplers import servable_samplers, step_task

    assert "prev+ilvr" in servable_samplers("super-resolution") and "prev+keep" not in servable_samplers("super-resolution")
    assert "gd+keep" in servable_samplers("edit") and "prev+ilvr" not in servable_samplers("edit")
    assert servable_samplers("depth") == ("prev", "ddim", "cm", "gd")
    assert (step_task("cm+keep"), step_task("prev+ilvr"), step_task("prev")) == ("edit", "super-resolution", None)
    assert "prev+ilvr-out" in servable_samplers("super-resolution") and "prev+ilvr-out" not in servable_samplers("edit")
    assert step_task("ddim+ilvr-out") == "super-resolution"


def test_a_run_of_strength_s_covers_the_last_s_of_the_schedule():
    """trailing_timesteps(k, s): k trailing timesteps over the last round(s T) of them, the first always
    round(s T) - 1; s = 1 is the run from noise; more steps than the span covers, or s outside (0, 1], refused."""
    schedule = make_backbone("pixel", resolution=16, seed=0).schedule
    assert schedule.trailing_timesteps(4, 1.0) == schedule.trailing_timesteps(4) == [999, 749, 499, 249]
    assert schedule.trailing_timesteps(1, 0.5) == [499]
    assert schedule.trailing_timesteps(2, 0.5) == [499, 249]
    assert schedule.trailing_timesteps(1, 0.25) == [249]
    assert schedule.previous_timestep(499, 2, 500) == 249 and schedule.previous_timestep(249, 2, 500) == -1
    with pytest.raises(ValueError, match="steps must be in 1..2 at strength 0.002"):
        schedule.trailing_timesteps(3, 0.002)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="strength must be in"):
            schedule.trailing_timesteps(1, bad)


@pytest.mark.parametrize("k,strength", [(1, 0.5), (2, 0.5), (1, 0.25), (3, 0.75)])
def test_ddim_from_the_input_equals_diffusers_img2img_step_for_step(k, strength):
    """A run from the input (`start_from`, `z_start`) is diffusers' img2img: DDIMScheduler (trailing) set to the
    whole grid of k / strength steps, the image noised to the first kept timestep with scheduler.add_noise, then
    the kept steps. Our k counts the steps taken (diffusers' num_inference_steps counts the whole grid)."""
    from cdd.runtime.diffusion.samplers import start_from

    backbone = make_backbone("latent", resolution=16, seed=3)
    denoiser = ConditionedDenoiser(backbone.unet, backbone.schedule)
    text = backbone.encode_text(["a red sphere on a checkered floor"])
    z_T = initial_noise([7], (4, 8, 8))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = backbone.schedule.trailing_timesteps(k, strength)
    rec = Recorder(denoiser.bind(None, text))
    ours = sample_ddim(rec, z_T, timesteps, backbone.schedule, z_start=start_from(x, z_T, timesteps, backbone.schedule))

    ref = DDIMScheduler.from_config(backbone.scheduler_config, timestep_spacing="trailing")
    grid = round(k / strength)
    ref.set_timesteps(grid)
    kept = ref.timesteps[grid - int(grid * strength):]  # diffusers' get_timesteps for img2img
    assert [int(t) for t in kept] == timesteps
    _assert_diffusers_steps(backbone, text, rec, ours, ref, kept, ref.add_noise(x, z_T, kept[:1]))


def test_prev_from_the_input_by_hand(pixel_backbone):
    """Two `prev` steps at strength 0.5 from the input x, by hand: z_499 = alpha_499 x + sigma_499 z_T, the model
    at 499, z_249 = alpha_249 x_hat + sigma_249 z_T (z_T stays the noise direction), the final step; and
    `sampler_step` iterated gives the same."""
    from cdd.runtime.diffusion.samplers import start_from

    schedule = pixel_backbone.schedule
    x_fixed, x_input = torch.rand(1, 3, 4, 4), torch.rand(2, 3, 4, 4)
    z_T = initial_noise([1, 2], (3, 4, 4))
    timesteps = schedule.trailing_timesteps(2, 0.5)
    z_start = start_from(x_input, z_T, timesteps, schedule)
    a499, s499 = schedule.alpha_sigma(499, z_T)
    torch.testing.assert_close(z_start, a499 * x_input + s499 * z_T)
    rec = Recorder(_analytic_model(schedule, x_fixed))
    out = sample_prev(rec, z_T, timesteps, schedule, z_start=z_start)
    assert [c[1].tolist() for c in rec.calls] == [[499, 499], [249, 249]]
    torch.testing.assert_close(rec.calls[0][0], z_start)
    a249, s249 = schedule.alpha_sigma(249, z_T)
    torch.testing.assert_close(rec.calls[1][0], a249 * x_fixed + s249 * z_T)
    a_final, s_final = schedule.alpha_sigma(-1, z_T)
    torch.testing.assert_close(out, a_final * x_fixed + s_final * z_T)
    model, z = _analytic_model(schedule, x_fixed), z_start
    for i, t in enumerate(timesteps):
        x_hat, eps_hat = model(z, torch.full((2,), t))
        z = sampler_step("prev", i, timesteps, z, x_hat, eps_hat, schedule, z_T)
    torch.testing.assert_close(z, out)
