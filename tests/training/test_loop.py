"""The training loop on tiny backbones: what it trains, EMA, resuming bit for bit, NaN stops, zoo entries."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, IterableDataset

from cdd.adapters.architectures import ADAPTER_KINDS
from cdd.adapters.cli import main as zoo_main
from cdd.adapters.zoo import load_entry
from cdd.runtime.diffusion.backbone import load_backbone
from cdd.runtime.diffusion.denoiser import ConditionedDenoiser
from cdd.training.codi import build_objective
from cdd.training.config import ConfigError, TrainConfig
from cdd.training.loop import EMA, BatchStream, TrainingStopped, WithWeights, build_roles, train

CAPTIONS = ["a red sphere on a plain floor at noon", "a blue cube on a checkered floor at night", "make it green"]


class TinySet(IterableDataset):
    """Deterministic random samples at 16 px: sample k depends on k alone (like cdd.training.data)."""

    def __init__(self, size=16, distinct=None, nan_from=None):
        self.size, self.distinct, self.nan_from = size, distinct, nan_from

    def sample(self, k):
        g = torch.Generator().manual_seed(k if self.distinct is None else k % self.distinct)
        target = torch.rand(3, self.size, self.size, generator=g) * 2 - 1
        if self.nan_from is not None and k >= self.nan_from:
            target = torch.full_like(target, float("nan"))
        return {"condition": (target + 1) / 2, "target": target, "text": CAPTIONS[k % len(CAPTIONS)]}

    def __iter__(self):
        k = 0
        while True:
            yield self.sample(k)
            k += 1


class PlainSet(TinySet):
    """The same stream without random access (exercises the skip-ahead path)."""

    sample = property()  # hides TinySet.sample from hasattr()

    def __iter__(self):
        k = 0
        while True:
            yield TinySet.sample(self, k)
            k += 1


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/training/conftest.py


def config(tmp_path, backbone_dir, **kw):
    options = dict(task="depth", backbone=str(backbone_dir), output=str(tmp_path / "run"), batch_size=2,
                   max_train_steps=2, num_workers=0, sample_every=0, checkpoint_every=100, log_every=1)
    options.update(kw)
    return TrainConfig(**options)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind,mode", [("controlnet-lora", "pe"), ("t2i", "lora"), ("t2i", "full")])
def test_one_step_changes_only_the_trainable_parameters(kind, mode, tmp_path, pixel_backbone_dir):
    cfg = config(tmp_path, pixel_backbone_dir, adapter=kind, mode=mode, ema=0.0, max_train_steps=1, checkpoint_every=1)
    backbone = load_backbone(pixel_backbone_dir)
    result = train(cfg, dataset=TinySet(), backbone=backbone)
    reference = load_backbone(pixel_backbone_dir)
    ref_student = build_roles(cfg, reference).student.state_dict()  # same seed: the untrained run
    trainable = set(result.trainable)
    changed = []
    for name, p in result.student.named_parameters():
        if name in trainable:
            changed.append(not torch.equal(p, ref_student[name]))
        else:
            assert torch.equal(p, ref_student[name]), f"frozen {name} changed"
    assert any(changed)
    for name, p in backbone.text_encoder.named_parameters():
        assert torch.equal(p, reference.text_encoder.state_dict()[name])
    # the optimizer, the EMA and the checkpoint hold exactly the trainable parameters
    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    assert set(load_file(ckpt / "trainable.safetensors")) == trainable == set(load_file(ckpt / "ema.safetensors"))
    assert len(torch.load(ckpt / "optimizer.pt")["param_groups"][0]["params"]) == len(trainable)
    if mode == "pe":
        assert all(name.startswith("adapter.") for name in trainable)
    if mode == "lora":
        assert {n.startswith("adapter.") or "lora_" in n for n in trainable} == {True}
        assert any(n.startswith("unet.") for n in trainable)


def test_ema_update_matches_its_formula(tmp_path, pixel_backbone_dir):
    p = {"a": torch.nn.Parameter(torch.randn(5)), "b": torch.nn.Parameter(torch.randn(2, 3))}
    ema = EMA(p, rate=0.9)
    old = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for v in p.values():
            v.add_(1.0)
    ema.update(p)
    for k in p:
        torch.testing.assert_close(ema.shadow[k], 0.9 * old[k] + 0.1 * p[k].detach(), rtol=0, atol=1e-6)
    assert ema.shadow["a"].data_ptr() != p["a"].data_ptr()
    # with warm-up (the fine-tuning teacher): mu_n = min(mu, (1 + n) / (10 + n))
    warm = EMA(p, rate=0.999, warmup=True)
    assert warm.rate_at(1) == 2 / 11 and warm.rate_at(100) == 101 / 110 and warm.rate_at(10_000) == 0.999
    start = {k: v.clone() for k, v in warm.shadow.items()}
    warm.update(p, 1)
    for k in p:
        torch.testing.assert_close(warm.shadow[k], 2 / 11 * start[k] + 9 / 11 * p[k].detach(), rtol=0, atol=1e-6)
    assert EMA(p, rate=0.999).rate_at(1) == 0.999  # CoDi's target: Algorithm 1's constant mu

    # in the loop: theta^-_2 = mu theta^-_1 + (1 - mu) theta_2, read back from two checkpoints
    cfg = config(tmp_path, pixel_backbone_dir, ema=0.75, checkpoint_every=1, keep_checkpoints=5)
    train(cfg, dataset=TinySet())
    ck = tmp_path / "run" / "checkpoints"
    ema1, ema2 = load_file(ck / "step-000001" / "ema.safetensors"), load_file(ck / "step-000002" / "ema.safetensors")
    theta2 = load_file(ck / "step-000002" / "trainable.safetensors")
    moved = 0
    for k in ema1:
        torch.testing.assert_close(ema2[k], 0.75 * ema1[k] + 0.25 * theta2[k], rtol=0, atol=1e-6)
        moved += not torch.equal(ema2[k], ema1[k])
    assert moved


def test_loss_falls_on_a_tiny_overfit_set(tmp_path, pixel_backbone_dir):
    data = TinySet(distinct=2)
    cfg = config(tmp_path, pixel_backbone_dir, lr=3e-3, ema=0.0, max_train_steps=80, log_every=5)
    batch = {k: [data.sample(0)[k], data.sample(1)[k]] for k in ("condition", "target", "text")}
    objective = build_objective(cfg, load_backbone(pixel_backbone_dir).schedule)

    def evaluate(student, backbone):
        x, c = torch.stack(batch["target"]), torch.stack(batch["condition"])
        text = backbone.encode_text(batch["text"])
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # the same 24 (t, eps) draws before and after; target = the student (ema 0)
            return sum(objective(student, student, None, x, c, text, g).loss.item() for _ in range(24)) / 24

    before_backbone = load_backbone(pixel_backbone_dir)
    before = evaluate(build_roles(cfg, before_backbone).student, before_backbone)
    backbone = load_backbone(pixel_backbone_dir)
    result = train(cfg, dataset=data, backbone=backbone)
    after = evaluate(result.student, backbone)
    assert after < 0.5 * before, (before, after)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/total", "loss/distillation", "loss/guidance", "train/lr", "train/grad_norm"} <= set(logged[0])


def test_killed_run_resumes_to_the_same_weights(tmp_path, pixel_backbone_dir):
    common = dict(max_train_steps=6, checkpoint_every=2, sample_every=0, keep_checkpoints=3)
    straight = train(config(tmp_path / "a", pixel_backbone_dir, **common), dataset=TinySet())

    def kill(step):
        if step == 5:
            raise KeyboardInterrupt  # killed after the step-4 checkpoint, mid-way to the next
    killed_cfg = config(tmp_path / "b", pixel_backbone_dir, num_workers=2, **common)
    with pytest.raises(KeyboardInterrupt):
        train(killed_cfg, dataset=PlainSet(), on_step=kill)
    ck = tmp_path / "b" / "run" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-000002", "step-000004"]
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(killed_cfg, dataset=PlainSet())
    with pytest.raises(ConfigError, match="lr: 0.0001 -> 0.001"):
        train(killed_cfg.replace(resume="latest", lr=1e-3), dataset=PlainSet())
    resumed = train(killed_cfg.replace(resume="latest"), dataset=PlainSet())
    assert resumed.step == straight.step == 6
    for name in ("trainable.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "a" / "run" / "checkpoints" / "step-000006" / name)
        b = load_file(ck / "step-000006" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)  # bitwise
    ea, eb = load_file(straight.entry / "adapter.safetensors"), load_file(resumed.entry / "adapter.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # the resumed run replaced the lines after its checkpoint


def test_resume_refuses_an_init_from_entry_that_changed_under_the_run(tmp_path, pixel_backbone_dir):
    """The --init-from entry is pinned by its files' hashes in every checkpoint: a folder that now holds other
    weights (another entry installed over it) would change a cm run's frozen teacher mid-run, so resuming is
    refused, naming the folder; with the entry put back the run resumes."""
    import shutil

    teacher = tmp_path / "teacher"
    first = train(config(tmp_path / "ft1", pixel_backbone_dir, method="finetune", seed=1), dataset=TinySet()).entry
    other = train(config(tmp_path / "ft2", pixel_backbone_dir, method="finetune", seed=2), dataset=TinySet()).entry
    shutil.copytree(first, teacher)
    cfg = config(tmp_path / "cm", pixel_backbone_dir, method="cm", init_from=str(teacher), max_train_steps=4,
                 checkpoint_every=2)

    def kill(step):
        if step == 3:
            raise KeyboardInterrupt  # after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(cfg, dataset=TinySet(), on_step=kill)
    state = json.loads((tmp_path / "cm" / "run" / "checkpoints" / "step-000002" / "state.json").read_text())
    assert len(state["init_from_fingerprint"]) == 64
    shutil.rmtree(teacher)
    shutil.copytree(other, teacher)  # another entry installed over the folder
    with pytest.raises(ConfigError, match=f"--init-from entry {teacher} .*now holds other weights"):
        train(cfg.replace(resume="latest"), dataset=TinySet())
    shutil.rmtree(teacher)
    shutil.copytree(first, teacher)
    assert train(cfg.replace(resume="latest"), dataset=TinySet()).step == 4


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, pixel_backbone_dir):
    cfg = config(tmp_path, pixel_backbone_dir, max_train_steps=10, checkpoint_every=2)
    # batch size 2: steps 1-3 read samples 0-5, step 4 reads sample 6 = the first NaN
    with pytest.raises(TrainingStopped) as stopped:
        train(cfg, dataset=TinySet(nan_from=6))
    message = str(stopped.value)
    assert "loss is nan at step 4" in message and "step-000002" in message and "--resume" in message
    ck = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ck.iterdir()] == ["step-000002"]
    state = json.loads((ck / "step-000002" / "state.json").read_text())
    assert state["step"] == 2
    weights = load_file(ck / "step-000002" / "trainable.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.parametrize(
    "kind,mode,backbone_kind",
    [(k, "pe", "pixel") for k in ADAPTER_KINDS] + [("controlnet-gated", "pe", "latent"), ("t2i", "lora", "pixel"),
                                                  ("t2i", "full", "pixel")],
)
def test_every_adapter_kind_and_mode_trains_to_a_verified_entry(kind, mode, backbone_kind, tmp_path, request):
    backbone_dir = request.getfixturevalue(f"{backbone_kind}_backbone_dir")
    cfg = config(tmp_path, backbone_dir, adapter=kind, mode=mode, sample_every=1)
    result = train(cfg, dataset=TinySet())
    assert zoo_main(["verify", str(result.entry), "--backbone", str(backbone_dir)]) == 0
    manifest = json.loads((result.entry / "manifest.json").read_text())
    assert (manifest["kind"], manifest["mode"], manifest["task"]) == (kind, mode, "depth")
    assert (manifest["sampler"], manifest["steps"]) == ("prev", 4)
    assert manifest["training"]["method"] == "codi" and manifest["training"]["config"] == cfg.to_dict()
    assert manifest["condition"] == {"channels": 3, "range": [0, 1], "resolution": 16}
    assert ("backbone_lora.safetensors" in manifest["files"]) == (mode == "lora")
    assert ("unet.safetensors" in manifest["files"]) == (mode == "full")
    # the entry holds the EMA weights the loop ended with
    unet = load_backbone(backbone_dir).unet
    entry = load_entry(result.entry, unet, manifest["backbone_fingerprint"])
    trained = result.student.adapter.weights()
    for k, v in entry.adapter.weights().items():
        assert torch.equal(v, trained[k]), k
    from PIL import Image

    grid = Image.open(tmp_path / "run" / "samples" / "step-000001.png")
    assert grid.size == (5 * 16, 4 * 16)  # condition | 1 | 2 | 4 steps | target, four rows


def test_finetune_shares_the_loop_and_is_served_with_ddim(tmp_path, pixel_backbone_dir):
    cfg = config(tmp_path, pixel_backbone_dir, method="finetune", adapter="t2i")
    result = train(cfg, dataset=TinySet())
    manifest = json.loads((result.entry / "manifest.json").read_text())
    assert (manifest["sampler"], manifest["steps"], manifest["training"]["method"]) == ("ddim", 50, "finetune")
    assert set(result.last_loss) == {"total", "diffusion"}
    from PIL import Image

    assert Image.open(tmp_path / "run" / "samples" / "step-000002.png").size == (6 * 16, 4 * 16)  # 1, 2, 4, 50 steps


def test_teacher_in_lora_mode_is_the_backbone_without_its_lora(tmp_path, pixel_backbone_dir, perturb):
    cfg = config(tmp_path, pixel_backbone_dir, mode="lora", prev_predictor="teacher")
    backbone = load_backbone(pixel_backbone_dir)
    roles = build_roles(cfg, backbone)
    perturb(backbone.unet, std=0.2)  # LoRA B is zero at start; give it (and everything) values
    plain = load_backbone(pixel_backbone_dir)
    plain.unet.load_state_dict({k: v for k, v in backbone.unet.state_dict().items() if "lora_" not in k and "base_layer" not in k}
                               | {k.replace(".base_layer", ""): v for k, v in backbone.unet.state_dict().items() if "base_layer" in k})
    g = torch.Generator().manual_seed(0)
    z, text = torch.randn(2, 3, 16, 16, generator=g), plain.encode_text(["a red sphere", "a blue cube"])
    t = torch.tensor([999, 500])
    x_tea, eps_tea = roles.teacher(z, t, None, text)
    with torch.no_grad():
        x_ref, eps_ref = ConditionedDenoiser(plain.unet, plain.schedule)(z, t, None, text)
        x_lora, _ = ConditionedDenoiser(backbone.unet, backbone.schedule)(z, t, None, text)
    torch.testing.assert_close(x_tea, x_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_tea, eps_ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x_lora, x_ref, atol=1e-3)  # the student's LoRA is live on the shared UNet
    assert isinstance(roles.teacher, WithWeights)
    assert all(p.requires_grad for n, p in backbone.unet.named_parameters() if "lora_" in n)  # untouched


def test_bf16_mixed_precision_keeps_trainable_weights_in_float32(tmp_path, pixel_backbone_dir):
    cfg = config(tmp_path, pixel_backbone_dir, adapter="t2i", mixed_precision="bf16", max_train_steps=1)
    backbone = load_backbone(pixel_backbone_dir)
    result = train(cfg, dataset=TinySet(), backbone=backbone)
    assert {p.dtype for n, p in result.student.named_parameters() if n in result.trainable} == {torch.float32}
    assert backbone.unet.conv_in.weight.dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(v)) for v in result.last_loss.values())


def test_batch_stream_is_the_same_with_workers_processes_and_without_random_access():
    def texts(stream, n, workers=0):
        loader = DataLoader(stream, batch_size=None, num_workers=workers)
        out = []
        for batch in loader:
            out.append(batch["target"][:, 0, 0, 0].tolist())
            if len(out) == n:
                return out

    one = texts(BatchStream(TinySet(), 2), 6)
    assert one == [[TinySet().sample(k)["target"][0, 0, 0].item() for k in (2 * m, 2 * m + 1)] for m in range(6)]
    assert texts(BatchStream(TinySet(), 2), 6, workers=2) == one
    assert texts(BatchStream(PlainSet(), 2, start=2), 4) == one[2:]
    # two processes interleave micro-batches: rank r takes global batches r, r + 2, ...
    assert texts(BatchStream(TinySet(), 2, rank=1, world_size=2, start=1), 2) == [one[3], one[5]]


@pytest.mark.parametrize(
    "options",
    [
        dict(prev_predictor="teacher", mode="full", adapter="t2i"),
        dict(prev_predictor="teacher", mode="pe"),
        dict(prev_predictor="ddim", consistency_space="x", distance="huber", same_t=False, cond_weight=0.0),
        dict(grad_accum=2, batch_size=1),
    ],
)
def test_ablation_options_train_end_to_end(options, tmp_path, pixel_backbone_dir):
    result = train(config(tmp_path, pixel_backbone_dir, **options), dataset=TinySet())
    assert result.step == 2 and all(torch.isfinite(torch.tensor(v)) for v in result.last_loss.values())
    state = json.loads((result.checkpoint / "state.json").read_text())
    assert state["micro_batches"] == 2 * options.get("grad_accum", 1)


def test_caption_dropout_and_the_noise_removed_log(tmp_path, pixel_backbone_dir):
    seen = {}
    for p in (0.0, 0.5):
        backbone = load_backbone(pixel_backbone_dir)
        encode, prompts = backbone.encode_text, []
        backbone.encode_text = lambda texts, encode=encode, prompts=prompts: prompts.append(list(texts)) or encode(texts)
        cfg = config(tmp_path / str(p), pixel_backbone_dir, method="finetune", caption_dropout=p, max_train_steps=6,
                     batch_size=3)
        train(cfg, dataset=TinySet(), backbone=backbone)
        seen[p] = [t for batch in prompts if len(batch) == 3 for t in batch]  # the training batches (grids take 4)
    assert len(seen[0.0]) == len(seen[0.5]) == 18 and "" not in seen[0.0]
    assert 0 < seen[0.5].count("") < 18  # some captions dropped, not all
    logged = [json.loads(line) for line in (tmp_path / "0.5" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(-1 < row[f"noise_removed/t{t}"] < 2 for row in logged for t in (19, 99, 249))


def test_the_w_branch_learns_at_its_own_rate():
    from cdd.training.loop import parameter_groups

    names = ["adapter.controlnet.conv_in.weight", "adapter.controlnet.time_embedding.cond_proj.weight",
             "adapter.controlnet.time_embedding.linear_1.weight"]
    trainable = {n: torch.nn.Parameter(torch.zeros(2)) for n in names}
    one = parameter_groups(trainable, TrainConfig(task="depth", lr=1e-4))
    assert len(one) == 1 and one[0]["params"] == list(trainable.values())
    two = parameter_groups(trainable, TrainConfig(task="depth", lr=1e-4, guidance_lr_scale=10))
    assert [len(g["params"]) for g in two] == [2, 1] and two[1]["params"][0] is trainable[names[1]]
    assert "lr" not in two[0] and two[1]["lr"] == pytest.approx(1e-3)
    opt = torch.optim.AdamW(two, lr=1e-4)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-4), pytest.approx(1e-3)]
    with pytest.raises(ConfigError, match="guidance_lr_scale"):
        TrainConfig(task="depth", guidance_lr_scale=0)
