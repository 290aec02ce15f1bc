"""Signed webhooks end to end (issue 26): a real ``bentoml serve`` sends them to a receiver on loopback.

The server allows exactly the receiver's address (GRAFT_WEBHOOK_ALLOWED_NETWORKS=127.0.0.1/32) and retries soon
(a short GRAFT_WEBHOOK_BACKOFF_S). Webhooks are registered over HTTP and over gRPC with the client package; a
training job that finishes brings a signed delivery that the client's ``verify_webhook`` accepts and whose
tampered or replayed copies it refuses; a receiver that fails first is retried until it answers; internal
addresses are refused at registration by both doors, naming the setting.
"""

import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from client import GrpcClient, HttpClient, ReplayGuard, WebhookVerificationError, verify_webhook
from client.base import Client
from client.errors import InvalidArgument
from harness.sample_data import fashion_mnist_pngs
from harness.servers import Server, make_tenant_key, start_server

TIMEOUT_S = 120.0
SETTING = "GRAFT_WEBHOOK_ALLOWED_NETWORKS"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A local HTTP server: records every POST; a path answers its queued statuses first, then 200."""

    base_url: str = ""
    received: list[Received] = field(default_factory=list)
    failures: dict[str, list[int]] = field(default_factory=dict)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, path: str, count: int = 1) -> list[Received]:
        """The first ``count`` requests to ``path``, waiting for them up to TIMEOUT_S."""
        with self.arrived:
            done = self.arrived.wait_for(lambda: len(self.on(path)) >= count, timeout=TIMEOUT_S)
        assert done, f"{count} webhook(s) to {path} did not arrive within {TIMEOUT_S:g} s: {self.received}"
        return self.on(path)[:count]

    def on(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            queued = state.failures.get(self.path, [])
            status = queued.pop(0) if queued else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            with state.arrived:
                state.received.append(Received(self.path, dict(self.headers.items()), body))
                state.arrived.notify_all()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("e2e-webhooks"),
        GRAFT_WEBHOOK_ALLOWED_NETWORKS="127.0.0.1/32",
        GRAFT_WEBHOOK_BACKOFF_S="0.5",
        GRAFT_WEBHOOK_POLL_S="0.2",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key(server: Server) -> str:
    return make_tenant_key(server, "hooks")


@pytest.fixture(scope="module")
def clients(server: Server, key: str) -> Iterator[dict[str, Client]]:
    opened: dict[str, Client] = {
        "http": HttpClient(server.http_url, key, timeout_s=TIMEOUT_S),
        "grpc": GrpcClient(server.grpc_target, key, timeout_s=TIMEOUT_S),
    }
    yield opened
    for client in opened.values():
        client.close()


@pytest.fixture(scope="module")
def dataset(clients: dict[str, Client]) -> str:
    return clients["http"].create_dataset(fashion_mnist_pngs("train", per_class=3), "fm").name


def train_to_the_end(client: Client, dataset: str, head: str) -> str:
    job = client.wait(client.train(dataset, head, kind="prototype").name)
    assert job.state == "succeeded", job.error
    return job.name


def test_a_finished_job_brings_a_signed_webhook_registered_over_http(clients, dataset, receiver):
    client = clients["http"]
    hook = client.create_webhook(f"{receiver.base_url}/http", ["job.succeeded"], "e2e over HTTP")
    assert hook.secret is not None and client.get_webhook(hook.name).secret is None
    job = train_to_the_end(client, dataset, "over-http")
    [delivery] = receiver.wait_for("/http")
    event = verify_webhook(hook.secret, delivery.headers, delivery.body)
    assert (event["type"], event["data"]["job"]) == ("job.succeeded", job)
    assert delivery.headers["Graft-Event"] == "job.succeeded"

    guard = ReplayGuard()
    guard.check(delivery.headers)
    with pytest.raises(WebhookVerificationError, match="replay"):  # the same delivery again
        guard.check(delivery.headers)
    with pytest.raises(WebhookVerificationError, match="does not match"):  # altered on the way
        verify_webhook(hook.secret, delivery.headers, delivery.body.replace(b"succeeded", b"failed"))
    signed_at = int(delivery.headers["Graft-Signature"].split(",")[0].removeprefix("t="))
    with pytest.raises(WebhookVerificationError, match="tolerance"):  # replayed after the tolerance
        verify_webhook(hook.secret, delivery.headers, delivery.body, tolerance_s=300, now=signed_at + 301)
    with pytest.raises(WebhookVerificationError, match="does not match"):  # someone else's secret
        verify_webhook("whsec_guess", delivery.headers, delivery.body)


def test_a_failing_receiver_is_retried_until_it_answers_registered_over_grpc(clients, dataset, receiver):
    client = clients["grpc"]
    receiver.failures["/grpc"] = [500, 503]
    hook = client.create_webhook(f"{receiver.base_url}/grpc", ["job.succeeded"], "e2e over gRPC")
    assert hook.secret is not None
    train_to_the_end(client, dataset, "over-grpc")
    tries = receiver.wait_for("/grpc", count=3)
    assert len({t.headers["Graft-Delivery"] for t in tries}) == 1  # one delivery, tried three times
    for attempt in tries:
        assert verify_webhook(hook.secret, attempt.headers, attempt.body)["type"] == "job.succeeded"
    deadline = time.monotonic() + TIMEOUT_S
    while (log := client.list_webhook_deliveries(hook.name))[0].state == "pending" and time.monotonic() < deadline:
        time.sleep(0.2)  # the worker records the answer just after the receiver sent it
    assert (log[0].state, log[0].attempts, log[0].last_status_code) == ("delivered", 3, 200)


@pytest.mark.parametrize("door", ["http", "grpc"])
def test_internal_addresses_are_refused_at_registration_naming_the_setting(clients, door):
    for url in ("http://10.0.0.1/hook", "http://169.254.169.254/latest/meta-data/", "http://127.0.0.2:8080/hook"):
        with pytest.raises(InvalidArgument, match=SETTING):  # 127.0.0.2: loopback, outside the allowed 127.0.0.1/32
            clients[door].create_webhook(url, ["job.failed"])
    assert all(w.description.startswith("e2e") for w in clients[door].list_webhooks())
