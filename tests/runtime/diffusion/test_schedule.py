import pytest
import torch

from cdd.runtime.diffusion.factory import scheduler_config
from cdd.runtime.diffusion.schedule import FINAL, NoiseSchedule


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_parametrisations_round_trip(prediction_type):
    """(x, eps) -> z_t -> the network's exact target -> to_x_eps gives back (x, eps)."""
    s = NoiseSchedule.from_scheduler_config(scheduler_config(prediction_type))
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    z_t = s.add_noise(x, eps, t)
    x_hat, eps_hat = s.to_x_eps(s.target(x, eps, t), z_t, t)
    torch.testing.assert_close(x_hat, x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-4, atol=1e-4)


def test_alphas_are_diffusers_alphas():
    from diffusers import DDIMScheduler

    cfg = scheduler_config()
    s = NoiseSchedule.from_scheduler_config(cfg)
    ref = DDIMScheduler.from_config(cfg)
    assert torch.equal(s.alphas_cumprod, ref.alphas_cumprod)
    alpha, sigma = s.alpha_sigma(torch.tensor([0, 999, FINAL]), torch.zeros(3, 1))
    assert alpha[0].item() == pytest.approx(ref.alphas_cumprod[0].sqrt().item(), rel=1e-6)
    assert alpha[2].item() == pytest.approx(float(ref.final_alpha_cumprod) ** 0.5, rel=1e-6)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(3, 1))


def test_trailing_timesteps_match_diffusers():
    from diffusers import DDIMScheduler

    s = NoiseSchedule.from_scheduler_config(scheduler_config())
    assert s.trailing_timesteps(4) == [999, 749, 499, 249]
    for k in (1, 2, 3, 4, 7):
        ref = DDIMScheduler.from_config(scheduler_config(), timestep_spacing="trailing")
        ref.set_timesteps(k)
        assert s.trailing_timesteps(k) == ref.timesteps.tolist()
    with pytest.raises(ValueError, match="steps must be"):
        s.trailing_timesteps(0)


def test_unknown_prediction_type_is_named():
    with pytest.raises(ValueError, match="flow"):
        NoiseSchedule.from_scheduler_config(scheduler_config(), prediction_type="flow")
