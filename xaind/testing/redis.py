"""A throwaway `redis-server` on loopback, for the tests of `state.redis`.

The server comes from Debian's redis-server package (`.ci/run` installs it);
`redis_server_executable` returns None where it is missing, and
`skip_reason` says why a test cannot run (no server, or no redis-py), so
tests skip with that reason instead of failing.

`RedisServer.start` writes a configuration of its own into a temporary
directory (bind 127.0.0.1, a port reserved with
`xaind.tools.daemons.free_loopback_port`, no persistence at all:
`save ""`, `appendonly no`), starts the server and waits, bounded, until
it answers PING with PONG. `stop` sends SIGTERM, then SIGKILL if the
server is still there after a bounded wait, and removes the directory.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from xaind.tools.daemons import free_loopback_port, release_port, terminate

#: Seconds the server may take to answer PONG (0.04 s measured).
START_TIMEOUT = 10.0
#: Seconds it may take to exit after SIGTERM.
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.02


class RedisServerError(RuntimeError):
    """redis-server did not start or answer in time."""


def redis_server_executable() -> str | None:
    return shutil.which("redis-server")


def skip_reason() -> str | None:
    """Why a real Redis cannot be used here, or None if it can."""
    if redis_server_executable() is None:
        return "redis-server is not installed (apt-get install redis-server)"
    if importlib.util.find_spec("redis") is None:
        return "redis-py is not installed (apt-get install python3-redis, or pip install 'xaind[redis]')"
    return None


def _ping(port: int) -> bool:
    """A PING in the Redis protocol, by hand: the fixture needs no client to know the server is up."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One `redis-server CONFFILE` on 127.0.0.1; use as a context manager or `start()`/`stop()`."""

    def __init__(self) -> None:
        executable = redis_server_executable()
        if executable is None:
            raise RedisServerError("redis-server not found (apt-get install redis-server)")
        self.executable = executable
        self.directory: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        """A redis-py client of this server, answers decoded."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=5)

    def start(self) -> RedisServer:
        directory = Path(tempfile.mkdtemp(prefix="xaind-redis-"))
        self.directory = directory
        # Held by a probe socket until the server answers (see daemons.free_loopback_port): no other test takes it.
        self.port = free_loopback_port()
        config = directory / "redis.conf"
        config.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {self.port}",
                    'save ""',
                    "appendonly no",
                    f"dir {directory}",
                    "daemonize no",
                    "protected-mode yes",
                    f"logfile {directory / 'redis.log'}",
                    "",
                ]
            ),
            encoding="utf-8",
        )
        with open(directory / "redis.out", "wb") as output:
            self.process = subprocess.Popen([self.executable, str(config)], stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        finally:
            release_port(self.port)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RedisServerError(f"redis-server exited with {self.process.returncode}: {self.log()[-2000:]}")
            if _ping(self.port):
                return
            time.sleep(POLL_INTERVAL)
        raise RedisServerError(f"redis-server did not answer PONG within {START_TIMEOUT} s: {self.log()[-2000:]}")

    def log(self) -> str:
        if self.directory is None:
            return ""
        texts = []
        for name in ("redis.out", "redis.log"):
            try:
                texts.append((self.directory / name).read_text(encoding="utf-8", errors="replace"))
            except OSError:
                pass
        return "\n".join(texts)

    def stop(self) -> None:
        """SIGTERM, SIGKILL after STOP_TIMEOUT; then remove the directory."""
        process, self.process = self.process, None
        if process is not None:
            terminate(process, STOP_TIMEOUT)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
