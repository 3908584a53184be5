"""Training objectives: Conditional Diffusion Distillation and plain conditional fine-tuning.

CoDiLoss is Algorithm 1 of Mei et al., "CoDi: Conditional Diffusion Distillation for Higher-Fidelity
and Faster Image Generation" (seed 000, section 4.2; design.md section 5). DiffusionLoss is the
conditional fine-tuning baseline (the slow teacher, design.md section 7).

Both take the same roles, each a callable `(z_t, t, c, text_emb) -> (x_hat, eps_hat)`:
`student` (the trained ConditionedDenoiser, with grad), `ema_target` (the same forward with the EMA
weights theta^-) and `teacher` (the frozen backbone without the adapter). Random draws come from the
`generator` passed in, on the CPU, so a run is reproducible on any device and resumable bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..runtime.schedule import NoiseSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Terms(NamedTuple):
    loss: torch.Tensor  # what is optimised
    parts: dict[str, torch.Tensor]  # the named terms of the loss, for logging
    t: torch.Tensor  # the timesteps used, [B]


def distance(kind: str, c: float = 1e-3) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """d(a, b) averaged over elements: `l2` (a - b)^2, `huber` pseudo-Huber sqrt((a - b)^2 + c^2) - c."""
    if kind == "l2":
        return lambda a, b: (a.float() - b.float()).pow(2).mean()
    if kind == "huber":
        return lambda a, b: ((a.float() - b.float()).pow(2) + c**2).sqrt().sub(c).mean()
    raise ValueError(f"unknown distance {kind!r}; choose l2 or huber")


def boundary_scalings(t: torch.Tensor, num_train_timesteps: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Consistency-model boundary scalings with sigma_data = 0.5 and time scaled by 10, as the public CoDi
    code does: c_skip = 0.25 / ((10 t')^2 + 0.25), c_out = 10 t' / sqrt((10 t')^2 + 0.25), on continuous
    time t' = t / T in [0, 1) (timestep 0 -> c_skip = 1, c_out = 0: the boundary condition f(z, 0) = z)."""
    u = 10 * torch.as_tensor(t, dtype=torch.float64).reshape((-1,) + (1,) * (like.ndim - 1)) / num_train_timesteps
    c_skip = 0.25 / (u**2 + 0.25)
    c_out = u / (u**2 + 0.25).sqrt()
    return c_skip.to(like.device, like.dtype), c_out.to(like.device, like.dtype)


