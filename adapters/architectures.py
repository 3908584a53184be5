"""Adapter architectures: how a task condition enters the frozen backbone.

Every adapter turns (z_t, t, text embeddings, condition image) into the extra keyword arguments
of the frozen backbone UNet's forward; `cdd.runtime.diffusion.denoiser.ConditionedDenoiser` is the one
place that calls it. Condition images are RGB floats in [0, 1] at the output resolution (the
diffusers ControlNet convention).

Kinds:
  controlnet        diffusers ControlNetModel copied from the UNet; zero convs start it at identity.
  controlnet-gated  CoDi's eq. 10: h'_i = (1 - mu) h_theta,i(z_t) + mu h_eta,i(z_t, c), one scalar mu = 0 at start.
  t2i               diffusers T2IAdapter with a per-level gate, 0 at start (T2I-Adapter is not zero-initialised).
  controlnet-lora   the ControlNet copy frozen, peft LoRA on it; trainable = LoRA + zero convs + condition embedding.
  controlnet-guided a ControlNet that also takes the guidance weight w (the Guided Distillation baseline).

Papers: CoDi is "Conditional Diffusion Distillation" (Mei et al.); Guided Distillation is
"On Distillation of Guided Diffusion Models" (Meng et al.).
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar

import torch
from diffusers import ControlNetModel, T2IAdapter, UNet2DConditionModel
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from torch import nn

ADAPTER_KINDS = ("controlnet", "controlnet-gated", "t2i", "controlnet-lora", "controlnet-guided")
CONTROLNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
BACKBONE_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def conditioning_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """ControlNet condition-embedding widths: one stride-2 stage per factor 2 between image and model
    space (Stable Diffusion, factor 8: diffusers' default (16, 32, 96, 256); pixel backbone: (16,))."""
    widths = [16, 32, 96, 256, 256, 256]
    return tuple(widths[: int(math.log2(vae_scale_factor)) + 1])


def _place(module: nn.Module, like: nn.Module) -> nn.Module:
    """Move `module` to `like`'s device and dtype (only when they differ)."""
    if module.device != like.device or module.dtype != like.dtype:
        module.to(like.device, like.dtype)
    return module


def unet_encoder_features(unet: UNet2DConditionModel, z_t, t, text_emb) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The frozen UNet's own skip features h_theta,i(z_t) and mid-block output, computed exactly as
    the first half of `UNet2DConditionModel.forward` does (time embedding, conv_in, down blocks, mid)."""
    emb = unet.time_embedding(unet.get_time_embed(sample=z_t, timestep=t), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    h = unet.conv_in(z_t)
    feats: tuple[torch.Tensor, ...] = (h,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=text_emb)
        else:
            h, res = block(hidden_states=h, temb=emb)
        feats += res
    if getattr(unet.mid_block, "has_cross_attention", False):
        h = unet.mid_block(h, emb, encoder_hidden_states=text_emb)
    else:
        h = unet.mid_block(h, emb)
    return feats, h


class Adapter(nn.Module):
    """Base class: a task adapter for a frozen backbone UNet."""

    kind: ClassVar[str]

    def unet_kwargs(self, unet: UNet2DConditionModel, z_t, t, text_emb, cond) -> dict[str, Any]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-able arguments that rebuild this architecture for a given backbone (see `build_adapter`)."""
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def weights(self) -> dict[str, torch.Tensor]:
        """What the zoo stores: the adapter's own (trainable) weights; frozen copies of backbone weights are
        rebuilt from the backbone instead of being stored."""
        return {k: v for k, v in self.state_dict().items()}

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        expected = set(self.weights())
        missing = [k for k in missing if k in expected]
        if missing or unexpected:
            raise ValueError(
                f"{self.kind} adapter weights do not match the architecture: "
                f"missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}"
            )


class ControlNetAdapter(Adapter):
    kind = "controlnet"

    def __init__(self, controlnet: ControlNetModel):
        super().__init__()
        self.controlnet = controlnet

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, vae_scale_factor: int = 1, **_: Any) -> ControlNetAdapter:
        controlnet = _place(
            ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels(vae_scale_factor)),
            unet,
        )
        return cls(controlnet)

    def config(self) -> dict[str, Any]:
        return {"controlnet": dict(self.controlnet.config)}

    @classmethod
    def from_config(cls, config: dict[str, Any], unet: UNet2DConditionModel) -> ControlNetAdapter:
        return cls(_place(ControlNetModel.from_config(config["controlnet"]), unet))

    def unet_kwargs(self, unet, z_t, t, text_emb, cond):
        down, mid = self.controlnet(
            z_t, t, encoder_hidden_states=text_emb, controlnet_cond=cond.to(z_t.dtype), return_dict=False
        )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


