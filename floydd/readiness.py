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
import ipaddress
from pathlib import Path

POLL_INTERVAL_S = 0.1
# How long an app may listen on loopback only before the job fails. An app
# that binds loopback first and all addresses a moment later still passes.
LOOPBACK_GRACE_S = 3.0
_TCP_LISTEN = "0A"


class LoopbackOnly(Exception):
    """The app listens on its port, but only on the container's loopback address."""


def listening_ports(pid: int) -> dict[int, bool] | None:
    """Return the TCP ports in LISTEN state in the network namespace of `pid`, or None if unreadable.

    Each port maps to whether some listener on it is reachable from outside
    the container, that is, bound to an address other than loopback.
    """
    ports: dict[int, bool] = {}
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
                address, _, port_hex = fields[1].rpartition(":")
                port = int(port_hex, 16)
                ports[port] = ports.get(port, False) or not _is_loopback(address)
    return ports if readable else None


def _is_loopback(address_hex: str) -> bool:
    """Decode a /proc/net/tcp{,6} address (32-bit words in host byte order, little-endian here)."""
    raw = b"".join(bytes.fromhex(address_hex[i : i + 8])[::-1] for i in range(0, len(address_hex), 8))
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


async def wait_until_listening(pid: int, container_port: int, host: str, host_port: int) -> None:
    """Return once the app listens on `container_port`; poll until cancelled.

    Raises LoopbackOnly when the app has listened only on loopback for
    LOOPBACK_GRACE_S, because Docker's published port can never reach it:
    Flask's `app.run()` does that unless given `host="0.0.0.0"`.
    """
    loop = asyncio.get_running_loop()
    loopback_since: float | None = None
    while True:
        ports = listening_ports(pid) if pid > 0 else None
        if ports is None:
            if await _http_answers(host, host_port):
                return
        elif ports.get(container_port):
            return
        elif container_port in ports:
            loopback_since = loopback_since or loop.time()
            if loop.time() - loopback_since >= LOOPBACK_GRACE_S:
                raise LoopbackOnly(
                    f"the app listens on 127.0.0.1:{container_port} only, which the published port cannot reach; "
                    f'listen on all addresses, e.g. app.run(host="0.0.0.0", port={container_port})'
                )
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
