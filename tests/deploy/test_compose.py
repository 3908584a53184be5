"""The compose file, Dockerfile and Prometheus config are what the README says they are."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def test_gpu_service(compose):
    svc = compose["services"]["cdd"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert svc["environment"]["CDD_DEVICE"] == "cuda" and svc["environment"]["CDD_DTYPE"] == "bfloat16"
    assert svc["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    assert "profiles" not in svc  # `docker compose up` starts it


def test_volumes_health_and_ports(compose):
    for name in ("cdd", "cdd-cpu"):
        svc = compose["services"][name]
        targets = {re.search(r":(/models/\w+)", v).group(1) for v in svc["volumes"]}
        assert targets == {"/models/backbone", "/models/zoo"}
        assert "/healthz" in " ".join(svc["healthcheck"]["test"])
        assert any(p.endswith(":8000") for p in svc["ports"])


def test_cpu_profile_has_no_gpu(compose):
    svc = compose["services"]["cdd-cpu"]
    assert svc["profiles"] == ["cpu"] and "deploy" not in svc
    assert svc["environment"]["CDD_DEVICE"] == "cpu"
    assert "cdd" in svc["networks"]["default"]["aliases"]  # Prometheus finds it under the same name


def test_prometheus_scrapes_metrics(compose):
    prom = compose["services"]["prometheus"]
    assert any(v.startswith("./prometheus.yml:/etc/prometheus/prometheus.yml") for v in prom["volumes"])
    cfg = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = cfg["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["cdd:8000"]


def test_dockerfile_contract():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^HEALTHCHECK .*\n?.*healthz", text, re.M)
    assert re.search(r"^USER cdd$", text, re.M), "runs as a non-root user"
    assert 'VOLUME ["/models/backbone", "/models/zoo"]' in text
    deps, source = text.index("pip install ."), text.index("COPY . .")
    assert deps < source, "dependencies are installed in a layer before the source is copied"
    entry = (DEPLOY / "entrypoint.sh").read_text()
    assert "/models/backbone/model_index.json" in entry and "exec cdd-serve" in entry


def test_env_names_are_real_settings(compose):
    from cdd.runtime.settings import ServeSettings

    fields = {f"CDD_{name.upper()}" for name in ServeSettings.model_fields}
    for name in ("cdd", "cdd-cpu"):
        unknown = set(compose["services"][name]["environment"]) - fields
        assert not unknown, f"{name} sets unknown settings {unknown}"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed")
def test_docker_compose_config_validates():
    out = subprocess.run(["docker-compose", "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"],
                         capture_output=True, text=True, cwd=DEPLOY)
    assert out.returncode == 0, out.stderr
    services = subprocess.run(["docker-compose", "-f", str(DEPLOY / "docker-compose.yml"), "--profile", "cpu", "config", "--services"],
                              capture_output=True, text=True, cwd=DEPLOY).stdout.split()
    assert sorted(services) == ["cdd", "cdd-cpu", "prometheus"]
