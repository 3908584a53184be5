"""Few-step samplers and the many-step teacher samplers.

Each few-step sampler is a plain function with one signature:

    sample_X(model, z_T, timesteps, schedule, *, fresh_noise=None, z_start=None) -> final model-space sample

where `model(z_t, t) -> (x_hat, eps_hat)` (a ConditionedDenoiser with its condition and text bound),
`timesteps` the descending trailing timesteps (`NoiseSchedule.trailing_timesteps`), and each step goes from t to
s = t - S//k exactly as diffusers' DDIMScheduler.step does (the last step lands on the final alpha); S, the span of
the run, is timesteps[0] + 1 (T from noise). A run from noise starts at z_T; one from the input (diffusers' img2img,
`strength` < 1) starts at `z_start` = alpha_t0 x_input + sigma_t0 z_T (`start_from`), z_T staying its noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .schedule import FINAL, NoiseSchedule, boundary_scalings

Model = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
FEW_STEP_SAMPLERS = ("prev", "ddim", "cm", "gd")
STOCHASTIC = ("cm", "gd")  # samplers that draw fresh noise each step (`step_noise`)
TEACHER_SAMPLERS = ("ddim", "dpm-solver++")


def initial_noise(seeds: Sequence[int], shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """z_T for a batch, one seed per row: randn on a CPU generator seeded with s, then moved to the device
    (the diffusers pipeline convention: same seed, same image as diffusers for a batch of one)."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


STEP_NOISE_STREAM = 0x5EED_F5E5  # the second word of each image's step-noise seed: a stream no initial noise uses


def step_noise(seeds: Sequence[int], shape: Sequence[int], steps: int, device=None, dtype=torch.float32) -> list[torch.Tensor]:
    """The fresh noise xi for each of the k steps of a stochastic sampler, drawn per row from its own generator
    seeded with SeedSequence([seed, STEP_NOISE_STREAM]) (64 bits), so it is independent of every row's initial
    noise (seeded with the plain seed: image i's fresh noise is not image i + 1's z_T) and of the other rows'
    streams; step j takes the j-th draw of that stream. Precomputed so a CUDA graph can replay it."""
    gens = [torch.Generator("cpu").manual_seed(_stream_seed(s)) for s in seeds]
    return [
        torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]).to(device=device, dtype=dtype)
        for _ in range(steps)
    ]


def _stream_seed(seed: int) -> int:
    return int(np.random.SeedSequence([int(seed), STEP_NOISE_STREAM]).generate_state(1, dtype=np.uint64)[0])


def is_stochastic(sampler: str) -> bool:
    """Whether the few-step sampler (or its form with a task's step, "cm+ilvr") draws fresh noise each step."""
    return split_sampler(sampler)[0] in STOCHASTIC


def fresh_noise(sampler: str, seeds: Sequence[int], shape: Sequence[int], steps: int, device=None,
                dtype=torch.float32) -> list[torch.Tensor] | None:
    """`step_noise` for a sampler that draws fresh noise each step (STOCHASTIC), None for the others."""
    return step_noise(seeds, shape, steps, device, dtype) if is_stochastic(sampler) else None


def start_from(x_input: torch.Tensor, z_T: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule) -> torch.Tensor:
    """Where a run from the input starts: the input in model space (`Backbone.to_model_space`) noised to the run's
    first timestep with the run's own noise, alpha_t0 x_input + sigma_t0 z_T (diffusers' img2img: its
    scheduler.add_noise of the encoded image at the first timestep). float32."""
    alpha, sigma = schedule.alpha_sigma(int(timesteps[0]), z_T)
    return alpha * x_input.float() + sigma * z_T.float()


def span_of(timesteps: Sequence[int]) -> int:
    """The span S of a run of trailing timesteps: its first timestep + 1 (T from noise)."""
    return int(timesteps[0]) + 1


