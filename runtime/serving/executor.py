"""The executor: the device work, eagerly or through captured CUDA graphs, in two shapes.

- Step-level batching (`board`, `evaluate`, `decode`): rows of any adapter, steps and sampler are in
  flight together (`Flight`); one evaluation runs each resident adapter on its own rows, the backbone
  UNet once on all of them with per-row timesteps, and each request's sampler takes its step.
- Per-adapter batching (`run`): one batch of one adapter, steps and sampler — pad to a bucket, run the
  few-step sampler through the live slot's ConditionedDenoiser, decode, copy back.

The schedule maths (alpha, sigma, x_hat, the sampler steps) run in float32 whatever the model dtype:
the sample z stays float32 on the device and only the network inputs are cast (in bf16 the step from
t = 999, where alpha = 0.068, would otherwise magnify rounding about 15x).

The sampling loop is the library's own (`few_step_sampler`), driven by the slot's `ConditionedDenoiser`;
two things make it capturable without changing its numbers: timesteps are handed to the UNet as
device tensors made once, and alpha_t / sigma_t come from `CachedSchedule`, which computes them
exactly as `NoiseSchedule` does but keeps them on the device (no host-to-device copy while capturing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..diffusion.backbone import Backbone
from .cuda_graphs import GraphCache, GraphKey, StepGraphKey
from .pool import AdapterPool, LiveSlot, Registered
from ..diffusion.samplers import (ILVR, KEEP, LowPass, few_step_sampler, ilvr, ilvr_correct, ilvr_output, keep_source,
                                  keeps_low_frequencies, sampler_step, source_roundtrip, split_sampler, span_of,
                                  start_from)
from ..diffusion.schedule import NoiseSchedule
from .tasks import SR_SCALE, LatentBlend, TileLayout

RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals")


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
    guidance: torch.Tensor | None = None  # [rows] float32: each row's w (controlnet-guided adapters), else None
    strength: float = 1.0  # 1: from noise; < 1: from the condition noised to the run's first timestep

    @property
    def rows(self) -> int:
        return int(self.z_T.shape[0])


@dataclass(eq=False)
class Flight:
    """A request in flight under step-level batching: its rows' device state between evaluations."""

    payload: object  # the engine's (the job it answers)
    reg: Registered
    sampler: str
    timesteps: list[int]
    z: torch.Tensor  # [rows, C, h, w] the current sample, float32
    z_T: torch.Tensor  # float32
    cond: torch.Tensor  # model dtype
    text_emb: torch.Tensor  # model dtype
    fresh: list[torch.Tensor] | None  # float32, one per step (cm, gd)
    guidance: torch.Tensor | None = None  # [rows] float32 on the device: each row's w (controlnet-guided)
    i: int = 0  # steps taken
    company: int = 0  # most rows it shared an evaluation with (itself included)
    requests: int = 1  # requests in flight when it boarded (itself included)
    boarded: float = 0.0  # time.perf_counter() when it boarded
    reference_low: torch.Tensor | None = None  # NAME+ilvr(-out): phi(2 cond - 1), the input's low frequencies, made once
    roundtrip: torch.Tensor | None = None  # NAME+keep: D(E(2 cond - 1)), the source's round trip, made once
    blend: LatentBlend | None = None  # super-resolution tiles of one image: averaged where they overlap, every step

    @property
    def rows(self) -> int:
        return int(self.z.shape[0])

    @property
    def done(self) -> bool:
        return self.i == len(self.timesteps)

    @property
    def group(self) -> tuple:
        """What rows must share to run in one backbone call: their latent size and the backbone LoRA."""
        return (tuple(self.z.shape[1:]), self.reg.lora_name)


