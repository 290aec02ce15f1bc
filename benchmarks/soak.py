"""Soak: tenants predicting at high concurrency while other tenants upload, train, move aliases and delete versions.

Against a real ``bentoml serve`` on loopback (API keys on), bounded in time, stops by itself:
- two *reader* tenants each own a trained head; workers predict on them without pause, half over HTTP JSON and
  half over gRPC ``Predict``, through ``probe``, ``probe@1`` and ``probe:latest``;
- first an idle phase (only the readers), then a busy phase in which two *writer* tenants (one over HTTP, one over
  gRPC) upload a dataset, train linear and finetune versions of a head, point an alias at each new version,
  predict through the alias, delete old versions and check that a deleted version is never served;
- then a hostile phase in which one more tenant tries what the service bounds: idle gRPC upload streams that send
  only their header, 200 job watches at once on a running finetune job, predictions that name 16 references to a
  head whose many versions carry large metrics (a confusion matrix of many classes each), and requests to
  ``/metrics`` and to distinct unknown paths without a key. The readers' figures must not move.

Every answer is checked against the expected answer for its image and the head version it reports (taken from
``name@version`` right after that version was trained). Prints one JSON object last with ``requests``,
``errors_5xx``, ``wrong_answers``, ``p99_idle_ms``, ``p99_during_training_ms``, ``hostile_phase_p99_ms``,
``hostile_phase_errors`` (the readers' failed or wrong answers during the hostile phase) and ``rss_growth_fraction``
(the server's resident memory at the end against after warm-up), with the details that explain them.

    python benchmarks/soak.py            # the full run quoted in the README (a few minutes)
    python benchmarks/soak.py --short    # the bounded run that `make test` does (tests/e2e/test_soak.py)
"""

import argparse
import asyncio
import base64
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil

from harness.sample_data import textile_files
from harness.servers import Server, make_tenant_key, start_server, wait_for_job
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc

SCORE_TOLERANCE = 1e-3  # batch composition changes float summation order, never the answer beyond this
QUICK_LINEAR = {"lr": [1.0], "weight_decay": [0.01]}


@dataclass(frozen=True)
class Profile:
    concurrency: int
    warmup_s: float
    idle_s: float
    busy_limit_s: float  # the busy phase ends when the writers finish, or at this limit
    reader_images_per_class: int
    writer_images_per_class: int
    finetune_epochs: int
    hostile_s: float
    hostile_classes: int  # classes of the hostile tenant's head: each version's confusion matrix is this squared
    hostile_versions: int


PROFILES = {
    "short": Profile(
        concurrency=8,
        warmup_s=4,
        idle_s=10,
        busy_limit_s=240,
        reader_images_per_class=8,
        writer_images_per_class=8,
        finetune_epochs=2,
        hostile_s=10,
        hostile_classes=40,
        hostile_versions=4,
    ),
    "full": Profile(
        concurrency=32,
        warmup_s=15,
        idle_s=60,
        busy_limit_s=900,
        reader_images_per_class=24,
        writer_images_per_class=30,
        finetune_epochs=6,
        hostile_s=60,
        hostile_classes=200,
        hostile_versions=8,
    ),
}


@dataclass
class Tally:
    """What the checks found; shared by the load workers (event loop) and the writers (threads)."""

    requests: int = 0
    errors_5xx: int = 0
    wrong_answers: int = 0
    refused_429: int = 0
    other_4xx: int = 0
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def failures(self) -> int:
        """Answers a well-behaved tenant should never get: server errors, wrong answers, refusals."""
        return self.errors_5xx + self.wrong_answers + self.refused_429 + self.other_4xx

    def count(self, outcome: str, problem: str | None = None) -> None:
        with self.lock:
            self.requests += 1
            if outcome != "ok":
                setattr(self, outcome, getattr(self, outcome) + 1)
            if problem is not None and len(self.problems) < 20:
                self.problems.append(problem)


# An expected answer: the top labels with their scores.
Answer = list[tuple[str, float]]