def _few_step(model: Model, z_T: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule, noise_of_step,
              z_start: torch.Tensor | None = None) -> torch.Tensor:
    """The loop the few-step samplers share: z_s = alpha_s x_hat + sigma_s n_i, where only the noise
    direction n_i = noise_of_step(i, eps_hat) differs between them. Step i goes from t to
    s = t - S//k, as diffusers' DDIMScheduler.step computes it; the run starts at `z_start` (default z_T)."""
    z = z_T if z_start is None else z_start
    for i, t in enumerate(timesteps):
        s = schedule.previous_timestep(t, len(timesteps), span_of(timesteps))
        x_hat, eps_hat = model(z, torch.full((z.shape[0],), t, dtype=torch.long))
        alpha_s, sigma_s = schedule.alpha_sigma(s, z)
        z = alpha_s * x_hat + sigma_s * noise_of_step(i, eps_hat)
    return z


@torch.no_grad()
def sample_ddim(model: Model, z_T: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule, *, fresh_noise=None,
                z_start=None) -> torch.Tensor:
    """Deterministic DDIM (eq. 6/8): z_s = alpha_s x_hat + sigma_s eps_hat. Equals diffusers'
    DDIMScheduler(timestep_spacing="trailing", eta=0) step for step."""
    return _few_step(model, z_T, timesteps, schedule, lambda i, eps_hat: eps_hat, z_start)


@torch.no_grad()
def sample_prev(model: Model, z_T: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule, *, fresh_noise=None,
                z_start=None) -> torch.Tensor:
    """PREv sampler: z_s = alpha_s x_hat + sigma_s z_T. Reuses the initial noise, as training's
    PREv predictor (eq. 12) reuses the real noise eps (from the input too: z_T is the noise `start_from` added)."""
    return _few_step(model, z_T, timesteps, schedule, lambda i, eps_hat: z_T, z_start)


@torch.no_grad()
def sample_cm(model: Model, z_T: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule, *, fresh_noise=None,
              z_start=None) -> torch.Tensor:
    """Consistency-model multistep sampling (Song et al., "Consistency Models", Algorithm 1, as LCM serves it): each
    step's estimate is the boundary-scaled f(z_t, t) = c_skip(t) z_t + c_out(t) x_hat (`boundary_scalings`, the
    output cm training is consistent on), then z_s = alpha_s f(z_t, t) + sigma_s xi with a fresh xi each step
    (`fresh_noise[i]` for step i, from `step_noise`)."""
    if fresh_noise is None or len(fresh_noise) < len(timesteps):
        raise ValueError(f"cm sampling with {len(timesteps)} steps needs {len(timesteps)} fresh noise tensors")

    def consistency_function(z_t, t):
        x_hat, eps_hat = model(z_t, t)
        c_skip, c_out = boundary_scalings(t, z_t)
        return c_skip * z_t + c_out * x_hat, eps_hat

    return _few_step(consistency_function, z_T, timesteps, schedule, lambda i, eps_hat: fresh_noise[i], z_start)


