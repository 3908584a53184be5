"""The super-resolution fidelity module (adapters/fidelity.py) and its place in a zoo entry."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cdd.adapters.architectures import build_adapter
from cdd.adapters.fidelity import FIDELITY_FILE, FidelityNet
from cdd.adapters.zoo import ZooError, add_fidelity, install_entry, load_entry, save_entry, verify_entry
from cdd.runtime.diffusion.factory import make_backbone


def randomised(net: FidelityNet, seed: int = 0, std: float = 0.05) -> FidelityNet:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return net


def test_untrained_module_is_the_identity_and_w_scales_its_correction_by_hand():
    y, c = torch.rand(2, 3, 8, 12) * 2 - 1, torch.rand(2, 3, 8, 12) * 2 - 1
    net = FidelityNet(width=8, blocks=1, head=4)
    assert torch.equal(net(y, c, 1.0), y)  # the last convolution starts at zero
    randomised(net)
    h = F.silu(net.head(torch.cat([y, c, y - c], 1)))  # the forward written out
    b = net.down(F.pixel_unshuffle(h, 2))
    b = b + net.body[0].conv2(F.silu(net.body[0].conv1(b)))
    r = net.tail(F.silu(h + F.pixel_shuffle(net.up(b), 2)))
    assert r.abs().mean() > 1e-3
    torch.testing.assert_close(net(y, c, 1.0), y + r)
    torch.testing.assert_close(net(y, c, 0.25), y + 0.25 * r)
    per_row = net(y, c, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(per_row, torch.stack([y[0], (y + r)[1]]))
    with pytest.raises(ValueError, match="even"):
        net(y[..., :7, :], c[..., :7, :])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        net(y, c[:, :1])
    assert FidelityNet.from_config(net.config()).config() == {"width": 8, "blocks": 1, "head": 4}
    with pytest.raises(ValueError, match="unknown fidelity architecture keys"):
        FidelityNet.from_config({"width": 8, "depth": 3})


def test_flat_guard_takes_invented_texture_off_flat_input_only_by_hand():
    """Where the input is flat the guarded output is the input plus the blurred difference of the module's output
    to it (speckle the input does not hold is blurred away; a colour shift stays); where the input has texture the
    output is the unguarded one; w scales both; the threshold travels in the config."""
    from cdd.adapters.fidelity import gaussian_blur, input_flatness

    g = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 32, 32), 0.2)
    textured = flat + torch.randn(1, 3, 32, 32, generator=g) * 0.3  # local std far above 2 x 0.02
    assert torch.equal(input_flatness(flat, 0.02), torch.ones(1, 1, 32, 32))
    assert input_flatness(textured, 0.02).max() == 0
    assert input_flatness(flat + 0.001 * torch.randn(1, 3, 32, 32, generator=g), 0.02).min() == 1  # std 0.0005
    plain = randomised(FidelityNet(width=8, blocks=1, head=4), seed=1, std=0.2)
    guarded = FidelityNet(width=8, blocks=1, head=4, flat_guard=0.02)
    guarded.load_state_dict(plain.state_dict())
    y = flat + torch.randn(1, 3, 32, 32, generator=g) * 0.1  # a decoded output with speckle on a flat input
    r = plain(y, flat) - y
    out = guarded(y, flat)
    hp = lambda x: x - gaussian_blur(x, 1.0)
    assert hp(plain(y, flat)).abs().mean() > 0.01
    torch.testing.assert_close(out, y + r - hp(y + r - flat))  # by hand: m = 1 everywhere
    torch.testing.assert_close(out - flat, gaussian_blur(y + r - flat, 1.0))  # its difference to the input blurred
    assert hp(out).pow(2).mean() < 0.1 * hp(plain(y, flat)).pow(2).mean()  # the speckle's energy mostly gone
    torch.testing.assert_close(guarded(y, textured), plain(y, textured))  # textured input: unchanged
    torch.testing.assert_close(guarded(y, flat, 0.5), y + 0.5 * (out - y))
    assert torch.equal(guarded(y, flat, 0.0), y)
    assert FidelityNet.from_config(guarded.config()).flat_guard == 0.02 and "flat_guard" not in plain.config()
    with pytest.raises(ValueError, match="flat_guard must be in"):
        FidelityNet(flat_guard=0.0)


@pytest.fixture(scope="module")
def sr_entry(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    bb = make_backbone("latent", resolution=16, seed=5)
    adapter = build_adapter("controlnet", bb.unet, bb.vae_scale_factor)
    save_entry(root / "sr", adapter, name="sr", task="super-resolution", backbone_fingerprint=bb.fingerprint,
               condition={"channels": 3, "range": [0, 1], "resolution": 16})
    save_entry(root / "depth", adapter, name="depth", task="depth", backbone_fingerprint=bb.fingerprint,
               condition={"channels": 3, "range": [0, 1], "resolution": 16})
    return root, bb


def test_an_entry_carries_its_module_hashed_and_refuses_a_tampered_or_missing_one(sr_entry):
    root, bb = sr_entry
    net = randomised(FidelityNet(width=8, blocks=1, head=4), seed=3)
    dest = add_fidelity(root / "sr", root / "sr-fid", net, default=0.8, training={"steps": 5})
    manifest = verify_entry(dest, bb.fingerprint)
    assert FIDELITY_FILE in manifest.files and manifest.fidelity["default"] == 0.8
    assert manifest.fidelity["architecture"] == net.config() and manifest.fidelity["training"] == {"steps": 5}
    loaded = load_entry(dest, bb.unet, bb.fingerprint).fidelity
    y, c = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(loaded(y, c, 1.0), net(y, c, 1.0))
    assert load_entry(root / "sr", bb.unet, bb.fingerprint).fidelity is None
    # installing (float16, as the embedded zoo keeps entries) keeps the module
    installed = install_entry(dest, root / "zoo", half=True)
    torch.testing.assert_close(load_entry(installed, bb.unet, bb.fingerprint).fidelity(y, c, 1.0), net(y, c, 1.0),
                               atol=2e-3, rtol=0)
    # refused: a depth entry; an existing destination; a tampered file; a manifest that names no file
    with pytest.raises(ZooError, match="is a depth entry"):
        add_fidelity(root / "depth", root / "depth-fid", net, default=1.0, training={})
    with pytest.raises(ZooError, match="already exists"):
        add_fidelity(root / "sr", dest, net, default=1.0, training={})
    blob = bytearray((dest / FIDELITY_FILE).read_bytes())
    blob[-1] ^= 1
    (dest / FIDELITY_FILE).write_bytes(bytes(blob))
    with pytest.raises(ZooError, match=f"{FIDELITY_FILE} is tampered or corrupt"):
        verify_entry(dest)
    m = json.loads((installed / "manifest.json").read_text())
    del m["files"][FIDELITY_FILE]
    (installed / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ZooError, match=f"has a fidelity module but lists no {FIDELITY_FILE}"):
        verify_entry(installed)
    m["fidelity"]["default"] = 1.5
    (installed / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ZooError, match=r"fidelity.*'default' must be a number in \[0, 1\]"):
        verify_entry(installed)


def test_an_entry_keeps_its_flat_guard_and_refuses_a_bad_one(sr_entry, tmp_path):
    """The guard's threshold is part of the module's architecture in the manifest: loaded back as it was saved;
    a manifest edited to an impossible threshold is refused naming the file."""
    root, bb = sr_entry
    net = randomised(FidelityNet(width=8, blocks=1, head=4, flat_guard=0.01))
    dest = add_fidelity(root / "sr", tmp_path / "guarded", net, default=1.0, training={})
    assert verify_entry(dest).fidelity["architecture"]["flat_guard"] == 0.01
    loaded = load_entry(dest, bb.unet, bb.fingerprint).fidelity
    y, c = torch.rand(1, 3, 16, 16), torch.full((1, 3, 16, 16), 0.5)
    assert loaded.flat_guard == 0.01
    torch.testing.assert_close(loaded(y, c, 1.0), net(y, c, 1.0))
    m = json.loads((dest / "manifest.json").read_text())
    m["fidelity"]["architecture"]["flat_guard"] = 3
    (dest / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ZooError, match="does not fit its fidelity architecture.*flat_guard must be in"):
        load_entry(dest, bb.unet, bb.fingerprint)
