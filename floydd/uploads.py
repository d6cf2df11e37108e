"""Uploads: stream a multipart job submission to disk and unpack its archive safely.

The archive is written to disk in chunks as it arrives, so memory stays flat
whatever its size. Unpacking checks every member before it is written: no
absolute paths, no `..`, no links that lead outside the job's folder, no
device nodes, FIFOs or sockets, and limits on file count, unpacked size,
single-file size and compression ratio. After unpacking, every symlink must
still resolve inside the job's folder; a dangling one is removed. A rejected
archive leaves nothing behind, and the error names the rule and the member.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, TypeVar

import structlog
from aiohttp import BodyPartReader, MultipartReader, StreamReader, web
from aiohttp.helpers import parse_mimetype
from aiohttp.http_exceptions import HttpProcessingError

from floydd.config import UploadSettings
from floydd.errors import InvalidRequest, PayloadTooLarge, RequestTimeout

log = structlog.get_logger(__name__)

CHUNK_BYTES = 256 * 1024
# Text fields (mode, env, command, ...) are small; a larger one is an error, not data.
MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 32
# Text fields that a submission may give more than once, such as several data mounts.
REPEATABLE_FIELDS = frozenset({"data"})
# Content types of a body that is the archive itself, with the fields in the query string.
ARCHIVE_TYPES = frozenset(
    {"application/gzip", "application/x-gzip", "application/x-tar", "application/zip", "application/octet-stream"}
)
# The compression ratio limit counts archives smaller than this as this large,
# so that a small project of text files never trips it.
RATIO_BASE_BYTES = 1024 * 1024

_T = TypeVar("_T")


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
    max_file_bytes: int = 2 * 1024**3
    max_compression_ratio: float = 200.0

    @classmethod
    def from_settings(cls, uploads: UploadSettings) -> UnpackLimits:
        return cls(
            max_unpacked_bytes=uploads.max_unpacked_bytes,
            max_files=uploads.max_files,
            max_file_bytes=uploads.max_file_bytes,
            max_compression_ratio=uploads.max_compression_ratio,
        )


async def receive_submission(
    request: web.Request,
    spool_path: Path,
    max_upload_bytes: int,
    body_timeout_s: float = 60.0,
    archive_field: str = "code",
) -> Submission:
    """Read a submission, streaming its archive to `spool_path`.

    The body is either multipart/form-data with an `archive_field` file part (`code` for jobs) and text
    fields, or the archive itself (a tar, gzip or zip content type) with the
    fields in the query string. Raises 413 when the body is over `max_upload_bytes`, by its Content-Length
    before reading or by counting while reading, and 408 when the client pauses
    for more than `body_timeout_s` between two reads.
    """
    if request.content_length is not None and request.content_length > max_upload_bytes:
        raise PayloadTooLarge(
            f"upload of {request.content_length} bytes exceeds the limit of {max_upload_bytes} bytes",
            limit=max_upload_bytes,
        )
    content_type = request.headers.get("Content-Type", "")
    mimetype = parse_mimetype(content_type)
    if f"{mimetype.type}/{mimetype.subtype}" in ARCHIVE_TYPES:
        return await _receive_raw_archive(request, spool_path, max_upload_bytes, body_timeout_s)
    _check_content_type(content_type)
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as exc:
        raise InvalidRequest(f"invalid multipart body: {exc}") from exc

    submission = Submission()
    parts = 0
    while True:
        part = await _within(body_timeout_s, reader.next())
        if part is None:
            break
        parts += 1
        if parts > MAX_PARTS:
            raise InvalidRequest(f"too many multipart parts: more than {MAX_PARTS}")
        if isinstance(part, MultipartReader):
            raise InvalidRequest("nested multipart parts are not supported")
        await _read_part(part, submission, spool_path, max_upload_bytes, body_timeout_s, archive_field)
    if submission.archive is None:
        raise InvalidRequest(
            f"missing {archive_field!r} part: attach the archive with -F {archive_field}=@archive.tar.gz"
        )
    return submission


async def _receive_raw_archive(request: web.Request, spool_path: Path, limit: int, body_timeout_s: float) -> Submission:
    submission = Submission(archive_name=request.query.get("filename", ""))
    for name in request.query.keys():
        values = request.query.getall(name)
        if name in REPEATABLE_FIELDS:
            submission.repeated[name] = list(values)
            continue
        if len(values) > 1:
            raise InvalidRequest(f"field {name!r} given more than once")
        if name != "filename":
            submission.fields[name] = values[0]
    submission.archive_bytes = await _spool(request.content, spool_path, limit, body_timeout_s)
    submission.archive = spool_path
    return submission


def _check_content_type(header: str) -> None:
    mimetype = parse_mimetype(header)
    if (mimetype.type, mimetype.subtype) != ("multipart", "form-data"):
        raise InvalidRequest(
            f"expected multipart/form-data with a 'code' file, or an archive body ({', '.join(sorted(ARCHIVE_TYPES))}),"
            f" got {header or 'no content type'}"
        )
    boundary = mimetype.parameters.get("boundary", "")
    # RFC 2046, section 5.1.1: a boundary is 1 to 70 characters.
    if not 1 <= len(boundary) <= 70:
        raise InvalidRequest(f"multipart/form-data needs a boundary parameter of 1 to 70 characters, got {boundary!r}")


async def _within(timeout_s: float, step: Awaitable[_T]) -> _T:
    """Await one read of the request body, raising 408 when the client stalls and 400 when it is malformed."""
    try:
        async with asyncio.timeout(timeout_s):
            return await step
    except TimeoutError:
        raise RequestTimeout(f"the client sent no request body data for {timeout_s} seconds") from None
    except HttpProcessingError as exc:
        # aiohttp bounds part headers by the server's max_header_bytes and max_headers.
        raise InvalidRequest(f"invalid multipart body: {exc.message}") from exc
    except ValueError as exc:
        raise InvalidRequest(f"invalid multipart body: {exc}") from exc


async def _read_part(
    part: BodyPartReader,
    submission: Submission,
    spool_path: Path,
    limit: int,
    body_timeout_s: float,
    archive_field: str,
) -> None:
    name = part.name
    if not name:
        raise InvalidRequest("a multipart part has no name")
    if name == archive_field:
        if submission.archive is not None:
            raise InvalidRequest(f"more than one {archive_field!r} part")
        submission.archive_name = part.filename or ""
        submission.archive_bytes = await _spool(part, spool_path, limit, body_timeout_s)
        submission.archive = spool_path
        return
    repeatable = name in REPEATABLE_FIELDS
    if name in submission.fields and not repeatable:
        raise InvalidRequest(f"field {name!r} given more than once")
    data = bytearray()
    while chunk := await _within(body_timeout_s, part.read_chunk(CHUNK_BYTES)):
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


async def _spool(part: BodyPartReader | StreamReader, path: Path, limit: int, body_timeout_s: float) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    # NOTE: writes are synchronous; the page cache absorbs them, and a thread
    # hop per 256 KiB chunk costs more than it saves on local disks.
    with path.open("wb") as spool:
        while chunk := await _within(body_timeout_s, _read_chunk(part)):
            written += len(chunk)
            if written > limit:
                raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes", limit=limit)
            spool.write(chunk)
    if written == 0:
        raise InvalidRequest("the uploaded archive is empty")
    return written


async def _read_chunk(source: BodyPartReader | StreamReader) -> bytes:
    if isinstance(source, StreamReader):
        return await source.read(CHUNK_BYTES)
    return await source.read_chunk(CHUNK_BYTES)


def unpack_archive(archive: Path, destination: Path, limits: UnpackLimits) -> None:
    """Unpack a tar, tar.gz or zip into `destination`, flattening one top folder.

    Runs in a worker thread. On any rejection `destination` is removed whole.
    """
    staging = destination.with_name(destination.name + ".unpacking")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    budget = _Budget(limits, archive.stat().st_size)
    try:
        if zipfile.is_zipfile(archive):
            _unpack_zip(archive, staging, budget)
        else:
            _unpack_tar(archive, staging, budget)
        _check_links(staging)
        root = _project_root(staging)
        root.rename(destination)
    except BaseException:
        shutil.rmtree(destination, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _Budget:
    """Counts of the members and bytes an archive has unpacked so far, checked against its limits."""

    def __init__(self, limits: UnpackLimits, archive_bytes: int) -> None:
        self.limits = limits
        self.archive_bytes = archive_bytes
        self.files = 0
        self.bytes = 0
        self.max_ratio_bytes = limits.max_compression_ratio * max(archive_bytes, RATIO_BASE_BYTES)

    def add(self, member: str, size: int) -> None:
        """Count a member of `size` bytes before it is written; raise when a limit is passed."""
        self.files += 1
        self.bytes += size
        limits = self.limits
        if self.files > limits.max_files:
            raise ArchiveRejected(f"archive has more than {limits.max_files} members", member=member, rule="max_files")
        if size > limits.max_file_bytes:
            raise ArchiveRejected(
                f"member {member!r} is {size} bytes, over the single-file limit of {limits.max_file_bytes} bytes",
                member=member,
                rule="max_file_bytes",
            )
        if self.bytes > limits.max_unpacked_bytes:
            raise ArchiveRejected(
                f"archive unpacks to more than {limits.max_unpacked_bytes} bytes",
                member=member,
                rule="max_unpacked_bytes",
            )
        if self.bytes > self.max_ratio_bytes:
            raise ArchiveRejected(
                f"archive unpacks to more than {limits.max_compression_ratio:g} times its compressed size "
                f"(at member {member!r}); it looks like an archive bomb",
                member=member,
                rule="max_compression_ratio",
            )


def _safe_relative(name: str) -> PurePosixPath:
    """Return a member name as a relative path, or raise when it could escape."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArchiveRejected(f"member {name!r} has an absolute path", member=name, rule="absolute_path")
    if "\x00" in name:
        raise ArchiveRejected(f"member {name!r} contains a NUL byte", member=name, rule="invalid_name")
    path = PurePosixPath(name)
    if ".." in path.parts:
        raise ArchiveRejected(f"member {name!r} contains a '..' component", member=name, rule="parent_component")
    parts = [part for part in path.parts if part not in ("", ".")]
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _inside(root: Path, candidate: Path) -> bool:
    root_real = os.path.realpath(root)
    candidate_real = os.path.realpath(candidate)
    return candidate_real == root_real or candidate_real.startswith(root_real + os.sep)


