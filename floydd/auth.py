"""Users and API tokens: how they are stored, and the request checks built on them.

A token is `floydd_<id>_<secret>`: `id` is 8 random bytes in hex, public, and
names the token in `floydd token list` and `floydd token revoke`. `secret` is
32 random bytes (256 bits) from `secrets`, shown once when the token is
created. Only the SHA-256 of the secret is stored. A plain hash is the standard
choice for random tokens, unlike passwords: with 256 bits of entropy nobody can
search the hash space, so a slow hash such as bcrypt or argon2 would add
tens of milliseconds to every request and no safety. The row is found by
`id`, then the hashes are compared with `hmac.compare_digest`, so the time a
wrong secret takes does not depend on how much of it matched.

Every `/api` request needs `Authorization: Bearer <token>`. A user sees and
stops only the jobs it owns; an admin sees all. A job created with
`private=true` answers `/expose/<id>` only to its owner's token or an admin's.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from floydd.errors import Forbidden, InvalidRequest, JobNotFound, NotFound, Unauthorized
from floydd.jobs import Job, utcnow
from floydd.log import LogThrottle
from floydd.store import JobStore

log = structlog.get_logger(__name__)

TOKEN_PREFIX = "floydd"
_TOKEN = re.compile(r"^floydd_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
REALM = "floydd"
# Job ids whose privacy is cached for /expose; privacy and owner never change after creation.
_EXPOSE_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class User:
    name: str
    is_admin: bool


@dataclass(frozen=True)
class TokenRecord:
    """A token as `floydd token list` shows it: never the secret."""

    id: str
    user_name: str
    is_admin: bool
    created_at: str
    revoked_at: str | None


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def parse_token(token: str) -> tuple[str, str] | None:
    """Split a token into its id and secret; None when it is not shaped like one."""
    match = _TOKEN.match(token)
    if match is None:
        return None
    return match.group(1), match.group(2)


class TokenStore:
    """Users and tokens in the daemon's SQLite file, next to the jobs table."""

    def __init__(self, store: JobStore) -> None:
        self._store = store

    async def create(self, user_name: str, *, admin: bool) -> tuple[str, TokenRecord]:
        """Create a token for `user_name`, creating the user on first use; return the token once."""
        if not _USER_NAME.match(user_name):
            raise InvalidRequest(
                f"invalid user name {user_name!r}: use 1 to 64 letters, digits, '.', '_' or '-', starting alphanumeric"
            )
        db = self._store.connection
        now = utcnow().isoformat()
        async with db.execute("SELECT is_admin FROM users WHERE name = ?", (user_name,)) as cursor:
            row = await cursor.fetchone()
        if row is None:
            await db.execute(
                "INSERT INTO users (name, is_admin, created_at) VALUES (?, ?, ?)", (user_name, int(admin), now)
            )
        elif bool(row[0]) != admin:
            role = "an admin" if row[0] else "not an admin"
            raise InvalidRequest(
                f"user {user_name!r} already exists and is {role}; "
                "pass --admin only for admin users, or pick another name"
            )
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        await db.execute(
            "INSERT INTO tokens (id, user_name, secret_sha256, created_at) VALUES (?, ?, ?, ?)",
            (token_id, user_name, hash_secret(secret), now),
        )
        await db.commit()
        record = TokenRecord(token_id, user_name, admin, now, None)
        return f"{TOKEN_PREFIX}_{token_id}_{secret}", record

    async def list(self) -> list[TokenRecord]:
        query = (
            "SELECT tokens.id, tokens.user_name, users.is_admin, tokens.created_at, tokens.revoked_at "
            "FROM tokens JOIN users ON users.name = tokens.user_name ORDER BY tokens.created_at, tokens.id"
        )
        async with self._store.connection.execute(query) as cursor:
            rows = await cursor.fetchall()
        return [TokenRecord(row[0], row[1], bool(row[2]), row[3], row[4]) for row in rows]

    async def revoke(self, token_id: str) -> TokenRecord:
        """Revoke a token by its id; it stops working at the daemon's next request."""
        db = self._store.connection
        await db.execute(
            "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (utcnow().isoformat(), token_id)
        )
        await db.commit()
        for record in await self.list():
            if record.id == token_id:
                return record
        raise NotFound(f"no token with id {token_id!r}; `floydd token list` shows the ids")

    async def authenticate(self, token: str) -> User | None:
        """Return the user a valid, unrevoked token belongs to, or None."""
        parts = parse_token(token)
        if parts is None:
            return None
        token_id, secret = parts
        query = (
            "SELECT tokens.secret_sha256, tokens.revoked_at, users.name, users.is_admin "
            "FROM tokens JOIN users ON users.name = tokens.user_name WHERE tokens.id = ?"
        )
        async with self._store.connection.execute(query, (token_id,)) as cursor:
            row = await cursor.fetchone()
        # Hash even when the id is unknown, so both failures take the same time.
        presented = hash_secret(secret)
        stored = row[0] if row is not None else hash_secret("")
        if not hmac.compare_digest(presented, stored) or row is None or row[1] is not None:
            return None
        return User(name=row[2], is_admin=bool(row[3]))


