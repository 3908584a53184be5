"""Few-step samplers and the many-step teacher samplers.

Each few-step sampler is a plain function with one signature:

    sample_X(model, z_T, timesteps, schedule, *, fresh_noise=None) -> final model-space sample

where `model(z_t, t) -> (x_hat, eps_hat)` (a ConditionedDenoiser with its condition and text bound),
`timesteps` the descending trailing timesteps, and each step goes from t to s = t - T//k exactly as
diffusers' DDIMScheduler.step does (the last step lands on the final alpha).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .schedule import FINAL, NoiseSchedule

Model = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
FEW_STEP_SAMPLERS = ("prev", "ddim", "cm", "gd")
STOCHASTIC = ("cm", "gd")  # samplers that draw fresh noise each step (`step_noise`)
TEACHER_SAMPLERS = ("ddim", "dpm-solver++")


def initial_noise(seeds: Sequence[int], shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """z_T for a batch, one seed per row: randn on a CPU generator seeded with s, then moved to the device
    (the diffusers pipeline convention: same seed, same image as diffusers for a batch of one)."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


def step_noise(seeds: Sequence[int], shape: Sequence[int], steps: int, device=None, dtype=torch.float32) -> list[torch.Tensor]:
    """The fresh noise xi for each of the k `cm` steps, drawn per row from a generator seeded with
    seed + 1 (so it never repeats the initial noise); precomputed so a CUDA graph can replay it."""
    gens = [torch.Generator("cpu").manual_seed(int(s) + 1) for s in seeds]
    return [
        torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]).to(device=device, dtype=dtype)
        for _ in range(steps)
    ]


def fresh_noise(sampler: str, seeds: Sequence[int], shape: Sequence[int], steps: int, device=None,
                dtype=torch.float32) -> list[torch.Tensor] | None:
    """`step_noise` for a sampler that draws fresh noise each step (STOCHASTIC), None for the others."""
    return step_noise(seeds, shape, steps, device, dtype) if sampler in STOCHASTIC else None


def _few_step(model: Model, z_T: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule, noise_of_step) -> torch.Tensor:
    """The loop the few-step samplers share: z_s = alpha_s x_hat + sigma_s n_i, where only the noise
    direction n_i = noise_of_step(i, eps_hat) differs between them. Step i goes from t to
    s = t - T//k, as diffusers' DDIMScheduler.step computes it."""
    z = z_T
    for i, t in enumerate(timesteps):
        s = schedule.previous_timestep(t, len(timesteps))
        x_hat, eps_hat = model(z, torch.full((z.shape[0],), t, dtype=torch.long))
        alpha_s, sigma_s = schedule.alpha_sigma(s, z)
        z = alpha_s * x_hat + sigma_s * noise_of_step(i, eps_hat)
    return z


@torch.no_grad()
def sample_ddim(model: Model, z_T: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule, *, fresh_noise=None) -> torch.Tensor:
    """Deterministic DDIM (eq. 6/8): z_s = alpha_s x_hat + sigma_s eps_hat. Equals diffusers'
    DDIMScheduler(timestep_spacing="trailing", eta=0) step for step."""
    return _few_step(model, z_T, timesteps, schedule, lambda i, eps_hat: eps_hat)


@torch.no_grad()
def sample_prev(model: Model, z_T: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule, *, fresh_noise=None) -> torch.Tensor:
    """PREv sampler: z_s = alpha_s x_hat + sigma_s z_T. Reuses the initial noise, as training's
    PREv predictor (eq. 12) reuses the real noise eps."""
    return _few_step(model, z_T, timesteps, schedule, lambda i, eps_hat: z_T)


@torch.no_grad()
def sample_cm(model: Model, z_T: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule, *, fresh_noise=None) -> torch.Tensor:
    """Consistency-model multistep sampling: z_s = alpha_s x_hat + sigma_s xi with a fresh xi each step
    (`fresh_noise[i]` for step i, from `step_noise`)."""
    if fresh_noise is None or len(fresh_noise) < len(timesteps):
        raise ValueError(f"cm sampling with {len(timesteps)} steps needs {len(timesteps)} fresh noise tensors")
    return _few_step(model, z_T, timesteps, schedule, lambda i, eps_hat: fresh_noise[i])


