"""The condition-following measures of cdd-eval (training/condition_metrics.py), computed by hand on tiny arrays:
depth edges against their maps (own, other, best match) and edit PSNR inside and outside the changed region."""

import math

import numpy as np
import pytest
import torch

from cdd.training import condition_metrics as cm
from cdd.training.data.scenes import edit_kind


def squares(n: int, size: int = 16, side: int = 4) -> torch.Tensor:
    """n depth conditions [n, 3, size, size]: a near (bright) square on a far (dark) background, square i at its
    own place."""
    maps = torch.zeros(n, 3, size, size)
    for i in range(n):
        r, c = 1 + (3 * i) % (size - side - 1), 1 + (5 * i) % (size - side - 1)
        maps[i, :, r : r + side, c : c + side] = 0.8
    return maps


def test_edge_statistics_by_hand():
    c = torch.tensor([[0.9, 0.1, 0.2],
                      [0.5, 0.4, 0.3],
                      [0.0, 0.6, 0.6]])
    stats = cm.edge_statistics(c)
    assert stats["depth_edge_corr"] == pytest.approx((0.9 + 0.4 + 0.6) / 3)
    assert stats["depth_edge_other"] == pytest.approx((0.1 + 0.2 + 0.5 + 0.3 + 0.0 + 0.6) / 6)
    assert stats["depth_edge_match"] == pytest.approx(1 / 3)  # row 1 loses to map 0, row 2 ties: no match
    assert cm.edge_statistics(torch.tensor([[0.7]])) == {"depth_edge_corr": pytest.approx(0.7), "depth_edge_other": None,
                                                         "depth_edge_match": None}
    with pytest.raises(ValueError, match="square"):
        cm.edge_statistics(torch.zeros(2, 3))


def test_correlation_matrix_is_pearson():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 1, 5, 5, generator=g), torch.rand(4, 1, 5, 5, generator=g)
    expected = np.corrcoef(a.flatten(1).numpy(), b.flatten(1).numpy())[:3, 3:]
    assert np.allclose(cm.correlation_matrix(a, b).numpy(), expected, atol=1e-6)
    assert cm.correlation_matrix(torch.zeros(1, 1, 5, 5), b)[0].abs().max() == 0  # a flat map correlates with nothing


def test_depth_edges_vanish_on_planes_and_mark_occlusions():
    rows = torch.arange(16.0)[:, None].expand(16, 16)
    plane = (0.05 * rows + 0.1)[None, None].expand(1, 3, 16, 16)  # inverse depth of a plane is affine: the floor
    assert cm.depth_edges(plane)[0, 0, 1:-1, 1:-1].abs().max() < 1e-6
    step = plane.clone()
    step[..., 4:8, 4:8] = 0.9  # an object in front of it
    edges = cm.depth_edges(step)[0, 0]
    assert edges[3:9, 3:9].sum() > 0.99 * edges[1:-1, 1:-1].sum()  # all of it at the object's outline
    assert edges[5:7, 5:7].max() < 1e-6  # none inside it


def test_image_edges_see_colour_where_grey_would_not():
    image = torch.full((1, 3, 8, 8), 0.5)
    image[0, :, :, 4:] = torch.tensor([0.5 + 0.1 / 0.299, 0.5 - 0.1 / 0.587, 0.5])[:, None, None]  # same luminance
    grey = (0.299 * image[:, 0] + 0.587 * image[:, 1] + 0.114 * image[:, 2])[:, None]
    assert cm.image_edges(grey).max() < 1e-5 and cm.image_edges(image)[0, 0, :, 3:5].min() > 1


def test_outputs_drawn_from_their_own_maps_match_and_shuffled_ones_do_not():
    maps = squares(6)
    own = cm.depth_follow(maps, maps)  # each output is its own map: edges where the map's are
    assert own["depth_edge_match"] == 1.0 and own["depth_edge_corr"] > own["depth_edge_other"] + 0.3
    shuffled = cm.depth_follow(maps.roll(1, 0), maps)  # every output drawn from another item's map
    assert shuffled["depth_edge_match"] == 0.0 and shuffled["depth_edge_corr"] < own["depth_edge_corr"]
    assert shuffled["depth_edge_other"] == pytest.approx(
        (6 * own["depth_edge_other"] * 5 + 6 * own["depth_edge_corr"] - 6 * shuffled["depth_edge_corr"]) / 30)
    flat = cm.depth_follow(torch.full_like(maps, 0.5), maps)  # a blank output follows nothing
    assert flat == {"depth_edge_corr": 0.0, "depth_edge_other": 0.0, "depth_edge_match": 0.0}


def test_unrelated_outputs_match_at_chance():
    maps, g = squares(8), torch.Generator().manual_seed(1)
    matches = [cm.depth_follow(torch.rand(8, 3, 16, 16, generator=g), maps)["depth_edge_match"] for _ in range(200)]
    assert np.mean(matches) == pytest.approx(1 / 8, abs=0.04)


