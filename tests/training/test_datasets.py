"""Task datasets: the scenes streams and the real-data loaders (imagefolder,
save_to_disk, plain high-resolution folder), with their errors."""

import io
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cdd.training.data import scenes
from cdd.training.data.datasets import (
    ColumnNotFoundError, DataError, ImageReadError, TASKS, build_dataset,
)

SIZE = 32


def take(ds, n):
    return list(itertools.islice(iter(ds), n))


def check_sample(x, size=SIZE):
    # an edit sample also names the edited scene's caption (cdd-eval's caption agreement)
    assert set(x) - {"caption"} == {"condition", "target", "text"}
    if "caption" in x:
        assert isinstance(x["caption"], str) and x["caption"] != x["text"]
    for key, low in (("condition", 0.0), ("target", -1.0)):
        t = x[key]
        assert t.shape == (3, size, size) and t.dtype == torch.float32, key
        assert low <= t.min() and t.max() <= 1, key
    assert isinstance(x["text"], str)


# --- the scenes world ---------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_scenes_streams_shapes_ranges_and_text(task):
    vocab = set(scenes.scene_vocabulary())
    samples = take(build_dataset(task, size=SIZE, seed=3), 4)
    for x in samples:
        check_sample(x)
        assert x["text"] and set(x["text"].split()) <= vocab and x["text"] == x["text"].lower()
    # a stream, not one repeated sample
    assert not torch.equal(samples[0]["target"], samples[1]["target"])


@pytest.mark.parametrize("task", TASKS)
def test_scenes_streams_are_deterministic_and_seeded(task):
    a = take(build_dataset(task, size=SIZE, seed=1), 2)
    b = take(build_dataset(task, size=SIZE, seed=1), 2)
    c = take(build_dataset(task, size=SIZE, seed=2), 2)
    for x, y in zip(a, b):
        assert torch.equal(x["condition"], y["condition"]) and torch.equal(x["target"], y["target"])
        assert x["text"] == y["text"]
    assert not torch.equal(a[0]["target"], c[0]["target"])


def test_ranks_split_the_global_sequence():
    single = take(build_dataset("depth", size=SIZE, seed=0), 4)
    rank0 = take(build_dataset("depth", size=SIZE, seed=0, rank=0, world_size=2), 2)
    rank1 = take(build_dataset("depth", size=SIZE, seed=0, rank=1, world_size=2), 2)
    assert [x["text"] for x in single] == [rank0[0]["text"], rank1[0]["text"], rank0[1]["text"], rank1[1]["text"]]
    assert torch.equal(single[3]["target"], rank1[1]["target"])