class GatedControlNetAdapter(ControlNetAdapter):
    """eq. 10 as an additive residual: h'_i = h_theta,i + mu (h_eta,i - h_theta,i).

    The copy's zero convolutions are replaced by identities (h_eta must be the copy's own features),
    and its condition embedding's last conv is re-initialised to small random values: with diffusers'
    zero init h_eta would equal h_theta at the start and mu would get no gradient. Costs one extra pass
    of the frozen encoder for h_theta."""

    kind = "controlnet-gated"

    def __init__(self, controlnet: ControlNetModel, init_embedding: bool = True):
        super().__init__(controlnet)
        controlnet.controlnet_down_blocks = nn.ModuleList(nn.Identity() for _ in controlnet.controlnet_down_blocks)
        controlnet.controlnet_mid_block = nn.Identity()
        if init_embedding:
            conv = controlnet.controlnet_cond_embedding.conv_out
            nn.init.normal_(conv.weight, std=1e-2)
        self.mu = nn.Parameter(torch.zeros((), device=controlnet.device, dtype=controlnet.dtype))

    @classmethod
    def from_config(cls, config, unet):
        return cls(_place(ControlNetModel.from_config(config["controlnet"]), unet), init_embedding=False)

    def unet_kwargs(self, unet, z_t, t, text_emb, cond):
        h_eta, mid_eta = self.controlnet(
            z_t, t, encoder_hidden_states=text_emb, controlnet_cond=cond.to(z_t.dtype), return_dict=False
        )
        h_theta, mid_theta = unet_encoder_features(unet, z_t, t, text_emb)
        mu = self.mu.to(z_t.dtype)
        return {
            "down_block_additional_residuals": [mu * (e - f) for e, f in zip(h_eta, h_theta)],  # eq. 10
            "mid_block_additional_residual": mu * (mid_eta - mid_theta),
        }


