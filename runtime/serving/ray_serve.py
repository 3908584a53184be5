"""cdd-serve on Ray Serve: several engine replicas behind the same HTTP contract, adapters multiplexed by
name. One application, three deployments:

- `Gateway` (the ingress, FastAPI, no model): parses and validates a task request exactly as cdd-serve does
  (the helpers of `app.py`), picks the zoo adapter that serves it, and calls `AdapterReplica.run` with
  `multiplexed_model_id=<adapter name>`.
- `AdapterReplica` (`num_replicas`): one backbone and one Engine each. The whole zoo is registered
  (verified) at start and nothing loaded; `load_adapter`, Ray's `@serve.multiplexed` loader, puts an
  adapter's weights on the device when a request for it first reaches the replica. A replica holds at
  most `max_adapters_per_replica`: Ray unloads the least recently used one to load another, and the
  engine frees its memory. Ray's router sends a request to a replica that holds its adapter; when none
  does, or all that do are busy (at `max_ongoing_requests`), to one holding the fewest adapters, which
  loads it.
- `Ledger` (one replica, no model): what each engine replica last reported it holds (GET /v1/replicas).

Config: deploy/ray-serve.yaml (`import_path: cdd.runtime.serving.ray_serve:build_app`, the settings as `args`).
"""

# No `from __future__ import annotations`: Ray ships the ingress class to its replica by value (cloudpickle),
# with only the globals its code names; FastAPI could not resolve string annotations such as "Request" there.
import logging
import os
import threading
import time
from collections import Counter
from typing import Any

import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool

from .app import (
    TASK_ROUTE,
    APIError,
    TaskCall,
    TaskForm,
    TaskOutput,
    TasksResponse,
    execute,
    parse_task,
    service_app,
    task_form,
    task_response,
    tasks_response,
)
from .engine import Engine
from .metrics import Metrics
from .settings import RayServeSettings

log = logging.getLogger("cdd.serve")
NOT_RAY_SETTINGS = ("host", "port", "api_key")


class LoadedAdapter:
    """What the multiplexed loader returns for an adapter. Ray calls `__del__` when it unloads it (LRU);
    the later call by the garbage collector does nothing."""

    def __init__(self, name: str, replica: "AdapterReplica"):
        self.name, self._replica = name, replica

    def __del__(self) -> None:
        replica, self._replica = self._replica, None
        if replica is not None:
            replica.unloaded(self.name)


@serve.deployment
class Ledger:
    """Which adapters each engine replica holds, as the replicas last reported it."""

    def __init__(self):
        self._records: dict[str, dict] = {}

    async def report(self, replica: str, record: dict) -> None:
        if record["seq"] > self._records.get(replica, {}).get("seq", -1):
            self._records[replica] = record

    async def records(self) -> dict[str, dict]:
        return dict(self._records)


@serve.deployment
class AdapterReplica:
    """One backbone and Engine; adapters loaded on demand and kept by Ray's multiplexing, keyed by name."""

    def __init__(self, settings: RayServeSettings, ledger: DeploymentHandle):
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        self.settings, self.ledger = settings, ledger
        self.id = serve.get_replica_context().replica_id.unique_id
        # Warm-up is per adapter, when it is loaded: warming the whole zoo would load it all.
        self.engine = Engine(settings.model_copy(update={"warmup": False})).start()
        self._lock = threading.Lock()  # `loaded` and the engine's residency change together
        self.loaded: list[str] = []  # what Ray holds, in load order
        self.loads: Counter[str] = Counter()
        self.unloads: Counter[str] = Counter()
        self._seq = 0

        async def load_adapter(name: str) -> LoadedAdapter:
            return await self._load(name)

        # Decorated here rather than on the class: the number of adapters per replica is a setting.
        self.load_adapter = serve.multiplexed(max_num_models_per_replica=settings.max_adapters_per_replica)(load_adapter)

    def catalogue(self) -> dict[str, Any]:
        """The registered zoo by task, and the device: what the ingress validates against."""
        return {"tasks": self.engine.tasks(), "device": str(self.engine.backbone.device)}

    async def run(self, call: TaskCall, deadline_at: float) -> TaskOutput | APIError:
        """One task request for the adapter named by the request's multiplexed model id. `deadline_at`: wall
        clock (time.time()), so the time the request waited in Ray's router counts."""
        name = serve.get_multiplexed_model_id()
        await self.load_adapter(name)
        deadline = time.monotonic() + (deadline_at - time.time())
        try:
            return await execute(self.engine, call, deadline, {})
        except APIError as err:  # the ingress answers it
            return err
        finally:
            if name not in self.loaded:  # Ray unloaded it while this request ran, and the engine reloaded it
                if await run_in_threadpool(self._evict_unless_loaded, name):
                    await self._report()

    async def _load(self, name: str) -> LoadedAdapter:
        t0 = time.perf_counter()
        await run_in_threadpool(self._load_sync, name)
        log.info(f"replica {self.id} loaded adapter {name} in {time.perf_counter() - t0:.2f}s")
        await self._report()
        return LoadedAdapter(name, self)

    def _load_sync(self, name: str) -> None:
        with self._lock:
            try:
                self.engine.load(name)
                if self.settings.warmup:
                    self.engine.warm_up([name])
            except BaseException:
                self.engine.evict(name)  # Ray does not hold what failed to load: neither does the engine
                raise
            self.loaded.append(name)
            self.loads[name] += 1

    def unloaded(self, name: str) -> None:
        """Ray unloaded `name` (to load another): free its device memory. Reported with the next load,
        which follows at once."""
        with self._lock:
            self.engine.evict(name)
            self.loaded.remove(name)
            self.unloads[name] += 1
        log.info(f"replica {self.id} unloaded adapter {name}")

    def _evict_unless_loaded(self, name: str) -> bool:
        with self._lock:
            return name not in self.loaded and self.engine.evict(name)

    def record(self) -> dict:
        """What this replica holds: `loaded` as Ray's multiplexing keeps it, `resident` as the engine's pool
        does (the same set), and how many times each adapter was loaded and unloaded here."""
        with self._lock:
            self._seq += 1
            return {"seq": self._seq, "loaded": list(self.loaded), "resident": self.engine.pool.resident_names(),
                    "loads": dict(self.loads), "unloads": dict(self.unloads)}

    async def _report(self) -> None:
        await self.ledger.report.remote(self.id, await run_in_threadpool(self.record))


