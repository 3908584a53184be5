# Experiment script. Produced the gradient-norm ratios that chose the adversarial term's discriminator settings and W (docs/training.md).
"""The gradient norms of CoDi's loss and of the adversarial term on the adapter, after the discriminator alone has
trained a few hundred steps against the fixed served student: how to choose --adversarial-weight (docs/training.md).

    python experiments/adversarial_gradients.py ENTRY [--task super-resolution] [--d-steps 150]
"""
from __future__ import annotations

import argparse

import torch

from cdd.adapters.zoo import load_entry
from cdd.runtime.diffusion.backbone import load_backbone
from cdd.runtime.diffusion.denoiser import ConditionedDenoiser
from cdd.training.adversarial import build_adversarial
from cdd.training.codi import CoDiLoss, Terms
from cdd.training.config import TrainConfig
from cdd.training.data.datasets import build_dataset
from cdd.training.loop import EMA, WithWeights, _fresh_adapter, collate


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("entry")
    p.add_argument("--task", default="super-resolution")
    p.add_argument("--d-steps", type=int, default=150)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4, help="the discriminator's (--adversarial-lr)")
    p.add_argument("--t-max", type=int, default=499, help="--adversarial-t-max")
    a = p.parse_args()
    torch.set_num_threads(1)
    config = TrainConfig(task=a.task, init_from=a.entry, adversarial_weight=1.0, adversarial_lr=a.lr, adversarial_t_max=a.t_max, photo_fraction=0.5 if a.task == "super-resolution" else 0.0)
    backbone = load_backbone(config.check_backbone())
    entry = load_entry(a.entry, backbone.unet, backbone.fingerprint)
    adapter = _fresh_adapter(config, backbone)
    adapter.load_weights(entry.adapter.weights())
    student = ConditionedDenoiser(backbone.unet, backbone.schedule, adapter)
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    ema = WithWeights(student, EMA(trainable, 0.99).shadow)
    res = backbone.resolution
    adv = build_adversarial(config, backbone.unet, backbone.schedule, res // backbone.vae_scale_factor,
                            backbone.unet.config.cross_attention_dim, torch.device("cpu"))
    codi = CoDiLoss(backbone.schedule)
    data = build_dataset(a.task, "scenes", size=res, seed=5, **config.dataset_options())
    g = torch.Generator().manual_seed(0)
    k = 0

    def batch():
        nonlocal k
        b = collate([data.sample(k + i) for i in range(4)])
        k += 4
        with torch.no_grad():
            return backbone.to_model_space(b["target"]).float(), b["condition"], backbone.encode_text(list(b["text"]))

    zero = Terms(torch.zeros(()), {}, torch.zeros(4))
    for i in range(a.d_steps):  # the discriminator alone learns (the student's own term is computed and dropped)
        x, c, text = batch()
        out = adv(zero, student, x, c, text, g)
        if i % 25 == 0 or i == a.d_steps - 1:
            print(f"D step {i}: hinge {float(out.parts['discriminator']):.3f}, G term {float(out.parts['adversarial']):.3f}")
    for _ in range(a.probes):
        x, c, text = batch()
        norms = []
        for which in ("codi", "adversarial"):
            student.zero_grad(set_to_none=True)
            terms = codi(student, ema, None, x, c, text, g)
            loss = terms.loss if which == "codi" else adv(zero, student, x, c, text, g).loss
            loss.backward()
            norms.append(torch.norm(torch.stack([p.grad.norm() for p in trainable.values() if p.grad is not None])).item())
        print(f"grad norm: codi {norms[0]:.4g}  adversarial (W = 1) {norms[1]:.4g}  ratio {norms[1] / norms[0]:.3g}")


if __name__ == "__main__":
    main()
