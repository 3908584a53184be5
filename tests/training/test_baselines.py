"""The baselines of the CoDi paper's comparison: consistency distillation of a fine-tuned entry (cm) and Guided
Distillation (gd: the w-conditioned student, stage 1, progressive stage 2, the stochastic sampler)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cdd.adapters.architectures import GuidedControlNetAdapter, build_adapter
from cdd.adapters.zoo import load_entry, save_entry
from cdd.runtime.diffusion.denoiser import ConditionedDenoiser
from cdd.runtime.diffusion.samplers import sample_ddim, sample_gd
from cdd.runtime.diffusion.schedule import NoiseSchedule
from cdd.training.codi import GuidanceDistillationLoss, ProgressiveDistillationLoss, truncated_snr
from cdd.training.train_adapter import main

TINY = ["--task", "depth", "--batch-size", "2", "--num-workers", "0", "--resolution", "16", "--sample-every", "0",
        "--max-train-steps", "2", "--checkpoint-every", "2"]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/training/conftest.py


def schedule():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0).float()
    return NoiseSchedule(abar, 1.0, "epsilon")


def inputs(backbone, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, backbone.model_channels, 16, 16, generator=g)
    cond = torch.rand(batch, 3, 16, 16, generator=g)
    return z, cond, backbone.encode_text(["a red cube"] * batch)


# ---------------------------------------------------------------------------------------------
# the w-conditioned ControlNet


def test_guided_adapter_starts_as_its_controlnet_and_then_depends_on_w(pixel_backbone, perturb, tmp_path):
    unet, sched = pixel_backbone.unet, pixel_backbone.schedule
    plain = perturb(build_adapter("controlnet", unet))
    guided = GuidedControlNetAdapter.from_controlnet(plain, guidance=0.5)
    z, cond, text = inputs(pixel_backbone)
    t = torch.tensor([500, 100])
    ref = ConditionedDenoiser(unet, sched, plain)(z, t, cond, text)[0]
    student = ConditionedDenoiser(unet, sched, guided)
    for w in (0.0, 3.0):  # the w branch is zero-initialised: exactly the source ControlNet for every w
        guided.set_guidance(w)
        torch.testing.assert_close(student(z, t, cond, text)[0], ref, rtol=0, atol=0)
    torch.nn.init.normal_(guided.controlnet.time_embedding.cond_proj.weight, std=0.5)
    guided.set_guidance(torch.tensor([0.0, 2.0]))
    per_sample = student(z, t, cond, text)[0]
    guided.set_guidance(0.0)
    at_zero = student(z, t, cond, text)[0]
    torch.testing.assert_close(per_sample[0], at_zero[0])  # row 0 had w = 0
    assert (per_sample[1] - at_zero[1]).abs().max() > 1e-4  # row 1 had w = 2
    # round trip through the zoo: architecture, weights and the served w
    guided.set_guidance(None)
    served = student(z, t, cond, text)[0]
    save_entry(tmp_path / "e", guided, name="g", task="depth", backbone_fingerprint=pixel_backbone.fingerprint,
               condition={"channels": 3, "range": [0, 1], "resolution": 16}, sampler="gd", steps=2)
    loaded = load_entry(tmp_path / "e", unet, pixel_backbone.fingerprint).adapter
    assert loaded.guidance == 0.5
    torch.testing.assert_close(ConditionedDenoiser(unet, sched, loaded)(z, t, cond, text)[0], served)


# ---------------------------------------------------------------------------------------------
# Guided Distillation's stochastic sampler


def test_gd_sampler_keeps_the_marginal_of_a_perfect_denoiser_and_ends_on_its_x():
    """For a denoiser that knows x0, each stochastic step must land on z_s = alpha_s x0 + sigma_s n, n ~ N(0, I)
    (the 2-step-long DDIM step followed by forward noise keeps the right marginal), and the last step gives x0."""
    sched = schedule()
    x0 = torch.full((1, 1, 1), 0.3)
    seen = []

    def model(z, t):
        seen.append((z.clone(), int(t[0])))
        alpha, sigma = sched.alpha_sigma(t, z)
        return x0.expand_as(z), (z - alpha * x0) / sigma

    n = 20000
    z_T = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    fresh = [torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(i + 1)) for i in range(4)]
    out = sample_gd(model, z_T, sched.trailing_timesteps(4), sched, fresh_noise=fresh)
    torch.testing.assert_close(out, x0.expand_as(out), rtol=0, atol=1e-5)
    assert [t for _, t in seen] == [999, 749, 499, 249]
    for z, t in seen[1:]:
        alpha, sigma = sched.alpha_sigma(t, z)
        noise = (z - alpha * x0) / sigma
        assert abs(noise.mean().item()) < 0.03 and abs(noise.std().item() - 1) < 0.03, t


def test_gd_sampler_with_one_step_is_ddim_and_needs_its_noise():
    sched = schedule()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=g) * 0.1

    def model(z, t):
        alpha, sigma = sched.alpha_sigma(t, z)
        eps = torch.tanh(z @ w)
        return (z - sigma * eps) / alpha, eps

    z_T = torch.randn(3, 2, 4, 4, generator=g)
    ts = sched.trailing_timesteps(1)
    torch.testing.assert_close(sample_gd(model, z_T, ts, sched, fresh_noise=[torch.zeros_like(z_T)]),
                               sample_ddim(model, z_T, ts, sched))
    with pytest.raises(ValueError, match="gd sampling with 2 steps needs 2 fresh noise tensors"):
        sample_gd(model, z_T, sched.trailing_timesteps(2), sched)


# ---------------------------------------------------------------------------------------------
# the two GD objectives


def test_guidance_distillation_target_is_the_guided_teacher(pixel_backbone, perturb):
    unet, sched = pixel_backbone.unet, pixel_backbone.schedule
    plain = perturb(build_adapter("controlnet", unet))
    teacher = ConditionedDenoiser(unet, sched, plain)
    guided = GuidedControlNetAdapter.from_controlnet(plain)
    student = ConditionedDenoiser(unet, sched, guided)
    x, cond, text = inputs(pixel_backbone, seed=1)
    empty = pixel_backbone.encode_text([""])
    # w = 0: the target is the conditional teacher itself, which the fresh student equals: loss 0 (up to the
    # float reduction order of the teacher's batch of two branches)
    zero = GuidanceDistillationLoss(sched, empty, guided.set_guidance, 0.0, 0.0)
    assert zero(student, None, teacher, x, cond, text, torch.Generator().manual_seed(0)).loss.item() < 1e-9
    # w = 1: (1 + w) x_c - w x_u, checked against a direct computation with the same draws
    one = GuidanceDistillationLoss(sched, empty, guided.set_guidance, 1.0, 1.0)
    terms = one(student, None, teacher, x, cond, text, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    torch.rand(2, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    xi = torch.randn(x.shape, generator=g)
    z_t = sched.add_noise(x, xi, t)
    x_c = teacher(z_t, t, cond, text)[0]
    x_u = teacher(z_t, t, cond, empty.expand(2, -1, -1))[0]
    expected = (truncated_snr(sched, t, x) * (x_c - (2 * x_c - x_u)).pow(2)).mean()
    assert torch.equal(terms.t, t) and guided.w is None  # the per-sample w is not left behind for sampling
    torch.testing.assert_close(terms.loss, expected, rtol=1e-5, atol=1e-7)
    assert terms.loss.item() > 0


def test_progressive_target_of_a_perfect_teacher_is_x():
    """A teacher that knows x makes x~ = x exactly (eq. 13 inverts its two DDIM steps), including the last
    interval where t'' is past t = 0; a student predicting x then has loss 0."""
    sched = schedule()
    x = torch.randn(64, 2, 3, 3, generator=torch.Generator().manual_seed(0))

    def perfect(z, t, c, text):
        alpha, sigma = sched.alpha_sigma(t, z)
        return x, (z - alpha * x) / sigma

    loss = ProgressiveDistillationLoss(sched, student_steps=4, set_w=lambda w: None)
    terms = loss(perfect, None, perfect, x, None, None, torch.Generator().manual_seed(0))
    assert set(terms.t.tolist()) == {999, 749, 499, 249}
    assert terms.loss.item() < 1e-6


# ---------------------------------------------------------------------------------------------
# end to end: finetune -> cm, finetune -> gd stage 1 -> gd stage 2


def test_baselines_distil_a_finetuned_entry_end_to_end(pixel_backbone_dir, tmp_path, capsys):
    bb = ["--backbone", str(pixel_backbone_dir)]
    assert main([*TINY, *bb, "--method", "finetune", "--output", str(tmp_path / "ft")]) == 0
    teacher = tmp_path / "ft" / "entry"
    assert main([*TINY, *bb, "--method", "cm", "--init-from", str(teacher), "--output", str(tmp_path / "cm"),
                 "--distance", "huber", "--ema", "0.9"]) == 0
    cm = json.loads((tmp_path / "cm" / "entry" / "manifest.json").read_text())
    assert (cm["kind"], cm["sampler"], cm["steps"]) == ("controlnet", "cm", 4)
    assert cm["training"]["init_from"]["method"] == "finetune" and cm["training"]["method"] == "cm"
    assert set(json.loads((tmp_path / "cm" / "metrics.jsonl").read_text().splitlines()[-1])) >= {"loss/distillation"}

    with pytest.warns(UserWarning, match="trained without caption dropout"):  # GD's unconditional branch needs it
        assert main([*TINY, *bb, "--method", "gd", "--init-from", str(teacher), "--output", str(tmp_path / "gd1"),
                     "--gd-steps", "4", "--guidance", "0.5"]) == 0
    gd1 = json.loads((tmp_path / "gd1" / "entry" / "manifest.json").read_text())
    assert (gd1["kind"], gd1["sampler"], gd1["steps"]) == ("controlnet-guided", "ddim", 8)
    assert gd1["architecture"]["guidance"] == 0.5
    # CoDi may start from the fine-tuned entry too ("finetune-first"); its teacher stays the backbone
    assert main([*TINY, *bb, "--method", "codi", "--init-from", str(teacher), "--output", str(tmp_path / "codi-ft"),
                 "--prev-predictor", "teacher"]) == 0
    ft = json.loads((tmp_path / "codi-ft" / "entry" / "manifest.json").read_text())
    assert ft["training"]["init_from"]["method"] == "finetune" and (ft["sampler"], ft["steps"]) == ("prev", 4)
    # a teacher continued with another recipe starts as the entry: at a vanishing lr its EMA entry keeps the weights
    assert main([*TINY, *bb, "--method", "finetune", "--init-from", str(teacher), "--caption-dropout", "0.5", "--lr", "1e-12",
                 "--output", str(tmp_path / "ft2")]) == 0
    ft2 = json.loads((tmp_path / "ft2" / "entry" / "manifest.json").read_text())
    assert ft2["training"]["init_from"]["method"] == "finetune" and ft2["training"]["method"] == "finetune"
    a, b = (load_file(p / "entry" / "adapter.safetensors") for p in (tmp_path / "ft", tmp_path / "ft2"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # ... also another task's entry (transfer: every task conditions on an RGB image), with the task's own data
    # (with the loss weighted toward the region each edit changes: the loop passes the weights through)
    assert main([*TINY, *bb, "--task", "edit", "--method", "finetune", "--init-from", str(teacher), "--lr", "1e-12",
                 "--changed-weight", "4", "--output", str(tmp_path / "ft-edit")]) == 0
    ft_edit = json.loads((tmp_path / "ft-edit" / "entry" / "manifest.json").read_text())
    assert ft_edit["task"] == "edit" and ft_edit["training"]["init_from"]["path"] == str(teacher)
    assert ft_edit["training"]["config"]["changed_weight"] == 4
    c = load_file(tmp_path / "ft-edit" / "entry" / "adapter.safetensors")
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    assert main([*TINY, *bb, "--method", "finetune", "--lr", "1e-12", "--output", str(tmp_path / "ft0")]) == 0
    fresh = load_file(tmp_path / "ft0" / "entry" / "adapter.safetensors")  # without --init-from: not the teacher
    assert not all(torch.allclose(a[k], fresh[k], atol=1e-6) for k in a)
    # ... and in mode lora, adding a zero-initialised backbone LoRA to the fine-tuned adapter
    assert main([*TINY, *bb, "--method", "codi", "--mode", "lora", "--init-from", str(teacher),
                 "--output", str(tmp_path / "codi-ft-lora")]) == 0
    ft_lora = json.loads((tmp_path / "codi-ft-lora" / "entry" / "manifest.json").read_text())
    assert ft_lora["mode"] == "lora" and ft_lora["training"]["init_from"]["method"] == "finetune"
    assert main([*TINY, *bb, "--method", "gd", "--gd-stage", "2", "--gd-steps", "2", "--init-from",
                 str(tmp_path / "gd1" / "entry"), "--output", str(tmp_path / "gd2"), "--sample-every", "2"]) == 0
    gd2 = json.loads((tmp_path / "gd2" / "entry" / "manifest.json").read_text())
    # served with the deterministic T/k steps its rounds trained it for, at w = 0 unless --guidance says otherwise
    assert (gd2["kind"], gd2["sampler"], gd2["steps"]) == ("controlnet-guided", "ddim", 2)
    assert gd2["architecture"]["guidance"] == 0
    assert (tmp_path / "gd2" / "samples" / "step-000002.png").is_file()
    capsys.readouterr()

    # wrong starting points are refused, naming the entry and what is expected
    cases = [
        (["--method", "gd", "--gd-stage", "2", "--init-from", str(teacher)], "GD stage 2 continues a controlnet-guided entry"),
        (["--method", "cm", "--adapter", "t2i", "--init-from", str(teacher)], "continue it with --adapter controlnet"),
        (["--method", "cm", "--init-from", str(teacher), "--task", "edit"], "is a depth adapter, not edit"),
        (["--method", "cm"], "method cm distils a trained entry: give init_from"),
        (["--method", "codi", "--mode", "full", "--init-from", str(teacher)], "mode must be pe (or lora with method codi"),
        (["--method", "cm", "--mode", "lora", "--init-from", str(teacher)], "mode must be pe (or lora with method codi"),
        (["--method", "cm", "--init-from", str(teacher), "--cond-weight", "1"], "--cond-weight: option(s) that --method cm does not use"),
        (["--method", "codi", "--guidance", "1"], "--guidance: option(s) that --method codi does not use"),
        (["--method", "codi", "--guidance-unconditional", "text+condition"],
         "--guidance-unconditional: option(s) that --method codi does not use"),
        (["--method", "gd", "--init-from", str(teacher), "--guidance-unconditional", "text+condition"],
         "--guidance-unconditional: option(s) that --method gd does not use"),
    ]
    for argv, message in cases:
        assert main([*TINY, *bb, "--output", str(tmp_path / "bad"), *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
