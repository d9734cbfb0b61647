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
`federation` runs a coordinator and an aggregator wired together (on TLS
too), the way every two-daemon test starts them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml

from xaind.protocol import AGGREGATOR_HTTP_LISTENER, COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER

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

    The port is held until a `Daemon` listens on it: a socket bound to
    127.0.0.1:0 with SO_REUSEADDR, never listening, stays open. The kernel
    hands a bound port to no other socket that asks for any port (the tests
    running beside this one), while the daemon, which listens with
    SO_REUSEADDR as Twisted does, may bind it; a port closed at once had been
    taken by another test's listener before the daemon came (a daemon that
    failed to start, 1 run in a few dozen on a loaded machine). SO_REUSEADDR
    also lets a restarted daemon bind a port whose connections of a killed
    one are in TIME_WAIT.
    """
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    probe.bind(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    _reserved_ports[port] = probe
    return port


#: Ports `free_loopback_port` holds until a daemon listens on them (or `release_port`).
_reserved_ports: dict[int, socket.socket] = {}


def release_port(port: int) -> None:
    """Stop holding a port `free_loopback_port` reserved (nothing if it holds none)."""
    probe = _reserved_ports.pop(port, None)
    if probe is not None:
        probe.close()


# "<timestamp> [<namespace>#<level>] <message>"
_LOG_LINE = re.compile(r"^\S+ \[(?P<namespace>[^\]#]*)(?:#(?P<level>\w+))?\] (?P<message>.*)$")


def terminate(process: subprocess.Popen[Any], timeout: float) -> bool:
    """SIGTERM, then SIGKILL if `process` is still there after `timeout` seconds; True if it had to be killed."""
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT)
        return True
    return False


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
    listen: str | None = None,
    link: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A loopback aggregator configuration listening on `port`, linked to the coordinator's PB port.

    `listen` replaces the plain TCP listener on `port` (a TLS one, say);
    `link` adds keys to the `coordinator` section (`ca_file`, ...).
    """
    coordinator: dict[str, Any] = {"pb": f"tcp:127.0.0.1:{coordinator_pb_port}"}
    if secret is not None:
        coordinator["secret"] = secret
    if call_timeout is not None:
        coordinator["call_timeout"] = call_timeout
    coordinator.update(link or {})
    return {
        **({} if secret is not None else {"development": True}),
        "api": {"listen": listen or f"tcp:{port}:interface=127.0.0.1"},
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
        self.config = os.fspath(config)  # relative: to the daemon's directory, where it runs
        self.directory = Path(directory).absolute()  # the process runs in it: relative paths would be read from there
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
        if terminate(process, timeout):
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
        for port in self.ports.values():
            release_port(port)  # the daemon holds it now
        return self.ports

    # -- talking to it ------------------------------------------------------

    def url(self, listener: str, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.ports[listener]}{path}"


def get_json(url: str, timeout: float = 5.0, *, ca_file: str | os.PathLike[str] | None = None) -> tuple[int, Any]:
    """GET `url`; return (status, decoded JSON body), also for 4xx/5xx answers.

    An https:// `url` is verified against the CA in `ca_file` (else the system's).
    """
    context = None if ca_file is None else ssl.create_default_context(cafile=os.fspath(ca_file))
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


@dataclass(frozen=True)
class ServerCertificates:
    """PEM files of a CA and of a server certificate it issued for `hostname`, with its key."""

    ca: Path
    certificate: Path
    key: Path
    #: The name the certificate was issued for: the one every client verifies.
    hostname: str = "localhost"

    def listen(self, port: int = 0) -> str:
        """A TLS listener on 127.0.0.1 serving this certificate."""
        return f"ssl:{port}:interface=127.0.0.1:privateKey={self.key}:certKey={self.certificate}"


def _loopback_url(scheme: str, port: int, tls: ServerCertificates | None) -> str:
    """`scheme`://127.0.0.1:`port`, or with TLS `scheme`s://<the certificate's hostname>:`port`."""
    return f"{scheme}://127.0.0.1:{port}" if tls is None else f"{scheme}s://{tls.hostname}:{port}"


def _listen_on(port: int, tls: ServerCertificates | None) -> str:
    """A listener on 127.0.0.1:`port` (0: OS-chosen), serving `tls`'s certificate if given."""
    return f"tcp:{port}:interface=127.0.0.1" if tls is None else tls.listen(port)


def start_coordinator_for_aggregator(
    stack: contextlib.ExitStack,
    directory: Path,
    *,
    aggregator_port: int,
    secret: str | None,
    federated_learning: Mapping[str, Any],
    admit_timeout: float,
    api_listen: str | None = None,
    pb_listen: str | None = None,
    heartbeat_hold: float | None = None,
    call_timeout: float | None = 10.0,
    participants: Mapping[str, Any] | None = None,
    aggregation: Mapping[str, Any] | None = None,
    tls: ServerCertificates | None = None,
    link: Mapping[str, Any] | None = None,
) -> tuple[Daemon, Path, Path]:
    """Start a coordinator (stopped by `stack`) and write the configuration of its aggregator.

    The aggregator's port must be reserved first (`free_loopback_port`): the
    coordinator hands it out, and the aggregator connects to the coordinator's
    PB port, known only once the coordinator listens. Returns the coordinator,
    the aggregator's configuration file and its state directory, in
    `directory`/coordinator and `directory`/aggregator.

    The listeners are on OS-chosen ports unless `api_listen` or `pb_listen`
    say otherwise. `participants` is the coordinator's participants section,
    `aggregation` the aggregator's aggregation section, `link` keys added to
    the aggregator's coordinator section; with `call_timeout` None the link
    has the default one. With `tls`, every listener serves its certificate,
    the coordinator hands out an https:// aggregator URL for its hostname and
    the aggregator's PB link verifies the coordinator against its CA.
    """
    coordinator_dir = directory / "coordinator"
    aggregator_dir = directory / "aggregator"
    coordinator_dir.mkdir(parents=True)
    aggregator_dir.mkdir(parents=True)
    document = coordinator_document(
        state_dir=coordinator_dir / "state",
        aggregator_port=aggregator_port,
        secret=secret,
        api_listen=api_listen or _listen_on(0, tls),
        pb_listen=pb_listen or _listen_on(0, tls),
        federated_learning=federated_learning,
        aggregator={"url": _loopback_url("http", aggregator_port, tls), "admit_timeout": admit_timeout, "aggregation_timeout": 30.0},
        heartbeat_hold=heartbeat_hold,
    )
    if participants is not None:
        document["participants"] = dict(participants)
    coordinator_config = write_yaml(coordinator_dir / "coordinator.yaml", document)
    coordinator = stack.enter_context(
        Daemon("xain-coordinator", coordinator_config, coordinator_dir, listeners=(COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER))
    )
    aggregator_state = aggregator_dir / "state"
    document = aggregator_document(
        state_dir=aggregator_state,
        port=aggregator_port,
        coordinator_pb_port=coordinator.ports[COORDINATOR_PB_LISTENER],
        secret=secret,
        call_timeout=call_timeout,
        listen=_listen_on(aggregator_port, tls),
        link={**({} if tls is None else {"ca_file": str(tls.ca), "tls_hostname": tls.hostname}), **(link or {})},
    )
    if aggregation is not None:
        document["aggregation"] = dict(aggregation)
    aggregator_config = write_yaml(aggregator_dir / "aggregator.yaml", document)
    return coordinator, aggregator_config, aggregator_state


@dataclass
class Federation:
    """A coordinator and an aggregator on loopback that know each other: what `federation` yields.

    Both daemons, and any started again, are stopped by `stack`.
    """

    directory: Path
    stack: contextlib.ExitStack
    coordinator: Daemon
    aggregator: Daemon
    aggregator_port: int
    tls: ServerCertificates | None = None
    #: Bound on one request of `status`.
    request_timeout: float = 5.0
    coordinator_starts: int = 1
    aggregator_starts: int = 1

    @property
    def aggregator_state(self) -> Path:
        return self.directory / "aggregator" / "state"

    @property
    def http_url(self) -> str:
        """The coordinator's HTTP API: http://127.0.0.1:<port>, or https://<hostname>:<port> with TLS."""
        return _loopback_url("http", self.coordinator.ports[COORDINATOR_HTTP_LISTENER], self.tls)

    @property
    def pb_url(self) -> str:
        """The coordinator's PB listener: pb://127.0.0.1:<port>, or pbs://<hostname>:<port> with TLS."""
        return _loopback_url("pb", self.coordinator.ports[COORDINATOR_PB_LISTENER], self.tls)

    @property
    def aggregator_url(self) -> str:
        """The aggregator's URL, as the coordinator hands it out."""
        return _loopback_url("http", self.aggregator_port, self.tls)

    def status(self) -> dict[str, Any]:
        """The coordinator's /status (verified against the CA with TLS); it must answer 200."""
        code, answer = get_json(f"{self.http_url}/status", self.request_timeout, ca_file=None if self.tls is None else self.tls.ca)
        assert code == 200, answer
        return answer

    def wait_for_status(self, condition: Callable[[dict[str, Any]], bool], what: str, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Poll /status until `condition` holds (returned); fail early if the coordinator exits."""

        def check() -> dict[str, Any] | None:
            status = self.status()
            return status if condition(status) else None

        return self.coordinator.wait_for(check, what, timeout)

    def wait_until_attached(self, attached: bool = True) -> dict[str, Any]:
        """Wait until the coordinator says the aggregator is (or, `attached` False, is not) attached."""
        return self.wait_for_status(
            lambda status: status["aggregator_attached"] is attached,
            f"the coordinator's /status to say aggregator_attached {attached}",
        )

    def model(self, round_number: int) -> np.ndarray:
        """The global model the aggregator saved after `round_number` rounds."""
        return np.load(self.aggregator_state / f"model-{round_number}.npy", allow_pickle=False)

    def restart_coordinator(self) -> Daemon:
        """Start the coordinator again: same configuration (ports, state directory), a log file of its own."""
        self.coordinator_starts += 1
        self.coordinator = self._start_again(self.coordinator, self.coordinator_starts)
        return self.coordinator

    def restart_aggregator(self) -> Daemon:
        """Start the aggregator again: same configuration (port, state directory), a log file of its own."""
        self.aggregator_starts += 1
        self.aggregator = self._start_again(self.aggregator, self.aggregator_starts)
        assert self.aggregator.ports[AGGREGATOR_HTTP_LISTENER] == self.aggregator_port
        return self.aggregator

    def _start_again(self, daemon: Daemon, starts: int) -> Daemon:
        """`daemon`'s plugin on its configuration in its directory, logging to <plugin>-<starts>.log; stopped by `stack`."""
        again = Daemon(daemon.plugin, daemon.config, daemon.directory, listeners=daemon.listeners, name=f"{daemon.plugin}-{starts}")
        return self.stack.enter_context(again)

    def describe(self) -> str:
        """Both daemons' logs and outputs."""
        return (
            f"--- coordinator log ---\n{self.coordinator.log_text}{self.coordinator.output}\n"
            f"--- aggregator log ---\n{self.aggregator.log_text}{self.aggregator.output}"
        )


FederationT = TypeVar("FederationT", bound=Federation)


@contextlib.contextmanager
def federation(
    directory: str | os.PathLike[str],
    *,
    secret: str | None,
    rounds: int,
    min_clients: int,
    heartbeat_timeout: float,
    admit_timeout: float,
    participants_ratio: float = 1.0,
    training_timeout: float = 60.0,
    heartbeat_hold: float | None = None,
    call_timeout: float | None = 10.0,
    participants: Mapping[str, Any] | None = None,
    aggregation: Mapping[str, Any] | None = None,
    tls: ServerCertificates | None = None,
    api_listen: str | None = None,
    pb_listen: str | None = None,
    fixed_ports: bool = False,
    link: Mapping[str, Any] | None = None,
    kind: Callable[..., FederationT] = Federation,  # type: ignore[assignment]
) -> Iterator[FederationT]:
    """A coordinator and an aggregator on loopback, wired together; both stopped at exit.

        with federation(tmp_path, secret=SECRET, rounds=2, min_clients=3,
                        heartbeat_timeout=2.0, admit_timeout=3.0) as fed:
            ... fed.http_url, fed.pb_url, fed.status(), fed.model(2) ...

    The aggregator's port is reserved (`free_loopback_port`), the coordinator
    started handing it out, the aggregator started on it linked to the
    coordinator's PB port, and the body entered once the coordinator's
    /status says the aggregator is attached. The configurations are
    `start_coordinator_for_aggregator`'s, federated_learning made of `rounds`,
    `participants_ratio`, `min_clients`, `heartbeat_timeout` and
    `training_timeout`. `fixed_ports`: the coordinator listens on ports
    reserved beforehand instead of OS-chosen ones, so that
    `restart_coordinator` keeps its URLs. `kind` is `Federation` or a
    subclass of it (a test module's, with more to it).

    Nothing here needs a reactor: every wait blocks, polling. When the body
    raises, both daemons' logs are printed (pytest shows them with the failure).
    """
    directory = Path(directory)
    aggregator_port = free_loopback_port()
    if fixed_ports:
        api_listen = api_listen or _listen_on(free_loopback_port(), tls)
        pb_listen = pb_listen or _listen_on(free_loopback_port(), tls)
    with contextlib.ExitStack() as stack:
        coordinator, aggregator_config, _ = start_coordinator_for_aggregator(
            stack,
            directory,
            aggregator_port=aggregator_port,
            secret=secret,
            federated_learning={
                "rounds": rounds,
                "participants_ratio": participants_ratio,
                "min_clients": min_clients,
                "heartbeat_timeout": heartbeat_timeout,
                "training_timeout": training_timeout,
            },
            admit_timeout=admit_timeout,
            api_listen=api_listen,
            pb_listen=pb_listen,
            heartbeat_hold=heartbeat_hold,
            call_timeout=call_timeout,
            participants=participants,
            aggregation=aggregation,
            tls=tls,
            link=link,
        )
        aggregator = stack.enter_context(
            Daemon("xain-aggregator", aggregator_config, aggregator_config.parent, listeners=(AGGREGATOR_HTTP_LISTENER,))
        )
        fed = kind(directory=directory, stack=stack, coordinator=coordinator, aggregator=aggregator, aggregator_port=aggregator_port, tls=tls)
        try:
            fed.wait_until_attached()
            yield fed
        except BaseException:
            print(fed.describe())  # shown by pytest with the failure
            raise