class Executor:
    def __init__(self, backbone: Backbone, buckets: tuple[int, ...], graphs: GraphCache | None = None):
        self.backbone = backbone
        self.buckets = tuple(sorted(buckets))
        self.graphs = graphs
        self.schedule = CachedSchedule.of(backbone.schedule)
        self._timesteps: dict[tuple[int, int], torch.Tensor] = {}
        self._lowpass: dict[tuple[int, int], LowPass] = {}

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
                key = GraphKey(slot.key, reg.lora_name, size, reg.resolution, batch.steps, batch.sampler, batch.strength)
                self._prime(batch.steps, size, values["z_T"], batch.strength)
                if keeps_low_frequencies(split_sampler(batch.sampler)[1]):
                    self.lowpass(*values["cond"].shape[-2:])  # its matrices on the device before the capture
                fn = self._loop(slot, batch.steps, batch.sampler, batch.strength)
                watched = slot.live_tensors() if self.graphs.debug else slot.tensors
                images = self.graphs.run(key, fn, values, watched)
            else:
                images = self._loop(slot, batch.steps, batch.sampler, batch.strength)(**values)
            out.append(images[:n].to("cpu", torch.float32))
        return torch.cat(out)

    def _device_inputs(self, batch: Batch, rows: slice, size: int) -> dict:
        device, dtype = self.backbone.device, self.backbone.dtype

        def put(t: torch.Tensor) -> torch.Tensor:
            t = t[rows]
            if t.shape[0] < size:
                t = torch.cat([t, t.new_zeros((size - t.shape[0], *t.shape[1:]))])
            return t.to(device=device, dtype=dtype)

        def put32(t: torch.Tensor) -> torch.Tensor:  # sampler state: float32 (only network inputs are cast)
            t = t[rows]
            if t.shape[0] < size:
                t = torch.cat([t, t.new_zeros((size - t.shape[0], *t.shape[1:]))])
            return t.to(device=device, dtype=torch.float32)

        values = {"z_T": put32(batch.z_T), "cond": put(batch.cond), "text_emb": put(batch.text_emb)}
        values["fresh"] = [put32(xi) for xi in batch.fresh] if batch.fresh is not None else []
        if batch.guidance is not None:
            values["guidance"] = put32(batch.guidance)
        return values

    def _timestep(self, t: int, size: int, device) -> torch.Tensor:
        key = (t, size)
        if key not in self._timesteps:
            self._timesteps[key] = torch.full((size,), t, dtype=torch.long, device=device)
        return self._timesteps[key]

    def lowpass(self, height: int, width: int) -> LowPass:
        """ILVR's low-pass at the super-resolution factor for rows of height x width pixels, on the device."""
        key = (height, width)
        if key not in self._lowpass:
            self._lowpass[key] = LowPass(height, width, SR_SCALE).to(self.backbone.device)
        return self._lowpass[key]

    def _latent_io(self) -> dict:
        """ILVR on a latent backbone: x_hat is decoded, corrected in pixels and encoded again."""
        bb = self.backbone
        if not bb.latent:
            return {}
        return {"to_pixels": lambda z: bb.from_model_space(z.to(bb.dtype)).float(),
                "to_model": lambda x: bb.to_model_space(x.to(bb.dtype)).float()}

    def _prime(self, steps: int, size: int, like: torch.Tensor, strength: float = 1.0) -> None:
        """Make every device constant the loop needs before a capture (a capture must not copy from the host)."""
        timesteps = self.schedule.trailing_timesteps(steps, strength)
        for t in timesteps:
            self._timestep(t, size, like.device)
            self.schedule.alpha_sigma(t, like)
            self.schedule.alpha_sigma(self.schedule.previous_timestep(t, steps, span_of(timesteps)), like)

    def start(self, cond: torch.Tensor, z_T: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
        """Where a run from the input starts (`strength` < 1): the condition ([rows, c, H, W] in [0, 1]) in model
        space, noised with z_T to the first timestep (`samplers.start_from`); encoded a bucket of rows at a time."""
        step, bb = self.buckets[-1], self.backbone
        x = torch.cat([bb.to_model_space(cond[a : a + step].to(bb.dtype) * 2 - 1).float()
                       for a in range(0, cond.shape[0], step)])
        return start_from(x, z_T, timesteps, self.schedule)

    def _loop(self, slot: LiveSlot, steps: int, sampler: str, strength: float = 1.0):
        """fn(z_T, cond, text_emb, fresh) -> images in [0, 1]: the k-step sampler (from the input when `strength`
        < 1) and the decode."""
        denoiser, schedule = slot.denoiser, self.schedule
        timesteps = schedule.trailing_timesteps(steps, strength)
        base, step = split_sampler(sampler)
        sample = few_step_sampler(base)

        dtype = self.backbone.dtype

        def fn(z_T, cond, text_emb, fresh, guidance=None):
            with_guidance(denoiser.adapter, guidance)  # one w per row, read by every adapter pass of the loop

            def model(z_t, t):  # ConditionedDenoiser.forward, the timestep kept on the device, maths in float32
                t = int(t[0])
                out = denoiser.predict(z_t.to(dtype), self._timestep(t, z_t.shape[0], z_t.device), cond, text_emb)
                return schedule.to_x_eps(out.float(), z_t, t)

            reference_low = low = roundtrip = None
            if keeps_low_frequencies(step):  # super-resolution: the output keeps the input's low frequencies
                low = self.lowpass(cond.shape[-2], cond.shape[-1])
                reference_low = low(cond.float() * 2 - 1)
            if step == ILVR:  # ... and so does each x_hat (ILVR's step; NAME+ilvr-out only corrects the output)
                model = ilvr(model, cond.float() * 2 - 1, SR_SCALE, low=low, reference_low=reference_low,
                             **self._latent_io())
            if step == KEEP:  # edit: the decoded output gets back what the autoencoder loses of the source
                roundtrip = source_roundtrip(cond.float() * 2 - 1, self.backbone)
            z_start = self.start(cond, z_T, timesteps) if strength < 1 else None
            z_0 = sample(model, z_T, timesteps, schedule, fresh_noise=fresh or None, z_start=z_start)
            return self._to_images(z_0, reference_low, low, cond, roundtrip)

        return fn

    def _to_images(self, z_0: torch.Tensor, reference_low: torch.Tensor | None = None, low: LowPass | None = None,
                   source: torch.Tensor | None = None, roundtrip: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded images in [0, 1]; with `reference_low` (NAME+ilvr, NAME+ilvr-out) ILVR's last update on the decoded output,
        with `source` (the edit's condition in [0, 1]) and its `roundtrip` (NAME+keep) `keep_source`."""
        x = self.backbone.from_model_space(z_0.to(self.backbone.dtype))
        if reference_low is not None:
            x = ilvr_output(x.float(), reference_low, low)
        if roundtrip is not None:
            x = keep_source(x.float(), source.float() * 2 - 1, roundtrip)
        return (x * 0.5 + 0.5).clamp(0, 1)

    # -- step-level batching -----------------------------------------------------------------

    def board(self, payload, reg: Registered, *, z_T, cond, text_emb, fresh, steps: int, sampler: str,
              guidance: torch.Tensor | None = None, layout: TileLayout | None = None, strength: float = 1.0) -> Flight:
        """A request's rows on the device, ready for its first evaluation (CPU tensors in, as `Batch` holds);
        `layout`: the super-resolution tiles the rows are, averaged every step when it says so (`latent_blend`);
        `strength` < 1: the run starts from the condition (`start`)."""
        device, dtype = self.backbone.device, self.backbone.dtype
        z_T = z_T.to(device, torch.float32)
        cond = cond.to(device, dtype)
        timesteps = self.schedule.trailing_timesteps(steps, strength)
        blend = LatentBlend(layout, self.backbone.vae_scale_factor, device) if layout is not None and layout.latent_blend else None
        z = z_T
        if strength < 1:  # tiles of one image start from one latent: their encodings averaged where they overlap
            z = self.start(cond, z_T, timesteps)
            z = blend(z) if blend is not None else z
        reference_low = roundtrip = None
        step = split_sampler(sampler)[1]
        if keeps_low_frequencies(step):
            reference_low = self.lowpass(cond.shape[-2], cond.shape[-1])(cond.float() * 2 - 1)
        if step == KEEP:
            roundtrip = torch.cat([source_roundtrip(cond[a : a + self.buckets[-1]].float() * 2 - 1, self.backbone)
                                   for a in range(0, cond.shape[0], self.buckets[-1])])
        return Flight(
            payload, reg, sampler, timesteps, z, z_T,
            cond, text_emb.to(device, dtype),
            [xi.to(device, torch.float32) for xi in fresh] if fresh is not None else None,
            reference_low=reference_low, roundtrip=roundtrip,
            guidance=guidance.to(device, torch.float32) if guidance is not None else None,
            blend=blend,
        )

    @torch.no_grad()
    def evaluate(self, pool: AdapterPool, flights: list[Flight]) -> None:
        """One denoiser evaluation for flights of one `group`, then each takes its sampler's step.

        Each adapter computes its residuals on its own rows; the backbone UNet runs once on all rows
        (in chunks of the largest bucket) with per-row timesteps; rows of adapters without some kind of
        residual (ControlNet vs T2I) get zeros there, which adds nothing."""
        flights = sorted(flights, key=lambda f: f.reg.name)  # each adapter's rows contiguous
        owners = [f.reg.name for f in flights for _ in range(f.rows)]
        z = torch.cat([f.z for f in flights])
        t = torch.tensor([f.timesteps[f.i] for f in flights for _ in range(f.rows)], dtype=torch.long)
        text = torch.cat([f.text_emb for f in flights])
        cond = torch.cat([f.cond for f in flights])
        # each row's w (0 for rows of adapters that take none: they never read it)
        w = torch.cat([f.guidance if f.guidance is not None else f.z.new_zeros(f.rows) for f in flights])
        n, step = z.shape[0], self.buckets[-1]
        out = torch.cat([self._unet_rows(pool, owners[a : a + step], z[a : a + step], t[a : a + step].to(z.device),
                                         text[a : a + step], cond[a : a + step], w[a : a + step])
                         for a in range(0, n, step)])
        a, predictions = 0, []
        for f in flights:
            predictions.append(self.schedule.to_x_eps(out[a : a + f.rows].float(), f.z, f.timesteps[f.i]))
            a += f.rows
        # as `_loop`: ILVR on each NAME+ilvr flight's rows, towards its own condition; the flights of one size together,
        # one VAE round trip per chunk of rows rather than one per flight (most of a super-resolution step)
        ilvr_rows = [i for i, f in enumerate(flights) if split_sampler(f.sampler)[1] == ILVR]
        for idx in _by(ilvr_rows, lambda i: tuple(flights[i].cond.shape[-2:])).values():
            low = self.lowpass(*flights[idx[0]].cond.shape[-2:])
            x_hat = torch.cat([predictions[i][0] for i in idx])
            ref = torch.cat([flights[i].reference_low for i in idx])
            x_hat = torch.cat([ilvr_correct(x_hat[b : b + step], ref[b : b + step], low, **self._latent_io())
                               for b in range(0, x_hat.shape[0], step)])
            for i, part in zip(idx, x_hat.split([flights[i].rows for i in idx])):
                predictions[i] = (part, predictions[i][1])
        for f, (x_hat, eps_hat) in zip(flights, predictions):
            if f.blend is not None:  # one image's tiles: MultiDiffusion's average where they overlap (after ILVR)
                x_hat, eps_hat = f.blend(x_hat), f.blend(eps_hat)
            base = split_sampler(f.sampler)[0]
            f.z = sampler_step(base, f.i, f.timesteps, f.z, x_hat, eps_hat, self.schedule, f.z_T, f.fresh)
            f.i += 1
            f.company = max(f.company, n)

    def _unet_rows(self, pool: AdapterPool, owners: list[str], z, t, text, cond, w) -> torch.Tensor:
        """The backbone's raw output for up to one bucket of rows; `owners[i]` is row i's adapter."""
        dtype = self.backbone.dtype
        z = z.to(dtype)
        parts = []  # (rows, residual kwargs) per adapter, in row order
        a = 0
        while a < len(owners):
            b = a
            while b < len(owners) and owners[b] == owners[a]:
                b += 1
            slot, reg = pool.activate(owners[a])  # copies its weights into the slot when another held it
            parts.append((b - a, self._adapter_rows(slot, reg, z[a:b], t[a:b], text[a:b], cond[a:b], w[a:b])))
            a = b
        residuals = _merge_residuals(parts)
        n = z.shape[0]
        size = self.bucket(n)
        values = {"z": _pad(z, size), "t": _pad(t, size), "text_emb": _pad(text, size),
                  **{k: ([_pad(r, size) for r in v] if isinstance(v, (list, tuple)) else _pad(v, size))
                     for k, v in residuals.items()}}
        unet = self.backbone.unet

        def fn(z, t, text_emb, **res):
            res = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in res.items()}  # the UNet pops from lists
            return unet(z, t, encoder_hidden_states=text_emb, return_dict=False, **res)[0]

        if self.graphs is None:
            return fn(**values)[:n]
        lora = pool.active_lora
        key = StepGraphKey("unet:" + ",".join(sorted(residuals)), lora, size, tuple(z.shape[1:]))
        return self.graphs.run(key, fn, values, {})[:n]

    def _adapter_rows(self, slot: LiveSlot, reg: Registered, z, t, text, cond, w) -> dict:
        """One adapter's residuals for its rows (padded to their bucket for a captured graph, then cut); `w` is
        each row's guidance weight, read only by adapters that take one."""
        unet, adapter = self.backbone.unet, slot.adapter
        n = z.shape[0]
        size = self.bucket(n)
        values = {"z": _pad(z, size), "t": _pad(t, size), "text_emb": _pad(text, size), "cond": _pad(cond, size)}
        if takes_guidance(adapter):
            values["guidance"] = _pad(w, size)

        def fn(z, t, text_emb, cond, guidance=None):
            with_guidance(adapter, guidance)
            return adapter.unet_kwargs(unet, z, t, text_emb, cond)

        if self.graphs is None:
            out = fn(**values)
            if size == n:
                return out
            return {k: ([r[:n] for r in v] if isinstance(v, (list, tuple)) else v[:n]) for k, v in out.items()}

        key = StepGraphKey(slot.key, reg.lora_name, size, tuple(z.shape[1:]))
        watched = slot.live_tensors() if self.graphs.debug else slot.tensors
        out = self.graphs.run(key, fn, values, watched)
        # the graph's outputs are overwritten by its next replay (another adapter of this architecture)
        return {k: ([r[:n].clone() for r in v] if isinstance(v, (list, tuple)) else v[:n].clone()) for k, v in out.items()}

    @torch.no_grad()
    def decode(self, flights: list[Flight]) -> list[torch.Tensor]:
        """Finished flights' images ([rows, 3, H, W] in [0, 1], float32 on the CPU), decoded together by size and
        final step: plain; NAME+ilvr and NAME+ilvr-out (ILVR's last update on its own decoded output); NAME+keep (its own source's
        detail back where the edit kept it)."""
        def kind(i: int) -> tuple:
            f = flights[i]
            step = "ilvr" if f.reference_low is not None else "keep" if f.roundtrip is not None else ""
            return (tuple(f.z.shape[1:]), step, tuple(f.cond.shape[-2:]) if step == "ilvr" else ())

        out: dict[int, torch.Tensor] = {}
        step = self.buckets[-1]
        for (_, final, _), idx in _by(range(len(flights)), kind).items():
            z = torch.cat([flights[i].z for i in idx])
            extra = {}
            if final == "ilvr":
                extra = {"reference_low": torch.cat([flights[i].reference_low for i in idx]),
                         "low": self.lowpass(*flights[idx[0]].cond.shape[-2:])}
            elif final == "keep":
                extra = {"source": torch.cat([flights[i].cond for i in idx]),
                         "roundtrip": torch.cat([flights[i].roundtrip for i in idx])}
            images = torch.cat([
                self._to_images(z[a : a + step], **{k: v if k == "low" else v[a : a + step] for k, v in extra.items()})
                for a in range(0, z.shape[0], step)]).to("cpu", torch.float32)
            for i, part in zip(idx, images.split([flights[i].rows for i in idx])):
                out[i] = part
        return [out[i] for i in range(len(flights))]

    def drop_lora(self, lora: str) -> None:
        """A backbone LoRA left the UNet: graphs that read its tensors are invalid."""
        if self.graphs is not None:
            self.graphs.drop(lambda key: key.backbone_lora == lora)


def takes_guidance(adapter) -> bool:
    """Whether an adapter reads a per-row classifier-free guidance weight w (controlnet-guided)."""
    return hasattr(adapter, "set_guidance")


def with_guidance(adapter, w: torch.Tensor | None) -> None:
    """Point a guided adapter at this batch's per-row w (a device tensor, so a captured graph reads it where it
    is); None leaves other adapters alone and a guided one at its entry's default."""
    if takes_guidance(adapter):
        adapter.set_guidance(w)


def _by(items, key) -> dict:
    """items grouped by key(item), in order."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def _pad(x: torch.Tensor, size: int) -> torch.Tensor:
    """x with zero rows appended up to `size` rows (rows never see each other: every op works per sample)."""
    if x.shape[0] >= size:
        return x
    return torch.cat([x, x.new_zeros((size - x.shape[0], *x.shape[1:]))])


def _merge_residuals(parts: list[tuple[int, dict]]) -> dict:
    """Per-adapter residual kwargs -> one set for all their rows: each adapter's own, zeros where an
    adapter gives no residual of a kind (a T2I row in a ControlNet residual, and the other way round)."""
    if len(parts) == 1:
        return dict(parts[0][1])
    merged = {}
    for name in RESIDUALS:
        have = [kw[name] for _, kw in parts if name in kw]
        if not have:
            continue
        like = have[0]
        if isinstance(like, (list, tuple)):
            merged[name] = [
                torch.cat([kw[name][level] if name in kw else like[level].new_zeros((rows, *like[level].shape[1:]))
                           for rows, kw in parts])
                for level in range(len(like))
            ]
        else:
            merged[name] = torch.cat([kw[name] if name in kw else like.new_zeros((rows, *like.shape[1:]))
                                      for rows, kw in parts])
    for _, kw in parts:
        unknown = set(kw) - set(RESIDUALS)
        if unknown:
            raise ValueError(f"adapter residuals {sorted(unknown)} cannot be batched across adapters")
    return merged
