"""A plain-diffusers pipeline for pixel-space text-to-image backbones (no VAE).

This file imports only torch and diffusers: `save_backbone` copies it into every pixel backbone
folder as `pipeline.py`, so plain diffusers can run the backbone without this package:

    DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(folder), trust_remote_code=True)
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class PixelTextToImagePipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, scheduler, text_encoder, tokenizer):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0].to(self.unet.dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
    ):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        text = self.encode_prompt(prompts)
        if guidance_scale != 1.0:
            text = torch.cat([self.encode_prompt([""] * len(prompts)), text])
        size = self.unet.config.sample_size
        shape = (len(prompts), self.unet.config.in_channels, size, size)
        x = randn_tensor(shape, generator=generator, device=self.device, dtype=self.unet.dtype)
        x = x * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        for t in self.progress_bar(self.scheduler.timesteps):
            inp = torch.cat([x, x]) if guidance_scale != 1.0 else x
            out = self.unet(self.scheduler.scale_model_input(inp, t), t, encoder_hidden_states=text).sample
            if guidance_scale != 1.0:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            x = self.scheduler.step(out, t, x).prev_sample
        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return ImagePipelineOutput(images=images)
        images = images.permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "pil":
            images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images)