@serve.deployment
@serve.ingress()
class Gateway:
    """The HTTP front: cdd-serve's contract, each task request routed to a replica that holds its adapter."""

    async def __init__(self, settings: RayServeSettings, replicas: DeploymentHandle, ledger: DeploymentHandle):
        self.settings, self.replicas, self.ledger = settings, replicas, ledger
        self.app_name = serve.get_replica_context().app_name
        catalogue = await replicas.catalogue.remote()  # waits for a running replica
        self.tasks, self.device = catalogue["tasks"], catalogue["device"]
        self.metrics = Metrics()

    def __serve_build_asgi_app__(self) -> FastAPI:
        s = self.settings
        app = service_app(
            s, self.metrics, lambda: self.tasks,
            title="cdd-serve on Ray Serve",
            summary="Conditional diffusion distillation adapters on several backbone replicas: few-step conditional "
            "sampling, each request routed to a replica that holds its adapter.",
        )

        @app.get("/readyz", tags=["operations"], summary="the replicas are loaded (Ray routes here only then)")
        async def readyz() -> JSONResponse:
            return JSONResponse({"status": "ready", "adapters": sum(len(r) for r in self.tasks.values()),
                                 "device": self.device, "replicas": s.num_replicas})

        @app.get("/v1/tasks", tags=["tasks"], summary="tasks, their adapters, samplers, steps, sizes and the limits "
                 "(resident: on any replica)", response_model=TasksResponse, response_model_exclude_none=True)
        async def list_tasks(detail: bool = Query(False, description="add each adapter's whole manifest")) -> JSONResponse:
            records = await self.ledger.records.remote()
            return tasks_response(self.tasks, {name for r in records.values() for name in r["loaded"]}, s, detail)

        @app.post("/v1/tasks/{task}", **TASK_ROUTE)
        async def run_task(request: Request, task: str, form: TaskForm = Depends(task_form)) -> Response:
            arrival = time.monotonic()
            call = await parse_task(request, task, form, self.tasks, s)
            deadline_at = time.time() + call.budget_s - (time.monotonic() - arrival)
            handle = self.replicas.options(method_name="run", multiplexed_model_id=call.reg.name)
            try:
                out = await handle.remote(call, deadline_at)
            except BackPressureError as err:
                raise APIError(429, "queue_full", f"{s.queue_size} requests are waiting for a replica",
                               headers={"Retry-After": "1"}) from err
            if isinstance(out, APIError):
                raise out
            request.scope["cdd"]["rows"] = out.rows
            return task_response(request, call, out, arrival)

        @app.get("/v1/replicas", tags=["operations"], summary="the adapters each engine replica holds")
        async def replicas() -> dict:
            return {"replicas": await self.ledger.records.remote(), "ray": await ray_routing_view(self.app_name)}

        return app


async def ray_routing_view(app_name: str) -> dict[str, list[str]] | None:
    """Ray's own record, what its routers route on: the adapters (multiplexed model ids) each
    AdapterReplica of the application reported to the Serve controller. Read through a private Serve
    API (`_all_running_replicas`), so None when that is not reachable."""
    try:
        from ray.serve.context import _get_global_client

        client = await run_in_threadpool(_get_global_client)
        running = await client._controller._all_running_replicas.remote()
        return {
            info.replica_id.unique_id: sorted(info.multiplexed_model_ids)
            for deployment, infos in running.items()
            if deployment.app_name == app_name and deployment.name == AdapterReplica.name
            for info in infos
        }
    except Exception as e:  # noqa: BLE001 - an optional view
        log.debug(f"Ray's routing view is not reachable: {type(e).__name__}: {e}")
        return None


def build_app(args: dict[str, Any] | RayServeSettings | None = None) -> serve.Application:
    """The application. `args`: RayServeSettings fields (a Serve config's `args:`, or
    `serve run cdd.runtime.serving.ray_serve:build_app num_replicas=2 zoo=...`)."""
    if isinstance(args, RayServeSettings):
        settings = args
    else:
        args = dict(args or {})
        refused = sorted(set(args) & set(NOT_RAY_SETTINGS))
        if refused:
            raise ValueError(
                f"{', '.join(refused)}: not settings of cdd on Ray Serve (Ray's proxy listens: set http_options "
                "in the Serve config; the admin endpoints are not served)"
            )
        settings = RayServeSettings(**args)
    # The engine's worker computes while request threads do small tensor work: idle OpenMP threads must sleep
    # (as cdd-serve sets it).
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    ledger = Ledger.options(num_replicas=1, ray_actor_options={"num_cpus": 0}).bind()
    replicas = AdapterReplica.options(
        num_replicas=settings.num_replicas,
        max_ongoing_requests=settings.replica_ongoing_requests,
        max_queued_requests=settings.queue_size,
        ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": settings.replica_gpu_share,
                           "runtime_env": {"env_vars": env}},
    ).bind(settings, ledger)
    return Gateway.options(num_replicas=settings.ingress_replicas, ray_actor_options={"num_cpus": 0}).bind(
        settings, replicas, ledger
    )
