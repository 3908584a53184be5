"""The executor: device work for one batch — pad to a bucket, run the few-step sampler through the live
slot's ConditionedDenoiser, decode, copy back — eagerly, or through a captured CUDA graph.

The sampling loop is the library's own (`few_step_sampler`), driven by the slot's `ConditionedDenoiser`;
two things make it capturable without changing its numbers: timesteps are handed to the UNet as
device tensors made once, and alpha_t / sigma_t come from `CachedSchedule`, which computes them
exactly as `NoiseSchedule` does but keeps them on the device (no host-to-device copy while capturing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .backbone import Backbone
from .cuda_graphs import GraphCache, GraphKey
from .pool import LiveSlot, Registered
from .samplers import few_step_sampler
from .schedule import NoiseSchedule


@dataclass(frozen=True)
class CachedSchedule(NoiseSchedule):
    """NoiseSchedule whose alpha_sigma for an integer timestep is computed once per device and dtype."""

    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, schedule: NoiseSchedule) -> CachedSchedule:
        return cls(schedule.alphas_cumprod, schedule.final_alpha_cumprod, schedule.prediction_type)

    def alpha_sigma(self, t, like):
        if not isinstance(t, int):
            return super().alpha_sigma(t, like)
        key = (t, like.device, like.dtype, like.ndim)
        if key not in self.cache:
            self.cache[key] = super().alpha_sigma(t, like)
        return self.cache[key]


@dataclass
class Batch:
    """A batch's rows on the CPU: conditions, starting noise, text embeddings and `cm` noise."""

    z_T: torch.Tensor
    cond: torch.Tensor
    text_emb: torch.Tensor
    fresh: list[torch.Tensor] | None
    steps: int
    sampler: str

    @property
    def rows(self) -> int:
        return int(self.z_T.shape[0])


class Executor:
    def __init__(self, backbone: Backbone, buckets: tuple[int, ...], graphs: GraphCache | None = None):
        self.backbone = backbone
        self.buckets = tuple(sorted(buckets))
        self.graphs = graphs
        self.schedule = CachedSchedule.of(backbone.schedule)
        self._timesteps: dict[tuple[int, int], torch.Tensor] = {}

    def bucket(self, rows: int) -> int:
        return next(b for b in self.buckets if b >= rows)

    @torch.no_grad()
    def run(self, slot: LiveSlot, reg: Registered, batch: Batch) -> torch.Tensor:
        """Images [rows, 3, R, R] in [0, 1], float32 on the CPU. Rows beyond the largest bucket run in
        chunks; every chunk is zero-padded to its bucket (rows never see each other: every op of the
        UNet, the adapters and the VAE works per sample)."""
        out, step = [], self.buckets[-1]
        for i in range(0, batch.rows, step):
            n = min(step, batch.rows - i)
            size = self.bucket(n)
            values = self._device_inputs(batch, slice(i, i + n), size)
            if self.graphs is not None:
                key = GraphKey(slot.key, reg.lora_name, size, reg.resolution, batch.steps, batch.sampler)
                self._prime(batch.steps, size, values["z_T"])
                fn = self._loop(slot, batch.steps, batch.sampler)
                watched = slot.live_tensors() if self.graphs.debug else slot.tensors
                images = self.graphs.run(key, fn, values, watched)
            else:
                images = self._loop(slot, batch.steps, batch.sampler)(**values)
            out.append(images[:n].to("cpu", torch.float32))
        return torch.cat(out)

    def _device_inputs(self, batch: Batch, rows: slice, size: int) -> dict:
        device, dtype = self.backbone.device, self.backbone.dtype

        def put(t: torch.Tensor) -> torch.Tensor:
            t = t[rows]
            if t.shape[0] < size:
                t = torch.cat([t, t.new_zeros((size - t.shape[0], *t.shape[1:]))])
            return t.to(device=device, dtype=dtype)

        values = {"z_T": put(batch.z_T), "cond": put(batch.cond), "text_emb": put(batch.text_emb)}
        values["fresh"] = [put(xi) for xi in batch.fresh] if batch.fresh is not None else []
        return values

    def _timestep(self, t: int, size: int, device) -> torch.Tensor:
        key = (t, size)
        if key not in self._timesteps:
            self._timesteps[key] = torch.full((size,), t, dtype=torch.long, device=device)
        return self._timesteps[key]

    def _prime(self, steps: int, size: int, like: torch.Tensor) -> None:
        """Make every device constant the loop needs before a capture (a capture must not copy from the host)."""
        k = len(self.schedule.trailing_timesteps(steps))
        for t in self.schedule.trailing_timesteps(steps):
            self._timestep(t, size, like.device)
            self.schedule.alpha_sigma(t, like)
            self.schedule.alpha_sigma(self.schedule.previous_timestep(t, k), like)

    def _loop(self, slot: LiveSlot, steps: int, sampler: str):
        """fn(z_T, cond, text_emb, fresh) -> images in [0, 1]: the k-step sampler and the decode."""
        denoiser, schedule = slot.denoiser, self.schedule
        timesteps = schedule.trailing_timesteps(steps)
        sample = few_step_sampler(sampler)

        def fn(z_T, cond, text_emb, fresh):
            def model(z_t, t):  # ConditionedDenoiser.forward, with the timestep kept on the device
                t = int(t[0])
                out = denoiser.predict(z_t, self._timestep(t, z_t.shape[0], z_t.device), cond, text_emb)
                return schedule.to_x_eps(out, z_t, t)

            z_0 = sample(model, z_T, timesteps, schedule, fresh_noise=fresh or None)
            return (self.backbone.from_model_space(z_0) * 0.5 + 0.5).clamp(0, 1)

        return fn

    def drop_lora(self, lora: str) -> None:
        """A backbone LoRA left the UNet: graphs that read its tensors are invalid."""
        if self.graphs is not None:
            self.graphs.drop(lambda key: key.backbone_lora == lora)
