"""A zero-terminal-SNR v-prediction latent backbone (the embedded latent default's schedule) through
every sampler and the CoDi objective: alpha_T = 0 must give finite results everywhere."""

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler

from cdd.runtime.diffusion.backbone import Backbone
from cdd.runtime.diffusion.denoiser import ConditionedDenoiser
from cdd.runtime.diffusion.factory import make_backbone
from cdd.runtime.diffusion.samplers import FEW_STEP_SAMPLERS, few_step_sampler, fresh_noise, initial_noise, sample_with_scheduler
from cdd.training.codi import CoDiLoss


@pytest.fixture(scope="module")
def zero_snr_backbone():
    bb = make_backbone("latent", resolution=16, prediction_type="v_prediction", seed=2)
    config = dict(DDIMScheduler.from_config(bb.scheduler_config, rescale_betas_zero_snr=True,
                                            timestep_spacing="trailing").config)
    return Backbone(unet=bb.unet, scheduler_config=config, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, vae=bb.vae)


@pytest.mark.parametrize("sampler", FEW_STEP_SAMPLERS)
@pytest.mark.parametrize("k", [1, 4])
def test_few_step_samplers_are_finite(zero_snr_backbone, sampler, k):
    bb = zero_snr_backbone
    assert bb.schedule.abar(torch.tensor([bb.schedule.trailing_timesteps(k)[0]])).item() == 0.0
    model = ConditionedDenoiser(bb.unet, bb.schedule).bind(None, bb.encode_text(["a red cube", "a photo"]))
    z_T = initial_noise([0, 1], (4, 8, 8))
    z = few_step_sampler(sampler)(model, z_T, bb.schedule.trailing_timesteps(k), bb.schedule,
                                  fresh_noise=fresh_noise(sampler, [0, 1], (4, 8, 8), k))
    assert torch.isfinite(z).all() and torch.isfinite(bb.from_model_space(z)).all()


@pytest.mark.parametrize("name", ["ddim", "dpm-solver++"])
def test_teacher_samplers_are_finite(zero_snr_backbone, name):
    bb = zero_snr_backbone
    model = ConditionedDenoiser(bb.unet, bb.schedule).bind(None, bb.encode_text(["a red cube"]))
    z = sample_with_scheduler(model, initial_noise([0], (4, 8, 8)), 5, bb.schedule, bb.scheduler_config, name)
    assert torch.isfinite(z).all()


def test_codi_loss_is_finite_at_t_999(zero_snr_backbone):
    bb = zero_snr_backbone
    denoiser = ConditionedDenoiser(bb.unet, bb.schedule)
    x = bb.to_model_space(torch.rand(2, 3, 16, 16) * 2 - 1)
    text = bb.encode_text(["a red cube", "a photo"])
    loss = CoDiLoss(bb.schedule, N=1)  # n = 1 of 1: t = 999, where alpha_t = 0
    terms = loss(denoiser, denoiser, None, x, None, text, torch.Generator().manual_seed(0))
    assert int(terms.t.max()) == 999 and torch.isfinite(terms.loss)
