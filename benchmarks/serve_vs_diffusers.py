"""Our serving engine vs diffusers' StableDiffusionControlNetPipeline, side by side in one run.

Same backbone weights, same ControlNet adapter, same prompt, steps (DDIM, trailing spacing) and seeds:

  latency     one request at a time: our engine (max_batch 1) vs pipe(...) for one image
  throughput  N requests: our engine batching them (max_batch B, exact batching) vs the pipeline called
              once per request, and vs the pipeline called on batches of B (lists of prompts/generators)

Our side is measured at the engine (queue, text, sampling, decode, uint8), without HTTP, like the
pipeline's side (output_type="np", then uint8). On a GPU run with --device cuda --dtype bfloat16:
the engine then replays CUDA graphs. Absolute times mean little on a shared CPU; the ratios are the
result. Example:

  python benchmarks/serve_vs_diffusers.py                      # moderate random latent backbone, CPU
  python benchmarks/serve_vs_diffusers.py --threads 1          # a shared CPU: immune to oversubscription
  python benchmarks/serve_vs_diffusers.py --device cuda --dtype bfloat16 --resolution 512 --requests 64
  python benchmarks/serve_vs_diffusers.py --backbone path/to/sd15 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as cdd-serve sets it (see runtime/serving/cli.py), for both sides

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline  # noqa: E402

from cdd.adapters.architectures import build_adapter  # noqa: E402
from cdd.adapters.export import export_entry  # noqa: E402
from cdd.adapters.zoo import load_entry, save_entry  # noqa: E402
from cdd.runtime.diffusion.backbone import load_backbone  # noqa: E402
from cdd.runtime.serving.engine import Engine  # noqa: E402
from cdd.runtime.diffusion.factory import make_backbone  # noqa: E402
from cdd.runtime.serving.imaging import to_uint8  # noqa: E402
from cdd.runtime.serving.settings import DTYPES, ServeSettings  # noqa: E402

PROMPT = "a red sphere on a checkered floor at sunset"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_on(device: torch.device, fn, *a) -> tuple[float, object]:
    """(seconds, fn(*a)), the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn(*a)
    sync(device)
    return time.perf_counter() - t0, out


def add_entry(bb, zoo: Path, name: str, steps: int, seed: int = 0) -> Path:
    """A random ControlNet zoo entry `zoo/name` for `bb` (zero convolutions perturbed too, so it changes the
    output), condition RGB [0, 1] at the backbone's resolution, served with `steps` DDIM steps."""
    adapter = build_adapter("controlnet", bb.unet, bb.vae_scale_factor)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in adapter.parameters():
            prm.add_((torch.randn(prm.shape, generator=g) * 0.02).to(prm.device, prm.dtype))
    save_entry(zoo / name, adapter, name=name, task="depth", backbone_fingerprint=bb.fingerprint,
               condition={"channels": 3, "range": [0, 1], "resolution": bb.resolution}, sampler="ddim", steps=steps)
    return zoo / name


