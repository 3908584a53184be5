"""The HTTP layer: parse, validate, respond. `create_app` builds the FastAPI app; its lifespan owns the
engine (started on startup, drained on shutdown: admitted requests finish).

Errors are JSON `{"error": {"code", "message"}}` with a 4xx status for anything the client sent wrong.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...adapters.zoo import MANIFEST, ZooError, list_entries
from ..diffusion.backbone import Backbone
from .conditions import condition_warning
from .engine import Engine
from .imaging import ImageError, decode, encode_png, open_image
from .metrics import Metrics
from .pool import AdapterConflict, AdapterGone, Registered
from ..diffusion.samplers import servable_samplers, split_sampler, step_task
from .scheduler import Cancelled, DeadlineExceeded, Overloaded, QueueFull, SchedulerClosed
from .settings import ServeSettings
from .tasks import (SR_SCALE, SUPER_RESOLUTION, admit, assemble, blank_work, check_fidelity, check_guidance,
                    check_strength, prompt_required, served_sr_tile,
                    starts_from_input)

access_log = logging.getLogger("cdd.serve.access")
log = logging.getLogger("cdd.serve")
MAX_SEED = 2**63 - 2  # `cm` noise uses seed + 1
MAX_PROMPT = 2000
MAX_STEPS = 4  # few-step sampling: what the adapters are distilled for


# the response models live in schemas.py; imported here, where the routes name them
from .schemas import (
    AdapterInfo,
    DeleteResponse,
    ERRORS,
    ErrorBody,
    ErrorDetail,
    Limits,
    RegisterRequest,
    RegisterResponse,
    TaskInfo,
    TaskResult,
    TasksResponse,
    Timings,
    UnavailableInfo,
)


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def __reduce__(self):  # picklable: a Ray replica hands it back to the ingress
        return APIError, (self.status, self.code, self.message, self.headers)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


DOCS_ASSETS = "/docs/assets"
DOCS_ASSET_TYPES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon.png": "image/png"}

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
              413: "payload_too_large", 415: "unsupported_media_type"}


# -- one task request: form, validation, execution, answer (cdd-serve and the Ray ingress) ----


@dataclass
class TaskForm:
    """The form of `POST /v1/tasks/{task}` as FastAPI validated it."""

    image: UploadFile
    prompt: str | None
    steps: int | None
    seed: int | None
    sampler: str | None
    adapter: str | None
    deadline_ms: float | None
    width: int | None = None
    height: int | None = None
    guidance: float | None = None
    fidelity: float | None = None
    strength: float | None = None


def task_form(
    image: UploadFile = File(..., description="the condition image (PNG, JPEG, WebP, BMP, GIF, TIFF)"),
    prompt: str | None = Form(None, max_length=MAX_PROMPT, description="text; for edit the instruction (required)"),
    steps: int | None = Form(None, ge=1, le=MAX_STEPS, description="sampling steps (default: the manifest's)"),
    seed: int | None = Form(None, ge=0, le=MAX_SEED, description="noise seed (random when absent; returned)"),
    sampler: Literal["prev", "ddim", "cm", "gd", "prev+ilvr", "ddim+ilvr", "cm+ilvr", "gd+ilvr",
                     "prev+ilvr-out", "ddim+ilvr-out", "cm+ilvr-out", "gd+ilvr-out",
                     "prev+keep", "ddim+keep", "cm+keep", "gd+keep"] | None = Form(
        None, description="few-step sampler (default: the manifest's); super-resolution also takes NAME+ilvr, the "
        "sampler with ILVR's step: every x_hat keeps the low-resolution input's block means, and NAME+ilvr-out: only "
        "the output keeps them (no autoencoder round trip per step); edit takes NAME+keep, "
        "the sampler whose output gets back the source's detail the autoencoder loses, where the edit kept it"),
    adapter: str | None = Form(None, description="zoo name, when the task has several adapters"),
    x_cdd_deadline_ms: float | None = Header(None, gt=0, description="a deadline shorter than the server's"),
    width: int | None = Form(None, ge=1, description="output width (depth, edit; a multiple of the backbone's size "
                             "factor; default: the input's aspect ratio at the adapter's pixel count)"),
    height: int | None = Form(None, ge=1, description="output height (as width)"),
    guidance: float | None = Form(None, description="classifier-free guidance weight w (0: the conditional model; "
                                  "diffusers' guidance_scale is 1 + w), for entries that take it (GET /v1/tasks: "
                                  "`guidance` [default, min, max]); still one pass per step (default: the entry's)"),
    fidelity: float | None = Form(None, description="super-resolution entries with a fidelity module (GET /v1/tasks: "
                                  "`fidelity`, the default): 0 returns the sampler's output as decoded, 1 the module's "
                                  "full correction towards the input (higher PSNR, fewer invented details); in [0, 1]"),
    strength: float | None = Form(None, gt=0, le=1, description="super-resolution and edit: the share of the noise "
                                  "schedule the run covers (diffusers' img2img strength): 1 starts from noise, 0.5 "
                                  "from the input noised to the schedule's middle (timestep 499); `steps` are taken "
                                  "over that share, so steps=1 strength=0.5 is one step from timestep 499 (diffusers: "
                                  "num_inference_steps=2, strength=0.5). Default: the entry's (GET /v1/tasks)"),
) -> TaskForm:
    return TaskForm(image, prompt, steps, seed, sampler, adapter, x_cdd_deadline_ms, width, height, guidance, fidelity,
                    strength)


TASK_ROUTE = dict(
    tags=["tasks"],
    summary="run a task on an image",
    description=(
        "Multipart form. `image`: the condition (super-resolution: the low-resolution image, output 4x; "
        "depth: the depth-condition image; edit: the image to edit). Answers image/png with X-CDD-* headers, "
        "or JSON (TaskResult) when the request sends `Accept: application/json`."
    ),
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "application/json": {"schema": TaskResult.model_json_schema()}},
                     "description": "the result"}, **ERRORS},
)


@dataclass
class TaskCall:
    """A validated task request: the adapter that serves it, its decoded condition and its parameters."""

    task: str
    reg: Registered
    cond: torch.Tensor  # [c, H, W] in [0, 1], CPU float32
    prompt: str
    steps: int
    sampler: str
    seed: int
    budget_s: float  # from arrival: not started by then is 504
    width: int | None = None
    height: int | None = None
    guidance: float | None = None  # w; None: the entry's default (or an entry that takes none)
    fidelity: float | None = None  # the fidelity weight; None: an entry without the module
    strength: float = 1.0  # 1: from noise; < 1: from the input
    warning: str | None = None  # X-CDD-Warning: the input is most likely not the task's condition
    source: tuple[int, int] | None = None  # the upload's (width, height), before any downscale on decoding


@dataclass
class TaskOutput:
    """A task's answer before it becomes an HTTP response."""

    png: bytes
    width: int
    height: int
    rows: int  # tiles (super-resolution), else 1
    tiled: bool
    resized: str | None
    queue_s: float
    execute_s: float
    batch_size: int
    batch_rows: int


