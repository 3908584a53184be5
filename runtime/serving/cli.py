"""`cdd-serve`: serve a backbone and a zoo over HTTP (flags override CDD_* environment variables)."""

from __future__ import annotations

import os

# Before torch loads OpenMP: threads that finish a parallel region sleep instead of spinning. The engine
# computes on its worker thread while request threads do small tensor work of their own; spinning pools
# of idle threads would take the CPU from the worker (measured: 0.6x latency on 2 cores without this).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

from pydantic import ValidationError  # noqa: E402

from .settings import ServeSettings  # noqa: E402

FLAGS = {
    # flag: (settings field, type, help)
    "--backbone": ("backbone", str, "diffusers backbone folder [CDD_BACKBONE; default: the embedded backbone]"),
    "--zoo": ("zoo", str, "zoo folder [CDD_ZOO; default: the user zoo (CDD_USER_ZOO) and the embedded zoo]"),
    "--device": ("device", str, "cpu, cuda, cuda:1 ... [CDD_DEVICE; default cpu]"),
    "--dtype": ("dtype", str, "float32, bfloat16 or float16 [CDD_DTYPE]"),
    "--max-batch": ("max_batch", int, "rows per batch [CDD_MAX_BATCH]"),
    "--max-wait-ms": ("max_wait_ms", float, "batching wait [CDD_MAX_WAIT_MS]"),
    "--queue-size": ("queue_size", int, "queued requests before 429 [CDD_QUEUE_SIZE]"),
    "--request-deadline-s": ("request_deadline_s", float, "queue deadline before 504 [CDD_REQUEST_DEADLINE_S]"),
    "--max-work": ("max_work", int, "most tile-steps (tiles x steps) per request before 413 [CDD_MAX_WORK]"),
    "--drain-s": ("drain_s", float, "shutdown drain bound in seconds [CDD_DRAIN_S]"),
    "--batching": ("batching", str, "auto (step on CUDA, request on a CPU), step (step-level, across tasks) or request (per adapter) [CDD_BATCHING]"),
    "--max-pixels": ("max_pixels", int, "most pixels a task computes on (super-resolution: 413 above) [CDD_MAX_PIXELS]"),
    "--max-decode-pixels": ("max_decode_pixels", int, "decode-safety limit, 413 above [CDD_MAX_DECODE_PIXELS]"),
    "--max-upload-mb": ("max_upload_mb", float, "largest request body [CDD_MAX_UPLOAD_MB]"),
    "--memory-budget-mb": ("memory_budget_mb", float, "resident adapter budget [CDD_MEMORY_BUDGET_MB]"),
    "--api-key": ("api_key", str, "enables the admin endpoints; prefer CDD_API_KEY (flags show in ps)"),
    "--host": ("host", str, "listen address [CDD_HOST]"),
    "--port": ("port", int, "listen port [CDD_PORT]"),
    "--log-level": ("log_level", str, "debug, info, warning, error [CDD_LOG_LEVEL]"),
    "--threads": ("threads", int, "torch CPU threads [CDD_THREADS; default: torch's]"),
}


def with_default(help_: str, dest: str) -> str:
    """`help_` with the setting's default inside its trailing [CDD_...] bracket, unless it names one already
    (the flags default to None so that CDD_* variables are not overridden; the real defaults are the settings')."""
    default = ServeSettings.model_fields[dest].default
    if "default" in help_ or default is None or not help_.endswith("]"):
        return help_
    return f"{help_[:-1]}; default {default}]"