def test_dataloader_workers_differ_and_replay_the_single_process_order():
    ds = build_dataset("depth", size=SIZE, seed=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    from_workers = list(itertools.islice(iter(loader), 4))
    single = take(ds, 4)
    assert [x["text"] for x in from_workers] == [x["text"] for x in single]
    assert not torch.equal(from_workers[0]["target"], from_workers[1]["target"])


def test_depth_condition_is_normalised_inverse_depth():
    x = take(build_dataset("depth", size=SIZE, seed=0), 1)[0]
    c = x["condition"]
    assert torch.equal(c[0], c[1]) and torch.equal(c[0], c[2])
    assert c[:, 0].max() == 0, "sky (top row) is far = black"
    assert c[0, -1].mean() > c[0, SIZE // 2].mean() > 0, "near floor is brighter than far floor"
    spec = scenes.sample_scene(np.random.default_rng([0, 0]))
    expected = scenes.depth_to_condition(scenes.render(spec, SIZE).depth)
    np.testing.assert_allclose(c[0].numpy(), expected)


def test_edit_condition_is_the_source_and_target_the_edit():
    x = take(build_dataset("edit", size=SIZE, seed=0), 1)[0]
    rng = np.random.default_rng([0, 0])
    spec = scenes.sample_scene(rng)
    edit = scenes.sample_edit(spec, rng)
    assert x["text"] == edit.instruction
    np.testing.assert_allclose(x["condition"].permute(1, 2, 0).numpy(), scenes.render(spec, SIZE).image)
    np.testing.assert_allclose((x["target"].permute(1, 2, 0).numpy() + 1) / 2,
                               scenes.render(edit.spec, SIZE).image, atol=1e-6)


def _photos(size=SIZE):
    from cdd.training.data.photos import PhotoPatches

    rng = np.random.default_rng(0)
    return PhotoPatches([rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)], size=size)


def test_super_resolution_mixes_photo_patches_without_moving_the_scenes():
    plain = take(build_dataset("super-resolution", size=SIZE, seed=0), 12)
    mixed = take(build_dataset("super-resolution", size=SIZE, seed=0, photo_fraction=0.5, photos=_photos()), 12)
    texts = [x["text"] for x in mixed]
    assert 0 < texts.count("a photo") < 12
    for a, b in zip(plain, mixed):
        check_sample(b)
        if b["text"] != "a photo":  # a scene keeps its place in the stream: sample k is the same scene
            assert a["text"] == b["text"] and torch.equal(a["target"], b["target"])
    blank = take(build_dataset("super-resolution", size=SIZE, seed=0, photo_fraction=1.0, photos=_photos(),
                               sr_caption=False), 2)
    assert [x["text"] for x in blank] == ["", ""]


def test_photo_patches_default_to_the_training_photographs_only():
    from cdd.training.data.photos import HELD_OUT, TRAIN

    ds = build_dataset("super-resolution", size=SIZE, seed=0, photo_fraction=0.25)
    assert ds.photos.names == list(TRAIN) and not set(ds.photos.names) & set(HELD_OUT)
    with pytest.raises(DataError, match="photo_fraction is for super-resolution, not 'depth'"):
        build_dataset("depth", size=SIZE, photo_fraction=0.5)
    with pytest.raises(DataError, match="photo_fraction must be in"):
        build_dataset("super-resolution", size=SIZE, photo_fraction=1.5)


def test_super_resolution_condition_and_empty_text():
    x = take(build_dataset("super-resolution", size=SIZE, seed=0, sr_caption=False), 1)[0]
    check_sample(x)
    assert x["text"] == ""
    # the condition is a x4-down image brought back up: a degraded view of the target
    assert (x["condition"] - (x["target"] + 1) / 2).abs().mean() > 0.01


# --- real data ----------------------------------------------------------------------------


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _random_images(n, h, w, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture
def imagefolder(tmp_path):
    """Three pairs with custom column names, in the imagefolder conventions."""
    targets, conds = _random_images(3, SIZE, SIZE, 0), _random_images(3, SIZE, SIZE, 1)
    rows = []
    for i in range(3):
        _png(tmp_path / "target" / f"{i}.png", targets[i])
        _png(tmp_path / "source" / f"{i}.png", conds[i])
        rows.append({"file_name": f"target/{i}.png", "source_file_name": f"source/{i}.png",
                     "prompt": f"caption {i}"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path, targets, conds


def _match(x, targets, conds):
    """Index of the pair a sample came from, checking both images exactly."""
    t = ((x["target"] + 1) / 2 * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)
    c = (x["condition"] * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)
    i = next(i for i, ref in enumerate(targets) if np.array_equal(ref, t))
    assert np.array_equal(conds[i], c)
    assert x["text"] == f"caption {i}"
    return i


def test_imagefolder_with_configured_columns(imagefolder):
    root, targets, conds = imagefolder
    ds = build_dataset("depth", root, size=SIZE, seed=0, conditioning_image_column="source",
                       caption_column="prompt")
    samples = take(ds, 6)
    for x in samples:
        check_sample(x)
    seen = [_match(x, targets, conds) for x in samples]
    assert sorted(seen[:3]) == [0, 1, 2] and sorted(seen[3:]) == [0, 1, 2], "each pass is a permutation"


def test_imagefolder_resizes_and_centre_crops(tmp_path):
    _png(tmp_path / "a.png", _random_images(1, 40, 64)[0])
    _png(tmp_path / "c.png", _random_images(1, 40, 64)[0])
    (tmp_path / "metadata.jsonl").write_text(json.dumps(
        {"file_name": "a.png", "conditioning_image_file_name": "c.png", "text": "x"}) + "\n")
    x = take(build_dataset("edit", tmp_path, size=SIZE), 1)[0]
    check_sample(x)


def test_imagefolder_missing_column_names_it(imagefolder):
    root, _, _ = imagefolder
    with pytest.raises(ColumnNotFoundError, match="'edited'") as e:
        build_dataset("edit", root, conditioning_image_column="source", caption_column="prompt",
                      image_column="edited")
    assert "metadata.jsonl:1" in str(e.value) and isinstance(e.value, ValueError)
    with pytest.raises(ColumnNotFoundError, match="'text'"):
        build_dataset("edit", root, conditioning_image_column="source")  # default caption column


def test_imagefolder_corrupt_image_names_it(imagefolder):
    root, _, _ = imagefolder
    (root / "source" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    ds = build_dataset("depth", root, size=SIZE, conditioning_image_column="source", caption_column="prompt")
    with pytest.raises(ImageReadError, match="source/1.png") as e:
        take(ds, 3)
    assert isinstance(e.value, ValueError)


def test_imagefolder_missing_file_names_it(imagefolder):
    root, _, _ = imagefolder
    (root / "target" / "2.png").unlink()
    with pytest.raises(ImageReadError, match="target/2.png"):
        build_dataset("depth", root, conditioning_image_column="source", caption_column="prompt")


@pytest.fixture
def disk_dataset(tmp_path):
    import datasets

    targets, conds = _random_images(3, SIZE, SIZE, 2), _random_images(3, SIZE, SIZE, 3)
    ds = datasets.Dataset.from_dict(
        {"edited": [Image.fromarray(a) for a in targets],
         "original": [Image.fromarray(a) for a in conds],
         "instruction": [f"caption {i}" for i in range(3)]},
        features=datasets.Features({"edited": datasets.Image(), "original": datasets.Image(),
                                    "instruction": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    return tmp_path / "ds", targets, conds


def test_save_to_disk_with_configured_columns(disk_dataset):
    path, targets, conds = disk_dataset
    ds = build_dataset("edit", path, size=SIZE, image_column="edited",
                       conditioning_image_column="original", caption_column="instruction")
    seen = {_match(x, targets, conds) for x in take(ds, 3)}
    assert seen == {0, 1, 2}


def test_save_to_disk_missing_column_names_it(disk_dataset):
    path, _, _ = disk_dataset
    with pytest.raises(ColumnNotFoundError, match="'input_image'") as e:
        build_dataset("edit", path, image_column="edited", conditioning_image_column="input_image",
                      caption_column="instruction")
    assert str(path) in str(e.value)


def test_save_to_disk_corrupt_image_names_it(tmp_path):
    import datasets

    good = io.BytesIO()
    Image.fromarray(_random_images(1, SIZE, SIZE)[0]).save(good, format="PNG")
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": good.getvalue(), "path": None}, {"bytes": b"garbage", "path": "bad.png"}],
         "conditioning_image": [{"bytes": good.getvalue(), "path": None}] * 2,
         "text": ["a", "b"]},
        features=datasets.Features({"image": datasets.Image(), "conditioning_image": datasets.Image(),
                                    "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ImageReadError, match=r"'image', row 1 .*bad\.png"):
        take(build_dataset("depth", tmp_path / "ds", size=SIZE), 2)


def test_plain_folder_super_resolution_crops_and_degrades(tmp_path):
    images = _random_images(2, 48, 40, seed=4)
    for i, a in enumerate(images):
        _png(tmp_path / "hr" / "sub" / f"{i}.png", a)
    ds = build_dataset("super-resolution", tmp_path / "hr", size=SIZE, seed=0)
    for x in take(ds, 4):
        check_sample(x)
        assert x["text"] == ""
        crop = ((x["target"] + 1) / 2 * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)
        found = any(np.array_equal(a[r:r + SIZE, c:c + SIZE], crop)
                    for a in images for r in range(48 - SIZE + 1) for c in range(40 - SIZE + 1))
        assert found, "target is a crop of one of the images at full resolution"


def test_plain_folder_too_small_image_names_it(tmp_path):
    _png(tmp_path / "small.png", _random_images(1, 20, 20)[0])
    with pytest.raises(ImageReadError, match="small.png"):
        take(build_dataset("super-resolution", tmp_path, size=SIZE), 1)


def test_imagefolder_super_resolution_without_condition_degrades(imagefolder):
    root, _, _ = imagefolder
    ds = build_dataset("super-resolution", root, size=SIZE, conditioning_image_column=None,
                       caption_column="prompt")
    x = take(ds, 1)[0]
    check_sample(x)
    assert x["text"].startswith("caption")


def test_build_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="unknown task"):
        build_dataset("colorize")
    with pytest.raises(DataError, match="rank"):
        build_dataset("depth", rank=2, world_size=2)
    with pytest.raises(DataError, match="neither"):
        build_dataset("depth", tmp_path / "nowhere")
    with pytest.raises(DataError, match="not a dataset"):
        build_dataset("depth", tmp_path)  # an empty folder serves only super-resolution
    with pytest.raises(DataError, match="divisible"):
        build_dataset("super-resolution", size=30)
    with pytest.raises(TypeError):
        build_dataset("depth", size=SIZE, no_such_option=1)
