"""The compose file, Dockerfile, entrypoint and Prometheus config are what the README says they are. (Building
and running them is deploy/smoke.sh, minutes long and outside this suite.)"""

import fnmatch
import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dockerfile():
    return (ROOT / "Dockerfile").read_text()


def test_gpu_service(compose):
    svc = compose["services"]["cdd"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert svc["environment"]["CDD_DEVICE"] == "cuda" and svc["environment"]["CDD_DTYPE"] == "bfloat16"
    assert svc["build"] == {"context": "..", "dockerfile": "Dockerfile"}  # the Dockerfile's CUDA base
    assert "profiles" not in svc  # `docker compose up` starts it


def test_cpu_profile_builds_a_slim_cpu_image(compose, dockerfile):
    gpu, cpu = compose["services"]["cdd"], compose["services"]["cdd-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    assert cpu["environment"]["CDD_DEVICE"] == "cpu"
    assert "cdd" in cpu["networks"]["default"]["aliases"]  # Prometheus finds it under the same name
    # Not the multi-GB CUDA base: a slim Python one (overridable, e.g. by deploy/base-images.sh's), and
    # PyTorch's CPU index for torch (PyPI's Linux torch is the CUDA build).
    args = cpu["build"]["args"]
    assert re.fullmatch(r"\$\{CDD_CPU_BASE_IMAGE:-python:3\.1[1-9]-slim-\w+\}", args["BASE_IMAGE"])
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:\S+cuda", dockerfile, re.M)  # the GPU default
    # torch is the release the suite passes on (README), from the CPU index only on a base without CUDA
    readme_torch = re.search(r"pip install torch==(\S+) && pip install -e \.", (ROOT / "README.md").read_text()).group(1)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(readme_torch)}$", dockerfile, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=$", dockerfile, re.M) and '"torch==${TORCH_VERSION}"' in dockerfile
    # two builds, two names: building one must not replace the other's image
    assert cpu["image"] != gpu["image"]


def test_volumes_health_and_ports(compose, dockerfile):
    for name in ("cdd", "cdd-cpu"):
        svc = compose["services"][name]
        targets = {re.search(r":(/models/\w+)", v).group(1) for v in svc["volumes"]}
        assert targets == {"/models/backbone", "/models/zoo"}
        # healthy means ready: /readyz answers 200 only after the backbone loaded and warm-up ran
        assert "/readyz" in " ".join(svc["healthcheck"]["test"])
        assert svc["ports"] == ["${CDD_BIND:-127.0.0.1}:${CDD_PORT:-8000}:8000"]  # loopback unless asked
    assert re.search(r"^HEALTHCHECK .*\n?.*/readyz", dockerfile, re.M)
    assert compose["services"]["prometheus"]["ports"] == ["${CDD_BIND:-127.0.0.1}:${PROMETHEUS_PORT:-9090}:9090"]


