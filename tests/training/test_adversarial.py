"""The optional distribution-level term (training/adversarial.py) on a tiny latent backbone: the features and the
heads' shapes, weight 0 = plain CoDi bit for bit, a discriminator step learns, gradients reach only the adapter,
checkpoints carry the discriminator and its optimiser."""

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import load_file

from cdd.adapters.architectures import GuidedControlNetAdapter, build_adapter
from cdd.runtime.diffusion.denoiser import ConditionedDenoiser
from cdd.training.adversarial import (
    DISCRIMINATOR,
    DISCRIMINATOR_OPTIMIZER,
    AdversarialTerm,
    FeatureDiscriminator,
    build_adversarial,
    feature_channels,
    hinge_discriminator_loss,
    unet_features,
)
from cdd.training.checkpoints import CheckpointError
from cdd.training.codi import Terms
from cdd.training.config import ConfigError, TrainConfig
from cdd.training.loop import train

from .test_loop import CAPTIONS, TinySet
from .test_loop import config as loop_config

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/training/conftest.py


def config(tmp_path, backbone_dir, **kw):
    return loop_config(tmp_path, backbone_dir, **{"max_train_steps": 3, **kw})


def inputs(backbone, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = backbone.resolution // backbone.vae_scale_factor
    x = torch.randn(batch, backbone.unet.config.in_channels, size, size, generator=g)
    c = torch.rand(batch, 3, backbone.resolution, backbone.resolution, generator=g)
    text = backbone.encode_text([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)])
    return x, c, text


def test_features_are_the_unets_own_and_the_heads_give_one_logit_per_level(latent_backbone):
    unet = latent_backbone.unet
    x, c, text = inputs(latent_backbone)
    t = torch.tensor([10, 900])
    seen = {}
    hook = unet.mid_block.register_forward_hook(lambda m, i, o: seen.setdefault("mid", o))
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=text)  # the whole forward, decoder included
        feats = unet_features(unet, x, t, text)
    hook.remove()
    n_down = sum(len(b.resnets) + (1 if b.downsamplers else 0) for b in unet.down_blocks)
    assert len(feats) == 1 + n_down + 1  # conv_in, every down residual, the mid block
    assert torch.equal(feats[-1], seen["mid"])
    channels = feature_channels(unet, x.shape[-1], text.shape[-1])
    assert channels == [f.shape[1] for f in feats]
    assert feats[0].shape[-1] == x.shape[-1] and feats[-1].shape[-1] < x.shape[-1]
    logits = FeatureDiscriminator(channels)(feats, c)
    assert logits.shape == (2, len(feats)) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="feature levels"):
        FeatureDiscriminator(channels[:-1])(feats, c)