class Authenticator:
    """The request side: who a request comes from, and what it may see."""

    def __init__(self, tokens: TokenStore, store: JobStore) -> None:
        self.tokens = tokens
        self._store = store
        self._expose_cache: dict[str, tuple[str | None, bool]] = {}
        self._rejection_log = LogThrottle()

    async def authenticate(self, request: web.Request) -> User:
        """Return the request's user, or raise Unauthorized; the result is kept on the request."""
        cached = request.get(USER_KEY)
        if isinstance(cached, User):
            return cached
        header = request.headers.get("Authorization")
        if header is None:
            raise Unauthorized(
                "missing bearer token: send 'Authorization: Bearer <token>'; "
                "an admin creates tokens with `floydd token create NAME`",
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthorized(
                "the Authorization header must use the Bearer scheme: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_request"'},
            )
        user = await self.tokens.authenticate(token.strip())
        if user is None:
            self._log_rejection(request)
            raise Unauthorized(
                "invalid or revoked bearer token",
                headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'},
            )
        request[USER_KEY] = user
        return user

    def _log_rejection(self, request: web.Request) -> None:
        """Log a rejected token at most once per interval, with the count of those not logged."""
        not_logged = self._rejection_log.allow()
        if not_logged is not None:
            log.info("auth_rejected", path=request.path, remote=request.remote, not_logged_before=not_logged)

    async def authorize_expose(self, request: web.Request, job_id: str) -> web.Request:
        """Check a `/expose/<id>` request against the job's privacy.

        Returns the request to forward: a copy without the `Authorization`
        header when it carries a floydd token, so that the token never reaches
        an app. Raises Unauthorized or Forbidden; an unknown job passes, and the
        proxy returns 404 for it.
        """
        owner, private = await self._job_privacy(job_id)
        if private:
            user = await self.authenticate(request)
            if not (user.is_admin or user.name == owner):
                raise Forbidden(f"job {job_id} is private to its owner")
        if not _carries_floydd_token(request):
            return request
        headers = request.headers.copy()
        headers.popall("Authorization", None)
        try:
            return request.clone(headers=headers)
        except UnicodeEncodeError:
            # aiohttp's clone re-encodes header values as UTF-8; bytes that are not UTF-8 cannot pass unchanged.
            raise InvalidRequest(
                "a request that carries a floydd token must have UTF-8 header values; "
                "send the token only to private jobs"
            ) from None

    async def _job_privacy(self, job_id: str) -> tuple[str | None, bool]:
        cached = self._expose_cache.get(job_id)
        if cached is not None:
            return cached
        job = await self._store.get(job_id)
        if job is None:
            return None, False
        if len(self._expose_cache) >= _EXPOSE_CACHE_SIZE:
            self._expose_cache.clear()
        entry = (job.owner, is_private(job))
        self._expose_cache[job_id] = entry
        return entry


USER_KEY = web.RequestKey("user", User)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)


def _carries_floydd_token(request: web.Request) -> bool:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and parse_token(token.strip()) is not None


def is_private(job: Job) -> bool:
    return bool(job.options.get("private", False))


def request_user(request: web.Request) -> User:
    """Return the user that the auth middleware stored on an `/api` request."""
    user = request.get(USER_KEY)
    if not isinstance(user, User):
        raise RuntimeError(f"{request.path} is not behind the auth middleware")
    return user


def needs_token(path: str) -> bool:
    return path == "/api" or path.startswith("/api/") or path == "/metrics"


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate every `/api` and `/metrics` request before its handler, or before its 404, runs."""
    if needs_token(request.path):
        await request.app[AUTHENTICATOR].authenticate(request)
    return await handler(request)


def ensure_job_access(user: User, job: Job) -> Job:
    """Return `job` when `user` may see it; for another user's job raise JobNotFound, as if it did not exist."""
    if user.is_admin or job.owner == user.name:
        return job
    raise JobNotFound(f"no job with id {job.id}")
