"""A distribution-level term for CoDi: a discriminator on the frozen backbone's own features (LADD-style).

After adversarial diffusion distillation (Sauer et al., ADD) and its latent successor (LADD): the student's
prediction x_hat from a served timestep is re-noised at a random t', the FROZEN backbone UNet (without the adapter)
reads it with the caption, and small trained heads on the UNet's encoder features (conv_in, every down-block
residual, the mid block: what the UNet hands its decoder) tell it from re-noised data latents. Hinge loss for the
heads; the student's term is -D(features of the re-noised x_hat), added to CoDi's loss with weight W
(`--adversarial-weight`). W = 0 builds nothing and draws nothing: the objective is today's, bit for bit.

    t_s ~ {999 w.p. 1/2, else U{749, 499, 249}}        the served 1/2/4-step timesteps, 1-step half the time
    z = alpha_ts x + sigma_ts eps;  x_hat = student(z, t_s, c, text)          one more student forward, with grad
    t' ~ U{0..t_max} (249);  eps' ~ N(0, I)
    F(u) = UNet encoder features of (alpha_t' u + sigma_t' eps', t', text)    frozen; grad flows to u only
    D step:  L_D = mean relu(1 - D(F(x), c)) + mean relu(1 + D(F(sg x_hat), c))       (its own AdamW)
    student: L += W * (-mean D(F(x_hat), c))                                   D frozen for this term

D(F, c) = the mean over levels and positions of each level's head, conv3x3 -> GroupNorm -> LeakyReLU -> conv1x1,
on that level's features concatenated with the condition image resized to the level (so D judges the pair, not
only realism: a super-resolution output must also match its input). With `--adversarial-text` each head also reads
the caption, as a projection discriminator does (Miyato & Koyama; ADD's discriminator is text-conditioned the same
way): logit += <h, P e>, h the head's hidden features averaged over positions, e the caption's token embeddings
averaged, P a linear map per head. Without it the caption reaches D only through the frozen UNet's cross-attention,
and a depth student's one-step colours drifted away from the caption under the term (docs/results.md).

A w-conditioned student (guidance-aware CoDi, `controlnet-guided`) is judged at w = 0: the discriminator's real
samples are the data, which is the distribution of the unguided (w = 0) student; a guided output at w > 0 is meant
to differ from it. A one-step request is served at w = 0, so that is also the path the term is for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.diffusion.schedule import NoiseSchedule
from .checkpoints import load_term_state, save_term_state

DISCRIMINATOR = "discriminator.safetensors"
DISCRIMINATOR_OPTIMIZER = "discriminator_optimizer.pt"


class _Stop(Exception):
    """Raised by the mid-block hook: the decoder half of the UNet is not needed for the features."""


def unet_features(unet: nn.Module, z: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor) -> list[torch.Tensor]:
    """The UNet's encoder features at (z, t, text): conv_in's output, every down block's residuals and the mid
    block's output, in that order, from the UNet's own forward (hooks); it stops after the mid block."""
    feats: list[torch.Tensor] = []

    def conv_in(_m, _inp, out):
        feats.append(out)

    def down(_m, _inp, out):
        feats.extend(out[1])

    def mid(_m, _inp, out):
        feats.append(out)
        raise _Stop

    hooks = [unet.conv_in.register_forward_hook(conv_in), unet.mid_block.register_forward_hook(mid)]
    hooks += [block.register_forward_hook(down) for block in unet.down_blocks]
    try:
        unet(z, t, encoder_hidden_states=text_emb, return_dict=False)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return feats


def feature_channels(unet: nn.Module, latent_size: int, text_dim: int) -> list[int]:
    """The channel count of each `unet_features` level (one probe forward)."""
    p = next(unet.parameters())
    z = torch.zeros(1, unet.config.in_channels, latent_size, latent_size, device=p.device, dtype=p.dtype)
    text = torch.zeros(1, 1, text_dim, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        return [f.shape[1] for f in unet_features(unet, z, torch.zeros(1, dtype=torch.long, device=p.device), text)]


class FeatureDiscriminator(nn.Module):
    """One small head per feature level: conv3x3(C + cond) -> GroupNorm -> LeakyReLU(0.2) -> conv1x1 -> 1 logit per
    position; `forward` returns the per-level mean logits [B, levels]. With `text_dim`, each level's logit also gets
    the projection term <mean h, P e> of the caption embedding e (tokens averaged) and the head's hidden features h."""

    def __init__(self, channels: list[int], cond_channels: int = 3, hidden: int = 64, text_dim: int | None = None):
        super().__init__()
        self.cond_channels = cond_channels
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c + cond_channels, hidden, 3, padding=1), nn.GroupNorm(8, hidden),
                          nn.LeakyReLU(0.2), nn.Conv2d(hidden, 1, 1))
            for c in channels)
        # text_dim: the projection term <h, P e> per head (None: the heads do not read the caption). P starts at zero,
        # so the discriminator starts as the one without it (and the heads' initialisation is the same draw).
        self.text = None if text_dim is None else nn.ModuleList(nn.Linear(text_dim, hidden, bias=False) for _ in channels)
        if self.text is not None:
            for proj in self.text:
                nn.init.zeros_(proj.weight)

    def forward(self, feats: list[torch.Tensor], cond: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        if len(feats) != len(self.heads):
            raise ValueError(f"{len(feats)} feature levels for a discriminator with {len(self.heads)} heads")
        if (self.text is None) != (text is None):
            raise ValueError("a discriminator with text projections needs the caption's embedding, and one without "
                             "takes none")
        cond = cond.float() * 2 - 1  # the condition image, [0, 1] -> [-1, 1]
        e = None if text is None else text.float().mean(dim=1)  # [B, text_dim]: the caption's tokens averaged
        logits = []
        for i, (f, head) in enumerate(zip(feats, self.heads)):
            c = F.adaptive_avg_pool2d(cond, f.shape[-2:])
            h = head[:-1](torch.cat([f.float(), c], dim=1))                             # [B, hidden, H, W]
            logit = head[-1](h).mean(dim=(1, 2, 3))
            if e is not None:
                logit = logit + (h.mean(dim=(2, 3)) * self.text[i](e)).sum(dim=1)     # <h, P e>, h averaged
            logits.append(logit)
        return torch.stack(logits, dim=1)


def served_student_timesteps(schedule: NoiseSchedule, batch: int, p_one_step: float,
                             generator: torch.Generator) -> torch.Tensor:
    """The timesteps a distribution-level term takes the student's prediction from: the served 1-step timestep (999)
    with probability `p_one_step`, else one of the 2- and 4-step ones (749, 499, 249) uniformly."""
    served = schedule.trailing_timesteps(4)  # 999, 749, 499, 249
    one = torch.rand(batch, generator=generator) < p_one_step
    other = torch.tensor(served[1:])[torch.randint(0, len(served) - 1, (batch,), generator=generator)]
    return torch.where(one, torch.full_like(other, served[0]), other)


def hinge_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


@dataclass
class AdversarialTerm:
    """The term and its discriminator (see the module's docstring). `__call__(terms, ...)` takes CoDi's Terms,
    takes one discriminator step and returns the Terms with W * the student's adversarial loss added."""

    schedule: NoiseSchedule
    unet: nn.Module  # the frozen backbone UNet (no adapter)
    discriminator: FeatureDiscriminator
    optimizer: torch.optim.Optimizer
    weight: float
    t_max: int = 249  # t' ~ U{0..t_max}
    p_one_step: float = 0.5  # the probability of the 1-step timestep (999) for the student's prediction
    set_w: Callable[[torch.Tensor | None], None] | None = None  # a w-conditioned student: judged at w = 0

    @property
    def reads_text(self) -> bool:
        return self.discriminator.text is not None

    def student_timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return served_student_timesteps(self.schedule, batch, self.p_one_step, generator)

    def __call__(self, terms, student, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor,
                 generator: torch.Generator):
        B = x.shape[0]
        t_s = self.student_timesteps(B, generator)
        eps = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        if self.set_w is not None:
            self.set_w(torch.zeros(B))                                                  # w = 0: the data's own
        try:
            x_hat, _ = student(self.schedule.add_noise(x, eps, t_s), t_s, c, text)     # with grad
        finally:
            if self.set_w is not None:
                self.set_w(None)
        t_d = torch.randint(0, self.t_max + 1, (B,), generator=generator)
        eps_d = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        td = t_d.to(x.device)
        with torch.no_grad():
            real = unet_features(self.unet, self.schedule.add_noise(x, eps_d, t_d), td, text)
        fake = unet_features(self.unet, self.schedule.add_noise(x_hat, eps_d, t_d), td, text)
        caption = text if self.reads_text else None
        d_loss = self.discriminator_step(real, [f.detach() for f in fake], c, caption)
        self.discriminator.requires_grad_(False)
        try:
            g_loss = -self.discriminator(fake, c, caption).mean()
        finally:
            self.discriminator.requires_grad_(True)
        parts = {**terms.parts, "adversarial": g_loss.detach(), "discriminator": d_loss}
        return type(terms)(terms.loss + self.weight * g_loss, parts, terms.t)

    def discriminator_step(self, real: list[torch.Tensor], fake: list[torch.Tensor], c: torch.Tensor,
                           text: torch.Tensor | None = None) -> torch.Tensor:
        """One AdamW step of the heads on the hinge loss; returns the loss before the step."""
        with torch.enable_grad():
            loss = hinge_discriminator_loss(self.discriminator(real, c, text), self.discriminator(fake, c, text))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    # checkpoints: two more files in the checkpoint folder (hashed in its state.json like the others)
    def save(self, folder: Path) -> None:
        save_term_state(folder, self.discriminator, self.optimizer, DISCRIMINATOR, DISCRIMINATOR_OPTIMIZER)

    def load(self, folder: Path) -> None:
        load_term_state(folder, self.discriminator, self.optimizer, DISCRIMINATOR, DISCRIMINATOR_OPTIMIZER,
                        "discriminator")


def build_adversarial(config, unet: nn.Module, schedule: NoiseSchedule, latent_size: int, text_dim: int,
                      device: torch.device, set_w: Callable[[torch.Tensor | None], None] | None = None,
                      ) -> AdversarialTerm | None:
    """The term a TrainConfig asks for, or None (adversarial_weight 0). The heads' initialisation draws from a
    generator seeded by the run's seed, so it leaves every other random stream as it was. `set_w`: the student's
    w setter when it takes w (it is judged at w = 0)."""
    if not config.adversarial_weight:
        return None
    if config.adversarial_t_max >= schedule.num_train_timesteps:
        from .config import ConfigError

        raise ConfigError(f"adversarial_t_max {config.adversarial_t_max} must be below the backbone's "
                          f"{schedule.num_train_timesteps} timesteps")
    channels = feature_channels(unet, latent_size, text_dim)
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(config.seed + 7919)
        disc = FeatureDiscriminator(channels, text_dim=text_dim if config.adversarial_text else None).to(device)
    optimizer = torch.optim.AdamW(disc.parameters(), lr=config.adversarial_lr, betas=(0.0, 0.99), weight_decay=0.0)
    return AdversarialTerm(schedule, unet, disc, optimizer, config.adversarial_weight, t_max=config.adversarial_t_max,
                           set_w=set_w)
