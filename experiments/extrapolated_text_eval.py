# Experiment script (2026-12-06): measured whether moving the caption's text embedding away from the empty
# prompt's at inference (e' = e0 + s (e - e0), "prompt extrapolation") makes the guided depth entry follow the
# caption better in its one pass per step (docs/results.md, "Guidance-aware CoDi"). It did not: kept to reproduce.
"""cdd-eval with every text embedding extrapolated away from the empty prompt's: e' = e0 + s (e - e0).

    EXTRAP=1.5 python experiments/extrapolated_text_eval.py --task depth ... (cdd-eval's arguments)

Both the frozen backbone and the adapter see e'; s = 1 is plain cdd-eval; the empty prompt's own embedding is
unchanged at any s.
"""

from __future__ import annotations

import os
import sys

from cdd.runtime.diffusion.backbone import Backbone
from cdd.training.evaluate import main

SCALE = float(os.environ.get("EXTRAP", "1"))
_encode = Backbone.encode_text


def encode_text(self: Backbone, prompts: list[str]):
    e = _encode(self, prompts)
    e0 = _encode(self, [""])
    return e0 + SCALE * (e - e0)


if __name__ == "__main__":
    Backbone.encode_text = encode_text
    sys.exit(main())