async def parse_task(request: Request, task: str, form: TaskForm, tasks: dict[str, list[Registered]],
                     settings: ServeSettings, scale_factor: int = 8, size_factor: int | None = None,
                     unavailable: dict | None = None, num_train_timesteps: int | None = None) -> TaskCall:
    """Pick the adapter, fill in the manifest's defaults, check the work it asks for on the image header,
    decode the image: every 4xx a client can cause before the engine sees the request (`num_train_timesteps`:
    the backbone's, for the steps a `strength` leaves room for; None, where the backbone is elsewhere (the Ray
    ingress): the engine's `prepare` checks that with its own, a 422 all the same)."""
    reg = pick_adapter(tasks, task, form.adapter, unavailable)
    log_fields = request.scope.setdefault("cdd", {})
    log_fields["task"] = task
    prompt = form.prompt or ""
    if prompt_required(task) and not prompt.strip():
        raise APIError(422, "invalid_parameter", f"task {task!r} needs a prompt: the edit instruction")
    steps = form.steps if form.steps is not None else reg.manifest.steps
    sampler = form.sampler or reg.manifest.sampler
    if step_task(sampler) not in (None, task):
        what = ("keeps a super-resolution input's low frequencies; task {!r} has no low-resolution input"
                if step_task(sampler) == SUPER_RESOLUTION else "keeps an edit's source picture; task {!r} edits no picture")
        raise APIError(422, "invalid_parameter", f"sampler {sampler!r} {what.format(task)} "
                       f"(use {split_sampler(sampler)[0]!r})")
    seed = form.seed if form.seed is not None else secrets.randbelow(2**32)
    try:
        check_guidance(reg.name, reg.manifest.guidance, form.guidance)
    except ValueError as err:
        raise APIError(422, "invalid_parameter", str(err)) from err
    guidance = form.guidance if form.guidance is not None else reg.manifest.default_guidance(steps)
    try:
        check_fidelity(reg.name, reg.manifest.fidelity, form.fidelity)
    except ValueError as err:
        raise APIError(422, "invalid_parameter", str(err)) from err
    fidelity = form.fidelity if form.fidelity is not None else (reg.manifest.fidelity or {}).get("default")
    strength = form.strength if form.strength is not None else reg.manifest.strength
    try:
        check_strength(task, strength, steps, num_train_timesteps)
    except ValueError as err:
        raise APIError(422, "invalid_parameter", str(err)) from err
    log_fields.update(adapter=reg.name, steps=steps, seed=seed, sampler=sampler, guidance=guidance, fidelity=fidelity,
                      strength=strength)

    data = await form.image.read()
    try:  # one admission check, on the header and the form, before anything is decoded or allocated
        upload = await run_in_threadpool(open_image, data)
        plan = admit(task, upload, width=form.width, height=form.height, steps=steps, resolution=reg.resolution,
                     scale_factor=scale_factor, size_factor=size_factor or scale_factor, max_pixels=settings.max_pixels,
                     max_decode_pixels=settings.max_decode_pixels, max_work=settings.max_work,
                     overlap_fraction=settings.sr_tile_overlap, tile=served_sr_tile(settings.sr_tile, reg.resolution))
        cond = await run_in_threadpool(decode, upload, reg.channels, plan.decode_pixels)
    except ImageError as err:
        raise APIError(err.status, err.code, str(err)) from err
    warning = await run_in_threadpool(condition_warning, task, cond, data)
    budget = settings.request_deadline_s
    if form.deadline_ms is not None:
        budget = min(budget, form.deadline_ms / 1000)
    return TaskCall(task, reg, cond, prompt, steps, sampler, seed, budget, form.width, form.height, guidance=guidance,
                    fidelity=fidelity, strength=strength, warning=warning, source=(upload.width, upload.height))


