"""Run real `twistd` daemons as subprocesses: for the demo, the benchmarks and the tests.

A daemon is started as

    twistd -n --pidfile= --logfile=<log> <plugin> --config <yaml> --ready-file <json>

with the `twistd` that belongs to the running Python (`twistd_executable`:
the virtual environment's `twistd`, or Debian's `/usr/bin/twistd3`), and its
configuration should listen on `tcp:0:interface=127.0.0.1` so that the OS
chooses free ports. The bound ports are read from the daemon's ready file
(xaind/ready_file.py: JSON written atomically once every listener is bound),
polled with short waits under a bounded timeout, never a fixed sleep, and
failing at once if the daemon exits meanwhile.

`Daemon` is a context manager that stops every process it started, SIGTERM
first and SIGKILL if that is not enough, whatever happened meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from xaind.protocol import COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER

#: An environment variable naming the `twistd` to run (a path, or a name looked up on PATH).
TWISTD_ENVIRONMENT_VARIABLE = "XAIND_TWISTD"
#: The names `twistd` is installed under: by pip, and by Debian's python3-twisted (which has no `twistd`).
TWISTD_NAMES = ("twistd", "twistd3")


class ExecutableNotFound(FileNotFoundError):
    """No executable to run a daemon or a console script with."""


def _executable_file(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def twistd_executable() -> str:
    """The `twistd` to start the daemons with: the one that runs on this very Python.

    A `twistd` of another Python would not see the packages of this one (the
    plugins, xaind itself, the same Twisted), so the scripts next to
    `sys.executable` come first: `twistd` in a virtual environment, `twistd3`
    in Debian's /usr/bin (python3-twisted installs no `twistd`). Only then
    PATH is searched. `$XAIND_TWISTD` overrides all of it, for an installation
    laid out otherwise.
    """
    override = os.environ.get(TWISTD_ENVIRONMENT_VARIABLE)
    if override:
        found = shutil.which(override)
        if found is None:
            raise ExecutableNotFound(f"${TWISTD_ENVIRONMENT_VARIABLE} names {override!r}, which is not an executable")
        return found
    beside_python = os.path.dirname(sys.executable)
    for name in TWISTD_NAMES:
        candidate = os.path.join(beside_python, name)
        if _executable_file(candidate):
            return candidate
    for name in TWISTD_NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
    raise ExecutableNotFound(
        f"no {' or '.join(TWISTD_NAMES)} next to {sys.executable} nor on PATH; "
        f"install Twisted or set ${TWISTD_ENVIRONMENT_VARIABLE}"
    )


def console_script_command(script: str, module: str) -> list[str]:
    """The command that runs the console script `script`, whose code is `module`'s `main`.

    The installed script next to `sys.executable` when there is one (a
    virtual environment, or /usr/bin from the Debian package), else
    `python -m module` on this Python: a source tree on PYTHONPATH, as in a
    package build, has no console scripts. `module` must run `main` under
    `if __name__ == "__main__"`.
    """
    installed = os.path.join(os.path.dirname(sys.executable), script)
    if _executable_file(installed):
        return [installed]
    return [sys.executable, "-m", module]


def dummy_participants_command() -> list[str]:
    """The command that runs `xain-dummy-participants` (see `console_script_command`)."""
    return console_script_command("xain-dummy-participants", "xaind.tools.dummy_participants")


def xaind_command() -> list[str]:
    """The command that runs the `xaind` operator command (see `console_script_command`)."""
    return console_script_command("xaind", "xaind.cli")


#: Total time a daemon may take to start listening, or a condition to come true.
START_TIMEOUT = 20.0
#: Time a daemon may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
#: Pause between two looks at a log file or a process.
POLL_INTERVAL = 0.02

LOOPBACK_ANY_PORT = "tcp:0:interface=127.0.0.1"


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a listener whose port
    must be known *before* its daemon starts.

    Two daemons that point at each other cannot both learn their ports from
    their logs: the coordinator hands participants the aggregator's URL
    (`aggregator.url`, read at start-up) and the aggregator connects to the
    coordinator's PB port (`coordinator.pb`). The way out used here: the
    coordinator starts first on OS-chosen ports (`LOOPBACK_ANY_PORT`, learnt
    from its log), with `aggregator.url` naming a port reserved by this
    function; the aggregator then starts listening on exactly that port
    (`tcp:<port>:interface=127.0.0.1`) with `coordinator.pb` naming the PB port
    just learnt. A fixed port also lets a test restart the aggregator where
    the coordinator expects it.

    The port is found by binding a socket to 127.0.0.1:0 and closing it, so
    another process could take it before the daemon binds it: a small race,
    acceptable in tests (the daemon then fails to start, loudly). Twisted
    listens with SO_REUSEADDR, so connections left in TIME_WAIT by a killed
    daemon do not keep its successor from binding the same port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# "<timestamp> [<namespace>#<level>] <message>"
_LOG_LINE = re.compile(r"^\S+ \[(?P<namespace>[^\]#]*)(?:#(?P<level>\w+))?\] (?P<message>.*)$")


class DaemonError(RuntimeError):
    """A daemon did not start, did not do what was awaited in time, or would not stop."""


class WaitTimedOut(DaemonError):
    """A polled condition did not come true in time."""


def coordinator_document(
    *,
    state_dir: str | os.PathLike[str],
    aggregator_port: int,
    federated_learning: Mapping[str, Any],
    secret: str | None = None,
    api_listen: str = LOOPBACK_ANY_PORT,
    pb_listen: str = LOOPBACK_ANY_PORT,
    aggregator: Mapping[str, Any] | None = None,
    heartbeat_hold: float | None = None,
) -> dict[str, Any]:
    """A loopback coordinator configuration handing out the aggregator at `aggregator_port`.

    Without a `secret` it is a `development: true` configuration.
    """
    pb: dict[str, Any] = {"listen": pb_listen}
    if secret is not None:
        pb["secret"] = secret
    return {
        **({} if secret is not None else {"development": True}),
        "api": {"listen": api_listen, **({} if heartbeat_hold is None else {"heartbeat_hold": heartbeat_hold})},
        "pb": pb,
        "federated_learning": dict(federated_learning),
        "aggregator": {"url": f"http://127.0.0.1:{aggregator_port}", **(aggregator or {})},
        "state_dir": os.fspath(state_dir),
    }


def aggregator_document(
    *,
    state_dir: str | os.PathLike[str],
    port: int,
    coordinator_pb_port: int,
    secret: str | None = None,
    call_timeout: float | None = None,
) -> dict[str, Any]:
    """A loopback aggregator configuration listening on `port`, linked to the coordinator's PB port."""
    coordinator: dict[str, Any] = {"pb": f"tcp:127.0.0.1:{coordinator_pb_port}"}
    if secret is not None:
        coordinator["secret"] = secret
    if call_timeout is not None:
        coordinator["call_timeout"] = call_timeout
    return {
        **({} if secret is not None else {"development": True}),
        "api": {"listen": f"tcp:{port}:interface=127.0.0.1"},
        "coordinator": coordinator,
        "state_dir": os.fspath(state_dir),
    }


