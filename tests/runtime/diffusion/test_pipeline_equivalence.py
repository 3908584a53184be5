"""A full 4-step `ddim` run of an exported ControlNet adapter equals diffusers'
StableDiffusionControlNetPipeline with DDIMScheduler(timestep_spacing="trailing"), guidance 1, same seed."""

import torch
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

from cdd.adapters.architectures import build_adapter
from cdd.adapters.export import export_entry
from cdd.adapters.zoo import load_entry, save_entry
from cdd.runtime.diffusion.denoiser import ConditionedDenoiser
from cdd.runtime.diffusion.samplers import initial_noise, sample_ddim


def test_exported_controlnet_matches_diffusers_pipeline(latent_backbone, tmp_path, perturb):
    bb = latent_backbone
    adapter = perturb(build_adapter("controlnet", bb.unet, bb.vae_scale_factor), 0.02)
    save_entry(tmp_path / "zoo" / "sr", adapter, name="sr", task="super-resolution",
               backbone_fingerprint=bb.fingerprint, condition={"channels": 3, "range": [0, 1], "resolution": 16})
    entry = load_entry(tmp_path / "zoo" / "sr", bb.unet, bb.fingerprint)
    export_entry(entry, tmp_path / "exported")

    cond = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompt, seed = "a green cylinder on a striped floor at night", 1234

    # ours
    denoiser = ConditionedDenoiser(bb.unet, bb.schedule, entry.adapter)
    z_T = initial_noise([seed], (4, 8, 8))
    z_0 = sample_ddim(denoiser.bind(cond, bb.encode_text([prompt])), z_T, bb.schedule.trailing_timesteps(4), bb.schedule)
    with torch.no_grad():
        ours = (bb.from_model_space(z_0) / 2 + 0.5).clamp(0, 1)

    # diffusers, loading the exported folder
    pipe = StableDiffusionControlNetPipeline(
        vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, unet=bb.unet,
        controlnet=ControlNetModel.from_pretrained(tmp_path / "exported"),
        scheduler=DDIMScheduler.from_config(bb.scheduler_config, timestep_spacing="trailing"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt, image=cond, num_inference_steps=4, guidance_scale=1.0,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="pt").images

    assert ref.shape == ours.shape
    assert (ours - ref).abs().max().item() < 1e-5
    # and the adapter matters: without it the image is different
    plain = sample_ddim(ConditionedDenoiser(bb.unet, bb.schedule).bind(None, bb.encode_text([prompt])), z_T,
                        bb.schedule.trailing_timesteps(4), bb.schedule)
    assert (plain - z_0).abs().max().item() > 1e-3
