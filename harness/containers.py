"""graft's image run as containers (podman), on PostgreSQL and behind nginx, all on loopback.

The topology of ``deploy/compose.yaml`` for the container end-to-end test and ``benchmarks/container.py``: serving
replicas (``GRAFT_ROLE=serve``) behind nginx running ``deploy/nginx.conf``, and a training replica
(``GRAFT_ROLE=train``) that only claims jobs, each a container of the image ``make image`` builds, sharing a real
PostgreSQL (harness/postgres.py) and one data folder mounted as the image's volume. Containers use the host's
network (so they reach PostgreSQL on loopback and nothing else) with their own ports, run as the image's
unprivileged user on a read-only root file system, and can be pinned to cores.
"""

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from harness.cluster import LoadResult, Nginx, retrying_predictions, start_nginx
from harness.postgres import PostgresServer, start_postgres
from harness.servers import ADMIN_KEY, REPO, free_port

PODMAN_CONF = REPO / "deploy" / "podman" / "containers.conf"
DATA_VOLUME = "/var/lib/graft"  # the image's VOLUME and GRAFT_DATA_DIR
IMAGE_UID = 10001  # the image's USER
# A training container never takes prediction traffic, so it is only ever alive, never ready.
READY_PATH = {"serve": "/readyz", "both": "/readyz", "train": "/livez"}
# Training containers yield to whatever else wakes on their cores (nginx, the database, clients): they train in
# the background, so a lower CPU weight costs them little and keeps serving latency flat.
TRAINING_CPU_SHARES = 128


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(PODMAN_CONF))}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], env=podman_env(), check=check, capture_output=True, text=True, timeout=timeout
    )


def build_image() -> dict:
    """``make image``'s script: builds graft's image unless one from the same inputs exists; returns its summary."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_image.py")],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        timeout=3600,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@dataclass
class Container:
    """One graft container; ``http_url`` / ``grpc_target`` on loopback, as nginx and tests reach it."""

    name: str
    role: str
    http_port: int
    grpc_port: int
    started_at: float  # time.monotonic() when ``podman run`` was called

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return podman("logs", self.name, check=False).stdout[-5000:]

    def running(self) -> bool:
        state = podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return state.stdout.strip() == "true"

    def wait_until(self, path: str, timeout_s: float = 300) -> float:
        """Poll ``path`` until it answers 200; returns the seconds since the container was started."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.http_url}{path}", timeout=2).status_code == 200:
                    return time.monotonic() - self.started_at
            except httpx.HTTPError:
                pass
            if not self.running():
                raise RuntimeError(f"container {self.name} exited:\n{self.log()}")
            time.sleep(0.2)
        raise RuntimeError(f"container {self.name}: {path} not 200 within {timeout_s:g} s:\n{self.log()}")

    def cpu_seconds(self) -> float:
        """CPU time its processes have used so far (its cgroup's, as podman reports it: a Go duration)."""
        stats = json.loads(podman("stats", "--no-stream", "--no-reset", "--format", "json", self.name).stdout)
        units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
        return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(h|ms|us|µs|ns|m|s)", stats[0]["cpu_time"]))

    def stop(self, grace_s: float = 45) -> None:
        """SIGTERM (the container drains), SIGKILL after ``grace_s``, then remove it."""
        podman("stop", "--time", str(int(grace_s)), self.name, check=False, timeout=grace_s + 30)
        podman("rm", "--force", self.name, check=False)

    def kill(self) -> None:
        """SIGKILL: a crash, no chance to drain."""
        podman("kill", "--signal", "KILL", self.name, check=False)


def run_container(
    image: str,
    role: str,
    data_dir: Path,
    env: dict[str, str],
    *,
    cpuset: str | None = None,
    name_prefix: str = "graft-test",
) -> Container:
    """Start one container of ``image`` in ``role`` (serve, train or both) on free loopback ports."""
    name = f"{name_prefix}-{role}-{uuid.uuid4().hex[:6]}"
    http_port, grpc_port = free_port(), free_port()
    settings = {"GRAFT_ROLE": role, "BENTOML_PORT": str(http_port), "GRAFT_GRPC_PORT": str(grpc_port), **env}
    args = [
        "run",
        "--detach",
        "--name",
        name,
        "--hostname",
        name,
        "--network",
        "host",
        "--read-only",
        "--volume",
        f"{data_dir}:{DATA_VOLUME}",
        "--stop-signal",
        "SIGTERM",
    ]
    if cpuset is not None:
        args += ["--cpuset-cpus", cpuset]
    if role == "train":
        args += ["--cpu-shares", str(TRAINING_CPU_SHARES)]
    for key, value in settings.items():
        args += ["--env", f"{key}={value}"]
    started_at = time.monotonic()
    podman(*args, image)
    return Container(name, role, http_port, grpc_port, started_at)