class GuidedControlNetAdapter(ControlNetAdapter):
    """A ControlNet that takes the classifier-free guidance weight w as an extra input: the student of
    Guided Distillation (its stage one, "a branch of conditional information intake that allows
    guidance strength to be given to the model"). w gets a sinusoidal (Fourier) embedding, projected by a
    zero-initialised `cond_proj` into the ControlNet's time embedding (diffusers' `time_cond_proj_dim`
    mechanism), so a student built from a plain ControlNet starts as exactly that ControlNet.

    `guidance` is the w used when none is set per batch: the weight the entry is served with."""

    kind = "controlnet-guided"

    def __init__(self, controlnet: ControlNetModel, guidance: float = 1.0, embedding_dim: int = 64):
        super().__init__(controlnet)
        old = controlnet.time_embedding
        emb = TimestepEmbedding(old.linear_1.in_features, old.linear_1.out_features, cond_proj_dim=embedding_dim)
        emb.linear_1.load_state_dict(old.linear_1.state_dict())
        emb.linear_2.load_state_dict(old.linear_2.state_dict())
        nn.init.zeros_(emb.cond_proj.weight)
        controlnet.time_embedding = emb.to(old.linear_1.weight.device, old.linear_1.weight.dtype)
        self.guidance, self.embedding_dim = float(guidance), int(embedding_dim)
        self.w: torch.Tensor | None = None  # per-sample w for the next forwards (training); None: `guidance`
        # `guidance` as a device tensor that moves with the module: built once here, never inside a forward
        # (a host tensor made there is a blocking copy, which a CUDA graph capture refuses). Not stored.
        self.register_buffer("w_default", torch.tensor(self.guidance, device=old.linear_1.weight.device),
                             persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.w_default = torch.tensor(self.guidance, device=self.w_default.device)  # float32 whatever `.to` did
        return self

    @classmethod
    def from_controlnet(cls, adapter: ControlNetAdapter, guidance: float = 1.0) -> GuidedControlNetAdapter:
        """The GD stage-1 student: a copy of a trained (fine-tuned) ControlNet adapter plus the w branch."""
        import copy

        return cls(copy.deepcopy(adapter.controlnet), guidance)

    @classmethod
    def from_unet(cls, unet, vae_scale_factor: int = 1, guidance: float = 1.0, **_: Any) -> GuidedControlNetAdapter:
        return cls(ControlNetAdapter.from_unet(unet, vae_scale_factor).controlnet, guidance)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "guidance": self.guidance, "embedding_dim": self.embedding_dim}

    @classmethod
    def from_config(cls, config, unet):
        return cls(_place(ControlNetModel.from_config(config["controlnet"]), unet), config["guidance"], config["embedding_dim"])

    def set_default_guidance(self, w: float) -> None:
        """The w used when none is set per batch (`guidance`), on the module's device."""
        self.guidance = float(w)
        self.w_default = torch.tensor(self.guidance, device=self.w_default.device)

    def set_guidance(self, w: torch.Tensor | float | None) -> None:
        """w for the following forwards: a float, a [B] tensor (one per sample), or None for `guidance`."""
        self.w = None if w is None else torch.as_tensor(w, dtype=torch.float32)

    def unet_kwargs(self, unet, z_t, t, text_emb, cond):
        w = self.w if self.w is not None else self.w_default
        w = w.reshape(-1).expand(z_t.shape[0]).to(z_t.device, torch.float32)
        w_emb = get_timestep_embedding(w * 1000, self.embedding_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        down, mid = self.controlnet(
            z_t, t, encoder_hidden_states=text_emb, controlnet_cond=cond.to(z_t.dtype),
            timestep_cond=w_emb.to(z_t.dtype), return_dict=False,
        )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


class LoRAControlNetAdapter(ControlNetAdapter):
    """ControlNet copy with its copied weights frozen and peft LoRA on them. Only the LoRA, the zero
    convs and the condition embedding are trainable and stored: the copied weights come from the
    backbone (whose fingerprint the zoo checks), so an entry is a few MB."""

    kind = "controlnet-lora"

    def __init__(self, controlnet: ControlNetModel, rank: int = 8, alpha: float | None = None, targets=None):
        super().__init__(controlnet)
        self.lora_config = LoraConfig(
            r=rank, lora_alpha=alpha or rank, target_modules=list(targets or CONTROLNET_LORA_TARGETS), lora_dropout=0.0
        )
        controlnet.requires_grad_(False)
        inject_adapter_in_model(self.lora_config, controlnet, adapter_name="default")
        for name, p in controlnet.named_parameters():
            if "lora_" in name or name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                p.requires_grad_(True)

    @classmethod
    def from_unet(cls, unet, vae_scale_factor: int = 1, rank: int = 8, alpha: float | None = None, **_):
        base = ControlNetAdapter.from_unet(unet, vae_scale_factor).controlnet
        return cls(base, rank=rank, alpha=alpha)

    @classmethod
    def from_config(cls, config, unet):
        channels = tuple(config["controlnet"]["conditioning_embedding_out_channels"])
        base = _place(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels), unet)
        lora = config["lora"]
        return cls(base, rank=lora["r"], alpha=lora["lora_alpha"], targets=lora["target_modules"])

    def config(self):
        return {
            "controlnet": dict(self.controlnet.config),
            "lora": {
                "r": self.lora_config.r,
                "lora_alpha": self.lora_config.lora_alpha,
                "target_modules": sorted(self.lora_config.target_modules),
            },
        }

    def weights(self):
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in trainable}

    def merged_controlnet(self) -> ControlNetModel:
        """A plain ControlNetModel with the LoRA merged in (for export)."""
        merged = _place(ControlNetModel.from_config(self.controlnet.config), self.controlnet)
        state = {}
        for name, module in self.controlnet.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                w = module.base_layer.weight.detach() + module.get_delta_weight("default")
                state[f"{name}.weight"] = w
                if module.base_layer.bias is not None:
                    state[f"{name}.bias"] = module.base_layer.bias.detach()
        for k, v in self.controlnet.state_dict().items():
            if "lora_" in k:
                continue
            key = k.replace(".base_layer.", ".")
            state.setdefault(key, v)
        merged.load_state_dict(state, strict=True)
        return merged