async def execute(e: Engine, call: TaskCall, deadline: float, log_fields: dict,
                  client_gone: Callable[[], Any] | None = None) -> TaskOutput:
    """Prepare the rows, run them on the engine (504 when `deadline`, monotonic, passes before they start),
    blend and encode the answer. `client_gone`: an awaitable that returns when the client disconnects;
    the request is then cancelled."""
    try:
        work = await run_in_threadpool(e.prepare, call.reg, call.cond, steps=call.steps, sampler=call.sampler,
                                       seed=call.seed, prompt=call.prompt, width=call.width, height=call.height,
                                       guidance=call.guidance, fidelity=call.fidelity, strength=call.strength)
    except ValueError as err:  # a width or height the backbone cannot take
        raise APIError(422, "invalid_parameter", str(err)) from err
    if work.layout is None and work.size[0] * work.size[1] > e.settings.max_pixels:
        raise APIError(422, "invalid_parameter", f"the output {work.size[1]}x{work.size[0]} is over the limit of "
                       f"{e.settings.max_pixels} pixels")
    if work.layout is None and call.source is not None and call.source != work.size[::-1]:
        work.resized = f"{call.source[0]}x{call.source[1]}->{work.size[1]}x{work.size[0]}"  # what the client sent
    log_fields["rows"] = work.rows
    result = await _run(e, work, deadline, client_gone)
    png = await run_in_threadpool(lambda: encode_png(assemble(work, result.rows)))
    width, height = work.layout.out if work.layout else work.size[::-1]
    return TaskOutput(png, width, height, work.rows, work.layout is not None, work.resized, result.queue_s,
                      result.execute_s, result.batch_size, result.batch_rows)


