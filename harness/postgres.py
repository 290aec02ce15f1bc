"""A real, throwaway PostgreSQL server on a loopback port, for tests and benchmarks.

Debian's ``postgresql`` package (``make test`` installs it) provides the binaries; the server refuses to run as
root, so when we are root it runs as the package's unprivileged ``postgres`` user. Everything lives in a temporary
directory that :meth:`PostgresServer.stop` removes.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
DATABASE = "graft"


def available() -> bool:
    return (PG_BIN / "initdb").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@dataclass
class PostgresServer:
    root: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def create_database(self, name: str) -> str:
        """A fresh, empty database on this server; returns its SQLAlchemy URL."""
        subprocess.run(
            _as_server_user(
                [str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name]
            ),
            check=True,
            capture_output=True,
        )
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        subprocess.run(
            _as_server_user([str(PG_BIN / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """initdb in a temporary directory, start on a free loopback port with trust auth, create the database."""
    if not available():
        raise RuntimeError(f"PostgreSQL is not installed ({PG_BIN}); run `make test`, which installs it")
    root = Path(tempfile.mkdtemp(prefix="graft-pg-"))
    os.chmod(root, 0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    subprocess.run(
        _as_server_user([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"]),
        check=True,
        capture_output=True,
    )
    port = _free_port()
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} -c max_connections=200"
    subprocess.run(
        _as_server_user(
            [str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "start"]
        ),
        check=True,
        capture_output=True,
    )
    server = PostgresServer(root, port)
    deadline = time.monotonic() + 30
    while True:
        try:
            server.create_database(DATABASE)
            return server
        except subprocess.CalledProcessError:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.3)