def test_changed_region_thresholds_and_dilates():
    source = torch.zeros(1, 3, 8, 8)
    target = source.clone()
    target[0, 1, 2, 2] = 5 / 255  # above EDIT_THRESHOLD (4/255) in one channel
    target[0, 0, 6, 6] = 3 / 255  # below it: unchanged
    region = cm.changed_region(source, target)[0, 0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[1:4, 1:4] = True  # the pixel and its 3x3 neighbourhood
    assert torch.equal(region, expected)
    assert cm.changed_region(source, target, dilate=0)[0, 0].sum() == 1
    with pytest.raises(ValueError, match="differ in shape"):
        cm.changed_region(source, target[..., :4])


def test_copy_input_keeps_everything_and_changes_nothing():
    g = torch.Generator().manual_seed(2)
    source = (torch.rand(2, 3, 16, 16, generator=g) * 255).round() / 255
    target = source.clone()
    target[0, :, 4:8, 4:8] = (source[0, :, 4:8, 4:8] + 0.25).clamp(max=1)  # a colour edit: one 4x4 block
    target[1] = 1 - source[1]  # time of day: every pixel changes
    instructions = ["make the cube red", "make it night"]

    copy = cm.edit_follow(source, source, target, instructions)
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[3:9, 3:9] = True  # the block, dilated by one pixel
    mse_in = (source[0] - target[0])[:, region].square().mean()
    assert copy["edit_kinds"]["color"]["psnr_in"] == pytest.approx(float(10 * torch.log10(1 / mse_in)), rel=1e-5)
    assert copy["edit_kinds"]["color"]["psnr_out"] == pytest.approx(120)  # identical outside: the MSE floor
    assert copy["edit_kinds"]["color"]["changed_fraction"] == pytest.approx(36 / 256)
    time = copy["edit_kinds"]["time"]
    assert time["changed_fraction"] == 1 and time["psnr_out"] is None  # nothing kept: not scored outside
    assert time["psnr_in"] == pytest.approx(float(10 * torch.log10(1 / (source[1] - target[1]).square().mean())), rel=1e-5)
    assert copy["psnr_in"] == pytest.approx((copy["edit_kinds"]["color"]["psnr_in"] + time["psnr_in"]) / 2)
    assert copy["psnr_out"] == pytest.approx(120)  # the colour edit alone
    assert {k: v["n"] for k, v in copy["edit_kinds"].items()} == {"color": 1, "time": 1}
    mse_all = (source[0] - target[0]).square().mean()  # the whole image, per kind: what "closer than the input" reads
    assert copy["edit_kinds"]["color"]["psnr"] == pytest.approx(float(10 * torch.log10(1 / mse_all)), rel=1e-5)
    assert time["psnr"] == pytest.approx(time["psnr_in"], rel=1e-6)

    perfect = cm.edit_follow(target, source, target, instructions)
    assert perfect["psnr_in"] == pytest.approx(120) and perfect["psnr_out"] == pytest.approx(120)
    spoilt = target.clone()
    spoilt[0, :, 12:, 12:] = 0  # the edit made, and something else broken
    broken = cm.edit_follow(spoilt, source, target, instructions)
    assert broken["psnr_in"] == pytest.approx(120) and broken["psnr_out"] < 40
    with pytest.raises(ValueError, match="2 instructions for 1 edit outputs"):
        cm.edit_follow(source[:1], source[:1], target[:1], instructions)


def test_a_region_too_small_is_not_scored():
    source = torch.zeros(1, 3, 16, 16)
    target = source.clone()
    target[0, :, 0, 0] = 1  # dilated: 4 of 256 pixels, under MIN_REGION_FRACTION
    result = cm.edit_follow(source, source, target, ["make the floor striped"])
    assert 4 / 256 < cm.MIN_REGION_FRACTION and result["psnr_in"] is None and result["psnr_out"] == pytest.approx(120)


@pytest.mark.parametrize("instruction,kind", [
    ("make it sunset", "time"), ("make the cube red", "color"), ("make the red cube blue", "color"),
    ("remove the sphere", "remove"), ("remove the white cylinder", "remove"), ("make the floor checkered", "floor"),
    ("paint it black", "other"), ("", "other"),
])
def test_edit_kinds(instruction, kind):
    assert edit_kind(instruction) == kind


def test_condition_metrics_per_task_and_their_reference_sets():
    maps = squares(3)
    depth = cm.ConditionMetrics("depth", {"condition": maps, "target": maps * 2 - 1, "text": ["", "", ""]})
    assert set(depth.references()) == {"truth"} and set(depth(maps)) == set(cm.DEPTH_FIELDS)
    assert depth(maps) == cm.depth_follow(maps, maps)
    source = squares(2)
    target = source.flip(-1)
    edit = cm.ConditionMetrics("edit", {"condition": source, "target": target * 2 - 1,
                                        "text": ["remove the cube", "make the floor plain"]})
    assert torch.equal(edit.references()["copy input"], source)
    scores = edit(edit.references()["copy input"])
    assert scores["psnr_out"] == pytest.approx(120) and math.isfinite(scores["psnr_in"]) and scores["psnr_in"] < 30
    sr = cm.ConditionMetrics("super-resolution", {"condition": source, "target": target, "text": ["", ""]})
    assert sr.references() == {} and sr(source) == {}
