"""Training objectives: Conditional Diffusion Distillation, and the baselines it is compared with.

CoDiLoss is Algorithm 1 of Mei et al., "CoDi: Conditional Diffusion Distillation for Higher-Fidelity
and Faster Image Generation" (section 4.2). DiffusionLoss is the
conditional fine-tuning baseline (the slow teacher). Consistency distillation of that teacher is
CoDiLoss with the teacher's DDIM step, boundary-scaled outputs and no guidance term (`build_objective`).
GuidanceDistillationLoss and ProgressiveDistillationLoss are the two stages of Guided Distillation
(Meng et al., "On Distillation of Guided Diffusion Models").

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

from ..runtime.diffusion.denoiser import both_branches
from ..runtime.diffusion.schedule import FINAL, NoiseSchedule, boundary_scalings
from .condition_metrics import changed_region
from .config import GUIDED_COND_TARGETS

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


def training_grid(N: int, num_train_timesteps: int) -> torch.Tensor:
    """The N timesteps CoDi trains on, ascending: t_n = round(n T / N) - 1, n = 1..N, diffusers' "trailing"
    spacing for N steps (t_n = n T/N - 1 when N divides T). It holds the served k-step timesteps whenever
    k divides N: N = 48 holds 999 (k = 1), 999, 499 (k = 2) and 999, 749, 499, 249 (k = 4)."""
    n = torch.arange(1, N + 1, dtype=torch.float64)
    return (n * num_train_timesteps / N).round().long() - 1


@dataclass
class CoDiLoss:
    """Conditional Diffusion Distillation, Algorithm 1 and eq. 11-12 of the CoDi paper, on the grid `training_grid`.

    At the boundary pair (n = 1, s = 0) the eps-space target is the noise the step to s put into z_hat_s (with
    PREv the true noise eps): the EMA network's eps_hat there is that noise + (alpha_s / sigma_s)(x_step - x_tgt_s),
    and alpha_0 / sigma_0 is about 155, so it is the networks' mismatch amplified, not a target; a target
    consistent with the step (x_tgt_s = x_step) gives exactly that noise. In x space the boundary is
    c_skip(0) = 1, c_out(0) = 0."""

    schedule: NoiseSchedule
    N: int = 48  # intervals of [0, T)
    r: float = 1.0  # weight of the conditional guidance term
    cond_weighting: str = "x"  # x: d_x(x_hat_t, x) (eq. 11); truncated-snr: max(alpha_t^2 / sigma_t^2, 1) d_x
    prev_predictor: str = "prev"  # prev (eq. 12) | ddim (eq. 6 with eps_hat) | teacher (eq. 6 with the frozen backbone)
    consistency_space: str = "eps"  # eps | x (boundary-scaled signal predictions)
    distance: str = "l2"
    huber_c: float = 1e-3
    same_t: bool = True  # one n for the whole batch (Algorithm 1); False: one per sample
    # Guidance-aware CoDi (design 5a): w ~ U[w_min, w_max] per sample; the step from t to s is the
    # classifier-free-guided teacher's, (1 + w) f(z_t, t, c, text) - w f(z_t, t, c, ""); the student and its EMA
    # target take w (`set_w`). None: plain CoDi.
    guidance: tuple[float, float] | None = None
    empty_text: torch.Tensor | None = None  # [1, L, D]: the embedding of "" (guided only)
    set_w: Callable[[torch.Tensor | None], None] | None = None  # passes w to the student's (and EMA's) adapter
    # guided only: the conditional guidance term's target is the data moved along the teacher's guidance direction,
    # x + w (x_c - x_u) (the data itself at w = 0); False: the data at every w, which anchors every w to the
    # unguided data (measured: the student then ignored w)
    guided_cond_term: bool = True
    # guided only, with guided_cond_term: the point moved along the direction, "data" (x + w (x_c - x_u)) or "teacher"
    # (x_c + w (x_c - x_u), the guided teacher's own x_hat: the same target in expectation when x_c = E[x | z_t], without
    # the data's spread around it, which at large t is far larger than the w-dependent part the student must learn)
    guided_cond_target: str = "data"
    # guided only: what the teacher's unconditional branch drops (denoiser.both_branches): "text" (the teacher with
    # the condition and ""), "text+condition" (the backbone alone with ""), or "text+condition-if-empty" (the
    # backbone alone for the samples whose prompt is "", the teacher with the condition and "" for the others)
    unconditional: str = "text"

    def __post_init__(self) -> None:
        if self.guidance is not None and (self.empty_text is None or self.set_w is None):
            raise ValueError("guided CoDi needs empty_text (the embedding of \"\") and set_w")
        if self.guidance is not None and self.prev_predictor == "ddim":
            raise ValueError("guided CoDi takes the step with the guided teacher: prev_predictor prev or teacher, not ddim")
        if self.guided_cond_target not in GUIDED_COND_TARGETS:
            raise ValueError(f"guided_cond_target {self.guided_cond_target!r} is not {' or '.join(GUIDED_COND_TARGETS)}")
        if self.unconditional not in UNCONDITIONAL:
            raise ValueError(f"unconditional {self.unconditional!r} is not one of {', '.join(UNCONDITIONAL)}")
        if self.prev_predictor not in ("prev", "ddim", "teacher"):
            raise ValueError(f"prev_predictor {self.prev_predictor!r} is not prev, ddim or teacher")
        if self.consistency_space not in ("eps", "x"):
            raise ValueError(f"consistency_space {self.consistency_space!r} is not eps or x")
        if self.cond_weighting not in ("x", "truncated-snr"):
            raise ValueError(f"cond_weighting {self.cond_weighting!r} is not x or truncated-snr")
        self.d = distance(self.distance, self.huber_c)
        grid = training_grid(self.N, self.schedule.num_train_timesteps)
        self.grid = torch.cat([torch.zeros(1, dtype=torch.long), grid])  # grid[n] = t_n, grid[0] = 0: the boundary

    def sample_n(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """n ~ U{1..N}: one value repeated over the batch, or one per sample."""
        n = torch.randint(1, self.N + 1, (1 if self.same_t else batch,), generator=generator)
        return n.repeat(batch) if self.same_t else n

    def __call__(self, student: Denoiser, ema_target: Denoiser, teacher: Denoiser | None,
                 x: torch.Tensor, c: torch.Tensor, text: torch.Tensor, generator: torch.Generator,
                 weight: torch.Tensor | None = None) -> Terms:
        """`weight`: optional per-element weights of the guidance term, broadcast against x
        (`changed_region_weight`); the consistency term stays unweighted."""
        n = self.sample_n(x.shape[0], generator)                                 # n ~ U{1..N}
        t, s = self.grid[n], self.grid[n - 1]                                    # t = t_n, s = t_(n-1) (0 for n = 1)
        eps = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)   # eps ~ N(0, I)
        alpha_t, sigma_t = self.schedule.alpha_sigma(t, x)
        alpha_s, sigma_s = self.schedule.alpha_sigma(s, x)
        z_t = alpha_t * x + sigma_t * eps                                        # eq. 1
        if self.guidance is not None:
            w = draw_w(x.shape[0], *self.guidance, generator)                  # w ~ U[w_min, w_max]
            self.set_w(w)                                                        # the student and theta^- take w
        x_hat_t, eps_hat_t = student(z_t, t, c, text)                            # with grad
        truth = x
        if self.guidance is not None:
            x_w, eps_w, shift = self.guided_teacher(teacher, z_t, t, c, text, w)
            x_step, eps_step = (x_w, eps) if self.prev_predictor == "prev" else (x_w, eps_w)   # eq. 12 / eq. 6
            if self.guided_cond_term:                 # x + w (x_c - x_u), or the guided teacher's x_w = x_c + w (x_c - x_u)
                truth = x + shift if self.guided_cond_target == "data" else x_w
        elif self.prev_predictor == "prev":
            x_step, eps_step = x_hat_t.detach(), eps                            # eq. 12: PREv, the real noise
        elif self.prev_predictor == "ddim":
            x_step, eps_step = x_hat_t.detach(), eps_hat_t.detach()              # eq. 6: DDIM step
        else:
            with torch.no_grad():
                x_step, eps_step = teacher(z_t, t, c, text)                      # eq. 6: the teacher's DDIM step
        z_hat_s = alpha_s * x_step + sigma_s * eps_step
        with torch.no_grad():
            x_tgt_s, eps_tgt_s = ema_target(z_hat_s, s, c, text)                 # theta^-, sg
        if self.guidance is not None:
            self.set_w(None)
        if self.consistency_space == "eps":
            boundary = (s == 0).to(x.device).reshape((-1,) + (1,) * (x.ndim - 1))
            eps_tgt_s = torch.where(boundary, eps_step, eps_tgt_s)               # s = 0: the step's own noise
            distillation = self.d(eps_hat_t, eps_tgt_s)                          # d_eps(eps_hat_t, eps_tgt_s)
        else:
            c_skip_t, c_out_t = boundary_scalings(t, x)
            c_skip_s, c_out_s = boundary_scalings(s, x)
            distillation = self.d(c_skip_t * z_t + c_out_t * x_hat_t, c_skip_s * z_hat_s + c_out_s * x_tgt_s)
        guess = x_hat_t
        if weight is not None:  # l2: the squared difference times the weight (huber: the difference by its root)
            root = weight.to(x_hat_t.dtype).sqrt()
            guess, truth = root * x_hat_t, root * truth
        if self.cond_weighting == "x":
            guidance = self.d(guess, truth)                                      # d_x(x_hat_t, x)
        else:
            # max(SNR_t, 1) d_x: at small t the eps-space loss (alpha/sigma)^2 |x_hat - x|^2 = |eps_hat - eps|^2,
            # which anchors how much noise the student removes there (the consistency term alone hands each t the
            # noise its EMA target leaves at s, so a shortfall near the boundary climbs the grid); at large t the
            # x-space loss of eq. 11. With l2 the squared difference is weighted; with huber, the difference by sqrt.
            root = truncated_snr(self.schedule, t, x).sqrt()
            guidance = self.d(root * guess, root * truth)
        loss = distillation + self.r * guidance                                  # eq. 11
        return Terms(loss, {"distillation": distillation.detach(), "guidance": guidance.detach()}, t)


    @torch.no_grad()
    def guided_teacher(self, teacher: Denoiser, z_t, t, c, text, w: torch.Tensor):
        """The classifier-free-guided teacher at (z_t, t): (1 + w) f(c, text) - w f(c, ""), for x_hat and eps_hat
        alike (the map from the raw output to both is linear); c goes to both branches, or (`unconditional`) the
        unconditional branch is the backbone alone with "". Also the guidance shift of x_hat, w (x_c - x_u)."""
        if self.unconditional == "text+condition-if-empty":  # the rows whose prompt is "" (caption dropout)
            empty = self.empty_text.to(text).expand_as(text)
            drop = torch.isclose(text, empty, atol=1e-5).flatten(1).all(dim=1)
        else:
            drop = self.unconditional == "text+condition"
        (x_c, eps_c), (x_u, eps_u) = both_branches(teacher, z_t, t, c, text, self.empty_text, drop)
        ww = w.to(z_t.device, z_t.dtype).reshape(-1, *([1] * (z_t.ndim - 1)))
        shift = ww * (x_c - x_u)
        return x_c + shift, (1 + ww) * eps_c - ww * eps_u, shift


def noise_removed(model: Denoiser, x: torch.Tensor, c: torch.Tensor | None, text: torch.Tensor, t: int,
                  eps: torch.Tensor, schedule: NoiseSchedule) -> float:
    """The fraction of the noise in z_t that `model`'s x_hat removes, at integer timestep t:

        f(t) = 1 - <x_hat - x, m> / <m, m>,   m = z_t / alpha_t - x = (sigma_t / alpha_t) eps,

    over the whole batch, with z_t = alpha_t x + sigma_t eps. m is the noise left by the trivial estimate
    x_hat = z_t / alpha_t (f = 0); a perfect denoiser gives f = 1; a model that keeps a part p of the noise
    (x_hat = x + p m + anything uncorrelated with eps) gives f = 1 - p. Blur and other errors that do not
    correlate with eps do not count: this measures the grain a model leaves, not its fidelity."""
    alpha_t, sigma_t = schedule.alpha_sigma(t, x)
    z_t = alpha_t * x + sigma_t * eps
    with torch.no_grad():
        x_hat, _ = model(z_t, torch.full((x.shape[0],), t, dtype=torch.long), c, text)
    m = (sigma_t / alpha_t * eps).double()
    return float(1 - ((x_hat.double() - x.double()) * m).sum() / (m * m).sum())


def changed_region_weight(target: torch.Tensor, source: torch.Tensor, size: tuple[int, int], weight: float,
                          threshold: float = 0.1) -> torch.Tensor:
    """Per-element loss weights [B, 1, h, w] for an edit pair: 1 + `weight` where the edit changes the picture, 1
    elsewhere, divided by each image's mean so that the loss keeps its scale. Changed: any channel of target and
    source (both in [-1, 1], [B, 3, H, W]) differs by more than `threshold`, max-pooled to `size` (the model
    space's resolution: a latent cell is changed when any pixel under it is). An edit that changes everything
    (time of day) or nothing is weighted 1 everywhere, the plain loss."""
    changed = changed_region(  # it reads [0, 1] images: the threshold halves
        (source + 1) / 2, (target + 1) / 2, threshold=threshold / 2, dilate=0).float()
    changed = torch.nn.functional.adaptive_max_pool2d(changed, size)
    w = 1 + weight * changed
    return w / w.mean(dim=(1, 2, 3), keepdim=True)


@dataclass
class DiffusionLoss:
    """Conditional fine-tuning: the plain denoising loss in the backbone's own parametrisation
    (eps, v or x, through `schedule.target`), t ~ U{0..T-1} per sample. The slow conditional teacher."""

    schedule: NoiseSchedule

    def __call__(self, student: Denoiser, ema_target: Denoiser | None, teacher: Denoiser | None,
                 x: torch.Tensor, c: torch.Tensor, text: torch.Tensor, generator: torch.Generator,
                 weight: torch.Tensor | None = None) -> Terms:
        """`weight`: optional per-element weights broadcast against x (`changed_region_weight`)."""
        t = torch.randint(0, self.schedule.num_train_timesteps, (x.shape[0],), generator=generator)
        eps = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        z_t = self.schedule.add_noise(x, eps, t)                                 # eq. 1
        x_hat_t, eps_hat_t = student(z_t, t, c, text)
        # `target` maps (signal, noise) to what the network outputs; applied to the predictions it
        # recovers the network's own output, so this is the loss in its native parametrisation.
        prediction = self.schedule.target(x_hat_t.float(), eps_hat_t.float(), t)
        err = (prediction - self.schedule.target(x.float(), eps.float(), t)).pow(2)
        loss = (err if weight is None else weight.to(err) * err).mean()
        return Terms(loss, {"diffusion": loss.detach()}, t)


def truncated_snr(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """w(lambda_t) = max(alpha_t^2 / sigma_t^2, 1): Salimans & Ho's "truncated SNR" weighting of an
    x-space loss (the larger of the x and the eps losses), used by progressive and guided distillation."""
    alpha_t, sigma_t = schedule.alpha_sigma(t, like)
    return (alpha_t**2 / sigma_t.clamp_min(1e-6) ** 2).clamp_min(1.0)


UNCONDITIONAL = ("text", "text+condition", "text+condition-if-empty")  # what a guided teacher's "" branch drops


def draw_w(batch: int, w_min: float, w_max: float, generator: torch.Generator) -> torch.Tensor:
    return w_min + (w_max - w_min) * torch.rand(batch, generator=generator)


@dataclass
class GuidanceDistillationLoss:
    """Guided Distillation stage 1: the student, which takes w,
    matches the classifier-free-guided teacher x~ = (1 + w) x_hat(z_t, c) - w x_hat(z_t, empty), w ~ U[w_min, w_max].
    The guidance is over the text prompt (the backbone was pretrained with caption dropout, so the empty
    prompt is its unconditional model); the condition image c is given to both branches.
    `set_w(w)` passes the per-sample w to the student's adapter."""

    schedule: NoiseSchedule
    empty_text: torch.Tensor  # [1, L, D]: the embedding of ""
    set_w: Callable[[torch.Tensor | None], None]
    w_min: float = 0.0
    w_max: float = 2.0

    def __call__(self, student: Denoiser, ema_target: Denoiser | None, teacher: Denoiser,
                 x: torch.Tensor, c: torch.Tensor, text: torch.Tensor, generator: torch.Generator) -> Terms:
        B = x.shape[0]
        w = draw_w(B, self.w_min, self.w_max, generator)                        # w ~ U[w_min, w_max]
        t = torch.randint(0, self.schedule.num_train_timesteps, (B,), generator=generator)
        xi = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)     # xi ~ N(0, I)
        z_t = self.schedule.add_noise(x, xi, t)                                  # z_t = alpha_t x + sigma_t xi
        with torch.no_grad():                                                    # both branches in one batch
            (x_c, _), (x_u, _) = both_branches(teacher, z_t, t, c, text, self.empty_text)
            ww = w.to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            x_tilde = (1 + ww) * x_c - ww * x_u                                  # the guided teacher
        self.set_w(w)
        x_hat, _ = student(z_t, t, c, text)
        self.set_w(None)
        weight = truncated_snr(self.schedule, t, x)                              # w(lambda_t)
        loss = (weight * (x_hat.float() - x_tilde.float()).pow(2)).mean()
        return Terms(loss, {"guided": loss.detach()}, t)


