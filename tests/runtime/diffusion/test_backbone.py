import json
import shutil

import pytest
import torch

from cdd.runtime.diffusion.backbone import BackboneError, load_backbone


@pytest.mark.parametrize("name", ["pixel", "latent"])
def test_load_round_trip(name, request):
    backbone = request.getfixturevalue(f"{name}_backbone")
    loaded = load_backbone(request.getfixturevalue(f"{name}_backbone_dir"))
    assert loaded.fingerprint == backbone.fingerprint
    assert loaded.latent == (name == "latent")
    assert not any(p.requires_grad for m in loaded.modules() for p in m.parameters())
    torch.testing.assert_close(loaded.encode_text(["a red cube"]), backbone.encode_text(["a red cube"]))
    assert loaded.schedule.prediction_type == "epsilon"


def test_dtype_does_not_change_fingerprint(pixel_backbone_dir):
    a = load_backbone(pixel_backbone_dir)
    b = load_backbone(pixel_backbone_dir, dtype=torch.bfloat16)
    assert b.dtype == torch.bfloat16 and a.fingerprint == b.fingerprint


def test_dtype_and_device_follow_every_way_the_modules_move(latent_backbone_dir):
    bb = load_backbone(latent_backbone_dir)
    assert (bb.dtype, bb.vae_dtype, bb.device) == (torch.float32, torch.float32, torch.device("cpu"))
    bb.to(dtype=torch.bfloat16)
    assert (bb.dtype, bb.vae_dtype) == (torch.bfloat16, torch.bfloat16)
    bb.unet.to(torch.float32)  # moved directly, as training does
    bb.vae.float()
    assert (bb.dtype, bb.vae_dtype) == (torch.float32, torch.float32)
    try:  # conversion that makes new parameters instead of converting them in place
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        bb.unet.to(torch.bfloat16)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert bb.dtype == torch.bfloat16 == bb.unet.dtype
    bb.unet = load_backbone(latent_backbone_dir).unet  # another module altogether
    assert bb.dtype == torch.float32
    wrapper = torch.nn.Module()  # the probed parameter's module wrapped, as a LoRA layer wraps its base layer
    wrapper.base_layer = bb.unet.conv_in
    bb.unet.conv_in = wrapper.to(torch.bfloat16)
    assert bb.dtype == torch.bfloat16


def test_missing_parts_are_named(pixel_backbone_dir, tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone(tmp_path / "nope")
    with pytest.raises(BackboneError, match="model_index.json is missing"):
        load_backbone(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(pixel_backbone_dir, broken)
    shutil.rmtree(broken / "scheduler")
    for f in (broken / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(BackboneError, match=r"scheduler/ \(folder\).*unet/ weights"):
        load_backbone(broken)
    index = json.loads((broken / "model_index.json").read_text())
    del index["tokenizer"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(BackboneError, match="tokenizer"):
        load_backbone(broken)


def test_latent_folder_loads_in_plain_diffusers(latent_backbone_dir):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(latent_backbone_dir, local_files_only=True)
    assert pipe.vae is not None and pipe.safety_checker is None
    UNet2DConditionModel.from_pretrained(latent_backbone_dir, subfolder="unet")


def test_pixel_folder_runs_in_plain_diffusers(pixel_backbone, pixel_backbone_dir):
    """The folder's own pipeline.py (torch + diffusers only) equals our sampler on the same weights."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    from cdd.runtime.diffusion.denoiser import ConditionedDenoiser
    from cdd.runtime.diffusion.samplers import initial_noise, sample_ddim

    pipe = DiffusionPipeline.from_pretrained(pixel_backbone_dir, custom_pipeline=str(pixel_backbone_dir), trust_remote_code=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red cube", num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="pt").images
    bb = pixel_backbone
    z = sample_ddim(ConditionedDenoiser(bb.unet, bb.schedule).bind(None, bb.encode_text(["a red cube"])),
                    initial_noise([3], (3, 16, 16)), bb.schedule.trailing_timesteps(4), bb.schedule)
    torch.testing.assert_close(images, (z / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("drop_condition", [False, True])
def test_classifier_free_guidance_by_hand(pixel_backbone, perturb, drop_condition):
    """(1 + w) f(c, text) - w f(u), f(u) the entry with the condition and "" or, with drop_condition, the backbone
    alone with "" (the condition unused by that branch)."""
    from cdd.adapters.architectures import build_adapter
    from cdd.runtime.diffusion.denoiser import ClassifierFreeGuided, ConditionedDenoiser

    bb = pixel_backbone
    model = ConditionedDenoiser(bb.unet, bb.schedule, perturb(build_adapter("controlnet", bb.unet, bb.vae_scale_factor), 0.05))
    g = torch.Generator().manual_seed(0)
    z_t, cond = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    t = torch.tensor([999, 500])
    text, empty = bb.encode_text(["a red sphere", "a blue cube"]), bb.encode_text([""])
    with torch.no_grad():
        guided = ClassifierFreeGuided(model, empty, 2.0, drop_condition=drop_condition)(z_t, t, cond, text)
        x_c, eps_c = model(z_t, t, cond, text)
        plain = ConditionedDenoiser(bb.unet, bb.schedule)
        x_u, eps_u = (plain(z_t, t, None, empty.expand(2, -1, -1)) if drop_condition
                      else model(z_t, t, cond, empty.expand(2, -1, -1)))
        other = ClassifierFreeGuided(model, empty, 2.0, drop_condition=not drop_condition)(z_t, t, cond, text)
    torch.testing.assert_close(guided[0], 3 * x_c - 2 * x_u, rtol=1e-3, atol=1e-4)  # batched: 2B rows
    torch.testing.assert_close(guided[1], 3 * eps_c - 2 * eps_u, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(guided[0], other[0], atol=1e-4)  # the two unconditional branches differ
