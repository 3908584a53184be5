"""The one conditioned forward pass: (z_t, t, condition image, text embeddings) -> (x_hat, eps_hat).

Training (CoDi, baselines) and serving both call this, so what is trained is exactly what is served.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from ...adapters.architectures import Adapter
from .schedule import NoiseSchedule


class ConditionedDenoiser(nn.Module):
    """The frozen backbone UNet plus an optional task adapter, wrapped to return (x_hat, eps_hat).

    The UNet is shared (never copied): several denoisers over one backbone hold the same module."""

    def __init__(self, unet: UNet2DConditionModel, schedule: NoiseSchedule, adapter: Adapter | None = None):
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.adapter = adapter

    def predict(self, z_t: torch.Tensor, t, cond: torch.Tensor | None, text_emb: torch.Tensor) -> torch.Tensor:
        """The UNet's raw output (its own parametrisation)."""
        t = _timesteps(t, z_t)
        kwargs = {}
        if self.adapter is not None:
            if cond is None:
                raise ValueError(f"a {self.adapter.kind} adapter needs a condition image")
            kwargs = self.adapter.unet_kwargs(self.unet, z_t, t, text_emb, cond)
        return self.unet(z_t, t, encoder_hidden_states=text_emb, return_dict=False, **kwargs)[0]

    def forward(self, z_t: torch.Tensor, t, cond: torch.Tensor | None, text_emb: torch.Tensor):
        return self.schedule.to_x_eps(self.predict(z_t, t, cond, text_emb), z_t, t)

    def bind(self, cond: torch.Tensor | None, text_emb: torch.Tensor):
        """The sampler's view: model(z_t, t) -> (x_hat, eps_hat) with this condition and text."""
        return lambda z_t, t: self(z_t, t, cond, text_emb)


def both_branches(model, z_t: torch.Tensor, t, cond: torch.Tensor | None, text_emb: torch.Tensor,
                  empty_emb: torch.Tensor, drop_condition: bool | torch.Tensor = False):
    """`model`'s (x_hat, eps_hat) with the text and with the empty text ("" : [1, L, D] or one row per sample):
    ((x_c, eps_c), (x_u, eps_u)), the two branches of classifier-free guidance. By default the condition image goes
    to both, in one batch of 2B rows (guidance over the text alone). `drop_condition` (one bool, or one per sample):
    the unconditional branch is the backbone alone with the empty text (no adapter), so the guidance is over the
    text and the condition together and still means something with the empty prompt (it then pushes along the
    condition alone); those rows take one more call."""
    b = z_t.shape[0]
    t = _timesteps(t, z_t)
    empty = empty_emb.to(text_emb).expand(b, -1, -1) if empty_emb.shape[0] == 1 else empty_emb[:b].to(text_emb)
    drop = torch.as_tensor(drop_condition, dtype=torch.bool, device=z_t.device).expand(b)
    if not drop.any():  # guidance over the text alone: both branches in one batch of 2B rows
        x, eps = model(torch.cat([z_t, z_t]), torch.cat([t, t]), None if cond is None else torch.cat([cond, cond]),
                       torch.cat([text_emb, empty]))
        return (x[:b], eps[:b]), (x[b:], eps[b:])
    keep = ~drop  # the rows that keep the condition in their "" branch share the conditional branch's batch
    x, eps = model(torch.cat([z_t, z_t[keep]]), torch.cat([t, t[keep]]),
                   None if cond is None else torch.cat([cond, cond[keep]]), torch.cat([text_emb, empty[keep]]))
    x_c, eps_c = x[:b], eps[:b]
    # a denoiser with no adapter (or a wrapper of the backbone alone) takes no condition anyway
    plain = model if getattr(model, "adapter", None) is None else ConditionedDenoiser(model.unet, model.schedule)
    x_p, eps_p = plain(z_t[drop], t[drop], None, empty[drop])
    x_u, eps_u = torch.empty_like(x_c), torch.empty_like(eps_c)
    x_u[keep], eps_u[keep], x_u[drop], eps_u[drop] = x[b:], eps[b:], x_p, eps_p
    return (x_c, eps_c), (x_u, eps_u)


class ClassifierFreeGuided:
    """A denoiser sampled with classifier-free guidance at weight w: (1 + w) f(z_t, t, c, text) - w f(z_t, t, c, "")
    for x_hat and eps_hat alike (the map from the network's output to both is linear), both branches in one batch;
    diffusers' guidance_scale is 1 + w. Two passes per step: the slow teacher rows a w-conditioned student (one pass)
    is compared with. `empty_emb`: the embedding of "" ([1, L, D] or one row per sample). `drop_condition`: the
    unconditional branch is the backbone alone (`both_branches`)."""

    def __init__(self, model: ConditionedDenoiser, empty_emb: torch.Tensor, w: float, drop_condition: bool = False):
        self.model, self.empty_emb, self.w, self.drop_condition = model, empty_emb, float(w), drop_condition

    def __call__(self, z_t: torch.Tensor, t, cond: torch.Tensor | None, text_emb: torch.Tensor):
        w = self.w
        (x_c, eps_c), (x_u, eps_u) = both_branches(self.model, z_t, t, cond, text_emb, self.empty_emb,
                                                   self.drop_condition)
        return (1 + w) * x_c - w * x_u, (1 + w) * eps_c - w * eps_u

    def bind(self, cond: torch.Tensor | None, text_emb: torch.Tensor):
        return lambda z_t, t: self(z_t, t, cond, text_emb)


def _timesteps(t, z_t: torch.Tensor) -> torch.Tensor:
    """An int or [B] timestep tensor on z_t's device."""
    t = torch.as_tensor(t, device=z_t.device)
    if t.ndim == 0:
        t = t.expand(z_t.shape[0])
    return t