def task_response(request: Request, call: TaskCall, out: TaskOutput, arrival: float) -> Response:
    """The PNG with its X-CDD-* headers, or the JSON TaskResult when the client accepts JSON."""
    timings = Timings(queue_ms=out.queue_s * 1e3, execute_ms=out.execute_s * 1e3,
                      total_ms=(time.monotonic() - arrival) * 1e3, batch_size=out.batch_size, batch_rows=out.batch_rows)
    request.scope.setdefault("cdd", {}).update(queue_ms=round(timings.queue_ms, 2),
                                               execute_ms=round(timings.execute_ms, 2), batch_size=out.batch_size)
    headers = {
        "X-CDD-Adapter": call.reg.name, "X-CDD-Steps": str(call.steps), "X-CDD-Seed": str(call.seed),
        "X-CDD-Sampler": call.sampler,
        "Server-Timing": f"queue;dur={timings.queue_ms:.2f}, execute;dur={timings.execute_ms:.2f}, total;dur={timings.total_ms:.2f}",
    }
    if call.guidance is not None:
        headers["X-CDD-Guidance"] = f"{call.guidance:g}"
    if call.fidelity is not None:
        headers["X-CDD-Fidelity"] = f"{call.fidelity:g}"
    if call.strength != 1:
        headers["X-CDD-Strength"] = f"{call.strength:g}"
    if out.resized:
        headers["X-CDD-Resized"] = out.resized
    if out.tiled:
        headers["X-CDD-Tiles"] = str(out.rows)
    if call.warning:
        headers["X-CDD-Warning"] = call.warning
    if "application/json" in request.headers.get("accept", ""):
        body = TaskResult(image=base64.b64encode(out.png).decode(), task=call.task, adapter=call.reg.name,
                          steps=call.steps, seed=call.seed, sampler=call.sampler, width=out.width, height=out.height,
                          resized=out.resized, tiles=out.rows, guidance=call.guidance, fidelity=call.fidelity,
                          strength=call.strength,
                          warning=call.warning,
                          timings=timings)
        return JSONResponse(body.model_dump(), headers=headers)
    return Response(out.png, media_type="image/png", headers=headers)


async def disconnected(request: Request) -> None:
    """Returns when the client has gone (after the body was read, `receive` only answers that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def tasks_response(tasks: dict[str, list[Registered]], resident: set[str], settings: ServeSettings,
                   detail: bool = False, unavailable=()) -> JSONResponse:
    """What a client needs to build a request (names, tasks, steps, samplers, sizes, limits, entries not served
    and why); `detail` adds each adapter's whole manifest (its diffusers architecture config: tens of KB)."""
    out = []
    for task, regs in sorted(tasks.items()):
        infos = [_info(r, r.name in resident, detail) for r in regs]
        sr = task == SUPER_RESOLUTION
        out.append(TaskInfo(task=task, default_adapter=regs[0].name, prompt_required=prompt_required(task),
                            samplers=list(servable_samplers(task)), steps=list(range(1, MAX_STEPS + 1)),
                            upscale=SR_SCALE if sr else None, takes_width_height=not sr,
                            starts_from_input=starts_from_input(task), adapters=infos))
    limits = Limits(max_pixels=settings.max_pixels, max_decode_pixels=settings.max_decode_pixels,
                    max_work=settings.max_work, max_upload_mb=settings.max_upload_mb, max_prompt=MAX_PROMPT)
    gone = [UnavailableInfo(name=u.name, task=u.task, reason=u.reason) for u in unavailable]
    return JSONResponse(TasksResponse(tasks=out, limits=limits, unavailable=gone).model_dump(exclude_none=True))


