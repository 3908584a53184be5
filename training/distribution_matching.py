"""A distribution-level term for CoDi: distribution matching distillation (DMD) with a fake score adapter.

After Yin et al., "One-step Diffusion with Distribution Matching Distillation" (DMD) and its successor (DMD2): the
gradient of the reverse KL between the student's output distribution and the teacher's is the difference of two
scores at the re-noised student output, the teacher's ("real") and that of a second denoiser trained online on the
student's outputs ("fake"). Here the real score is the guided teacher of guidance-aware CoDi, classifier-free guided
at the student's own w, and the fake score is a w-conditioned copy of the teacher's ControlNet (the
`controlnet-guided` architecture, its w branch zero-initialised: it starts as the teacher at every w, as DMD2 starts
its fake score from the teacher). The frozen backbone UNet is shared by all three.

    t_s ~ {999 w.p. 1/2, else U{749, 499, 249}}; w ~ U[w_min, w_max]          the served timesteps, CoDi's w range
    x_hat = student(alpha_ts x + sigma_ts eps, t_s, c, text; w)                 one more student forward, with grad
    t ~ U{t_min..t_max} (20..980);  z = alpha_t sg(x_hat) + sigma_t eps'
    x_real = (1 + w) f_T(z, t, c, text) - w f_T(z, t, c / -, "")               the guided teacher (CoDi's own)
    x_fake = f_fake(z, t, c, text; w)                                           no grad
    g = (x_fake - x_real) / mean|x_hat - x_real|                                DMD's normalisation, per sample
    student: L += W * 0.5 * mean (x_hat - sg(x_hat - g))^2                      its gradient is W g / numel
    fake step:  the plain diffusion loss of f_fake on sg(x_hat) at w (its own AdamW)
    fake_steps - 1 more fake steps, each on fresh student outputs of the batch (new t_s, w, eps; no grad)

`from_input` > 0 (super-resolution, edit): that share of the rows is the served start from the input instead, one step
from z = alpha_t E(2 c - 1) + sigma_t eps at t = `from_input_t` (a request's `strength`, samplers.start_from), so the
term also matches the distribution of what one step from the input gives; 0 draws nothing more.

Plain CoDi (`--adapter controlnet`, its own teacher the backbone alone) takes the term too, with the fine-tuned
conditional entry (`--teacher`) as the real score at w = 0: x_real = f_T(z, t, c, text), the fake score at w = 0.

W = 0 builds nothing and draws nothing from the run's generator: the objective is today's, bit for bit. One fake
update per student step by default (the step's cost stays near the adversarial term's); DMD2 takes five, each on
new generator outputs, so that the fake score keeps up with the student (its "two time-scale update rule"):
`fake_steps` 5 is that, at about one student forward and one fake forward and backward more per extra update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapters.architectures import GuidedControlNetAdapter
from ..runtime.diffusion.denoiser import ConditionedDenoiser
from ..runtime.diffusion.schedule import NoiseSchedule
from .adversarial import served_student_timesteps
from .checkpoints import load_term_state, save_term_state
from .codi import DiffusionLoss, draw_w

FAKE_SCORE = "fake_score.safetensors"
FAKE_SCORE_OPTIMIZER = "fake_score_optimizer.pt"


@dataclass
class DistributionMatchingTerm:
    """The term and its fake score (see the module's docstring). `__call__(terms, ...)` takes CoDi's Terms, adds
    W * the student's DMD loss, and takes one step of the fake score on this step's student outputs."""

    schedule: NoiseSchedule
    fake: ConditionedDenoiser  # the shared frozen UNet with the trained fake adapter (controlnet-guided)
    optimizer: torch.optim.Optimizer
    weight: float
    guided_teacher: Callable  # CoDiLoss.guided_teacher: (teacher, z, t, c, text, w) -> (x_w, eps_w, shift)
    teacher: ConditionedDenoiser
    set_w: Callable[[torch.Tensor | None], None]  # the student's w
    guidance: tuple[float, float] = (0.0, 3.0)
    t_min: int = 20
    t_max: int = 980
    p_one_step: float = 0.5
    fake_steps: int = 1  # fake score updates per student step
    from_input: float = 0.0  # the share of student predictions made one step from the input (see the module docstring)
    from_input_t: int = 499
    encode: Callable | None = None  # images in [-1, 1] -> model space (Backbone.to_model_space), for `from_input`

    def __post_init__(self) -> None:
        self.denoising = DiffusionLoss(self.schedule)

    @property
    def fake_adapter(self) -> GuidedControlNetAdapter:
        return self.fake.adapter

    def __call__(self, terms, student, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor,
                 generator: torch.Generator):
        x_hat, w = self.student_outputs(student, x, c, text, generator)      # with grad
        matching = self.matching_loss(x_hat, c, text, w, generator)
        fake_loss = self.fake_step(x_hat.detach(), c, text, w, generator)
        for _ in range(self.fake_steps - 1):
            with torch.no_grad():
                x_more, w_more = self.student_outputs(student, x, c, text, generator)
            fake_loss = self.fake_step(x_more, c, text, w_more, generator)
        parts = {**terms.parts, "dmd": matching.detach(), "fake_score": fake_loss}
        return type(terms)(terms.loss + self.weight * matching, parts, terms.t)

    def student_outputs(self, student, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's x_hat from a served timestep at a drawn w (and that w), as a request would get it: from the
        noised truth, or (a `from_input` share of the rows) from the noised input."""
        B = x.shape[0]
        t_s = served_student_timesteps(self.schedule, B, self.p_one_step, generator)
        w = draw_w(B, *self.guidance, generator)
        eps = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        z = self.schedule.add_noise(x, eps, t_s)
        if self.from_input:
            rows = torch.rand(B, generator=generator) < self.from_input
            if rows.any():
                t_s = torch.where(rows, torch.full_like(t_s, self.from_input_t), t_s)
                with torch.no_grad():
                    start = self.encode(c[rows.to(c.device)].float() * 2 - 1).to(x.device, x.dtype)
                z = z.clone()
                z[rows.to(z.device)] = self.schedule.add_noise(start, eps[rows.to(eps.device)], self.from_input_t)
        self.set_w(w)
        try:
            return student(z, t_s, c, text)[0], w
        finally:
            self.set_w(None)

    def score_difference(self, x_hat: torch.Tensor, c: torch.Tensor, text: torch.Tensor, w: torch.Tensor,
                         generator: torch.Generator) -> torch.Tensor:
        """g = (x_fake - x_real) / mean|x_hat - x_real| at a random t (the DMD gradient of the student's x_hat)."""
        B = x_hat.shape[0]
        t = torch.randint(self.t_min, self.t_max + 1, (B,), generator=generator)
        eps = torch.randn(x_hat.shape, generator=generator).to(x_hat.device, x_hat.dtype)
        with torch.no_grad():
            z = self.schedule.add_noise(x_hat.detach(), eps, t)
            x_real = self.guided_teacher(self.teacher, z, t, c, text, w)[0]
            self.fake_adapter.set_guidance(w)
            try:
                x_fake = self.fake(z, t, c, text)[0]
            finally:
                self.fake_adapter.set_guidance(None)
            scale = (x_hat.detach() - x_real).float().abs().mean(dim=tuple(range(1, x_hat.ndim)), keepdim=True)
            return torch.nan_to_num((x_fake - x_real).float() / scale.clamp_min(1e-8))

    def matching_loss(self, x_hat, c, text, w, generator) -> torch.Tensor:
        g = self.score_difference(x_hat, c, text, w, generator)
        return 0.5 * F.mse_loss(x_hat.float(), (x_hat.detach().float() - g))

    def fake_step(self, x_hat: torch.Tensor, c: torch.Tensor, text: torch.Tensor, w: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
        """One AdamW step of the fake adapter on the plain diffusion loss of the student's outputs (at their w)."""
        self.fake_adapter.set_guidance(w)
        try:
            with torch.enable_grad():
                loss = self.denoising(self.fake, None, None, x_hat, c, text, generator).loss
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
        finally:
            self.fake_adapter.set_guidance(None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    # checkpoints: two more files in the checkpoint folder (hashed in its state.json like the others)
    def save(self, folder: Path) -> None:
        save_term_state(folder, self.fake_adapter, self.optimizer, FAKE_SCORE, FAKE_SCORE_OPTIMIZER)

    def load(self, folder: Path) -> None:
        load_term_state(folder, self.fake_adapter, self.optimizer, FAKE_SCORE, FAKE_SCORE_OPTIMIZER, "fake score")


def conditional_prediction(teacher, z_t, t, c, text, w: torch.Tensor):
    """The real score of plain CoDi's DMD: the conditional teacher's own prediction (w = 0; `guided_teacher`'s
    signature, its guidance shift zero)."""
    x, eps = teacher(z_t, t, c, text)
    return x, eps, torch.zeros_like(x)


def build_distribution_matching(config, roles, objective, device: torch.device,
                                encode: Callable | None = None) -> DistributionMatchingTerm | None:
    """The term a TrainConfig asks for, or None (dmd_weight 0). Guidance-aware CoDi: its guided teacher, at the
    student's w, is the real score. Plain CoDi (whose own teacher is the backbone alone): the conditional entry named
    by `config.teacher` is, at w = 0 (TrainConfig checks that one is named). The fake score starts as a copy of the
    real score's ControlNet. `encode` (Backbone.to_model_space): the input's encoder, for `dmd_from_input`."""
    if not config.dmd_weight:
        return None
    guided = config.adapter == "controlnet-guided"
    teacher = roles.teacher if guided else roles.real_score
    fake_adapter = GuidedControlNetAdapter.from_controlnet(teacher.adapter).to(device).float().requires_grad_(True)
    fake_adapter.train()
    fake = ConditionedDenoiser(teacher.unet, teacher.schedule, fake_adapter)
    optimizer = torch.optim.AdamW(fake_adapter.parameters(), lr=config.dmd_lr, weight_decay=0.0)
    return DistributionMatchingTerm(teacher.schedule, fake, optimizer, config.dmd_weight,
                                    objective.guided_teacher if guided else conditional_prediction, teacher,
                                    roles.set_w, guidance=(config.guidance_min, config.guidance_max) if guided else (0.0, 0.0),
                                    t_min=config.dmd_t_min, t_max=config.dmd_t_max, p_one_step=config.dmd_one_step,
                                    fake_steps=config.dmd_fake_steps, from_input=config.dmd_from_input,
                                    from_input_t=config.dmd_from_input_t, encode=encode)
