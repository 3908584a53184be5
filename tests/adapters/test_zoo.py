import json

import pytest
import torch
from safetensors.torch import load_file

from cdd.adapters.architectures import ADAPTER_KINDS, add_backbone_lora, backbone_lora_name, backbone_lora_state, build_adapter, set_backbone_lora
from cdd.adapters.cli import main as zoo_main
from cdd.adapters.zoo import ADAPTER_FILE, MANIFEST, ZooError, load_entry, save_entry, verify_entry
from cdd.runtime.diffusion.factory import make_backbone

COND = {"channels": 3, "range": [0, 1], "resolution": 16}


def _save(backbone, path, kind="controlnet", perturb=None, **kw):
    adapter = build_adapter(kind, backbone.unet, backbone.vae_scale_factor)
    if perturb:
        perturb(adapter)
    save_entry(path, adapter, name=path.name, task="depth", backbone_fingerprint=backbone.fingerprint, condition=COND, **kw)
    return adapter


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_round_trip_every_kind(kind, pixel_backbone, tmp_path, perturb):
    adapter = _save(pixel_backbone, tmp_path / kind, kind, perturb, training={"method": "codi", "lr": 1e-4})
    entry = load_entry(tmp_path / kind, pixel_backbone.unet, pixel_backbone.fingerprint)
    assert entry.manifest.kind == kind and entry.manifest.training["method"] == "codi"
    for k, v in adapter.weights().items():
        assert torch.equal(entry.adapter.state_dict()[k], v), k
    assert zoo_main(["verify", str(tmp_path / kind)]) == 0


def test_tampered_weights_are_refused(pixel_backbone, tmp_path, capsys):
    _save(pixel_backbone, tmp_path / "a")
    f = tmp_path / "a" / ADAPTER_FILE
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ZooError, match="adapter.safetensors is tampered or corrupt"):
        load_entry(tmp_path / "a", pixel_backbone.unet, pixel_backbone.fingerprint)
    assert zoo_main(["verify", str(tmp_path / "a")]) == 2
    assert "tampered" in capsys.readouterr().err


def test_backbone_mismatch_is_refused(pixel_backbone, tmp_path):
    _save(pixel_backbone, tmp_path / "a")
    other = make_backbone("pixel", resolution=16, seed=99)
    assert other.fingerprint != pixel_backbone.fingerprint
    with pytest.raises(ZooError, match="was made for backbone"):
        load_entry(tmp_path / "a", other.unet, other.fingerprint)


def test_weights_that_do_not_fit_are_refused(pixel_backbone, tmp_path):
    _save(pixel_backbone, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / MANIFEST).read_text())
    manifest["architecture"]["controlnet"]["block_out_channels"] = [8, 16]
    (tmp_path / "a" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ZooError, match="do not fit"):
        load_entry(tmp_path / "a", pixel_backbone.unet, pixel_backbone.fingerprint)


def test_malformed_manifest_names_the_field(pixel_backbone, tmp_path):
    _save(pixel_backbone, tmp_path / "a")
    m = json.loads((tmp_path / "a" / MANIFEST).read_text())
    m["kind"] = "resnet"
    (tmp_path / "a" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ZooError, match="'kind' is 'resnet'"):
        verify_entry(tmp_path / "a")
    (tmp_path / "a" / MANIFEST).write_text("{not json")
    with pytest.raises(ZooError, match="not valid JSON"):
        verify_entry(tmp_path / "a")
    with pytest.raises(ZooError, match="manifest.json is missing"):
        verify_entry(tmp_path)


def test_failed_write_keeps_the_old_entry(pixel_backbone, tmp_path):
    _save(pixel_backbone, tmp_path / "a")
    before = (tmp_path / "a" / MANIFEST).read_text()
    adapter = build_adapter("controlnet", pixel_backbone.unet)
    with pytest.raises(ZooError, match="mode 'lora' needs"):
        save_entry(tmp_path / "a", adapter, name="a", task="depth", backbone_fingerprint="x", condition=COND, mode="lora")
    assert (tmp_path / "a" / MANIFEST).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folders left behind