def test_prometheus_scrapes_metrics(compose):
    prom = compose["services"]["prometheus"]
    assert prom["image"] == "${PROMETHEUS_IMAGE:-prom/prometheus:v2.53.0}"  # deploy/base-images.sh makes one
    assert any(v.startswith("./prometheus.yml:/etc/prometheus/prometheus.yml") for v in prom["volumes"])
    # its data is a named volume (an anonymous one would be left behind by `down`)
    assert "prometheus-data:/prometheus" in prom["volumes"] and "prometheus-data" in compose["volumes"]
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = cfg["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["cdd:8000"]


def test_dockerfile_contract(dockerfile):
    assert re.search(r"^USER cdd$", dockerfile, re.M), "runs as a non-root user"
    assert 'VOLUME ["/models/backbone", "/models/zoo"]' in dockerfile
    assert "CDD_USER_ZOO=/models/zoo" in dockerfile  # `cdd-zoo install` in the container writes to the mount
    torch, deps, source = (dockerfile.index(s) for s in ("pip install /tmp/pip/torch-", "pip install --find-links",
                                                         "pip install --no-deps /tmp/src"))
    assert torch < deps < source, "torch, then the dependencies, then the source: each its own cached layer"
    assert "COPY . " not in dockerfile, "no copy of the source (or deploy/pip's wheels) stays in the image"
    (entry,) = re.findall(r'^ENTRYPOINT \["(\S+)"\]', dockerfile, re.M)
    assert f"COPY deploy/entrypoint.sh {entry}" in dockerfile
    assert "# syntax=" not in dockerfile, "BuildKit's built-in frontend: nothing pulled from a registry to build"


def dockerignored(path: str) -> bool:
    """Whether .dockerignore leaves `path` out of the build context: a pattern matches it or a folder above it
    (`**/NAME` at any depth). Enough for the plain names and globs used there (no negations)."""
    lines = (line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines())
    patterns = [line for line in lines if line and not line.startswith("#")]
    parts = path.split("/")
    for i, part in enumerate(parts):
        prefix = "/".join(parts[: i + 1])
        for pat in patterns:
            if fnmatch.fnmatch(part, pat[3:]) if pat.startswith("**/") else fnmatch.fnmatch(prefix, pat):
                return True
    return False


def test_build_context_has_what_the_dockerfile_mounts_and_not_the_models():
    for path in ("pyproject.toml", "README.md", "adapters/embedded/zoo", "runtime/serving/static/index.html",
                 "deploy/entrypoint.sh", "deploy/pip/README.md", "deploy/pip/torch-2.13.0+cpu-cp311-x.whl"):
        assert not dockerignored(path), path
    for path in ("deploy/models/zoo/x/manifest.json", ".git/HEAD", "runtime/__pycache__/app.cpython-311.pyc"):
        assert dockerignored(path), path
    # deploy/pip/ is mounted by every pip step: it exists in a fresh clone, its wheels and certificate never in git
    tracked = subprocess.run(["git", "ls-files", "deploy/pip"], capture_output=True, text=True, cwd=ROOT).stdout.split()
    assert "deploy/pip/README.md" in tracked and (DEPLOY / "pip" / ".gitignore").read_text().split()[0] == "*"


def test_env_names_are_real_settings(compose):
    from cdd.runtime.serving.settings import ServeSettings

    fields = {f"CDD_{name.upper()}" for name in ServeSettings.model_fields}
    for name in ("cdd", "cdd-cpu"):
        unknown = set(compose["services"][name]["environment"]) - fields
        assert not unknown, f"{name} sets unknown settings {unknown}"
    assert "CDD_USER_ZOO" in fields


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed")
def test_docker_compose_config_validates():
    out = subprocess.run(["docker-compose", "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"],
                         capture_output=True, text=True, cwd=DEPLOY)
    assert out.returncode == 0, out.stderr
    services = subprocess.run(["docker-compose", "-f", str(DEPLOY / "docker-compose.yml"), "--profile", "cpu", "config", "--services"],
                              capture_output=True, text=True, cwd=DEPLOY).stdout.split()
    assert sorted(services) == ["cdd", "cdd-cpu", "prometheus"]


def test_scripts_parse():
    for script in ("entrypoint.sh", "base-images.sh", "smoke.sh"):
        path = DEPLOY / script
        assert os.access(path, os.X_OK), f"{script} is not executable"
        shell = "sh" if path.read_text().startswith("#!/bin/sh") else "bash"
        out = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


# -- the entrypoint: which backbone and zoo it serves, and why ------------------------------------------------


@pytest.fixture
def models():
    """A /models stand-in every user can walk (pytest's tmp_path is private to its owner), and the
    entrypoint with its mount points moved there; `cdd-serve` a probe that prints what it was given."""
    root = Path(tempfile.mkdtemp(prefix="cdd-entrypoint-"))
    try:
        root.chmod(0o755)
        for d in ("models/backbone", "models/zoo", "bin"):
            (root / d).mkdir(parents=True, mode=0o755)
        script = (DEPLOY / "entrypoint.sh").read_text().replace("/models/", f"{root}/models/")
        (root / "bin" / "entrypoint.sh").write_text(script)
        (root / "bin" / "cdd-serve").write_text('#!/bin/sh\necho "cdd-serve $* CDD_BACKBONE=${CDD_BACKBONE:-} CDD_ZOO=${CDD_ZOO:-}"\n')
        for f in ("entrypoint.sh", "cdd-serve"):
            (root / "bin" / f).chmod(0o755)
        yield root
    finally:
        shutil.rmtree(root)


def entrypoint(root: Path, *args: str, as_other_user: bool = False, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CDD_")}
    environ.update(env, PATH=f"{root}/bin:{os.environ['PATH']}")
    cmd = ["sh", str(root / "bin" / "entrypoint.sh"), *args]
    if as_other_user and os.geteuid() == 0:  # root reads everything: run as nobody, as the container runs as cdd
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=environ, cwd=root)


def test_entrypoint_serves_the_embedded_defaults_when_nothing_is_mounted(models):
    out = entrypoint(models, "--port", "9")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cdd-serve", "--port", "9", "CDD_BACKBONE=", "CDD_ZOO="]
    assert "backbone: the embedded default" in out.stderr and "zoo: the embedded default" in out.stderr


def test_entrypoint_serves_what_is_mounted_and_says_so(models):
    (models / "models/backbone/model_index.json").write_text("{}")
    for name in ("b-entry", "a-entry"):
        (models / "models/zoo" / name).mkdir()
        (models / "models/zoo" / name / "manifest.json").write_text("{}")
    out = entrypoint(models, CDD_USER_ZOO=str(models / "models/zoo"))
    assert out.returncode == 0, out.stderr
    assert f"CDD_BACKBONE={models}/models/backbone" in out.stdout
    assert out.stdout.split()[-1] == "CDD_ZOO="  # the mounted zoo is the user zoo, served beside the embedded one
    assert f"zoo: the one mounted at {models}/models/zoo (entries: a-entry b-entry)" in out.stderr
    out = entrypoint(models, CDD_ZOO="/elsewhere")
    assert "CDD_ZOO=/elsewhere" in out.stdout and "zoo: /elsewhere alone (CDD_ZOO is set)" in out.stderr


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="needs setpriv to drop root")
@pytest.mark.parametrize("unreadable", ["entry", "weights", "zoo"])
def test_entrypoint_refuses_a_mounted_zoo_it_cannot_read(models, unreadable):
    """What entries written 0600/0700 by another user looked like from the container: it served the embedded
    zoo without a word. Now it stops and names the path, its owner and mode."""
    entry = models / "models/zoo/sr-mine"
    entry.mkdir()
    (entry / "manifest.json").write_text("{}")
    (entry / "adapter.safetensors").write_bytes(b"")
    private = {"entry": entry, "weights": entry / "adapter.safetensors", "zoo": models / "models/zoo"}[unreadable]
    private.chmod(0o700 if private.is_dir() else 0o600)
    if os.geteuid() != 0:
        private.chmod(0o000)
    out = entrypoint(models, as_other_user=True)
    assert out.returncode == 1 and out.stdout == "", out
    uid = 65534 if os.geteuid() == 0 else os.geteuid()
    assert f"ERROR: the zoo mounted at {models}/models/zoo cannot be read by uid {uid}: {private} (owner uid" in out.stderr
    assert "chmod -R a+rX" in out.stderr
    mode = stat.S_IMODE(private.stat().st_mode)
    assert f"mode {mode:o})" in out.stderr
    private.chmod(0o755 if private.is_dir() else 0o644)