@dataclass
class ProgressiveDistillationLoss:
    """Guided Distillation stage 2, one round (progressive distillation, after Salimans & Ho):
    the student with k steps matches two DDIM steps of the teacher with 2k steps, t -> t' -> t'', through
    x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t). Steps follow the
    samplers' grid: t on the k-step trailing timesteps, t' = t - T//2k, t'' = t' - T//2k."""

    schedule: NoiseSchedule
    student_steps: int  # k
    set_w: Callable[[torch.Tensor | None], None]  # sets w on both the student's and the teacher's adapters
    w_min: float = 0.0
    w_max: float = 2.0

    def __call__(self, student: Denoiser, ema_target: Denoiser | None, teacher: Denoiser,
                 x: torch.Tensor, c: torch.Tensor, text: torch.Tensor, generator: torch.Generator) -> Terms:
        B, k, sched = x.shape[0], self.student_steps, self.schedule
        w = draw_w(B, self.w_min, self.w_max, generator)
        grid = torch.tensor(sched.trailing_timesteps(k))
        t = grid[torch.randint(0, k, (B,), generator=generator)]                 # t = i/N, i ~ U{1..N}
        half = sched.num_train_timesteps // (2 * k)
        t1 = t - half                                                            # t' = t - 0.5/N
        t2 = torch.where(t1 - half >= 0, t1 - half, torch.full_like(t1, FINAL))  # t'' = t - 1/N
        xi = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        alpha_t, sigma_t = sched.alpha_sigma(t, x)
        alpha_1, sigma_1 = sched.alpha_sigma(t1, x)
        alpha_2, sigma_2 = sched.alpha_sigma(t2, x)
        z_t = alpha_t * x + sigma_t * xi
        self.set_w(w)
        with torch.no_grad():                                                    # 2 steps of DDIM with the teacher
            x_a, eps_a = teacher(z_t, t, c, text)
            z_1 = alpha_1 * x_a + sigma_1 * eps_a
            x_b, eps_b = teacher(z_1, t1, c, text)
            z_2 = alpha_2 * x_b + sigma_2 * eps_b
            ratio = sigma_2 / sigma_t
            x_tilde = (z_2 - ratio * z_t) / (alpha_2 - ratio * alpha_t)
        x_hat, _ = student(z_t, t, c, text)
        self.set_w(None)
        weight = truncated_snr(sched, t, x)
        loss = (weight * (x_hat.float() - x_tilde.float()).pow(2)).mean()
        return Terms(loss, {"progressive": loss.detach()}, t)