def same_answer(got: Answer, expected: Answer) -> bool:
    """Same labels in the same order and scores within tolerance (a near-tie may swap, within tolerance)."""
    if len(got) != len(expected):
        return False
    for (label, score), (want_label, want_score) in zip(got, expected, strict=True):
        if abs(score - want_score) > SCORE_TOLERANCE:
            return False
        if label != want_label and not any(abs(s - score) <= SCORE_TOLERANCE for lbl, s in expected if lbl == label):
            return False
    return True


def http_outcome(status: int) -> str:
    if status >= 500:
        return "errors_5xx"
    if status == 429:
        return "refused_429"
    return "other_4xx"


GRPC_SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}


def grpc_outcome(code: grpc.StatusCode) -> str:
    if code in GRPC_SERVER_FAULTS or code == grpc.StatusCode.UNAVAILABLE:
        return "errors_5xx"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "refused_429"
    return "other_4xx"


def answer_of_json(head: dict) -> Answer:
    return [(t["label"], t["score"]) for t in head["top"]]


def answer_of_pb(head) -> Answer:
    return [(t.label, t.score) for t in head.top]


# -- setup -----------------------------------------------------------------------------------------------------


def upload_http(client: httpx.Client, examples, name: str) -> str:
    files = [("files", (file_name, data, "image/jpeg")) for file_name, data, _ in examples]
    response = client.post(
        "/v1/datasets", data={"display_name": name, "labels": [label for *_, label in examples]}, files=files
    )
    response.raise_for_status()
    return response.json()["name"]


def train_http(client: httpx.Client, dataset: str, head: str, **spec) -> int:
    """Submit a job on ``dataset`` (datasets/{id}) and poll it to the end; returns the head version it stored."""
    response = client.post("/v1/jobs", json={"dataset": dataset, "head": head, **spec})
    response.raise_for_status()
    job = wait_for_job(client, response.json()["name"])
    if job["state"] != "succeeded":
        raise RuntimeError(f"job {job['name']} ended {job['state']}: {job.get('error')}")
    return int(job["head_version"].rsplit("/", 1)[1])  # heads/{head}/versions/{version}


def expected_answers(client: httpx.Client, ref: str, images: list[bytes]) -> list[Answer]:
    body = {"images": [base64.b64encode(image).decode() for image in images], "heads": [ref], "top_k": 3}
    response = client.post("/v1/predict", json=body)
    response.raise_for_status()
    return [answer_of_json(p["heads"][0]) for p in response.json()["predictions"]]


# -- the prediction load (readers) ----------------------------------------------------------------------------


@dataclass
class Reader:
    key: str
    expected: list[Answer]  # per probe image, for probe@1


async def load(
    server: Server,
    readers: list[Reader],
    probes: list[bytes],
    tally: Tally,
    concurrency: int,
    stop: asyncio.Event,
    latencies: list[float],
) -> None:
    """``concurrency`` workers predicting until ``stop``; every answer checked; latencies appended (ms)."""
    refs = ["probe", "probe@1", "probe:latest"]
    encoded = [base64.b64encode(image).decode() for image in probes]

    async def http_worker(worker: int, client: httpx.AsyncClient) -> None:
        i = worker
        while not stop.is_set():
            reader, image, ref = readers[i % len(readers)], i % len(probes), refs[i % len(refs)]
            body = {"images": [encoded[image]], "heads": [ref], "top_k": 3}
            started = time.perf_counter()
            try:
                response = await client.post(
                    "/v1/predict", json=body, headers={"Authorization": f"Bearer {reader.key}"}
                )
            except httpx.HTTPError as exc:
                tally.count("errors_5xx", f"http transport error: {exc!r}")
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                tally.count(http_outcome(response.status_code), f"http {response.status_code}: {response.text[:200]}")
            else:
                head = response.json()["predictions"][0]["heads"][0]
                ok = head["version"] == 1 and same_answer(answer_of_json(head), reader.expected[image])
                tally.count("ok" if ok else "wrong_answers", None if ok else f"http wrong answer: {head}")
            i += concurrency

    async def grpc_worker(worker: int, stub: rpc.PredictionServiceStub) -> None:
        i = worker
        while not stop.is_set():
            reader, image, ref = readers[i % len(readers)], i % len(probes), refs[i % len(refs)]
            request = api.PredictRequest(images=[probes[image]], heads=[ref], top_k=3)
            started = time.perf_counter()
            try:
                reply = await stub.Predict(request, metadata=[("authorization", f"Bearer {reader.key}")], timeout=60)
            except grpc.aio.AioRpcError as exc:
                latencies.append((time.perf_counter() - started) * 1000)
                tally.count(grpc_outcome(exc.code()), f"grpc {exc.code().name}: {exc.details()}")
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            head = reply.predictions[0].heads[0]
            ok = head.version == 1 and same_answer(answer_of_pb(head), reader.expected[image])
            tally.count("ok" if ok else "wrong_answers", None if ok else f"grpc wrong answer: {head}")
            i += concurrency

    limits = httpx.Limits(max_connections=concurrency)
    async with (
        httpx.AsyncClient(base_url=server.http_url, timeout=60, limits=limits) as client,
        grpc.aio.insecure_channel(server.grpc_target) as channel,
    ):
        stub = rpc.PredictionServiceStub(channel)
        workers = [http_worker(w, client) if w % 2 == 0 else grpc_worker(w, stub) for w in range(concurrency)]
        await asyncio.gather(*workers)


