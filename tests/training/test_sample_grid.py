"""The sample grid's column labels: wrapped to their column, never run into the next one."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from cdd.training.sample_grid import LINE, _with_header, _wrap


def test_labels_are_wrapped_to_their_column_and_keep_every_character():
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    for label in ["sr fidelity=0.5 prev+ilvr-out 4", "condition", "a_very_long_single_word_label_x", "bicubic - 0"]:
        lines = _wrap(label, 60, measure)
        assert all(measure(line) <= 60 for line in lines)
        assert "".join(lines).replace(" ", "") == label.replace(" ", "")
    assert _wrap("target", 60, measure) == ["target"]


def test_header_grows_with_the_longest_label_and_leaves_the_grid_alone():
    grid = np.full((64, 3 * 64, 3), 7, np.uint8)
    out = _with_header(grid, 64, ["condition", "sr fidelity=0.5 prev+ilvr-out 4", "target"])
    lines = len(_wrap("sr fidelity=0.5 prev+ilvr-out 4", 60, ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength))
    assert lines > 1 and out.shape == (64 + LINE * lines + 1, 192, 3)
    assert np.array_equal(out[-64:], grid)
    # nothing drawn in a column's last pixels: no label reaches its neighbour
    header = out[:-64]
    assert (header[:, 62:64] == 255).all() and (header[:, 126:128] == 255).all()
    assert _with_header(grid[:32, :96], 32, ["a", "b", "c"]).shape == (32, 96, 3)  # tiles too small: no header
