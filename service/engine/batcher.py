"""The dynamic batcher: one per backbone, shared by every caller and both doors.

Requests (one image each, with the heads it wants) wait in a bounded queue. A
worker takes up to ``max_batch_size`` of them, waiting at most
``max_latency_ms`` after the first for the batch to fill, and runs the batch
in its own thread so the event loop keeps accepting work. While a batch runs,
the next one gathers, so under load batches fill without waiting. On a CPU
there is one worker per torch thread, each single-threaded, so batches run
side by side; on a GPU there is one.

``group_by_head`` makes each batch hold one head only: that is how per-model
servers (e.g. Ray Serve's model multiplexing) batch, kept as a baseline for
the benchmarks.
"""

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast

import torch

from service.engine.backbones import Backbone
from service.engine.device import use_one_torch_thread
from service.engine.execution import BatchOutput, run_batch
from service.engine.head_cache import LoadedHead
from service.errors import ResourceExhausted


@dataclass(eq=False)
class _Request:
    image: torch.Tensor
    heads: list[LoadedHead]
    include_embedding: bool
    future: asyncio.Future = field(repr=False)
    keep_pooled: bool = False  # hand the pooled row back if the batch computed it anyway (monitoring)

    @property
    def group(self) -> tuple:
        return tuple(head.key for head in self.heads)


@dataclass(frozen=True)
class RowResult:
    logits: list[torch.Tensor]  # per requested head, over that head's classes (CPU)
    embedding: torch.Tensor | None


@dataclass
class BatcherStats:
    batches: int = 0
    images: int = 0


class Batcher:
    def __init__(
        self,
        backbone: Backbone,
        *,
        max_batch_size: int = 32,
        max_latency_ms: float = 2.0,
        max_queue: int = 1024,
        group_by_head: bool = False,
        workers: int = 1,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        """``on_batch(batch_size, queue_depth)`` is called as each batch starts (for metrics).

        ``workers`` batches run at once, each on a thread of its own; with more
        than one, each runs torch single-threaded (see Placement.parallel_batches).
        """
        self.backbone = backbone
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000
        self.max_queue = max_queue
        self.group_by_head = group_by_head
        self.on_batch = on_batch
        self.stats = BatcherStats()
        self._queue: deque[_Request] = deque()
        self._arrived = asyncio.Event()
        self.workers = workers
        self._executor = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix=f"trunk-{backbone.name}",
            initializer=use_one_torch_thread if workers > 1 else None,
        )
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._run(), name=f"batcher-{self.backbone.name}-{i}") for i in range(self.workers)
            ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for request in self._queue:
            request.future.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=False)

    async def submit(
        self, image: torch.Tensor, heads: list[LoadedHead], include_embedding: bool = False, keep_pooled: bool = False
    ) -> RowResult:
        """Queue one preprocessed image [3, H, W]; refuse at once when the queue is full.

        ``include_embedding`` makes the trunk run to the pooled features if no head needs them; ``keep_pooled``
        only hands them back when some head of the batch needed them anyway, so it never costs a trunk block.
        """
        if len(self._queue) >= self.max_queue:
            raise ResourceExhausted(
                f"the prediction queue for {self.backbone.name} is full ({self.max_queue} images, "
                "GRAFT_MAX_QUEUE_IMAGES); retry shortly",
                retry_after_s=1.0,
            )
        self.start()
        request = _Request(image, heads, include_embedding, asyncio.get_running_loop().create_future(), keep_pooled)
        self._queue.append(request)
        self._arrived.set()
        return await request.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if self.on_batch is not None:
                self.on_batch(len(batch), len(self._queue))
            try:
                output = await loop.run_in_executor(self._executor, self._execute, batch)
            except Exception as exc:  # a failed batch fails its requests, not the worker
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
                continue
            for request, result in zip(batch, output, strict=True):
                if request.future.done():
                    continue
                if isinstance(result, Exception):  # one of its heads failed: the rest of the batch is fine
                    request.future.set_exception(result)
                else:
                    request.future.set_result(result)

    async def _next_batch(self) -> list[_Request]:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = time.monotonic() + self.max_latency_s
        while len(self._queue) < self.max_batch_size and (remaining := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        return self._take()

    def _take(self) -> list[_Request]:
        if not self.group_by_head:
            count = min(self.max_batch_size, len(self._queue))
            return [self._queue.popleft() for _ in range(count)]
        group = self._queue[0].group
        batch: list[_Request] = []
        rest: deque[_Request] = deque()
        while self._queue:
            request = self._queue.popleft()
            (batch if request.group == group and len(batch) < self.max_batch_size else rest).append(request)
        self._queue = rest
        return batch

    def _execute(self, batch: list[_Request]) -> list[RowResult | Exception]:
        images = _stack([request.image for request in batch], pin=self.backbone.placement.pin_memory)
        include_embedding = any(request.include_embedding for request in batch)
        with self.backbone.priority.serving():
            output: BatchOutput = run_batch(self.backbone, images, [r.heads for r in batch], include_embedding)
        self.stats.batches += 1
        self.stats.images += len(batch)
        wanted = any(request.include_embedding or request.keep_pooled for request in batch)
        embeddings = output.embeddings.cpu() if output.embeddings is not None and wanted else None
        results: list[RowResult | Exception] = []
        for i, request in enumerate(batch):
            error = output.errors[i]
            if error is not None:
                results.append(error)
                continue
            row_logits = cast(list[torch.Tensor], output.logits[i])  # a row without an error has every head's
            results.append(
                RowResult(
                    logits=[logits.float().cpu() for logits in row_logits],
                    embedding=embeddings[i]
                    if embeddings is not None and (request.include_embedding or request.keep_pooled)
                    else None,
                )
            )
        return results


def _stack(images: list[torch.Tensor], *, pin: bool) -> torch.Tensor:
    """One [N, 3, H, W] batch; in page-locked memory when ``pin``, so the trunk's copy to the GPU is asynchronous."""
    if not pin:
        return torch.stack(images)
    out = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype, pin_memory=True)
    return torch.stack(images, out=out)
