"""Atomic writes give what a plain open()/mkdir() would: the umask's modes (or a rewritten file's own), so
entries, checkpoints and exports are readable by other users under the usual umask 022 and private
under 077."""

from __future__ import annotations

import os
import stat

import pytest

from cdd.adapters.architectures import build_adapter
from cdd.adapters.atomic import atomic_directory, current_umask, write_bytes, write_text
from cdd.adapters.zoo import install_entry, save_entry


@pytest.fixture
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], indirect=True)
def test_files_and_folders_follow_the_umask(umask, tmp_path):
    assert current_umask() == umask
    write_text(tmp_path / "a.txt", "x")
    with atomic_directory(tmp_path / "entry") as tmp:
        (tmp / "plain.bin").write_bytes(b"1")
        write_bytes(tmp / "atomic.bin", b"2")
        (tmp / "sub").mkdir()
    assert mode(tmp_path / "a.txt") == 0o666 & ~umask
    assert mode(tmp_path / "entry") == 0o777 & ~umask
    assert mode(tmp_path / "entry" / "sub") == 0o777 & ~umask
    for name in ("plain.bin", "atomic.bin"):
        assert mode(tmp_path / "entry" / name) == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "entry"]  # no temporaries left


@pytest.mark.parametrize("umask", [0o022], indirect=True)
def test_rewriting_a_file_keeps_its_mode(umask, tmp_path):
    f = tmp_path / "secret.json"
    write_text(f, "{}")
    os.chmod(f, 0o600)
    write_text(f, '{"a": 1}')
    assert mode(f) == 0o600 and f.read_text() == '{"a": 1}'


@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True)
def test_saved_and_installed_entries_are_readable_per_the_umask(umask, pixel_backbone, tmp_path):
    adapter = build_adapter("controlnet", pixel_backbone.unet, pixel_backbone.vae_scale_factor)
    save_entry(tmp_path / "run" / "depth", adapter, name="depth", task="depth",
               backbone_fingerprint=pixel_backbone.fingerprint, condition={"channels": 3, "range": [0, 1], "resolution": 16})
    install_entry(tmp_path / "run" / "depth", tmp_path / "zoo", half=True)
    for entry in (tmp_path / "run" / "depth", tmp_path / "zoo" / "depth"):
        assert mode(entry) == 0o777 & ~umask
        files = list(entry.iterdir())
        assert {f.name for f in files} == {"manifest.json", "adapter.safetensors"}
        assert all(mode(f) == 0o666 & ~umask for f in files), [(f.name, oct(mode(f))) for f in files]


def test_install_sets_the_default_guidance_within_the_trained_range(pixel_backbone, tmp_path):
    """cdd-zoo install --guidance W: a controlnet-guided entry's served default, checked against its training range;
    an entry that takes no w is refused."""
    from cdd.adapters.zoo import ZooError, verify_entry

    bb = pixel_backbone
    guided = build_adapter("controlnet-guided", bb.unet, bb.vae_scale_factor, guidance=1.0)
    cond = {"channels": 3, "range": [0, 1], "resolution": 16}
    save_entry(tmp_path / "run" / "g", guided, name="g", task="depth", backbone_fingerprint=bb.fingerprint,
               condition=cond, training={"config": {"guidance_min": 0.0, "guidance_max": 3.0}})
    install_entry(tmp_path / "run" / "g", tmp_path / "zoo", guidance=2.0)
    assert verify_entry(tmp_path / "zoo" / "g").guidance == (2.0, 0.0, 3.0)
    with pytest.raises(ZooError, match=r"guidance 3.5 is outside the range the entry was trained on, \[0, 3\]"):
        install_entry(tmp_path / "run" / "g", tmp_path / "zoo", name="g2", guidance=3.5)
    plain = build_adapter("controlnet", bb.unet, bb.vae_scale_factor)
    save_entry(tmp_path / "run" / "p", plain, name="p", task="depth", backbone_fingerprint=bb.fingerprint, condition=cond)
    with pytest.raises(ZooError, match="a controlnet entry, which takes no guidance weight"):
        install_entry(tmp_path / "run" / "p", tmp_path / "zoo", guidance=1.0)
    assert sorted(p.name for p in (tmp_path / "zoo").iterdir()) == ["g"]  # nothing half-installed
    # a default per step count (cdd-zoo install --guidance-at 1=0), checked against the range too
    install_entry(tmp_path / "run" / "g", tmp_path / "zoo", name="g1", guidance=2.0, guidance_steps={1: 0.0})
    m = verify_entry(tmp_path / "zoo" / "g1")
    assert (m.default_guidance(1), m.default_guidance(2), m.default_guidance(4)) == (0.0, 2.0, 2.0)
    with pytest.raises(ZooError, match=r"guidance_steps\[1\]: 5.0 is not a number in the trained range \[0, 3\]"):
        install_entry(tmp_path / "run" / "g", tmp_path / "zoo", name="g3", guidance_steps={1: 5.0})
    with pytest.raises(ZooError, match="is not a step count in 1..1000"):
        install_entry(tmp_path / "run" / "g", tmp_path / "zoo", name="g3", guidance_steps={0: 1.0})
    with pytest.raises(ZooError, match="a controlnet entry takes no guidance weight"):
        install_entry(tmp_path / "run" / "p", tmp_path / "zoo", name="p1", guidance_steps={1: 0.0})
    assert sorted(p.name for p in (tmp_path / "zoo").iterdir()) == ["g", "g1"]
