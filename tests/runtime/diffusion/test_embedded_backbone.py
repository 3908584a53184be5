"""The shipped default backbone, a miniature Stable Diffusion: plain diffusers loads it with no custom code and
gives our sampler's image for the same seed; our loader reads it; its tokenizer speaks the scenes language."""

import numpy as np
import torch

from cdd.adapters.zoo import default_backbone_dir
from cdd.runtime.diffusion.backbone import load_backbone
from cdd.training.data.scenes import caption, sample_scene, scene_vocabulary

ROOT = default_backbone_dir()


def test_loader_vocabulary_size_and_record():
    bb = load_backbone(ROOT)
    assert bb.latent and bb.resolution == 64 and bb.schedule.abar(torch.tensor([999])).item() == 0.0  # zero terminal SNR
    assert all(len(bb.tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in scene_vocabulary())
    rng = np.random.default_rng(0)
    for _ in range(20):
        text = caption(sample_scene(rng))
        assert bb.tokenizer.unk_token_id not in bb.tokenizer(text, add_special_tokens=False).input_ids  # CLIP: unk is eos
        assert len(bb.tokenizer(text).input_ids) <= bb.tokenizer.model_max_length
    assert sum(f.stat().st_size for f in ROOT.rglob("*") if f.is_file()) < 40e6
    record = (ROOT / "TRAINING.md").read_text()
    assert bb.fingerprint in record, "TRAINING.md records the fingerprint of the shipped weights"


def test_plain_stable_diffusion_folder_equal_to_our_sampler():
    """StableDiffusionPipeline loads the shipped folder without custom code, and its image equals our sampler's
    for the same seed."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from cdd.runtime.diffusion.denoiser import ConditionedDenoiser
    from cdd.runtime.diffusion.samplers import initial_noise, sample_ddim

    assert (ROOT / "tokenizer" / "vocab.json").is_file() and (ROOT / "tokenizer" / "merges.txt").is_file()
    tok = CLIPTokenizer.from_pretrained(ROOT / "tokenizer")
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in scene_vocabulary() + ["photo"])
    bb = load_backbone(ROOT)
    prompt, seed = "a red sphere on a checkered floor at noon", 7
    z = sample_ddim(ConditionedDenoiser(bb.unet, bb.schedule).bind(None, bb.encode_text([prompt])),
                    initial_noise([seed], (4, 16, 16)), bb.schedule.trailing_timesteps(2), bb.schedule)
    with torch.no_grad():
        ours = (bb.from_model_space(z) / 2 + 0.5).clamp(0, 1)
    pipe = StableDiffusionPipeline.from_pretrained(ROOT, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt, num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(seed),
               output_type="pt").images
    assert ref.shape == (1, 3, 64, 64)
    torch.testing.assert_close(ref, ours, atol=1e-4, rtol=1e-4)


def test_plain_from_pretrained_without_dtype_samples():
    """The README's claim as a newcomer types it: no torch_dtype. transformers loads the text encoder in the dtype
    it was saved in and diffusers loads the UNet and VAE in float32, so all three must be stored to agree."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ROOT, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    images = pipe("a blue cube on a striped floor at sunset", num_inference_steps=2, height=32, width=32,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all() and images.std() > 0.01