def _unpack_tar(archive: Path, root: Path, budget: _Budget) -> None:
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            for member in _iter_tar(tar):
                _extract_tar_member(tar, member, root, budget)
    except tarfile.ReadError as exc:
        # tarfile lists every compression it tried over several lines; the client needs one.
        raise ArchiveRejected(
            "not a tar, tar.gz or zip archive; attach the file itself, e.g. -F code=@project.tar.gz",
            rule="corrupt",
        ) from exc
    except (EOFError, OSError, zlib.error) as exc:
        if isinstance(exc, ArchiveRejected):
            raise
        raise ArchiveRejected(f"archive is truncated or corrupt: {exc}", rule="corrupt") from exc


def _iter_tar(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while (member := tar.next()) is not None:
        yield member


def _extract_tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path, budget: _Budget) -> None:
    relative = _safe_relative(member.name)
    target = root / relative
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise ArchiveRejected(
            f"member {member.name!r} is a device, FIFO or other special file", member=member.name, rule="special_file"
        )
    if member.issparse():
        # A sparse map can declare far more bytes than the archive holds.
        raise ArchiveRejected(f"member {member.name!r} is a sparse file", member=member.name, rule="special_file")
    if str(relative) == ".":
        # `tar -C project .` starts with the folder itself, which is the job's root.
        if not member.isdir():
            raise ArchiveRejected(
                f"member {member.name!r} names the archive root but is not a folder",
                member=member.name,
                rule="root_not_folder",
            )
        budget.add(member.name, 0)
        return
    if not _inside(root, target.parent):
        raise ArchiveRejected(
            f"member {member.name!r} would be written through a link outside the archive",
            member=member.name,
            rule="link_escape",
        )
    budget.add(member.name, member.size if member.isreg() else 0)
    if str(relative) == ".":
        return
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        if target.is_dir() and not target.is_symlink():
            raise ArchiveRejected(
                f"member {member.name!r} replaces a folder", member=member.name, rule="replaces_folder"
            )
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
        raise ArchiveRejected(
            f"symlink {member.name!r} points outside the archive ({link!r})", member=member.name, rule="link_escape"
        )
    # A link to a member that comes later is fine; _check_links judges links once all are written.
    os.symlink(link, target)