def service_app(settings: ServeSettings, metrics: Metrics, known_tasks: Callable[[], dict | None], *, title: str,
                summary: str, lifespan=None) -> FastAPI:
    """What every front end of the engine shares: the FastAPI app with its body limit, access log, JSON
    errors, playground, API page (/docs, offline), /healthz and /metrics. `known_tasks()`: the served
    tasks (None while starting)."""
    # FastAPI's own /docs loads Swagger UI from a CDN, so the page is blank offline; the routes below serve
    # it from the fastapi-offline package instead (as APIRoutes, which also gives them a metrics label).
    # redirect_slashes off: the redirect would be built from the client's Host header
    app = FastAPI(title=title, summary=summary, version=_version(), lifespan=lifespan, openapi_url=None,
                  docs_url=None, redoc_url=None, redirect_slashes=False,
                  openapi_tags=[{"name": "tasks"}, {"name": "operations"}, {"name": "admin"}])
    app.state.settings, app.state.metrics = settings, metrics
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(AccessLog, metrics=metrics)
    _install_error_handlers(app, known_tasks)
    static = files("cdd.runtime.serving") / "static"
    playground = (static / "index.html").read_text()
    examples = json.loads((static / "examples.json").read_text())
    example_files = {e["image"] for e in examples["examples"].values()}

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(playground)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response((static / "favicon.png").read_bytes(), media_type="image/png",
                        headers={"Cache-Control": "max-age=86400"})

    @app.get("/examples", include_in_schema=False)
    async def example_list() -> JSONResponse:  # the playground's "Use an example": an input per task
        return JSONResponse(examples)

    @app.get("/examples/{name}", include_in_schema=False)
    async def example(name: str) -> Response:
        if name not in example_files:
            raise APIError(404, "not_found", f"no example {name!r}; GET /examples lists them")
        return Response((static / name).read_bytes(), media_type="image/png")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json", title=f"{title} API", swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css", swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from swagger.io
        )

    @app.get(DOCS_ASSETS + "/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> FileResponse:
        if name not in DOCS_ASSET_TYPES:
            raise APIError(404, "not_found", f"no docs asset {name!r}")
        return FileResponse(Path(str(files("fastapi_offline") / "static" / name)), media_type=DOCS_ASSET_TYPES[name])

    @app.get("/healthz", tags=["operations"], summary="the process is alive")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.head("/healthz", include_in_schema=False)
    async def healthz_head() -> Response:
        return Response(headers={"Content-Type": "application/json"})

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


# -- the app ---------------------------------------------------------------------------------


def create_app(settings: ServeSettings | None = None, *, backbone: Backbone | None = None) -> FastAPI:
    """The service. `backbone`: an already loaded backbone to serve instead of `settings.backbone`."""
    settings = settings or ServeSettings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = getattr(app.state, "engine", None)  # started already by start_engine (cdd-serve)
        if engine is None:
            engine = Engine(settings, backbone=backbone, metrics=metrics)
            await run_in_threadpool(engine.start)
            app.state.engine = engine
        log.info("serving", extra={"fields": {"settings": settings.public()}})
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop, True, settings.drain_s)
            if engine.ready:  # the drain ran out of time: what is still queued fails, the process exits
                log.warning(f"the shutdown drain ran out after {settings.drain_s:g} s; failing the requests still queued")
                await run_in_threadpool(engine.stop, False, 0)

    def known_tasks() -> dict | None:
        e = getattr(app.state, "engine", None)
        return e.tasks() if e is not None else None

    app = service_app(
        settings, metrics, known_tasks,
        title="cdd-serve",
        summary="Conditional diffusion distillation adapters on one resident backbone: few-step conditional sampling.",
        lifespan=lifespan,
    )
    app.state.new_engine = lambda: Engine(settings, backbone=backbone, metrics=metrics)

    def engine() -> Engine:
        return app.state.engine

    # -- operations ----------------------------------------------------------------------

    @app.get("/readyz", tags=["operations"], summary="the backbone is loaded and warmed up",
             responses={503: {"description": "starting or warm-up failed"}})
    async def readyz() -> JSONResponse:
        e = engine()
        unavailable = {u.name: u.reason for u in e.unavailable.values()}
        if e.warmup_error:
            return JSONResponse({"status": "warm-up failed", "error": e.warmup_error}, status_code=503)
        if not e.ready:
            return JSONResponse({"status": "warming up"}, status_code=503)
        if not e.servable():
            return JSONResponse({"status": "no servable adapters", "unavailable": unavailable}, status_code=503)
        return JSONResponse({"status": "ready", "adapters": len(e.pool.entries()), "device": str(e.backbone.device),
                             "unavailable": unavailable})

    # -- tasks ---------------------------------------------------------------------------

    @app.get("/v1/tasks", tags=["tasks"], summary="tasks, their adapters, samplers, steps, sizes and the limits",
             response_model=TasksResponse, response_model_exclude_none=True)
    async def list_tasks(detail: bool = Query(False, description="add each adapter's whole manifest")) -> JSONResponse:
        e = engine()
        return tasks_response(e.tasks(), set(e.pool.resident_names()), settings, detail, e.unavailable.values())

    @app.post("/v1/tasks/{task}", **TASK_ROUTE)
    async def run_task(request: Request, task: str, form: TaskForm = Depends(task_form)) -> Response:
        arrival = time.monotonic()
        e = engine()
        call = await parse_task(request, task, form, e.tasks(), settings, e.backbone.vae_scale_factor,
                                e.backbone.size_factor, e.unavailable, e.backbone.schedule.num_train_timesteps)
        out = await execute(e, call, arrival + call.budget_s, request.scope["cdd"], lambda: disconnected(request))
        return task_response(request, call, out, arrival)

    # -- admin ---------------------------------------------------------------------------

    def require_admin(
        authorization: str | None = Header(None, description="Bearer API key"),
        x_api_key: str | None = Header(None, description="the API key (alternative to Authorization)"),
    ) -> None:
        if settings.api_key is None:
            raise APIError(403, "admin_disabled", "admin endpoints are disabled: the server has no API key (set CDD_API_KEY)")
        given = x_api_key
        if authorization and authorization.lower().startswith("bearer "):
            given = authorization[7:].strip()
        if not given:
            raise APIError(401, "unauthorized", "admin endpoints need the API key: Authorization: Bearer KEY",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.encode(), settings.api_key.get_secret_value().encode()):
            raise APIError(403, "forbidden", "the API key is not valid")

    @app.post("/v1/adapters", tags=["admin"], status_code=201, dependencies=[Depends(require_admin)],
              summary="register a zoo entry (or every entry of a zoo folder), verified against the backbone",
              responses={s: {"model": ErrorBody} for s in (401, 403, 409, 422)})
    async def register(body: RegisterRequest) -> RegisterResponse:
        e = engine()
        path = Path(body.path)
        try:
            if (path / MANIFEST).is_file():
                paths = [path]
            elif path.is_dir():
                # only folders with a manifest are entries: an error never lists a folder's other contents
                entries = [(p, m) for p, m in list_entries(path) if (p / MANIFEST).is_file()]
                bad = [f"{p.name}: {m}" for p, m in entries if isinstance(m, ZooError)]
                if bad:
                    raise APIError(422, "invalid_zoo_entry", "; ".join(bad))
                paths = [p for p, _ in entries]
            else:
                raise APIError(422, "invalid_zoo_entry", "the path is not a zoo entry or zoo folder (no such folder)")
        except OSError as err:
            raise APIError(422, "invalid_zoo_entry", f"the path cannot be read: {err.strerror or type(err).__name__}") from err
        if not paths:
            raise APIError(422, "invalid_zoo_entry", "the folder holds no zoo entries (folders with a manifest.json)")
        registered = []
        for p in paths:
            try:
                reg = await run_in_threadpool(e.register, p)
            except AdapterConflict as err:
                raise APIError(409, "adapter_exists", str(err)) from err
            except ZooError as err:
                raise APIError(422, "invalid_zoo_entry", str(err)) from err
            try:  # loaded and run once before it is announced: an entry that cannot serve is refused now
                await run_in_threadpool(_run_once, e, reg, settings.request_deadline_s)
            except Exception as err:  # noqa: BLE001 - whatever it is, the entry cannot serve
                e.unavailable.pop(reg.name, None)  # refused, not part of the zoo served
                try:  # with what it allocated (its architecture's module, when it was the only one)
                    await run_in_threadpool(e.unregister, reg.name)
                except AdapterGone:
                    pass  # the engine has already isolated it
                raise APIError(422, "invalid_zoo_entry", f"zoo entry {p.name} ({reg.name}) was verified but does not "
                               f"run: {type(err).__name__}: {str(err)[:500]}") from err
            registered.append(reg)
        log.info("registered adapters", extra={"fields": {"adapters": [r.name for r in registered]}})
        return RegisterResponse(registered=[_info(r, False) for r in registered])

    @app.delete("/v1/adapters/{name}", tags=["admin"], dependencies=[Depends(require_admin)],
                summary="unregister an adapter (and free its device memory)",
                responses={s: {"model": ErrorBody} for s in (401, 403, 404)})
    async def unregister(name: str) -> DeleteResponse:
        try:
            await run_in_threadpool(engine().unregister, name)
        except AdapterGone as err:
            raise APIError(404, "unknown_adapter", f"no adapter named {name!r} is registered") from err
        log.info("unregistered adapter", extra={"fields": {"adapter": name}})
        return DeleteResponse(deleted=name)

    return app


