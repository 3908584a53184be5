"""The user zoo: `cdd-zoo install` without --zoo writes there (never into the package's own zoo), and
`cdd-serve` without --zoo serves it beside the embedded zoo."""

from __future__ import annotations

import os

import pytest

from cdd.adapters import zoo as zoo_module
from cdd.adapters.architectures import build_adapter
from cdd.adapters.cli import main as zoo_main
from cdd.adapters.zoo import save_entry
from cdd.runtime.serving.engine import Engine, EngineError
from cdd.runtime.diffusion.factory import make_backbone, save_backbone
from cdd.runtime.serving.settings import ServeSettings, ZooSettings

RES = 16
COND = {"channels": 3, "range": [0, 1], "resolution": RES}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("CDD_"):
            monkeypatch.delenv(k)


def entry(bb, path, task="depth"):
    adapter = build_adapter("controlnet", bb.unet, bb.vae_scale_factor)
    save_entry(path, adapter, name=path.name, task=task, backbone_fingerprint=bb.fingerprint, condition=COND, steps=1)
    return path


def test_the_user_zoo_defaults_to_xdg_data_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert ZooSettings().user_zoo == tmp_path / "data" / "cdd" / "zoo"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ZooSettings().user_zoo == tmp_path / "home" / ".local" / "share" / "cdd" / "zoo"
    monkeypatch.setenv("CDD_USER_ZOO", str(tmp_path / "mine"))
    s = ServeSettings()
    assert s.user_zoo == tmp_path / "mine" and s.install_dir() == tmp_path / "mine"
    assert s.zoo_dirs() == [zoo_module.default_zoo_dir()]  # a user zoo that does not exist is not served
    (tmp_path / "mine").mkdir()
    assert s.zoo_dirs() == [tmp_path / "mine", zoo_module.default_zoo_dir()]
    named = ServeSettings(zoo=tmp_path / "z")
    assert named.zoo_dirs() == [tmp_path / "z"] and named.install_dir() == tmp_path / "z"


def test_install_without_zoo_goes_to_the_user_zoo_and_list_shows_both(pixel_backbone, monkeypatch, tmp_path, capsys):
    embedded = zoo_module.default_zoo_dir()
    def entries():
        return sorted(p.name for p in embedded.iterdir() if p.is_dir() and not p.name.startswith("."))

    before = entries()
    monkeypatch.setenv("CDD_USER_ZOO", str(tmp_path / "user"))
    long_name = "depth-controlnet-codi-trained-on-my-own-photographs"
    entry(pixel_backbone, tmp_path / "run" / long_name)

    assert zoo_main(["install", str(tmp_path / "run" / long_name)]) == 0
    out = capsys.readouterr().out
    assert f"as {tmp_path / 'user' / long_name} (the user zoo" in out and "CDD_USER_ZOO" in out
    assert (tmp_path / "user" / long_name / "manifest.json").is_file()
    assert entries() == before  # the package's own zoo is untouched

    assert zoo_main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "TASK", "KIND", "MODE", "DEFAULT", "FOLDER"]
    assert lines[1].startswith(long_name + "  ") and len(lines) == 1 + 1 + len(before)
    for column in ("TASK", "KIND", "FOLDER"):  # every row's cell starts under its header, long name or not
        at = lines[0].index(column)
        assert all(line[at - 2:at] == "  " and line[at] != " " for line in lines[1:]), (column, lines)
    assert zoo_main(["show", long_name]) == 0 and long_name in capsys.readouterr().out


def test_serve_without_zoo_serves_the_user_zoo_beside_the_embedded_one(monkeypatch, tmp_path, caplog):
    bb = make_backbone("latent", resolution=RES, seed=31)
    other = make_backbone("latent", resolution=RES, seed=32)
    save_backbone(bb, tmp_path / "backbone")
    monkeypatch.setattr(zoo_module, "EMBEDDED", tmp_path / "embedded")
    shipped = tmp_path / "embedded" / "zoo"
    entry(bb, shipped / "depth")
    entry(bb, shipped / "super-resolution", "super-resolution")
    entry(other, shipped / "for-another-backbone")
    user = tmp_path / "user"
    entry(bb, user / "depth")  # shadows the shipped depth
    entry(bb, user / "edit", "edit")

    engine = Engine(ServeSettings(backbone=tmp_path / "backbone", user_zoo=user, warmup=False)).start()
    try:
        served = {r.name: r.path for r in engine.pool.entries()}
    finally:
        engine.stop()
    assert served == {"depth": (user / "depth").resolve(), "edit": (user / "edit").resolve(),
                      "super-resolution": (shipped / "super-resolution").resolve()}
    skipped = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "for-another-backbone (made for backbone" in skipped and "a user zoo entry is named 'depth'" in skipped

    # In a named zoo an entry for another backbone is an error of that entry: unavailable, with the reason,
    # and the rest is served (the default zoos skip it as made for another backbone).
    engine = Engine(ServeSettings(backbone=tmp_path / "backbone", zoo=shipped, warmup=False)).start()
    try:
        assert {r.name for r in engine.pool.entries()} == {"depth", "super-resolution"}
        assert "was made for backbone" in engine.unavailable["for-another-backbone"].reason
    finally:
        engine.stop()
    # Defaults with nothing made for the served backbone say so rather than serve nothing.
    save_backbone(other, tmp_path / "other")
    (shipped / "for-another-backbone").rename(tmp_path / "moved")
    with pytest.raises(EngineError, match="no entry of .* was made for the served backbone"):
        Engine(ServeSettings(backbone=tmp_path / "other", user_zoo=user, warmup=False)).start()