@torch.no_grad()
def sample_gd(model: Model, z_T: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule, *, fresh_noise=None) -> torch.Tensor:
    """The stochastic sampler of "On Distillation of Guided Diffusion Models" (after Karras et al.): from t to
    s = t - T/k, first a deterministic DDIM step twice as long, to u = s - T/k,
        z_u = alpha_u x_hat + sigma_u (z_t - alpha_t x_hat) / sigma_t,
    then one stochastic step forward to s with the original length,
        z_s = (alpha_s / alpha_u) z_u + sigma_{s|u} xi,  sigma_{s|u}^2 = sigma_s^2 - (alpha_s / alpha_u)^2 sigma_u^2.
    The last step (s past t = 0) is the usual deterministic one. `fresh_noise[i]` is xi of step i."""
    if fresh_noise is None or len(fresh_noise) < len(timesteps):
        raise ValueError(f"gd sampling with {len(timesteps)} steps needs {len(timesteps)} fresh noise tensors")
    k, z = len(timesteps), z_T
    for i, t in enumerate(timesteps):
        s = schedule.previous_timestep(t, k)
        x_hat, eps_hat = model(z, torch.full((z.shape[0],), t, dtype=torch.long))
        if s == FINAL:
            alpha_s, sigma_s = schedule.alpha_sigma(s, z)
            z = alpha_s * x_hat + sigma_s * eps_hat
            continue
        u = s - schedule.num_train_timesteps // k
        u = u if u >= 0 else FINAL
        alpha_u, sigma_u = schedule.alpha_sigma(u, z)
        alpha_s, sigma_s = schedule.alpha_sigma(s, z)
        z_u = alpha_u * x_hat + sigma_u * eps_hat  # eps_hat = (z_t - alpha_t x_hat) / sigma_t
        ratio = alpha_s / alpha_u
        sigma_su = (sigma_s**2 - ratio**2 * sigma_u**2).clamp_min(0).sqrt()
        z = ratio * z_u + sigma_su * fresh_noise[i]
    return z


FEW_STEP = {"ddim": sample_ddim, "prev": sample_prev, "cm": sample_cm, "gd": sample_gd}


def few_step_sampler(name: str):
    if name not in FEW_STEP:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(FEW_STEP_SAMPLERS)}")
    return FEW_STEP[name]


@torch.no_grad()
def sample_with_scheduler(
    model: Model,
    z_T: torch.Tensor,
    steps: int,
    schedule: NoiseSchedule,
    scheduler_config: dict,
    name: str = "ddim",
) -> torch.Tensor:
    """Many-step teacher sampling through diffusers' own schedulers: `ddim` (DDIMScheduler, trailing
    spacing, eta 0) or `dpm-solver++` (DPMSolverMultistepScheduler, algorithm_type dpmsolver++, 2nd order).
    The scheduler is fed the backbone's native output so diffusers does the parametrisation handling."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddim":
        scheduler = DDIMScheduler.from_config(scheduler_config, timestep_spacing="trailing")
    elif name == "dpm-solver++":
        scheduler = DPMSolverMultistepScheduler.from_config(
            scheduler_config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"
        )
    else:
        raise ValueError(f"unknown teacher sampler {name!r}; choose one of {', '.join(TEACHER_SAMPLERS)}")
    scheduler.set_timesteps(steps, device=z_T.device)
    z = z_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        tt = torch.full((z.shape[0],), int(t), dtype=torch.long)
        x_hat, eps_hat = model(scheduler.scale_model_input(z, t), tt)
        out = _native(schedule, x_hat, eps_hat, z, tt)
        z = scheduler.step(out, t, z).prev_sample
    return z


def _native(schedule: NoiseSchedule, x_hat, eps_hat, z_t, t) -> torch.Tensor:
    """(x_hat, eps_hat) back to the backbone's own parametrisation (for diffusers' schedulers)."""
    if schedule.prediction_type == "epsilon":
        return eps_hat
    if schedule.prediction_type == "sample":
        return x_hat
    alpha_t, sigma_t = schedule.alpha_sigma(t, z_t)
    return alpha_t * eps_hat - sigma_t * x_hat
