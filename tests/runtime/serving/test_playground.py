"""The playground page in a real headless Chromium (Debian's /usr/bin/chromium), driven over the Chrome
DevTools protocol on a pipe (--remote-debugging-pipe: no websocket client needed): pick a task, upload an
image with DOM.setFileInputFiles, run, and check the input, the result and the timings on the page.

Set CDD_PLAYGROUND_SCREENSHOT=path to keep the screenshot (docs/images/playground.png is made so)."""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cdd.adapters.architectures import build_adapter
from cdd.adapters.zoo import save_entry
from cdd.runtime.serving.app import create_app
from cdd.runtime.diffusion.factory import make_backbone, save_backbone
from cdd.runtime.serving.settings import ServeSettings

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install -y chromium to run the browser test)"
)
RES = 32


class DevTools:
    """A minimal Chrome DevTools protocol client over --remote-debugging-pipe (fd 3 in, fd 4 out, NUL-framed JSON)."""

    def __init__(self, user_data_dir: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire():  # in the child, before exec: its fds 3 and 4 are the pipe ends
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--remote-debugging-pipe", f"--user-data-dir={user_data_dir}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=wire, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._id, self._buf, self.events = 0, b"", []

    def _read_message(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("no message from Chromium")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read_message(timeout)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read_message(max(deadline - time.monotonic(), 0.01)))

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - it may already be gone
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    root = tmp_path_factory.mktemp("playground")
    bb = make_backbone("latent", resolution=RES, seed=2)
    save_backbone(bb, root / "backbone")
    for name, task, kind in (("sr", "super-resolution", "controlnet"), ("depth", "depth", "t2i")):
        adapter = build_adapter(kind, bb.unet, bb.vae_scale_factor)
        save_entry(root / "zoo" / name, adapter, name=name, task=task, backbone_fingerprint=bb.fingerprint,
                   condition={"channels": 3, "range": [0, 1], "resolution": RES}, steps=2)
    app = create_app(ServeSettings(backbone=root / "backbone", zoo=root / "zoo", max_batch=2))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(30)


def _input_image(path: Path) -> Path:
    """A small low-resolution picture: sky, floor, a ball."""
    img = Image.new("RGB", (16, 16), (120, 170, 230))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 10, 15, 15), fill=(90, 90, 80))
    d.ellipse((4, 4, 11, 11), fill=(220, 40, 40))
    img.save(path)
    return path


def test_playground_uploads_runs_and_shows_input_result_and_timings(server, tmp_path):
    image = _input_image(tmp_path / "low-res.png")
    browser = DevTools(tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

        def js(expression):
            r = browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                             session)
            return r["result"].get("value")

        def wait_for(expression, timeout=60):
            deadline = time.monotonic() + timeout
            while not js(expression):
                assert time.monotonic() < deadline, f"timed out waiting for {expression}"
                time.sleep(0.1)

        browser.send("Page.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": 1100, "height": 760, "deviceScaleFactor": 1, "mobile": False}, session)
        browser.send("Page.navigate", {"url": server + "/"}, session)
        browser.wait_event("Page.loadEventFired")
        wait_for("document.body.dataset.state === 'loaded'")
        wait_for("document.getElementById('status').textContent === 'ready'")
        assert js("[...document.querySelectorAll('#task option')].map(o => o.value).join(',')") == "depth,super-resolution"

        js("const t = document.getElementById('task'); t.value = 'super-resolution'; t.dispatchEvent(new Event('change'))")
        js("document.getElementById('seed').value = '7'")
        root = browser.send("DOM.getDocument", session=session)["root"]["nodeId"]
        node = browser.send("DOM.querySelector", {"nodeId": root, "selector": "#image"}, session)["nodeId"]
        browser.send("DOM.setFileInputFiles", {"files": [str(image)], "nodeId": node}, session)
        wait_for("document.getElementById('input').naturalWidth === 16")
        js("document.getElementById('run').click()")
        wait_for("['done', 'error'].includes(document.body.dataset.state)")
        assert js("document.getElementById('error').textContent") == ""
        wait_for("document.getElementById('result').naturalWidth > 0")

        assert js("document.getElementById('result').naturalWidth") == 64  # 4x
        assert js("document.getElementById('result-size').textContent") == "64×64"
        assert js("document.getElementById('input-size').textContent") == "16×16"
        timings = js("document.getElementById('timings').innerText")
        for label in ("adapter", "sr", "seed", "7", "queue", "execute", "round trip", "ms"):
            assert label in timings, timings
        dom = js("document.documentElement.outerHTML")
        assert 'id="result"' in dom and "data:image/png;base64," in dom

        shot = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"}, session)["data"])
    finally:
        browser.close()
    picture = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))
    assert picture.shape == (760, 1100, 3) and picture.std() > 10  # something was drawn
    (tmp_path / "playground.png").write_bytes(shot)
    keep = os.environ.get("CDD_PLAYGROUND_SCREENSHOT")
    if keep:
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "playground.png", keep)