def start_engine(app: FastAPI) -> Engine:
    """Load the backbone and the zoo of a `create_app` app before its server starts (its lifespan then
    uses this engine): a zoo that cannot be served is an EngineError to report in one line, not a
    traceback from the server's startup."""
    engine = app.state.new_engine()
    engine.start()
    app.state.engine = engine
    return engine


def _run_once(e: Engine, reg: Registered, timeout: float) -> None:
    """Sample one blank row with the entry (through the queue, like any request); raise when that fails
    or gives non-finite values."""
    work = blank_work(reg.name, reg.task, reg.resolution, reg.channels, e.backbone.model_channels,
                      e.backbone.vae_scale_factor, reg.manifest.steps, reg.manifest.sampler)
    job = e.submit(work)  # no deadline: admission does not refuse it under load, the wait below is bounded
    try:
        result = job.future.result(timeout)
    except TimeoutError:
        e.scheduler.cancel(job)
        raise
    if not torch.isfinite(result.rows).all():
        raise ValueError("its output has non-finite values")


def pick_adapter(tasks: dict[str, list[Registered]], task: str, name: str | None,
                 unavailable: dict | None = None) -> Registered:
    """The adapter that serves `task` (`name`, or the task's default); 503 `adapter_unavailable` when the
    entry asked for, or every entry of the task, is in the zoo but cannot be served (engine.Unavailable)."""
    regs = tasks.get(task)
    down = [u for u in (unavailable or {}).values() if u.task == task and (name is None or u.name == name)]
    if down and (not regs or name is not None and all(r.name != name for r in regs)):
        raise APIError(503, "adapter_unavailable", "; ".join(f"zoo entry {u.name} of task {task!r} is not served: "
                                                              f"{u.reason}" for u in down))
    if not regs:
        known = ", ".join(sorted(tasks)) or "none"
        raise APIError(404, "unknown_task", f"no adapter serves task {task!r}; tasks: {known}")
    if name is None:
        return regs[0]
    for reg in regs:
        if reg.name == name:
            return reg
    raise APIError(422, "invalid_parameter",
                   f"adapter {name!r} does not serve task {task!r}; choose one of {', '.join(r.name for r in regs)}")


