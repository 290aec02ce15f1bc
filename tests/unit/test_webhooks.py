"""Signed webhooks (service/webhooks, client/webhooks.py): the address policy, signing and its verification, the
endpoints' bounds and tenant isolation, the outbox (events in the transaction that caused them, claims under a
lease) and the delivery worker against a real HTTP receiver on loopback, which each test allows explicitly."""

import asyncio
import http.server
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from client import Client, GrpcClient, HttpClient, ReplayGuard, WebhookVerificationError, cli, models, verify_webhook
from client.errors import InvalidArgument as ClientInvalidArgument
from client.errors import NotFound as ClientNotFound
from harness.inprocess import serve_http
from service.config import Settings
from service.core import Core
from service.errors import InvalidArgument, NotFound, ResourceExhausted
from service.grpc.server import start_grpc_server
from service.jobs.store import JobState, JobStore
from service.quotas import Quotas
from service.runtime import Runtime
from service.store.db import Database, JobRow, WebhookDeliveryRow, utcnow
from service.training import TrainRequest
from service.webhooks.addresses import SETTING, AddressPolicy, parse_networks
from service.webhooks.events import SUBSCRIBABLE, EventType
from service.webhooks.outbox import DeliveryState
from service.webhooks.signing import signed_headers
from service.webhooks.store import WebhookStore
from service.webhooks.worker import DeliveryWorker
from tests.unit.test_grpc_tls import self_signed

TENANT, OTHER = "acme", "globex"
LOOPBACK = "127.0.0.1/32"


# --- a real receiver ---------------------------------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    path: str


@dataclass
class Receiver:
    """A local HTTP server that records each POST and answers the next status of ``statuses`` (then 200)."""

    url: str
    requests: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.requests.append(Received(dict(self.headers.items()), body, self.path))
            status = state.statuses.pop(0) if state.statuses else 200
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", state.url + "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(data_dir=tmp_path, webhook_allowed_networks=LOOPBACK, **overrides)  # type: ignore[arg-type]


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(f"sqlite:///{tmp_path / 'registry.db'}")


@pytest.fixture
def store(db: Database, tmp_path: Path) -> WebhookStore:
    return WebhookStore(db, settings_for(tmp_path, webhook_backoff_s=60.0))


def jobs_of(store: WebhookStore) -> JobStore:
    return JobStore(store.db, Quotas(store.settings))


def finish_job(jobs: JobStore, tenant: str, state: JobState) -> str:
    """A job of ``tenant`` run to ``state`` the way a replica ends one (claim, then finish under the lease)."""
    jobs.create(tenant, TrainRequest(dataset_id="ds_1", head_name="h"))
    claim = jobs.claim_next("w1", 60.0)
    assert claim is not None
    done = claim.job.model_copy(update={"state": state, "error": "boom" if state is JobState.FAILED else None})
    assert jobs.finish(claim.holder, done)[0]
    return claim.job.id


def deliveries(store: WebhookStore, tenant: str, webhook_id: str) -> list:
    return store.deliveries(tenant, webhook_id, 100, None)[0]


def make_due(store: WebhookStore) -> None:
    with store.db.session() as session:
        session.execute(update(WebhookDeliveryRow).values(next_attempt_at=utcnow() - timedelta(seconds=1)))


async def deliver(store: WebhookStore, owner: str = "replica-a") -> int:
    worker = DeliveryWorker(store, owner)
    try:
        return await worker.deliver_due()
    finally:
        worker.close()


# --- signing and its verification ------------------------------------------------------------------------------

SECRET = "whsec_" + "ab" * 32
BODY = b'{"id":"evt_1","type":"job.succeeded","data":{}}'


def signed(timestamp: int | None = None, body: bytes = BODY, secret: str = SECRET, delivery: str = "dlv_1") -> dict:
    return signed_headers(secret, int(time.time()) if timestamp is None else timestamp, body, "job.succeeded", delivery)


def test_a_signed_delivery_verifies_and_gives_its_event():
    assert verify_webhook(SECRET, signed(), BODY)["type"] == "job.succeeded"


def test_header_names_are_matched_in_any_case():
    headers = {name.lower(): value for name, value in signed().items()}
    assert verify_webhook(SECRET, headers, BODY)["id"] == "evt_1"