def build_objective(config, schedule: NoiseSchedule, *, empty_text: torch.Tensor | None = None,
                    set_w: Callable[[torch.Tensor | None], None] | None = None):
    """The objective a TrainConfig asks for (`empty_text` and `set_w` are GD's: see the losses)."""
    if config.method == "finetune":
        return DiffusionLoss(schedule)
    if config.method == "cm":
        # Consistency distillation of the fine-tuned teacher: the teacher's DDIM step,
        # boundary-scaled x outputs against the EMA target, no conditional guidance term.
        return CoDiLoss(schedule, N=config.steps, r=0.0, prev_predictor="teacher", consistency_space="x",
                        distance=config.distance, huber_c=config.huber_c, same_t=config.same_t)
    if config.method == "gd":
        if config.gd_stage == 1:
            return GuidanceDistillationLoss(schedule, empty_text, set_w, config.guidance_min, config.guidance_max)
        return ProgressiveDistillationLoss(schedule, config.gd_steps, set_w, config.guidance_min, config.guidance_max)
    guided = config.adapter == "controlnet-guided"  # guidance-aware CoDi: the student takes w
    return CoDiLoss(
        schedule,
        guidance=(config.guidance_min, config.guidance_max) if guided else None,
        empty_text=empty_text if guided else None,
        set_w=set_w if guided else None,
        guided_cond_term=config.guided_cond_term,
        guided_cond_target=config.guided_cond_target,
        unconditional=config.guidance_unconditional,
        N=config.steps,
        r=config.cond_weight,
        cond_weighting=config.cond_weighting,
        prev_predictor=config.prev_predictor,
        consistency_space=config.consistency_space,
        distance=config.distance,
        huber_c=config.huber_c,
        same_t=config.same_t,
    )