async def _run(e: Engine, work, deadline: float, client_gone: Callable[[], Any] | None = None):
    """Queue the work and wait for it; 504 when its deadline passes before it starts (once started it
    finishes); cancelled when the client goes away (`client_gone` returns) or the handler is cancelled."""
    try:
        job = e.submit(work, deadline)
    except Overloaded as err:
        raise APIError(429, "overloaded", str(err), headers={"Retry-After": str(err.retry_after)}) from err
    except QueueFull as err:
        raise APIError(429, "queue_full", str(err), headers={"Retry-After": str(err.retry_after)}) from err
    except DeadlineExceeded as err:
        raise APIError(504, "deadline_exceeded", "the request's deadline passed before it was queued") from err
    except SchedulerClosed as err:
        raise APIError(503, "shutting_down", str(err), headers={"Retry-After": "5"}) from err
    fut = asyncio.wrap_future(job.future)
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even when we stop waiting
    gone = asyncio.ensure_future(client_gone()) if client_gone is not None else None
    if gone is not None:
        gone.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        try:
            shielded = asyncio.shield(fut)  # its own exception, when it has one, is retrieved too
            shielded.add_done_callback(lambda f: f.cancelled() or f.exception())
            waiting = {shielded} | ({gone} if gone else set())
            done, _ = await asyncio.wait(waiting, timeout=max(deadline - time.monotonic(), 0.0),
                                         return_when=asyncio.FIRST_COMPLETED)
            if gone is not None and gone in done and not fut.done():
                e.scheduler.cancel(job, Cancelled("the client went away"))
                raise APIError(499, "client_closed", "the client went away before the answer")
            if not done:
                if e.scheduler.cancel(job):
                    raise DeadlineExceeded(time.monotonic() - job.enqueued)
                job.cancelled = False  # it started before the deadline: let it finish
            return await fut
        except asyncio.CancelledError:  # the server stops waiting (shutdown): so does the queue
            e.scheduler.cancel(job, Cancelled("the server stopped waiting for this request"))
            raise
        finally:
            if gone is not None:
                gone.cancel()
    except DeadlineExceeded as err:
        raise APIError(504, "deadline_exceeded", str(err)) from err
    except AdapterGone as err:
        raise APIError(410, "adapter_gone", f"adapter {work.adapter!r} was unregistered while the request waited") from err
    except SchedulerClosed as err:  # still queued when the shutdown drain ended
        raise APIError(503, "shutting_down", str(err), headers={"Retry-After": "5"}) from err
    except ZooError as err:  # its weights failed to load: the engine no longer serves the entry
        raise APIError(503, "adapter_unavailable", f"zoo entry {work.adapter} is not served: it failed to load") from err