def parse(argv: list[str] | None = None) -> tuple[ServeSettings, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="cdd-serve",
        description="Serve task adapters on one resident backbone: POST /v1/tasks/{task}, playground at /.",
    )
    for flag, (dest, typ, help_) in FLAGS.items():
        parser.add_argument(flag, dest=dest, type=typ, default=None, help=with_default(help_, dest))
    for flag, dest, help_ in (
        ("cuda-graphs", "cuda_graphs", "capture sampling as CUDA graphs on CUDA [CDD_CUDA_GRAPHS]"),
        ("exact-batching", "exact_batching", "run every batch at max_batch rows [CDD_EXACT_BATCHING]"),
        ("warmup", "warmup", "warm up before ready [CDD_WARMUP]"),
    ):
        parser.add_argument(f"--{flag}", dest=dest, action=argparse.BooleanOptionalAction, default=None,
                            help=with_default(help_, dest))
    parser.add_argument("--print-settings", action="store_true", help="print the resolved settings as JSON and exit")
    args = parser.parse_args(argv)
    overrides = {dest: getattr(args, dest) for dest, *_ in FLAGS.values()}
    overrides.update(cuda_graphs=args.cuda_graphs, exact_batching=args.exact_batching, warmup=args.warmup)
    try:
        settings = ServeSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        parser.exit(2, f"cdd-serve: invalid settings:\n{e}\n")
    return settings, args


def device_problem(device) -> str | None:
    """Why torch cannot use `device` on this machine, or None (checked before the server starts, so the
    answer is one line rather than a traceback from the startup)."""
    import torch

    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available (no NVIDIA GPU or driver found, or this torch build is CPU-only); use --device cpu"
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:  # an unknown index, a backend this build lacks
        first = str(e).strip().splitlines()[0]
        return first if len(first) <= 160 else first.split(". ")[0] + "."
    return None


def open_url(sock) -> str:
    """The URL a browser on this machine opens for the bound socket (the loopback for a wildcard address)."""
    host, port = sock.getsockname()[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def announce_when_ready(app, sock) -> None:
    """Log one line once the engine is ready (when /readyz turns 200): where to open the playground and API."""
    import logging
    import threading
    import time

    url, listen = open_url(sock), "{}:{}".format(*sock.getsockname()[:2])

    def wait() -> None:
        while (engine := getattr(app.state, "engine", None)) is None:  # set by the lifespan startup
            time.sleep(0.1)
        engine.wait_ready()
        log = logging.getLogger("cdd.serve")
        if engine.warmup_error:
            log.error(f"cdd-serve warm-up failed ({engine.warmup_error}); {url}readyz answers 503",
                      extra={"fields": {"url": url}})
        else:
            log.info(f"cdd-serve ready: open {url} (playground) or {url}docs (API); listening on {listen}",
                     extra={"fields": {"url": url}})

    threading.Thread(target=wait, name="cdd-serve-ready", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    settings, args = parse(argv)
    if args.print_settings:
        print(json.dumps(settings.public(), indent=2))
        return 0
    problem = device_problem(settings.torch_device)
    if problem:
        print(f"cdd-serve: device {settings.device!r}: {problem}", file=sys.stderr)
        return 2
    for what, folder, flag in (("backbone", settings.backbone_dir(), "--backbone"), ("zoo", settings.zoo_dir(), "--zoo")):
        if not folder.is_dir():
            print(
                f"cdd-serve: {what} folder {folder} does not exist. Pass {flag} PATH or set CDD_{what.upper()}"
                + (" (the embedded default is not built yet)" if getattr(settings, what) is None else ""),
                file=sys.stderr,
            )
            return 2

    from .server import STARTUP_FAILURE, bind, serve

    try:  # before the model loads: a port in use fails now, not after warm-up
        sock = bind(settings.host, settings.port)
    except OSError as e:
        print(f"cdd-serve: cannot listen on {settings.host}:{settings.port}: {e.strerror or e}", file=sys.stderr)
        return 2

    from .app import create_app, start_engine
    from .engine import EngineError
    from .logs import configure

    configure(settings.log_level)
    if settings.threads is not None:
        import torch

        torch.set_num_threads(settings.threads)
    # On SIGTERM/SIGINT the server stops accepting, lets in-flight requests finish (at most drain_s), then
    # runs the lifespan shutdown, which lets the engine finish what was admitted (bounded by drain_s too).
    app = create_app(settings)
    try:
        start_engine(app)
    except EngineError as e:  # a zoo none of whose entries can be served, an unreadable folder: one line
        print(f"cdd-serve: {e}", file=sys.stderr)
        return STARTUP_FAILURE
    announce_when_ready(app, sock)
    return serve(app, settings, sock)


if __name__ == "__main__":
    sys.exit(main())
