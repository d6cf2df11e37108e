"""Uploads: stream a multipart job submission to disk and unpack its archive safely.

The archive is written to disk in chunks as it arrives, so memory stays flat
whatever its size. Unpacking checks every member before it is written: no
absolute paths, no `..`, no links that lead outside the job's folder, no
device nodes, FIFOs or sockets, and limits on file count and unpacked size.
A rejected archive leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import structlog
from aiohttp import BodyPartReader, MultipartReader, web

from floydd.errors import InvalidRequest, PayloadTooLarge

log = structlog.get_logger(__name__)

CHUNK_BYTES = 256 * 1024
# Text fields (mode, env, command, ...) are small; a larger one is an error, not data.
MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 32
# Text fields that a submission may give more than once, such as several data mounts.
REPEATABLE_FIELDS = frozenset({"data"})


class ArchiveRejected(InvalidRequest):
    code = "archive_rejected"


@dataclass
class Submission:
    """The fields of a job submission, with the code archive already on disk."""

    fields: dict[str, str] = field(default_factory=dict)
    # Values of REPEATABLE_FIELDS, in the order they came.
    repeated: dict[str, list[str]] = field(default_factory=dict)
    archive: Path | None = None
    archive_name: str = ""
    archive_bytes: int = 0


@dataclass(frozen=True)
class UnpackLimits:
    max_unpacked_bytes: int
    max_files: int


async def receive_submission(
    request: web.Request, spool_path: Path, max_upload_bytes: int, archive_field: str = "code"
) -> Submission:
    """Read a multipart submission, streaming the archive part (`code` for jobs) to `spool_path`."""
    if request.content_length is not None and request.content_length > max_upload_bytes:
        raise PayloadTooLarge(
            f"upload of {request.content_length} bytes exceeds the limit of {max_upload_bytes} bytes",
            limit=max_upload_bytes,
        )
    if not request.content_type.startswith("multipart/"):
        received = request.content_type or "no content type"
        raise InvalidRequest(f"expected multipart/form-data with a {archive_field!r} file, got {received}")
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as exc:
        raise InvalidRequest(f"invalid multipart body: {exc}") from exc

    submission = Submission()
    parts = 0
    while True:
        try:
            part = await reader.next()
        except ValueError as exc:
            raise InvalidRequest(f"invalid multipart body: {exc}") from exc
        if part is None:
            break
        parts += 1
        if parts > MAX_PARTS:
            raise InvalidRequest(f"too many multipart parts: more than {MAX_PARTS}")
        if isinstance(part, MultipartReader):
            raise InvalidRequest("nested multipart parts are not supported")
        await _read_part(part, submission, spool_path, max_upload_bytes, archive_field)
    if submission.archive is None:
        raise InvalidRequest(
            f"missing {archive_field!r} part: attach the archive with -F {archive_field}=@archive.tar.gz"
        )
    return submission


async def _read_part(
    part: BodyPartReader, submission: Submission, spool_path: Path, limit: int, archive_field: str
) -> None:
    name = part.name
    if not name:
        raise InvalidRequest("a multipart part has no name")
    if name == archive_field:
        if submission.archive is not None:
            raise InvalidRequest(f"more than one {archive_field!r} part")
        submission.archive_name = part.filename or ""
        submission.archive_bytes = await _spool(part, spool_path, limit)
        submission.archive = spool_path
        return
    repeatable = name in REPEATABLE_FIELDS
    if name in submission.fields and not repeatable:
        raise InvalidRequest(f"field {name!r} given more than once")
    data = bytearray()
    while chunk := await part.read_chunk(CHUNK_BYTES):
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"field {name!r} is longer than {MAX_FIELD_BYTES} bytes")
    try:
        value = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"field {name!r} is not valid UTF-8") from exc
    if repeatable:
        submission.repeated.setdefault(name, []).append(value)
    else:
        submission.fields[name] = value


async def _spool(part: BodyPartReader, path: Path, limit: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    # NOTE: writes are synchronous; the page cache absorbs them, and a thread
    # hop per 256 KiB chunk costs more than it saves on local disks.
    with path.open("wb") as spool:
        while chunk := await part.read_chunk(CHUNK_BYTES):
            written += len(chunk)
            if written > limit:
                raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes", limit=limit)
            spool.write(chunk)
    if written == 0:
        raise InvalidRequest(f"the {part.name!r} part is empty")
    return written


def unpack_archive(archive: Path, destination: Path, limits: UnpackLimits) -> None:
    """Unpack a tar, tar.gz or zip into `destination`, flattening one top folder.

    Runs in a worker thread. On any rejection `destination` is removed whole.
    """
    staging = destination.with_name(destination.name + ".unpacking")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            _unpack_zip(archive, staging, limits)
        else:
            _unpack_tar(archive, staging, limits)
        root = _project_root(staging)
        root.rename(destination)
    except BaseException:
        shutil.rmtree(destination, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _Budget:
    def __init__(self, limits: UnpackLimits) -> None:
        self.limits = limits
        self.files = 0
        self.bytes = 0

    def add(self, member: str, size: int) -> None:
        self.files += 1
        self.bytes += size
        if self.files > self.limits.max_files:
            raise ArchiveRejected(f"archive has more than {self.limits.max_files} members", member=member)
        if self.bytes > self.limits.max_unpacked_bytes:
            raise ArchiveRejected(f"archive unpacks to more than {self.limits.max_unpacked_bytes} bytes", member=member)


def _safe_relative(name: str) -> PurePosixPath:
    """Return a member name as a relative path, or raise when it could escape."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArchiveRejected(f"member {name!r} has an absolute path", member=name)
    path = PurePosixPath(name)
    if ".." in path.parts:
        raise ArchiveRejected(f"member {name!r} contains a '..' component", member=name)
    parts = [part for part in path.parts if part not in ("", ".")]
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _inside(root: Path, candidate: Path) -> bool:
    root_real = os.path.realpath(root)
    candidate_real = os.path.realpath(candidate)
    return candidate_real == root_real or candidate_real.startswith(root_real + os.sep)


