"""`cdd-serve`: settings from flags and CDD_* variables, clear failures, and a real uvicorn process that
logs one JSON line per request and shuts down gracefully."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image

from cdd.adapters import zoo as zoo_module
from cdd.adapters.architectures import build_adapter
from cdd.adapters.zoo import save_entry
from cdd.runtime.serving.cli import main
from cdd.runtime.diffusion.factory import make_backbone, save_backbone


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("CDD_"):
            monkeypatch.delenv(k)


def test_no_flags_serves_the_embedded_default_and_names_it_when_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(zoo_module, "EMBEDDED", tmp_path / "embedded")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "embedded" / "backbone") in err and "not built yet" in err
    (tmp_path / "embedded" / "backbone").mkdir(parents=True)
    assert main([]) == 2
    assert str(tmp_path / "embedded" / "zoo") in capsys.readouterr().err


def test_a_missing_backbone_flag_folder_is_named(tmp_path, capsys):
    assert main(["--backbone", str(tmp_path / "nope"), "--zoo", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nope") in err and "--backbone" in err


def test_a_device_torch_cannot_use_ends_in_one_clear_line(capsys):
    import torch

    # Without CUDA, plain `cuda`; with it, an index past the last device.
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    assert main(["--device", device]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.startswith(f"cdd-serve: device '{device}': ") and "Traceback" not in captured.err


def test_flags_override_environment_over_defaults(monkeypatch, capsys):
    monkeypatch.setenv("CDD_MAX_BATCH", "8")
    monkeypatch.setenv("CDD_MAX_WAIT_MS", "50")
    monkeypatch.setenv("CDD_API_KEY", "hunter2")
    monkeypatch.setenv("CDD_DEVICE", "cuda:1")
    assert main(["--max-wait-ms", "3", "--no-exact-batching", "--print-settings"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["max_batch"], s["max_wait_ms"], s["device"], s["exact_batching"]) == (8, 3.0, "cuda:1", False)
    assert s["api_key"] == "***" and "hunter2" not in json.dumps(s)
    assert s["queue_size"] == 64 and s["port"] == 8000  # defaults


def test_invalid_settings_fail_with_the_field(monkeypatch, capsys):
    monkeypatch.setenv("CDD_MAX_BATCH", "0")
    with pytest.raises(SystemExit) as e:
        main(["--print-settings"])
    assert e.value.code == 2 and "max_batch" in capsys.readouterr().err
    monkeypatch.delenv("CDD_MAX_BATCH")
    with pytest.raises(SystemExit):
        main(["--dtype", "float8", "--print-settings"])
    assert "dtype" in capsys.readouterr().err


def test_a_port_in_use_fails_in_seconds_before_the_model_loads(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        code = main(["--port", str(port), "--zoo", str(tmp_path), "--backbone", str(tmp_path)])
    assert code == 2 and time.monotonic() - t0 < 5
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def _get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def test_cdd_serve_process_serves_logs_json_and_drains_on_sigterm(tmp_path, free_port):
    bb = make_backbone("latent", resolution=16, seed=8)
    save_backbone(bb, tmp_path / "backbone")
    adapter = build_adapter("controlnet", bb.unet, bb.vae_scale_factor)
    save_entry(tmp_path / "zoo" / "depth", adapter, name="depth", task="depth", backbone_fingerprint=bb.fingerprint,
               condition={"channels": 3, "range": [0, 1], "resolution": 16}, steps=1)
    port = free_port()
    env = {**os.environ, "CDD_ZOO": str(tmp_path / "zoo"), "CDD_MAX_BATCH": "2", "PYTHONUNBUFFERED": "1",
           "CDD_READ_TIMEOUT_S": "1", "CDD_MAX_HEADER_KB": "8", "CDD_DRAIN_S": "5"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdd.runtime.serving.cli", "--backbone", str(tmp_path / "backbone"), "--port", str(port),
         "--threads", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if _get(f"{base}/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "cdd-serve did not become ready"
            time.sleep(0.2)
        buf = io.BytesIO()
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, format="PNG")
        boundary = uuid.uuid4().hex
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
                f"Content-Type: image/png\r\n\r\n").encode() + buf.getvalue() + (
                f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="seed"\r\n\r\n5\r\n--{boundary}--\r\n').encode()
        req = urllib.request.Request(f"{base}/v1/tasks/depth", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200 and r.headers["X-CDD-Seed"] == "5"
            assert Image.open(io.BytesIO(r.read())).size == (16, 16)
        # limits that hold whatever HTTP parser is installed: a head over max_header_kb is refused, a client
        # that does not finish its request within read_timeout_s is closed, /healthz stays fast meanwhile
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 16384 + b"\r\n\r\n")
            assert c.recv(100).startswith(b"HTTP/1.1 431")
        slow = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
        for c in slow:
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # ... and never the rest
        t0 = time.monotonic()
        assert _get(f"{base}/healthz")[0] == 200
        assert time.monotonic() - t0 < 1
        time.sleep(1.5)
        for c in slow:
            assert c.recv(100) == b""  # closed by the server
            c.close()
        head = urllib.request.Request(f"{base}/healthz", method="HEAD")
        with urllib.request.urlopen(head, timeout=5) as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out  # a clean drain after SIGTERM is a clean exit
    assert "Application shutdown complete." in out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == len(out.splitlines()), out  # every log line is JSON
    access = [x for x in lines if x["logger"] == "cdd.serve.access" and x["path"] == "/v1/tasks/depth"]
    assert len(access) == 1 and access[0]["status"] == 200 and access[0]["seed"] == 5
    assert any(x["logger"] == "cdd.serve" and x["msg"] == "serving" for x in lines)
    ready = [x for x in lines if x["msg"].startswith("cdd-serve ready: ")]
    assert len(ready) == 1 and ready[0]["url"] == f"{base}/" and f"open {base}/ (playground)" in ready[0]["msg"]


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("[CDD_PORT; default 8000]", "[CDD_HOST; default 127.0.0.1]", "[CDD_MAX_WORK; default 512]",
                 "[CDD_WARMUP; default True]"):
        assert text in out


def test_warnings_and_uncaught_exceptions_are_json_log_lines():
    code = (
        "import threading, warnings\n"
        "from cdd.runtime.serving.logs import configure\n"
        "configure('info')\n"
        "warnings.warn('an odd image')\n"
        "t = threading.Thread(target=lambda: 1 / 0, name='worker'); t.start(); t.join()\n"
        "raise RuntimeError('at exit')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = proc.stderr.splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert len(records) == 3, proc.stderr
    assert records[0]["logger"] == "py.warnings" and "an odd image" in records[0]["msg"]
    assert records[1]["logger"] == "cdd.crash" and "worker" in records[1]["msg"] and "ZeroDivisionError" in records[1]["exc"]
    assert "RuntimeError: at exit" in records[2]["exc"]


def test_a_port_another_server_has_bound_but_not_yet_listens_on_fails_at_once(tmp_path, capsys):
    # a second cdd-serve started while the first loads: both can bind with SO_REUSEADDR; listening decides
    from cdd.runtime.serving.server import bind

    with socket.socket() as first:
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        first.bind(("127.0.0.1", 0))
        port = first.getsockname()[1]
        sock = bind("127.0.0.1", port)  # the first server's own bind and listen
        try:
            t0 = time.monotonic()
            code = main(["--port", str(port), "--zoo", str(tmp_path), "--backbone", str(tmp_path)])
        finally:
            sock.close()
    assert code == 2 and time.monotonic() - t0 < 5
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1
