# Experiment script. Produced the gradient-norm ratios that chose the DMD term's W (docs/training.md).
"""The gradient norms of guidance-aware CoDi's loss and of the DMD term on a guided student's adapter, after the fake
score alone has trained some steps on the fixed student's outputs: how to choose --dmd-weight (docs/training.md).

    python experiments/dmd_gradients.py STUDENT_ENTRY TEACHER_ENTRY [--task depth] [--fake-steps 100]

The student is continued as `cdd-train-adapter --init-from STUDENT --teacher TEACHER` would (the w range and the
conditional term's weight as the depth entry's run: 0-3, r = 10, unconditional branch text+condition-if-empty);
with --plain as plain CoDi (`--adapter controlnet`, the super-resolution entry's recipe), TEACHER the fine-tuned
entry whose score is DMD's real one.
"""
from __future__ import annotations

import argparse

import torch

from cdd.runtime.diffusion.backbone import load_backbone
from cdd.training.codi import Terms, build_objective
from cdd.training.config import TrainConfig
from cdd.training.data.datasets import build_dataset
from cdd.training.distribution_matching import build_distribution_matching
from cdd.training.loop import EMA, WithWeights, build_roles, collate


def grad_norm(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("student")
    p.add_argument("teacher")
    p.add_argument("--task", default="depth")
    p.add_argument("--fake-steps", type=int, default=100)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4, help="the fake score's (--dmd-lr)")
    p.add_argument("--plain", action="store_true", help="a plain CoDi student (--adapter controlnet), TEACHER its "
                   "fine-tuned conditional entry")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.plain:  # plain CoDi (the super-resolution entry's recipe): the teacher entry is DMD's real score at w = 0
        config = TrainConfig(task=a.task, adapter="controlnet", init_from=a.student, teacher=a.teacher,
                             caption_dropout=0.5, dmd_weight=1.0, dmd_lr=a.lr, degradation="mild-64px",
                             photo_fraction=0.5 if a.task == "super-resolution" else 0.0)
    else:
        config = TrainConfig(task=a.task, adapter="controlnet-guided", init_from=a.student, teacher=a.teacher,
                             cond_weight=10.0, guidance_min=0.0, guidance_max=3.0, guidance=2.0,
                             guidance_unconditional="text+condition-if-empty", caption_dropout=0.5, dmd_weight=1.0,
                             dmd_lr=a.lr)
    backbone = load_backbone(config.check_backbone())
    roles = build_roles(config, backbone)
    params = list(roles.trainable.values())
    ema = WithWeights(roles.student, EMA(roles.trainable, 0.99).shadow)
    objective = build_objective(config, backbone.schedule, empty_text=backbone.encode_text([""]), set_w=roles.set_w)
    term = build_distribution_matching(config, roles, objective, torch.device("cpu"))
    data = iter(build_dataset(a.task, "scenes", size=64, seed=11, **config.dataset_options()))
    gen = torch.Generator().manual_seed(0)

    def batch():
        b = collate([next(data) for _ in range(4)])
        texts = [("" if torch.rand(1, generator=gen).item() < 0.5 else t) for t in b["text"]]
        with torch.no_grad():
            return backbone.to_model_space(b["target"]).float(), b["condition"], backbone.encode_text(texts)

    def probe(label: str) -> None:
        codi, dmd = [], []
        for _ in range(a.probes):
            x, c, text = batch()
            codi.append(grad_norm(objective(roles.student, ema, roles.teacher, x, c, text, gen).loss, params))
            zero = Terms(torch.zeros(()), {}, None)
            t = term(zero, roles.student, x, c, text, gen)  # also one fake step: the probe's batches are new ones
            dmd.append(grad_norm(t.loss, params))
        cm, dm = sum(codi) / len(codi), sum(dmd) / len(dmd)
        print(f"{label}: |grad CoDi| {cm:.3f}  |grad DMD, W = 1| {dm:.3f}  ratio {dm / cm:.2f} "
              f"(per probe CoDi {', '.join(f'{v:.3f}' for v in codi)}; DMD {', '.join(f'{v:.3f}' for v in dmd)})")

    probe("fake score = the teacher")
    for step in range(a.fake_steps):  # the fake score alone, on the fixed student's outputs
        x, c, text = batch()
        term(Terms(torch.zeros(()), {}, None), roles.student, x, c, text, gen)
        if (step + 1) % 50 == 0:
            probe(f"after {step + 1} fake score steps")


if __name__ == "__main__":
    main()
