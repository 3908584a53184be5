"""The HTTP API's response models (the OpenAPI schema at /docs) and the error statuses every route declares."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class AdapterInfo(BaseModel):
    name: str
    task: str
    kind: str
    mode: str
    steps: int = Field(description="default steps")
    sampler: str = Field(description="default sampler")
    resolution: int
    channels: int
    backbone_lora: bool
    resident: bool
    guidance: list[float] | None = Field(None, description="[default, min, max] of the classifier-free guidance "
                                         "weight w the entry takes (controlnet-guided); null: it takes none")
    guidance_steps: dict[str, float] | None = Field(None, description="the default w for a step count where it "
                                                    "differs from the entry's default, e.g. {\"1\": 0}; null: none")
    fidelity: float | None = Field(None, description="the default fidelity weight in [0, 1] of the entry's fidelity "
                                   "module (super-resolution); null: it has none")
    strength: float = Field(1.0, description="the share of the noise schedule a request runs when it gives none: 1 "
                            "from noise, < 1 from the input (super-resolution, edit)")
    manifest: dict[str, Any] | None = Field(None, description="the whole manifest (GET /v1/tasks?detail=true)")


class TaskInfo(BaseModel):
    task: str
    default_adapter: str
    prompt_required: bool
    samplers: list[str] = Field(description="the samplers this task takes")
    steps: list[int] = Field(description="the step counts a request may ask for")
    upscale: int | None = Field(None, description="output size / input size (super-resolution), when fixed")
    takes_width_height: bool = Field(description="whether width and height set the output size")
    starts_from_input: bool = Field(False, description="whether a request may start from its input (strength < 1): "
                                    "the input is a picture of the output (super-resolution, edit)")
    adapters: list[AdapterInfo]


class Limits(BaseModel):
    max_pixels: int = Field(description="most pixels a task computes on (super-resolution: its input)")
    max_decode_pixels: int = Field(description="largest image decoded (depth and edit resize it)")
    max_work: int = Field(description="most tile-steps per request: rows x steps, a super-resolution row counted in "
                          "tiles of the adapter's resolution (tasks.task_work)")
    max_upload_mb: float
    max_prompt: int = Field(description="characters")


class UnavailableInfo(BaseModel):
    name: str
    task: str | None
    reason: str


class TasksResponse(BaseModel):
    tasks: list[TaskInfo]
    limits: Limits
    unavailable: list[UnavailableInfo] = Field(default_factory=list, description="zoo entries not served, and why")


class Timings(BaseModel):
    queue_ms: float = Field(description="waiting in the queue for a batch")
    execute_ms: float = Field(description="the batch's device time (text, sampling, decoding)")
    total_ms: float = Field(description="arrival to response")
    batch_size: int = Field(description="requests in the batch")
    batch_rows: int = Field(description="images or tiles in the batch")


class TaskResult(BaseModel):
    image: str = Field(description="the result, base64 PNG")
    task: str
    adapter: str
    steps: int
    seed: int
    sampler: str
    width: int
    height: int
    resized: str | None = Field(None, description="WxH->wxh when the condition was resized")
    tiles: int = Field(description="tiles sampled (super-resolution), else 1")
    guidance: float | None = Field(None, description="the guidance weight w served (controlnet-guided entries)")
    fidelity: float | None = Field(None, description="the fidelity weight served (super-resolution entries with a "
                                   "fidelity module)")
    strength: float = Field(1.0, description="the share of the noise schedule run: 1 from noise, < 1 from the input")
    warning: str | None = Field(None, description="why the input is most likely not the task's condition")
    timings: Timings


class RegisterRequest(BaseModel):
    path: str = Field(min_length=1, max_length=4096, pattern=r"^[^\x00]*$",
                      description="a zoo entry folder (with manifest.json), or a zoo folder of entries")


class RegisterResponse(BaseModel):
    registered: list[AdapterInfo]


class DeleteResponse(BaseModel):
    deleted: str


ERRORS = {s: {"model": ErrorBody} for s in (400, 404, 413, 415, 422, 429, 503, 504)}
