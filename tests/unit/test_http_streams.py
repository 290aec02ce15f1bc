"""The HTTP door's event stream in-process (the real app, runtime and backbone): a revoked key ends it."""

import asyncio
import io

import httpx
import pytest
from PIL import Image

from service.http.app import create_app
from service.runtime import Runtime
from service.training import TrainRequest

pytestmark = pytest.mark.anyio


def png(colour: tuple[int, int, int], side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def runtime(make_core, tmp_path) -> Runtime:
    """Jobs are never started here: a submitted job stays queued, and its watcher stays open."""
    core = make_core(tmp_path)
    core.settings.key_recheck_s = 0.1
    return Runtime.around(core)


async def test_a_revoked_key_ends_an_open_job_watch_with_an_error_event(runtime):
    runtime.tenants.create_tenant("acme")
    key = runtime.tenants.create_key("acme")
    examples = [
        (f"{c}{i}.png", png(colour, 8 + i), c)
        for c, colour in (("r", (200, 0, 0)), ("b", (0, 0, 200)))
        for i in range(10)
    ]
    dataset = runtime.core.datasets.create("acme", "colours", examples)
    job = await runtime.jobs.submit("acme", TrainRequest(dataset_id=dataset.id, head_name="colours"))

    app = create_app(runtime.settings, lambda: runtime)
    streaming = asyncio.Event()

    async def observed(scope, receive, send):
        async def spy(message):
            if message["type"] == "http.response.start":
                streaming.set()
            await send(message)

        await app(scope, receive, spy)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=observed), base_url="http://graft") as client:
        watch = asyncio.ensure_future(
            client.get(f"/v1/jobs/{job.id}:watch", headers={"Authorization": f"Bearer {key.secret}"})
        )
        await streaming.wait()
        await asyncio.to_thread(runtime.tenants.revoke_key, key.key_id)
        response = await asyncio.wait_for(watch, 60)  # complete only once the server ended the stream
    assert response.status_code == 200
    events = response.text.strip().split("\n\n")
    assert events[0].startswith("data: ") and '"state":"queued"' in events[0]
    assert events[-1].startswith("event: error\ndata: ") and '"code": "unauthenticated"' in events[-1]
