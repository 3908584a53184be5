"""cdd-train-fidelity on a tiny backbone: the pool holds the entry's served outputs, training moves the outputs
towards the truth on held-back pool samples, a resumed run equals an uninterrupted one, and bad settings are
refused with what is wrong."""

from __future__ import annotations

import pytest
import torch

from cdd.adapters.architectures import build_adapter
from cdd.adapters.zoo import save_entry, verify_entry
from cdd.runtime.diffusion.factory import make_backbone, save_backbone
from cdd.training import fidelity

RES = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("fidelity-train")
    bb = make_backbone("latent", resolution=RES, seed=5)
    save_backbone(bb, root / "backbone")
    adapter = build_adapter("controlnet", bb.unet, bb.vae_scale_factor)
    cond = {"channels": 3, "range": [0, 1], "resolution": RES}
    save_entry(root / "sr", adapter, name="sr", task="super-resolution", backbone_fingerprint=bb.fingerprint,
               condition=cond, steps=1, sampler="prev+ilvr")
    save_entry(root / "depth", adapter, name="depth", task="depth", backbone_fingerprint=bb.fingerprint, condition=cond)
    chunks = fidelity.make_pool(root / "sr", root / "backbone", root / "run" / "pool", 96, 0, ("mild-64px", "bicubic"),
                                0.5, (1, 2), 32, log=lambda m: None)
    return root, fidelity.load_pool(chunks)


