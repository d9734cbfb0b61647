"""The optional `state.redis` section: where the coordinators of one training keep their shared state.

Read with the rest of the configuration, so that a wrong value is one line
naming its key before anything listens. redis-py is imported here only to
tell whether it is installed, and only when the section is present: a
coordinator without it never imports redis.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from urllib.parse import urlsplit

from xaind.config import ConfigReader

DEFAULT_PREFIX = "xaind:"
DEFAULT_LEASE_SECONDS = 3.0
LEASE_SECONDS_RANGE = (1.0, 60.0)
URL_SCHEMES = ("redis", "rediss", "unix")
INSTALL_HINT = "needs redis-py: install python3-redis (Debian) or the redis extra (pip install 'xaind[redis]')"


@dataclass(frozen=True)
class RedisStateSettings:
    """Where the shared state lives and how long a leader's lease lasts without renewal."""

    url: str
    password: str | None = None
    prefix: str = DEFAULT_PREFIX
    lease_seconds: float = DEFAULT_LEASE_SECONDS


def shown_url(url: str) -> str:
    """`url` as a log line may show it: without a password written into it."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()


def redis_url_problem(url: str) -> str | None:
    """Why `url` names no Redis server redis-py can reach, or None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        return f"not a Redis URL ({error}), got {url!r}"
    if parts.scheme not in URL_SCHEMES:
        return f"must start with redis://, rediss:// or unix://, got {url!r}"
    if parts.scheme == "unix":
        return None if parts.path else f"unix:// needs the path of the socket, got {url!r}"
    if not parts.hostname:
        return f"names no host, got {url!r}"
    database = parts.path.strip("/")
    if database and not database.isdigit():
        return f"the database must be a number (redis://host:port/0), got {url!r}"
    del port
    return None


def _prefix_problem(prefix: str) -> str | None:
    if not prefix or any(character.isspace() for character in prefix):
        return f"must be a non-empty key namespace without spaces, got {prefix!r}"
    return None


def _read_password(state_redis: ConfigReader, path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as stream:
            password = stream.readline().strip()
    except OSError as error:
        state_redis.problem("password_file", f"cannot be read ({error.strerror}): {path}")
        return None
    if not password:
        state_redis.problem("password_file", f"holds no password on its first line: {path}")
        return None
    return password


def read_redis_state(root: ConfigReader) -> RedisStateSettings | None:
    """`state.redis`, or None when the configuration has no such section."""
    state = root.section("state")
    given = state.given("redis")
    state_redis = state.section("redis")
    if not given:
        return None
    url = state_redis.string("url", "", validate=redis_url_problem)
    if not state_redis.given("url"):
        state_redis.problem("url", "is required (redis://host:port/db or unix:///path/to/socket)")
    password = _read_password(state_redis, state_redis.string("password_file", "") or None)
    prefix = state_redis.string("prefix", DEFAULT_PREFIX, validate=_prefix_problem)
    low, high = LEASE_SECONDS_RANGE
    lease_seconds = state_redis.number("lease_seconds", DEFAULT_LEASE_SECONDS, at_least=low, at_most=high)
    if importlib.util.find_spec("redis") is None:
        state.problem("redis", INSTALL_HINT)
    return RedisStateSettings(url=url, password=password, prefix=prefix, lease_seconds=lease_seconds)
