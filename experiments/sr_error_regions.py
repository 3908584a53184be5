# Experiment script. Where the served super-resolution loses to bicubic on one held-out photograph (2026-12-06).
"""Split the squared error of the served super-resolution output and of bicubic into the truth's flat pixels
(`metrics.flat_mask`) and the rest, for one `benchmarks/sr_photos.py` case (the same crop and degradation draw),
and save bicubic | served | truth | (served error - bicubic error) x 40 around mid-grey.

    python experiments/sr_error_regions.py --case "astronaut whole" --degradation mild-64px --out sr_error.png
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from sr_photos import cases, png, scores, to_tensor, to_u8  # noqa: E402

from cdd.runtime.serving.app import create_app  # noqa: E402
from cdd.runtime.serving.settings import ServeSettings  # noqa: E402
from cdd.training.data.degradations import degradation_preset, degrade, upsample  # noqa: E402
from cdd.training.metrics import flat_mask  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="astronaut whole", help="the start of a sr_photos case label")
    p.add_argument("--degradation", default="mild-64px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("sr_error.png"))
    args = p.parse_args()
    todo = cases(4, 1, True)
    k, (label, truth) = next((i, c) for i, c in enumerate(todo) if c[0].startswith(args.case))
    hr = to_tensor(truth)
    lr_t = degrade(hr, torch.Generator().manual_seed(k), degradation_preset(args.degradation))
    lr, bic = to_u8(lr_t), to_u8(upsample(lr_t, tuple(hr.shape[-2:])))
    settings = ServeSettings(warmup=False, max_work=1 << 20, max_pixels=1 << 22, request_deadline_s=3600)
    with TestClient(create_app(settings)) as client:
        client.app.state.engine.wait_ready(300)
        r = client.post("/v1/tasks/super-resolution", files={"image": ("in.png", png(lr), "image/png")},
                        data={"seed": str(args.seed)})
        out = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    t, o, b = truth / 255.0, out / 255.0, bic / 255.0
    eo, eb = ((o - t) ** 2).mean(-1), ((b - t) ** 2).mean(-1)
    flat = flat_mask(to_tensor(truth))[0, 0].numpy()
    print(f"{args.degradation} {label}: PSNR served {scores(out, truth)['psnr']:.2f} dB, bicubic "
          f"{scores(bic, truth)['psnr']:.2f} dB")
    print(f"  truth's flat pixels ({flat.mean():.0%}): MSE x 1e4 served {eo[flat].mean() * 1e4:.2f}, bicubic "
          f"{eb[flat].mean() * 1e4:.2f}; the rest: served {eo[~flat].mean() * 1e4:.2f}, bicubic {eb[~flat].mean() * 1e4:.2f}")
    print(f"  served's excess MSE over bicubic x 1e4, from flat pixels {(eo[flat].sum() - eb[flat].sum()) / eo.size * 1e4:.2f}, "
          f"from the rest {(eo[~flat].sum() - eb[~flat].sum()) / eo.size * 1e4:.2f}")
    diff = np.repeat(np.clip((eo - eb) * 40 + 0.5, 0, 1)[..., None], 3, -1)
    Image.fromarray((np.concatenate([b, o, t, diff], 1) * 255).round().astype(np.uint8)).save(args.out)
    print(f"  wrote {args.out}")


if __name__ == "__main__":
    main()