def _torch_step(dockerfile: str) -> str:
    """The Dockerfile's torch step as a plain shell script (its RUN line without the mount)."""
    run = re.search(r"^# 1\. torch.*?\nRUN (.*?)\n\n", dockerfile, re.M | re.S).group(1)
    return run.split("\\\n", 1)[1]


@pytest.mark.parametrize("base, env, expect", [
    ("2.13.0+cpu", {}, "torch 2.13.0+cpu from the base image"),
    ("2.7.1", {}, "WARNING: the base image's torch is 2.7.1, not 2.13.0"),
    (None, {"CUDA_VERSION": "12.8.1"}, "has CUDA 12.8.1 but no torch: pass --build-arg TORCH_INDEX_URL"),
    (None, {}, "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0"),
    (None, {"CUDA_VERSION": "12.8.1", "TORCH_INDEX_URL": "https://download.pytorch.org/whl/cu128"},
     "--index-url https://download.pytorch.org/whl/cu128 torch==2.13.0"),
])
def test_torch_step_keeps_warns_stops_or_installs(dockerfile, tmp_path, base, env, expect):
    """The torch step run with a fake python (a base image's torch, or none) and a fake pip that prints its
    arguments: a CUDA base without torch stops instead of getting the CPU build."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python").write_text(f"#!/bin/sh\n{'echo ' + base if base else 'exit 1'}\n")
    (bin_ / "pip").write_text('#!/bin/sh\necho "pip $*"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    script = _torch_step(dockerfile).replace("/tmp/pip", str(tmp_path / "pip")).replace("[ -d /usr/local/cuda ]", "false")
    environ = {"PATH": f"{bin_}:/usr/bin:/bin", "TORCH_VERSION": re.search(r"^ARG TORCH_VERSION=(\S+)", dockerfile, re.M).group(1),
               "TORCH_INDEX_URL": "", **env}
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=environ)
    assert expect in out.stdout + out.stderr, out.stdout + out.stderr
    assert (out.returncode != 0) == ("but no torch" in expect)


@pytest.mark.skipif(os.geteuid() != 0, reason="base-images.sh needs root")
def test_base_images_runs_apart(tmp_path):
    """Two runs of deploy/base-images.sh use folders of their own (a fake docker and a failing debootstrap)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "docker").write_text("#!/bin/sh\nexit 0\n")
    (bin_ / "debootstrap").write_text("#!/bin/sh\necho 'no mirror here'\nexit 1\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "TMPDIR": str(tmp_path), "CACHE": str(tmp_path / "cache")}
    folders = []
    for _ in range(2):
        out = subprocess.run([str(DEPLOY / "base-images.sh"), "python"], capture_output=True, text=True, env=env)
        assert out.returncode != 0 and "no mirror here" in out.stderr
        folders.append(re.search(r"this run's logs are in (\S+)", out.stderr).group(1))
    assert folders[0] != folders[1]
    for folder in folders:  # the logs stay, the root filesystem does not
        assert [p.name for p in Path(folder).iterdir()] == ["python.log"]