def test_a_tampered_body_is_rejected():
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verify_webhook(SECRET, signed(), BODY.replace(b"succeeded", b"failed"))


def test_another_secret_is_rejected():
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verify_webhook("whsec_other", signed(), BODY)


def test_a_changed_timestamp_breaks_the_signature():
    headers = signed()
    t, v1 = headers["Graft-Signature"].split(",")
    headers["Graft-Signature"] = f"t={int(t[2:]) + 1},{v1}"
    with pytest.raises(WebhookVerificationError, match="does not match"):
        verify_webhook(SECRET, headers, BODY)


def test_a_stale_timestamp_is_rejected_as_a_replay():
    old = int(time.time()) - 301
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify_webhook(SECRET, signed(old), BODY, tolerance_s=300)
    assert verify_webhook(SECRET, signed(old), BODY, tolerance_s=600)["id"] == "evt_1"


def test_an_unsigned_or_malformed_request_is_rejected():
    with pytest.raises(WebhookVerificationError, match="no Graft-Signature"):
        verify_webhook(SECRET, {}, BODY)
    with pytest.raises(WebhookVerificationError, match="is not"):
        verify_webhook(SECRET, {"Graft-Signature": "v1=abc"}, BODY)


def test_the_replay_guard_refuses_a_delivery_id_seen_before_and_forgets_the_oldest():
    guard = ReplayGuard(capacity=2)
    assert guard.check(signed(delivery="dlv_1")) == "dlv_1"
    with pytest.raises(WebhookVerificationError, match="replay"):
        guard.check(signed(delivery="dlv_1"))
    guard.check(signed(delivery="dlv_2"))
    guard.check(signed(delivery="dlv_3"))
    guard.check(signed(delivery="dlv_1"))  # forgotten: past the tolerance, verify_webhook refuses it instead


# --- the address policy ----------------------------------------------------------------------------------------

REFUSED = {
    "127.0.0.1": "loopback",
    "127.8.8.8": "loopback",
    "::1": "loopback",
    "10.0.0.1": "private",
    "172.16.5.4": "private",
    "192.168.1.1": "private",
    "fc00::1": "private",
    "fd12:3456::1": "private",
    "169.254.169.254": "link-local",
    "fe80::1": "link-local",
    "224.0.0.1": "multicast",
    "ff02::1": "multicast",
    "0.0.0.0": "unspecified",
    "::": "unspecified",
    "240.0.0.1": "reserved",
    "100.64.0.1": "address",  # carrier-grade NAT: not global
    "::ffff:127.0.0.1": "IPv4-mapped loopback",
    "::ffff:169.254.169.254": "IPv4-mapped link-local",
    "::ffff:10.0.0.1": "IPv4-mapped private",
}


def url_of(address: str) -> str:
    return f"http://[{address}]/hook" if ":" in address else f"http://{address}/hook"


@pytest.mark.parametrize("address", sorted(REFUSED))
def test_each_internal_range_is_refused_naming_the_address_and_the_setting(address):
    with pytest.raises(InvalidArgument) as refused:
        AddressPolicy(()).vet(url_of(address))
    assert REFUSED[address] in refused.value.message and SETTING in refused.value.message


@pytest.mark.parametrize("address", ["10.0.0.1", "169.254.169.254", "::ffff:127.0.0.1"])
def test_a_hostname_resolving_to_an_internal_address_is_refused(address):
    policy = AddressPolicy((), resolver=lambda host, port: ["93.184.216.34", address])  # one bad answer is enough
    with pytest.raises(InvalidArgument) as refused:
        policy.vet("https://hooks.example.com/graft")
    assert f"{address} (what 'hooks.example.com' resolves to)" in refused.value.message


def test_localhost_is_refused_through_the_real_resolver():
    with pytest.raises(InvalidArgument, match="loopback"):
        AddressPolicy(()).vet("http://localhost:8080/hook")


def test_a_public_address_passes_and_is_the_one_connected_to():
    policy = AddressPolicy((), resolver=lambda host, port: ["93.184.216.34"])
    target = policy.vet("https://hooks.example.com:8443/graft?x=1")
    assert (target.host, target.port, target.path, target.address) == (
        "hooks.example.com",
        8443,
        "/graft?x=1",
        "93.184.216.34",
    )


