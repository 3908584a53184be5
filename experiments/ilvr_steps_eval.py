# Experiment script. Measured ILVR's per-step correction on all steps, the last only, or none (2026-12-06).
"""cdd-eval with ILVR's per-step correction of `NAME+ilvr` restricted to some steps, to measure what the per-step
decode-correct-encode round trip buys (docs/results.md "ILVR on the output only"). Every variant keeps ILVR's
update of the decoded output; `none` is what `NAME+ilvr-out` serves.

    ILVR_STEPS=all|last|none STEPS=4 python experiments/ilvr_steps_eval.py <cdd-eval arguments, --steps $STEPS>

STEPS must equal the single `--steps` value given to cdd-eval (`last` corrects only its last timestep).
"""

import os
import json
import sys
from pathlib import Path

import cdd.runtime.diffusion.samplers as samplers
from cdd.runtime.diffusion.schedule import NoiseSchedule
from cdd.training import evaluate

MODE = os.environ["ILVR_STEPS"]
LAST = -1  # the timestep `last` corrects, set from the backbone's schedule and STEPS below
_ilvr = samplers.ilvr


def restricted(model, reference, factor, **kw):
    if MODE == "all":
        return _ilvr(model, reference, factor, **kw)
    if MODE == "none":
        return model
    corrected = _ilvr(model, reference, factor, **kw)

    def last_only(z_t, t):
        step = int(t.flatten()[0]) if hasattr(t, "flatten") else int(t)
        return corrected(z_t, t) if step == LAST else model(z_t, t)

    return last_only


if __name__ == "__main__":
    if MODE not in ("all", "last", "none"):
        raise SystemExit(f"ILVR_STEPS must be all, last or none, not {MODE!r}")
    args = evaluate.build_parser().parse_args(sys.argv[1:])
    config = json.loads((Path(args.backbone) / "scheduler" / "scheduler_config.json").read_text())
    schedule = NoiseSchedule.from_scheduler_config(config)
    LAST = schedule.trailing_timesteps(int(os.environ.get("STEPS", "4")))[-1]  # the timestep `last` corrects (4 steps: 249)
    samplers.ilvr = restricted
    sys.exit(evaluate.main(sys.argv[1:]))