def test_playground_shows_a_client_error(server, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is text")
    browser = DevTools(tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", {"url": server + "/"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

        def js(expression):
            return browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                                session)["result"].get("value")

        deadline = time.monotonic() + 60
        while js("document.body && document.body.dataset.state") != "loaded":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        root = browser.send("DOM.getDocument", session=session)["root"]["nodeId"]
        node = browser.send("DOM.querySelector", {"nodeId": root, "selector": "#image"}, session)["nodeId"]
        browser.send("DOM.setFileInputFiles", {"files": [str(bad)], "nodeId": node}, session)
        js("document.getElementById('run').click()")
        while js("document.body.dataset.state") != "error":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert js("document.getElementById('error').textContent").startswith("415 unsupported_media_type")
    finally:
        browser.close()


class Page:
    """One tab of `browser` on `url`, with JavaScript evaluation and waiting."""

    def __init__(self, browser: DevTools, url: str):
        self.browser = browser
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.send("Page.enable", session=self.session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": 1100, "height": 760, "deviceScaleFactor": 1, "mobile": False}, self.session)
        browser.send("Page.navigate", {"url": url}, self.session)
        browser.wait_event("Page.loadEventFired")
        self.wait_for("document.body.dataset.state === 'loaded'")

    def js(self, expression):
        r = self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                              self.session)
        return r["result"].get("value")

    def wait_for(self, expression, timeout=60):
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.1)

    def choose(self, select_id: str, value: str):
        self.js(f"{{ const s = document.getElementById({select_id!r}); s.value = {value!r}; "
                "s.dispatchEvent(new Event('change')); }")

    def upload(self, path: Path):
        root = self.browser.send("DOM.getDocument", session=self.session)["root"]["nodeId"]
        node = self.browser.send("DOM.querySelector", {"nodeId": root, "selector": "#image"}, self.session)["nodeId"]
        self.browser.send("DOM.setFileInputFiles", {"files": [str(path)], "nodeId": node}, self.session)

    def run(self) -> str:
        self.js("document.body.dataset.state = 'running'; document.getElementById('run').click()")
        self.wait_for("['done', 'error'].includes(document.body.dataset.state)")
        return self.js("document.body.dataset.state")

    def options(self, select_id: str) -> list[str]:
        return self.js(f"[...document.querySelectorAll('#{select_id} option')].map(o => o.value)")

    def result_shown(self) -> bool:
        return self.js("!document.getElementById('result').hidden || document.getElementById('result-size').textContent "
                       "!== '' || document.getElementById('timings').innerText.trim() !== ''")