def test_allowed_networks_let_the_operator_open_exactly_those_addresses():
    policy = AddressPolicy(parse_networks("127.0.0.1/32, 10.1.0.0/16"))
    assert policy.vet("http://127.0.0.1:9/x").address == "127.0.0.1"
    assert policy.vet("http://10.1.2.3/x").address == "10.1.2.3"
    assert policy.vet("http://[::ffff:127.0.0.1]/x").address == "::ffff:127.0.0.1"
    for outside in ("127.0.0.2", "10.2.0.1", "169.254.169.254"):
        with pytest.raises(InvalidArgument, match=SETTING):
            policy.vet(url_of(outside))


def test_a_malformed_allowed_network_stops_the_server_at_start_up():
    with pytest.raises(ValueError, match="CIDR"):
        Settings(webhook_allowed_networks="127.0.0.1/33")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://93.184.216.34/x", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("http://user:pw@93.184.216.34/x", "credentials"),
        ("http:///x", "no host"),
        ("http://93.184.216.34:99999/x", "port"),
        ("http://93.184.216.34:0/x", "port"),
        ("http://[::1/x", "malformed"),
        ("http://93.184.216.34/x#frag", "fragment"),
        ("http://93.184.216.34/a b", "spaces"),
        ("http://93.184.216.34/" + "a" * 2048, "limit is 2,048"),
    ],
)
def test_a_bad_url_is_refused_with_what_to_fix(url, message):
    with pytest.raises(InvalidArgument, match=message):
        AddressPolicy(()).vet(url)


def test_an_unresolvable_host_is_refused():
    with pytest.raises(InvalidArgument, match="does not resolve"):
        AddressPolicy(()).vet("http://no-such-host.invalid/x")


# --- endpoints: creation, bounds, isolation --------------------------------------------------------------------


def test_an_endpoint_is_created_with_a_secret_shown_once(store, receiver):
    created = store.create(TENANT, receiver.url, ["job.failed", "job.succeeded", "job.failed"], "ops")
    assert created.secret.startswith("whsec_") and len(created.secret) == 70
    assert created.webhook.events == ["job.succeeded", "job.failed"]  # registry order, once each
    fetched = store.get(TENANT, created.webhook.id)
    assert fetched == created.webhook and "secret" not in fetched.model_dump()


def test_a_refused_address_is_refused_at_registration(db, tmp_path):
    closed = WebhookStore(db, Settings(data_dir=tmp_path))
    for url in ("http://10.0.0.1/x", "http://169.254.169.254/latest/meta-data", "http://localhost:3000/x"):
        with pytest.raises(InvalidArgument, match=SETTING):
            closed.create(TENANT, url, ["job.succeeded"])
    assert closed.list(TENANT, 10, None) == ([], None)


@pytest.mark.parametrize(
    ("events", "message"),
    [([], "at least one"), (["job.exploded"], "unknown webhook event"), (["webhook.test"], "unknown")],
)
def test_event_types_come_from_the_registry(store, receiver, events, message):
    with pytest.raises(InvalidArgument, match=message):
        store.create(TENANT, receiver.url, events)


def test_the_description_is_bounded(store, receiver):
    with pytest.raises(InvalidArgument, match="512"):
        store.create(TENANT, receiver.url, ["job.succeeded"], "x" * 513)


def test_a_tenant_registers_at_most_its_bound_of_endpoints(db, tmp_path, receiver):
    bounded = WebhookStore(db, settings_for(tmp_path, max_webhooks_per_tenant=2))
    for _ in range(2):
        bounded.create(TENANT, receiver.url, ["job.succeeded"])
    with pytest.raises(ResourceExhausted, match="GRAFT_MAX_WEBHOOKS_PER_TENANT"):
        bounded.create(TENANT, receiver.url, ["job.succeeded"])
    bounded.create(OTHER, receiver.url, ["job.succeeded"])  # another tenant's count is its own


