"""The backbone's noise schedule and the one place that converts parametrisations.

For integer t in [0, T), abar_t = alphas_cumprod[t],
alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), and z_t = alpha_t x + sigma_t eps (eq. 1).
The alphas come from diffusers' own scheduler built from the backbone's scheduler config, so
our numbers are diffusers' numbers bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FINAL = -1
"""Timestep index meaning 'past the last step': its alpha is the scheduler's final alpha."""


@dataclass(frozen=True)
class NoiseSchedule:
    alphas_cumprod: torch.Tensor  # float32, [T], CPU
    final_alpha_cumprod: float  # abar used for the step past t = 0 (DDIM's set_alpha_to_one)
    prediction_type: str

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}"
            )
        if self.prediction_type == "epsilon" and float(self.alphas_cumprod[-1]) == 0.0:
            # zero terminal SNR (rescale_betas_zero_snr): z_T is pure noise, so eps_hat says nothing of x
            raise ValueError("a zero-terminal-SNR schedule (alpha_T = 0) needs prediction_type v_prediction or sample, "
                             "not epsilon")

    @classmethod
    def from_scheduler_config(cls, config: dict, prediction_type: str | None = None) -> NoiseSchedule:
        """Build from a diffusers scheduler config (any DDPM-family scheduler's config)."""
        ddim = DDIMScheduler.from_config(dict(config))
        return cls(
            alphas_cumprod=ddim.alphas_cumprod.to(torch.float32).clone(),
            final_alpha_cumprod=float(ddim.final_alpha_cumprod),
            prediction_type=prediction_type or ddim.config.prediction_type,
        )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """abar_t for an integer tensor t; t < 0 gives the final alpha (the step past t = 0)."""
        t = torch.as_tensor(t, dtype=torch.long)
        table = torch.cat([self.alphas_cumprod, torch.tensor([self.final_alpha_cumprod])])
        return table[torch.where(t < 0, torch.full_like(t, self.num_train_timesteps), t)]

    def alpha_sigma(self, t: torch.Tensor | int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t and sigma_t shaped to broadcast against `like` ([B, ...]), on its device."""
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1).cpu()
        abar = self.abar(t).to(torch.float64)
        shape = (-1,) + (1,) * (like.ndim - 1)
        alpha = abar.sqrt().reshape(shape).to(like.device, like.dtype)
        sigma = (1 - abar).sqrt().reshape(shape).to(like.device, like.dtype)
        return alpha, sigma

    def add_noise(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """eq. 1: z_t = alpha_t x + sigma_t eps."""
        alpha_t, sigma_t = self.alpha_sigma(t, x)
        return alpha_t * x + sigma_t * eps

    def to_x_eps(self, out: torch.Tensor, z_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Whatever the network predicts -> (x_hat, eps_hat). Samplers and losses never see `out`."""
        alpha_t, sigma_t = self.alpha_sigma(t, z_t)
        if self.prediction_type == "epsilon":
            eps_hat = out
            x_hat = (z_t - sigma_t * eps_hat) / alpha_t
        elif self.prediction_type == "v_prediction":  # eq. 7
            x_hat = alpha_t * z_t - sigma_t * out
            eps_hat = sigma_t * z_t + alpha_t * out
        else:  # sample
            x_hat = out
            eps_hat = (z_t - alpha_t * x_hat) / sigma_t
        return x_hat, eps_hat

    def target(self, x: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """What the network should output for clean x and noise eps (the plain diffusion loss's target)."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x
        alpha_t, sigma_t = self.alpha_sigma(t, x)
        return alpha_t * eps - sigma_t * x  # v = alpha eps - sigma x

    def span(self, strength: float = 1.0) -> int:
        """The training timesteps a run of `strength` covers (`strength_span`)."""
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        return strength_span(strength, self.num_train_timesteps)

    def trailing_timesteps(self, k: int, strength: float = 1.0) -> list[int]:
        """diffusers' "trailing" spacing over the span S = `span(strength)`: round(arange(S, 0, -S/k)) - 1 (k=4,
        T=1000, strength 1: 999, 749, 499, 249; k=1, strength 0.5: 499). The first timestep is always S - 1."""
        span = self.span(strength)
        if not 1 <= k <= span:
            raise ValueError(f"steps must be in 1..{span}" + (f" at strength {strength:g}" if span < self.num_train_timesteps
                                                                else "") + f", got {k}")
        return [int(v) for v in (torch.arange(span, 0, -span / k, dtype=torch.float64).round() - 1).long()]

    def previous_timestep(self, t: int, k: int, span: int | None = None) -> int:
        """Where a k-step DDIM step from t lands: t - S // k, S the span of the run (`span`; default T, a run
        from noise), as diffusers' DDIMScheduler.step computes it (for k = 3 this is one off the next trailing
        timestep; we follow diffusers to stay step-for-step equal). Negative means the final alpha."""
        s = t - (span or self.num_train_timesteps) // k
        return s if s >= 0 else FINAL


def strength_span(strength: float, num_train_timesteps: int) -> int:
    """The training timesteps a run of `strength` covers: round(strength T), at least 1 (strength 1: all T; a run that
    starts from the input, as diffusers' img2img `strength`, covers the last strength T of them)."""
    return max(1, round(strength * num_train_timesteps))


def boundary_scalings(t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Consistency-model boundary scalings with sigma_data = 0.5 on the integer timestep t scaled by 10, as the
    public CoDi and LCM code compute them: c_skip = 0.25 / ((10 t)^2 + 0.25), c_out = 10 t / sqrt((10 t)^2 + 0.25).
    t = 0 gives c_skip = 1, c_out = 0 (the boundary condition f(z, 0) = z); for t >= 1, c_skip < 3e-3 and
    c_out > 0.998, so away from the boundary the output is the network's own x_hat, as there."""
    t = torch.as_tensor(t, dtype=torch.float64).clamp_min(0)  # FINAL (past t = 0) is the boundary too
    u = 10 * t.reshape((-1,) + (1,) * (like.ndim - 1))
    c_skip = 0.25 / (u**2 + 0.25)
    c_out = u / (u**2 + 0.25).sqrt()
    return c_skip.to(like.device, like.dtype), c_out.to(like.device, like.dtype)
