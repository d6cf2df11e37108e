"""The OpenAPI description: it matches the routes, it is served, and schemathesis finds no fault."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import aiohttp
import pytest

from floydd.admission import unknown_api_path
from floydd.app import build_app
from floydd.config import load_settings
from floydd.openapi import openapi_document
from tests.conftest import CONFIG, Daemon

SCHEMATHESIS_CONFIG = Path(__file__).parent / "schemathesis.toml"


def routed_operations(tmp_path: Path) -> set[tuple[str, str]]:
    settings = load_settings(CONFIG, **{"server.state_dir": str(tmp_path)})
    app = build_app(settings)
    operations = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if not path.startswith("/api") or route.handler is unknown_api_path or route.method == "HEAD":
            continue
        operations.add((route.method.lower(), path))
    return operations


def described_operations() -> set[tuple[str, str]]:
    operations = set()
    for path, item in openapi_document()["paths"].items():
        for method in item:
            if method != "parameters":
                operations.add((method, path))
    return operations


def test_openapi_describes_every_route(tmp_path: Path) -> None:
    routed = routed_operations(tmp_path)
    described = described_operations()
    assert routed - described == set(), "routes missing from floydd/openapi.py"
    assert described - routed == set(), "described paths that no route serves"


def test_openapi_refs_resolve() -> None:
    document = openapi_document()
    schemas = document["components"]["schemas"]
    text = str(document)
    for name in {part.split("'")[0] for part in text.split("#/components/schemas/")[1:]}:
        assert name in schemas


@pytest.mark.docker
async def test_openapi_is_served(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{daemon.url}/api/v1/openapi.json") as response:
        assert response.status == 200
        served = await response.json()
    assert served == openapi_document()


@pytest.mark.docker
async def test_schemathesis_finds_no_fault(daemon: Daemon) -> None:
    executable = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert executable is not None, "schemathesis is a test dependency: pip install -e '.[test]'"
    process = await asyncio.create_subprocess_exec(
        executable, "--no-color", "--config-file", str(SCHEMATHESIS_CONFIG),
        "run", f"{daemon.url}/api/v1/openapi.json",
        "--header", f"Authorization: Bearer {daemon.admin_token}",
        "--max-examples", "25", "--seed", "1", "--workers", "1", "--generation-deterministic",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await process.communicate()
    assert process.returncode == 0, output.decode(errors="replace")[-6000:]
    assert daemon.process.returncode is None
