"""The scenes world: determinism, depth against analytic geometry, edits, language, CLI."""

import dataclasses
import json
import math

import numpy as np
import pytest
from PIL import Image

from cdd.training.data import cli, scenes
from cdd.training.data.scenes import (
    CAMERA, DEPTH_MAX, SceneObject, SceneSpec, caption, edit_pairs, pixel_rays, render,
    render_batch, sample_edit, sample_scene, scene_vocabulary,
)

SIZE = 32


def _coverage(spec: SceneSpec, size: int = SIZE, ss: int = 2) -> np.ndarray:
    """ids at the supersampling rays, [size, size, ss*ss]: render(size, ss) casts exactly
    the rays of render(size * ss, 1)."""
    ids = render(spec, size * ss, 1).ids
    return ids.reshape(size, ss, size, ss).transpose(0, 2, 1, 3).reshape(size, size, ss * ss)


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.any(a != b, axis=-1)


# --- determinism --------------------------------------------------------------------------


def test_same_seed_same_bytes():
    a, b = sample_scene(7), sample_scene(7)
    assert a == b
    ra, rb = render(a, SIZE), render(b, SIZE)
    assert ra.image.tobytes() == rb.image.tobytes()
    assert ra.depth.tobytes() == rb.depth.tobytes()
    assert sample_edit(a, 3) == sample_edit(b, 3)
    assert render(sample_scene(8), SIZE).image.tobytes() != ra.image.tobytes()


def test_rng_and_seed_agree():
    assert sample_scene(np.random.default_rng(11)) == sample_scene(11)


def test_render_batch_equals_single_renders():
    specs = [sample_scene(s) for s in range(3)]
    batch = render_batch(specs, SIZE)
    assert batch.image.shape == (3, SIZE, SIZE, 3) and batch.depth.shape == (3, SIZE, SIZE)
    for i, s in enumerate(specs):
        single = render(s, SIZE)
        assert batch.image[i].tobytes() == single.image.tobytes()
        assert batch.depth[i].tobytes() == single.depth.tobytes()


@pytest.mark.parametrize("size,ss", [(17, 1), (24, 3), (64, 2)])
def test_render_shapes_and_ranges(size, ss):
    r = render(sample_scene(3), size, ss)
    assert r.image.shape == (size, size, 3) and r.image.dtype == np.float32
    assert r.depth.shape == (size, size) and r.depth.dtype == np.float32
    assert 0 <= r.image.min() and r.image.max() <= 1
    assert 0 < r.depth.min() and r.depth.max() <= DEPTH_MAX


# --- geometry -----------------------------------------------------------------------------


def test_sphere_centre_depth_is_camera_distance_minus_radius():
    sphere = SceneObject("sphere", "red", x=0.3, z=1.5, size=0.6)
    spec = SceneSpec((sphere,), floor="plain", time="noon")
    r = render(spec, SIZE)
    centre = np.array([sphere.x, sphere.size, sphere.z])
    u, v, _ = scenes.project(centre)
    row, col = int(v * SIZE), int(u * SIZE)
    expected = np.linalg.norm(centre - np.array(CAMERA.position)) - sphere.size
    # One pixel off the centre line moves the surface by D^2 * dtheta^2 / (2 r) ~ 0.01.
    pixel_angle = math.radians(CAMERA.fov_y_deg) / SIZE
    tol = np.linalg.norm(centre - CAMERA.position) ** 2 * pixel_angle**2 / sphere.size
    assert r.ids[row, col] == 0
    assert abs(r.depth[row, col] - expected) < tol


