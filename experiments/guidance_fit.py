# Experiment script (2026-12-06): how much of the guided teacher's direction a guidance-aware CoDi student learnt,
# per timestep of the served 4-step grid (docs/results.md, "The conditional term's target"). Kept to reproduce.
"""How far the guided depth student moves along its teacher's guidance direction, at the served timesteps.

For the held-out scenes (cdd-eval's stream), their captions and one fixed noise per t, z_t = alpha_t x + sigma_t eps
with x the render's latent; the teacher's branches x_c (caption) and x_u ("" with the map, text-only guidance, what a
captioned sample's unconditional branch is in training) and the student's x_hat(w):

    gain(w) = <x_hat(w) - x_hat(0), d> / <d, d>,   d = w (x_c - x_u)   (1: it moves as far as the teacher's guidance)
    cos(w)  = cosine of (x_hat(w) - x_hat(0)) and d                      (1: in the same direction)
    err(w)  = |x_hat(w) - x_w| / |d|,   x_w = x_c + d                    (the student's distance to the guided target)

    python experiments/guidance_fit.py --student adapters/embedded/zoo/depth --teacher /work/runs/depth-plain-served-entry
"""

from __future__ import annotations

import argparse

import torch

from cdd.runtime.diffusion.backbone import load_backbone
from cdd.runtime.diffusion.denoiser import both_branches
from cdd.training.evaluate import default_backbone_dir, entry_model, held_out, resolve_adapters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", required=True, help="the controlnet-guided depth entry")
    p.add_argument("--teacher", required=True, help="its guided teacher, a controlnet depth entry")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--timesteps", default="999,749,499,249")
    p.add_argument("--w", default="1,2,3")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    backbone = load_backbone(default_backbone_dir(), device=torch.device("cpu"))
    (student_c,), (teacher_c,) = (resolve_adapters(f"{n}={e}", None, "depth", None)
                                  for n, e in (("student", args.student), ("teacher", args.teacher)))
    data = held_out("depth", args.num_images, student_c.manifest.condition["resolution"])
    text = backbone.encode_text(data["text"])
    empty = backbone.encode_text([""])
    cond = data["condition"].to(backbone.dtype)
    with torch.no_grad():
        x = backbone.to_model_space((2 * data["target"] - 1).to(backbone.dtype))
    ws = [float(w) for w in args.w.split(",")]
    g = torch.Generator().manual_seed(args.seed)
    print(f"{'t':>4} {'w':>4} {'gain':>6} {'cos':>6} {'err':>6} {'|d|/|x_c|':>9}")
    with entry_model(teacher_c, backbone, 0) as teacher, entry_model(student_c, backbone, 1) as student, torch.no_grad():
        for t in (int(s) for s in args.timesteps.split(",")):
            eps = torch.randn(x.shape, generator=g).to(x)
            alpha, sigma = backbone.schedule.alpha_sigma(torch.tensor([t]), x)
            z = alpha * x + sigma * eps
            tt = torch.full((x.shape[0],), t, dtype=torch.long)
            (x_c, _), (x_u, _) = both_branches(teacher, z, tt, cond, text, empty)
            student.adapter.set_guidance(torch.zeros(x.shape[0]))
            base, _ = student(z, tt, cond, text)
            for w in ws:
                student.adapter.set_guidance(torch.full((x.shape[0],), w))
                x_hat, _ = student(z, tt, cond, text)
                d, move = w * (x_c - x_u), x_hat - base
                gain = float((move * d).sum() / (d * d).sum())
                cos = float((move * d).sum() / (move.norm() * d.norm()).clamp_min(1e-12))
                err = float((x_hat - (x_c + d)).norm() / d.norm())
                print(f"{t:>4} {w:>4g} {gain:>6.3f} {cos:>6.3f} {err:>6.3f} {float(d.norm() / x_c.norm()):>9.4f}")
            student.adapter.set_guidance(None)


if __name__ == "__main__":
    main()
