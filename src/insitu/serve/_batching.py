"""Dynamic micro-batching: concurrent requests for one model share one ``session.run``.

One worker per model takes requests from an asyncio queue and runs them together in a
dedicated thread (so the event loop keeps accepting and parsing requests meanwhile):

* a request that finds the worker idle runs at once (no wait: at concurrency 1 the
  latency is that of a direct call);
* while a batch runs, new requests queue; the next batch takes all of them, up to
  ``max_batch_rows`` rows;
* when a batch holds requests from several clients and is not full, the worker waits up
  to ``max_wait`` seconds for more (a lone request never waits).

A batch runs on the dedicated thread only when it is worth the hop: a tiny model (the
Adult MLP runs a row in about 10 microseconds, less than handing work to a thread and
back) runs on the event loop itself. The worker keeps a moving average of batch times
and hops only above ``inline_below`` seconds.

Each request was checked against the model version it was validated with, and runs on
that version: during a hot swap a batch may hold requests for the old and the new
version, and runs them as two groups; the old session stays alive until its last
request is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from insitu.runtime import LoadedModel, ModelRuntime
    from insitu.serve._metrics import ServeMetrics

__all__ = ["MicroBatcher"]

logger = logging.getLogger(__name__)


@dataclass
class _Item:
    model: LoadedModel
    feeds: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future[list[np.ndarray]] = field(repr=False)


class MicroBatcher:
    """The batching worker of one model (see the module docstring)."""

    def __init__(
        self,
        runtime: ModelRuntime,
        name: str,
        *,
        metrics: ServeMetrics | None = None,
        max_batch_rows: int = 256,
        max_wait: float = 0.001,
        inline_below: float = 0.0002,
    ) -> None:
        self.runtime = runtime
        self.name = name
        self.metrics = metrics
        self.max_batch_rows = max_batch_rows
        self.max_wait = max_wait
        self.inline_below = inline_below
        self._average = 0.0  # moving average of batch seconds (0: run inline first)
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._carry: _Item | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"insitu-{name}")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the worker on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        """Stop the worker; queued requests fail with ``CancelledError``."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    async def submit(self, model: LoadedModel, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run checked ``feeds`` on ``model`` within a batch; its outputs."""
        self.start()
        future: asyncio.Future[list[np.ndarray]] = asyncio.get_running_loop().create_future()
        rows = len(next(iter(feeds.values())))
        await self._queue.put(_Item(model, feeds, rows, future))
        return await future

    async def _next_batch(self) -> list[_Item]:
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, rows = [first], first.rows
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while rows < self.max_batch_rows:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if len(batch) < 2 or remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()
            if rows + item.rows > self.max_batch_rows:
                self._carry = item
                break
            batch.append(item)
            rows += item.rows
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            batch = [item for item in batch if not item.future.cancelled()]
            if not batch:
                continue
            groups: dict[int, list[_Item]] = {}
            for item in batch:
                groups.setdefault(id(item.model), []).append(item)
            for items in groups.values():
                try:
                    started = time.perf_counter()
                    if self._average < self.inline_below:
                        results = self._run(items)
                    else:
                        results = await loop.run_in_executor(self._executor, self._run, items)
                    seconds = time.perf_counter() - started
                    self._average = (
                        0.9 * self._average + 0.1 * seconds if self._average else seconds
                    )
                except Exception as exc:  # noqa: BLE001 -- every waiting request gets the error
                    for item in items:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                for item, outputs in zip(items, results, strict=True):
                    if not item.future.done():
                        item.future.set_result(outputs)

    def _run(self, items: list[_Item]) -> list[list[np.ndarray]]:
        model = items[0].model
        if len(items) == 1:
            feeds = items[0].feeds
        else:
            feeds = {
                name: np.concatenate([item.feeds[name] for item in items])
                for name in items[0].feeds
            }
        rows = sum(item.rows for item in items)
        outputs = self.runtime.run_batch(model, feeds)
        if self.metrics is not None:
            self.metrics.observe_batch(self.name, rows)
        results: list[list[np.ndarray]] = []
        start = 0
        for item in items:
            results.append([out[start : start + item.rows] for out in outputs])
            start += item.rows
        return results
