"""Write flow control for floydd's own asyncio Protocols (the client side and the app side of the proxy)."""

from __future__ import annotations

import asyncio


class WriteFlowControl:
    """Lets a coroutine wait while the transport's write buffer is over its high-water mark.

    The transport calls `pause_writing()` and `resume_writing()`; the
    protocol calls `fail_drain()` from `connection_lost()`.
    """

    def __init__(self) -> None:
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    @property
    def paused(self) -> bool:
        """Whether the transport's write buffer is over its high-water mark."""
        return self._write_paused

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail_drain(self, error: Exception) -> None:
        """Raise `error` in a coroutine waiting in `wait_writable()`."""
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    async def wait_writable(self) -> None:
        """Return once writing is not paused."""
        if not self._write_paused:
            return
        self._drain_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None