def test_listing_is_paged_newest_first(store, receiver):
    ids = [store.create(TENANT, receiver.url, ["job.succeeded"]).webhook.id for _ in range(3)]
    first, token = store.list(TENANT, 2, None)
    rest, end = store.list(TENANT, 2, token)
    assert [w.id for w in first + rest] == ids[::-1] and end is None


def test_another_tenants_endpoint_answers_like_an_unknown_one(store, receiver):
    hook = store.create(TENANT, receiver.url, ["job.succeeded"]).webhook
    store.ping(TENANT, hook.id)
    calls = [store.get, store.delete, store.ping, lambda t, i: store.deliveries(t, i, 10, None)]
    for call in calls:
        with pytest.raises(NotFound) as theirs:
            call(OTHER, hook.id)
        with pytest.raises(NotFound) as unknown:
            call(OTHER, "wh_unknown")
        assert theirs.value.message.replace(hook.id, "?") == unknown.value.message.replace("wh_unknown", "?")
    assert store.list(OTHER, 10, None) == ([], None)
    assert len(deliveries(store, TENANT, hook.id)) == 1  # untouched


# --- events into the outbox ------------------------------------------------------------------------------------


def test_a_finished_job_queues_its_event_for_subscribed_endpoints_only(store, receiver):
    succeeded = store.create(TENANT, receiver.url, ["job.succeeded"]).webhook
    failed = store.create(TENANT, receiver.url, ["job.failed", "job.cancelled"]).webhook
    theirs = store.create(OTHER, receiver.url, ["job.succeeded"]).webhook
    jobs = jobs_of(store)
    job_id = finish_job(jobs, TENANT, JobState.SUCCEEDED)
    [delivery] = deliveries(store, TENANT, succeeded.id)
    assert (delivery.event_type, delivery.state, delivery.attempts) == ("job.succeeded", "pending", 0)
    assert deliveries(store, TENANT, failed.id) == [] and deliveries(store, OTHER, theirs.id) == []
    finish_job(jobs, TENANT, JobState.FAILED)
    queued = jobs.create(TENANT, TrainRequest(dataset_id="ds_1", head_name="h"))
    jobs.request_cancel(queued.id)
    assert [d.event_type for d in deliveries(store, TENANT, failed.id)] == ["job.cancelled", "job.failed"]
    with store.db.session() as session:
        payload = session.scalars(select(WebhookDeliveryRow.payload).where(WebhookDeliveryRow.id == delivery.id)).one()
    assert payload["type"] == "job.succeeded" and payload["data"]["job"] == f"jobs/{job_id}"


