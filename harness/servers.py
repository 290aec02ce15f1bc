"""A real ``bentoml serve`` subprocess (HTTP and gRPC on free loopback ports) for tests and benchmarks."""

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent  # the repo root, where bentofile.yaml is
ADMIN_KEY = "test-admin-key-3b8e1f6a2c9d4e7f0a5b8c1d3e6f9a2b"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    http_url: str
    grpc_target: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(data_dir: Path, **env: str) -> Server:
    """Start ``bentoml serve`` from the repo root and wait until /readyz answers 200."""
    http_port, grpc_port = free_port(), free_port()
    environment = {
        **os.environ,
        "GRAFT_DATA_DIR": str(data_dir),
        "GRAFT_GRPC_PORT": str(grpc_port),
        "GRAFT_ADMIN_KEY": ADMIN_KEY,
        "GRAFT_DEVICE": "cpu",
        # one backbone unless a caller asks for more: each loaded backbone costs start-up time and memory
        "GRAFT_BACKBONES": '["mobilenet_v2"]',
        "BENTOML_HOME": str(data_dir / "bentoml"),
        **env,
    }
    log_path = data_dir / "server.log"
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "bentoml"), "serve", "--host", "127.0.0.1", "--port", str(http_port)],
        cwd=REPO,
        env=environment,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    server = Server(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", process, log_path)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.http_url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"bentoml serve was not ready within 180 s:\n{server.log()}")


def make_tenant_key(server: Server, tenant: str) -> str:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    httpx.post(f"{server.http_url}/v1/admin/tenants", json={"name": tenant}, headers=admin).raise_for_status()
    response = httpx.post(f"{server.http_url}/v1/admin/tenants/{tenant}/keys", headers=admin)
    response.raise_for_status()
    return response.json()["secret"]


def wait_for_job(client: httpx.Client, name: str, timeout_s: float = 600) -> dict:
    """Poll the job ``name`` (``jobs/{id}``) through ``client`` until it is done; returns its last state."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/{name}").json()
        if job["done"]:
            return job
        time.sleep(0.3)
    raise TimeoutError(f"job {name} did not finish within {timeout_s:g} s")
