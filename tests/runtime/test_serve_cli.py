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
from cdd.runtime.cli import main
from cdd.runtime.factory import make_backbone, save_backbone


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def test_cdd_serve_process_serves_logs_json_and_drains_on_sigterm(tmp_path):
    bb = make_backbone("latent", resolution=16, seed=8)
    save_backbone(bb, tmp_path / "backbone")
    adapter = build_adapter("controlnet", bb.unet, bb.vae_scale_factor)
    save_entry(tmp_path / "zoo" / "depth", adapter, name="depth", task="depth", backbone_fingerprint=bb.fingerprint,
               condition={"channels": 3, "range": [0, 1], "resolution": 16}, steps=1)
    port = _free_port()
    env = {**os.environ, "CDD_ZOO": str(tmp_path / "zoo"), "CDD_MAX_BATCH": "2", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdd.runtime.cli", "--backbone", str(tmp_path / "backbone"), "--port", str(port),
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
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode in (0, -signal.SIGTERM), out  # uvicorn re-raises the signal once it has drained
    assert "Application shutdown complete." in out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == len(out.splitlines()), out  # every log line is JSON
    access = [x for x in lines if x["logger"] == "cdd.serve.access" and x["path"] == "/v1/tasks/depth"]
    assert len(access) == 1 and access[0]["status"] == 200 and access[0]["seed"] == 5
    assert any(x["logger"] == "cdd.serve" and x["msg"] == "serving" for x in lines)