def test_a_job_failed_for_its_replicas_deaths_queues_job_failed(store, receiver):
    hook = store.create(TENANT, receiver.url, ["job.failed"]).webhook
    jobs = jobs_of(store)
    job = jobs.create(TENANT, TrainRequest(dataset_id="ds_1", head_name="h"))
    assert jobs.claim_next("dead-replica", 60.0) is not None
    with store.db.session() as session:
        session.execute(update(JobRow).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert jobs.requeue_expired(max_attempts=1)
    [delivery] = deliveries(store, TENANT, hook.id)
    with store.db.session() as session:
        payload = session.scalars(select(WebhookDeliveryRow.payload).where(WebhookDeliveryRow.id == delivery.id)).one()
    assert payload["type"] == "job.failed" and payload["data"]["job"] == f"jobs/{job.id}"
    assert "GRAFT_MAX_JOB_ATTEMPTS" in payload["data"]["error"]


def test_a_version_turning_drifting_queues_its_event_once(tmp_path, receiver):
    from service.store.blobs import BlobStore
    from service.store.heads import HeadRegistry
    from service.store.windows import MonitorWindows
    from tests.unit.test_monitor_windows_store import DRIFT, window
    from tests.unit.test_registry import TENANT as HEAD_TENANT
    from tests.unit.test_registry import create

    db = Database(f"sqlite:///{tmp_path / 'registry.db'}")
    store = WebhookStore(db, settings_for(tmp_path))
    hook = store.create(HEAD_TENANT, receiver.url, ["head_version.drifting"]).webhook
    registry = HeadRegistry(db, BlobStore(tmp_path / "blobs"), Quotas(store.settings))
    create(registry)
    windows = MonitorWindows(db, "a", kept=10)
    windows.add([window(1, 1), window(1, 2, DRIFT), window(1, 3, DRIFT)])
    [delivery] = deliveries(store, HEAD_TENANT, hook.id)
    assert delivery.event_type == EventType.HEAD_VERSION_DRIFTING.value


def test_each_endpoint_keeps_its_newest_deliveries_only(db, tmp_path, receiver):
    bounded = WebhookStore(db, settings_for(tmp_path, webhook_deliveries_kept=3))
    hook = bounded.create(TENANT, receiver.url, ["job.succeeded"]).webhook
    pings = [bounded.ping(TENANT, hook.id).id for _ in range(5)]
    assert {d.id for d in deliveries(bounded, TENANT, hook.id)} == set(pings[-3:])


def test_deleting_an_endpoint_deletes_its_deliveries(store, receiver):
    hook = store.create(TENANT, receiver.url, ["job.succeeded"]).webhook
    store.ping(TENANT, hook.id)
    store.delete(TENANT, hook.id)
    with store.db.session() as session:
        assert session.scalars(select(WebhookDeliveryRow)).all() == []


# --- the delivery worker -----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_delivery_arrives_signed_and_verifies_with_the_client_helper(store, receiver):
    created = store.create(TENANT, receiver.url, ["job.succeeded"])
    finish_job(jobs_of(store), TENANT, JobState.SUCCEEDED)
    assert await deliver(store) == 1
    [request] = receiver.requests
    event = verify_webhook(created.secret, request.headers, request.body)
    assert event["type"] == request.headers["Graft-Event"] == "job.succeeded" and request.path == "/hooks"
    with pytest.raises(WebhookVerificationError):
        verify_webhook(created.secret, request.headers, request.body + b" ")
    [delivery] = deliveries(store, TENANT, created.webhook.id)
    assert (delivery.state, delivery.attempts, delivery.last_status_code) == ("delivered", 1, 200)
    assert delivery.id == request.headers["Graft-Delivery"] and delivery.next_attempt_at is None


@pytest.mark.anyio
async def test_a_failing_receiver_is_retried_after_a_backoff_with_the_same_delivery_id(store, receiver):
    hook = store.create(TENANT, receiver.url, ["job.succeeded"]).webhook
    finish_job(jobs_of(store), TENANT, JobState.SUCCEEDED)
    receiver.statuses = [503]
    assert await deliver(store) == 1
    [failed] = deliveries(store, TENANT, hook.id)
    assert (failed.state, failed.attempts, failed.last_status_code) == ("pending", 1, 503)
    assert "HTTP 503" in (failed.last_error or "")
    assert failed.next_attempt_at - failed.last_attempt_at == timedelta(seconds=60)  # GRAFT_WEBHOOK_BACKOFF_S
    assert await deliver(store) == 0  # not due before its backoff
    make_due(store)
    assert await deliver(store, "replica-b") == 1
    [delivered] = deliveries(store, TENANT, hook.id)
    assert (delivered.state, delivered.attempts, delivered.last_error) == ("delivered", 2, None)
    assert len({r.headers["Graft-Delivery"] for r in receiver.requests}) == 1 and len(receiver.requests) == 2


def test_the_backoff_doubles_up_to_its_cap(db, tmp_path):
    store = WebhookStore(db, settings_for(tmp_path, webhook_backoff_s=10.0, webhook_max_backoff_s=50.0))
    assert [store.backoff_s(attempt) for attempt in (1, 2, 3, 4, 40)] == [10.0, 20.0, 40.0, 50.0, 50.0]


@pytest.mark.anyio
async def test_a_delivery_fails_for_good_after_its_last_attempt(db, tmp_path, receiver):
    store = WebhookStore(db, settings_for(tmp_path, webhook_max_attempts=2))
    hook = store.create(TENANT, receiver.url, ["job.succeeded"]).webhook
    store.ping(TENANT, hook.id)
    receiver.statuses = [500, 500, 500]
    for _ in range(2):
        make_due(store)
        assert await deliver(store) == 1
    make_due(store)
    assert await deliver(store) == 0
    [delivery] = deliveries(store, TENANT, hook.id)
    assert (delivery.state, delivery.attempts, delivery.next_attempt_at) == ("failed", 2, None)


@pytest.mark.anyio
async def test_a_redirect_is_not_followed(store, receiver):
    hook = store.create(TENANT, receiver.url, ["job.succeeded"]).webhook
    store.ping(TENANT, hook.id)
    receiver.statuses = [302]
    await deliver(store)
    [delivery] = deliveries(store, TENANT, hook.id)
    assert (delivery.state, delivery.last_status_code) == ("pending", 302) and len(receiver.requests) == 1


@pytest.mark.anyio
async def test_an_address_refused_since_registration_is_not_sent_to(db, tmp_path, receiver):
    """The operator withdrew the allowance (or the name now resolves elsewhere): the next try is refused."""
    hook = WebhookStore(db, settings_for(tmp_path)).create(TENANT, receiver.url, ["job.succeeded"]).webhook
    closed = WebhookStore(db, Settings(data_dir=tmp_path))
    closed.ping(TENANT, hook.id)
    await deliver(closed)
    [delivery] = deliveries(closed, TENANT, hook.id)
    assert SETTING in (delivery.last_error or "") and delivery.last_status_code is None
    assert receiver.requests == []


@pytest.mark.anyio
async def test_a_receiver_that_does_not_answer_is_a_failed_try(db, tmp_path):
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        store = WebhookStore(db, settings_for(tmp_path, webhook_timeout_s=0.2))
        hook = store.create(TENANT, f"http://127.0.0.1:{listener.getsockname()[1]}/", ["job.succeeded"]).webhook
        store.ping(TENANT, hook.id)
        await deliver(store)
    [delivery] = deliveries(store, TENANT, hook.id)
    assert (delivery.state, delivery.last_error) == ("pending", "timed out")


@pytest.mark.anyio
async def test_a_receiver_that_answers_a_byte_at_a_time_is_cut_off_at_the_timeout(db, tmp_path):
    """GRAFT_WEBHOOK_TIMEOUT_S bounds the whole try: a socket timeout alone would wait that long per byte."""
    stop = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def dribble() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.sendall(b"HTTP/1.1 200 OK\r\n")
                while not stop.is_set():
                    try:
                        connection.sendall(b"X")
                    except OSError:
                        return
                    stop.wait(0.05)

        thread = threading.Thread(target=dribble, daemon=True)
        thread.start()
        store = WebhookStore(db, settings_for(tmp_path, webhook_timeout_s=0.5))
        hook = store.create(TENANT, f"http://127.0.0.1:{listener.getsockname()[1]}/", ["job.succeeded"]).webhook
        store.ping(TENANT, hook.id)
        try:
            await deliver(store)
        finally:
            stop.set()
            thread.join()
    [delivery] = deliveries(store, TENANT, hook.id)
    assert (delivery.state, delivery.last_error) == ("pending", "timed out")


@pytest.fixture
def tls_receiver(tmp_path: Path) -> Iterator[tuple[str, Path, list[bytes]]]:
    """An HTTPS receiver on 127.0.0.1 with a self-signed certificate: (its URL, the certificate, bodies received)."""
    cert, key = self_signed(tmp_path)
    bodies: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}/tls", cert, bodies
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.anyio
async def test_https_checks_the_receivers_certificate(store, tls_receiver, monkeypatch):
    url, cert, bodies = tls_receiver
    hook = store.create(TENANT, url, ["job.succeeded"]).webhook
    store.ping(TENANT, hook.id)
    await deliver(store)
    [refused] = deliveries(store, TENANT, hook.id)
    assert refused.state == "pending" and "CERTIFICATE_VERIFY_FAILED" in (refused.last_error or "")
    assert bodies == []
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the receiver's CA trusted, as a system root would be
    make_due(store)
    await deliver(store)
    [delivered] = deliveries(store, TENANT, hook.id)
    assert (delivered.state, delivered.last_status_code) == ("delivered", 204) and len(bodies) == 1


