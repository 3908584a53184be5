"""Condition images that are most likely not what the task takes, told from the pixels or the file header
alone. They are served (a custom adapter may take what the embedded ones do not) with a warning in the
`X-CDD-Warning` header and the JSON answer's `warning`, instead of a silent 200 with garbage.

- depth: a depth condition is grey (R = G = B, near = bright); a colour image (a photograph, a colourised
  depth map) is not one. A 16-bit grey file is most likely a raw depth map (cdd-scenes writes distances
  x 1000, far = bright, to depth/; the condition is in depth_condition/).
"""

from __future__ import annotations

import io

import torch
from PIL import Image

DEPTH = "depth"
# JPEG's chroma error on a grey picture stays within a few levels; a colour picture has many pixels whose
# channels are further apart than this.
COLOUR_SPREAD = 24 / 255
COLOUR_FRACTION = 0.05  # of the pixels
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I")


def colour_fraction(cond: torch.Tensor) -> float:
    """The share of pixels of a [3, H, W] image in [0, 1] whose channels are more than COLOUR_SPREAD apart."""
    spread = cond.amax(0) - cond.amin(0)
    return float((spread > COLOUR_SPREAD).float().mean())


def condition_warning(task: str, cond: torch.Tensor, data: bytes) -> str | None:
    """Why `cond` (the decoded [c, H, W] image of the file `data`) is most likely not `task`'s condition, or None."""
    if task != DEPTH:
        return None
    if cond.shape[0] == 3 and (share := colour_fraction(cond)) > COLOUR_FRACTION:
        return (f"this image is in colour ({share:.0%} of its pixels have channels more than "
                f"{round(COLOUR_SPREAD * 255)}/255 apart), but a depth condition is grey (R = G = B, near = bright), "
                "like cdd-scenes' depth_condition/ files or /examples/example-depth.png: a photograph or a "
                "colourised depth map gives an unrelated picture")
    if Image.open(io.BytesIO(data)).mode in SIXTEEN_BIT:  # the header only; the file decoded already
        return ("a 16-bit grey image: if it is a raw depth map (cdd-scenes' depth/ files: distance x 1000, far = "
                "bright), send its depth condition instead (depth_condition/: 8-bit, near = bright)")
    return None
