"""The HTTP door of an in-process Runtime under uvicorn, in a thread: for the sync clients, which need a socket."""

import contextlib
import threading
import time
from collections.abc import Iterator

import uvicorn

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