def test_backbone_lora_entry(tmp_path, perturb):
    backbone = make_backbone("pixel", resolution=16, seed=5)
    adapter = build_adapter("t2i", backbone.unet)
    cfg = add_backbone_lora(backbone.unet, "training_lora", rank=2)
    perturb(backbone.unet, 0.05)  # only the LoRA params matter below
    state = backbone_lora_state(backbone.unet, "training_lora")
    save_entry(
        tmp_path / "e", adapter, name="e", task="edit", backbone_fingerprint=backbone.fingerprint, condition=COND,
        mode="lora", backbone_lora=({"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules)}, state),
    )
    fresh = make_backbone("pixel", resolution=16, seed=5)
    entry = load_entry(tmp_path / "e", fresh.unet, fresh.fingerprint)
    loaded = backbone_lora_state(fresh.unet, backbone_lora_name("e"))
    assert set(loaded) == set(state)
    for k in state:
        assert torch.equal(loaded[k], state[k])
    x = torch.randn(1, 3, 16, 16)
    text = fresh.encode_text(["a cube"])
    with torch.no_grad():
        set_backbone_lora(fresh.unet, None)
        plain = fresh.unet(x, 500, text).sample
        set_backbone_lora(fresh.unet, backbone_lora_name("e"))
        lora = fresh.unet(x, 500, text).sample
        set_backbone_lora(fresh.unet, None)
        again = fresh.unet(x, 500, text).sample
    assert not torch.allclose(plain, lora) and torch.equal(plain, again)
    assert entry.manifest.mode == "lora"


def test_cli_list_show_export(pixel_backbone, pixel_backbone_dir, tmp_path, perturb, capsys):
    from diffusers import ControlNetModel, T2IAdapter

    zoo = tmp_path / "zoo"
    a = _save(pixel_backbone, zoo / "depth-cn", "controlnet", perturb)
    _save(pixel_backbone, zoo / "depth-t2i", "t2i", perturb)
    _save(pixel_backbone, zoo / "depth-gated", "controlnet-gated", perturb)
    assert zoo_main(["--zoo", str(zoo), "list"]) == 0
    out = capsys.readouterr().out
    assert "depth-cn" in out and "depth-t2i" in out
    assert zoo_main(["--zoo", str(zoo), "show", "depth-cn"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "controlnet"

    assert zoo_main(["--zoo", str(zoo), "export", "depth-cn", "--out", str(tmp_path / "ex"), "--backbone", str(pixel_backbone_dir)]) == 0
    cn = ControlNetModel.from_pretrained(tmp_path / "ex")
    for k, v in a.controlnet.state_dict().items():
        assert torch.equal(cn.state_dict()[k], v)
    assert zoo_main(["--zoo", str(zoo), "export", "depth-t2i", "--out", str(tmp_path / "ex2"), "--backbone", str(pixel_backbone_dir)]) == 0
    T2IAdapter.from_pretrained(tmp_path / "ex2")
    assert json.loads((tmp_path / "ex2" / "cdd_gates.json").read_text())["gates"]
    assert zoo_main(["--zoo", str(zoo), "export", "depth-gated", "--out", str(tmp_path / "ex3"), "--backbone", str(pixel_backbone_dir)]) == 2
    assert "cannot be exported" in capsys.readouterr().err
    assert zoo_main(["--zoo", str(zoo), "verify", "depth-cn", "--backbone", str(pixel_backbone_dir)]) == 0
    assert zoo_main(["--zoo", str(zoo), "show", "nope"]) == 2


def test_install_copies_renames_and_halves_an_entry(pixel_backbone, tmp_path, perturb, capsys):
    from cdd.runtime.diffusion.denoiser import ConditionedDenoiser

    unet, sched = pixel_backbone.unet, pixel_backbone.schedule
    adapter = perturb(build_adapter("controlnet", unet))
    save_entry(tmp_path / "run" / "entry", adapter, name="depth-controlnet-codi", task="depth",
               backbone_fingerprint=pixel_backbone.fingerprint, condition={"channels": 3, "range": [0, 1], "resolution": 16})
    zoo = tmp_path / "zoo"
    assert zoo_main(["--zoo", str(zoo), "install", str(tmp_path / "run" / "entry"), "--name", "depth", "--half"]) == 0
    assert "installed" in capsys.readouterr().out
    m = verify_entry(zoo / "depth")
    assert m.name == "depth" and m.training["installed_from"]["float16"] is True
    assert {v.dtype for v in load_file(zoo / "depth" / ADAPTER_FILE).values()} == {torch.float16}
    assert (zoo / "depth" / ADAPTER_FILE).stat().st_size < 0.6 * (tmp_path / "run" / "entry" / ADAPTER_FILE).stat().st_size
    loaded = load_entry(zoo / "depth", unet, pixel_backbone.fingerprint).adapter
    assert all(p.dtype == torch.float32 for p in loaded.parameters())  # cast back to the model's dtype on load
    g = torch.Generator().manual_seed(0)
    z, cond = torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    text = pixel_backbone.encode_text(["a red cube"] * 2)
    a = ConditionedDenoiser(unet, sched, adapter)(z, 500, cond, text)[0]
    b = ConditionedDenoiser(unet, sched, loaded)(z, 500, cond, text)[0]
    assert 0 < (a - b).abs().max() < 1e-2  # float16 rounding of the weights, nothing else
    # an existing name is not overwritten unless asked
    assert zoo_main(["--zoo", str(zoo), "install", str(tmp_path / "run" / "entry"), "--name", "depth"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert zoo_main(["--zoo", str(zoo), "install", str(tmp_path / "run" / "entry"), "--name", "depth", "--replace",
                     "--sampler", "ddim", "--steps", "2"]) == 0
    assert {v.dtype for v in load_file(zoo / "depth" / ADAPTER_FILE).values()} == {torch.float32}
    assert (verify_entry(zoo / "depth").sampler, verify_entry(zoo / "depth").steps) == ("ddim", 2)
    assert zoo_main(["--zoo", str(zoo), "install", str(tmp_path / "run" / "entry"), "--name", "x", "--sampler", "euler"]) == 2
    assert "sampler 'euler' is not one of" in capsys.readouterr().err
    # ILVR keeps a low-resolution input's low frequencies: a super-resolution default only
    assert zoo_main(["--zoo", str(zoo), "install", str(tmp_path / "run" / "entry"), "--name", "x", "--sampler", "prev+ilvr"]) == 2
    assert "sampler 'prev+ilvr' is not one of prev, ddim, cm, gd" in capsys.readouterr().err
    save_entry(tmp_path / "run" / "sr", adapter, name="sr", task="super-resolution",
               backbone_fingerprint=pixel_backbone.fingerprint, condition={"channels": 3, "range": [0, 1], "resolution": 16})
    assert zoo_main(["--zoo", str(zoo), "install", str(tmp_path / "run" / "sr"), "--sampler", "prev+ilvr"]) == 0
    assert verify_entry(zoo / "sr").sampler == "prev+ilvr"
    # a start from the input: super-resolution and edit only, the default shown by `list`
    assert zoo_main(["--zoo", str(zoo), "install", str(tmp_path / "run" / "sr"), "--replace", "--steps", "1",
                     "--strength", "0.5"]) == 0
    assert (verify_entry(zoo / "sr").steps, verify_entry(zoo / "sr").strength) == (1, 0.5)
    capsys.readouterr()
    assert zoo_main(["--zoo", str(zoo), "list"]) == 0 and "prev x 1 strength 0.5" in capsys.readouterr().out
    assert zoo_main(["--zoo", str(zoo), "install", str(tmp_path / "run" / "entry"), "--name", "y", "--strength", "0.5"]) == 2
    assert "task 'depth' cannot start from its input" in capsys.readouterr().err