@torch.no_grad()
def sample_gd(model: Model, z_T: torch.Tensor, timesteps: Sequence[int], schedule: NoiseSchedule, *, fresh_noise=None,
              z_start=None) -> torch.Tensor:
    """The stochastic sampler of "On Distillation of Guided Diffusion Models" (after Karras et al.): from t to
    s = t - T/k, first a deterministic DDIM step twice as long, to u = s - T/k,
        z_u = alpha_u x_hat + sigma_u (z_t - alpha_t x_hat) / sigma_t,
    then one stochastic step forward to s with the original length,
        z_s = (alpha_s / alpha_u) z_u + sigma_{s|u} xi,  sigma_{s|u}^2 = sigma_s^2 - (alpha_s / alpha_u)^2 sigma_u^2.
    The last step (s past t = 0) is the usual deterministic one. `fresh_noise[i]` is xi of step i."""
    if fresh_noise is None or len(fresh_noise) < len(timesteps):
        raise ValueError(f"gd sampling with {len(timesteps)} steps needs {len(timesteps)} fresh noise tensors")
    k, z, span = len(timesteps), z_T if z_start is None else z_start, span_of(timesteps)
    for i, t in enumerate(timesteps):
        s = schedule.previous_timestep(t, k, span)
        x_hat, eps_hat = model(z, torch.full((z.shape[0],), t, dtype=torch.long))
        if s == FINAL:
            alpha_s, sigma_s = schedule.alpha_sigma(s, z)
            z = alpha_s * x_hat + sigma_s * eps_hat
            continue
        u = s - span // k
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
def sampler_step(name: str, i: int, timesteps: Sequence[int], z_t: torch.Tensor, x_hat: torch.Tensor,
                 eps_hat: torch.Tensor, schedule: NoiseSchedule, z_T: torch.Tensor, fresh_noise=None) -> torch.Tensor:
    """Step i of the few-step sampler `name` on its own: from t = timesteps[i] to the next sample, given the
    model's (x_hat, eps_hat) at z_t. Iterating it over i gives what `few_step_sampler(name)` gives (a test
    checks it); step-level batching calls it once per row group per denoiser evaluation."""
    k, t, span = len(timesteps), timesteps[i], span_of(timesteps)
    s = schedule.previous_timestep(t, k, span)
    alpha_s, sigma_s = schedule.alpha_sigma(s, z_t)
    if name in ("cm", "gd") and (fresh_noise is None or len(fresh_noise) < k):
        raise ValueError(f"{name} sampling with {k} steps needs {k} fresh noise tensors")
    if name == "ddim" or (name == "gd" and s == FINAL):
        return alpha_s * x_hat + sigma_s * eps_hat
    if name == "prev":
        return alpha_s * x_hat + sigma_s * z_T
    if name == "cm":  # as sample_cm: the boundary-scaled estimate c_skip z_t + c_out x_hat, then fresh noise
        c_skip, c_out = boundary_scalings(t, z_t)
        return alpha_s * (c_skip * z_t + c_out * x_hat) + sigma_s * fresh_noise[i]
    if name == "gd":  # as sample_gd: a DDIM step twice as long to u, then noise forward to s
        u = s - span // k
        alpha_u, sigma_u = schedule.alpha_sigma(u if u >= 0 else FINAL, z_t)
        z_u = alpha_u * x_hat + sigma_u * eps_hat
        ratio = alpha_s / alpha_u
        return ratio * z_u + (sigma_s**2 - ratio**2 * sigma_u**2).clamp_min(0).sqrt() * fresh_noise[i]
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(FEW_STEP_SAMPLERS)}")


# ---------------------------------------------------------------------------------------------
# ILVR: keep the input's low frequencies (super-resolution)

ILVR = "+ilvr"  # the suffix of a few-step sampler run with the ILVR consistency step, e.g. "prev+ilvr"
ILVR_OUT = "+ilvr-out"  # ... with ILVR's update on the decoded output only, no per-step round trip, e.g. "prev+ilvr-out"
KEEP = "+keep"  # ... run with the edit's source-keeping step on the decoded output, e.g. "prev+keep" (`keep_source`)
# the steps each task's input makes possible: ILVR for super-resolution (the only task with a low-resolution input),
# the source-keeping step for edit (the only task whose input is the picture to keep)
TASK_STEPS = {"super-resolution": (ILVR, ILVR_OUT), "edit": (KEEP,)}


def servable_samplers(task: str) -> tuple[str, ...]:
    """What cdd-serve runs for `task`, as a request's or a manifest's sampler: the few-step samplers, and each
    of them with each of the task's own steps (`TASK_STEPS`)."""
    return FEW_STEP_SAMPLERS + tuple(name + step for step in TASK_STEPS.get(task, ()) for name in FEW_STEP_SAMPLERS)


def split_sampler(name: str) -> tuple[str, str]:
    """The few-step sampler and the task step it runs with: ("prev", "+ilvr") for "prev+ilvr", ("prev", "+ilvr-out")
    for "prev+ilvr-out", ("prev", "+keep") for "prev+keep", ("prev", "") for "prev"."""
    for step in (ILVR, ILVR_OUT, KEEP):
        if name.endswith(step):
            return name[: -len(step)], step
    return name, ""


def step_task(name: str) -> str | None:
    """The task a sampler's step is for ("super-resolution" for "prev+ilvr"), None for a plain sampler."""
    step = split_sampler(name)[1]
    return next((task for task, steps in TASK_STEPS.items() if step in steps), None) if step else None


def keeps_low_frequencies(step: str) -> bool:
    """Whether a task step (`split_sampler(name)[1]`) gives the decoded output the input's block means
    (`ilvr_output`): both ILVR steps do."""
    return step in (ILVR, ILVR_OUT)