class T2IAdapterGated(Adapter):
    """diffusers T2IAdapter; its features are multiplied by per-level gates (0 at start) and injected
    through `down_intrablock_additional_residuals` (a fresh list per call: the UNet pops from it)."""

    kind = "t2i"

    def __init__(self, adapter: T2IAdapter):
        super().__init__()
        self.adapter = adapter
        levels = len(adapter.config.channels)
        self.gates = nn.Parameter(torch.zeros(levels, device=adapter.device, dtype=adapter.dtype))

    @classmethod
    def from_unet(cls, unet, vae_scale_factor: int = 1, num_res_blocks: int = 2, **_):
        adapter = T2IAdapter(
            in_channels=3,
            channels=list(unet.config.block_out_channels),
            num_res_blocks=num_res_blocks,
            downscale_factor=vae_scale_factor,
            adapter_type="full_adapter",
        )
        return cls(_place(adapter, unet))

    @classmethod
    def from_config(cls, config, unet):
        return cls(_place(T2IAdapter.from_config(config["t2i_adapter"]), unet))

    def config(self):
        return {"t2i_adapter": dict(self.adapter.config)}

    def unet_kwargs(self, unet, z_t, t, text_emb, cond):
        feats = self.adapter(cond.to(z_t.dtype))
        gates = self.gates.to(z_t.dtype)
        return {"down_intrablock_additional_residuals": [g * f for g, f in zip(gates, feats)]}


ADAPTER_CLASSES: dict[str, type[Adapter]] = {
    cls.kind: cls for cls in (ControlNetAdapter, GatedControlNetAdapter, T2IAdapterGated, LoRAControlNetAdapter,
                               GuidedControlNetAdapter)
}


def adapter_class(kind: str) -> type[Adapter]:
    if kind not in ADAPTER_CLASSES:
        raise ValueError(f"unknown adapter kind {kind!r}; choose one of {', '.join(ADAPTER_KINDS)}")
    return ADAPTER_CLASSES[kind]


def build_adapter(kind: str, unet: UNet2DConditionModel, vae_scale_factor: int = 1, **options: Any) -> Adapter:
    """A fresh adapter of `kind` for this backbone UNet (weights copied or zero-gated as section 4 says)."""
    return adapter_class(kind).from_unet(unet, vae_scale_factor=vae_scale_factor, **options)


def adapter_from_config(kind: str, config: dict[str, Any], unet: UNet2DConditionModel) -> Adapter:
    """Rebuild an adapter's architecture (weights to be loaded) from its manifest config."""
    return adapter_class(kind).from_config(config, unet)


# ---------------------------------------------------------------------------------------------
# Optional backbone LoRA (training mode `lora`): peft LoRA on the UNet, stored with the adapter.


def backbone_lora_name(entry_name: str) -> str:
    """A peft adapter name for a zoo entry that cannot clash with nn.Module attributes (`train`, `eval`)."""
    return "cdd_" + re.sub(r"\W", "_", entry_name)


def add_backbone_lora(unet: UNet2DConditionModel, name: str, rank: int = 4, alpha: float | None = None, targets=None) -> LoraConfig:
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets or BACKBONE_LORA_TARGETS), lora_dropout=0.0)
    inject_adapter_in_model(config, unet, adapter_name=name)
    return config


def backbone_lora_state(unet: UNet2DConditionModel, name: str) -> dict[str, torch.Tensor]:
    return get_peft_model_state_dict(unet, adapter_name=name)


def load_backbone_lora(unet: UNet2DConditionModel, name: str, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    add_backbone_lora(unet, name, rank=config["r"], alpha=config["lora_alpha"], targets=config["target_modules"])
    result = set_peft_model_state_dict(unet, state, adapter_name=name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"backbone LoRA {name!r} has unexpected keys: {unexpected[:5]}")


def set_backbone_lora(unet: UNet2DConditionModel, name: str | None) -> None:
    """Activate one named backbone LoRA (or none) on the shared UNet."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            if name is None or name not in module.lora_A:
                module.enable_adapters(False)
            else:
                module.enable_adapters(True)
                module.set_adapter(name)