def test_two_replicas_never_claim_one_delivery(registry_url, tmp_path, receiver):
    replicas = [WebhookStore(Database(registry_url), settings_for(tmp_path)) for _ in range(2)]
    hook = replicas[0].create(TENANT, receiver.url, ["job.succeeded"]).webhook
    for _ in range(10):
        replicas[0].ping(TENANT, hook.id)
    with ThreadPoolExecutor(2) as pool:
        claims = list(pool.map(lambda pair: pair[1].claim(pair[0], 10), [("a", replicas[0]), ("b", replicas[1])]))
    ids = [c.id for claimed in claims for c in claimed]
    assert len(ids) == 10 and len(set(ids)) == 10


def test_tenants_take_turns_in_a_round_of_claims(store, receiver):
    """A tenant with a backlog of due deliveries does not fill a round while another tenant's wait."""
    busy = store.create(TENANT, receiver.url, ["job.succeeded"]).webhook
    quiet = store.create(OTHER, receiver.url, ["job.succeeded"]).webhook
    for _ in range(6):
        store.ping(TENANT, busy.id)
    store.ping(OTHER, quiet.id)
    claimed = store.claim("replica-a", 2)
    assert sorted(c.payload["data"]["webhook"] for c in claimed) == sorted(
        [f"webhooks/{busy.id}", f"webhooks/{quiet.id}"]
    )