def test_pool_holds_served_outputs_of_both_presets(world):
    root, pool = world
    assert pool["output"].shape == pool["target"].shape == pool["condition"].shape == (96, 3, RES, RES)
    assert pool["output"].dtype == torch.uint8 and set(pool["steps"].tolist()) <= {1, 2}
    # the same pairs again: item k degraded by presets[k % 2], each preset from its own stream
    again = fidelity.pool_items(0, 4, 0, ("mild-64px", "bicubic"), 0.5, RES)
    assert torch.equal((again["condition"] * 255).round().to(torch.uint8), pool["condition"][:4])
    # a plain bicubic input is the antialiased down-scale of its truth, brought back up
    truth = (pool["target"][1:2].float() / 255)
    lr = torch.nn.functional.interpolate(truth, size=(RES // 4,) * 2, mode="bicubic", antialias=True).clamp(0, 1)
    up = torch.nn.functional.interpolate((lr * 255).round() / 255, size=(RES,) * 2, mode="bicubic").clamp(0, 1)
    assert (up - pool["condition"][1:2].float() / 255).abs().max() < 3 / 255
    # resumed: the chunk is not made again
    stamp = (root / "run" / "pool" / "chunk-000.pt").stat().st_mtime_ns
    fidelity.make_pool(root / "sr", root / "backbone", root / "run" / "pool", 96, 0, ("mild-64px", "bicubic"), 0.5,
                       (1, 2), 32)
    assert (root / "run" / "pool" / "chunk-000.pt").stat().st_mtime_ns == stamp
    # a pool made with other settings is not mixed with this run's: refused, naming what differs
    with pytest.raises(fidelity.FidelityError, match=r"other settings \(presets: \['mild-64px', 'bicubic'\]"):
        fidelity.make_pool(root / "sr", root / "backbone", root / "run" / "pool", 96, 0, ("mild-64px",), 0.5, (1, 2), 32)
    with pytest.raises(fidelity.FidelityError, match=r"sampler: 'prev\+ilvr'.*sampler: 'prev\+ilvr-out'"):
        fidelity.make_pool(root / "sr", root / "backbone", root / "run" / "pool", 96, 0, ("mild-64px", "bicubic"), 0.5,
                           (1, 2), 32, sampler="prev+ilvr-out")
    assert (root / "run" / "pool" / "chunk-000.pt").stat().st_mtime_ns == stamp


def test_pool_with_another_sampler_holds_its_outputs(world, tmp_path):
    """`--sampler prev+ilvr-out`: the pool's outputs are that sampler's (ILVR's update on the output only), not the
    manifest's `prev+ilvr`; a sampler super-resolution does not serve is refused."""
    from cdd.runtime.diffusion.backbone import load_backbone
    from cdd.training.evaluate import Candidate, entry_model, generate
    from cdd.adapters.zoo import Manifest

    root, pool = world
    chunks = fidelity.make_pool(root / "sr", root / "backbone", tmp_path / "pool", 32, 0, ("mild-64px", "bicubic"),
                                0.5, (1,), 32, log=lambda m: None, sampler="prev+ilvr-out")
    out = fidelity.load_pool(chunks)
    assert torch.equal(out["condition"], pool["condition"][:32])
    bb = load_backbone(root / "backbone")
    manifest = Manifest.from_file(root / "sr" / "manifest.json")
    with entry_model(Candidate("sr", root / "sr", manifest, ["prev+ilvr-out"]), bb, 0) as model:
        data = {"condition": out["condition"].float() / 255}
        want, _ = generate(model, bb, data, bb.encode_text([""] * 32), "prev+ilvr-out", 1, 0, 32)
    assert (out["output"].float() / 255 - want).abs().max() <= 1 / 255 + 1e-6
    assert not torch.equal(out["output"], pool["output"][:32])  # not the manifest's prev+ilvr outputs
    with pytest.raises(fidelity.FidelityError, match=r"--sampler 'prev\+keep' is not a super-resolution sampler"):
        fidelity.make_pool(root / "sr", root / "backbone", tmp_path / "pool2", 32, 0, ("mild-64px",), 0.5, (1,), 32,
                           sampler="prev+keep")


def test_flat_error_counts_high_frequencies_on_the_truths_flat_regions_only():
    """Speckle added on a flat half of the truth is counted; the same speckle on its textured half is not; a smooth
    offset (no high frequency) is not."""
    g = torch.Generator().manual_seed(0)
    truth = torch.zeros(1, 3, 32, 32)
    truth[..., 16:] = torch.rand(1, 3, 32, 16, generator=g) * 2 - 1  # right half textured
    speckle = (torch.rand(1, 3, 32, 32, generator=g) - 0.5) * 0.2
    left, right = speckle.clone(), speckle.clone()
    left[..., 16:], right[..., :16] = 0, 0
    assert fidelity.flat_error(truth + left, truth) > 0.01
    assert fidelity.flat_error(truth + right, truth) < 1e-3
    assert fidelity.flat_error(truth + 0.1, truth) < 1e-6


def test_pixel_error_l1_and_rmse_by_hand():
    """l1: the mean |error|; rmse: the root of the mean squared error (what PSNR counts), at the same scale: an
    error of 0.1 everywhere is 0.1 in both; one pixel off by 0.4 in four is 0.1 as L1 and 0.2 as RMSE."""
    truth = torch.zeros(1, 1, 2, 2)
    even = truth + 0.1
    one = truth.clone()
    one[0, 0, 0, 0] = 0.4
    assert fidelity.pixel_error(even, truth, "l1").item() == pytest.approx(0.1)
    assert fidelity.pixel_error(even, truth, "rmse").item() == pytest.approx(0.1)
    assert fidelity.pixel_error(one, truth, "l1").item() == pytest.approx(0.1)
    assert fidelity.pixel_error(one, truth, "rmse").item() == pytest.approx(0.2)
    assert fidelity.pixel_error(one, truth, "l1+rmse").item() == pytest.approx(0.15)
    x = truth.clone().requires_grad_()
    fidelity.pixel_error(x, truth, "rmse").backward()  # no NaN at a zero error
    assert torch.isfinite(x.grad).all()


def test_training_moves_outputs_towards_the_truth_and_resumes_exactly(world, tmp_path):
    _, pool = world
    arch = {"width": 8, "blocks": 1, "head": 4}
    kw = dict(batch_size=8, lr=1e-2, seed=0, checkpoint_every=20, architecture=arch, holdout=32, log=lambda m: None)
    ckpt = fidelity.train(pool, tmp_path / "a", steps=60, resume=False, **kw)
    history = torch.load(ckpt, weights_only=False)["history"]
    assert history[-1]["psnr_fixed"] > history[-1]["psnr_output"] + 0.5  # a random tiny model: much to correct
    def crash_at_20(message: str) -> None:  # the process dies after its step-20 checkpoint
        if message.startswith("step 20:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fidelity.train(pool, tmp_path / "b", steps=60, resume=False, **{**kw, "log": crash_at_20})
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 20
    state_b = torch.load(fidelity.train(pool, tmp_path / "b", steps=60, resume=True, **kw), weights_only=False)
    state_a = torch.load(ckpt, weights_only=False)
    assert all(torch.equal(state_a["model"][k], state_b["model"][k]) for k in state_a["model"])
    with pytest.raises(fidelity.FidelityError, match="trained with --flat-weight 0, not 2"):  # another objective
        fidelity.train(pool, tmp_path / "b", steps=80, resume=True, **{**kw, "flat_weight": 2.0})
    with pytest.raises(fidelity.FidelityError, match="trained with --pixel-loss l1, not rmse"):
        fidelity.train(pool, tmp_path / "b", steps=80, resume=True, **{**kw, "pixel_loss": "rmse"})
    ckpt_c = fidelity.train(pool, tmp_path / "c", steps=60, resume=False, **{**kw, "pixel_loss": "rmse"})
    state_c = torch.load(ckpt_c, weights_only=False)
    assert state_c["pixel_loss"] == "rmse"
    assert state_c["history"][-1]["psnr_fixed"] > state_c["history"][-1]["psnr_output"] + 0.5


def test_a_signal_stops_training_with_a_checkpoint_and_installs_nothing(world, tmp_path, capsys, monkeypatch):
    """SIGTERM during training (after step 2): that step is checkpointed, the run says how to continue,
    exits 128 + 15, and no entry is installed from the unfinished module; --resume then finishes and installs."""
    import os
    import signal

    root, _ = world
    args = ["--entry", str(root / "sr"), "--backbone", str(root / "backbone"), "--output", str(tmp_path / "run"),
            "--pool-size", "96", "--max-train-steps", "6", "--batch-size", "4", "--width", "8", "--blocks", "1",
            "--checkpoint-every", "1", "--photo-fraction", "0.5", "--pool-steps", "1,2",
            "--install", str(tmp_path / "sr-fid")]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "pool").symlink_to(root / "run" / "pool")  # the fixture's pool: same settings
    real_train = fidelity.train

    def train_then_term(*a, **k):
        log = k.pop("log")

        def send_at_step_2(message):
            log(message)
            if message.startswith("step 2:"):
                os.kill(os.getpid(), signal.SIGTERM)

        return real_train(*a, log=send_at_step_2, **k)

    monkeypatch.setattr(fidelity, "train", train_then_term)
    assert fidelity.main(args) == 128 + signal.SIGTERM
    monkeypatch.setattr(fidelity, "train", real_train)
    err = capsys.readouterr().err
    assert "SIGTERM at step 2" in err and "nothing installed" in err and "--resume" in err
    assert not (tmp_path / "sr-fid").exists()
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 2
    assert fidelity.main(args + ["--resume"]) == 0
    assert verify_entry(tmp_path / "sr-fid").fidelity["training"]["step"] == 6


def test_cli_installs_and_refuses_bad_settings(world, tmp_path, capsys):
    root, _ = world
    args = ["--entry", str(root / "sr"), "--backbone", str(root / "backbone"), "--output", str(root / "run"),
            "--pool-size", "96", "--max-train-steps", "2", "--batch-size", "4", "--width", "8", "--blocks", "1",
            "--checkpoint-every", "1", "--photo-fraction", "0.5", "--pool-steps", "1,2"]
    assert fidelity.main(args + ["--install", str(tmp_path / "sr-fid"), "--fidelity-default", "0.7"]) == 0
    m = verify_entry(tmp_path / "sr-fid")
    assert m.fidelity["default"] == 0.7 and m.fidelity["training"]["step"] == 2
    assert fidelity.main(args + ["--presets", "mild-64px,blurry"]) == 2
    assert "--presets: unknown ['blurry']" in capsys.readouterr().err
    assert fidelity.main(args + ["--fidelity-default", "2"]) == 2
    assert "--fidelity-default must be in [0, 1]" in capsys.readouterr().err
    assert fidelity.main(args + ["--flat-weight", "-1"]) == 2
    assert "--flat-weight must be >= 0" in capsys.readouterr().err
    assert fidelity.main(args + ["--install", str(tmp_path / "sr-fid")]) == 2  # installed above: refused before training
    assert f"--install {tmp_path / 'sr-fid'} already exists" in capsys.readouterr().err
    other = args.copy()
    other[1], other[5] = str(root / "depth"), str(tmp_path / "depth-run")
    assert fidelity.main(other) == 2
    assert "is a depth entry" in capsys.readouterr().err
