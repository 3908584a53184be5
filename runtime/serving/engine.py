"""The engine: one resident backbone, the adapter pool, the scheduler and the executor, and the worker
thread that runs `step()`.

Two ways to batch (setting `batching`):
- step (the default), step-level continuous batching: the engine keeps the rows in flight, each request
  with its own adapter, condition, text, timesteps, sampler and noise. Each `step()` admits queued
  requests into the free rows, runs ONE denoiser evaluation for every row in flight (each adapter on its
  own rows, the backbone once on all of them with per-row timesteps), lets each request's sampler take
  its step, and decodes and answers the requests that took their last. The backbone, about three
  quarters of a step's work, runs once per step for every task in flight instead of once per group.
- request, per-adapter batching: take a batch of one (task, adapter, steps, sampler, size) from the
  scheduler, run its whole sampling loop, answer it.

All device work (adapter loads and swaps, text encoding, sampling) happens on the worker thread or
under `self._lock`; the HTTP layer only prepares CPU tensors and waits on futures.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ...adapters.zoo import ZooError, list_entries
from ..diffusion.backbone import Backbone, load_backbone
from .executor import Batch, Executor, Flight
from .metrics import Metrics
from .pool import AdapterGone, AdapterPool, Registered
from ..diffusion.samplers import is_stochastic
from .scheduler import Job, Scheduler, SchedulerClosed
from .settings import ServeSettings
from .tasks import Work, blank_work, check_fidelity, check_guidance, check_strength, prepare, served_sr_tile

log = logging.getLogger("cdd.serve")
TEXT_CACHE = 512


class EngineError(RuntimeError):
    """The engine cannot start (missing folders, an unusable zoo)."""


@dataclass(frozen=True)
class Unavailable:
    """A zoo entry that is not served, and why (its hash, manifest, load, warm-up or weights failed)."""

    name: str  # the manifest's name, or the entry folder's when the manifest cannot be read
    task: str | None
    reason: str  # without server paths: shown by GET /v1/tasks and /readyz


@dataclass
class Result:
    """A request's sampled rows and where its time went."""

    rows: torch.Tensor  # [rows, 3, H, W] in [0, 1], CPU float32
    queue_s: float
    execute_s: float
    batch_size: int  # requests in the batch (step-level: requests in flight when it was admitted)
    batch_rows: int  # rows in the batch (step-level: most rows of an evaluation it took part in)