def test_a_dead_replicas_claim_expires_and_another_takes_the_delivery(store, receiver):
    hook = store.create(TENANT, receiver.url, ["job.succeeded"]).webhook
    store.ping(TENANT, hook.id)
    [taken] = store.claim("dead", 10)
    assert store.claim("alive", 10) == []  # held
    with store.db.session() as session:
        session.execute(update(WebhookDeliveryRow).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    [retaken] = store.claim("alive", 10)
    assert retaken.id == taken.id and retaken.attempt == 2
    assert not store.record("dead", taken, 200, None)  # the dead one's late answer changes nothing
    assert store.record("alive", retaken, 200, None)


# --- both doors, through both clients ----------------------------------------------------------------------------


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    """A runtime with no backbone (webhooks need none) that allows the loopback receiver."""
    runtime = Runtime.around(Core.open(settings_for(tmp_path, webhook_backoff_s=60.0), backbones=[]))
    for tenant in (TENANT, OTHER):
        runtime.tenants.create_tenant(tenant)
    return runtime


@pytest.fixture
def keys(runtime: Runtime) -> dict[str, str]:
    return {tenant: runtime.tenants.create_key(tenant).secret for tenant in (TENANT, OTHER)}


@asynccontextmanager
async def clients(runtime: Runtime, keys: dict[str, str], door: str) -> AsyncIterator[dict[str, Client]]:
    """One client per tenant over ``door``."""
    if door == "http":
        with serve_http(runtime) as port:
            opened = {t: HttpClient(f"http://127.0.0.1:{port}", key) for t, key in keys.items()}
            try:
                yield opened
            finally:
                for client in opened.values():
                    client.close()
        return
    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    opened = {t: GrpcClient(f"127.0.0.1:{server.port}", key) for t, key in keys.items()}
    try:
        yield opened
    finally:
        for client in opened.values():
            client.close()
        await server.stop(grace=1)


@pytest.mark.anyio
@pytest.mark.parametrize("door", ["http", "grpc"])
async def test_both_doors_create_get_list_test_and_delete_a_webhook(runtime, keys, receiver, door):
    async with clients(runtime, keys, door) as by_tenant:
        client = by_tenant[TENANT]
        created = await asyncio.to_thread(client.create_webhook, receiver.url, ["job.succeeded"], "ops")
        assert created.secret and created.secret.startswith("whsec_") and created.event_types == ["job.succeeded"]
        fetched = await asyncio.to_thread(client.get_webhook, created.name)
        assert fetched.secret is None and fetched.url == receiver.url and fetched.description == "ops"
        assert [w.name for w in await asyncio.to_thread(client.list_webhooks)] == [created.name]
        ping = await asyncio.to_thread(client.test_webhook, created.name)
        assert (ping.event_type, ping.state, ping.attempts, ping.last_status_code) == (
            "webhook.test",
            "pending",
            0,
            None,
        )
        assert await deliver(runtime.webhooks) == 1
        [delivered] = await asyncio.to_thread(client.list_webhook_deliveries, created.name)
        assert (delivered.name, delivered.state, delivered.last_status_code) == (ping.name, "delivered", 200)
        verify_webhook(created.secret, receiver.requests[0].headers, receiver.requests[0].body)
        await asyncio.to_thread(client.delete_webhook, created.name)
        assert await asyncio.to_thread(client.list_webhooks) == []


@pytest.mark.anyio
@pytest.mark.parametrize("door", ["http", "grpc"])
async def test_both_doors_refuse_an_internal_address_at_registration_with_the_setting_named(runtime, keys, door):
    async with clients(runtime, keys, door) as by_tenant:
        for url in ("http://10.0.0.1/x", "http://169.254.169.254/latest/meta-data", "http://127.0.0.2:3000/x"):
            with pytest.raises(ClientInvalidArgument, match=SETTING):  # 127.0.0.2: outside the allowed 127.0.0.1/32
                await asyncio.to_thread(by_tenant[TENANT].create_webhook, url, ["job.succeeded"])
        with pytest.raises(ClientInvalidArgument, match="unknown webhook event"):
            await asyncio.to_thread(by_tenant[TENANT].create_webhook, "http://127.0.0.1/x", ["job.exploded"])
        with pytest.raises(ClientInvalidArgument, match="description"):
            await asyncio.to_thread(by_tenant[TENANT].create_webhook, "http://127.0.0.1/x", ["job.failed"], "x" * 513)


@pytest.mark.anyio
@pytest.mark.parametrize("door", ["http", "grpc"])
async def test_another_tenants_webhook_answers_not_found_over_both_doors(runtime, keys, receiver, door):
    async with clients(runtime, keys, door) as by_tenant:
        created = await asyncio.to_thread(by_tenant[TENANT].create_webhook, receiver.url, ["job.failed"])
        theirs = by_tenant[OTHER]
        for call in (theirs.get_webhook, theirs.delete_webhook, theirs.test_webhook, theirs.list_webhook_deliveries):
            with pytest.raises(ClientNotFound):
                await asyncio.to_thread(call, created.name)
        assert await asyncio.to_thread(theirs.list_webhooks) == []
        assert len(await asyncio.to_thread(by_tenant[TENANT].list_webhooks)) == 1


def test_the_clients_event_types_and_delivery_states_are_the_servers():
    assert models.WEBHOOK_EVENTS == tuple(e.value for e in SUBSCRIBABLE)
    assert models.DELIVERY_STATES == tuple(state.value for state in DeliveryState)


@pytest.mark.anyio
async def test_the_cli_adds_lists_tests_shows_deliveries_and_deletes_a_webhook(
    runtime, keys, receiver, monkeypatch, capsys
):
    monkeypatch.setenv("GRAFT_CONFIG", "/nonexistent/graft.toml")
    monkeypatch.setenv("GRAFT_API_KEY", keys[TENANT])

    async def graft(*argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(cli.main, ["--url", url, "webhooks", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    with serve_http(runtime) as port:
        url = f"http://127.0.0.1:{port}"
        code, secret, note = await graft("add", receiver.url, "--event", "job.succeeded", "--event", "job.failed")
        assert code == 0 and secret.strip().startswith("whsec_") and "not shown again" in note
        name = note.split(":")[0]
        code, listed, _ = await graft("list")
        assert code == 0 and name in listed and "job.succeeded,job.failed" in listed
        code, queued, _ = await graft("test", name)
        assert code == 0 and "webhook.test queued" in queued
        await deliver(runtime.webhooks)
        code, log, _ = await graft("deliveries", name)
        assert code == 0 and log.splitlines()[1].split()[1:5] == ["webhook.test", "delivered", "1", "200"]
        verify_webhook(secret.strip(), receiver.requests[0].headers, receiver.requests[0].body)
        code, _, refused = await graft("add", "http://169.254.169.254/", "--event", "job.failed")
        assert code != 0 and SETTING in refused
        with pytest.raises(SystemExit):
            cli.main(["--url", url, "webhooks", "add", receiver.url, "--event", "job.exploded"])
        assert "invalid choice: 'job.exploded'" in capsys.readouterr().err
        assert (await graft("delete", name))[0] == 0
        assert name not in (await graft("list"))[1]
