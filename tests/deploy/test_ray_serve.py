"""cdd-serve on Ray Serve (runtime/serving/ray_serve.py, deploy/ray-serve.yaml) on a local Ray, CPU only: two engine
replicas of a tiny pixel backbone and a zoo of two adapters for two tasks. The answers are cdd-serve's, byte
for byte; requests sent one at a time load each adapter on exactly one replica; a busy replica's adapter is
loaded on another one."""

from __future__ import annotations

import importlib
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from PIL import Image

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[serve]')")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'ray[serve]')")
httpx = pytest.importorskip("httpx")

from cdd.adapters.architectures import build_adapter  # noqa: E402
from cdd.adapters.zoo import save_entry  # noqa: E402
from cdd.runtime.serving.app import create_app  # noqa: E402
from cdd.runtime.diffusion.factory import make_backbone, save_backbone  # noqa: E402
from cdd.runtime.serving.ray_serve import build_app  # noqa: E402
from cdd.runtime.serving.settings import RayServeSettings, ServeSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "ray-serve.yaml"
RES = 16
ADAPTERS = {"super-resolution": "sr", "depth": "depth"}
INPUT = {"super-resolution": 4, "depth": RES}  # super-resolution answers 4x its input


def save_adapter(bb, zoo, name, task, kind, seed, **kw):
    adapter = build_adapter(kind, bb.unet, bb.vae_scale_factor)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the zero-initialised parts get values, so each adapter visibly matters
        for p in adapter.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.03)
    save_entry(zoo / name, adapter, name=name, task=task, backbone_fingerprint=bb.fingerprint,
               condition={"channels": 3, "range": [0, 1], "resolution": RES}, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    bb = make_backbone("pixel", resolution=RES, seed=3)
    save_backbone(bb, root / "backbone")
    save_adapter(bb, root / "zoo", "sr", "super-resolution", "controlnet", 1, steps=2, sampler="prev")
    save_adapter(bb, root / "zoo", "depth", "depth", "t2i", 2, steps=2, sampler="ddim")
    # max_batch 1: every request is its own batch, cheap on a busy CPU (bytes do not depend on it anyway)
    return {"backbone": str(root / "backbone"), "zoo": str(root / "zoo"), "max_batch": 1, "max_wait_ms": 0,
            "threads": 1}


@pytest.fixture(scope="module")
def reference(world):
    """The plain cdd-serve app on the same backbone and zoo."""
    with TestClient(create_app(ServeSettings(**world, warmup=False))) as client:
        yield client


# On two busy cores a Serve proxy can take longer to start than Ray allows by default: the controller kills a
# proxy that is not ready within RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S (5 s) and starts another, which
# serve.start() sees as ActorDiedError, and serve.start() itself waits a fixed 60 s (HTTP_PROXY_TIMEOUT).
# The first is an environment variable of Ray's processes (they inherit the driver's at ray.init); past the
# second, the fixture waits for the proxy itself. What the tests check is unchanged.
PROXY_START_S = 300


def start_serve(port: int) -> None:
    """serve.start(), waiting up to PROXY_START_S for a proxy that a busy CPU starts slowly."""
    deadline = time.monotonic() + PROXY_START_S
    while True:
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            return
        except (TimeoutError, ray.exceptions.RayActorError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)  # the controller lives on and keeps starting the proxy; a later start() connects to it


def wait_proxy(client, prefixes) -> None:
    """Until Ray's proxy answers and routes every application's prefix (/-/routes: {prefix: app}, 503 until
    the proxy has a route table)."""
    deadline = time.monotonic() + PROXY_START_S
    while True:
        try:
            routes = client.get("/-/routes")
            if routes.status_code == 200 and set(prefixes) <= set(routes.json()):
                return
        except httpx.TransportError:
            pass  # not listening yet
        assert time.monotonic() < deadline, f"Ray's proxy did not route {prefixes} in {PROXY_START_S} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def ray_serve(world, free_port):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", str(PROXY_START_S))
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            port = free_port()
            start_serve(port)
            # The layout under test: two replicas, each keeping up to two adapters. The second application has
            # replicas that take one request at a time and keep one adapter: busy ones, and evictions.
            serve.run(build_app({**world, "num_replicas": 2, "max_adapters_per_replica": 2, "replica_cpus": 0.5}),
                      name="cdd", route_prefix="/")
            serve.run(build_app({**world, "num_replicas": 2, "max_adapters_per_replica": 1, "replica_cpus": 0.5,
                                 "max_ongoing_requests": 1}), name="busy", route_prefix="/busy")
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                wait_proxy(client, ["/", "/busy"])
                yield client
        finally:
            serve.shutdown()
            ray.shutdown()