def test_depth_matches_analytic_ray_casting():
    """Every pixel against a naive re-implementation: sphere and floor intersections."""
    sphere = SceneObject("sphere", "blue", x=-0.5, z=1.0, size=0.55)
    spec = SceneSpec((sphere,), floor="checker", time="sunset")
    r = render(spec, SIZE)
    d = pixel_rays(SIZE)
    o = np.array(CAMERA.position)
    c = np.array([sphere.x, sphere.size, sphere.z])
    b = d @ (o - c)
    disc = b**2 - (np.sum((o - c) ** 2) - sphere.size**2)
    t_sphere = np.where(disc > 0, -b - np.sqrt(np.maximum(disc, 0)), np.inf)
    t_floor = np.where(d[..., 1] < 0, -o[1] / np.minimum(d[..., 1], -1e-12), np.inf)
    expected = np.minimum(np.minimum(t_sphere, t_floor), DEPTH_MAX)
    np.testing.assert_allclose(r.depth, expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(r.ids == 0, t_sphere < t_floor)
    assert np.all(r.depth[r.ids == -2] == DEPTH_MAX)


def test_depth_points_lie_on_the_objects():
    """Back-project every object pixel: it must lie on that object's surface."""
    objs = (SceneObject("cube", "red", x=-1.0, z=0.5, size=0.45, yaw=0.6),
            SceneObject("cylinder", "green", x=0.4, z=2.0, size=0.4, height=1.2),
            SceneObject("sphere", "yellow", x=1.4, z=0.0, size=0.5))
    spec = SceneSpec(objs, floor="stripes", time="night", light_azimuth=-0.4)
    r = render(spec, SIZE)
    p = np.array(CAMERA.position) + r.depth[..., None] * pixel_rays(SIZE)
    for k, o in enumerate(objs):
        q = p[r.ids == k]
        assert len(q) > 10
        if o.shape == "sphere":
            dist = np.linalg.norm(q - [o.x, o.size, o.z], axis=-1)
            np.testing.assert_allclose(dist, o.size, atol=1e-4)
        elif o.shape == "cylinder":
            radial = np.hypot(q[:, 0] - o.x, q[:, 2] - o.z)
            on_side = np.isclose(radial, o.size, atol=1e-4) & (q[:, 1] > -1e-4) & (q[:, 1] < o.height + 1e-4)
            on_top = np.isclose(q[:, 1], o.height, atol=1e-4) & (radial < o.size + 1e-4)
            assert np.all(on_side | on_top)
        else:
            cs, sn = math.cos(o.yaw), math.sin(o.yaw)
            dx, dz = q[:, 0] - o.x, q[:, 2] - o.z
            local = np.stack([cs * dx - sn * dz, q[:, 1] - o.size, sn * dx + cs * dz], axis=-1)
            np.testing.assert_allclose(np.abs(local).max(axis=-1), o.size, atol=1e-4)
    floor = p[r.ids == -1]
    np.testing.assert_allclose(floor[r.depth[r.ids == -1] < DEPTH_MAX][:, 1], 0, atol=1e-4)


def test_sampled_scenes_are_well_formed():
    for seed in range(40):
        spec = sample_scene(seed)
        assert 1 <= len(spec.objects) <= 4
        for i, a in enumerate(spec.objects):
            for b in spec.objects[i + 1:]:  # footprints apart
                assert math.hypot(a.x - b.x, a.z - b.z) > a.footprint_radius + b.footprint_radius
        r = render(spec, SIZE)
        assert (r.ids == -2).any() and (r.ids == -1).any(), "floor and sky both show"
        for k in range(len(spec.objects)):
            assert (r.ids == k).sum() >= 8, f"object {k} of seed {seed} is (nearly) hidden"
        xs = [scenes.project(np.array([o.x, o.top / 2, o.z]))[0] for o in spec.objects]
        assert xs == sorted(xs), "objects are listed left to right"


def test_spec_validation_and_round_trip():
    with pytest.raises(ValueError, match="shape"):
        SceneObject("cone", "red", 0, 0, 0.5)
    with pytest.raises(ValueError, match="color"):
        SceneObject("sphere", "mauve", 0, 0, 0.5)
    with pytest.raises(ValueError, match="1 to 4"):
        SceneSpec(())
    with pytest.raises(ValueError, match="share"):
        SceneSpec((SceneObject("sphere", "red", 0, 0, 0.5), SceneObject("sphere", "red", 2, 0, 0.5)))
    spec = sample_scene(5)
    assert SceneSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


# --- language -----------------------------------------------------------------------------


def test_caption_format():
    spec = SceneSpec((SceneObject("sphere", "red", -1, 1, 0.5), SceneObject("cube", "orange", 1, 1, 0.4)),
                     floor="checker", time="sunset")
    assert caption(spec) == "a red sphere and an orange cube on a checkered floor at sunset"


def test_every_word_is_in_the_vocabulary():
    vocab = scene_vocabulary()
    assert vocab == sorted(set(vocab)) and all(w.islower() for w in vocab)
    assert len(scenes.COLORS) >= 8 and set(scenes.COLORS) <= set(vocab)
    used = set()
    for seed in range(60):
        spec = sample_scene(seed)
        used |= set(caption(spec).split())
        for instruction, _ in edit_pairs(spec):
            used |= set(instruction.split())
    assert used <= set(vocab)
    assert used == set(vocab), f"vocabulary words never used: {set(vocab) - used}"


def test_edit_instructions():
    one = SceneSpec((SceneObject("sphere", "red", 0, 1, 0.5),), floor="plain", time="noon")
    instructions = [i for i, _ in edit_pairs(one)]
    assert "make it night" in instructions and "make it noon" not in instructions
    assert "make the sphere green" in instructions and "make the sphere red" not in instructions
    assert "make the floor checkered" in instructions
    assert not any(i.startswith("remove") for i in instructions), "never remove the last object"
    two = dataclasses.replace(one, objects=one.objects + (SceneObject("sphere", "blue", 1.5, 1, 0.5),))
    pairs = dict(edit_pairs(two))
    assert "make the red sphere green" in pairs and "make the red sphere blue" not in pairs
    assert pairs["remove the blue sphere"].objects == one.objects
    assert pairs["make the red sphere green"].objects[0].color == "green"
    assert {sample_edit(two, s).instruction.split()[0] for s in range(40)} == {"make", "remove"}


# --- edits change only what they should ----------------------------------------------------


SEPARATE = SceneSpec((SceneObject("sphere", "red", -1.4, 0.8, 0.5),
                      SceneObject("cube", "blue", 0.2, 1.6, 0.45, yaw=0.3),
                      SceneObject("cylinder", "yellow", 1.6, 0.3, 0.4, height=1.1)),
                     floor="checker", time="sunset", light_azimuth=0.6)


@pytest.mark.parametrize("spec", [SEPARATE] + [sample_scene(s) for s in range(6)])
def test_colour_edit_changes_only_that_object(spec):
    """Outside the sub-pixel coverage of the recoloured object not one value changes:
    shadows and other objects do not depend on an object's colour."""
    cover = _coverage(spec)
    base = render(spec, SIZE).image
    for instruction, edited in edit_pairs(spec):
        if not instruction.startswith("make the") or "floor" in instruction:
            continue
        k = next(i for i, (a, b) in enumerate(zip(spec.objects, edited.objects)) if a != b)
        changed = _changed(base, render(edited, SIZE).image)
        touched = np.any(cover == k, axis=-1)
        assert not np.any(changed & ~touched), instruction
        assert np.all(changed[np.all(cover == k, axis=-1)]), instruction


@pytest.mark.parametrize("spec", [SEPARATE] + [sample_scene(s) for s in range(4)])
def test_floor_edit_leaves_objects_and_sky(spec):
    cover = _coverage(spec)
    base = render(spec, SIZE).image
    floor_seen = np.any(cover == -1, axis=-1)
    for instruction, edited in edit_pairs(spec):
        if "floor" in instruction:
            changed = _changed(base, render(edited, SIZE).image)
            assert not np.any(changed & ~floor_seen), instruction
            assert changed.sum() > 0.1 * floor_seen.sum(), instruction


def test_removal_only_uncovers_and_lifts_shadows():
    """Removing an object changes its own pixels; elsewhere only its shadow goes, which
    can only brighten (sunlight is added back), never darken or recolour the sky."""
    spec = SEPARATE
    cover = _coverage(spec)
    base = render(spec, SIZE).image
    for k in range(len(spec.objects)):
        removed = SceneSpec(spec.objects[:k] + spec.objects[k + 1:], spec.floor, spec.time, spec.light_azimuth)
        after = render(removed, SIZE).image
        outside = ~np.any(cover == k, axis=-1)
        assert np.all(after[outside] >= base[outside] - 1e-6)
        assert not np.any(_changed(base, after)[outside & np.all(cover == -2, axis=-1)])


def test_time_edit_changes_sky():
    spec = SEPARATE
    night = render(dataclasses.replace(spec, time="night"), SIZE).image
    sky = render(spec, SIZE).ids == -2
    assert np.abs(night[sky] - render(spec, SIZE).image[sky]).mean() > 0.2


# --- cdd-scenes ---------------------------------------------------------------------------


def test_cli_writes_what_it_promises(tmp_path):
    out = tmp_path / "scenes"
    assert cli.main(["--n", "3", "--out", str(out), "--size", "16", "--seed", "4", "--sr"]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    info = json.loads((out / "info.json").read_text())
    assert info["depth_scale"] == cli.DEPTH_SCALE and info["depth_max"] == DEPTH_MAX
    for k, row in enumerate(rows):
        spec = SceneSpec.from_dict(row["spec"])
        assert spec == sample_scene(np.random.default_rng([4, k]))
        assert row["text"] == caption(spec)
        r = render(spec, 16)
        image = np.asarray(Image.open(out / row["file_name"]))
        assert image.shape == (16, 16, 3)
        assert np.abs(image / 255 - r.image).max() <= 0.5 / 255 + 1e-6
        depth_png = Image.open(out / row["depth_file_name"])
        assert depth_png.mode in ("I;16", "I")
        depth = np.asarray(depth_png).astype(np.float64) / row["depth_scale"]
        np.testing.assert_allclose(depth, r.depth, atol=0.5 / row["depth_scale"] + 1e-6)
        edited = SceneSpec.from_dict(row["edited_spec"])
        assert dict(edit_pairs(spec))[row["instruction"]] == edited
        assert np.asarray(Image.open(out / row["edited_file_name"])).shape == (16, 16, 3)
        assert np.asarray(Image.open(out / row["lr_file_name"])).shape == (4, 4, 3)
    for sheet in ("contact_sheet.png", "sr_pairs_contact_sheet.png"):
        with Image.open(out / sheet) as im:
            assert im.width > 200 and im.height > 100
    assert not list(tmp_path.glob(".*partial*"))


def test_cli_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        cli.main(["--n", "1", "--out", str(tmp_path)])
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_cli_leaves_nothing_behind_on_error(tmp_path, monkeypatch):
    calls = []

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk on fire")
        return render(*args, **kwargs)

    monkeypatch.setattr(cli.scenes, "render", failing_render)
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["--n", "4", "--out", str(tmp_path / "out"), "--size", "16"])
    assert list(tmp_path.iterdir()) == []
