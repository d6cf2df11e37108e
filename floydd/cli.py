"""Command line: `floydd serve` runs the daemon, `floydd env build` prepares images,
`floydd token` manages API tokens."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import structlog
import uvloop
from aiohttp import web

from floydd import __version__
from floydd.auth import TokenRecord, TokenStore
from floydd.config import ConfigError, Settings, load_settings
from floydd.errors import FloyddError
from floydd.log import configure_logging
from floydd.store import JobStore
from floydd.systemd import notify_ready, notify_status, notify_stopping

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

EXIT_CONFIG = 2
EXIT_STARTUP = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="floydd",
        description="Serve uploaded model code from Docker containers on one GPU box.",
    )
    parser.add_argument("--version", action="version", version=f"floydd {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="lowest level of log lines to print (default: info)",
    )
    parser.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default="auto",
        help="json lines, readable console lines, or auto (default): console on a terminal or in the "
        "systemd journal, json otherwise",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon: the API and /expose/<id>")
    _add_config_argument(serve)
    serve.add_argument("--host", help="address to listen on (overrides server.host)")
    serve.add_argument("--port", type=int, help="TCP port to listen on, 0 for any free port (overrides server.port)")
    serve.add_argument("--state-dir", help="folder for the database, uploads and logs (overrides server.state_dir)")
    serve.set_defaults(handler=_serve)

    env = commands.add_parser("env", help="manage environment images")
    env_commands = env.add_subparsers(dest="env_command", required=True, metavar="ENV_COMMAND")
    build = env_commands.add_parser("build", help="build the config's locally built env images that are missing")
    build.add_argument("names", nargs="*", metavar="NAME", help="envs to build (default: every buildable env)")
    build.add_argument("--force", action="store_true", help="rebuild even when the image is present")
    _add_config_argument(build)
    build.set_defaults(handler=_env_build)
    listing = env_commands.add_parser("list", help="list the config's envs and their images")
    _add_config_argument(listing)
    listing.set_defaults(handler=_env_list)
    _add_token_commands(commands)
    return parser


def _add_token_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = commands.add_parser("token", help="manage API tokens; works whether or not the daemon runs")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="TOKEN_COMMAND")
    create = token_commands.add_parser("create", help="create a token for a user and print it once")
    create.add_argument("name", metavar="NAME", help="user name; the user is created on first use")
    create.add_argument("--admin", action="store_true", help="the user sees and stops every job, without limits")
    create.set_defaults(handler=_token_create)
    listing = token_commands.add_parser("list", help="list tokens: id, user, role, created, revoked")
    listing.set_defaults(handler=_token_list)
    revoke = token_commands.add_parser("revoke", help="revoke a token by its id; it stops working at once")
    revoke.add_argument("token_id", metavar="ID", help="the token's id, as `floydd token list` shows it")
    revoke.set_defaults(handler=_token_revoke)
    for parser in (create, listing, revoke):
        _add_config_argument(parser)
        parser.add_argument("--state-dir", help="folder of the daemon's database (overrides server.state_dir)")


def _add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="TOML config file (default: the embedded defaults, as in floydd.toml)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    json_logs = {"auto": None, "json": True, "console": False}[args.log_format]
    configure_logging(args.log_level, json=json_logs)
    try:
        settings = load_settings(
            args.config,
            **{
                "server.host": getattr(args, "host", None),
                "server.port": getattr(args, "port", None),
                "server.state_dir": getattr(args, "state_dir", None),
            },
        )
    except ConfigError as exc:
        print(f"floydd: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    handler = args.handler
    result: int = handler(settings, args)
    return result


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    try:
        listener = _bind(settings.server.host, settings.server.port)
    except OSError as exc:
        print(
            f"floydd: cannot listen on {settings.server.host}:{settings.server.port}: {exc.strerror}", file=sys.stderr
        )
        return EXIT_STARTUP
    bound_port = listener.getsockname()[1]
    # With --port 0 the endpoints must name the port the kernel chose.
    settings = dataclasses.replace(settings, server=dataclasses.replace(settings.server, port=bound_port))
    try:
        uvloop.run(_run_server(settings, listener))
    except StartupFailed as exc:
        log.error("floydd_start_failed", error=str(exc))
        notify_status(f"start-up failed: {exc}")
        return EXIT_STARTUP
    return 0


class StartupFailed(RuntimeError):
    pass


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    # The kernel caps the backlog at net.core.somaxconn; asking for more takes
    # all it allows, so a burst of thousands of clients is not reset.
    listener.listen(65535)
    listener.setblocking(False)
    return listener


async def _run_server(settings: Settings, listener: socket.socket) -> None:
    from floydd.app import build_app
    from floydd.front import build_front, handler_options

    app = build_app(settings)
    # handler_cancellation: a client that disconnects cancels its handler, so a
    # request that waits in a job's queue leaves it at once.
    server = settings.server
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=server.shutdown_grace_s, **handler_options(server)
    )
    notify_status("opening the database and adopting running containers")
    try:
        await runner.setup()
    except Exception as exc:
        raise StartupFailed(str(exc)) from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    front = build_front(runner, settings.server)
    listening = await loop.create_server(front, sock=listener)
    log.info("floydd_listening", host=settings.server.host, port=settings.server.port, url=settings.base_url())
    # runner.setup() ran the app's start-up (database open, containers
    # reconciled) and the socket accepts connections, so floydd is ready.
    notify_ready(f"listening on {settings.base_url()}")
    await stop.wait()
    log.info("floydd_stopping", grace_s=settings.server.shutdown_grace_s)
    notify_stopping(f"finishing requests in flight, up to {settings.server.shutdown_grace_s:g} s")
    listening.close()
    await front.shutdown(settings.server.shutdown_grace_s)
    await runner.cleanup()


def _env_build(settings: Settings, args: argparse.Namespace) -> int:
    from floydd.envbuild import EnvBuildError, build_envs

    try:
        results = uvloop.run(build_envs(settings, args.names or None, force=args.force))
    except EnvBuildError as exc:
        print(f"floydd: env build failed: {exc}", file=sys.stderr)
        return 1
    for result in results:
        print(f"{result.name}\t{result.image}\t{result.outcome}\t{result.seconds:.1f}s")
    return 0


def _env_list(settings: Settings, args: argparse.Namespace) -> int:
    default = settings.jobs.default_env
    for env in settings.envs.values():
        built = "built locally" if env.build is not None else "existing image"
        marker = " (default)" if env.name == default else ""
        print(f"{env.name}{marker}\t{env.image}\t{built}\t{env.description}")
    return 0


def _token_create(settings: Settings, args: argparse.Namespace) -> int:
    async def create(tokens: TokenStore) -> tuple[str, TokenRecord]:
        return await tokens.create(args.name, admin=args.admin)

    try:
        token, record = uvloop.run(_with_tokens(settings, create))
    except FloyddError as exc:
        print(f"floydd: {exc.detail}", file=sys.stderr)
        return 1
    # Only the token goes to stdout, so that `TOKEN=$(floydd token create ...)` works.
    print(token)
    role = "admin" if record.is_admin else "user"
    print(f"floydd: created token {record.id} for {role} {record.user_name!r}; it is shown only once", file=sys.stderr)
    return 0


def _token_list(settings: Settings, args: argparse.Namespace) -> int:
    async def listing(tokens: TokenStore) -> list[TokenRecord]:
        return await tokens.list()

    print("ID\tUSER\tROLE\tCREATED\tREVOKED")
    for record in uvloop.run(_with_tokens(settings, listing)):
        role = "admin" if record.is_admin else "user"
        print(f"{record.id}\t{record.user_name}\t{role}\t{record.created_at}\t{record.revoked_at or '-'}")
    return 0


def _token_revoke(settings: Settings, args: argparse.Namespace) -> int:
    async def revoke(tokens: TokenStore) -> TokenRecord:
        return await tokens.revoke(args.token_id)

    try:
        record = uvloop.run(_with_tokens(settings, revoke))
    except FloyddError as exc:
        print(f"floydd: {exc.detail}", file=sys.stderr)
        return 1
    print(f"revoked token {record.id} of user {record.user_name}")
    return 0


async def _with_tokens(settings: Settings, action: Callable[[TokenStore], Awaitable[_T]]) -> _T:
    """Open the daemon's database, which may be in use by a running daemon, and run `action`."""
    store = JobStore(settings.state_path / "floydd.sqlite3")
    await store.open()
    try:
        return await action(TokenStore(store))
    finally:
        await store.close()


if __name__ == "__main__":
    raise SystemExit(main())
