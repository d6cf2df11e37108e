"""A job's /output folder over HTTP: the whole folder as a streamed tar.gz, or one file.

`tarfile` writes the archive in a worker thread, which hands it to the
event loop in chunks through a small bounded queue. A large output never
sits in memory or in a temporary file, and a slow client slows the writer
down instead of filling memory.
"""

from __future__ import annotations

import asyncio
import os
import tarfile
from pathlib import Path, PurePosixPath

from aiohttp import web

from floydd.errors import InvalidRequest, NotFound

CHUNK_BYTES = 256 * 1024
QUEUE_CHUNKS = 8


class _QueueWriter:
    """A file-like sink for tarfile that passes each write to the event loop, waiting when it lags."""

    def __init__(self, queue: asyncio.Queue[bytes | None], loop: asyncio.AbstractEventLoop) -> None:
        self._queue = queue
        self._loop = loop
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        if len(self._buffer) >= CHUNK_BYTES:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buffer:
            self._put(bytes(self._buffer))
            self._buffer.clear()

    def close(self) -> None:
        self.flush()
        self._put(None)

    def _put(self, item: bytes | None) -> None:
        asyncio.run_coroutine_threadsafe(self._queue.put(item), self._loop).result()


def _write_tar(folder: Path, sink: _QueueWriter) -> None:
    try:
        with tarfile.open(fileobj=sink, mode="w|gz") as archive:  # type: ignore[call-overload]
            for directory, subdirectories, names in os.walk(folder):
                subdirectories.sort()
                for name in sorted(names):
                    path = Path(directory, name)
                    # Links are stored as links, never followed, so nothing outside /output leaks.
                    archive.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    finally:
        sink.close()


async def send_tar_gz(request: web.Request, folder: Path, name: str) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "application/gzip", "Content-Disposition": f'attachment; filename="{name}.tar.gz"'}
    )
    await response.prepare(request)
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=QUEUE_CHUNKS)
    writer = asyncio.create_task(asyncio.to_thread(_write_tar, folder, _QueueWriter(queue, asyncio.get_running_loop())))
    try:
        while (chunk := await queue.get()) is not None:
            await response.write(chunk)
    finally:
        # A client that leaves must not strand the writer thread on a full queue.
        while not writer.done():
            while not queue.empty():
                queue.get_nowait()
            await asyncio.sleep(0.01)
    await writer
    await response.write_eof()
    return response


def output_file(folder: Path, relative: str) -> Path:
    """Return the regular file at `relative` inside `folder`, refusing any path that leaves it."""
    parts = PurePosixPath(relative).parts
    if not relative or relative.startswith("/") or ".." in parts:
        raise InvalidRequest(f"invalid output path {relative!r}: use a relative path inside /output")
    candidate = folder.joinpath(*parts)
    real_folder = os.path.realpath(folder)
    real = os.path.realpath(candidate)
    if not real.startswith(real_folder + os.sep) or not os.path.isfile(real):
        raise NotFound(f"no file {relative!r} in the job's output")
    return Path(real)