def _info(reg: Registered, resident: bool, detail: bool = True) -> AdapterInfo:
    m = reg.manifest
    return AdapterInfo(name=reg.name, task=reg.task, kind=m.kind, mode=m.mode, steps=m.steps, sampler=m.sampler,
                       resolution=reg.resolution, channels=reg.channels, backbone_lora=m.backbone_lora is not None,
                       resident=resident, guidance=list(m.guidance) if m.guidance else None,
                       guidance_steps=m.guidance_steps,
                       fidelity=m.fidelity["default"] if m.fidelity else None, strength=m.strength,
                       manifest=m.public() if detail else None)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cdd-zoo")
    except PackageNotFoundError:
        return "0"


def _install_error_handlers(app: FastAPI, known_tasks: Callable[[], dict | None]) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(err.status, err.code, err.message, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
        if err.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(err.status_code, HTTP_CODES.get(err.status_code, "http_error"), message,
                              dict(err.headers) if err.headers else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        task = request.path_params.get("task")
        tasks = known_tasks() if task is not None else None
        if tasks is not None and task not in tasks:
            known = ", ".join(sorted(tasks)) or "none"
            return error_response(404, "unknown_task", f"no adapter serves task {task!r}; tasks: {known}")
        parts = []
        for e in err.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "header", "query", "path"))
            parts.append(f"{where or 'request'}: {e.get('msg')}" + (f" (got {e['input']!r})" if _short(e.get("input")) else ""))
        message = "; ".join(parts)
        if task is not None and any(tuple(e.get("loc", ()))[-1:] == ("image",) for e in err.errors()):
            message += ". " + await _form_hint(request)
        return error_response(422, "invalid_parameter", message)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=err)
        return error_response(500, "internal", f"internal error: {type(err).__name__}")


TASK_FORM_FIELDS = ("prompt", "steps", "seed", "sampler", "adapter", "width", "height", "guidance", "fidelity",
                    "strength")


async def _form_hint(request: Request) -> str:
    """What POST /v1/tasks/{task} takes, beside what this request sent: for a missing or misnamed image."""
    expected = (f"{request.url.path} takes a multipart/form-data form with the condition image as a file field "
                f"named 'image' (optional fields: {', '.join(TASK_FORM_FIELDS)}), e.g. "
                f"curl -F image=@condition.png http://SERVER{request.url.path}")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        return f"{expected}; this request's body is {kind or 'untyped'}" + (
            " (a JSON body is not read)" if kind == "application/json" else "")
    form = await request.form()  # parsed already for the route: this is FastAPI's cached copy
    fields = [f"{k!r} ({'text' if isinstance(v, str) else 'file'})" for k, v in form.multi_items()]
    return f"{expected}; this form has " + (", ".join(fields) if fields else "no fields")


def _short(value) -> bool:
    return isinstance(value, (int, float, str)) and len(str(value)) <= 80


class BodyLimit:
    """413 for a request body over `max_bytes`: at once from Content-Length, else while it streams in
    (raised as an HTTPException from `receive`, which FastAPI's body reading passes on as it is)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _message(self) -> str:
        return f"the request body is larger than {self.max_bytes / 1024 / 1024:g} MiB"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(413, "payload_too_large", self._message(), {"Connection": "close"})
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)


class AccessLog:
    """One JSON log line and one metrics count per request (pure ASGI middleware)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        status = {"code": 500}
        fields = scope.setdefault("cdd", {})

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            seconds = time.monotonic() - t0
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status["code"])).inc()
            if "task" in fields:
                self.metrics.request_latency.labels(fields["task"]).observe(seconds)
            client = scope.get("client")
            access_log.info(
                "request",
                extra={"fields": {
                    "method": scope["method"], "path": scope["path"], "route": route, "status": status["code"],
                    "duration_ms": round(seconds * 1e3, 2), "client": client[0] if client else None, **fields,
                }},
            )