@dataclass
class CoDiLoss:
    """Conditional Diffusion Distillation, Algorithm 1 and eq. 11-12 of seed 000."""

    schedule: NoiseSchedule
    N: int = 50  # intervals of [0, T)
    r: float = 1.0  # weight of the conditional guidance term
    prev_predictor: str = "prev"  # prev (eq. 12) | ddim (eq. 6 with eps_hat) | teacher (eq. 6 with the frozen backbone)
    consistency_space: str = "eps"  # eps | x (boundary-scaled signal predictions)
    distance: str = "l2"
    huber_c: float = 1e-3
    same_t: bool = True  # one n for the whole batch (Algorithm 1); False: one per sample

    def __post_init__(self) -> None:
        if self.prev_predictor not in ("prev", "ddim", "teacher"):
            raise ValueError(f"prev_predictor {self.prev_predictor!r} is not prev, ddim or teacher")
        if self.consistency_space not in ("eps", "x"):
            raise ValueError(f"consistency_space {self.consistency_space!r} is not eps or x")
        self.d = distance(self.distance, self.huber_c)

    def sample_n(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """n ~ U{1..N}: one value repeated over the batch, or one per sample."""
        n = torch.randint(1, self.N + 1, (1 if self.same_t else batch,), generator=generator)
        return n.repeat(batch) if self.same_t else n

    def __call__(self, student: Denoiser, ema_target: Denoiser, teacher: Denoiser | None,
                 x: torch.Tensor, c: torch.Tensor, text: torch.Tensor, generator: torch.Generator) -> Terms:
        T, N = self.schedule.num_train_timesteps, self.N
        n = self.sample_n(x.shape[0], generator)                                 # n ~ U{1..N}
        t = n * T // N - 1                                                       # t = n T/N - 1
        s = ((n - 1) * T // N - 1).clamp(min=0)                                  # s = max(t - T/N, 0)
        eps = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)   # eps ~ N(0, I)
        alpha_t, sigma_t = self.schedule.alpha_sigma(t, x)
        alpha_s, sigma_s = self.schedule.alpha_sigma(s, x)
        z_t = alpha_t * x + sigma_t * eps                                        # eq. 1
        x_hat_t, eps_hat_t = student(z_t, t, c, text)                            # with grad
        if self.prev_predictor == "prev":
            z_hat_s = alpha_s * x_hat_t.detach() + sigma_s * eps                 # eq. 12: PREv, the real noise
        elif self.prev_predictor == "ddim":
            z_hat_s = alpha_s * x_hat_t.detach() + sigma_s * eps_hat_t.detach()  # eq. 6: DDIM step
        else:
            with torch.no_grad():
                x_tea_t, eps_tea_t = teacher(z_t, t, c, text)
            z_hat_s = alpha_s * x_tea_t + sigma_s * eps_tea_t                    # eq. 6: the teacher's DDIM step
        with torch.no_grad():
            x_tgt_s, eps_tgt_s = ema_target(z_hat_s, s, c, text)                 # theta^-, sg
        if self.consistency_space == "eps":
            distillation = self.d(eps_hat_t, eps_tgt_s)                          # d_eps(eps_hat_t, eps_tgt_s)
        else:
            c_skip_t, c_out_t = boundary_scalings(t, T, x)
            c_skip_s, c_out_s = boundary_scalings(s, T, x)
            distillation = self.d(c_skip_t * z_t + c_out_t * x_hat_t, c_skip_s * z_hat_s + c_out_s * x_tgt_s)
        guidance = self.d(x_hat_t, x)                                            # d_x(x_hat_t, x)
        loss = distillation + self.r * guidance                                  # eq. 11
        return Terms(loss, {"distillation": distillation.detach(), "guidance": guidance.detach()}, t)


@dataclass
class DiffusionLoss:
    """Conditional fine-tuning: the plain denoising loss in the backbone's own parametrisation
    (eps, v or x, through `schedule.target`), t ~ U{0..T-1} per sample. The slow conditional teacher."""

    schedule: NoiseSchedule

    def __call__(self, student: Denoiser, ema_target: Denoiser | None, teacher: Denoiser | None,
                 x: torch.Tensor, c: torch.Tensor, text: torch.Tensor, generator: torch.Generator) -> Terms:
        t = torch.randint(0, self.schedule.num_train_timesteps, (x.shape[0],), generator=generator)
        eps = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        z_t = self.schedule.add_noise(x, eps, t)                                 # eq. 1
        x_hat_t, eps_hat_t = student(z_t, t, c, text)
        # `target` maps (signal, noise) to what the network outputs; applied to the predictions it
        # recovers the network's own output, so this is the loss in its native parametrisation.
        prediction = self.schedule.target(x_hat_t.float(), eps_hat_t.float(), t)
        loss = (prediction - self.schedule.target(x.float(), eps.float(), t)).pow(2).mean()
        return Terms(loss, {"diffusion": loss.detach()}, t)


def build_objective(config, schedule: NoiseSchedule) -> CoDiLoss | DiffusionLoss:
    """The objective a TrainConfig asks for."""
    if config.method == "finetune":
        return DiffusionLoss(schedule)
    return CoDiLoss(
        schedule,
        N=config.steps,
        r=config.cond_weight,
        prev_predictor=config.prev_predictor,
        consistency_space=config.consistency_space,
        distance=config.distance,
        huber_c=config.huber_c,
        same_t=config.same_t,
    )
