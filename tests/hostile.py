"""Builders of hostile archives for the upload tests, written without extracting anything.

The archive bombs are built from one compressed segment of zeros repeated:
after `Z_FULL_FLUSH` a deflate stream is byte-aligned and refers to nothing
before it, so N copies of the segment decompress to N times its zeros. Ten
GiB of zeros thus cost about 10 MB of compressed bytes and no more memory.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zlib
from pathlib import Path

SEGMENT_ZEROS = 1024 * 1024


def _zero_segment() -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(bytes(SEGMENT_ZEROS)) + compressor.flush(zlib.Z_FULL_FLUSH)


def _deflate_prefix(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)


# A fresh compressor's final flush: an empty last block that ends the deflate stream.
_DEFLATE_END = zlib.compressobj(9, zlib.DEFLATED, -15).flush()


def zeros_tar_gz(path: Path, name: str, size: int) -> Path:
    """Write a .tar.gz whose one member `name` is `size` bytes of zeros (a multiple of 1 MiB)."""
    info = tarfile.TarInfo(name)
    info.size = size
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    segment = _zero_segment()
    with path.open("wb") as output:
        # gzip header: magic, deflate, no flags, no mtime, no extra flags, unknown OS.
        output.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")
        output.write(_deflate_prefix(header))
        # One more segment than the data: its zeros are the tar padding and end-of-archive blocks.
        for _ in range(size // SEGMENT_ZEROS + 1):
            output.write(segment)
        output.write(_DEFLATE_END)
        # NOTE: the CRC is left at 0 because computing it means hashing every zero. A reader
        # that unpacked everything would fail at the trailer, but floydd must stop at the header.
        unpacked = len(header) + size + SEGMENT_ZEROS
        output.write(struct.pack("<II", 0, unpacked & 0xFFFFFFFF))
    return path


def zeros_zip(path: Path, name: str, size: int) -> Path:
    """Write a Zip64 archive whose one deflated member `name` is `size` bytes of zeros."""
    encoded = name.encode()
    segment = _zero_segment()
    compressed_size = len(segment) * (size // SEGMENT_ZEROS) + len(_DEFLATE_END)
    zip64_sizes = struct.pack("<HHQQ", 0x0001, 16, size, compressed_size)
    local = struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 45, 0, 8, 0, 0x21, 0, 0xFFFFFFFF, 0xFFFFFFFF, len(encoded), len(zip64_sizes)
    )
    with path.open("wb") as output:
        output.write(local + encoded + zip64_sizes)
        for _ in range(size // SEGMENT_ZEROS):
            output.write(segment)
        output.write(_DEFLATE_END)
        directory_offset = output.tell()
        central = struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50, 45 | (3 << 8), 45, 0, 8, 0, 0x21, 0, 0xFFFFFFFF, 0xFFFFFFFF,
            len(encoded), len(zip64_sizes), 0, 0, 0, 0o100644 << 16, 0,
        )  # fmt: skip
        record = central + encoded + zip64_sizes
        output.write(record)
        output.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(record), directory_offset, 0))
    return path


def empty_files_tar_gz(path: Path, count: int) -> Path:
    """Write a .tar.gz of `count` empty files named f0, f1, ..., streamed to disk."""
    with gzip.open(path, "wb", compresslevel=1) as raw, tarfile.open(fileobj=raw, mode="w") as archive:
        for index in range(count):
            archive.addfile(tarfile.TarInfo(f"f{index}"))
    return path


def tar_gz_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    """Return a .tar.gz of members: a TarInfo as it is (links, devices), or a (name, data) file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info
