"""Decoding threads, and on a CPU the trunk workers that run batches side by side, run torch single-threaded
without narrowing any other thread's width."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from adapters.kinds import HeadKind
from harness.sample_data import textile_files
from service.engine.device import use_one_torch_thread
from service.engine.head_cache import HeadCache
from service.engine.predictor import Predictor
from tests.unit.test_engine import TENANT, save_random_head

pytestmark = pytest.mark.anyio


def width_on(executor: ThreadPoolExecutor) -> int:
    return executor.submit(torch.get_num_threads).result()


def test_one_torch_thread_applies_to_the_initialized_thread_only():
    width = torch.get_num_threads()
    with ThreadPoolExecutor(1, initializer=use_one_torch_thread) as narrow:
        assert width_on(narrow) == 1
        with ThreadPoolExecutor(1) as started_later:
            assert width_on(started_later) == width
    assert torch.get_num_threads() == width


async def test_the_predictor_decodes_on_single_threaded_torch_and_still_answers(tmp_path, make_core):
    core = make_core(tmp_path)
    save_random_head(core, "h", HeadKind.LINEAR)
    _, jpeg, _ = textile_files(per_class=1)[0]
    predictor = Predictor(core.backbones, HeadCache(core.heads, core.backbones, 1 << 30), core.settings)
    try:
        [answer] = await predictor.predict(TENANT, [jpeg], ["h"])
        assert answer.heads[0].head == "h" and answer.heads[0].top
        assert width_on(predictor._decode) == 1
        batcher = predictor.batchers[core.settings.default_backbone]
        assert batcher.workers == torch.get_num_threads()  # CPU: one batch at once per torch thread
        assert width_on(batcher._executor) == (1 if batcher.workers > 1 else torch.get_num_threads())
    finally:
        await predictor.stop()
