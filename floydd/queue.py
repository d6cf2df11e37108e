"""Per-job FIFO request queues: the one-request-at-a-time contract of serve mode.

A serve job's queue exists from submission until the job ends. Requests that
arrive while the app is still starting wait in it; `open()` lets them in, in
arrival order, once the app accepts connections. `close()` answers every
waiter at once with the job's final state instead of leaving it to time out,
and breaks off the requests in flight, whose app has gone.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import NamedTuple

import structlog

from floydd.errors import FloyddError, QueueFull, QueueTimeout
from floydd.upstream import ConnectionPool, Upstream

__all__ = ["Admission", "GrantHook", "JobQueue", "QueueRegistry", "Upstream", "default_queue_depth"]

log = structlog.get_logger(__name__)

# Weight of the newest service time in the moving average behind Retry-After.
SERVICE_TIME_WEIGHT = 0.2


# A floor of 20 lets a crowd of 20 clients wait for a one-at-a-time app
# instead of being rejected as busy.
MIN_QUEUE_DEPTH = 20


def default_queue_depth(concurrency: int) -> int:
    """Return the queue depth used when the config sets none: 10 per slot, at least MIN_QUEUE_DEPTH.

    The 10 per slot follows the default of Knative's queue-proxy, which allows
    10 queued requests per unit of container concurrency.
    """
    return max(MIN_QUEUE_DEPTH, 10 * concurrency)


class Admission:
    """A request's hold on one of the job's slots, from admission to release."""

    __slots__ = ("upstream", "pool", "queued_s", "admitted_at", "ended", "_on_end", "_ended_event")

    def __init__(self, pool: ConnectionPool, queued_s: float) -> None:
        self.upstream = pool.upstream
        self.pool = pool
        self.queued_s = queued_s
        self.admitted_at = time.monotonic()
        # The job's final state, set when the job ends while this request is in flight.
        self.ended: FloyddError | None = None
        self._on_end: Callable[[], object] | None = None
        self._ended_event: asyncio.Event | None = None

    def on_job_end(self, callback: Callable[[], object] | None) -> None:
        """Call `callback` if the job ends while this request holds its slot."""
        self._on_end = callback

    async def wait_ended(self, timeout_s: float) -> FloyddError | None:
        """Wait up to `timeout_s` for the job to end; return its final state, or None if it did not."""
        if self.ended is None:
            if self._ended_event is None:
                self._ended_event = asyncio.Event()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._ended_event.wait()
            except TimeoutError:
                return None
        return self.ended

    def end(self, error: FloyddError) -> None:
        self.ended = error
        if self._ended_event is not None:
            self._ended_event.set()
        if self._on_end is not None:
            self._on_end()


# Takes a slot granted to a waiting request and returns True if it now serves the request with it.
GrantHook = Callable[["Admission"], bool]


class _Waiter(NamedTuple):
    """A waiting request: when it started to wait, and who takes its slot when one is granted."""

    started: float
    on_grant: GrantHook | None


class JobQueue:
    def __init__(
        self, job_id: str, *, concurrency: int = 1, max_depth: int = 10, preconnect: bool = True, public: bool = False
    ) -> None:
        self.job_id = job_id
        # True when requests need no token. A private job's requests are checked by the authenticator.
        self.public = public
        self._preconnect = preconnect
        self.concurrency = concurrency
        self.max_depth = max_depth
        # An OrderedDict, not a deque: a waiter that times out or whose client
        # leaves is removed in O(1), which matters with thousands waiting.
        # A waiter's future gets the pool when its slot is granted, or None when its on_grant hook took the slot.
        self._waiters: collections.OrderedDict[asyncio.Future[ConnectionPool | None], _Waiter] = (
            collections.OrderedDict()
        )
        self._admitted: set[Admission] = set()
        self._pool: ConnectionPool | None = None
        self._opened = asyncio.Event()
        self._closed: FloyddError | None = None
        # Set when the job starts to end: nothing more is admitted, and the waiters get its final state.
        self._held = False
        # Slots granted, counting waiters whose grant their task has not yet seen.
        self._busy = 0
        self._service_s = 0.0
        self._last_service_s = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def depth(self) -> int:
        """Requests waiting for a slot, not counting those in flight."""
        return len(self._waiters)

    @property
    def in_flight(self) -> int:
        """Requests holding a slot, counting those whose client has gone while the app still works on them."""
        return self._busy + self._abandoned()

    def _abandoned(self) -> int:
        return self._pool.abandoned if self._pool is not None else 0

    @property
    def is_open(self) -> bool:
        return self._pool is not None and self._closed is None

    @property
    def closed(self) -> FloyddError | None:
        """The error requests get once the job has ended, or None while it has not."""
        return self._closed

    def open(self, upstream: Upstream) -> None:
        """Let requests through to `upstream`, in arrival order."""
        self._pool = ConnectionPool(upstream, preconnect=self._preconnect)
        self._pool.on_app_free = self._admit
        self._opened.set()
        self._admit()

    def hold(self) -> None:
        """Admit no more requests, because the job is ending. `close()` later rejects the waiters."""
        self._held = True

    def close(self, error: FloyddError) -> None:
        """Reject every waiting and future request with `error`, and break off those in flight."""
        self._closed = error
        self._opened.set()
        while self._waiters:
            waiter, _ = self._waiters.popitem(last=False)
            if not waiter.done():
                waiter.set_exception(error)
        for admission in list(self._admitted):
            admission.end(error)
        if self._pool is not None:
            self._pool.close()

    async def wait_open(self, timeout_s: float) -> ConnectionPool:
        """Wait until the app accepts connections, without taking a slot (for WebSockets)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._opened.wait()
        except TimeoutError as exc:
            raise self._queue_timeout(timeout_s) from exc
        if self._closed is not None:
            raise self._closed
        assert self._pool is not None
        return self._pool

    def retry_after_s(self) -> int:
        """Estimate in whole seconds when a rejected request could be admitted.

        The estimate is the time to serve the requests ahead of it, each taken
        to last the largest of three times: the moving average of recent
        service times, the last one, and how long the oldest request in
        flight has run so far. So a slowdown shows at once, even before the
        first slow request ends. The estimate is at least 1.
        """
        ahead = self.depth + self.in_flight
        now = time.monotonic()
        running_s = max((now - admission.admitted_at for admission in self._admitted), default=0.0)
        service_s = max(self._service_s, self._last_service_s, running_s)
        return max(1, math.ceil(ahead * service_s / self.concurrency))

    @property
    def pool(self) -> ConnectionPool | None:
        """The app's connection pool, once the app accepts connections."""
        return self._pool

    def can_admit_now(self) -> bool:
        """Return whether a request would be admitted at once, without waiting."""
        return (
            self._closed is None
            and self._pool is not None
            and not self._held
            and self._busy + self._pool.abandoned < self.concurrency
            and not self._waiters
        )

    def admit_now(self) -> Admission:
        """Take a slot without waiting. Call it only right after `can_admit_now()` returned True."""
        assert self._pool is not None, "admit_now() before open()"
        self._busy += 1
        admission = Admission(self._pool, 0.0)
        self._admitted.add(admission)
        return admission

    async def admit(self, timeout_s: float) -> Admission:
        """Wait for this request's turn and take a slot, which `release()` gives back."""
        admission = await self.admit_or_hand_over(timeout_s, None)
        assert admission is not None, "no on_grant hook to take the slot"
        return admission

    async def admit_or_hand_over(self, timeout_s: float, on_grant: GrantHook | None) -> Admission | None:
        """Wait like `admit()`, but offer a slot granted after a wait to `on_grant` first. Return None if it took it.

        The hook runs inside the `release()` that freed the slot, so the
        next request can reach the app before this coroutine resumes, which
        at full load keeps the app waiting less (docs/proxy.md). If the hook
        returns True it owns the admission and releases it. If it returns
        False or raises, this coroutine takes the slot.
        """
        if self.can_admit_now():
            return self.admit_now()
        started = time.monotonic()
        pool = await self._acquire(timeout_s, _Waiter(started, on_grant))
        if pool is None:
            return None
        if self._closed is not None:
            # The job ended after the slot was granted and before this task ran again, so close()
            # could not mark this request as ended. Give the slot back and raise the error close() gives waiters.
            self._release()
            raise self._closed
        admission = Admission(pool, time.monotonic() - started)
        self._admitted.add(admission)
        return admission

    def release(self, admission: Admission) -> None:
        self._admitted.discard(admission)
        self._record_service(time.monotonic() - admission.admitted_at)
        self._release()

    @asynccontextmanager
    async def slot(self, timeout_s: float) -> AsyncIterator[Admission]:
        """Wait for this request's turn, hold the slot for the body, then release it."""
        admission = await self.admit(timeout_s)
        try:
            yield admission
        finally:
            self.release(admission)

    async def _acquire(self, timeout_s: float, entry: _Waiter) -> ConnectionPool | None:
        if self._closed is not None:
            raise self._closed
        if len(self._waiters) >= self.max_depth:
            raise QueueFull(
                f"job {self.job_id}'s queue is full: {self.depth} requests are waiting, the maximum; retry later",
                queue_depth=self.depth,
                max_queue_depth=self.max_depth,
                headers={"Retry-After": str(self.retry_after_s())},
            )
        loop = self._running_loop()
        waiter: asyncio.Future[ConnectionPool | None] = loop.create_future()
        self._waiters[waiter] = entry
        # The timer sets QueueTimeout on the waiter instead of cancelling the task, so whichever of
        # the grant, the job's end and the timeout comes first decides the outcome. With
        # asyncio.timeout(), a grant in the same loop pass became a 503 with the slot still busy.
        timer = loop.call_later(timeout_s, self._expire, waiter, timeout_s)
        try:
            return await waiter
        except asyncio.CancelledError:
            # The client left. If the slot was granted to this task in the same instant, hand it on.
            # A slot that the hook took is the hook's to release.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None and waiter.result() is not None:
                self._release()
            raise
        finally:
            timer.cancel()
            self._waiters.pop(waiter, None)

    def _expire(self, waiter: asyncio.Future[ConnectionPool | None], timeout_s: float) -> None:
        if not waiter.done():
            waiter.set_exception(self._queue_timeout(timeout_s))

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        # Kept because asyncio.get_running_loop() makes a getpid() system call on every call in Python 3.11.
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _queue_timeout(self, timeout_s: float) -> QueueTimeout:
        return QueueTimeout(
            f"the request waited {timeout_s:g} s in job {self.job_id}'s queue without being admitted "
            "(proxy.queue_timeout_s)",
            limit="queue_timeout_s",
        )

    def _record_service(self, service_s: float) -> None:
        self._last_service_s = service_s
        if self._service_s == 0.0:
            self._service_s = service_s
        else:
            self._service_s += SERVICE_TIME_WEIGHT * (service_s - self._service_s)

    def _release(self) -> None:
        self._busy -= 1
        self._admit()

    def _admit(self) -> None:
        if self._closed is not None or self._pool is None or self._held:
            return
        while self._waiters and self._busy + self._pool.abandoned < self.concurrency:
            waiter, entry = self._waiters.popitem(last=False)
            if waiter.done():
                continue
            self._busy += 1
            if entry.on_grant is not None and self._hand_over(entry.on_grant, entry.started):
                waiter.set_result(None)
            else:
                waiter.set_result(self._pool)

    def _hand_over(self, on_grant: GrantHook, started: float) -> bool:
        """Offer a granted slot to a waiter's hook, and return whether the hook took it."""
        assert self._pool is not None
        admission = Admission(self._pool, time.monotonic() - started)
        self._admitted.add(admission)
        try:
            if on_grant(admission):
                return True
        except Exception:
            # The error must not reach the request whose release() runs this. The waiter takes the slot instead.
            log.exception("queue_grant_hook_failed", job_id=self.job_id)
        self._admitted.discard(admission)
        return False


class QueueRegistry:
    """The queues of the serve jobs that have not ended, by job id."""

    def __init__(self, max_depth: int = 0, *, preconnect: bool = True) -> None:
        # 0 sizes each queue from its job's concurrency (default_queue_depth).
        self._max_depth = max_depth
        self._preconnect = preconnect
        self._queues: dict[str, JobQueue] = {}

    def create(self, job_id: str, concurrency: int = 1, *, public: bool = False) -> JobQueue:
        max_depth = self._max_depth or default_queue_depth(concurrency)
        queue = JobQueue(
            job_id, concurrency=concurrency, max_depth=max_depth, preconnect=self._preconnect, public=public
        )
        self._queues[job_id] = queue
        return queue

    def get(self, job_id: str) -> JobQueue | None:
        return self._queues.get(job_id)

    def remove(self, job_id: str, error: FloyddError) -> None:
        queue = self._queues.pop(job_id, None)
        if queue is not None:
            queue.close(error)

    def values(self) -> list[JobQueue]:
        return list(self._queues.values())

    def __len__(self) -> int:
        return len(self._queues)
