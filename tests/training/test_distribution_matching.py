"""Distribution matching (training/distribution_matching.py): the DMD gradient against a hand computation, the fake
score's start and its checkpoints, and guidance-aware CoDi continued from its own entry (--teacher)."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from cdd.runtime.diffusion.backbone import load_backbone
from cdd.runtime.diffusion.denoiser import ConditionedDenoiser
from cdd.training.checkpoints import CheckpointError
from cdd.training.codi import Terms, build_objective
from cdd.training.config import ConfigError, TrainConfig
from cdd.training.distribution_matching import FAKE_SCORE, DistributionMatchingTerm, build_distribution_matching
from cdd.training.loop import build_roles, train

from .test_baselines import schedule
from .test_loop import TinySet
from .test_loop import config as loop_config

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/training/conftest.py


class FixedDenoiser:
    """A denoiser whose x_hat is a fixed tensor; records the w its adapter is given."""

    def __init__(self, x: torch.Tensor):
        self.x, self.seen = x, []
        self.adapter = SimpleNamespace(set_guidance=self.seen.append)

    def __call__(self, z, t, c, text):
        return self.x.expand_as(z), torch.zeros_like(z)


def test_the_student_gradient_is_the_normalised_score_difference():
    g = torch.Generator().manual_seed(0)
    x_hat = torch.randn(3, 2, 4, 4, generator=g, requires_grad=True)
    x_real, x_fake = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    fake = FixedDenoiser(x_fake)
    seen_teacher = []

    def guided_teacher(teacher, z, t, c, text, w):
        seen_teacher.append((t.clone(), w.clone()))
        return x_real, None, None

    term = DistributionMatchingTerm(schedule(), fake, None, 2.0, guided_teacher, teacher=None, set_w=lambda w: None,
                                    t_min=20, t_max=980)
    w = torch.tensor([0.0, 1.5, 3.0])
    loss = term.matching_loss(x_hat, None, None, w, torch.Generator().manual_seed(1))
    # by hand: g = (x_fake - x_real) / mean|x_hat - x_real| per sample; d/dx_hat 0.5 mean (x_hat - sg(x_hat - g))^2 = g / n
    scale = (x_hat.detach() - x_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (x_fake - x_real) / scale
    (grad,) = torch.autograd.grad(loss, x_hat)
    assert torch.allclose(grad, expected / x_hat.numel(), atol=1e-7)
    assert torch.allclose(loss, 0.5 * expected.pow(2).mean(), atol=1e-6)
    t, w_teacher = seen_teacher[0]
    assert torch.equal(w_teacher, w) and ((20 <= t) & (t <= 980)).all()           # the teacher at the student's w
    assert torch.equal(fake.seen[0], w) and fake.seen[-1] is None                  # ... the fake score too, then reset


def teacher_entry(tmp_path, backbone_dir):
    """A tiny depth ControlNet fine-tuned with caption dropout: a guided teacher."""
    run = train(loop_config(tmp_path, backbone_dir, method="finetune", caption_dropout=0.5, output=str(tmp_path / "ft")),
                dataset=TinySet())
    return run.entry


def guided(tmp_path, backbone_dir, start, **kw):
    return loop_config(tmp_path, backbone_dir, adapter="controlnet-guided", init_from=str(start), guidance_max=3.0,
                       guidance_unconditional="text+condition-if-empty", **kw)


def probe_inputs(backbone):
    """(z, t, c, text) of two rows, one with a caption and one with the empty prompt, at two timesteps."""
    g = torch.Generator().manual_seed(0)
    size = backbone.resolution // backbone.vae_scale_factor
    z = torch.randn(2, backbone.unet.config.in_channels, size, size, generator=g)
    c, text = torch.rand(2, 3, 16, 16, generator=g), backbone.encode_text(["a red cube", ""])
    return z, torch.tensor([100, 700]), c, text


def test_the_fake_score_starts_as_the_teacher_at_every_w(tmp_path, latent_backbone_dir):
    teacher = teacher_entry(tmp_path, latent_backbone_dir)
    config = guided(tmp_path, latent_backbone_dir, teacher, dmd_weight=1.0)
    backbone = load_backbone(config.check_backbone())
    roles = build_roles(config, backbone)
    objective = build_objective(config, backbone.schedule, empty_text=backbone.encode_text([""]), set_w=roles.set_w)
    term = build_distribution_matching(config, roles, objective, torch.device("cpu"))
    assert build_distribution_matching(config.replace(dmd_weight=0.0), roles, objective, torch.device("cpu")) is None
    one = build_distribution_matching(config.replace(dmd_one_step=1.0), roles, objective, torch.device("cpu"))
    assert one.p_one_step == 1.0 and term.p_one_step == 0.5
    z, t, c, text = probe_inputs(backbone)
    with torch.no_grad():
        want = roles.teacher(z, t, c, text)[0]
        for w in (0.0, 2.5):
            term.fake_adapter.set_guidance(torch.full((2,), w))
            assert torch.allclose(term.fake(z, t, c, text)[0], want, atol=1e-5)
    # its own parameters, trained by its own optimizer: the teacher's stay as they were
    assert not any(p is q for p in term.fake_adapter.parameters() for q in roles.teacher.adapter.parameters())
    assert all(p.requires_grad for p in term.fake_adapter.parameters())


def test_more_fake_steps_train_the_fake_score_on_fresh_outputs_and_leave_the_student_gradient(tmp_path,
                                                                                             latent_backbone_dir):
    teacher = teacher_entry(tmp_path, latent_backbone_dir)
    config = guided(tmp_path, latent_backbone_dir, teacher, dmd_weight=1.0)
    backbone = load_backbone(config.check_backbone())
    g = torch.Generator().manual_seed(3)
    size = backbone.resolution // backbone.vae_scale_factor
    x = torch.randn(2, backbone.unet.config.in_channels, size, size, generator=g)
    c, text = torch.rand(2, 3, 16, 16, generator=g), backbone.encode_text(["a red cube", "a blue sphere"])

    def one_call(fake_steps):
        roles = build_roles(config.replace(dmd_fake_steps=fake_steps), backbone)
        objective = build_objective(config, backbone.schedule, empty_text=backbone.encode_text([""]), set_w=roles.set_w)
        term = build_distribution_matching(config.replace(dmd_fake_steps=fake_steps), roles, objective,
                                           torch.device("cpu"))
        seen, fake_step = [], term.fake_step
        term.fake_step = lambda x_hat, c, text, w, gen: (seen.append((x_hat, w)), fake_step(x_hat, c, text, w, gen))[1]
        before = {k: v.detach().clone() for k, v in term.fake_adapter.state_dict().items()}
        zero = Terms(torch.zeros(()), {}, torch.zeros(2))
        out = term(zero, roles.student, x, c, text, torch.Generator().manual_seed(5))
        grads = torch.autograd.grad(out.loss, list(roles.trainable.values()), allow_unused=True)
        moved = any(not torch.equal(before[k], v) for k, v in term.fake_adapter.state_dict().items())
        return term, seen, grads, moved

    one, seen_one, grads_one, moved_one = one_call(1)
    three, seen_three, grads_three, moved_three = one_call(3)
    assert one.fake_steps == 1 and three.fake_steps == 3 and moved_one and moved_three
    assert len(seen_one) == 1 and len(seen_three) == 3
    assert torch.equal(seen_three[0][0], seen_one[0][0]) and torch.equal(seen_three[0][1], seen_one[0][1])
    # the extra updates: fresh student outputs (no graph), each at its own drawn w
    assert all(not x_more.requires_grad for x_more, _ in seen_three)
    assert not torch.equal(seen_three[1][0], seen_three[0][0]) and not torch.equal(seen_three[2][0], seen_three[1][0])
    assert not torch.equal(seen_three[1][1], seen_three[0][1])
    # the student's gradient is taken before the fake score moves: the same for one update or three
    assert any(a is not None and a.abs().sum() > 0 for a in grads_one)
    for a, b in zip(grads_one, grads_three, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(ConfigError, match="dmd_fake_steps 0"):
        TrainConfig(task="depth", dmd_fake_steps=0)


def test_a_guided_run_with_dmd_checkpoints_its_fake_score_and_resumes_bit_for_bit(tmp_path, latent_backbone_dir):
    teacher = teacher_entry(tmp_path, latent_backbone_dir)
    straight = train(guided(tmp_path, latent_backbone_dir, teacher, dmd_weight=1.0, max_train_steps=2,
                            output=str(tmp_path / "straight")), dataset=TinySet())
    assert {"dmd", "fake_score", "guidance"} <= set(straight.last_loss)
    half = guided(tmp_path, latent_backbone_dir, teacher, dmd_weight=1.0, max_train_steps=1, checkpoint_every=1,
                  output=str(tmp_path / "half"))
    first = train(half, dataset=TinySet())
    assert (first.checkpoint / FAKE_SCORE).is_file()
    resumed = train(half.replace(resume="latest", max_train_steps=2), dataset=TinySet())
    for name in ("trainable.safetensors", FAKE_SCORE):
        a, b = load_file(straight.checkpoint / name), load_file(resumed.checkpoint / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # the term's settings define the run; a checkpoint written with it needs its fake score
    with pytest.raises(ConfigError, match="dmd_weight: 1.0 -> 0.5"):
        train(half.replace(resume="latest", max_train_steps=3, dmd_weight=0.5), dataset=TinySet())
    (resumed.checkpoint / FAKE_SCORE).unlink()
    with pytest.raises(CheckpointError, match=f"{FAKE_SCORE} is missing"):
        train(half.replace(resume="latest", max_train_steps=3), dataset=TinySet())


def test_a_guided_student_continues_from_its_entry_with_its_teacher(tmp_path, latent_backbone_dir):
    teacher = teacher_entry(tmp_path, latent_backbone_dir)
    student = train(guided(tmp_path, latent_backbone_dir, teacher, output=str(tmp_path / "g")), dataset=TinySet()).entry
    # continued at a vanishing lr, its EMA entry keeps the student's weights (w branch included)
    more = train(guided(tmp_path, latent_backbone_dir, student, teacher=str(teacher), lr=1e-12,
                        output=str(tmp_path / "g2")), dataset=TinySet())
    a, b = load_file(student / "adapter.safetensors"), load_file(more.entry / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any("cond_proj" in k for k in a)
    manifest = json.loads((more.entry / "manifest.json").read_text())
    assert manifest["training"]["teacher"]["path"] == str(teacher)
    # the teacher is pinned by its files' hashes as the start is: another entry put in its place is refused
    checkpointed = guided(tmp_path, latent_backbone_dir, student, teacher=str(teacher), checkpoint_every=2,
                          output=str(tmp_path / "g3"))
    train(checkpointed, dataset=TinySet())
    other = train(loop_config(tmp_path, latent_backbone_dir, method="finetune", caption_dropout=0.5, seed=5,
                              output=str(tmp_path / "ft-other")), dataset=TinySet()).entry
    shutil.rmtree(teacher)
    shutil.copytree(other, teacher)
    with pytest.raises(ConfigError, match="with the --teacher entry .* now holds other weights"):
        train(checkpointed.replace(resume="latest", max_train_steps=3), dataset=TinySet())
    with pytest.raises(ConfigError, match="continuing it needs its guided teacher"):
        train(guided(tmp_path, latent_backbone_dir, student, output=str(tmp_path / "x1")), dataset=TinySet())
    with pytest.raises(ConfigError, match="the guided teacher of a depth student is a depth controlnet entry"):
        train(guided(tmp_path, latent_backbone_dir, student, teacher=str(student), output=str(tmp_path / "x2")),
              dataset=TinySet())
    with pytest.raises(ConfigError, match="--teacher is for continuing a controlnet-guided student"):
        train(guided(tmp_path, latent_backbone_dir, teacher, teacher=str(teacher), output=str(tmp_path / "x3")),
              dataset=TinySet())


def test_plain_codi_takes_dmd_with_the_fine_tuned_entry_as_its_real_score(tmp_path, latent_backbone_dir):
    teacher = teacher_entry(tmp_path, latent_backbone_dir)
    start = train(loop_config(tmp_path, latent_backbone_dir, init_from=str(teacher), output=str(tmp_path / "codi")),
                  dataset=TinySet()).entry                                      # a plain CoDi student of it
    config = loop_config(tmp_path, latent_backbone_dir, init_from=str(start), teacher=str(teacher), dmd_weight=1.0,
                         output=str(tmp_path / "dmd"))
    backbone = load_backbone(config.check_backbone())
    roles = build_roles(config, backbone)
    assert roles.teacher is None                       # CoDi's own teacher stays the backbone alone (the prev predictor)
    real = load_file(teacher / "adapter.safetensors")
    held = roles.real_score.adapter.weights()
    assert real.keys() == held.keys() and all(torch.equal(real[k], held[k].to(real[k].dtype)) for k in real)
    objective = build_objective(config, backbone.schedule, set_w=roles.set_w)
    term = build_distribution_matching(config, roles, objective, torch.device("cpu"))
    assert term.teacher is roles.real_score and term.guidance == (0.0, 0.0)
    z, t, c, text = probe_inputs(backbone)
    with torch.no_grad():
        want = roles.real_score(z, t, c, text)[0]
        x_real, _, shift = term.guided_teacher(term.teacher, z, t, c, text, torch.zeros(2))
        term.fake_adapter.set_guidance(torch.zeros(2))
        x_fake = term.fake(z, t, c, text)[0]
    assert torch.equal(x_real, want) and not shift.any()                  # the entry's own conditional prediction
    assert torch.allclose(x_fake, want, atol=1e-5)                        # the fake score starts there
    assert not torch.allclose(want, ConditionedDenoiser(backbone.unet, backbone.schedule)(z, t, c, text)[0], atol=1e-3)
    run = train(config, dataset=TinySet())
    assert {"distillation", "guidance", "dmd", "fake_score"} <= set(run.last_loss)    # CoDi's own terms and DMD's
    manifest = json.loads((run.entry / "manifest.json").read_text())
    assert manifest["kind"] == "controlnet" and manifest["training"]["teacher"]["path"] == str(teacher)
    with pytest.raises(ConfigError, match="the conditional entry that is DMD's real score"):
        loop_config(tmp_path, latent_backbone_dir, init_from=str(start), teacher=str(teacher))   # no DMD: no use for it
    with pytest.raises(ConfigError, match="plain CoDi, whose teacher is the backbone alone"):
        loop_config(tmp_path, latent_backbone_dir, init_from=str(start), dmd_weight=1.0)         # no real score named
    guided_student = train(guided(tmp_path, latent_backbone_dir, teacher, output=str(tmp_path / "g")),
                           dataset=TinySet()).entry
    with pytest.raises(ConfigError, match="DMD's real score for a depth student is a depth controlnet entry"):
        train(config.replace(teacher=str(guided_student), output=str(tmp_path / "x")), dataset=TinySet())


def test_config_refuses_what_the_terms_cannot_do(tmp_path):
    entry = tmp_path / "entry"
    entry.mkdir()
    with pytest.raises(ConfigError, match="needs --method codi --adapter controlnet-guided --init-from ENTRY"):
        TrainConfig(task="depth", dmd_weight=1.0)                                 # no guided teacher to compare with
    with pytest.raises(ConfigError, match="needs --method codi --adapter controlnet-guided --init-from ENTRY"):
        TrainConfig(task="depth", teacher=str(entry))
    with pytest.raises(ConfigError, match="is not a zoo entry folder"):
        TrainConfig(task="depth", adapter="controlnet-guided", init_from=str(entry), teacher=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="dmd_t_max 1000"):
        TrainConfig(task="depth", dmd_t_max=1000)
    with pytest.raises(ConfigError, match="dmd_one_step 1.5"):
        TrainConfig(task="depth", dmd_one_step=1.5)
    with pytest.raises(ConfigError, match="dmd_weight -1"):
        TrainConfig(task="depth", dmd_weight=-1)
    TrainConfig(task="depth", adapter="controlnet-guided", init_from=str(entry), teacher=str(entry), dmd_weight=0.5)


def test_from_input_predictions_start_from_the_noised_input():
    """dmd_from_input: the student's DMD prediction is made one step from the input, z = alpha_t E(2 c - 1) +
    sigma_t eps at t = dmd_from_input_t, with the same eps the row would have had from the truth; 0 leaves the
    predictions and the generator's draws as they were; the config refuses it where there is no input to start from."""
    calls = []

    def student(z, t, c, text):
        calls.append((z.clone(), t.clone()))
        return z, z

    x, c = torch.randn(3, 4, 2, 2), torch.rand(3, 4, 2, 2)
    encode = lambda images: images * 0.5 + 0.25  # noqa: E731 - any fixed map stands for the autoencoder here
    term = DistributionMatchingTerm(schedule(), None, None, 1.0, None, teacher=None, set_w=lambda w: None,
                                    encode=encode, from_input_t=499)
    term.student_outputs(student, x, c, None, torch.Generator().manual_seed(3))
    z0, t0 = calls[-1]
    alpha, sigma = term.schedule.alpha_sigma(t0, x)
    eps = (z0 - alpha * x) / sigma                                                   # the row's noise, from the truth
    term.from_input = 1.0
    g = torch.Generator().manual_seed(3)
    term.student_outputs(student, x, c, None, g)
    z1, t1 = calls[-1]
    a499, s499 = term.schedule.alpha_sigma(499, x)
    assert torch.equal(t1, torch.full_like(t0, 499))
    assert torch.allclose(z1, a499 * encode(c * 2 - 1) + s499 * eps, atol=1e-5)
    term.from_input = 0.0
    g0 = torch.Generator().manual_seed(3)
    term.student_outputs(student, x, c, None, g0)
    assert torch.equal(calls[-1][0], z0) and torch.equal(calls[-1][1], t0)
    assert torch.rand(1, generator=g0) != torch.rand(1, generator=g)                 # from_input drew one more
    with pytest.raises(ConfigError, match="task 'depth' has no input to start from"):
        TrainConfig(task="depth", dmd_from_input=0.5, dmd_weight=1.0)
    with pytest.raises(ConfigError, match="the predictions made from the input are DMD's"):
        TrainConfig(task="super-resolution", dmd_from_input=0.5)
    with pytest.raises(ConfigError, match="dmd_from_input 1.5"):
        TrainConfig(task="super-resolution", dmd_from_input=1.5)
