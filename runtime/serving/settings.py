"""Every setting of `cdd-serve`, read here and nowhere else: flags override `CDD_*` environment
variables, which override the defaults below (pydantic-settings).

torch is imported where a setting is resolved, not with this module: `cdd-serve --help` and `cdd-zoo`
do not pay for it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def __getattr__(name: str):
    if name == "DTYPES":  # {name: torch dtype}, made on first use
        import torch

        return {n: getattr(torch, n) for n in DTYPE_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_user_zoo() -> Path:
    """$XDG_DATA_HOME/cdd/zoo, by default ~/.local/share/cdd/zoo."""
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "cdd" / "zoo"


class ZooSettings(BaseSettings):
    """Which zoo folders `cdd-serve` serves and `cdd-zoo` reads and installs into. Environment: `CDD_ZOO`,
    `CDD_USER_ZOO`."""

    model_config = SettingsConfigDict(env_prefix="CDD_", extra="ignore", validate_default=True)

    zoo: Path | None = Field(
        None, description="the zoo folder of adapter entries to serve (default: the user zoo, then the embedded zoo)"
    )
    user_zoo: Path = Field(
        default_factory=default_user_zoo,
        description="where `cdd-zoo install` puts entries when no zoo is named; served beside the embedded zoo "
        "when no zoo is named (default: $XDG_DATA_HOME/cdd/zoo, i.e. ~/.local/share/cdd/zoo)",
    )

    def zoo_dir(self) -> Path:
        """The named zoo, else the embedded one (which must exist; the user zoo is optional)."""
        from ...adapters.zoo import default_zoo_dir

        return Path(self.zoo) if self.zoo is not None else default_zoo_dir()

    def zoo_dirs(self) -> list[Path]:
        """The zoo folders served, in order: the named zoo alone, else the user zoo (when it exists) and the
        embedded zoo. An entry of the user zoo shadows an embedded entry of the same name."""
        if self.zoo is not None:
            return [Path(self.zoo)]
        user = Path(self.user_zoo).expanduser()
        return ([user] if user.is_dir() else []) + [self.zoo_dir()]

    def install_dir(self) -> Path:
        """Where an entry is installed when no zoo is named: the zoo cdd-serve serves (CDD_ZOO), else the user zoo."""
        return Path(self.zoo) if self.zoo is not None else Path(self.user_zoo).expanduser()


class ServeSettings(ZooSettings):
    """Settings of the serving runtime. Environment: `CDD_<FIELD>` (e.g. `CDD_MAX_BATCH=8`)."""

    model_config = SettingsConfigDict(env_prefix="CDD_", extra="forbid", validate_default=True)

    backbone: Path | None = Field(None, description="diffusers backbone folder (default: the embedded backbone)")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, ...")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights and activations dtype")

    batching: Literal["auto", "step", "request"] = Field(
        "auto",
        description="step: step-level continuous batching, one backbone call per denoising step serves every row in "
        "flight whatever its task, adapter, steps or sampler, and new requests join at the next step; request: the "
        "older per-adapter batching, a batch of one adapter, steps and sampler runs its whole loop before the next; "
        "auto: step on CUDA, request on a CPU (where a call's cost grows with its rows, so sharing a call gains "
        "nothing and stretches every request: measured in docs/serving.md)",
    )
    max_batch: int = Field(4, ge=1, le=256, description="rows (images or tiles) per executed batch (rows in flight)")
    max_wait_ms: float = Field(10.0, ge=0, le=10_000, description="how long a batch waits for more requests, "
                               "only while fewer are queued than the recent traffic had at once (a lone request on "
                               "an idle engine starts at once)")
    exact_batching: bool = Field(
        False,
        description="execute every batch at exactly max_batch rows (zero-padded), so a request's bytes do not "
        "depend on what it was batched with; false: buckets that fit the device (every size on a CPU, powers of "
        "two on CUDA, where each bucket is a captured graph), less padding, last-bit differences",
    )
    queue_size: int = Field(64, ge=1, le=100_000, description="requests admitted and waiting; more get 429")
    request_deadline_s: float = Field(60.0, gt=0, description="a request not started by then gets 504")
    drain_s: float = Field(30.0, ge=0, description="on shutdown, how long admitted requests may take to finish; "
                           "then those still queued fail with 503 and the process exits")

    max_pixels: int = Field(256 * 256, ge=1, description="most input pixels (width * height) a task computes on; "
                            "super-resolution refuses more with 413, tasks that resize (depth, edit) downscale to it")
    max_decode_pixels: int = Field(4096 * 4096, ge=1, description="decode-safety limit: most pixels an upload may "
                                   "have at all (checked on its header, before decoding); more get 413")
    max_work: int = Field(
        512, ge=1, description="most work one request may ask for, in tile-steps (one denoising step of one row at the "
        "adapter's resolution: super-resolution tiles x steps, other tasks steps), checked on the image header before "
        "anything is decoded; more get 413 (512: a 128x128 super-resolution input, 25 tiles of 128 px, 400 at 4 steps)"
    )
    max_upload_mb: float = Field(16.0, gt=0, description="largest request body in MiB; more gets 413")
    sr_tile_overlap: float = Field(0.25, ge=0.0, lt=1.0, description="super-resolution tile overlap, fraction of a tile")
    sr_tile: int | None = Field(None, ge=8, le=4096, description="super-resolution tile side in output pixels, a "
                                "multiple of the backbone's size factor (default: twice the adapter's resolution; an "
                                "output that fits in one adapter-resolution tile is always sampled as one)")
    sr_blend: Literal["latent", "pixels"] = Field(
        "latent", description="how super-resolution tiles of one image are blended: latent, their estimates averaged "
        "where they overlap at every denoising step (one consistent latent, no seams); pixels, sampled independently "
        "and blended once in pixels (the older way, kept for comparison)")

    memory_budget_mb: float = Field(2048.0, ge=0, description="device memory for resident adapters (LRU), MiB")
    cuda_graphs: bool = Field(True, description="capture the sampling loop as CUDA graphs (CUDA devices only)")
    graph_debug: bool = Field(False, description="check captured data pointers before every graph replay")
    warmup: bool = Field(True, description="run every adapter architecture once before /readyz says ready")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (cdd-serve sets them; default: torch's)")

    api_key: SecretStr | None = Field(None, description="enables the admin endpoints (Authorization: Bearer KEY)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    max_header_kb: int = Field(32, ge=1, le=1024, description="largest request head (request line and headers), "
                               "KiB; more is refused with 431 and the connection closed")
    read_timeout_s: float = Field(20.0, gt=0, description="a connection that has not sent a whole request (head "
                                  "and body) this many seconds after it opened, or after its last answer, is closed")
    write_timeout_s: float = Field(30.0, gt=0, description="a client that reads none of an answer for this many "
                                   "seconds (the send buffer full) is disconnected")
    idle_timeout_s: float = Field(5.0, gt=0, description="an idle keep-alive connection is closed after this many "
                                  "seconds")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        import torch

        try:
            torch.device(value)
        except RuntimeError as e:
            raise ValueError(f"device {value!r} is not a torch device: {e}") from e
        return value

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            return None  # CDD_API_KEY="" means no key, not an empty key anyone could send
        return value

    def backbone_dir(self) -> Path:
        from ...adapters.zoo import default_backbone_dir

        return Path(self.backbone) if self.backbone is not None else default_backbone_dir()

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    @property
    def torch_device(self) -> torch.device:
        import torch

        return torch.device(self.device)

    @property
    def batching_mode(self) -> str:
        """`batching` with auto resolved for the device: "step" or "request"."""
        if self.batching != "auto":
            return self.batching
        return "step" if self.torch_device.type == "cuda" else "request"

    @property
    def use_cuda_graphs(self) -> bool:
        return self.cuda_graphs and self.torch_device.type == "cuda"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_mb * 1024 * 1024)

    def batch_buckets(self) -> tuple[int, ...]:
        """The batch sizes a batch is executed at (padded up to the smallest that fits). On a CPU every size
        is its own bucket (nothing to capture, so padding would only cost); on CUDA powers of two, each a
        captured graph."""
        if self.exact_batching:
            return (self.max_batch,)
        if self.torch_device.type != "cuda":
            return tuple(range(1, self.max_batch + 1))
        sizes, b = [], 1
        while b < self.max_batch:
            sizes.append(b)
            b *= 2
        return (*sizes, self.max_batch)

    def public(self) -> dict:
        """The settings as JSON, the API key masked (for logs and --print-settings)."""
        data = self.model_dump(mode="json")
        data["api_key"] = "***" if self.api_key is not None else None
        data["backbone"], data["zoo"] = str(self.backbone_dir()), str(self.zoo_dir())
        data["user_zoo"], data["zoos"] = str(self.user_zoo), [str(z) for z in self.zoo_dirs()]
        return data


class RayServeSettings(ServeSettings):
    """The settings of cdd-serve on Ray Serve (`cdd.runtime.serving.ray_serve:build_app`): every `ServeSettings`
    field except host, port and api_key (Ray's proxy listens; the admin endpoints are not served), plus
    how the deployment is laid out. Given as the application's `args` in a Serve config; `CDD_<FIELD>`
    environment variables are read where the application is built."""

    num_replicas: int = Field(2, ge=1, description="engine replicas, each with its own backbone and adapter pool")
    max_adapters_per_replica: int = Field(
        3, ge=1, description="adapters a replica keeps loaded (Ray's multiplexed LRU); loading one more unloads the "
        "least recently used"
    )
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="requests a replica runs or queues at once; at this many it is busy and Ray routes "
        "elsewhere or waits (default: 2 * max_batch)"
    )
    replica_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per engine replica")
    replica_gpus: float | None = Field(None, ge=0, description="GPUs Ray reserves per engine replica (default: 1 on "
                                       "a CUDA device, else 0; 0.5 puts two replicas on one GPU)")
    ingress_replicas: int = Field(1, ge=1, description="HTTP ingress replicas (parse, validate, route; no model)")

    @property
    def replica_ongoing_requests(self) -> int:
        return self.max_ongoing_requests if self.max_ongoing_requests is not None else 2 * self.max_batch

    @property
    def replica_gpu_share(self) -> float:
        if self.replica_gpus is not None:
            return self.replica_gpus
        return 1.0 if self.torch_device.type == "cuda" else 0.0