def twistd_command(
    plugin: str,
    config: str | os.PathLike[str],
    log_file: str | os.PathLike[str],
    ready_file: str | os.PathLike[str] | None = None,
) -> list[str]:
    """`twistd -n <plugin> --config <config>` in the foreground, logging to `log_file`, with no pid file.

    With `ready_file`, the daemon writes its bound listeners there once all are listening.
    """
    command = [twistd_executable(), "-n", "--pidfile=", f"--logfile={os.fspath(log_file)}", plugin, "--config", os.fspath(config)]
    if ready_file is not None:
        command += ["--ready-file", os.fspath(ready_file)]
    return command


def write_yaml(path: str | os.PathLike[str], document: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(dict(document), sort_keys=False), encoding="utf-8")
    return path


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = POLL_INTERVAL) -> Any:
    """Poll `condition` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise WaitTimedOut(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _run(command: list[str], cwd: str | os.PathLike[str] | None, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `command` to its end, stdout and stderr merged; killed after `timeout` seconds."""
    return subprocess.run(
        command,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_to_exit(
    plugin: str,
    config: str | os.PathLike[str],
    log_file: str | os.PathLike[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = START_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run a daemon that is expected to exit by itself (a start-up failure); stdout and stderr merged.

    A daemon still running after `timeout` seconds is killed by
    `subprocess.run`, which raises `subprocess.TimeoutExpired`.
    """
    return _run(twistd_command(plugin, config, log_file), cwd, timeout)


def run_twistd(*arguments: str, timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run `twistd_executable()` with `arguments` (e.g. `--help`); stdout and stderr merged."""
    return _run([twistd_executable(), *arguments], None, timeout)


class Daemon:
    """One `twistd -n <plugin> --config <yaml>` process, in a working directory of its own.

        with Daemon("xain-coordinator", config, tmp_path,
                    listeners=(COORDINATOR_HTTP_LISTENER,)) as coordinator:
            port = coordinator.ports[COORDINATOR_HTTP_LISTENER]
            ...
            assert coordinator.stop() == ...

    Entering starts the process and waits until its ready file names every
    listener in `listeners`; leaving stops it whatever happened.
    """

    def __init__(
        self,
        plugin: str,
        config: str | os.PathLike[str],
        directory: str | os.PathLike[str],
        *,
        listeners: Sequence[str] = (),
        name: str | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.plugin = plugin
        self.config = os.fspath(config)
        self.directory = Path(directory)
        self.listeners = tuple(listeners)
        self.name = name or plugin
        self.start_timeout = start_timeout
        self.log_path = self.directory / f"{self.name}.log"
        self.output_path = self.directory / f"{self.name}.out"
        self.ready_path = self.directory / f"{self.name}.ready.json"
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.killed = False  # set when stop() had to SIGKILL

    # -- life cycle ---------------------------------------------------------

    def start(self) -> Daemon:
        if self.process is not None:
            raise DaemonError(f"{self.name} was already started")
        self.directory.mkdir(parents=True, exist_ok=True)
        # A crashed predecessor's file would name the wrong ports.
        self.ready_path.unlink(missing_ok=True)
        with open(self.output_path, "wb") as output:
            self.process = subprocess.Popen(
                twistd_command(self.plugin, self.config, self.log_path, self.ready_path),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            if self.listeners:
                self.wait_for_listeners(self.listeners, self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait at most `timeout` seconds, SIGKILL if still running; return the exit code.

        The exit code is `Popen.returncode`: negative for a death by signal.
        Stopping a stopped daemon returns the same code again.
        """
        process = self.process
        if process is None:
            raise DaemonError(f"{self.name} was never started")
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
                self.killed = True
        return process.returncode

    def kill(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGKILL (a crash: no orderly shutdown at all), wait for the death, return the exit code."""
        process = self.process
        if process is None:
            raise DaemonError(f"{self.name} was never started")
        if process.poll() is None:
            process.kill()
            process.wait(timeout)
        return process.returncode

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    # -- what it says -------------------------------------------------------

    @property
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def output(self) -> str:
        """What the process wrote on stdout and stderr (start-up failures end up here)."""
        try:
            return self.output_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_messages(self, namespace: str = "") -> list[str]:
        """The messages of the log lines whose namespace is `namespace` or under it ("" for all)."""
        messages = []
        for line in self.log_text.splitlines():
            match = _LOG_LINE.match(line)
            if match is None:
                continue
            logged = match["namespace"]
            if not namespace or logged == namespace or logged.startswith(namespace + "."):
                messages.append(match["message"])
        return messages

    def ready(self) -> dict[str, Any] | None:
        """The document of this process's ready file, or None while there is none.

        `start` removes a crashed predecessor's file first, so a file here is
        this process's (its pid is not compared: `$XAIND_TWISTD` may be a
        wrapper that runs twistd as a child).
        """
        try:
            return json.loads(self.ready_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def listening(self) -> dict[str, int]:
        """The bound port of every listener in the ready file, as name -> port ({} while not ready)."""
        document = self.ready()
        if document is None:
            return {}
        return {name: int(address["port"]) for name, address in document["listeners"].items() if "port" in address}

    def _describe(self) -> str:
        status = "running" if self.running else f"exited with {self.process.returncode if self.process else None}"
        return f"{self.name} ({status})\n--- log ---\n{self.log_text}\n--- stdout+stderr ---\n{self.output}"

    def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = START_TIMEOUT) -> Any:
        """Poll `condition` until truthy (returned); fail early if the daemon exits, or after `timeout`."""

        def check() -> Any:
            result = condition()
            if result:
                return result
            if not self.running:
                raise DaemonError(f"{self.name} exited while waiting for {what}: {self._describe()}")
            return None

        try:
            return wait_until(check, timeout, what)
        except WaitTimedOut as error:
            raise WaitTimedOut(f"{error}: {self._describe()}") from None

    def wait_for_log(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Wait for a log line matching the regular expression `pattern`; return its match."""
        compiled = re.compile(pattern, re.MULTILINE)
        return self.wait_for(lambda: compiled.search(self.log_text), f"a log line matching {pattern!r}", timeout)

    def wait_for_listeners(self, names: Sequence[str], timeout: float = START_TIMEOUT) -> dict[str, int]:
        def all_listening() -> dict[str, int] | None:
            found = self.listening()
            return found if all(name in found for name in names) else None

        self.ports = self.wait_for(all_listening, f"{', '.join(names)} to listen", timeout)
        return self.ports

    # -- talking to it ------------------------------------------------------

    def url(self, listener: str, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.ports[listener]}{path}"


def get_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    """GET `url`; return (status, decoded JSON body), also for 4xx/5xx answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def start_coordinator_for_aggregator(
    stack: contextlib.ExitStack,
    directory: Path,
    *,
    aggregator_port: int,
    secret: str,
    federated_learning: Mapping[str, Any],
    admit_timeout: float,
    api_listen: str = LOOPBACK_ANY_PORT,
    pb_listen: str = LOOPBACK_ANY_PORT,
    heartbeat_hold: float | None = None,
) -> tuple[Daemon, Path, Path]:
    """Start a coordinator (stopped by `stack`) and write the configuration of its aggregator.

    The aggregator's port must be reserved first (`free_loopback_port`): the
    coordinator hands it out, and the aggregator connects to the coordinator's
    PB port, known only once the coordinator listens. Returns the coordinator,
    the aggregator's configuration file and its state directory.
    """
    coordinator_dir = directory / "coordinator"
    aggregator_dir = directory / "aggregator"
    coordinator_dir.mkdir(parents=True)
    aggregator_dir.mkdir(parents=True)
    coordinator_config = write_yaml(
        coordinator_dir / "coordinator.yaml",
        coordinator_document(
            state_dir=coordinator_dir / "state",
            aggregator_port=aggregator_port,
            secret=secret,
            api_listen=api_listen,
            pb_listen=pb_listen,
            federated_learning=federated_learning,
            aggregator={"admit_timeout": admit_timeout, "aggregation_timeout": 30.0},
            heartbeat_hold=heartbeat_hold,
        ),
    )
    coordinator = stack.enter_context(
        Daemon("xain-coordinator", coordinator_config, coordinator_dir, listeners=(COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER))
    )
    aggregator_state = aggregator_dir / "state"
    aggregator_config = write_yaml(
        aggregator_dir / "aggregator.yaml",
        aggregator_document(
            state_dir=aggregator_state,
            port=aggregator_port,
            coordinator_pb_port=coordinator.ports[COORDINATOR_PB_LISTENER],
            secret=secret,
            call_timeout=10.0,
        ),
    )
    return coordinator, aggregator_config, aggregator_state