# -- the writers -------------------------------------------------------------------------------------------------


class Writer:
    """A tenant that changes its head while others predict, and checks every answer it gets on the way.

    ``door`` is how it uploads and predicts: "http" or "grpc" (training, aliases and deletes go over HTTP).
    """

    def __init__(self, server: Server, key: str, door: str, profile: Profile, probes: list[bytes], tally: Tally):
        self.server, self.key, self.door, self.profile, self.probes, self.tally = (
            server,
            key,
            door,
            profile,
            probes,
            tally,
        )
        self.expected: dict[int, list[Answer]] = {}  # version -> answers for the probes
        self.deleted: set[int] = set()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        per_class = self.profile.writer_images_per_class
        with httpx.Client(base_url=self.server.http_url, headers=headers, timeout=120) as client:
            examples = textile_files(per_class=per_class, offset=100)
            three_classes = self.upload(client, examples)
            two_classes = self.upload(client, [e for e in examples if e[2] != "global"])  # new classes, same head
            finetune = {
                "kind": "finetune",
                "finetune_blocks": 2,
                "search": {"lr": [1e-3], "weight_decay": [1e-4]},
                "hyperparams": {
                    "lr": 1e-3,
                    "weight_decay": 1e-4,
                    "epochs": self.profile.finetune_epochs,
                    "batch_size": 16,
                },
            }
            plan = [
                (three_classes, {"search": QUICK_LINEAR}),
                (three_classes, finetune),
                (two_classes, {"search": QUICK_LINEAR}),
            ]
            for step, (dataset, spec) in enumerate(plan):
                version = train_http(client, dataset, "w", **spec)
                self.expected[version] = expected_answers(client, f"w@{version}", self.probes)
                client.put("/v1/heads/w/aliases/prod", json={"version": version}).raise_for_status()
                self.check_alias(client)
                if step > 0:  # delete the previous version: it must never be served again
                    previous = max(v for v in self.expected if v < version and v not in self.deleted)
                    assert client.delete(f"/v1/heads/w/versions/{previous}").status_code == 204
                    self.deleted.add(previous)
                    self.check_deleted_is_gone(client, previous)
                self.check_alias(client)

    def upload(self, client: httpx.Client, examples) -> str:
        if self.door == "http":
            return upload_http(client, examples, "writer")
        with grpc.insecure_channel(self.server.grpc_target) as channel:

            def messages():
                yield api.CreateDatasetRequest(header=api.CreateDatasetRequest.Header(display_name="writer"))
                for file_name, data, label in examples:
                    image = api.CreateDatasetRequest.Image(file_name=file_name, label=label, data=data)
                    yield api.CreateDatasetRequest(image=image)

            dataset = rpc.DatasetServiceStub(channel).CreateDataset(messages(), metadata=self.metadata, timeout=120)
        return dataset.name

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.key}")]

    def predict(self, client: httpx.Client, ref: str) -> tuple[str, list[tuple[int, Answer]]]:
        """('ok', [(version, answer) per probe]) or (outcome, []) for a refused call."""
        if self.door == "http":
            body = {"images": [base64.b64encode(p).decode() for p in self.probes], "heads": [ref], "top_k": 3}
            response = client.post("/v1/predict", json=body)
            if response.status_code != 200:
                return http_outcome(response.status_code) if response.status_code != 404 else "not_found", []
            return "ok", [
                (p["heads"][0]["version"], answer_of_json(p["heads"][0])) for p in response.json()["predictions"]
            ]
        with grpc.insecure_channel(self.server.grpc_target) as channel:
            try:
                reply = rpc.PredictionServiceStub(channel).Predict(
                    api.PredictRequest(images=self.probes, heads=[ref], top_k=3), metadata=self.metadata, timeout=60
                )
            except grpc.RpcError as exc:
                return "not_found" if exc.code() == grpc.StatusCode.NOT_FOUND else grpc_outcome(exc.code()), []
        return "ok", [(p.heads[0].version, answer_of_pb(p.heads[0])) for p in reply.predictions]

    def check_alias(self, client: httpx.Client) -> None:
        outcome, answers = self.predict(client, "w:prod")
        if outcome != "ok":
            self.tally.count("wrong_answers" if outcome == "not_found" else outcome, f"w:prod refused: {outcome}")
            return
        for (version, got), image in zip(answers, range(len(self.probes)), strict=True):
            ok = (
                version in self.expected
                and version not in self.deleted
                and same_answer(got, self.expected[version][image])
            )
            self.tally.count("ok" if ok else "wrong_answers", None if ok else f"w:prod answered v{version}: {got}")

    def check_deleted_is_gone(self, client: httpx.Client, version: int) -> None:
        outcome, answers = self.predict(client, f"w@{version}")
        ok = outcome == "not_found"
        self.tally.count("ok" if ok else "wrong_answers", None if ok else f"deleted w@{version} answered {answers[:1]}")