def _unpack_tar(archive: Path, root: Path, limits: UnpackLimits) -> None:
    budget = _Budget(limits)
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in _iter_tar(tar):
                _extract_tar_member(tar, member, root, budget)
    except tarfile.ReadError as exc:
        raise ArchiveRejected(f"not a tar, tar.gz or zip archive: {exc}") from exc
    except (EOFError, OSError) as exc:
        if isinstance(exc, ArchiveRejected):
            raise
        raise ArchiveRejected(f"archive is truncated or corrupt: {exc}") from exc


def _iter_tar(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while (member := tar.next()) is not None:
        yield member


def _extract_tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path, budget: _Budget) -> None:
    relative = _safe_relative(member.name)
    target = root / relative
    if (
        member.ischr()
        or member.isblk()
        or member.isfifo()
        or not (member.isfile() or member.isdir() or member.issym() or member.islnk())
    ):
        raise ArchiveRejected(f"member {member.name!r} is a device, FIFO or other special file", member=member.name)
    if not _inside(root, target.parent):
        raise ArchiveRejected(
            f"member {member.name!r} would be written through a link outside the archive", member=member.name
        )
    budget.add(member.name, member.size if member.isfile() else 0)
    if str(relative) == ".":
        return
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        if target.is_dir() and not target.is_symlink():
            raise ArchiveRejected(f"member {member.name!r} replaces a folder", member=member.name)
        target.unlink()
    if member.issym():
        _make_symlink(member, target, root)
    elif member.islnk():
        _make_hardlink(member, target, root)
    else:
        _write_file(tar, member, target)


def _make_symlink(member: tarfile.TarInfo, target: Path, root: Path) -> None:
    link = member.linkname
    if link.startswith("/") or not _inside(root, target.parent / link):
        raise ArchiveRejected(f"symlink {member.name!r} points outside the archive ({link!r})", member=member.name)
    # A dangling in-tree link is kept: it may point at a file the app creates later.
    os.symlink(link, target)


def _make_hardlink(member: tarfile.TarInfo, target: Path, root: Path) -> None:
    source = root / _safe_relative(member.linkname)
    if not _inside(root, source) or not source.is_file() or source.is_symlink():
        raise ArchiveRejected(
            f"hardlink {member.name!r} must point at an earlier regular file in the archive ({member.linkname!r})",
            member=member.name,
        )
    os.link(source, target)


def _write_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise ArchiveRejected(f"member {member.name!r} has no data", member=member.name)
    # O_NOFOLLOW and O_EXCL: never write through a link that an earlier member planted.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    # Keep the owner's permission bits; setuid, setgid and sticky bits are dropped.
    mode = (member.mode & 0o777) | 0o600
    descriptor = os.open(target, flags, mode)
    with source, os.fdopen(descriptor, "wb") as output:
        shutil.copyfileobj(source, output, CHUNK_BYTES)


def _unpack_zip(archive: Path, root: Path, limits: UnpackLimits) -> None:
    budget = _Budget(limits)
    try:
        with zipfile.ZipFile(archive) as bundle:
            for info in bundle.infolist():
                _extract_zip_member(bundle, info, root, budget)
    except zipfile.BadZipFile as exc:
        raise ArchiveRejected(f"zip archive is corrupt: {exc}") from exc


def _extract_zip_member(bundle: zipfile.ZipFile, info: zipfile.ZipInfo, root: Path, budget: _Budget) -> None:
    relative = _safe_relative(info.filename)
    unix_mode = info.external_attr >> 16
    if stat.S_ISLNK(unix_mode):
        raise ArchiveRejected(
            f"member {info.filename!r} is a symlink, which zip uploads cannot contain", member=info.filename
        )
    # Zip writers often store permission bits without a file type; those are regular files.
    if stat.S_IFMT(unix_mode) and not (stat.S_ISREG(unix_mode) or stat.S_ISDIR(unix_mode)):
        raise ArchiveRejected(f"member {info.filename!r} is a special file", member=info.filename)
    target = root / relative
    if not _inside(root, target.parent):
        raise ArchiveRejected(f"member {info.filename!r} would be written outside the archive", member=info.filename)
    budget.add(info.filename, info.file_size)
    if info.is_dir() or str(relative) == ".":
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = ((unix_mode & 0o777) or 0o644) | 0o600
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    written = 0
    with bundle.open(info) as source, os.fdopen(descriptor, "wb") as output:
        # The declared size can lie; count what decompression really yields.
        while chunk := source.read(CHUNK_BYTES):
            written += len(chunk)
            if written > info.file_size:
                raise ArchiveRejected(f"member {info.filename!r} is larger than its header says", member=info.filename)
            output.write(chunk)


def _project_root(staging: Path) -> Path:
    """Return the folder that holds the project: the archive root or its one top folder."""
    entries = [entry for entry in staging.iterdir() if entry.name not in ("__MACOSX",)]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return staging
