"""The dataset store on its own, for layouts that the API cannot create."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from floydd.datasets import DatasetNameTaken, DatasetStore


def unpacked(store: DatasetStore, text: str) -> Path:
    """Return a staging folder with one file, as an upload leaves it."""
    folder = store.new_staging_path()
    folder.mkdir(parents=True)
    (folder / "n.txt").write_text(text)
    return folder


async def test_name_from_older_store_stays_with_owner(tmp_path: Path) -> None:
    store = DatasetStore(tmp_path / "datasets")
    # The layout before names recorded their owner: only the version records it.
    version = tmp_path / "datasets" / "shared" / "1"
    (version / "data").mkdir(parents=True)
    (version / "dataset.json").write_text(
        json.dumps({"bytes": 0, "files": 0, "created_at": "2026-01-01T00:00:00Z", "owner": "alice"})
    )
    (tmp_path / "datasets" / "shared" / "next-version").write_text("2")

    await store.delete(store.get("shared", 1))
    with pytest.raises(DatasetNameTaken):
        await store.add("shared", unpacked(store, "bob\n"), "bob")
    added = await store.add("shared", unpacked(store, "alice\n"), "alice")

    assert added.id == "shared/2"
    assert added.owner == "alice"
