"""Several graft replicas behind nginx, sharing one PostgreSQL registry and one data folder, all on loopback.

The topology of a deployment (deploy/compose.yaml), for the end-to-end test of replicas and
``benchmarks/scaleout.py``: a real PostgreSQL (harness/postgres.py), ``bentoml serve`` replicas started with
the settings a deployment gives them, and nginx running ``deploy/nginx.conf`` with only the upstream addresses
and listen ports swapped for loopback ones.
"""

import asyncio
import base64
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc
import httpx
import psutil

from harness.postgres import PostgresServer, start_postgres
from harness.servers import REPO, Server, free_port, start_server
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc

NGINX = Path("/usr/sbin/nginx")
NGINX_CONF = REPO / "deploy" / "nginx.conf"


def render_nginx_conf(http_upstreams: list[str], grpc_upstreams: list[str], http_port: int, grpc_port: int) -> str:
    """deploy/nginx.conf with its replicas (graft-N:3000 / graft-N:50051) and listen ports replaced."""
    text = NGINX_CONF.read_text()
    for upstream, port, targets in (("graft_http", 3000, http_upstreams), ("graft_grpc", 50051, grpc_upstreams)):
        block = re.search(rf"upstream {upstream} \{{.*?\}}", text, re.S)
        assert block is not None, f"deploy/nginx.conf has no upstream {upstream}"
        template = re.search(rf"( *)server graft-1:{port}( [^;]*);\n", block.group(0))
        assert template is not None, f"upstream {upstream} has no 'server graft-1:{port}'"
        servers = "".join(f"{template.group(1)}server {target}{template.group(2)};\n" for target in targets)
        body = re.sub(rf" *server graft-\d+:{port}[^;]*;\n", "", block.group(0))
        text = text.replace(block.group(0), body.replace("{\n", "{\n" + servers, 1))
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{http_port};")
    return text.replace("listen 8081 http2;", f"listen 127.0.0.1:{grpc_port} http2;")


class Upstream(Protocol):
    """A replica as nginx reaches it: a ``bentoml serve`` process or a container."""

    @property
    def http_url(self) -> str: ...

    @property
    def grpc_target(self) -> str: ...


def _conf_for(replicas: Sequence[Upstream], http_port: int, grpc_port: int) -> str:
    return render_nginx_conf(
        [r.http_url.removeprefix("http://") for r in replicas], [r.grpc_target for r in replicas], http_port, grpc_port
    )


@dataclass
class Nginx:
    prefix: Path
    process: subprocess.Popen
    http_port: int
    grpc_port: int

    def reconfigure(self, replicas: Sequence[Upstream]) -> None:
        """Point nginx at ``replicas`` without dropping connections (SIGHUP: new workers, old ones finish)."""
        (self.prefix / "nginx.conf").write_text(_conf_for(replicas, self.http_port, self.grpc_port))
        self.process.send_signal(signal.SIGHUP)
        time.sleep(1.0)  # the new workers take over within moments

    def stop(self) -> None:
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.prefix, ignore_errors=True)


