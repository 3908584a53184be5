"""Structured logs: one JSON object per line (`cdd-serve` installs this formatter on the root logger)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", ...fields}: `fields` come from `extra={"fields": {...}}`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):  # uvicorn's own lines, as JSON through the root handler
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Everything else that would print to stderr becomes a JSON line too: warnings (PIL's on odd images),
    # and uncaught exceptions of the main thread, other threads, and finalizers (at shutdown).
    logging.captureWarnings(True)
    crash = logging.getLogger("cdd.crash")
    sys.excepthook = lambda kind, err, tb: crash.error("uncaught exception", exc_info=(kind, err, tb))
    threading.excepthook = lambda a: crash.error(f"uncaught exception in thread {a.thread.name if a.thread else '?'}",
                                                 exc_info=(a.exc_type, a.exc_value, a.exc_traceback))
    sys.unraisablehook = lambda u: crash.error(
        f"unraisable exception: {u.err_msg or 'in'} {u.object!r}",
        exc_info=(u.exc_type, u.exc_value, u.exc_traceback) if u.exc_value is not None else None)
    # progress bars are not log lines
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