# -- the hostile tenant ------------------------------------------------------------------------------------------


class Hostile:
    """A tenant that tries, in turn, what the service must bound; what it gets back is counted, never checked:
    the readers' answers are what must not change."""

    UPLOAD_STREAMS = 10
    WATCHES = 200
    REFERENCES = 16

    def __init__(self, server: Server, key: str, profile: Profile):
        self.server, self.key, self.profile = server, key, profile
        self.answers: dict[str, int] = {}  # "what it tried: status" -> count
        self.dataset = ""  # many classes, two images each: the head of large versions
        self.watched_dataset = ""  # three classes: a finetune job that runs while it is watched
        self.watched_job = ""

    def setup(self) -> None:
        """A head of many classes with several versions (prototype: instant on cached features)."""
        n = self.profile.hostile_classes
        images = [data for _, data, _ in textile_files(per_class=(2 * n + 2) // 3, offset=200)][: 2 * n]
        examples = [(f"c{i % n}/{i}.jpg", data, f"c{i % n}") for i, data in enumerate(images)]
        with httpx.Client(base_url=self.server.http_url, headers=self.headers, timeout=300) as client:
            self.dataset = upload_http(client, examples, "hostile")
            for _ in range(self.profile.hostile_versions):
                train_http(client, self.dataset, "big", kind="prototype")
            self.watched_dataset = upload_http(client, textile_files(per_class=35, offset=410), "watched")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def tally(self, what: str, status: object) -> None:
        self.answers[f"{what}: {status}"] = self.answers.get(f"{what}: {status}", 0) + 1

    async def run(self, stop: asyncio.Event) -> None:
        async with (
            httpx.AsyncClient(base_url=self.server.http_url, timeout=60) as client,
            grpc.aio.insecure_channel(self.server.grpc_target) as channel,
        ):
            streams = await self.idle_upload_streams(channel, stop)
            watches = await self.watches(client, stop)
            await asyncio.gather(self.many_references(client, stop), self.paths(client, stop))
            for call in streams:
                call.cancel()
            for watch in watches:
                watch.cancel()
            await asyncio.gather(*watches, return_exceptions=True)
            if watches:
                await client.post(f"/v1/{self.watched_job}:cancel", headers=self.headers)

    async def idle_upload_streams(self, channel: grpc.aio.Channel, stop: asyncio.Event) -> list:
        """Upload streams that send their header and then nothing, held open until the phase ends."""

        async def header_then_silence():
            yield api.CreateDatasetRequest(header=api.CreateDatasetRequest.Header(display_name="idle"))
            await stop.wait()

        stub = rpc.DatasetServiceStub(channel)
        metadata = [("authorization", f"Bearer {self.key}")]
        calls = [stub.CreateDataset(header_then_silence(), metadata=metadata) for _ in range(self.UPLOAD_STREAMS)]
        self.tally("idle upload streams", "opened")
        return calls

    async def watches(self, client: httpx.AsyncClient, stop: asyncio.Event) -> list[asyncio.Task]:
        """A finetune job that outlasts the phase, then WATCHES server-sent event streams on it at once, held until
        the phase ends (the job is cancelled then). Its features are new (block outputs, not the pooled ones), and
        extracting them yields to the readers' prediction batches, so the job stays open without taking the trunk."""
        spec = {
            "dataset": self.watched_dataset,
            "head": "watched",
            "kind": "finetune",
            "finetune_blocks": 1,
            "hyperparams": {"epochs": 500, "batch_size": 8, "patience": 500},
            "search": {"lr": [1e-3], "weight_decay": [1e-4]},
        }
        response = await client.post("/v1/jobs", json=spec, headers=self.headers)
        self.tally("finetune job", response.status_code)
        if not response.is_success:
            return []
        self.watched_job = response.json()["name"]

        async def watch() -> None:
            try:
                async with client.stream("GET", f"/v1/{self.watched_job}:watch", headers=self.headers) as stream:
                    self.tally("watch", stream.status_code)
                    async for _ in stream.aiter_bytes():
                        if stop.is_set():
                            return
            except httpx.HTTPError as exc:
                self.tally("watch", type(exc).__name__)

        return [asyncio.create_task(watch()) for _ in range(self.WATCHES)]

    async def many_references(self, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        """One image, 16 references to the versions of a head whose every version carries large metrics."""
        image = base64.b64encode(textile_files(per_class=1, offset=450)[0][1]).decode()
        versions = self.profile.hostile_versions
        refs = [f"big@{1 + i % versions}" if i % 3 else "big:latest" for i in range(self.REFERENCES)]
        body = {"images": [image], "heads": refs}
        while not stop.is_set():
            response = await client.post("/v1/predict", json=body, headers=self.headers)
            self.tally("16-reference prediction", response.status_code)

    async def paths(self, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
        """/metrics and distinct unknown paths, without a key: each path once."""
        i = 0
        while not stop.is_set():
            for path in (f"/metrics?page={i}", f"/v1/heads/secret-{i}", f"/unknown/{i}"):
                response = await client.get(path)
                self.tally(path.split("/")[1].split("?")[0] or "/", response.status_code)
            i += 1
            await asyncio.sleep(0.01)


# -- the run -----------------------------------------------------------------------------------------------------


def server_rss(server: Server) -> int:
    """Resident bytes of the server's whole process tree (BentoML runs the service in a child process)."""
    root = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running())


def p99(latencies: list[float]) -> float:
    return round(float(np.percentile(latencies, 99)), 1) if latencies else float("nan")


def setup_reader(server: Server, name: str, profile: Profile, probes: list[bytes]) -> Reader:
    key = make_tenant_key(server, name)
    with httpx.Client(base_url=server.http_url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        dataset = upload_http(client, textile_files(per_class=profile.reader_images_per_class), name)
        version = train_http(client, dataset, "probe", search=QUICK_LINEAR)
        assert version == 1
        return Reader(key, expected_answers(client, "probe@1", probes))


async def soak(server: Server, profile: Profile) -> dict:
    probes = [data for _, data, _ in textile_files(per_class=2, offset=400)]
    log(f"setting up two reader tenants ({profile.reader_images_per_class} images per class each)")
    readers = [setup_reader(server, name, profile, probes) for name in ("reader-a", "reader-b")]
    tally = Tally()
    writers = [
        Writer(server, make_tenant_key(server, name), door, profile, probes, tally)
        for name, door in (("writer-a", "http"), ("writer-b", "grpc"))
    ]

    async def phase(seconds: float | None, during: threading.Thread | None = None) -> list[float]:
        """The readers' load for ``seconds`` (or while ``during`` runs); their latencies."""
        latencies: list[float] = []
        stop = asyncio.Event()
        worker = asyncio.create_task(load(server, readers, probes, tally, profile.concurrency, stop, latencies))
        deadline = time.monotonic() + (seconds if seconds is not None else profile.busy_limit_s)
        while time.monotonic() < deadline and (during is None or during.is_alive()):
            await asyncio.sleep(0.2)
        stop.set()
        await worker
        return latencies

    log(f"warm-up {profile.warmup_s:g} s at concurrency {profile.concurrency}")
    await phase(profile.warmup_s)
    rss_warm = server_rss(server)
    log(f"idle phase {profile.idle_s:g} s")
    idle = await phase(profile.idle_s)

    errors: list[BaseException] = []

    def write_all() -> None:
        threads = [threading.Thread(target=guarded(writer.run, errors)) for writer in writers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    log("busy phase: writers upload, train linear + finetune, move aliases, delete versions")
    busy_thread = threading.Thread(target=write_all)
    started = time.monotonic()
    busy_thread.start()
    busy = await phase(None, during=busy_thread)
    busy_s = time.monotonic() - started
    busy_thread.join(timeout=5)
    if errors:
        raise RuntimeError(f"a writer failed: {errors[0]!r}") from errors[0]
    if busy_thread.is_alive():
        raise RuntimeError(f"the writers did not finish within {profile.busy_limit_s:g} s")

    hostile = Hostile(server, make_tenant_key(server, "hostile"), profile)
    log(f"hostile tenant: a head of {profile.hostile_classes} classes, {profile.hostile_versions} versions")
    await asyncio.to_thread(hostile.setup)
    log(f"hostile phase {profile.hostile_s:g} s: idle upload streams, 200 watches, 16 references, unknown paths")
    failures_before = tally.failures()
    stop_hostile = asyncio.Event()
    attack = asyncio.create_task(hostile.run(stop_hostile))
    hostile_latencies = await phase(profile.hostile_s)
    stop_hostile.set()
    await attack
    hostile_failures = tally.failures() - failures_before
    rss_end = server_rss(server)

    return {
        "requests": tally.requests,
        "errors_5xx": tally.errors_5xx,
        "wrong_answers": tally.wrong_answers,
        "p99_idle_ms": p99(idle),
        "p99_during_training_ms": p99(busy),
        "rss_growth_fraction": round((rss_end - rss_warm) / rss_warm, 4),
        "hostile_phase_p99_ms": p99(hostile_latencies),
        "hostile_phase_errors": hostile_failures,
        "p99_ratio": round(p99(busy) / p99(idle), 2),
        "hostile_p99_ratio": round(p99(hostile_latencies) / p99(idle), 2),
        "p50_idle_ms": round(float(np.percentile(idle, 50)), 1),
        "p50_during_training_ms": round(float(np.percentile(busy, 50)), 1),
        "idle_ips": round(len(idle) / profile.idle_s, 2),
        "busy_ips": round(len(busy) / busy_s, 2),
        "busy_phase_s": round(busy_s, 1),
        "refused_429": tally.refused_429,
        "other_4xx": tally.other_4xx,
        "rss_warm_mb": round(rss_warm / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "concurrency": profile.concurrency,
        "problems": tally.problems,
        "hostile_answers": hostile.answers,
    }


def guarded(target, errors: list[BaseException]):
    def run() -> None:
        try:
            target()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    return run


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_soak(profile: Profile, data_dir: Path) -> dict:
    """Start a server in ``data_dir``, soak it, stop it; returns the JSON-ready result."""
    server = start_server(
        data_dir,
        GRAFT_AUTH="keys",
        GRAFT_QUOTA_PREDICT_IMAGES_PER_S="100000",  # the soak measures the engine, not the rate limit
        GRAFT_QUOTA_PREDICT_BURST="100000",
    )
    try:
        return asyncio.run(soak(server, profile))
    except BaseException:
        log(server.log())
        raise
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="the bounded run of the test suite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="graft-soak-") as tmp:
        result = run_soak(PROFILES["short" if args.short else "full"], Path(tmp))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
