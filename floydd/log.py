"""structlog set-up: JSON lines for machines, readable lines on a terminal or in the journal.

The standard library's loggers (aiohttp's access log, asyncio) are routed
through the same processors so every line of the daemon has one format.

Under systemd, stderr is a stream to the journal, which systemd announces in
`$JOURNAL_STREAM` (see systemd.exec(5)). The journal stores its own timestamp
and priority for each line. So there the default format is the console format
without colours and without a timestamp. Every line starts with a `<N>` syslog
priority prefix, which journald removes and stores as the entry's PRIORITY,
so `journalctl -p warning -u floydd` shows warnings and errors only.
`--log-format json` keeps JSON lines, with their timestamp, for operators who
ship the journal to a log store. Those lines get the prefix too.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import structlog

# syslog priorities (RFC 5424) of structlog's level names.
_PRIORITIES = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7}
_DEFAULT_PRIORITY = 6


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog and the standard library's root logger once.

    `json=None` picks the format from where stderr goes: console lines for a
    terminal or the journal, JSON lines for anything else (a file, a pipe).
    """
    journal = stderr_is_journal()
    if json is None:
        json = not (sys.stderr.isatty() or journal)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
    ]
    if json or not journal:
        shared.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    renderer: Any
    if json:
        renderer = structlog.processors.JSONRenderer()
    elif journal:
        # The plain traceback, because a colourful one from rich or
        # better-exceptions (when installed) puts escape codes in the journal.
        renderer = structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    if journal:
        renderer = _JournalPriorityPrefix(renderer)
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if json else _identity,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log duplicates the proxy's own request events.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


# Events that clients can cause at will get one log line per this many seconds, with the count left out.
REJECTION_LOG_INTERVAL_S = 10.0


class LogThrottle:
    """A limit of one log line per interval, for events that clients can cause at will, such as rejected requests."""

    def __init__(self, interval_s: float = REJECTION_LOG_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._last = -math.inf
        self._held_back = 0

    def allow(self) -> int | None:
        """Return how many lines were held back since the last one allowed, or None to hold this one back too."""
        now = time.monotonic()
        if now - self._last < self._interval_s:
            self._held_back += 1
            return None
        held_back, self._held_back = self._held_back, 0
        self._last = now
        return held_back


def stderr_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """Return True when stderr is the stream that systemd connected to the journal.

    `$JOURNAL_STREAM` contains the device and inode numbers (`DEVICE:INODE`) of
    that stream. Comparing them with stderr's, as systemd.exec(5) advises,
    skips a variable inherited by a child whose stderr was redirected.
    """
    environ = os.environ if environ is None else environ
    expected = environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        # A replaced sys.stderr (pytest's capture, say) has no file descriptor.
        return False
    return expected == f"{stat.st_dev}:{stat.st_ino}"


class _JournalPriorityPrefix:
    """A renderer wrapper that starts each output line with its `<N>` syslog priority.

    journald reads the prefix on every line of a stream (SyslogLevelPrefix=
    is on by default), so the lines of a traceback carry the priority too.
    """

    def __init__(self, renderer: Any) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, name: str, event: dict[str, Any]) -> str:
        priority = _PRIORITIES.get(str(event.get("level", name)), _DEFAULT_PRIORITY)
        text = str(self._renderer(logger, name, event))
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines() or [""])


def _identity(_logger: Any, _name: str, event: Any) -> Any:
    return event
