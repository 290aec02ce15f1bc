"""An in-process Runtime behind a real socket, for the sync clients: its HTTP door under uvicorn in a thread, or its
gRPC door on this event loop."""

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator

import uvicorn

from client.base import Client
from client.grpc_client import GrpcClient
from client.http_client import HttpClient
from service.grpc.server import start_grpc_server
from service.http.app import create_app
from service.runtime import Runtime


@contextlib.contextmanager
def serve_http(runtime: Runtime) -> Iterator[int]:
    """Serve ``runtime``'s HTTP door on a free loopback port while the block runs; yields the port."""
    config = uvicorn.Config(create_app(runtime.settings, lambda: runtime), host="127.0.0.1", port=0, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.asynccontextmanager
async def client_of(runtime: Runtime, key: str, door: str) -> AsyncIterator[Client]:
    """A client of ``runtime`` with ``key``: over HTTP (``door`` "http", uvicorn in a thread) or gRPC ("grpc", an
    in-process server on this loop: call the sync client from another thread)."""
    if door == "http":
        with serve_http(runtime) as port, HttpClient(f"http://127.0.0.1:{port}", key) as client:
            yield client
        return
    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    try:
        with GrpcClient(f"127.0.0.1:{server.port}", key) as client:
            yield client
    finally:
        await server.stop(grace=1)
