"""Datasets: named, versioned folders that jobs mount read-only.

Each upload of a name makes a new version, `name/1`, `name/2`, ...; a
version never changes after it is stored, and a deleted number is not
reused, so `data=name/2` always means the same files. The store lives
only in the file system, under `<state_dir>/datasets`:

    <name>/next-version      the number the next upload gets
    <name>/owner             the user the name belongs to, kept after its versions are deleted
    <name>/<N>/data/         the unpacked files, mounted into jobs
    <name>/<N>/dataset.json  size, file count and creation time

An upload is unpacked into `.staging/` and renamed into place at once, so a
daemon killed mid-upload leaves only staging files, which `clean_staging`
removes at the next start.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from floydd.auth import User
from floydd.errors import FloyddError, InvalidRequest, NotFound
from floydd.jobs import utcnow

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
# `jobs/<id>` names a finished job's output, so no dataset may be called jobs.
RESERVED_NAMES = frozenset({"jobs"})


class DatasetNotFound(NotFound):
    code = "dataset_not_found"


class DatasetNameTaken(FloyddError):
    status = 409
    code = "dataset_name_taken"


class DatasetInUse(FloyddError):
    status = 409
    code = "dataset_in_use"


@dataclass(frozen=True)
class DatasetVersion:
    name: str
    version: int
    path: Path
    bytes: int
    files: int
    created_at: str
    # Name of the user who uploaded it; None for uploads from before tokens existed.
    owner: str | None = None

    @property
    def id(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def data(self) -> Path:
        return self.path / "data"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "bytes": self.bytes,
            "files": self.files,
            "created_at": self.created_at,
            "owner": self.owner,
        }


def may_use_dataset(user: User, dataset: DatasetVersion) -> bool:
    """Tell whether `user` may see, mount or delete `dataset`: its owner and admins may."""
    return user.is_admin or dataset.owner == user.name


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name) or name in RESERVED_NAMES:
        raise InvalidRequest(
            f"invalid dataset name {name!r}: use 1 to 64 lowercase letters, digits, '.', '_' or '-', not 'jobs'"
        )
    return name


class DatasetStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def staging(self) -> Path:
        return self.root / ".staging"

    def new_staging_path(self) -> Path:
        self.staging.mkdir(parents=True, exist_ok=True)
        return self.staging / secrets.token_hex(8)

    def clean_staging(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    async def add(self, name: str, unpacked: Path, owner: str) -> DatasetVersion:
        """Store the folder `unpacked` (in staging) as the next version of `name`, owned by `owner`."""
        check_name(name)
        async with self._locks.setdefault(name, asyncio.Lock()):
            return await asyncio.to_thread(self._add, name, unpacked, owner)

    def _add(self, name: str, unpacked: Path, owner: str) -> DatasetVersion:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        recorded = self._owner(folder)
        if recorded is not None and recorded != owner:
            raise DatasetNameTaken(f"dataset name {name!r} belongs to another user; choose another name")
        version = self._next_version(folder)
        files, size = measure(unpacked)
        meta = {
            "bytes": size,
            "files": files,
            "created_at": utcnow().isoformat().replace("+00:00", "Z"),
            "owner": owner,
        }
        holder = unpacked.with_name(unpacked.name + ".version")
        holder.mkdir()
        unpacked.rename(holder / "data")
        (holder / "dataset.json").write_text(json.dumps(meta))
        # The counter moves first: a crash between the two steps skips a number, never reuses one.
        _write_atomic(folder / "next-version", str(version + 1))
        holder.rename(folder / str(version))
        _record_owner(folder, owner)
        return self._load(name, version)

    def _owner(self, folder: Path) -> str | None:
        """Return the user the name belongs to, or None for a new name."""
        try:
            return (folder / "owner").read_text().strip() or None
        except FileNotFoundError:
            # A store written before names recorded their owner: the owner of any version.
            owners = {version.owner for version in self._versions(folder.name) if version.owner}
            return min(owners) if owners else None

    def _next_version(self, folder: Path) -> int:
        try:
            recorded = int((folder / "next-version").read_text().strip())
        except (OSError, ValueError):
            recorded = 1
        existing = [int(entry.name) for entry in folder.iterdir() if entry.name.isdigit()]
        return max([recorded, *(number + 1 for number in existing)])

    def list(self) -> list[DatasetVersion]:
        if not self.root.is_dir():
            return []
        versions = []
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.name.isdigit():
                    versions.append(self._load(folder.name, int(entry.name)))
        return sorted(versions, key=lambda item: (item.name, item.version))

    def _versions(self, name: str) -> Sequence[DatasetVersion]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return [self._load(name, int(entry.name)) for entry in folder.iterdir() if entry.name.isdigit()]

    def get(self, name: str, version: int | None = None) -> DatasetVersion:
        """Return one version, or the latest one when `version` is None."""
        check_name(name)
        folder = self.root / name
        numbers: list[int] = []
        if folder.is_dir():
            numbers = sorted(int(entry.name) for entry in folder.iterdir() if entry.name.isdigit())
        if version is None:
            if not numbers:
                raise DatasetNotFound(f"no dataset named {name!r}; upload one with POST /api/v1/datasets")
            version = numbers[-1]
        if version not in numbers:
            raise DatasetNotFound(f"no dataset version {name}/{version}")
        return self._load(name, version)

    def _load(self, name: str, version: int) -> DatasetVersion:
        path = self.root / name / str(version)
        try:
            meta = json.loads((path / "dataset.json").read_text())
        except (OSError, ValueError):
            meta = {}
        return DatasetVersion(
            name,
            version,
            path,
            int(meta.get("bytes", 0)),
            int(meta.get("files", 0)),
            str(meta.get("created_at", "")),
            meta.get("owner"),
        )

    async def delete(self, dataset: DatasetVersion) -> None:
        async with self._locks.setdefault(dataset.name, asyncio.Lock()):
            if dataset.owner:
                # A name stored before names recorded their owner keeps it after its last version goes.
                await asyncio.to_thread(_record_owner, dataset.path.parent, dataset.owner)
            # Renamed away first, so no job can be handed a half-deleted folder.
            doomed = self.new_staging_path()
            dataset.path.rename(doomed)
            await asyncio.to_thread(shutil.rmtree, doomed, True)


def measure(folder: Path) -> tuple[int, int]:
    """Return the file count and total size in bytes of `folder`."""
    files = 0
    size = 0
    for directory, _, names in os.walk(folder):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(directory, name)).st_size
    return files, size


def _record_owner(folder: Path, owner: str) -> None:
    """Record the owner of the name in `folder`, unless it is recorded already."""
    if not (folder / "owner").is_file():
        _write_atomic(folder / "owner", owner)


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
