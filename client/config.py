"""Where the CLI finds its server and key: flags, then environment variables, then a config file.

The config file is TOML (``$GRAFT_CONFIG``, default ``~/.config/graft/config.toml``)::

    url = "grpcs://graft.example.com:443"    # or grpc://, http://, https://; the scheme picks the transport
    api_key = "graft_…"
    timeout_s = 60
    ca_file = "~/graft-ca.pem"               # optional: trust this CA (TLS) instead of the system's roots

A config file that holds an ``api_key`` must be readable by its owner only (``chmod 600``), as ssh insists
for private keys: otherwise it is refused.
"""

import os
import stat
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

DEFAULT_URL = "http://localhost:3000"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = DEFAULT_URL
    api_key: str | None = None
    timeout_s: float = 60.0
    ca_file: str | None = None  # PEM CA for grpcs:// and https:// (a private or self-signed CA)


def config_path() -> Path:
    return Path(os.environ.get("GRAFT_CONFIG", Path.home() / ".config" / "graft" / "config.toml"))


def _check_private(path: Path) -> None:
    """Refuse a key file that other users can read or change (POSIX permissions; other systems have none)."""
    if os.name != "posix":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ValueError(
            f"{path} holds an API key but its permissions are {mode:04o}: other users can read or change it. "
            f"Run 'chmod 600 {path}' (or move the key to GRAFT_API_KEY)"
        )


def load(
    url: str | None = None, api_key: str | None = None, timeout_s: float | None = None, ca_file: str | None = None
) -> Settings:
    """Flags win over GRAFT_URL / GRAFT_API_KEY / GRAFT_TIMEOUT_S / GRAFT_CA_FILE, which win over the config file."""
    path = config_path()
    values: dict = {}
    if path.is_file():
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML ({exc}): fix or remove it") from None
        if "api_key" in values:
            _check_private(path)
    environment = {
        "url": os.environ.get("GRAFT_URL"),
        "api_key": os.environ.get("GRAFT_API_KEY"),
        "timeout_s": os.environ.get("GRAFT_TIMEOUT_S"),
        "ca_file": os.environ.get("GRAFT_CA_FILE"),
    }
    flags = {"url": url, "api_key": api_key, "timeout_s": timeout_s, "ca_file": ca_file}
    for layer in (environment, flags):
        values |= {key: value for key, value in layer.items() if value not in (None, "")}
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        problem = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"bad settings ({problem}); check the flags, GRAFT_* variables and {path}") from None
