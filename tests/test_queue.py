"""The per-job FIFO queue: order, limits, closing and clients that leave."""

from __future__ import annotations

import asyncio

import pytest
import structlog.testing

from floydd.errors import JobNotServing, QueueFull, QueueTimeout
from floydd.queue import Admission, GrantHook, JobQueue, Upstream

UPSTREAM = Upstream("127.0.0.1", 5000)


async def hold(queue: JobQueue, name: str, entered: list[str], release: asyncio.Event) -> None:
    async with queue.slot(timeout_s=10):
        entered.append(name)
        await release.wait()


async def test_waiters_enter_in_arrival_order() -> None:
    queue = JobQueue("j", max_depth=10)
    entered: list[str] = []
    release = asyncio.Event()
    tasks = []
    for name in "abcde":
        tasks.append(asyncio.create_task(hold(queue, name, entered, release)))
        await asyncio.sleep(0)
    queue.open(UPSTREAM)
    await asyncio.sleep(0)
    assert entered == ["a"]
    assert queue.depth == 4
    release.set()
    await asyncio.gather(*tasks)
    assert entered == list("abcde")
    assert queue.in_flight == 0


async def test_concurrency_two_admits_two() -> None:
    queue = JobQueue("j", concurrency=2, max_depth=10)
    queue.open(UPSTREAM)
    entered: list[str] = []
    release = asyncio.Event()
    tasks = [asyncio.create_task(hold(queue, name, entered, release)) for name in "abc"]
    await asyncio.sleep(0.01)
    assert entered == ["a", "b"]
    release.set()
    await asyncio.gather(*tasks)


async def test_full_queue_rejects_with_retry_after() -> None:
    queue = JobQueue("j", max_depth=1)
    waiter = asyncio.create_task(queue.slot(timeout_s=10).__aenter__())
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as caught:
        async with queue.slot(timeout_s=10):
            pass
    assert caught.value.headers["Retry-After"] == "1"
    assert caught.value.extra["queue_depth"] == 1
    waiter.cancel()


async def test_retry_after_follows_a_slowdown() -> None:
    queue = JobQueue("j", max_depth=1)
    for _ in range(20):
        queue._record_service(0.005)
    # The moving average is still near 0.4 s after this, and the requests ahead now take 2 s each.
    queue._record_service(2.0)
    waiter = asyncio.create_task(queue.slot(timeout_s=10).__aenter__())
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as caught:
        async with queue.slot(timeout_s=10):
            pass
    waiter.cancel()
    assert caught.value.headers["Retry-After"] == "2"


async def test_retry_after_counts_request_in_flight() -> None:
    """A slow request still in flight raises Retry-After before it ends, after a run of fast ones."""
    queue = JobQueue("j", max_depth=1)
    queue.open(UPSTREAM)
    for _ in range(20):
        queue._record_service(0.005)
    first = await queue.admit(timeout_s=10)
    # As if it had been admitted 1.9 s ago and were still running.
    first.admitted_at -= 1.9
    waiter = asyncio.create_task(queue.admit(timeout_s=10))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as caught:
        await queue.admit(timeout_s=10)
    waiter.cancel()
    # Two requests ahead, each taken to last as long as the one in flight so far: 2 × 1.9 s, rounded up.
    assert caught.value.headers["Retry-After"] == "4"


async def test_queue_wait_times_out() -> None:
    queue = JobQueue("j", max_depth=10)
    with pytest.raises(QueueTimeout, match="queue_timeout_s"):
        async with queue.slot(timeout_s=0.05):
            pass
    assert queue.depth == 0


async def test_close_answers_waiters_at_once() -> None:
    queue = JobQueue("j", max_depth=10)
    waiters = [asyncio.create_task(queue.admit(timeout_s=10)) for _ in range(3)]
    await asyncio.sleep(0)
    queue.close(JobNotServing("job j is stopped, not serving", state="stopped"))
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(result, JobNotServing) for result in results)
    with pytest.raises(JobNotServing):
        async with queue.slot(timeout_s=10):
            pass


async def test_cancelled_waiter_leaves_queue() -> None:
    queue = JobQueue("j", max_depth=10)
    queue.open(UPSTREAM)
    entered: list[str] = []
    release = asyncio.Event()
    first = asyncio.create_task(hold(queue, "first", entered, release))
    await asyncio.sleep(0)
    leaver = asyncio.create_task(hold(queue, "leaver", entered, release))
    last = asyncio.create_task(hold(queue, "last", entered, release))
    await asyncio.sleep(0)
    assert queue.depth == 2
    leaver.cancel()
    await asyncio.sleep(0)
    assert queue.depth == 1
    release.set()
    await asyncio.gather(first, last)
    assert entered == ["first", "last"]
    assert queue.in_flight == 0


