"""Loading a frozen text-to-image backbone from a diffusers-format folder.

A backbone is a `UNet2DConditionModel` with its DDPM-family scheduler config, a text encoder and
tokenizer, and optionally a VAE (latent backbone, Stable-Diffusion layout); without a VAE it is a
pixel backbone whose model space is the image scaled to [-1, 1].
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel, PreTrainedTokenizerBase

from ...adapters.fingerprint import unet_fingerprint
from .schedule import NoiseSchedule


class BackboneError(ValueError):
    """A backbone folder is missing, incomplete or inconsistent."""


REQUIRED = ("unet", "scheduler", "text_encoder", "tokenizer")


@dataclass
class Backbone:
    unet: UNet2DConditionModel
    scheduler_config: dict
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    vae: AutoencoderKL | None = None
    path: Path | None = None
    fingerprint: str = ""
    schedule: NoiseSchedule = field(init=False)
    _probes: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.schedule = NoiseSchedule.from_scheduler_config(
            self.scheduler_config, self.scheduler_config.get("prediction_type", "epsilon")
        )
        for module in self.modules():
            module.requires_grad_(False).eval()
        if not self.fingerprint:
            self.fingerprint = unet_fingerprint(self.unet)

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.text_encoder, self.vae) if m is not None]

    def _probe(self, module: torch.nn.Module) -> torch.Tensor:
        """One floating parameter of `module`, found once. Its dtype and device follow `module.to(...)`, which
        converts parameters in place, whereas diffusers' `ModelMixin.dtype` / `.device` walk every submodule
        on each read (about 1 ms for the embedded UNet; a served super-resolution request read them 29 times)."""
        held, name, param = self._probes.get(id(module), (None, None, None))
        try:
            current = module.get_parameter(name) if held is module else None
        except AttributeError:  # the parameter moved (a LoRA layer wrapped its module)
            current = None
        if current is None or current is not param:  # new, moved, or converted out of place
            name, param = next((n, p) for n, p in module.named_parameters() if p.is_floating_point())
            self._probes[id(module)] = (module, name, param)
        return param

    @property
    def device(self) -> torch.device:
        return self._probe(self.unet).device

    @property
    def dtype(self) -> torch.dtype:
        return self._probe(self.unet).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return self._probe(self.vae).dtype

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def size_factor(self) -> int:
        """Image sides must be multiples of this: the VAE's factor times the UNet's downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Native image resolution in pixels."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def model_channels(self) -> int:
        return int(self.unet.config.in_channels)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Backbone:
        for module in self.modules():
            if (device is not None and module.device != torch.device(device)) or (dtype not in (None, module.dtype)):
                module.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings exactly as diffusers' Stable Diffusion pipelines compute them."""
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = (ids != self.tokenizer.pad_token_id).long()
        return self.text_encoder(ids, attention_mask=mask)[0].to(self.dtype)

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> model space (VAE latent mean * scaling factor, or the pixels)."""
        if self.vae is None:
            return images.to(self.device, self.dtype)
        latent = self.vae.encode(images.to(self.device, self.vae_dtype)).latent_dist.mean
        return (latent * self.vae.config.scaling_factor).to(self.dtype)

    def from_model_space(self, z: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [-1, 1] (not clamped)."""
        if self.vae is None:
            return z
        return self.vae.decode(z.to(self.vae_dtype) / self.vae.config.scaling_factor).sample


def _missing_components(root: Path) -> tuple[dict, list[str]]:
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise BackboneError(f"{root} is not a diffusers backbone folder: model_index.json is missing")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise BackboneError(f"{index_file} is not valid JSON: {e}") from e
    missing = []
    for name in REQUIRED:
        if name not in index or index[name] in (None, [None, None]):
            missing.append(f"{name} (not listed in model_index.json)")
        elif not (root / name).is_dir():
            missing.append(f"{name}/ (folder)")
    configs = {"unet": "config.json", "scheduler": "scheduler_config.json", "text_encoder": "config.json"}
    for name, cfg in configs.items():
        if (root / name).is_dir() and not (root / name / cfg).is_file():
            missing.append(f"{name}/{cfg}")
    for name in ("unet", "text_encoder"):
        d = root / name
        if d.is_dir() and not any(d.glob("*.safetensors")) and not any(d.glob("*.bin")):
            missing.append(f"{name}/ weights (*.safetensors)")
    if "vae" in index and index["vae"] not in (None, [None, None]) and not (root / "vae").is_dir():
        missing.append("vae/ (listed in model_index.json)")
    return index, missing


def load_backbone(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Backbone:
    """Load a diffusers-format backbone folder, frozen, onto `device` in `dtype`.

    Only local files are read (no hub access). The fingerprint is taken on the float32 weights
    before the cast to `dtype`, so training in float32 and serving in bfloat16 agree."""
    root = Path(path)
    if not root.is_dir():
        raise BackboneError(f"backbone folder {root} does not exist")
    index, missing = _missing_components(root)
    if missing:
        raise BackboneError(f"backbone folder {root} is incomplete; missing: {', '.join(missing)}")
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=torch.float32, local_files_only=True)
    fingerprint = unet_fingerprint(unet)
    scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    vae = None
    if (root / "vae").is_dir() and index.get("vae") not in (None, [None, None]):
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=True)
    backbone = Backbone(
        unet=unet,
        scheduler_config=scheduler_config,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=vae,
        path=root,
        fingerprint=fingerprint,
    )
    return backbone.to(device, dtype)
