# Experiment script. Produced the noise-removed tables of docs/history.md (what a CoDi student removes against its teacher's ODE end).
"""The fraction of the noise removed (cdd.training.codi.noise_removed) by zoo entries, at t = 19, 99, 249.

    python experiments/noise_removed.py ENTRY [ENTRY ...] [--num-images 16] [--ode-steps 50]

On the first N super-resolution samples of cdd-eval's held-out stream, with noise from
torch.Generator().manual_seed(0): 1 = x_hat holds none of the added noise, 0 = all of it.

`--ode-steps K` adds, for each entry, the fraction for the end of its probability-flow ODE from z_t: K
DDIM steps (eta 0) from t down to timestep 0, the last x_hat. That, not the one-step x_hat, is what a
consistency model distilled from the entry should reproduce: the one-step x_hat is the posterior mean
E[x | z_t], which removes all the noise it can and so also the detail the noise would become; the ODE's end
is one sharp image and keeps the part of z_t that turns into detail. A student below its teacher's
one-step fraction but level with the teacher's ODE end is doing what CoDi asks.
"""

import argparse

import torch

from cdd.adapters.zoo import default_backbone_dir, load_entry
from cdd.runtime.diffusion.backbone import load_backbone
from cdd.runtime.diffusion.denoiser import ConditionedDenoiser
from cdd.training.codi import noise_removed
from cdd.training.evaluate import held_out

TIMESTEPS = (19, 99, 249)


class OdeEnd(torch.nn.Module):
    """A denoiser whose x_hat at (z_t, t) is the end of `model`'s DDIM path from z_t: `steps` steps (at most t)
    on integer timesteps evenly spaced from t to 0; eps_hat is the first step's."""

    def __init__(self, model: ConditionedDenoiser, steps: int):
        super().__init__()
        self.model, self.steps = model, steps

    @torch.no_grad()
    def forward(self, z_t, t, cond, text):
        schedule, t0 = self.model.schedule, int(t[0])
        grid = torch.linspace(t0, 0, min(self.steps, t0) + 1).round().long().unique_consecutive().tolist()
        z, first_eps = z_t, None
        for a, b in zip(grid[:-1], grid[1:]):
            x_hat, eps_hat = self.model(z, torch.full_like(t, a), cond, text)
            first_eps = eps_hat if first_eps is None else first_eps
            alpha_b, sigma_b = schedule.alpha_sigma(b, z)
            z = alpha_b * x_hat + sigma_b * eps_hat  # DDIM, eta 0
        return x_hat, first_eps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("entries", nargs="+")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--backbone", default=str(default_backbone_dir()))
    p.add_argument("--ode-steps", type=int, default=0, help="also the end of each entry's DDIM path (K steps)")
    args = p.parse_args()
    backbone = load_backbone(args.backbone)
    data = held_out("super-resolution", args.num_images, 64)
    x, text = backbone.to_model_space(data["target"]), backbone.encode_text(data["text"])
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    for path in args.entries:
        entry = load_entry(path, backbone.unet, backbone.fingerprint)
        model = ConditionedDenoiser(backbone.unet, backbone.schedule, entry.adapter)
        fractions = [noise_removed(model, x, data["condition"], text, t, eps, backbone.schedule) for t in TIMESTEPS]
        print(path, " ".join(f"t={t}: {f:.3f}" for t, f in zip(TIMESTEPS, fractions)), flush=True)
        if args.ode_steps:
            ode = OdeEnd(model, args.ode_steps)
            fractions = [noise_removed(ode, x, data["condition"], text, t, eps, backbone.schedule) for t in TIMESTEPS]
            print(f"{path} (ODE end, {args.ode_steps} DDIM steps)",
                  " ".join(f"t={t}: {f:.3f}" for t, f in zip(TIMESTEPS, fractions)), flush=True)


if __name__ == "__main__":
    main()