def test_a_discriminator_step_lowers_its_loss_on_separable_data(latent_backbone):
    unet = latent_backbone.unet
    x, c, text = inputs(latent_backbone, batch=4)
    t = torch.full((4,), 100)
    with torch.no_grad():
        real = unet_features(unet, x.abs() + 1, t, text)
        fake = unet_features(unet, -x.abs() - 1, t, text)
    torch.manual_seed(0)
    disc = FeatureDiscriminator([f.shape[1] for f in real])
    term = AdversarialTerm(latent_backbone.schedule, unet, disc, torch.optim.AdamW(disc.parameters(), lr=1e-3), 1.0)
    losses = [float(term.discriminator_step(real, fake, c)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_text_heads_start_as_the_plain_ones_and_learn_what_the_plain_ones_cannot(latent_backbone):
    """Real and fake features identical, only the captions differ: the text-free heads cannot tell them apart (the
    hinge loss stays at 2), the projection term can; with P at zero both give the same logits."""
    unet = latent_backbone.unet
    x, c, _ = inputs(latent_backbone, batch=4)
    red, blue = (latent_backbone.encode_text([cap] * 4) for cap in ("a red cube", "a blue sphere at night"))
    t = torch.full((4,), 100)
    with torch.no_grad():
        feats = unet_features(unet, x, t, red)
    channels = [f.shape[1] for f in feats]
    torch.manual_seed(0)
    plain = FeatureDiscriminator(channels)
    torch.manual_seed(0)
    texted = FeatureDiscriminator(channels, text_dim=red.shape[-1])
    assert torch.equal(plain(feats, c), texted(feats, c, red))  # P = 0: the same discriminator at the start
    with pytest.raises(ValueError, match="needs the caption"):
        texted(feats, c)
    with pytest.raises(ValueError, match="takes none"):
        plain(feats, c, red)

    def train(disc, text_real, text_fake):
        optimizer = torch.optim.AdamW(disc.parameters(), lr=1e-2)
        losses = []
        for _ in range(40):
            loss = hinge_discriminator_loss(disc(feats, c, text_real), disc(feats, c, text_fake))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return losses
    assert min(train(plain, None, None)) > 1.99  # the same input on both sides: nothing to learn
    losses = train(texted, red, blue)
    assert losses[-1] < 0.5 * losses[0], losses


def test_a_guided_student_is_judged_at_w_zero(latent_backbone, perturb):
    unet, schedule = latent_backbone.unet, latent_backbone.schedule
    torch.manual_seed(0)
    plain = build_adapter("controlnet", unet, latent_backbone.vae_scale_factor)
    adapter = perturb(GuidedControlNetAdapter.from_controlnet(plain, guidance=2.0))
    student = ConditionedDenoiser(unet, schedule, adapter)
    seen = []
    hook = adapter.controlnet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep_cond"].clone()),
                                                        with_kwargs=True)
    x, c, text = inputs(latent_backbone)
    cfg = TrainConfig(task="depth", adapter="controlnet-guided", adversarial_weight=0.5, adversarial_text=True)
    term = build_adversarial(cfg, unet, schedule, x.shape[-1], text.shape[-1], torch.device("cpu"),
                             set_w=adapter.set_guidance)
    assert term.reads_text
    base = Terms(torch.zeros(()), {"distillation": torch.tensor(0.0)}, torch.zeros(2))
    term(base, student, x, c, text, torch.Generator().manual_seed(0))
    hook.remove()
    # the w embedding the student saw is the one of w = 0, for every sample, and w is handed back afterwards
    w0 = get_timestep_embedding(torch.zeros(2), adapter.embedding_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert len(seen) == 1 and torch.allclose(seen[0].float(), w0)
    assert adapter.w is None and adapter.guidance == 2.0


def test_gradients_reach_only_the_adapter_and_the_discriminator_takes_its_step(latent_backbone, perturb):
    unet, schedule = latent_backbone.unet, latent_backbone.schedule
    torch.manual_seed(0)
    adapter = perturb(build_adapter("controlnet", unet, latent_backbone.vae_scale_factor))
    student = ConditionedDenoiser(unet, schedule, adapter)
    x, c, text = inputs(latent_backbone)
    cfg = TrainConfig(task="depth", adversarial_weight=0.5)
    term = build_adversarial(cfg, unet, schedule, x.shape[-1], text.shape[-1], torch.device("cpu"))
    before = {k: v.clone() for k, v in term.discriminator.state_dict().items()}
    base = Terms(torch.zeros(()), {"distillation": torch.tensor(0.0)}, torch.zeros(2))
    out = term(base, student, x, c, text, torch.Generator().manual_seed(0))
    assert set(out.parts) == {"distillation", "adversarial", "discriminator"}
    assert torch.allclose(out.loss, 0.5 * out.parts["adversarial"])
    out.loss.backward()
    assert all(p.grad is None for p in unet.parameters())  # the backbone is frozen
    assert all(p.grad is None for p in term.discriminator.parameters())  # the student's term leaves D alone
    grads = [p.grad for p in adapter.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    after = term.discriminator.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # one discriminator step was taken
    assert set(term.student_timesteps(400, torch.Generator().manual_seed(1)).tolist()) == {999, 749, 499, 249}


def test_weight_zero_is_plain_codi_bit_for_bit(tmp_path, latent_backbone_dir):
    plain = config(tmp_path / "a", latent_backbone_dir, checkpoint_every=3)
    old = plain.to_dict()
    for k in ("adversarial_weight", "adversarial_lr", "adversarial_t_max"):
        old.pop(k)  # a config saved before the term existed
    a = train(TrainConfig.from_dict(old), dataset=TinySet())
    b = train(config(tmp_path / "b", latent_backbone_dir, checkpoint_every=3, adversarial_weight=0.0,
                     adversarial_lr=5e-3), dataset=TinySet())
    c = train(config(tmp_path / "c", latent_backbone_dir, checkpoint_every=3, adversarial_weight=0.5), dataset=TinySet())
    wa, wb, wc = (load_file(r.checkpoint / "trainable.safetensors") for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert not (b.checkpoint / DISCRIMINATOR).exists() and (c.checkpoint / DISCRIMINATOR).is_file()
    assert "adversarial" not in b.last_loss and {"adversarial", "discriminator"} <= set(c.last_loss)


def test_checkpoints_carry_the_discriminator_and_resume_bit_for_bit(tmp_path, latent_backbone_dir):
    common = dict(max_train_steps=4, checkpoint_every=2, keep_checkpoints=3, adversarial_weight=0.5)
    straight = train(config(tmp_path / "a", latent_backbone_dir, **common), dataset=TinySet())

    def kill(step):
        if step == 3:
            raise KeyboardInterrupt
    killed = config(tmp_path / "b", latent_backbone_dir, **common)
    with pytest.raises(KeyboardInterrupt):
        train(killed, dataset=TinySet(), on_step=kill)
    resumed = train(killed.replace(resume="latest"), dataset=TinySet())
    assert resumed.step == straight.step == 4
    for name in ("trainable.safetensors", DISCRIMINATOR):
        x, y = load_file(straight.checkpoint / name), load_file(resumed.checkpoint / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    ox = torch.load(straight.checkpoint / DISCRIMINATOR_OPTIMIZER, weights_only=True)
    oy = torch.load(resumed.checkpoint / DISCRIMINATOR_OPTIMIZER, weights_only=True)
    assert all(torch.equal(ox["state"][i]["exp_avg"], oy["state"][i]["exp_avg"]) for i in ox["state"])
    # a damaged discriminator file is named, and the older intact checkpoint offered
    damaged = tmp_path / "b" / "run" / "checkpoints" / "step-000004" / DISCRIMINATOR
    damaged.write_bytes(damaged.read_bytes()[:64])
    with pytest.raises(CheckpointError, match=f"{DISCRIMINATOR} is corrupt.*step-000002"):
        train(killed.replace(resume="latest", max_train_steps=5), dataset=TinySet())


def test_the_term_is_refused_where_it_is_not_built(tmp_path):
    with pytest.raises(ConfigError, match="adversarial_weight -1"):
        TrainConfig(task="depth", adversarial_weight=-1)
    with pytest.raises(ConfigError, match="mode pe"):
        TrainConfig(task="depth", adversarial_weight=0.1, mode="lora")
    with pytest.raises(ConfigError, match="finetune"):
        TrainConfig(task="depth", adversarial_weight=0.1, method="finetune")
    with pytest.raises(ConfigError, match="adversarial_t_max"):
        TrainConfig(task="depth", adversarial_t_max=1000)
    with pytest.raises(ConfigError, match="adversarial_text"):
        TrainConfig(task="depth", adversarial_text=True)
    TrainConfig(task="depth", adapter="controlnet-guided", adversarial_weight=0.1, adversarial_text=True)  # built


def test_a_guided_codi_run_trains_with_the_text_reading_term(tmp_path, latent_backbone_dir):
    run = train(config(tmp_path, latent_backbone_dir, max_train_steps=2, checkpoint_every=2, adapter="controlnet-guided",
                       guidance_max=3.0, adversarial_weight=0.5, adversarial_text=True), dataset=TinySet())
    saved = load_file(run.checkpoint / DISCRIMINATOR)
    assert any(k.startswith("text.") for k in saved) and {"adversarial", "discriminator", "guidance"} <= set(run.last_loss)


def test_a_run_continued_with_the_term_added_starts_its_discriminator_fresh(tmp_path, latent_backbone_dir):
    plain = config(tmp_path, latent_backbone_dir, max_train_steps=2, checkpoint_every=2)
    first = train(plain, dataset=TinySet())
    assert not (first.checkpoint / DISCRIMINATOR).exists()
    with pytest.raises(ConfigError, match="adversarial_weight: 0.0 -> 0.5"):  # the term would have been on at step 1
        train(plain.replace(resume="latest", max_train_steps=4, adversarial_weight=0.5), dataset=TinySet())
    added = plain.replace(resume="latest", max_train_steps=4, adversarial_weight=0.5, adversarial_start=2)
    more = train(added, dataset=TinySet())
    assert more.step == 4 and (more.checkpoint / DISCRIMINATOR).is_file() and "adversarial" in more.last_loss
    # the same config from scratch takes the same steps: plain CoDi up to step 2, then the term
    scratch = train(added.replace(resume=None, output=str(tmp_path / "scratch")), dataset=TinySet())
    a, b = load_file(more.checkpoint / "trainable.safetensors"), load_file(scratch.checkpoint / "trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a checkpoint written with the term must still have its discriminator
    (more.checkpoint / DISCRIMINATOR).unlink()
    with pytest.raises(CheckpointError, match=f"{DISCRIMINATOR} is missing"):
        train(added.replace(max_train_steps=5), dataset=TinySet())