def png(size, seed):
    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def post(client, task, seed, prefix="", headers=None, image=None, **form):
    image = image if image is not None else png(INPUT.get(task, RES), seed)
    data = {"seed": str(seed), **{k: str(v) for k, v in form.items()}}
    return client.post(f"{prefix}/v1/tasks/{task}", files={"image": ("in.png", image, "image/png")}, data=data,
                       headers=headers)


def replicas(client, prefix=""):
    return client.get(f"{prefix}/v1/replicas").json()


def holders(records: dict, adapter: str, field: str = "loads") -> set[str]:
    return {rid for rid, r in records.items() if adapter in r[field]}


def wait_routed(client, adapter, prefix=""):
    """Until Ray's routers can know which replica holds `adapter`: the replica has told the controller
    (seen in Ray's view), plus a moment for the controller to tell the routers."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        view = replicas(client, prefix)["ray"]
        if view is None:
            time.sleep(2.0)  # Ray's view not reachable: wait longer than its push interval (0.1 s) many times over
            return
        if any(adapter in ids for ids in view.values()):
            time.sleep(0.5)
            return
        time.sleep(0.05)
    raise AssertionError(f"no replica reported {adapter} to Ray's controller in 30 s")


# -- the config file and the builder (no cluster) ----------------------------------------


def test_config_file_is_a_serve_config_of_this_builder():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(CONFIG.read_text())
    ServeDeploySchema.model_validate(config)  # what `serve run` / `serve deploy` check
    (app,) = config["applications"]
    module, name = app["import_path"].split(":")
    assert importlib.import_module(module).__dict__[name] is build_app
    settings = RayServeSettings(**app["args"])
    assert settings.num_replicas >= 2 and settings.max_adapters_per_replica >= 1
    assert isinstance(build_app(app["args"]), serve.Application)


def test_builder_refuses_settings_it_does_not_use_and_bad_values():
    with pytest.raises(ValueError, match="http_options"):
        build_app({"port": 8001})
    with pytest.raises(ValueError, match="num_replicas"):
        build_app({"num_replicas": 0})
    with pytest.raises(ValueError, match="max_adapters_per_replica"):
        build_app({"max_adapters_per_replica": "many"})


# -- the deployment ------------------------------------------------------------------------


@pytest.mark.slow
def test_same_bytes_as_cdd_serve_and_each_adapter_on_one_replica(ray_serve, reference):
    client = ray_serve
    # One at a time: the first request of each adapter goes to a replica holding the fewest adapters and
    # loads it there; once Ray's routers know, every later one goes to that replica.
    order = [("super-resolution", 0), ("depth", 0)] + [(t, s) for s in (1, 2, 3) for t in ADAPTERS]
    for i, (task, seed) in enumerate(order):
        r = post(client, task, seed)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png" and r.headers["x-cdd-adapter"] == ADAPTERS[task]
        assert r.headers["x-cdd-seed"] == str(seed)
        assert Image.open(io.BytesIO(r.content)).size == (RES, RES)
        assert r.content == post(reference, task, seed).content, f"{task} seed {seed}: not cdd-serve's bytes"
        if i < 2:
            wait_routed(client, ADAPTERS[task])

    view = replicas(client)
    records = view["replicas"]
    assert len(records) == 2, records  # both replicas loaded something: each adapter went to an empty one
    for adapter in ADAPTERS.values():
        assert len(holders(records, adapter)) == 1, f"{adapter} loaded on {holders(records, adapter)}"
        assert sum(r["loads"].get(adapter, 0) for r in records.values()) == 1  # and loaded once
    assert holders(records, "sr") != holders(records, "depth")
    for r in records.values():
        assert r["unloads"] == {} and sorted(r["loaded"]) == sorted(r["resident"])  # the engine holds what Ray does
    if view["ray"] is not None:  # Ray's own record agrees with the engines'
        assert view["ray"] == {rid: sorted(r["loaded"]) for rid, r in records.items()}


@pytest.mark.slow
def test_json_answer_tasks_and_operations(ray_serve, reference):
    client = ray_serve
    r = post(client, "depth", 5, headers={"Accept": "application/json"}, image=png(20, 5))
    expected = post(reference, "depth", 5, headers={"Accept": "application/json"}, image=png(20, 5))
    body, ref = r.json(), expected.json()
    assert r.headers["x-cdd-resized"] == "20x20->16x16"
    assert body.pop("timings").keys() == ref.pop("timings").keys()
    assert body == ref
    tasks = {t["task"]: t for t in client.get("/v1/tasks").json()["tasks"]}
    assert {t: [a["name"] for a in tasks[t]["adapters"]] for t in tasks} == {"super-resolution": ["sr"], "depth": ["depth"]}
    assert tasks["depth"]["adapters"][0]["resident"]
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["adapters"] == 2 and ready["replicas"] == 2
    assert client.get("/healthz").json() == {"status": "ok"}
    assert 'cdd_http_requests_total{code="200",route="/v1/tasks/{task}"}' in client.get("/metrics").text
    assert {"/v1/tasks/{task}", "/v1/tasks", "/v1/replicas"} <= set(client.get("/openapi.json").json()["paths"])


@pytest.mark.slow
@pytest.mark.parametrize("task, form, status, code", [
    ("inpainting", {"steps": 9}, 404, "unknown_task"),
    ("depth", {"steps": 9}, 422, "invalid_parameter"),
    ("depth", {"sampler": "euler"}, 422, "invalid_parameter"),
    ("depth", {"adapter": "sr"}, 422, "invalid_parameter"),
    ("depth", {"image": b"not an image"}, 415, "unsupported_media_type"),
])
def test_client_errors_are_cdd_serves(ray_serve, reference, task, form, status, code):
    r, ref = post(ray_serve, task, 1, **form), post(reference, task, 1, **form)
    assert (r.status_code, r.json()) == (ref.status_code, ref.json())
    assert r.status_code == status and r.json()["error"]["code"] == code


@pytest.mark.slow
def test_a_deadline_passed_before_the_request_started_is_504(ray_serve, reference):
    headers = {"X-CDD-Deadline-Ms": "0.001"}
    r, ref = post(ray_serve, "depth", 1, headers=headers), post(reference, "depth", 1, headers=headers)
    assert (r.status_code, r.json()) == (ref.status_code, ref.json())
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"


@pytest.mark.slow
def test_a_busy_replica_s_adapter_is_loaded_on_another(ray_serve, reference):
    client, prefix = ray_serve, "/busy"
    assert post(client, "super-resolution", 0, prefix).status_code == 200
    wait_routed(client, "sr", prefix)
    (first,) = holders(replicas(client, prefix)["replicas"], "sr")
    # Six at once: the replica holding sr takes one (max_ongoing_requests 1); Ray sends the others to the
    # replica holding the fewest adapters, which loads sr too, rather than waiting.
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda s: post(client, "super-resolution", s, prefix), range(10, 16)))
    for seed, r in zip(range(10, 16), answers):
        assert r.status_code == 200 and r.content == post(reference, "super-resolution", seed).content
    records = replicas(client, prefix)["replicas"]
    assert len(holders(records, "sr")) == 2, records
    # One adapter per replica here: depth's first request unloads sr from one of them, engine included.
    assert post(client, "depth", 0, prefix).status_code == 200
    records = replicas(client, prefix)["replicas"]
    (second,) = holders(records, "depth")
    assert records[second]["loaded"] == records[second]["resident"] == ["depth"]
    assert records[second]["unloads"] == {"sr": 1}
    assert first in records