def diffusers_pipeline(bb, entry: Path, folder: Path, device: torch.device, dtype: torch.dtype):
    """diffusers' StableDiffusionControlNetPipeline on `bb`'s modules and `entry`'s ControlNet, exported as a
    diffusers folder under `folder` and loaded back (the path a user of the zoo's export takes)."""
    export_entry(load_entry(entry, bb.unet, bb.fingerprint), folder)
    pipe = StableDiffusionControlNetPipeline(
        vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, unet=bb.unet,
        controlnet=ControlNetModel.from_pretrained(folder, torch_dtype=dtype).to(device),
        scheduler=DDIMScheduler.from_config(bb.scheduler_config, timestep_spacing="trailing"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(pipe, conds: torch.Tensor, seeds: list[int], idx: list[int], steps: int) -> np.ndarray:
    """One pipeline call for the requests `idx` (a list of prompts and generators): uint8 [len(idx), H, W, 3]."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    out = pipe([PROMPT] * len(idx), image=conds[idx].to(device, dtype), num_inference_steps=steps,
               guidance_scale=1.0, generator=[torch.Generator("cpu").manual_seed(seeds[i]) for i in idx],
               output_type="np").images
    return (out * 255).round().astype("uint8")


def start_engine(bb, zoo: Path, device: str, dtype: str, max_batch: int, queue_size: int = 64, max_wait_ms: float = 2,
                 **settings) -> Engine:
    """Our engine on the in-memory backbone `bb` serving `zoo`, warmed up (CUDA graphs captured on a GPU)."""
    s = ServeSettings(zoo=zoo, device=device, dtype=dtype, max_batch=max_batch, max_wait_ms=max_wait_ms,
                      queue_size=max(64, queue_size), **settings)
    e = Engine(s, backbone=bb).start()
    if not e.wait_ready(600) or e.warmup_error:
        raise RuntimeError(f"engine warm-up failed: {e.warmup_error}")
    return e


def submit_together(e: Engine, name: str, conds: torch.Tensor, seeds: list[int], idx: list[int],
                    steps: int) -> list[np.ndarray]:
    """The requests `idx` arrive together: admit them all, then let the scheduler batch them. uint8 images."""
    reg = e.pool.get(name)
    e.pause()
    jobs = [e.submit(e.prepare(reg, conds[i], steps=steps, sampler="ddim", seed=seeds[i], prompt=PROMPT))
            for i in idx]
    e.resume()
    return [to_uint8(j.future.result().rows)[0] for j in jobs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", help="a diffusers backbone folder (default: a random latent backbone, see --resolution)")
    p.add_argument("--resolution", type=int, default=64, help="random backbone resolution (pixels)")
    p.add_argument("--channels", default="64,128,256", help="random backbone UNet block widths")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7, help="latency samples per side")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    if args.backbone:
        bb = load_backbone(args.backbone, device, dtype)
    else:
        bb = make_backbone("latent", resolution=args.resolution, block_out_channels=[int(c) for c in args.channels.split(",")],
                           text_hidden=64, seed=0).to(device, dtype)
    res = bb.resolution
    tmp = Path(tempfile.mkdtemp(prefix="cdd-bench-"))
    entry = add_entry(bb, tmp / "zoo", "depth", args.steps)
    pipe = diffusers_pipeline(bb, entry, tmp / "controlnet", device, dtype)

    conds = torch.rand(args.requests, 3, res, res, generator=torch.Generator().manual_seed(1))
    seeds = list(range(args.requests))

    def diffusers_batch(idx: list[int]) -> np.ndarray:
        return diffusers_images(pipe, conds, seeds, idx, args.steps)

    def engine(max_batch: int) -> Engine:
        return start_engine(bb, tmp / "zoo", args.device, args.dtype, max_batch, args.requests)

    def ours_submit(e: Engine, idx: list[int]) -> list[np.ndarray]:
        return submit_together(e, "depth", conds, seeds, idx, args.steps)

    def timed(fn, *a) -> tuple[float, object]:
        return timed_on(device, fn, *a)

    print(f"backbone: {'random latent ' + args.channels if not args.backbone else args.backbone}, {res}px, "
          f"UNet {sum(p.numel() for p in bb.unet.parameters()) / 1e6:.1f}M params; device {device} {args.dtype}; "
          f"{args.steps} DDIM steps; torch threads {torch.get_num_threads()}")

    # -- latency: one request at a time ----------------------------------------------------
    single = engine(1)
    diffusers_batch([0])  # warm-up
    ours_submit(single, [0])
    lat_ours, lat_diff = [], []
    for r in range(args.repeats):  # interleaved, so a busy machine hurts both sides alike
        i = r % args.requests
        t, ours_img = timed(ours_submit, single, [i])
        lat_ours.append(t)
        t, ref_img = timed(diffusers_batch, [i])
        lat_diff.append(t)
    diff = np.abs(ours_img[0].astype(int) - ref_img[0].astype(int)).max()
    single.stop()

    # -- throughput: N requests ------------------------------------------------------------
    batched = engine(args.max_batch)
    lat_padded = statistics.median(timed(ours_submit, batched, [r % args.requests])[0] for r in range(3))
    idx = list(range(args.requests))
    t_ours, ours_all = timed(ours_submit, batched, idx)
    t_seq, _ = timed(lambda: [diffusers_batch([i]) for i in idx])
    chunks = [idx[i : i + args.max_batch] for i in range(0, len(idx), args.max_batch)]
    t_bat, ref_all = timed(lambda: np.concatenate([diffusers_batch(c) for c in chunks]))
    batched.stop()
    worst = max(np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(ours_all, ref_all))

    lo, ld = statistics.median(lat_ours), statistics.median(lat_diff)
    n = args.requests
    print(f"latency (median of {args.repeats}, batch 1): ours {lo * 1e3:8.1f} ms   diffusers {ld * 1e3:8.1f} ms   "
          f"ratio diffusers/ours {ld / lo:5.2f}x")
    print(f"latency of a lone request with max_batch {args.max_batch} (exact batching pads it to {args.max_batch} rows): "
          f"{lat_padded * 1e3:8.1f} ms, ratio diffusers/ours {ld / lat_padded:5.2f}x")
    print(f"throughput ({n} requests): ours (max_batch {args.max_batch}) {n / t_ours:7.2f} img/s   "
          f"diffusers one by one {n / t_seq:7.2f} img/s   diffusers batched by {args.max_batch} {n / t_bat:7.2f} img/s")
    print(f"throughput ratio: ours / diffusers one by one {t_seq / t_ours:5.2f}x   "
          f"ours / diffusers batched {t_bat / t_ours:5.2f}x")
    print(f"same images: max |ours - diffusers| = {max(diff, worst)} / 255 (uint8)")


if __name__ == "__main__":
    main()
