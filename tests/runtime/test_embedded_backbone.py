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
