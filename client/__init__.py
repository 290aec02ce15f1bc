"""The graft client: the same calls over HTTP or gRPC, without torch or the server's code.

from client import connect
with connect("http://localhost:3000", api_key="graft_…") as graft:   # or "grpc://localhost:50051", "grpcs://…"
    dataset = graft.create_dataset("my_images/", "textiles")         # label/image.jpg folders, .zip or .csv
    job = graft.wait(graft.train(dataset.name, "textiles").name)
    print(graft.predict(["a.jpg"], "textiles")[0].heads[0].top)
"""

from client.base import Client
from client.errors import GraftError
from client.grpc_client import GrpcClient
from client.http_client import HttpClient
from client.retry import DEFAULT_RETRY, RetryPolicy
from client.webhooks import ReplayGuard, WebhookVerificationError, verify_webhook

__all__ = [
    "Client",
    "GraftError",
    "GrpcClient",
    "HttpClient",
    "ReplayGuard",
    "RetryPolicy",
    "WebhookVerificationError",
    "connect",
    "verify_webhook",
]


def connect(
    url: str,
    api_key: str | None = None,
    *,
    timeout_s: float = 60.0,
    retry: RetryPolicy = DEFAULT_RETRY,
    ca_file: str | None = None,
) -> Client:
    """A client for ``http(s)://host:port`` (the HTTP door) or ``grpc://host:port`` / ``grpcs://host:port`` (the
    gRPC door, plaintext / TLS). TLS checks the server's certificate against the system's roots, or against
    ``ca_file`` (PEM) only, for a private or self-signed CA."""
    if url.startswith("grpc://"):
        return GrpcClient(url.removeprefix("grpc://"), api_key, timeout_s, retry)
    if url.startswith("grpcs://"):
        return GrpcClient(url.removeprefix("grpcs://"), api_key, timeout_s, retry, tls=True, ca_file=ca_file)
    if url.startswith(("http://", "https://")):
        return HttpClient(url, api_key, timeout_s, retry, ca_file=ca_file)
    raise ValueError(f"{url!r}: the URL must start with http://, https://, grpc:// or grpcs://")
