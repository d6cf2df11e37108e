"""Tell when a serve job's app accepts connections, without sending it a request.

Docker's userland proxy accepts connections on the published port even
before anything listens inside the container, so a TCP connect proves
nothing. Instead floydd reads the container's own socket table,
/proc/<pid>/net/tcp and tcp6 (the pid lives in the container's network
namespace), and waits for a socket in LISTEN state on the app's port. Where
/proc cannot be read (floydd in a different PID namespace from the engine),
it falls back to an HTTP request for `/`, whose answer, any status, means the
app is up.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

POLL_INTERVAL_S = 0.1
_TCP_LISTEN = "0A"


def listening_ports(pid: int) -> set[int] | None:
    """Return the TCP ports in LISTEN state in the network namespace of `pid`, or None if unreadable."""
    ports: set[int] = set()
    readable = False
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == _TCP_LISTEN:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports if readable else None


async def wait_until_listening(pid: int, container_port: int, host: str, host_port: int) -> None:
    """Return once the app listens on `container_port`; poll until cancelled."""
    while True:
        ports = listening_ports(pid) if pid > 0 else None
        if ports is None:
            if await _http_answers(host, host_port):
                return
        elif container_port in ports:
            return
        await asyncio.sleep(POLL_INTERVAL_S)


async def _http_answers(host: str, port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    try:
        writer.write(b"GET / HTTP/1.0\r\nHost: floydd-readiness\r\nUser-Agent: floydd-readiness\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(2):
            status_line = await reader.readline()
        return status_line.startswith(b"HTTP/")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