def test_playground_offers_each_task_its_samplers_an_example_and_clears_a_stale_result(server, tmp_path):
    browser = DevTools(tmp_path / "profile")
    try:
        page = Page(browser, server + "/")
        assert page.js("fetch('/favicon.ico').then(r => r.status + ' ' + r.headers.get('content-type'))") == "200 image/png"
        # the samplers the server takes for each task, from GET /v1/tasks; "default" names the adapter's own
        page.choose("task", "depth")
        assert page.options("sampler") == ["", "prev", "ddim", "cm", "gd"]
        assert page.js("document.querySelector('#sampler option').textContent") == "default (prev)"
        assert page.js("document.getElementById('prompt').placeholder") == "optional; name the objects left to right"
        page.choose("task", "super-resolution")
        assert page.js("document.getElementById('prompt').placeholder") == "optional"
        samplers = page.options("sampler")
        assert "prev+ilvr" in samplers and "gd+ilvr" in samplers and not any(s.endswith("+keep") for s in samplers)
        assert "prev+ilvr-out" in samplers  # each option says what its step does, the longest suffix matched
        label = "[...document.querySelectorAll('#sampler option')].find(o => o.value === '{}').textContent"
        assert page.js(label.format("prev+ilvr-out")) == "prev+ilvr-out (keep the input's low frequencies on the output)"
        assert page.js(label.format("prev+ilvr")) == "prev+ilvr (keep the input's low frequencies at every step)"
        assert page.options("steps") == ["", "1", "2", "3", "4"]

        # "Use an example" puts the task's example input (and its prompt) in the form; it runs
        page.choose("task", "depth")
        assert "depth_condition/" in page.js("document.getElementById('image-hint').textContent")
        page.js("document.getElementById('example').click()")
        page.wait_for("document.getElementById('input').naturalWidth === 64")
        assert "on a plain floor at noon" in page.js("document.getElementById('prompt').value")
        page.js("document.getElementById('seed').value = '3'")
        assert page.run() == "done" and page.result_shown()
        assert page.js("document.getElementById('warning').textContent") == ""

        # an error clears the result that belonged to the previous request
        page.js("document.getElementById('prompt').value = 'x'.repeat(3000)")
        assert page.run() == "error" and not page.result_shown()
        assert page.js("document.getElementById('error').textContent").startswith("422 invalid_parameter")

        # a colour photograph as a depth map: served, with the server's warning shown
        photo = _input_image(tmp_path / "photo.png")
        page.js("document.getElementById('prompt').value = ''")
        page.upload(photo)
        page.wait_for("document.getElementById('input').naturalWidth === 16")
        assert page.js("document.getElementById('error').textContent") == ""  # a new upload clears the old error
        assert page.run() == "done" and page.result_shown()
        assert "depth condition is grey" in page.js("document.getElementById('warning').textContent")

        # a new upload clears the result of the previous input (its size label would disagree with the new input)
        page.choose("task", "super-resolution")
        assert not page.result_shown()
        page.upload(photo)
        page.wait_for("document.getElementById('input').naturalWidth === 16")
        assert page.run() == "done" and page.js("document.getElementById('result-size').textContent") == "64×64"
        page.js("document.getElementById('example').click()")
        page.wait_for("document.getElementById('input-size').textContent === '16×16' && "
                      "document.getElementById('image').files[0].name === 'example-super-resolution.png'")
        assert not page.result_shown()
        page.choose("task", "depth")
        page.js("document.getElementById('example').click()")
        page.wait_for("document.getElementById('input').naturalWidth === 64")
        assert page.run() == "done"
        shot = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"}, page.session)["data"])
    finally:
        browser.close()
    (tmp_path / "playground-example.png").write_bytes(shot)
    keep = os.environ.get("CDD_PLAYGROUND_EXAMPLE_SCREENSHOT")
    if keep:
        shutil.copyfile(tmp_path / "playground-example.png", keep)


def test_playground_offers_strength_where_a_task_can_start_from_its_input(server, tmp_path):
    """The strength field shows for super-resolution (its placeholder the entry's default), not for depth; a run at
    strength 0.5 lists it with the timings."""
    browser = DevTools(tmp_path / "profile")
    try:
        page = Page(browser, server + "/")
        page.choose("task", "depth")
        assert page.js("document.getElementById('strength-field').hidden") is True
        page.choose("task", "super-resolution")
        assert page.js("document.getElementById('strength-field').hidden") is False
        assert page.js("document.getElementById('strength').placeholder") == "default 1"
        page.upload(_input_image(tmp_path / "low-res.png"))
        page.wait_for("document.getElementById('input').naturalWidth === 16")
        page.js("document.getElementById('strength').value = '0.5'; document.getElementById('steps').value = '1'")
        assert page.run() == "done" and page.result_shown()
        assert "strength\t0.5" in page.js("document.getElementById('timings').innerText")
        page.js("document.getElementById('strength').value = '0.001'; document.getElementById('steps').value = '2'")
        assert page.run() == "error"
        assert "strength 0.001 covers 1 timestep(s)" in page.js("document.getElementById('error').textContent")
    finally:
        browser.close()
