"""Data: the procedural scenes world, Real-ESRGAN degradations, task datasets.

See docs/data.md. The training code calls `build_dataset`; the rest is for evaluation,
tests and tools.
"""

from cdd.training.data.scenes import (  # noqa: F401  (the modules' public API, re-exported)
    DEPTH_MAX, EditPair, RenderResult, SceneObject, SceneSpec, caption, depth_to_condition,
    edit_pairs, render, render_batch, sample_edit, sample_scene, scene_vocabulary,
)
from cdd.training.data.degradations import (  # noqa: F401
    DEGRADATION_PRESETS, DegradationConfig, SRPair, degradation_preset, degrade, make_sr_pair,
)
from cdd.training.data.datasets import (  # noqa: F401
    TASKS, ColumnNotFoundError, DataError, ImageReadError, build_dataset,
)
