"""The engine: one resident backbone, the adapter pool, the scheduler and the executor, and the worker
thread that runs `step()` — take a batch from the scheduler, execute it, resolve its requests.

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

from ..adapters.zoo import ZooError, list_entries
from .backbone import Backbone, load_backbone
from .executor import Batch, Executor
from .metrics import Metrics
from .pool import AdapterGone, AdapterPool, Registered
from .samplers import STOCHASTIC
from .scheduler import Job, Scheduler
from .settings import ServeSettings
from .tasks import Work, blank_work, prepare

log = logging.getLogger("cdd.serve")
TEXT_CACHE = 512


class EngineError(RuntimeError):
    """The engine cannot start (missing folders, an unusable zoo)."""


@dataclass
class Result:
    """A request's sampled rows and where its time went."""

    rows: torch.Tensor  # [rows, 3, R, R] in [0, 1], CPU float32
    queue_s: float
    execute_s: float
    batch_size: int  # requests in the batch
    batch_rows: int


class Engine:
    def __init__(self, settings: ServeSettings, backbone: Backbone | None = None, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.backbone = backbone
        self.scheduler = Scheduler(settings.max_batch, settings.max_wait_ms / 1000.0, settings.queue_size)
        self.pool: AdapterPool | None = None
        self.executor: Executor | None = None
        self.warmup_error: str | None = None
        self._lock = threading.RLock()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._text: OrderedDict[str, torch.Tensor] = OrderedDict()

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
        graphs = None
        if s.use_cuda_graphs:
            from .cuda_graphs import GraphCache

            graphs = GraphCache(s.torch_device, debug=s.graph_debug, metrics=self.metrics)
        self.executor = Executor(self.backbone, s.batch_buckets(), graphs)
        self.pool = AdapterPool(self.backbone, s.memory_budget_bytes, self.metrics, on_lora_dropped=self.executor.drop_lora)
        self._register_zoos()
        self._thread = threading.Thread(target=self._work, name="cdd-engine", daemon=True)
        self._thread.start()
        return self

    def _register_zoos(self) -> None:
        """Register every entry of a named zoo (any that cannot be served is an error), or of the default zoos:
        the user zoo, then the embedded one, skipping (and saying so) entries made for another backbone and
        embedded entries a user entry of the same name shadows."""
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
            for path, manifest in list_entries(zoo):
                if isinstance(manifest, ZooError):
                    raise EngineError(f"zoo {zoo}: {manifest}")
                if not named and manifest.backbone_fingerprint != self.backbone.fingerprint:
                    skipped.append(f"{path} (made for backbone {manifest.backbone_fingerprint[:12]}, not this one)")
                    continue
                if not named and manifest.name in {r.name for r in self.pool.entries()}:
                    skipped.append(f"{path} (a user zoo entry is named {manifest.name!r} too)")
                    continue
                try:
                    self.pool.register(path)
                except ZooError as e:
                    raise EngineError(f"zoo {zoo}: {e}") from e
                served[str(zoo)] += 1
        log.info("serving zoo entries", extra={"fields": {"entries_by_zoo": served, "skipped": skipped}})
        for why in skipped:
            log.warning(f"not serving zoo entry {why}")
        if not self.pool.entries():
            if skipped:
                raise EngineError(f"no entry of {', '.join(served)} was made for the served backbone "
                                  f"({self.backbone.fingerprint[:12]}); "
                                  "pass --zoo PATH with entries trained on it")
            log.warning(f"zoo {', '.join(served)} has no entries: no task is served until one is registered")

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Admit nothing more, finish what was admitted (or, drain=False, fail it), stop the worker."""
        self.scheduler.close()
        if not drain:
            while (batch := self.scheduler.next_batch(timeout=0)) is not None:
                for job in batch:
                    job.future.set_exception(RuntimeError("the server stopped before this request ran"))
        if self._thread is not None:
            self._thread.join(timeout)

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

    # -- requests ------------------------------------------------------------------------

    def prepare(self, reg: Registered, image: torch.Tensor, *, steps: int, sampler: str, seed: int, prompt: str) -> Work:
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
        )

    def submit(self, work: Work, deadline: float = float("inf")) -> Job:
        """Queue a request (raises QueueFull, DeadlineExceeded, SchedulerClosed); its future gives a Result."""
        job = self.scheduler.submit(Job(work.key, work.rows, work, deadline))
        self.metrics.queue_depth.set(len(self.scheduler))
        return job

    def run(self, work: Work, timeout: float | None = None) -> Result:
        """Submit and wait (for library use and benchmarks)."""
        return self.submit(work).future.result(timeout)

    def step(self, timeout: float | None = None) -> bool:
        """One scheduling step: take a batch, execute it, resolve its futures. False when none came."""
        batch = self.scheduler.next_batch(timeout)
        self.metrics.queue_depth.set(len(self.scheduler))
        if not batch:
            return False
        t0 = time.perf_counter()
        try:
            rows = self._execute([job.payload for job in batch])
        except Exception as e:  # noqa: BLE001 - every request of the batch learns why
            if not isinstance(e, AdapterGone):
                log.exception("batch failed")
            for job in batch:
                job.future.set_exception(e)
            return True
        seconds = time.perf_counter() - t0
        total = sum(job.rows for job in batch)
        self.scheduler.record_batch(seconds, total)
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
        w0 = works[0]
        with self._lock:
            slot, reg = self.pool.activate(w0.adapter)
            text = torch.cat([self._encode(w.prompt).expand(w.rows, -1, -1) for w in works])
            batch = Batch(
                z_T=torch.cat([w.z_T for w in works]),
                cond=torch.cat([w.cond for w in works]),
                text_emb=text,
                fresh=[torch.cat(xs) for xs in zip(*[w.fresh for w in works])] if w0.sampler in STOCHASTIC else None,
                steps=w0.steps,
                sampler=w0.sampler,
            )
            return self.executor.run(slot, reg, batch)

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
        """Run every (architecture, resolution, default steps and sampler) once per batch bucket: loads the
        adapters, initialises kernels and, on CUDA, captures the graphs before the first request.
        `names`: only these entries (default: all)."""
        seen = set()
        wanted = None if names is None else set(names)
        for reg in self.pool.entries():
            if wanted is not None and reg.name not in wanted:
                continue
            m = reg.manifest
            key = (reg.architecture, reg.lora_name, reg.resolution, m.steps, m.sampler)
            if key in seen:
                continue
            seen.add(key)
            for size in self.executor.buckets:
                work = blank_work(reg.name, reg.task, reg.resolution, reg.channels, self.backbone.model_channels,
                                  self.backbone.vae_scale_factor, m.steps, m.sampler)
                self._execute([work] * size)
            log.info(f"warmed up {reg.architecture} at {reg.resolution}px, {m.steps} steps {m.sampler}")

    # -- adapters ------------------------------------------------------------------------

    def register(self, path: str | Path) -> Registered:
        return self.pool.register(path)

    def unregister(self, name: str) -> Registered:
        with self._lock:
            return self.pool.unregister(name)

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
