"""Per-job FIFO request queues: the one-request-at-a-time contract of serve mode.

A serve job's queue exists from submission until the job ends. Requests that
arrive while the app is still starting wait in it; `open()` lets them in, in
arrival order, once the app accepts connections; `close()` answers every
waiter at once with the job's final state instead of leaving it to time out.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from floydd.errors import FloyddError, QueueFull, QueueTimeout


@dataclass(frozen=True)
class Upstream:
    """Where a serve job's app accepts connections."""

    host: str
    port: int


@dataclass(frozen=True)
class Admission:
    upstream: Upstream
    queued_s: float


class JobQueue:
    def __init__(self, job_id: str, *, concurrency: int = 1, max_depth: int = 100) -> None:
        self.job_id = job_id
        self.concurrency = concurrency
        self.max_depth = max_depth
        self.in_flight = 0
        self._waiters: collections.deque[asyncio.Future[Upstream]] = collections.deque()
        self._upstream: Upstream | None = None
        self._closed: FloyddError | None = None

    @property
    def depth(self) -> int:
        """Requests waiting for a slot, not counting those in flight."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    @property
    def is_open(self) -> bool:
        return self._upstream is not None and self._closed is None

    def open(self, upstream: Upstream) -> None:
        """Let requests through to `upstream`, in arrival order."""
        self._upstream = upstream
        self._admit()

    def close(self, error: FloyddError) -> None:
        """Reject every waiting and future request with `error`."""
        self._closed = error
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    @asynccontextmanager
    async def slot(self, timeout_s: float) -> AsyncIterator[Admission]:
        """Wait for this request's turn, hold the slot for the body, then release it."""
        started = time.monotonic()
        upstream = await self._acquire(timeout_s)
        try:
            yield Admission(upstream=upstream, queued_s=time.monotonic() - started)
        finally:
            self._release()

    async def _acquire(self, timeout_s: float) -> Upstream:
        if self._closed is not None:
            raise self._closed
        if self._upstream is not None and self.in_flight < self.concurrency and not self.depth:
            self.in_flight += 1
            return self._upstream
        if self.depth >= self.max_depth:
            raise QueueFull(
                f"job {self.job_id} already has {self.depth} requests waiting (the maximum)",
                queue_depth=self.depth,
                headers={"Retry-After": "1"},
            )
        waiter: asyncio.Future[Upstream] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                return await waiter
        except TimeoutError as exc:
            raise QueueTimeout(
                f"request waited {timeout_s:g} s in job {self.job_id}'s queue (proxy.queue_timeout_s)",
                limit="queue_timeout_s",
            ) from exc
        except asyncio.CancelledError:
            # The client left. If the slot was granted in the same instant, hand it on.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _release(self) -> None:
        self.in_flight -= 1
        self._admit()

    def _admit(self) -> None:
        if self._closed is not None or self._upstream is None:
            return
        while self._waiters and self.in_flight < self.concurrency:
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self.in_flight += 1
            waiter.set_result(self._upstream)


class QueueRegistry:
    """The queues of the serve jobs that have not ended, by job id."""

    def __init__(self, max_depth: int) -> None:
        self._max_depth = max_depth
        self._queues: dict[str, JobQueue] = {}

    def create(self, job_id: str, concurrency: int = 1) -> JobQueue:
        queue = JobQueue(job_id, concurrency=concurrency, max_depth=self._max_depth)
        self._queues[job_id] = queue
        return queue

    def get(self, job_id: str) -> JobQueue | None:
        return self._queues.get(job_id)

    def remove(self, job_id: str, error: FloyddError) -> None:
        queue = self._queues.pop(job_id, None)
        if queue is not None:
            queue.close(error)

    def __len__(self) -> int:
        return len(self._queues)
