"""Small random backbones of both kinds, and writing any backbone as a diffusers folder.

Tests build their models here (nothing is downloaded); `cdd-pretrain-backbone` starts from the
same constructors at a larger size.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ...adapters.atomic import atomic_directory
from .backbone import Backbone
from .text import build_word_tokenizer, save_tokenizer

TINY_VOCABULARY = (
    "a an and on the at of red green blue yellow white black orange purple sphere cube cylinder "
    "checkered striped plain floor noon sunset night make it remove"
).split()


def scheduler_config(prediction_type: str = "epsilon") -> dict:
    """Stable Diffusion's DDPM schedule (scaled_linear 0.00085..0.012, T = 1000). Without diffusers'
    `_use_default_values` bookkeeping, which would make `from_config` ignore later edits of those keys."""
    config = dict(
        DDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type=prediction_type,
        ).config
    )
    config.pop("_use_default_values", None)
    return config


def make_text_encoder(vocab_size: int, max_length: int, hidden: int, layers: int, eos_token_id: int,
                      bos_token_id: int = 2, pad_token_id: int = 0) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        max_position_embeddings=max_length,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return CLIPTextModel(config)


def make_unet(
    sample_size: int,
    in_channels: int,
    block_out_channels: Sequence[int],
    cross_attention_dim: int,
    layers_per_block: int = 1,
    attention_head_dim: int = 8,
    self_attention_from: int = 1,
) -> UNet2DConditionModel:
    """A Stable-Diffusion-shaped UNet: cross-attention blocks at every level that downsamples and a
    plain last level, the layout T2I-Adapter residuals expect. Levels below `self_attention_from`
    use cross-attention only (`only_cross_attention`), which keeps high-resolution pixel levels cheap."""
    n = len(block_out_channels)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    only_cross = tuple(i < self_attention_from for i in range(n))
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=min(8, min(block_out_channels)),
        only_cross_attention=only_cross,
    )


def make_backbone(
    kind: str = "pixel",
    *,
    resolution: int = 16,
    prediction_type: str = "epsilon",
    block_out_channels: Sequence[int] = (16, 32),
    text_hidden: int = 32,
    text_layers: int = 1,
    vocabulary: Sequence[str] = TINY_VOCABULARY,
    max_length: int = 12,
    seed: int = 0,
) -> Backbone:
    """A random backbone: `pixel` (no VAE) or `latent` (a small AutoencoderKL, scale factor 2)."""
    if kind not in ("pixel", "latent"):
        raise ValueError(f"backbone kind must be 'pixel' or 'latent', got {kind!r}")
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(vocabulary, max_length=max_length)
    text_encoder = make_text_encoder(len(tokenizer), max_length, text_hidden, text_layers, tokenizer.eos_token_id)
    vae = None
    sample_size, channels = resolution, 3
    if kind == "latent":
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            latent_channels=4,
            norm_num_groups=4,
            sample_size=resolution,
        )
        sample_size, channels = resolution // 2, 4
    unet = make_unet(sample_size, channels, block_out_channels, text_hidden)
    return Backbone(
        unet=unet,
        scheduler_config=scheduler_config(prediction_type),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=vae,
    )


def save_backbone(backbone: Backbone, path: str | Path, fp16: bool = False) -> Path:
    """Write a diffusers-format folder atomically; a latent backbone gets Stable Diffusion's layout.

    `fp16` stores the UNet and VAE in float16; the text encoder is always stored in float32, because
    transformers loads a model in the dtype it was saved in while diffusers loads its models in float32,
    so a float16 text encoder breaks a plain `StableDiffusionPipeline.from_pretrained(path)` (no
    `torch_dtype`) on its first call with a Half / Float mismatch."""
    path = Path(path)
    with atomic_directory(path) as tmp:
        for name in ("unet", "text_encoder", "vae"):
            module = getattr(backbone, name)
            dtype = torch.float16 if fp16 and name != "text_encoder" else torch.float32
            if module is not None:
                saved_dtype = module.dtype
                if saved_dtype != dtype:
                    module.to(dtype)
                module.save_pretrained(tmp / name, safe_serialization=True)
                if saved_dtype != dtype:
                    module.to(saved_dtype)
        save_tokenizer(backbone.tokenizer, tmp / "tokenizer")
        DDIMScheduler.from_config(backbone.scheduler_config).save_pretrained(tmp / "scheduler")
        index = {
            "_diffusers_version": __import__("diffusers").__version__,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", type(backbone.tokenizer).__name__],
        }
        if backbone.vae is not None:
            index.update(
                _class_name="StableDiffusionPipeline",
                vae=["diffusers", "AutoencoderKL"],
                safety_checker=[None, None],
                feature_extractor=[None, None],
                image_encoder=[None, None],
                requires_safety_checker=False,
            )
        else:
            # plain diffusers runs it with DiffusionPipeline.from_pretrained(path, custom_pipeline=str(path), trust_remote_code=True)
            index.update(_class_name="PixelTextToImagePipeline")
            shutil.copyfile(Path(__file__).with_name("pixel_pipeline.py"), tmp / "pipeline.py")
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path
