"""Service notifications to systemd (the sd_notify protocol) for `Type=notify` units.

systemd passes the address of its notification socket in `$NOTIFY_SOCKET`: a
file system path, or an abstract socket name when it starts with `@`. A
notification is one datagram of newline-separated `KEY=value` assignments,
such as `READY=1`, `STOPPING=1` or `STATUS=...`, as sd_notify(3) describes.

The protocol is one `sendto` on a Unix datagram socket, so it is written here
in a few lines without a library. The binding to libsystemd (systemd-python)
is a C extension that needs libsystemd's headers to build, and a small PyPI
package would be a dependency to track for the same few lines.

Without `$NOTIFY_SOCKET` (floydd started from a shell, in a container or by a
`Type=exec` unit) every call does nothing, so the daemon needs no systemd mode.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)

NOTIFY_SOCKET_VARIABLE = "NOTIFY_SOCKET"


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `KEY=value` assignments to the service manager in one datagram.

    Returns True when the datagram was sent, and False when floydd does not run
    under a `Type=notify` unit or the send failed. A failure is logged and not
    raised, because a missing notification must not stop the daemon: systemd
    then reports the start-up as timed out, which names the cause.
    """
    environ = os.environ if environ is None else environ
    address = notify_address(environ.get(NOTIFY_SOCKET_VARIABLE, ""))
    if address is None:
        return False

    message = "\n".join(assignments).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Non-blocking, so that a service manager that has stopped reading
            # cannot stall the event loop that sends this.
            sock.setblocking(False)
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("sd_notify_failed", address=environ[NOTIFY_SOCKET_VARIABLE], error=str(exc))
        return False
    return True


def notify_address(value: str) -> str | bytes | None:
    """Return the socket address that `$NOTIFY_SOCKET` names, or None for none.

    An abstract socket name comes back as bytes with its leading NUL byte.
    systemd 254 added `vsock:` addresses for virtual machines, which floydd
    does not support, so those and other relative values are ignored with a
    warning instead of being sent to a path in the working directory.
    """
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    log.warning("sd_notify_address_unsupported", address=value)
    return None


def notify_ready(status: str) -> bool:
    """Tell systemd that start-up finished, so `systemctl start` returns."""
    return notify("READY=1", f"STATUS={status}")


def notify_stopping(status: str) -> bool:
    """Tell systemd that the shutdown began, so the unit shows `deactivating`."""
    return notify("STOPPING=1", f"STATUS={status}")


def notify_status(status: str) -> bool:
    """Set the one-line status that `systemctl status` shows."""
    return notify(f"STATUS={status}")
