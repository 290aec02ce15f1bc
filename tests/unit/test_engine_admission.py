"""The predictor's bound under load: the images admitted never exceed GRAFT_MAX_QUEUE_IMAGES."""

import asyncio

import pytest
from test_engine import TENANT, HeadKind, png, save_random_head

from service.core import Core
from service.engine.head_cache import HeadCache
from service.engine.predictor import Predictor
from service.errors import ResourceExhausted

pytestmark = pytest.mark.anyio


@pytest.fixture
def core(tmp_path, make_core) -> Core:
    return make_core(tmp_path)


def predictor_with_queue(core: Core, max_queue_images: int) -> Predictor:
    settings = core.settings.model_copy(update={"max_queue_images": max_queue_images})
    return Predictor(core.backbones, HeadCache(core.heads, core.backbones, 1 << 30), settings)


async def test_requests_beyond_the_queue_are_refused_at_once_and_the_admitted_ones_answered(core):
    save_random_head(core, "h", HeadKind.LINEAR)
    predictor = predictor_with_queue(core, 4)
    try:
        await predictor.predict(TENANT, [png(0)], ["h"])  # the head is loaded: admission is the only wait
        outcomes = await asyncio.gather(
            *(predictor.predict(TENANT, [png(i)], ["h"]) for i in range(12)), return_exceptions=True
        )
        again = await predictor.predict(TENANT, [png(1), png(2), png(3), png(4)], ["h"])
    finally:
        await predictor.stop()
    refused = [o for o in outcomes if isinstance(o, ResourceExhausted)]
    answered = [o for o in outcomes if isinstance(o, list)]
    assert len(answered) == 4 and len(refused) == 8
    assert "GRAFT_MAX_QUEUE_IMAGES" in str(refused[0]) and refused[0].retry_after_s > 0
    assert len(again) == 4  # refused work holds no slot: the full queue is free again afterwards


async def test_a_request_with_more_images_than_the_queue_holds_is_refused(core):
    save_random_head(core, "h", HeadKind.LINEAR)
    predictor = predictor_with_queue(core, 2)
    try:
        with pytest.raises(ResourceExhausted, match="limit 2"):
            await predictor.predict(TENANT, [png(1), png(2), png(3)], ["h"])
    finally:
        await predictor.stop()


async def test_a_failed_request_gives_its_slots_back(core):
    save_random_head(core, "h", HeadKind.LINEAR)
    predictor = predictor_with_queue(core, 2)
    try:
        for _ in range(3):
            with pytest.raises(Exception, match="image 0"):
                await predictor.predict(TENANT, [b"not an image", png(1)], ["h"])
        answered = await predictor.predict(TENANT, [png(1), png(2)], ["h"])
    finally:
        await predictor.stop()
    assert len(answered) == 2