def start_nginx(replicas: Sequence[Upstream]) -> tuple[Nginx, str, str]:
    """nginx in front of ``replicas``; returns it with its HTTP base URL and gRPC target."""
    prefix = Path(tempfile.mkdtemp(prefix="graft-nginx-"))
    http_port, grpc_port = free_port(), free_port()
    (prefix / "nginx.conf").write_text(_conf_for(replicas, http_port, grpc_port))
    process = subprocess.Popen(
        [str(NGINX), "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
        stdout=(prefix / "out.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited: {(prefix / 'out.log').read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return Nginx(prefix, process, http_port, grpc_port), url, f"127.0.0.1:{grpc_port}"
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"nginx did not come up: {(prefix / 'out.log').read_text()}")


@dataclass
class Cluster:
    postgres: PostgresServer
    data_dir: Path
    replicas: list[Server]
    nginx: Nginx
    http_url: str  # through nginx
    grpc_target: str  # through nginx
    env: dict[str, str] = field(default_factory=dict)

    def worker_pids(self, replica: Server) -> set[int]:
        """The replica's processes: ``bentoml serve`` and the worker it runs the service in."""
        root = psutil.Process(replica.process.pid)
        return {root.pid, *(child.pid for child in root.children(recursive=True))}

    def replica_of_worker(self, worker: str) -> Server:
        """The replica whose process a job's ``worker`` (``host:pid:nonce``) names."""
        pid = int(worker.split(":")[1])
        return next(replica for replica in self.replicas if pid in self.worker_pids(replica))

    def kill(self, replica: Server) -> None:
        """SIGKILL the replica's whole process tree: a crash, no chance to clean up."""
        for pid in self.worker_pids(replica):
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        replica.process.wait(timeout=10)

    def replace(self, old: Server, root: Path) -> Server:
        """Start a new replica (in ``root``) in place of ``old``, which is gone, and point nginx at it."""
        root.mkdir(parents=True, exist_ok=True)
        new = start_server(root, **self.env)
        self.replicas[self.replicas.index(old)] = new
        self.nginx.reconfigure(self.replicas)
        return new

    def stop(self) -> None:
        self.nginx.stop()
        for replica in self.replicas:
            if replica.process.poll() is None:
                replica.stop()
        self.postgres.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_cluster(root: Path, replicas: int = 2, **env: str) -> Cluster:
    """PostgreSQL, ``replicas`` graft replicas on one shared data folder (started together), nginx in front."""
    postgres = start_postgres()
    data_dir = root / "shared-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = {"GRAFT_REGISTRY_URL": postgres.url, "GRAFT_DATA_DIR": str(data_dir), "GRAFT_AUTH": "keys", **env}
    started: list[Server | BaseException] = [None] * replicas  # type: ignore[list-item]

    def start(i: int) -> None:
        try:
            (root / f"replica-{i + 1}").mkdir(parents=True, exist_ok=True)
            started[i] = start_server(root / f"replica-{i + 1}", **settings)
        except BaseException as exc:
            started[i] = exc

    threads = [threading.Thread(target=start, args=(i,)) for i in range(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    servers = [s for s in started if isinstance(s, Server)]
    failures = [s for s in started if not isinstance(s, Server)]
    if failures:
        for server in servers:
            server.stop()
        postgres.stop()
        raise RuntimeError("a replica did not start") from failures[0]
    nginx, http_url, grpc_target = start_nginx(servers)
    return Cluster(postgres, data_dir, servers, nginx, http_url, grpc_target, settings)


@dataclass
class LoadResult:
    ok: int = 0
    failed: int = 0
    retried: int = 0  # 502/503/UNAVAILABLE answers (and dropped connections) that a retry then got past
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    failures: list[str] = field(default_factory=list)  # what the failed requests got (the first 10)

    def p99_ms(self) -> float:
        ordered = sorted(self.latencies_ms)
        return round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1) if ordered else float("nan")

    def record(self, ok: bool, started: float, outcome: str) -> None:
        self.latencies_ms.append((time.perf_counter() - started) * 1000)
        self.ok, self.failed = self.ok + ok, self.failed + (not ok)
        if not ok and len(self.failures) < 10:
            self.failures.append(outcome)


async def retrying_predictions(
    http_url: str, grpc_target: str, key: str, image: bytes, head: str, concurrency: int, stop: "asyncio.Event"
) -> LoadResult:
    """Predict through the load balancer until ``stop``, half HTTP and half gRPC, as a careful client does:
    retry on 502/503/UNAVAILABLE (a replica going away) with a short backoff, at most 10 times per request, and
    on what a dropped connection gives each door (a transport error; a stream the load balancer reset, which
    gRPC reports as CANCELLED although this client cancelled nothing). Predictions change nothing: a retry is safe."""
    result = LoadResult()
    body = {"images": [base64.b64encode(image).decode()], "heads": [head]}
    metadata = [("authorization", f"Bearer {key}")]

    async def http_worker(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            outcome = "no answer"
            for attempt in range(10):
                try:
                    response = await client.post("/v1/predict", json=body)
                    outcome = f"http {response.status_code}: {response.text[:200]}"
                except httpx.TransportError as exc:
                    response, outcome = None, f"http transport error: {exc!r}"
                if response is not None and response.status_code not in (502, 503):
                    break
                result.retried += 1
                await asyncio.sleep(0.1 * (attempt + 1))
            result.record(response is not None and response.status_code == 200, started, outcome)

    async def grpc_worker(stub: rpc.PredictionServiceStub) -> None:
        request = api.PredictRequest(images=[image], heads=[head])
        while not stop.is_set():
            started = time.perf_counter()
            ok, outcome = False, "no answer"
            for attempt in range(10):
                try:
                    await stub.Predict(request, metadata=metadata, timeout=60)
                    ok = True
                    break
                except grpc.aio.AioRpcError as exc:
                    outcome = f"grpc {exc.code().name}: {exc.details()}"
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                        break
                result.retried += 1
                await asyncio.sleep(0.1 * (attempt + 1))
            result.record(ok, started, outcome)

    headers = {"Authorization": f"Bearer {key}"}
    async with (
        httpx.AsyncClient(base_url=http_url, headers=headers, timeout=60) as client,
        grpc.aio.insecure_channel(grpc_target) as channel,
    ):
        stub = rpc.PredictionServiceStub(channel)
        await asyncio.gather(*(http_worker(client) if i % 2 == 0 else grpc_worker(stub) for i in range(concurrency)))
    return result


def predict_for(
    http_url: str, grpc_target: str, key: str, image: bytes, head: str, concurrency: int, seconds: float
) -> LoadResult:
    """``retrying_predictions`` through a load balancer for ``seconds``, from a blocking caller."""

    async def run() -> LoadResult:
        stop = asyncio.Event()
        load = asyncio.create_task(retrying_predictions(http_url, grpc_target, key, image, head, concurrency, stop))
        await asyncio.sleep(seconds)
        stop.set()
        return await load

    return asyncio.run(run())