class LowPass:
    """The low-pass phi = U D of ILVR for an image of `height` x `width` pixels and a down-scale `factor`:
    D averages each factor x factor block (area down-scaling), U brings the block means back up.

    U is the bicubic up-sampling (F.interpolate, align_corners=False, as the SR condition is made) followed
    by (D U_bicubic)^-1, so that D U = I. That makes phi a projection (phi phi = phi) whose output has the
    block means of its input (D phi = D), and an image that is already the bicubic up-sampling of a small one
    (the SR condition) passes unchanged. ILVR's update x - phi(x) + phi(y) then gives exactly the block
    means of y, with a smooth correction; the plain bicubic down-up pair of ILVR's code is no projection,
    so the update would only approach them. phi is separable: one matrix per axis, built in float64."""

    def __init__(self, height: int, width: int, factor: int):
        if factor < 1 or height % factor or width % factor:
            raise ValueError(f"an ILVR low-pass needs sides divisible by the factor {factor}, got {height}x{width}")
        self.factor = factor
        self.rows, self.cols = self.matrix(height, factor), self.matrix(width, factor)

    @staticmethod
    def matrix(length: int, factor: int) -> torch.Tensor:
        """The 1-D projection U (D U_bicubic)^-1 D, [length, length], float64."""
        n = length // factor
        down = torch.kron(torch.eye(n, dtype=torch.float64), torch.full((1, factor), 1 / factor, dtype=torch.float64))
        basis = torch.eye(n, dtype=torch.float64)[:, None, :, None]  # n one-pixel images of n x 1
        up = F.interpolate(basis, size=(length, 1), mode="bicubic", align_corners=False)[:, 0, :, 0].T  # [length, n]
        return up @ torch.linalg.solve(down @ up, down)

    def to(self, device) -> LowPass:
        """The same projection with its matrices kept on `device` in float32 (no copy per call: a CUDA graph
        may capture it)."""
        moved = object.__new__(LowPass)
        moved.factor = self.factor
        moved.rows, moved.cols = (m.to(device, torch.float32) for m in (self.rows, self.cols))
        return moved

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = (m.to(x.device, x.dtype) for m in (self.rows, self.cols))
        return torch.einsum("hk,...kl,wl->...hw", rows, x, cols)


