"""What a runtime holds is its own: runtimes in one process share no pool, and a stopped one leaves no thread."""

import asyncio
import threading
import time
from pathlib import Path

import pytest

from service import app
from service.calls import run_in
from service.config import Settings
from service.errors import NotFound, ResourceExhausted
from service.runtime import Runtime

pytestmark = pytest.mark.anyio

POOL_PREFIXES = ("store_", "auth_", "probe_", "upload_", "export_", "watch_", "webhook_")


def open_runtime(data_dir: Path, **settings) -> Runtime:
    return Runtime.open(Settings(data_dir=data_dir, auth="open", backbones=[], **settings))


def pool_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name.startswith(POOL_PREFIXES)}


class Peak:
    """A blocking call that records how many of its kind run at once."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.1)
        with self._lock:
            self.running -= 1


async def test_a_busy_store_pool_in_one_runtime_does_not_hold_up_another_runtimes_store_calls(tmp_path):
    busy = open_runtime(tmp_path / "busy", store_threads=1)
    other = open_runtime(tmp_path / "other", store_threads=1)
    release = threading.Event()
    held = asyncio.ensure_future(busy.in_thread(release.wait))
    try:
        assert await asyncio.wait_for(other.in_thread(lambda: "answered"), 5) == "answered"
        assert not held.done()
    finally:
        release.set()
        await held
        await busy.stop()
        await other.stop()


async def test_a_stopped_runtime_leaves_no_pool_threads_behind(tmp_path):
    before = pool_threads()
    runtime = open_runtime(tmp_path)
    await runtime.start()  # the readiness probe takes its thread
    await runtime.in_thread(lambda: None)
    assert await runtime.authenticate(None) == "default"
    await run_in(runtime.pools.upload, lambda: None)
    await runtime.exports.run("acme", lambda: None)
    with pytest.raises(NotFound):  # read in a watch thread
        await anext(runtime.jobs.watch("default", "no-such-job"))
    await runtime.deliveries.deliver_due()  # claims in a webhook thread
    started = pool_threads() - before
    assert {thread.name.split("_")[0] for thread in started} == {
        "store",
        "auth",
        "probe",
        "upload",
        "export",
        "watch",
        "webhook",
    }
    await runtime.stop()
    for thread in started:
        await asyncio.to_thread(thread.join, 5)
    assert [thread.name for thread in started if thread.is_alive()] == []


async def test_store_and_upload_calls_run_as_many_at_once_as_configured(tmp_path):
    runtime = open_runtime(tmp_path, store_threads=2, upload_threads=3)
    store, upload = Peak(), Peak()
    try:
        await asyncio.gather(*(runtime.in_thread(store) for _ in range(6)))
        await asyncio.gather(*(run_in(runtime.pools.upload, upload) for _ in range(6)))
    finally:
        await runtime.stop()
    assert (store.most, upload.most) == (2, 3)


async def test_exports_waiting_in_one_runtime_do_not_count_in_another(tmp_path):
    """GRAFT_MAX_WAITING_EXPORTS=1: one export runs and one waits in the busy runtime, which refuses a third;
    the other runtime's queue is empty, so its export runs at once."""
    busy = open_runtime(tmp_path / "busy", max_waiting_exports=1)
    other = open_runtime(tmp_path / "other", max_waiting_exports=1)
    started, release = threading.Event(), threading.Event()

    def held() -> str:
        started.set()
        release.wait()
        return "held"

    running = asyncio.ensure_future(busy.exports.run("acme", held))
    waiting = asyncio.ensure_future(busy.exports.run("globex", lambda: "waited"))
    try:
        await asyncio.to_thread(started.wait, 5)
        await asyncio.sleep(0)  # the waiting export has taken its place
        with pytest.raises(ResourceExhausted, match="retry"):
            await busy.exports.run("initech", lambda: "refused")
        assert await asyncio.wait_for(other.exports.run("initech", lambda: "at once"), 5) == "at once"
    finally:
        release.set()
        assert await asyncio.gather(running, waiting) == ["held", "waited"]
        await busy.stop()
        await other.stop()


def test_the_service_takes_the_bentos_weights_only_where_no_weights_dir_is_set(monkeypatch, tmp_path):
    monkeypatch.setattr(app, "bento_weights_dir", lambda: tmp_path / "bento")
    monkeypatch.delenv("GRAFT_WEIGHTS_DIR", raising=False)
    assert app.service_settings().weights_dir == tmp_path / "bento"
    monkeypatch.setenv("GRAFT_WEIGHTS_DIR", str(tmp_path / "pinned"))
    assert app.service_settings().weights_dir == tmp_path / "pinned"