@dataclass
class Fleet:
    """Serving containers behind nginx and training containers, on one PostgreSQL and one data folder."""

    image: str
    postgres: PostgresServer
    data_dir: Path
    env: dict[str, str]
    serving: list[Container]
    training: list[Container]
    nginx: Nginx
    http_url: str  # through nginx
    grpc_target: str  # through nginx
    cpusets: dict[str, str | None]  # role -> cores
    retired: list[Container] = field(default_factory=list)

    def start(self, role: str) -> Container:
        """A new container in ``role``, ready (serving) or alive (training); not yet behind nginx."""
        container = run_container(self.image, role, self.data_dir, self.env, cpuset=self.cpusets.get(role))
        container.wait_until(READY_PATH[role])
        return container

    def replace(self, old: Container) -> Container:
        """Rolling replacement of one container: start its successor, let the load balancer send to it, then
        stop the old one (it drains) and take it out of the load balancer."""
        new = self.start(old.role)
        group = self.serving if old.role == "serve" else self.training
        group.append(new)
        if old.role == "serve":
            self.nginx.reconfigure(self.serving)
        old.stop()
        group.remove(old)
        self.retired.append(old)
        if old.role == "serve":
            self.nginx.reconfigure(self.serving)
        return new

    def crash_and_replace(self, old: Container) -> Container:
        """SIGKILL ``old`` (a crash: it drains nothing) and start its successor in its place."""
        old.kill()
        new = self.start(old.role)
        group = self.serving if old.role == "serve" else self.training
        group[group.index(old)] = new
        self.retired.append(old)
        if old.role == "serve":
            self.nginx.reconfigure(self.serving)
        return new

    def replace_all_under_load(self, key: str, image: bytes, head: str, concurrency: int = 4) -> LoadResult:
        """Replace every container in turn (``replace``) while a client predicts through nginx, retrying
        502/503/UNAVAILABLE as a careful client does; what that client got."""

        async def run() -> LoadResult:
            stop = asyncio.Event()
            load = asyncio.create_task(
                retrying_predictions(self.http_url, self.grpc_target, key, image, head, concurrency, stop)
            )
            for old in [*self.serving, *self.training]:
                await asyncio.to_thread(self.replace, old)
            await asyncio.sleep(2)  # the last replacement carries the load for a moment
            stop.set()
            return await load

        return asyncio.run(run())

    def stop(self) -> None:
        self.nginx.stop()
        for container in self.serving + self.training + self.retired:
            container.stop(grace_s=5)
        self.postgres.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_fleet(
    image: str,
    root: Path,
    *,
    serving: int = 2,
    training: int = 1,
    serve_cpus: str | None = None,
    train_cpus: str | None = None,
    **env: str,
) -> Fleet:
    """PostgreSQL, ``serving`` + ``training`` containers of ``image`` on one data folder, nginx in front of the
    serving ones. ``serve_cpus`` / ``train_cpus`` pin each role to cores (``--cpuset-cpus``)."""
    postgres = start_postgres()
    data_dir = root / "shared-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chown(data_dir, IMAGE_UID, IMAGE_UID)  # the volume belongs to the image's user
    settings = {
        "GRAFT_REGISTRY_URL": postgres.url,
        "GRAFT_ADMIN_KEY": ADMIN_KEY,
        "GRAFT_DEVICE": "cpu",
        "GRAFT_BACKBONES": '["mobilenet_v2"]',
        **env,
    }
    cpusets = {"serve": serve_cpus, "train": train_cpus}
    roles = ["serve"] * serving + ["train"] * training
    started = [run_container(image, role, data_dir, settings, cpuset=cpusets[role]) for role in roles]
    try:
        for container in started:
            container.wait_until(READY_PATH[container.role])
        serving_ones = [container for container in started if container.role == "serve"]
        nginx, http_url, grpc_target = start_nginx(serving_ones)
    except BaseException:
        for container in started:
            container.stop(grace_s=5)
        postgres.stop()
        raise
    training_ones = [container for container in started if container.role == "train"]
    return Fleet(
        image, postgres, data_dir, settings, serving_ones, training_ones, nginx, http_url, grpc_target, cpusets
    )
