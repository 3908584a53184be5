# Experiment script. Produced the training cost per step of the adversarial term and of DMD against plain CoDi (docs/results.md, "A distribution term for one step", "Distribution matching").
"""Training cost per step of CoDi with the adversarial term against plain CoDi, side by side in one process: short
runs from the same entry, alternating (plain, term, plain, term, ...), each timed by the loop's own seconds per step
(its moving average, checkpoints and grids left out).

    OMP_NUM_THREADS=1 python experiments/adversarial_cost.py ENTRY --task super-resolution [--weight 0.05] [--steps 40]

A guidance-aware CoDi student (the served depth entry's settings: w ~ U[0, 3], the conditional term at weight 10;
ENTRY the plain controlnet entry, also its teacher), with the caption-reading discriminator:

    OMP_NUM_THREADS=1 python experiments/adversarial_cost.py ENTRY --task depth --guided --text --weight 0.1

The same for distribution matching (DMD, training/distribution_matching.py) instead of the discriminator:

    OMP_NUM_THREADS=1 python experiments/adversarial_cost.py ENTRY --task depth --guided --dmd --weight 10 [--fake-steps 5]

DMD on plain CoDi (the super-resolution entry), TEACHER the fine-tuned entry that is its real score:

    OMP_NUM_THREADS=1 python experiments/adversarial_cost.py ENTRY --dmd --weight 1 --teacher TEACHER
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from cdd.training.config import TrainConfig
from cdd.training.loop import train


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("entry")
    p.add_argument("--task", default="super-resolution")
    p.add_argument("--weight", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--guided", action="store_true", help="guidance-aware CoDi as the served depth entry was trained "
                   "(controlnet-guided, w ~ U[0, 3], r = 10, its unconditional branch)")
    p.add_argument("--text", action="store_true", help="the discriminator reads the caption (--adversarial-text)")
    p.add_argument("--dmd", action="store_true", help="time the DMD term (--dmd-weight) instead of the discriminator")
    p.add_argument("--fake-steps", type=int, default=1, help="with --dmd: fake score updates per step (--dmd-fake-steps)")
    p.add_argument("--teacher", help="with --dmd on plain CoDi: the fine-tuned entry that is DMD's real score (--teacher)")
    a = p.parse_args()
    torch.set_num_threads(1)
    sr = dict(photo_fraction=0.5, degradation="mild-64px") if a.task == "super-resolution" else {}
    guided = dict(adapter="controlnet-guided", guidance_max=3.0, guidance=1.0, cond_weight=10.0,
                  guidance_unconditional="text+condition-if-empty") if a.guided else {}
    term = "dmd" if a.dmd else "adversarial"
    times: dict[str, list[float]] = {"plain": [], term: []}
    root = Path(tempfile.mkdtemp(prefix="adv-cost-"))
    try:
        for r in range(a.rounds):
            for name, w in (("plain", 0.0), (term, a.weight)):
                cfg = TrainConfig(task=a.task, init_from=a.entry, ema=0.99, lr=3e-4, batch_size=4, caption_dropout=0.5,
                                  num_workers=1, sample_every=0, checkpoint_every=0, checkpoint_minutes=0,
                                  max_train_steps=a.steps, output=str(root / f"{name}-{r}"), **sr, **guided,
                                  **(dict(dmd_weight=w, dmd_fake_steps=a.fake_steps, teacher=a.teacher if w else None)
                                     if a.dmd else dict(adversarial_weight=w,
                                                                           adversarial_text=bool(w) and a.text)))
                times[name].append(train(cfg).seconds_per_step)
                print(f"round {r} {name}: {times[name][-1]:.3f} s/step", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    plain, adv = (sum(v) / len(v) for v in times.values())
    print(f"plain CoDi {plain:.3f} s/step, with the term {adv:.3f} s/step: ratio {adv / plain:.2f}")


if __name__ == "__main__":
    main()