def _make_hardlink(member: tarfile.TarInfo, target: Path, root: Path) -> None:
    try:
        source = root / _safe_relative(member.linkname)
    except ArchiveRejected as exc:
        raise ArchiveRejected(
            f"hardlink {member.name!r} points outside the archive ({member.linkname!r})",
            member=member.name,
            rule="link_escape",
        ) from exc
    if not _inside(root, source) or not source.is_file() or source.is_symlink():
        raise ArchiveRejected(
            f"hardlink {member.name!r} must point at an earlier regular file in the archive ({member.linkname!r})",
            member=member.name,
            rule="link_escape",
        )
    os.link(source, target)


def _write_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise ArchiveRejected(f"member {member.name!r} has no data", member=member.name, rule="corrupt")
    # O_NOFOLLOW and O_EXCL: never write through a link that an earlier member planted.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    # Keep the owner's permission bits; setuid, setgid and sticky bits are dropped.
    mode = (member.mode & 0o777) | 0o600
    descriptor = os.open(target, flags, mode)
    with source, os.fdopen(descriptor, "wb") as output:
        _copy_at_most(source, output, member.size, member.name)


def _copy_at_most(source: IO[bytes], output: IO[bytes], size: int, member: str) -> None:
    """Copy `source` while it yields no more than the `size` its header declared."""
    written = 0
    while chunk := source.read(CHUNK_BYTES):
        written += len(chunk)
        if written > size:
            raise ArchiveRejected(
                f"member {member!r} is larger than its header says ({size} bytes)", member=member, rule="size_mismatch"
            )
        output.write(chunk)