async def test_held_queue_admits_nothing_more() -> None:
    """Once the job starts to end, a freed slot goes to no one, and the waiters get the final state."""
    queue = JobQueue("j", max_depth=10)
    queue.open(UPSTREAM)
    entered: list[str] = []
    release = asyncio.Event()
    first = asyncio.create_task(hold(queue, "first", entered, release))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold(queue, "waiter", entered, asyncio.Event()))
    await asyncio.sleep(0)
    queue.hold()
    release.set()
    await first
    await asyncio.sleep(0.05)
    assert entered == ["first"]
    assert not waiter.done()
    queue.close(JobNotServing("job j is stopped, not serving", state="stopped"))
    with pytest.raises(JobNotServing):
        await waiter
    with pytest.raises(JobNotServing):
        await hold(queue, "late", entered, release)
    assert entered == ["first"]


async def test_timeout_as_slot_granted() -> None:
    """A slot granted in the same loop pass as the waiter's timeout is used or given back, never lost."""
    queue = JobQueue("j", max_depth=10)
    queue.open(UPSTREAM)
    first = await queue.admit(timeout_s=10)
    # With timeout_s=0 the timeout is due at once, so it and the grant scheduled below both reach
    # the waiter before the waiting task runs again.
    waiter = asyncio.create_task(queue.admit(timeout_s=0))
    asyncio.get_running_loop().call_soon(queue.release, first)
    (outcome,) = await asyncio.gather(waiter, return_exceptions=True)
    if isinstance(outcome, Admission):
        queue.release(outcome)
    else:
        assert isinstance(outcome, QueueTimeout)
    assert queue.in_flight == 0
    assert queue.depth == 0


async def test_close_after_grant_rejects_waiter() -> None:
    """A job that ends after a waiter's grant, before the waiter runs again, rejects it with the job's state."""
    queue = JobQueue("j", max_depth=10)
    queue.open(UPSTREAM)
    first = await queue.admit(timeout_s=10)
    waiter = asyncio.create_task(queue.admit(timeout_s=10))
    await asyncio.sleep(0)
    assert queue.depth == 1
    # The request in flight ends and the job ends in the same loop pass.
    queue.release(first)
    queue.close(JobNotServing("job j is stopped, not serving", state="stopped"))
    (outcome,) = await asyncio.gather(waiter, return_exceptions=True)
    assert isinstance(outcome, JobNotServing)
    assert queue.in_flight == 0


def recording_hook(offered: list[Admission], *, take: bool) -> GrantHook:
    """Return an on_grant hook that records each admission offered to it and takes it if `take`."""

    def hook(admission: Admission) -> bool:
        offered.append(admission)
        return take

    return hook


async def waiter_behind_one(on_grant: GrantHook) -> tuple[JobQueue, Admission, asyncio.Task[Admission | None]]:
    """Return an open queue, the admission of the request in flight, and a waiter with `on_grant` behind it."""
    queue = JobQueue("j", max_depth=10)
    queue.open(UPSTREAM)
    first = await queue.admit(timeout_s=10)
    waiter = asyncio.create_task(queue.admit_or_hand_over(10, on_grant))
    await asyncio.sleep(0)
    return queue, first, waiter


async def test_granted_slot_goes_to_hook_at_once() -> None:
    """A slot freed by release() reaches the next waiter's hook inside that call, before the waiter resumes."""
    hooked: list[Admission] = []
    queue, first, waiter = await waiter_behind_one(recording_hook(hooked, take=True))
    queue.release(first)
    assert len(hooked) == 1
    assert not waiter.done()
    assert await waiter is None
    # The hook owns the slot until it releases it.
    assert queue.in_flight == 1
    queue.release(hooked[0])
    assert queue.in_flight == 0


async def test_declined_slot_goes_to_waiter() -> None:
    offered: list[Admission] = []
    queue, first, waiter = await waiter_behind_one(recording_hook(offered, take=False))
    await asyncio.sleep(0.01)
    queue.release(first)
    admission = await waiter
    assert len(offered) == 1
    assert isinstance(admission, Admission)
    assert admission.queued_s >= 0.01
    assert queue.in_flight == 1
    queue.release(admission)
    assert queue.in_flight == 0


async def test_failing_hook_leaves_slot_to_waiter() -> None:
    """A hook that raises costs the request that freed the slot nothing, and the waiter gets the slot."""

    def fail(admission: Admission) -> bool:
        raise RuntimeError("injected fault")

    queue, first, waiter = await waiter_behind_one(fail)
    with structlog.testing.capture_logs() as logs:
        queue.release(first)
    admission = await waiter
    assert isinstance(admission, Admission)
    assert queue.in_flight == 1
    assert [entry["event"] for entry in logs] == ["queue_grant_hook_failed"]
    queue.release(admission)
    assert queue.in_flight == 0


async def test_cancel_after_hand_over_keeps_slot() -> None:
    """A client that leaves after its hook took the slot does not release the slot a second time."""
    hooked: list[Admission] = []
    queue, first, waiter = await waiter_behind_one(recording_hook(hooked, take=True))
    third = asyncio.create_task(queue.admit(timeout_s=10))
    await asyncio.sleep(0)
    queue.release(first)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    # The hook's request is still in flight, so the third waits.
    assert queue.in_flight == 1
    assert not third.done()
    queue.release(hooked[0])
    queue.release(await third)
    assert queue.in_flight == 0
