"""The scenes-attribute classifier: labels from captions, the distances on its features against hand
computations, saving and loading, and a short training run on real renders."""

import itertools

import numpy as np
import pytest
import torch

from cdd.training import attributes as at
from cdd.training.data import scenes


def test_caption_labels_equal_the_scene_labels():
    for k in range(20):
        spec = scenes.sample_scene(np.random.default_rng([1, k]))
        parsed, direct = at.parse_caption(scenes.caption(spec)), at.labels_of_spec(spec)
        assert set(parsed) == set(direct) and all(torch.equal(parsed[key], direct[key]) for key in parsed)
    labels = at.parse_caption("a red sphere and an orange cube on a striped floor at night")
    assert at.OBJECTS[int(labels["objects"].nonzero()[0])] == ("red", "sphere") and labels["objects"].sum() == 2
    assert scenes.FLOORS[int(labels["floor"])] == "stripes" and scenes.TIMES[int(labels["time"])] == "night"
    for bad in ("make it night", "a red car on a plain floor at noon", "a red sphere on a wooden floor at noon"):
        with pytest.raises(ValueError, match="scenes-world"):
            at.parse_caption(bad)


def test_frechet_distance_on_hand_cases():
    a = torch.randn(200, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0], dtype=torch.float64)
    assert at.frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    assert at.frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-8)  # same covariance
    centred = a - a.mean(0)
    # S_b = 4 S_a: tr(S_a + 4 S_a - 2 (4 S_a^2)^1/2) = tr(S_a)
    assert at.frechet_distance(centred, 2 * centred) == pytest.approx(float(torch.cov(a.T).trace()), rel=1e-8)


def test_kernel_distance_is_the_unbiased_mmd():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64) + 1

    def k(x, y):
        return (float(x @ y) / 3 + 1) ** 3

    aa = sum(k(a[i], a[j]) for i, j in itertools.permutations(range(4), 2)) / 12
    bb = sum(k(b[i], b[j]) for i, j in itertools.permutations(range(5), 2)) / 20
    ab = sum(k(x, y) for x in a for y in b) / 20
    assert at.kernel_distance(a, b) == pytest.approx(aa + bb - 2 * ab, rel=1e-10)
    # equal sizes (paired sets): Gretton et al.'s U-statistic, the pairs (a_i, b_i) left out of the cross term too
    b4 = b[:4]
    bb4 = sum(k(b4[i], b4[j]) for i, j in itertools.permutations(range(4), 2)) / 12
    ab4 = sum(k(a[i], b4[j]) for i, j in itertools.permutations(range(4), 2)) / 12
    assert at.kernel_distance(a, b4) == pytest.approx(aa + bb4 - 2 * ab4, rel=1e-10)
    assert at.kernel_distance(a, a) == 0


def test_agreement_counts():
    labels = at.stack_labels([at.parse_caption("a red sphere on a plain floor at noon"),
                              at.parse_caption("a blue cube and a red sphere on a checkered floor at sunset")])
    pred = {k: v.clone() for k, v in labels.items()}
    assert at.agreement(pred, labels) == {"floor": 1, "time": 1, "objects_recall": 1, "objects_precision": 1,
                                          "objects_exact": 1, "all": 1}
    pred["time"][1] = 0
    pred["objects"][1, at.OBJECTS.index(("blue", "cube"))] = 0
    scores = at.agreement(pred, labels)
    assert scores["time"] == 0.5 and scores["objects_recall"] == pytest.approx(2 / 3) and scores["all"] == 0.5
    assert scores["objects_precision"] == 1
    pred["objects"][0, at.OBJECTS.index(("green", "cylinder"))] = 1  # one found that no caption names
    assert at.agreement(pred, labels)["objects_precision"] == pytest.approx(2 / 3)


def test_object_map_marks_the_cells_each_object_covers():
    spec = scenes.SceneSpec(objects=(scenes.SceneObject("sphere", "red", x=0.0, z=0.0, size=0.6),))
    r = scenes.render(spec, at.SIZE)
    cells = at.object_cells(spec, r.ids)
    k = at.OBJECTS.index(("red", "sphere"))
    assert cells.shape == (len(at.OBJECTS), at.CELLS, at.CELLS) and cells[k].sum() > 0
    assert cells.sum() == cells[k].sum()  # no other object's channel is set
    cell = at.SIZE // at.CELLS  # by hand: the cells where the sphere's pixel centres reach CELL_MIN_PIXELS
    counts = torch.from_numpy((r.ids == 0).reshape(at.CELLS, cell, at.CELLS, cell).sum(axis=(1, 3)))
    assert torch.equal(cells[k], (counts >= at.CELL_MIN_PIXELS).float())
    _, labels = at.render_set(6, at.HELD_OUT_SEED)
    assert (labels["cells"].amax(dim=(2, 3)) <= labels["objects"]).all()  # a cell only names an object the caption does


def test_train_save_load_and_score_generated_images(tmp_path):
    scores = at.train(tmp_path, n_train=24, n_held_out=8, epochs=1, batch=8, log=lambda *_: None)
    assert set(scores) == {"floor", "time", "objects_recall", "objects_precision", "objects_exact", "all"}
    assert (tmp_path / at.WEIGHTS).stat().st_size < 2e6
    net = at.load(tmp_path)
    images, labels = at.render_set(4, at.HELD_OUT_SEED)
    x = images.float() / 255
    f = net.features(x)
    assert f.shape == (4, at.FEATURES) and torch.isfinite(f).all()
    assert net.features(torch.nn.functional.interpolate(x, size=32, mode="area")).shape == (4, at.FEATURES)  # resized to 64
    captions = [scenes.caption(scenes.sample_scene(np.random.default_rng([at.HELD_OUT_SEED, k]))) for k in range(4)]
    agree = at.caption_agreement(net, x, captions)
    assert agree == at.agreement(at.predict(net, x), labels)
    with pytest.raises(FileNotFoundError, match="no attribute classifier"):
        at.load(tmp_path / "missing")
    config = (tmp_path / at.CONFIG).read_text().replace('"cells": 8', '"cells": null')
    (tmp_path / at.CONFIG).write_text(config)
    with pytest.raises(ValueError, match="predates the object map"):
        at.load(tmp_path)