class Engine:
    def __init__(self, settings: ServeSettings, backbone: Backbone | None = None, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.backbone = backbone
        self.scheduler = Scheduler(settings.max_batch, settings.max_wait_ms / 1000.0, settings.queue_size)
        self.pool: AdapterPool | None = None
        self.executor: Executor | None = None
        self.warmup_error: str | None = None
        self.unavailable: dict[str, Unavailable] = {}  # entries not served, by name, with the reason
        self._lock = threading.RLock()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._text: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._flights: list[Flight] = []  # step-level batching: the requests in flight (worker thread only)

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> Engine:
        """Load the backbone (unless given), register the zoo, start the worker (which warms up first)."""
        s = self.settings
        if self.backbone is None:
            folder = s.backbone_dir()
            if not folder.is_dir():
                raise EngineError(
                    f"backbone folder {folder} does not exist; pass --backbone PATH or set CDD_BACKBONE "
                    "(the embedded default is built by cdd-pretrain-backbone)"
                )
            self.backbone = load_backbone(folder, s.torch_device, s.torch_dtype)
        else:
            self.backbone.to(s.torch_device, s.torch_dtype)
        if s.sr_tile is not None and s.sr_tile % self.backbone.size_factor:
            raise EngineError(f"sr_tile {s.sr_tile} is not a multiple of the backbone's size factor "
                              f"{self.backbone.size_factor} (CDD_SR_TILE)")
        graphs = None
        if s.use_cuda_graphs:
            from .cuda_graphs import GraphCache

            graphs = GraphCache(s.torch_device, debug=s.graph_debug, metrics=self.metrics)
        self.executor = Executor(self.backbone, s.batch_buckets(), graphs)
        self.pool = AdapterPool(self.backbone, s.memory_budget_bytes, self.metrics, on_lora_dropped=self.executor.drop_lora)
        self._register_zoos()
        if s.warmup:  # every entry's weights loaded once now: one that cannot load is isolated before serving
            for reg in self.pool.entries():
                try:
                    self.load(reg.name)
                except Exception as e:  # noqa: BLE001 - this entry cannot serve; the others can
                    self.mark_unavailable(reg.name, reg.task, e)
            self._require_servable()
        self._thread = threading.Thread(target=self._work, name="cdd-engine", daemon=True)
        self._thread.start()
        return self

    def _register_zoos(self) -> None:
        """Register every entry of a named zoo, or of the default zoos: the user zoo, then the embedded one,
        skipping (and saying so) entries made for another backbone and embedded entries a user entry of the
        same name shadows. An entry that fails (manifest, hashes, servability) is isolated: marked
        unavailable with the reason, the rest is served; only a zoo of entries none of which can be served
        stops the start (EngineError, one line)."""
        s = self.settings
        named = s.zoo is not None
        served: dict[str, int] = {}
        skipped: list[str] = []
        for zoo in s.zoo_dirs():
            if not zoo.is_dir():
                raise EngineError(
                    f"zoo folder {zoo} does not exist; pass --zoo PATH or set CDD_ZOO "
                    "(the embedded default zoo is built by cdd-train-adapter)"
                )
            served[str(zoo)] = 0
            try:
                entries = list_entries(zoo)
            except OSError as e:
                raise EngineError(f"zoo folder {zoo} cannot be read: {e.strerror or type(e).__name__}") from e
            for path, manifest in entries:
                if isinstance(manifest, ZooError):  # one bad entry is named in the log; the rest serve
                    self.mark_unavailable(path.name, None, manifest, path)
                    continue
                if not named and manifest.backbone_fingerprint != self.backbone.fingerprint:
                    skipped.append(f"{path} (made for backbone {manifest.backbone_fingerprint[:12]}, not this one)")
                    continue
                if not named and manifest.name in {r.name for r in self.pool.entries()}:
                    skipped.append(f"{path} (a user zoo entry is named {manifest.name!r} too)")
                    continue
                try:
                    self.pool.register(path)
                except (ZooError, OSError) as e:  # tampered, unreadable, or something this backbone cannot serve
                    self.mark_unavailable(manifest.name, manifest.task, e, path)
                    continue
                served[str(zoo)] += 1
        log.info("serving zoo entries", extra={"fields": {"entries_by_zoo": served, "skipped": skipped,
                                                          "unavailable": sorted(self.unavailable)}})
        for why in skipped:
            log.warning(f"not serving zoo entry {why}")
        if not self.pool.entries():
            self._require_servable()
            if skipped:
                raise EngineError(f"no entry of {', '.join(served)} was made for the served backbone "
                                  f"({self.backbone.fingerprint[:12]}); "
                                  "pass --zoo PATH with entries trained on it")
            log.warning(f"zoo {', '.join(served)} has no entries: no task is served until one is registered")

    def _require_servable(self) -> None:
        if not self.servable():
            raise EngineError(f"no entry of {', '.join(map(str, self.settings.zoo_dirs()))} can be served: "
                              + "; ".join(f"{u.name}: {u.reason}" for u in self.unavailable.values()))

    def mark_unavailable(self, name: str, task: str | None, error: BaseException, path: Path | None = None) -> None:
        """Stop serving entry `name` (unregistered if it was) and record why: the log has the whole reason,
        GET /v1/tasks and /readyz the reason without server paths."""
        reason = str(error) if isinstance(error, (ZooError, EngineError)) else f"{type(error).__name__}: {error}"
        log.error(f"zoo entry {name} is not served: {reason}", extra={"fields": {"entry": name}})
        if path is not None:
            for p in {str(path.resolve()), str(path)}:
                reason = reason.replace(p, path.name)
        with self._lock:
            try:
                reg = self.unregister(name)
                task = task or reg.task
                for p in {str(reg.path), str(reg.path.resolve())}:
                    reason = reason.replace(p, reg.path.name)
            except AdapterGone:
                pass
        self.unavailable[name] = Unavailable(name, task, reason[:1000])

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Admit nothing more, finish what was admitted (or, drain=False, fail it), stop the worker."""
        self.scheduler.close()
        if not drain:
            self.fail_queued()
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self, seconds: float) -> threading.Timer:
        """Shutdown begins: admit nothing more, and `seconds` from now refuse what is still queued
        (SchedulerClosed: 503 shutting_down); what is running then finishes."""
        self.scheduler.close()
        timer = threading.Timer(seconds, self.fail_queued)
        timer.daemon = True
        timer.start()
        return timer

    def fail_queued(self) -> int:
        """Refuse every queued request that has not started (SchedulerClosed); how many there were."""
        n = 0
        while (batch := self.scheduler.next_batch(timeout=0)) is not None:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(SchedulerClosed())
                    n += 1
        if n:
            log.warning(f"shutting down: {n} queued request(s) refused with 503 shutting_down")
        return n

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._thread is not None and self._thread.is_alive()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def pause(self) -> None:
        """Stop taking batches (admission and deadlines go on, so the queue fills): maintenance, and tests."""
        self.scheduler.pause()

    def resume(self) -> None:
        self.scheduler.resume()

    def _work(self) -> None:
        if self.settings.warmup:
            try:
                self.warm_up()
            except Exception as e:  # noqa: BLE001 - reported by /readyz and the log, the server keeps serving
                self.warmup_error = f"{type(e).__name__}: {e}"
                log.exception("warm-up failed")
        self._ready.set()
        while True:
            if not self.step(timeout=0.1) and self.scheduler.closed and len(self.scheduler) == 0:
                return

    def servable(self) -> bool:
        """Something is served: an entry is registered, or none ever failed (an empty zoo waiting for one)."""
        return bool(self.pool.entries()) or not self.unavailable

    # -- requests ------------------------------------------------------------------------

    def prepare(self, reg: Registered, image: torch.Tensor, *, steps: int, sampler: str, seed: int, prompt: str,
                width: int | None = None, height: int | None = None, guidance: float | None = None,
                fidelity: float | None = None, strength: float | None = None) -> Work:
        """The request's rows and noise (ValueError for a width or height the backbone cannot take, a guidance
        or fidelity weight the entry does not take, or a strength the task or step count cannot take).
        `strength` None: the entry's default."""
        check_guidance(reg.name, reg.manifest.guidance, guidance)
        check_fidelity(reg.name, reg.manifest.fidelity, fidelity)
        strength = reg.manifest.strength if strength is None else strength
        check_strength(reg.task, strength, steps, self.backbone.schedule.num_train_timesteps)
        return prepare(
            reg.task,
            image,
            adapter=reg.name,
            resolution=reg.resolution,
            model_channels=self.backbone.model_channels,
            scale_factor=self.backbone.vae_scale_factor,
            steps=steps,
            sampler=sampler,
            seed=seed,
            prompt=prompt,
            overlap_fraction=self.settings.sr_tile_overlap,
            tile=served_sr_tile(self.settings.sr_tile, reg.resolution),
            blend=self.settings.sr_blend,
            width=width,
            height=height,
            size_factor=self.backbone.size_factor,
            guidance=guidance,
            fidelity=fidelity,
            strength=strength,
        )

    def submit(self, work: Work, deadline: float = float("inf")) -> Job:
        """Queue a request (raises QueueFull, DeadlineExceeded, SchedulerClosed); its future gives a Result."""
        job = self.scheduler.submit(Job(work.key, work.rows, work, deadline, steps=work.steps))
        self.metrics.queue_depth.set(len(self.scheduler))
        return job

    def run(self, work: Work, timeout: float | None = None) -> Result:
        """Submit and wait (for library use and benchmarks)."""
        return self.submit(work).future.result(timeout)

    def step(self, timeout: float | None = None) -> bool:
        """One scheduling step. False when there was nothing to do (nothing in flight, none came)."""
        if self.settings.batching_mode == "step":
            return self._step_rows(timeout)
        return self._step_batch(timeout)

    def _step_rows(self, timeout: float | None) -> bool:
        """Step-level batching: admit requests into the free rows, one denoiser evaluation for every row in
        flight, answer the requests that took their last step."""
        free = self.settings.max_batch - sum(f.rows for f in self._flights)
        jobs = self.scheduler.take(free, timeout=0 if self._flights else timeout) if free > 0 else []
        self.metrics.queue_depth.set(len(self.scheduler))
        for job in jobs:
            try:
                self._flights.append(self._board(job))
            except Exception as e:  # noqa: BLE001 - the request learns why; the others go on
                if isinstance(e, ZooError):  # its entry cannot load: isolated, its later requests are refused
                    self.mark_unavailable(job.payload.adapter, job.payload.task, e)
                elif not isinstance(e, AdapterGone):
                    log.exception("request failed to start")
                job.future.set_exception(e)
        failed: set[int] = set()
        for f in self._flights:  # unregistered while in flight: only its own requests fail
            try:
                self.pool.get(f.reg.name)
            except AdapterGone as e:
                f.payload.future.set_exception(e)
                failed.add(id(f))
        self._flights = [f for f in self._flights if id(f) not in failed]
        if not self._flights:
            return bool(jobs) or bool(failed)
        t0 = time.perf_counter()
        groups: dict[tuple, list[Flight]] = {}
        for f in self._flights:
            groups.setdefault(f.group, []).append(f)
        with self._lock:
            for group in groups.values():
                try:
                    self.executor.evaluate(self.pool, group)
                except Exception as e:  # noqa: BLE001 - every request of the group learns why
                    if not isinstance(e, AdapterGone):
                        log.exception("evaluation failed")
                    for f in group:
                        f.payload.future.set_exception(e)
                        failed.add(id(f))
            done = [f for f in self._flights if f.done and id(f) not in failed]
            try:
                images = self.executor.decode(done) if done else []
            except Exception as e:  # noqa: BLE001
                log.exception("decode failed")
                images = [e] * len(done)
        seconds = time.perf_counter() - t0
        rows = sum(f.rows for f in self._flights)
        m = self.metrics
        m.batch_size.observe(len(self._flights))
        m.batch_rows.observe(rows)
        m.batch_seconds.observe(seconds)
        # Retry-After: a request's rows take about (its steps) evaluations
        mean_steps = sum(len(f.timesteps) for f in self._flights) / len(self._flights)
        self.scheduler.record_batch(seconds * mean_steps, rows, mean_steps)  # one evaluation = one step of every row
        now = time.perf_counter()
        for f, out in zip(done, images):
            job = f.payload
            if isinstance(out, Exception):
                job.future.set_exception(out)
                continue
            try:
                out = self._refine(job.payload, out)
            except Exception as e:  # noqa: BLE001 - this request learns why
                log.exception("fidelity module failed")
                job.future.set_exception(e)
                continue
            m.queue_wait.labels(job.payload.task).observe(job.waited)
            job.future.set_result(Result(out, job.waited, now - f.boarded, f.requests, f.company))
        self._flights = [f for f in self._flights if not f.done and id(f) not in failed]
        return True

    def _board(self, job: Job) -> Flight:
        w: Work = job.payload
        with self._lock:
            reg = self.pool.get(w.adapter)
            text = self._encode(w.prompt).expand(w.rows, -1, -1)
            flight = self.executor.board(job, reg, z_T=w.z_T, cond=w.cond, text_emb=text, fresh=w.fresh,
                                         steps=w.steps, sampler=w.sampler, guidance=row_guidance(reg, [w]),
                                         layout=w.layout, strength=w.strength)
        flight.boarded = time.perf_counter()
        flight.requests = len(self._flights) + 1
        return flight

    def _step_batch(self, timeout: float | None) -> bool:
        """Per-adapter batching: take a batch, execute it, resolve its futures. False when none came."""
        batch = self.scheduler.next_batch(timeout)
        self.metrics.queue_depth.set(len(self.scheduler))
        if not batch:
            return False
        t0 = time.perf_counter()
        try:
            rows = self._execute([job.payload for job in batch])
            rows = torch.cat([self._refine(job.payload, part)
                              for job, part in zip(batch, rows.split([job.rows for job in batch]))])
        except Exception as e:  # noqa: BLE001 - every request of the batch learns why
            if isinstance(e, ZooError):  # its entry cannot load: isolated, its later requests are refused
                self.mark_unavailable(batch[0].payload.adapter, batch[0].payload.task, e)
            elif not isinstance(e, AdapterGone):
                log.exception("batch failed")
            for job in batch:
                job.future.set_exception(e)
            return True
        seconds = time.perf_counter() - t0
        total = sum(job.rows for job in batch)
        self.scheduler.record_batch(seconds, total, batch[0].steps)
        m = self.metrics
        m.batch_size.observe(len(batch))
        m.batch_rows.observe(total)
        m.batch_seconds.observe(seconds)
        i = 0
        for job in batch:
            m.queue_wait.labels(job.payload.task).observe(job.waited)
            job.future.set_result(Result(rows[i : i + job.rows], job.waited, seconds, len(batch), total))
            i += job.rows
        return True

    def _execute(self, works: list[Work]) -> torch.Tensor:
        """The rows of one batch of one key, in order. Super-resolution images of several tiles averaged every step
        (`Work.layout.latent_blend`) need all their tiles at each step: they run step by step as step-level
        batching runs them (`_execute_flights`), the others their whole loop per chunk (`Executor.run`)."""
        blended = [w.layout is not None and w.layout.latent_blend for w in works]
        if not any(blended):
            return self._execute_loop(works)
        plain = [w for w, b in zip(works, blended) if not b]
        parts = iter(self._execute_loop(plain).split([w.rows for w in plain])) if plain else iter(())
        flights = iter(self._execute_flights([w for w, b in zip(works, blended) if b]))
        return torch.cat([next(flights) if b else next(parts) for b in blended])

    def _execute_loop(self, works: list[Work]) -> torch.Tensor:
        w0 = works[0]
        with self._lock:
            slot, reg = self.pool.activate(w0.adapter)
            text = torch.cat([self._encode(w.prompt).expand(w.rows, -1, -1) for w in works])
            batch = Batch(
                z_T=torch.cat([w.z_T for w in works]),
                cond=torch.cat([w.cond for w in works]),
                text_emb=text,
                fresh=[torch.cat(xs) for xs in zip(*[w.fresh for w in works])] if is_stochastic(w0.sampler) else None,
                steps=w0.steps,
                sampler=w0.sampler,
                guidance=row_guidance(reg, works),
                strength=w0.strength,
            )
            return self.executor.run(slot, reg, batch)

    def _execute_flights(self, works: list[Work]) -> list[torch.Tensor]:
        """Each work's rows, sampled together one evaluation at a time (as `_step_rows` does, without admitting)."""
        with self._lock:
            reg = self.pool.get(works[0].adapter)
            flights = [self.executor.board(None, reg, z_T=w.z_T, cond=w.cond, fresh=w.fresh, steps=w.steps,
                                           text_emb=self._encode(w.prompt).expand(w.rows, -1, -1), sampler=w.sampler,
                                           guidance=row_guidance(reg, [w]), layout=w.layout, strength=w.strength)
                       for w in works]
            while not flights[0].done:  # one key: the same steps for all
                self.executor.evaluate(self.pool, flights)
            return self.executor.decode(flights)

    def _refine(self, work: Work, rows: torch.Tensor) -> torch.Tensor:
        """A super-resolution request's rows through its entry's fidelity module at the request's weight (the
        entry's default when it gave none); other rows unchanged. Rows [n, 3, H, W] in [0, 1], CPU float32."""
        reg = self.pool.get(work.adapter)
        if reg.manifest.fidelity is None:
            return rows
        w = reg.manifest.fidelity["default"] if work.fidelity is None else work.fidelity
        if w == 0:
            return rows
        device, dtype = self.backbone.device, self.backbone.dtype
        out, step = [], self.settings.max_batch
        with self._lock, torch.no_grad():
            net = self.pool.fidelity(work.adapter)
            for a in range(0, rows.shape[0], step):
                y = rows[a : a + step].to(device, dtype) * 2 - 1
                c = work.cond[a : a + step].to(device, dtype) * 2 - 1
                out.append((net(y, c, w).float() * 0.5 + 0.5).clamp(0, 1).to("cpu"))
        return torch.cat(out)

    def _encode(self, prompt: str) -> torch.Tensor:
        """Text embeddings of one prompt, encoded alone (as diffusers does for one image) and cached."""
        emb = self._text.get(prompt)
        if emb is None:
            emb = self.backbone.encode_text([prompt])
            self._text[prompt] = emb
            while len(self._text) > TEXT_CACHE:
                self._text.popitem(last=False)
        self._text.move_to_end(prompt)
        return emb

    def warm_up(self, names: Iterable[str] | None = None) -> None:
        """Load every entry once (hashes, weights, finite values) and run every (architecture, resolution,
        default steps and sampler) once: initialises kernels before the first request. On CUDA once per batch
        bucket (each is a graph to capture, or a shape to tune); on a CPU at the smallest bucket only: the larger
        ones cost up to max_batch times as much, and the first requests' gain comes from running each entry at all
        (docs/serving.md, start-up). An entry that fails either is marked unavailable (the others are served).
        `names`: only these entries (default: all)."""
        sizes = self.executor.buckets if self.settings.torch_device.type == "cuda" else self.executor.buckets[:1]
        seen = set()
        wanted = None if names is None else set(names)
        rows = self.settings.batching_mode == "step"
        for reg in self.pool.entries():
            if wanted is not None and reg.name not in wanted:
                continue
            m = reg.manifest
            # step-level: graphs are per (architecture, bucket, size), whatever the steps and sampler (a start from the
            # input adds the encoder)
            key = (reg.architecture, reg.lora_name, reg.resolution) + ((m.strength < 1,) if rows else
                                                                      (m.steps, m.sampler, m.strength))
            try:
                self.load(reg.name)
                if key in seen:
                    continue
                for size in sizes:
                    work = blank_work(reg.name, reg.task, reg.resolution, reg.channels, self.backbone.model_channels,
                                      self.backbone.vae_scale_factor, m.steps, m.sampler, m.strength)
                    out = self._warm_rows(reg, work, size) if rows else self._execute([work] * size)
                    if not torch.isfinite(out).all():
                        raise ZooError("its warm-up output has non-finite values")
            except Exception as e:  # noqa: BLE001 - this entry cannot serve; the others can
                self.mark_unavailable(reg.name, reg.task, e)
                if wanted is not None:  # asked for by name (a Ray replica loading it): the caller learns why
                    raise
                continue
            seen.add(key)
            log.info(f"warmed up {reg.architecture} at {reg.resolution}px, {m.steps} steps {m.sampler}")

    def _warm_rows(self, reg: Registered, work: Work, size: int) -> torch.Tensor:
        """One evaluation and one decode of `size` blank rows of `reg` (step-level batching)."""
        with self._lock:
            text = self._encode("").expand(size, -1, -1)
            flight = self.executor.board(None, reg, z_T=work.z_T.expand(size, -1, -1, -1), cond=work.cond.expand(size, -1, -1, -1),
                                         text_emb=text, fresh=None, steps=1, sampler="ddim",
                                         guidance=row_guidance(reg, [work] * size), strength=work.strength)
            self.executor.evaluate(self.pool, [flight])
            return self.executor.decode([flight])[0]

    # -- adapters ------------------------------------------------------------------------

    def register(self, path: str | Path) -> Registered:
        return self.pool.register(path)

    def unregister(self, name: str) -> Registered:
        with self._lock:
            reg = self.pool.unregister(name)
            if reg.architecture not in self.pool.slots() and self.executor.graphs is not None:
                self.executor.graphs.drop(lambda key: key.architecture == reg.architecture)
            return reg

    def load(self, name: str) -> Registered:
        """Put a registered adapter's weights on the device ahead of its requests."""
        with self._lock:
            return self.pool.load(name)

    def evict(self, name: str) -> bool:
        """Free a registered adapter's device memory (it stays registered)."""
        with self._lock:
            return self.pool.evict(name)

    def tasks(self) -> dict[str, list[Registered]]:
        out: dict[str, list[Registered]] = {}
        for reg in self.pool.entries():
            out.setdefault(reg.task, []).append(reg)
        return out


def row_guidance(reg: Registered, works: list[Work]) -> torch.Tensor | None:
    """Each row's guidance weight w for a controlnet-guided entry (a request's own, else the entry's default for
    the request's step count), None for an entry that takes none."""
    m = reg.manifest
    if m.guidance is None:
        return None
    return torch.tensor([m.default_guidance(w.steps) if w.guidance is None else w.guidance
                         for w in works for _ in range(w.rows)], dtype=torch.float32)
