"""A job's log file, written as messages arrive and resumed exactly after a restart.

`logs.txt` contains the container's output as plain text. Beside it,
`logs.cursor` records how far the file is complete: the Docker timestamp of
the last message written, how many messages carried that same timestamp, and
the file's size at that point. The cursor is replaced atomically after each
message, so after a SIGKILL at any moment the pair is consistent: bytes past
the recorded size are cut off, and the log stream resumes at the recorded
timestamp, skipping the messages already counted. No line is lost and none is
written twice.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from floydd.runtime import LogMessage


@dataclass(frozen=True)
class LogCursor:
    timestamp_ns: int = 0
    # Messages already written whose timestamp equals timestamp_ns.
    seen_at_timestamp: int = 0
    size: int = 0


class JobLogWriter:
    """Append a container's messages to `logs.txt` and keep `logs.cursor` in step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cursor_path = path.with_suffix(".cursor")
        self.cursor = LogCursor()
        # Messages at the cursor's timestamp still to skip after a resume.
        self._skip_at_timestamp = 0

    def open(self, resume: bool) -> int:
        """Prepare the file; return the timestamp to ask Docker for messages from.

        With `resume`, keep what the cursor vouches for and drop any tail
        written after it. Without, start an empty log.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.cursor = self._read_cursor() if resume else LogCursor()
        with self.path.open("ab") as output:
            output.truncate(self.cursor.size)
        self._write_cursor()
        return self.resume_point()

    def resume_point(self) -> int:
        """Return the timestamp to ask Docker for messages from, and skip those already written there."""
        self._skip_at_timestamp = self.cursor.seen_at_timestamp
        return self.cursor.timestamp_ns

    def write(self, message: LogMessage) -> None:
        cursor = self.cursor
        stamp = message.timestamp_ns
        if stamp == 0:
            # An unstamped message moves only the size: a resume cannot find it again anyway.
            self._append(message.text, LogCursor(cursor.timestamp_ns, cursor.seen_at_timestamp, cursor.size))
            return
        if stamp < cursor.timestamp_ns:
            return
        if stamp == cursor.timestamp_ns:
            # Docker's `since` is inclusive: skip the messages at this instant already written.
            if self._skip_at_timestamp > 0:
                self._skip_at_timestamp -= 1
                return
            seen = cursor.seen_at_timestamp + 1
        else:
            self._skip_at_timestamp = 0
            seen = 1
        self._append(message.text, LogCursor(stamp, seen, cursor.size))

    def _append(self, text: str, cursor: LogCursor) -> None:
        data = text.encode("utf-8", errors="replace")
        with self.path.open("ab") as output:
            output.write(data)
        self.cursor = LogCursor(cursor.timestamp_ns, cursor.seen_at_timestamp, cursor.size + len(data))
        self._write_cursor()

    def _read_cursor(self) -> LogCursor:
        try:
            raw = json.loads(self.cursor_path.read_text())
            cursor = LogCursor(int(raw["timestamp_ns"]), int(raw["seen_at_timestamp"]), int(raw["size"]))
        except (OSError, ValueError, KeyError, TypeError):
            cursor = LogCursor()
        return cursor

    def _write_cursor(self) -> None:
        temporary = self.cursor_path.with_suffix(".cursor.tmp")
        temporary.write_text(json.dumps(self.cursor.__dict__))
        os.replace(temporary, self.cursor_path)
