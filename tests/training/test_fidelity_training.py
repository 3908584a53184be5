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
    fidelity.make_pool(root / "sr", root / "backbone", root / "run" / "pool", 96, 0, ("mild-64px",), 0.5, (1,), 32)
    assert (root / "run" / "pool" / "chunk-000.pt").stat().st_mtime_ns == stamp


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


def test_cli_installs_and_refuses_bad_settings(world, tmp_path, capsys):
    root, _ = world
    args = ["--entry", str(root / "sr"), "--backbone", str(root / "backbone"), "--output", str(root / "run"),
            "--pool-size", "96", "--max-train-steps", "2", "--batch-size", "4", "--width", "8", "--blocks", "1",
            "--checkpoint-every", "1"]
    assert fidelity.main(args + ["--install", str(tmp_path / "sr-fid"), "--fidelity-default", "0.7"]) == 0
    m = verify_entry(tmp_path / "sr-fid")
    assert m.fidelity["default"] == 0.7 and m.fidelity["training"]["step"] == 2
    assert fidelity.main(args + ["--presets", "mild-64px,blurry"]) == 2
    assert "--presets: unknown ['blurry']" in capsys.readouterr().err
    assert fidelity.main(args + ["--fidelity-default", "2"]) == 2
    assert "--fidelity-default must be in [0, 1]" in capsys.readouterr().err
    other = args.copy()
    other[1], other[5] = str(root / "depth"), str(tmp_path / "depth-run")
    assert fidelity.main(other) == 2
    assert "is a depth entry" in capsys.readouterr().err
