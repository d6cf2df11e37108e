"""OOM kills found in the kernel log, read from a file shaped like /dev/kmsg."""

from __future__ import annotations

from pathlib import Path

from floydd.kernellog import oom_kill_logged

CONTAINER = "29d0d30b6dc1a5ebc3b5596805fe86d36a0d66662d11bb62ffecc352185a0d20"
RECORD = (
    "6,1234,4200466838,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),"
    f"oom_memcg=/docker/{CONTAINER},task_memcg=/docker/{CONTAINER},task=python,pid=3286,uid=0\n"
)


def test_kill_of_container_found(tmp_path: Path) -> None:
    kmsg = tmp_path / "kmsg"
    kmsg.write_text(RECORD)
    assert oom_kill_logged(CONTAINER, str(kmsg)) is True


def test_other_container_not_matched(tmp_path: Path) -> None:
    kmsg = tmp_path / "kmsg"
    kmsg.write_text(RECORD)
    assert oom_kill_logged("f" * 64, str(kmsg)) is False


def test_unreadable_log_is_unknown(tmp_path: Path) -> None:
    assert oom_kill_logged(CONTAINER, str(tmp_path / "missing")) is None