def ilvr_correct(x_hat: torch.Tensor, reference_low: torch.Tensor, low: LowPass, *,
                 to_pixels: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 to_model: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """ILVR's update of one x_hat: x_hat - phi(x_hat) + phi(reference), in pixels (`to_pixels` / `to_model`
    decode and encode a latent x_hat); `reference_low` is phi(reference), computed once per sample."""
    x = (to_pixels(x_hat) if to_pixels is not None else x_hat).float()
    x = x - low(x) + reference_low.to(x.device, x.dtype)
    x = to_model(x) if to_model is not None else x
    return x.to(x_hat.dtype)


def ilvr_output(images: torch.Tensor, reference_low: torch.Tensor, low: LowPass) -> torch.Tensor:
    """ILVR's last update, on the decoded output of a `NAME+ilvr` or `NAME+ilvr-out` sample ([B, 3, H, W] in
    [-1, 1]): its block means set to the input's. On a pixel backbone the last x_hat of `NAME+ilvr` already has
    them (this changes nothing but rounding); on a latent backbone the final decode would otherwise bring back
    what the autoencoder's round trip loses at low frequencies (measured on the held-out photos: colour shifts),
    which the per-step correction in latent space cannot hold.

    `NAME+ilvr-out` is this update alone: no decode-correct-encode round trip at each step. On the latent
    backbone the round trips cost most of a super-resolution request (a VAE decode and encode per step) and
    bought nothing measurable over the update on the output (docs/results.md, "ILVR on the output only")."""
    return ilvr_correct(images, reference_low, low)


def ilvr(model: Model, reference: torch.Tensor, factor: int, *,
         to_pixels: Callable[[torch.Tensor], torch.Tensor] | None = None,
         to_model: Callable[[torch.Tensor], torch.Tensor] | None = None, low: LowPass | None = None,
         reference_low: torch.Tensor | None = None) -> Model:
    """`model` with the ILVR consistency step (Choi et al., "ILVR: Conditioning Method for Denoising Diffusion
    Probabilistic Models") on its x_hat: x_hat <- x_hat - phi(x_hat) + phi(reference), `phi` the `LowPass` of the
    SR factor. Every few-step sampler forms its next sample from the returned x_hat before adding its noise, so
    wrapping the model is the step; eps_hat, the noise direction, is kept.

    `reference`: the input in pixel space, [B, 3, H, W] in [-1, 1] (the SR condition, 2 c - 1). A latent backbone
    passes `to_pixels` (decode) and `to_model` (encode): x_hat is decoded, corrected in pixels and encoded back,
    so its low frequencies hold up to what the autoencoder's round trip keeps (`ilvr_output` then fixes the
    decoded output). `low`: a `LowPass` made beforehand (on the device), else one is made for the reference's size;
    `reference_low`: low(reference) when the caller has it already (it also needs it for `ilvr_output`)."""
    low = low or LowPass(reference.shape[-2], reference.shape[-1], factor)
    reference_low = low(reference.float()) if reference_low is None else reference_low

    def consistent(z_t, t):
        x_hat, eps_hat = model(z_t, t)
        return ilvr_correct(x_hat, reference_low, low, to_pixels=to_pixels, to_model=to_model), eps_hat

    return consistent


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


# ---------------------------------------------------------------------------------------------
# The edit's source-keeping step: give back what the autoencoder loses of the source, where the edit kept it

KEEP_GATE = (0.12, 0.24)  # mean |output - round trip| in [0, 1] units, 3 x 3 smoothed: residual kept fully below, none above
KEEP_GROW = 2  # pixels: the gate shut this far around wherever it is shut (no outline of a removed object comes back)


def keep_source(images: torch.Tensor, source: torch.Tensor, source_roundtrip: torch.Tensor,
                gate: tuple[float, float] = KEEP_GATE, grow: int = KEEP_GROW) -> torch.Tensor:
    """The decoded output of a `NAME+keep` edit ([B, 3, H, W] in [-1, 1]) with the autoencoder's error on the
    source added back where the output still is the source: x + g (source - D(E(source))), g = 1 where the output
    is within gate[0] of the source's round trip D(E(source)) (mean over channels of the absolute difference in
    [0, 1] units, averaged over 3 x 3 pixels, then its maximum within `grow` pixels), 0 beyond gate[1], linear
    between. Without the growth the gate opens part-way on the rim of an object the edit removed, and the
    source's sharp edge there (its largest round-trip error) comes back as a faint outline (seen on the tuning
    stream; growing by 2 px costs 0.06 dB of whole-image PSNR there and removes most of it).

    Why: on a latent backbone the output is decoded from latents, so even where the instruction changes nothing
    it is only as close to the source as the autoencoder's round trip (measured on the held-out edits: PSNR outside
    the changed region 28 dB, against the copy's exact pixels); an object's colour or its removal changes 6-8% of
    the picture, so that decides the whole-image distance. Where the output is the round trip of the source, adding
    the round trip's error gives the source's own pixels back; where the edit changed the picture (the gate is
    open), the source's detail would be wrong and nothing is added. On a pixel backbone the round trip is the
    identity and this changes nothing. `source_roundtrip`: D(E(2 c - 1)), made once per request."""
    source, source_roundtrip = source.to(images.dtype), source_roundtrip.to(images.dtype)
    d = (images - source_roundtrip).abs().mean(1, keepdim=True) * 0.5  # [-1, 1] -> [0, 1] units
    d = F.avg_pool2d(F.pad(d, (1, 1, 1, 1), mode="replicate"), 3, 1)
    if grow:
        d = F.max_pool2d(d, 2 * grow + 1, 1, grow)
    kept = 1 - ((d - gate[0]) / (gate[1] - gate[0])).clamp(0, 1)
    return images + kept * (source - source_roundtrip)


def source_roundtrip(source: torch.Tensor, backbone) -> torch.Tensor:
    """D(E(source)) in [-1, 1], float32, for `keep_source`: the `Backbone`'s autoencoder round trip (the source
    itself on a pixel backbone)."""
    if not backbone.latent:
        return source.float()
    return backbone.from_model_space(backbone.to_model_space(source.to(backbone.dtype))).float()
