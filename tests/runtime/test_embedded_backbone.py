"""The shipped default backbone loads with plain diffusers and with our loader, and speaks the scenes language."""

import json

import numpy as np
import torch

from cdd.adapters.zoo import default_backbone_dir
from cdd.runtime.backbone import load_backbone
from cdd.training.data.scenes import caption, sample_scene, scene_vocabulary

ROOT = default_backbone_dir()


def test_plain_diffusers_loads_every_component():
    from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    index = json.loads((ROOT / "model_index.json").read_text())
    assert "vae" not in index  # a pixel backbone
    unet = UNet2DConditionModel.from_pretrained(ROOT, subfolder="unet")
    assert unet.config.sample_size == 64 and unet.config.in_channels == 3
    CLIPTextModel.from_pretrained(ROOT, subfolder="text_encoder")
    AutoTokenizer.from_pretrained(ROOT / "tokenizer")
    assert DDIMScheduler.from_pretrained(ROOT, subfolder="scheduler").config.prediction_type == "v_prediction"
    pipe = DiffusionPipeline.from_pretrained(ROOT, custom_pipeline=str(ROOT), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red sphere on a checkered floor at noon", num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 3, 64, 64) and 0 <= img.min() and img.max() <= 1


def test_loader_and_vocabulary():
    bb = load_backbone(ROOT)
    assert bb.resolution == 64 and not bb.latent
    vocab = bb.tokenizer.get_vocab()
    assert set(scene_vocabulary()) <= set(vocab)
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = bb.tokenizer(caption(sample_scene(rng))).input_ids
        assert bb.tokenizer.unk_token_id not in ids
        assert len(ids) <= bb.tokenizer.model_max_length
    record = (ROOT / "TRAINING.md").read_text()
    assert bb.fingerprint in record, "TRAINING.md records the fingerprint of the shipped weights"


LATENT = ROOT.parent / "backbone-latent"


def test_latent_backbone_is_a_plain_stable_diffusion_folder_equal_to_our_sampler():
    """The shipped latent backbone (beside the served pixel default): StableDiffusionPipeline loads it
    without custom code, and its image equals our sampler's for the same seed."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from cdd.runtime.denoiser import ConditionedDenoiser
    from cdd.runtime.samplers import initial_noise, sample_ddim

    assert (LATENT / "tokenizer" / "vocab.json").is_file() and (LATENT / "tokenizer" / "merges.txt").is_file()
    tok = CLIPTokenizer.from_pretrained(LATENT / "tokenizer")
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in scene_vocabulary() + ["photo"])
    bb = load_backbone(LATENT)
    assert bb.latent and bb.resolution == 64 and bb.schedule.abar(torch.tensor([999])).item() == 0.0
    assert sum(f.stat().st_size for f in LATENT.rglob("*") if f.is_file()) < 40e6
    prompt, seed = "a red sphere on a checkered floor at noon", 7
    z = sample_ddim(ConditionedDenoiser(bb.unet, bb.schedule).bind(None, bb.encode_text([prompt])),
                    initial_noise([seed], (4, 16, 16)), bb.schedule.trailing_timesteps(2), bb.schedule)
    with torch.no_grad():
        ours = (bb.from_model_space(z) / 2 + 0.5).clamp(0, 1)
    pipe = StableDiffusionPipeline.from_pretrained(LATENT, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt, num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(seed),
               output_type="pt").images
    assert ref.shape == (1, 3, 64, 64)
    torch.testing.assert_close(ref, ours, atol=1e-4, rtol=1e-4)