def _unpack_zip(archive: Path, root: Path, budget: _Budget) -> None:
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = bundle.infolist()
            # The central directory declares every member up front: judge them all before writing one.
            declared = _Budget(budget.limits, budget.archive_bytes)
            for info in members:
                _check_zip_ratio(info, budget.limits)
                declared.add(info.filename, info.file_size)
            for info in members:
                _extract_zip_member(bundle, info, root, budget)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise ArchiveRejected(f"zip archive is corrupt or unsupported: {exc}", rule="corrupt") from exc


def _check_zip_ratio(info: zipfile.ZipInfo, limits: UnpackLimits) -> None:
    ratio_limit = limits.max_compression_ratio
    if info.file_size > RATIO_BASE_BYTES and info.file_size > ratio_limit * max(info.compress_size, 1):
        raise ArchiveRejected(
            f"member {info.filename!r} expands {info.compress_size} bytes to {info.file_size}, "
            f"more than {ratio_limit:g} times; it looks like an archive bomb",
            member=info.filename,
            rule="max_compression_ratio",
        )


def _extract_zip_member(bundle: zipfile.ZipFile, info: zipfile.ZipInfo, root: Path, budget: _Budget) -> None:
    relative = _safe_relative(info.filename)
    unix_mode = info.external_attr >> 16
    if stat.S_ISLNK(unix_mode):
        raise ArchiveRejected(
            f"member {info.filename!r} is a symlink, which zip uploads cannot contain",
            member=info.filename,
            rule="special_file",
        )
    # Zip writers often store permission bits without a file type; those are regular files.
    if stat.S_IFMT(unix_mode) and not (stat.S_ISREG(unix_mode) or stat.S_ISDIR(unix_mode)):
        raise ArchiveRejected(f"member {info.filename!r} is a special file", member=info.filename, rule="special_file")
    target = root / relative
    if str(relative) == "." and info.is_dir():
        budget.add(info.filename, 0)
        return
    if not _inside(root, target.parent):
        raise ArchiveRejected(
            f"member {info.filename!r} would be written outside the archive", member=info.filename, rule="link_escape"
        )
    budget.add(info.filename, info.file_size)
    if info.is_dir() or str(relative) == ".":
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = ((unix_mode & 0o777) or 0o644) | 0o600
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with bundle.open(info) as source, os.fdopen(descriptor, "wb") as output:
        # The declared size can lie; count what decompression really yields.
        _copy_at_most(source, output, info.file_size, info.filename)


def _check_links(root: Path) -> None:
    """Reject a symlink that now resolves outside `root`; remove one that resolves to nothing.

    Each link was checked when it was written, but a later link can change
    where an earlier one leads (`a -> b/..`, then `b -> .`).
    """
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            if not path.is_symlink():
                continue
            member = path.relative_to(root).as_posix()
            if not _inside(root, path):
                raise ArchiveRejected(
                    f"symlink {member!r} points outside the archive", member=member, rule="link_escape"
                )
            if not path.exists():
                log.info("upload_dangling_link_removed", member=member, target=os.readlink(path))
                path.unlink()


def _project_root(staging: Path) -> Path:
    """Return the folder that holds the project: the archive root or its one top folder."""
    entries = [entry for entry in staging.iterdir() if entry.name not in ("__MACOSX",)]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return staging
