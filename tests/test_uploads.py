"""Archive unpacking: layouts that are accepted and members that are rejected."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from floydd.uploads import ArchiveRejected, UnpackLimits, unpack_archive
from tests.hostile import tar_gz_bytes

LIMITS = UnpackLimits(max_unpacked_bytes=10 * 1024 * 1024, max_files=1000)


def make_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    path.write_bytes(tar_gz_bytes(members))
    return path


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def test_files_at_root_are_kept(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "a.tgz", [("app.py", b"print(1)\n"), ("lib/util.py", b"")])
    unpack_archive(archive, tmp_path / "code", LIMITS)
    assert (tmp_path / "code" / "app.py").read_bytes() == b"print(1)\n"
    assert (tmp_path / "code" / "lib" / "util.py").is_file()


def test_dot_root_member_is_accepted(tmp_path: Path) -> None:
    # What `tar -czf p.tgz -C project .` writes: the folder itself, then ./-prefixed members.
    root = tarfile.TarInfo(".")
    root.type = tarfile.DIRTYPE
    archive = make_tar(tmp_path / "a.tgz", [root, ("./app.py", b"x"), ("./lib/util.py", b"y")])
    unpack_archive(archive, tmp_path / "code", LIMITS)
    assert (tmp_path / "code" / "app.py").read_bytes() == b"x"
    assert (tmp_path / "code" / "lib" / "util.py").read_bytes() == b"y"


def test_dot_root_symlink_is_rejected(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "a.tgz", [link(".", "/etc")])
    with pytest.raises(ArchiveRejected, match="names the archive root"):
        unpack_archive(archive, tmp_path / "code", LIMITS)


def test_one_top_folder_is_flattened(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "a.tgz", [("project/app.py", b"x"), ("project/data/a.txt", b"y")])
    unpack_archive(archive, tmp_path / "code", LIMITS)
    assert (tmp_path / "code" / "app.py").read_bytes() == b"x"
    assert (tmp_path / "code" / "data" / "a.txt").read_bytes() == b"y"


def test_zip_is_unpacked(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("project/app.py", "print(2)\n")
    unpack_archive(archive, tmp_path / "code", LIMITS)
    assert (tmp_path / "code" / "app.py").read_text() == "print(2)\n"


def test_in_tree_symlink_is_kept(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "a.tgz", [("assets/x.txt", b"x"), link("data", "assets")])
    unpack_archive(archive, tmp_path / "code", LIMITS)
    assert (tmp_path / "code" / "data" / "x.txt").read_bytes() == b"x"


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("app.py", b""), ("../../tmp/pwned", b"x")], "'..'"),
        ([("/tmp/pwned2", b"x")], "absolute path"),
        ([link("l", "/tmp/target"), ("l", b"x")], "points outside"),
        ([link("d", "/etc"), ("d/x", b"x")], "points outside"),
        ([link("up", "../.."), ("up/x", b"x")], "points outside"),
        ([link("h", "/etc/passwd", tarfile.LNKTYPE)], "points outside"),
        ([link("h", "missing.txt", tarfile.LNKTYPE)], "hardlink"),
    ],
    ids=[
        "dotdot",
        "absolute",
        "symlink-then-file",
        "symlink-dir",
        "relative-escape",
        "hardlink-abs",
        "hardlink-dangling",
    ],
)
def test_escaping_member_is_rejected(tmp_path: Path, members: list, message: str) -> None:
    archive = make_tar(tmp_path / "a.tgz", members)
    destination = tmp_path / "job" / "code"
    destination.parent.mkdir()
    with pytest.raises(ArchiveRejected, match=message):
        unpack_archive(archive, destination, LIMITS)
    assert list(destination.parent.iterdir()) == []
    assert not (tmp_path / "pwned").exists()


def test_device_node_is_rejected(tmp_path: Path) -> None:
    device = tarfile.TarInfo("null")
    device.type = tarfile.CHRTYPE
    archive = make_tar(tmp_path / "a.tgz", [device])
    with pytest.raises(ArchiveRejected, match="device"):
        unpack_archive(archive, tmp_path / "code", LIMITS)


def test_setuid_bit_is_dropped(tmp_path: Path) -> None:
    info = tarfile.TarInfo("tool")
    info.size = 1
    info.mode = 0o4755
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as archive:
        archive.addfile(info, io.BytesIO(b"x"))
    unpack_archive(path, tmp_path / "code", LIMITS)
    assert (tmp_path / "code" / "tool").stat().st_mode & 0o7777 == 0o755


def test_file_count_limit(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "a.tgz", [(f"f{i}", b"") for i in range(11)])
    with pytest.raises(ArchiveRejected, match="more than 10 members"):
        unpack_archive(archive, tmp_path / "code", UnpackLimits(max_unpacked_bytes=1000, max_files=10))
    assert not (tmp_path / "code").exists()


def test_unpacked_size_limit(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "a.tgz", [("zeros", bytes(4096))])
    with pytest.raises(ArchiveRejected, match="unpacks to more than 1000 bytes"):
        unpack_archive(archive, tmp_path / "code", UnpackLimits(max_unpacked_bytes=1000, max_files=10))


def test_zip_slip_is_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("app.py", "")
        bundle.writestr("../../tmp/pwned", "x")
    with pytest.raises(ArchiveRejected, match="'..'"):
        unpack_archive(archive, tmp_path / "code", LIMITS)
    assert not (tmp_path / "code").exists()


def test_garbage_is_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "a.tgz"
    archive.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(ArchiveRejected):
        unpack_archive(archive, tmp_path / "code", LIMITS)
