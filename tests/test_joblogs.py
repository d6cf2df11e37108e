"""The log cursor: a resumed log stream neither repeats nor drops a message."""

from __future__ import annotations

from pathlib import Path

from floydd.joblogs import JobLogWriter
from floydd.runtime import LogMessage, parse_log_message, parse_rfc3339_ns


def test_docker_timestamp_parsed() -> None:
    message = parse_log_message("2026-12-04T20:30:01.000000123Z hello\n")
    assert message.text == "hello\n"
    assert message.timestamp_ns == parse_rfc3339_ns("2026-12-04T20:30:01Z") + 123


def test_short_fraction_parsed() -> None:
    assert parse_rfc3339_ns("1970-01-01T00:00:01.5Z") == 1_500_000_000


def test_resume_skips_messages_already_written(tmp_path: Path) -> None:
    path = tmp_path / "logs.txt"
    stream = [LogMessage(10, "a\n"), LogMessage(20, "b\n"), LogMessage(20, "c\n"), LogMessage(30, "d\n")]
    first = JobLogWriter(path)
    first.open(resume=False)
    for message in stream[:2]:
        first.write(message)

    second = JobLogWriter(path)
    since = second.open(resume=True)
    # Docker's `since` is inclusive, so the stream restarts at b.
    for message in stream[1:]:
        second.write(message)

    assert since == 20
    assert path.read_text() == "a\nb\nc\nd\n"


def test_resume_drops_tail_beyond_cursor(tmp_path: Path) -> None:
    path = tmp_path / "logs.txt"
    first = JobLogWriter(path)
    first.open(resume=False)
    first.write(LogMessage(10, "a\n"))
    # A kill between the write of a message and the write of the cursor.
    with path.open("a") as output:
        output.write("b\n")

    second = JobLogWriter(path)
    since = second.open(resume=True)
    for message in (LogMessage(10, "a\n"), LogMessage(11, "b\n")):
        second.write(message)

    assert since == 10
    assert path.read_text() == "a\nb\n"


def test_fresh_start_truncates(tmp_path: Path) -> None:
    path = tmp_path / "logs.txt"
    path.write_text("stale\n")
    writer = JobLogWriter(path)

    assert writer.open(resume=False) == 0
    assert path.read_text() == ""
