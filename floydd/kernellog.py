"""Find OOM kills of a container in the kernel log, for when dockerd misses them.

Docker 20.10 on cgroup v1 was seen to report a container that the kernel
had OOM-killed as a plain exit 137: OOMKilled false and no `oom` event,
while the kernel log showed the kill. The kernel names the memory cgroup
in each kill record (`oom-kill:...,task_memcg=/docker/<id>` under the
cgroupfs driver, `.../docker-<id>.scope` under systemd), so the record
ties the kill to the container for sure.
"""

from __future__ import annotations

import errno
import os

KMSG = "/dev/kmsg"
# Records are at most about 8 KiB; a read shorter than the record fails with EINVAL.
RECORD_BYTES = 16 * 1024


def oom_kill_logged(container_id: str, kmsg: str = KMSG) -> bool | None:
    """Return whether the kernel log records an OOM kill in `container_id`'s cgroup.

    Returns None when the log cannot be read: /dev/kmsg needs root or
    CAP_SYSLOG, and `kernel.dmesg_restrict` may deny it even then.
    """
    try:
        descriptor = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        while True:
            try:
                record = os.read(descriptor, RECORD_BYTES)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    return False
                if exc.errno == errno.EPIPE:
                    # Records were overwritten while reading; continue with the next one.
                    continue
                return None
            if not record:
                return False
            if b"oom-kill:" in record and container_id.encode() in record:
                return True
    finally:
        os.close(descriptor)
