"""What the benchmarks share: processes that are always stopped, the two daemons, samplers, results.

Everything listens on 127.0.0.1 only. Every process a benchmark starts is
registered in a `Processes` group and stopped (SIGTERM, then SIGKILL) when
the group is closed, whatever happened meanwhile; every wait and loop is
bounded in count and in time.

"MB" is 10**6 bytes throughout, as in `xain-dummy-participants --model-size`.
"""

from __future__ import annotations

import datetime as _dt
import http.client
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from xaind.protocol import AGGREGATOR_HTTP_LISTENER, COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER

MB = 1_000_000
HOST = "127.0.0.1"
BIN = os.path.dirname(sys.executable)
ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

COORDINATOR = "xain-coordinator"
AGGREGATOR = "xain-aggregator"
COORD_HTTP = COORDINATOR_HTTP_LISTENER
COORD_PB = COORDINATOR_PB_LISTENER
AGG_HTTP = AGGREGATOR_HTTP_LISTENER

#: Seconds a process gets to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 10.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def python_module_command(module: str, *args: str) -> list[str]:
    """`python -m bench.<module> args` run from the repository root (see `Processes.start`)."""
    return [sys.executable, "-m", f"bench.{module}", *args]


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, turned into a KeyboardInterrupt so that `finally` clauses run."""


def install_signal_handlers() -> None:
    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)


_shield_depth = 0
_deferred_signals: list[int] = []


@contextmanager
def shielded() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while cleaning up, so a Ctrl-C cannot cut the clean-up short.

    A signal that arrives meanwhile is not lost: once the outermost shielded
    block is done, it is raised as a KeyboardInterrupt (unless an exception
    is already on its way out).
    """
    global _shield_depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    if _shield_depth == 0:
        _deferred_signals.clear()
        for sig in saved:
            signal.signal(sig, lambda signum, frame: _deferred_signals.append(signum))
    _shield_depth += 1
    completed = False
    try:
        yield
        completed = True
    finally:
        _shield_depth -= 1
        if _shield_depth == 0:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
            if _deferred_signals and completed:
                signum = _deferred_signals[0]
                _deferred_signals.clear()
                raise Interrupted(f"signal {signum} (during a clean-up)")


# ---------------------------------------------------------------------------
# Processes


class Processes:
    """Processes started by a benchmark; `close()` stops every one still running."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen[Any]]] = []

    def start(
        self,
        name: str,
        command: Sequence[str],
        *,
        stdout: IO[Any] | int | None = None,
        stderr: IO[Any] | int | None = None,
        stdin: IO[Any] | int | None = subprocess.DEVNULL,
        text: bool = False,
    ) -> subprocess.Popen[Any]:
        process = subprocess.Popen(list(command), cwd=ROOT, stdin=stdin, stdout=stdout, stderr=stderr, text=text)
        self.started.append((name, process))
        return process

    def stop(self, process: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> int:
        if process.poll() is None:
            try:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        return process.returncode

    def close(self) -> None:
        for name, process in reversed(self.started):
            if process.poll() is None:
                code = self.stop(process)
                log(f"stopped {name} (pid {process.pid}): exit code {code}")


# ---------------------------------------------------------------------------
# /proc


def read_status_kb(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile (kB) of a process; {} once it is gone."""
    values = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as stream:
            for line in stream:
                if line.startswith(("VmHWM:", "VmRSS:", "RssAnon:", "RssFile:", "Threads:")):
                    name, rest = line.split(":", 1)
                    values[name] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return values


def kb_to_mb(kb: float) -> float:
    return kb * 1024 / MB


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all threads) so far."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stream:
            fields = stream.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class MemorySampler(threading.Thread):
    """VmRSS/VmHWM of one process every `period` seconds, until halted or `max_seconds` passed."""

    def __init__(self, pid: int, max_seconds: float, period: float = 0.02, cpu_pids: dict[str, int] | None = None) -> None:
        super().__init__(name=f"memory-{pid}", daemon=True)
        self.pid = pid
        self.period = period
        self.max_seconds = max_seconds
        self.halt = threading.Event()
        self.samples: list[tuple[float, dict[str, int]]] = []
        #: CPU seconds of other processes too (name -> pid), sampled with the memory.
        self.cpu_pids = dict(cpu_pids or {})
        self.cpu: list[tuple[float, dict[str, float]]] = []
        self.lock = threading.Lock()

    def watch_cpu(self, name: str, pid: int) -> None:
        with self.lock:
            self.cpu_pids[name] = pid

    def run(self) -> None:
        end = time.monotonic() + self.max_seconds
        for _ in range(int(self.max_seconds / self.period) + 2):  # bounded in count and time
            values = read_status_kb(self.pid)
            if values:
                self.samples.append((time.monotonic(), values))
            if self.cpu_pids:
                with self.lock:
                    pids = dict(self.cpu_pids)
                self.cpu.append((time.monotonic(), {name: process_cpu_seconds(pid) for name, pid in pids.items()}))
            if self.halt.wait(self.period) or time.monotonic() > end:
                break

    def cpu_shares(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per wall second of each watched process within [start, end] (nearest samples)."""
        inside = [(t, c) for t, c in self.cpu if start <= t <= end]
        if len(inside) < 2:
            return {}
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return {name: (c1[name] - c0[name]) / (t1 - t0) for name in c1 if name in c0 and t1 > t0}

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=5)

    def max_kb(self, key: str = "VmRSS", start: float = -math.inf, end: float = math.inf) -> int:
        values = [s[key] for t, s in self.samples if start <= t <= end and key in s]
        return max(values) if values else 0

    def last_before_kb(self, t: float, key: str = "VmRSS") -> int:
        values = [s[key] for when, s in self.samples if when <= t and key in s]
        return values[-1] if values else 0


# ---------------------------------------------------------------------------
# Logs read as they are written


class LogTail(threading.Thread):
    """Reads a log file as it grows, stamping each complete line with this process's monotonic clock.

    twistd's log timestamps have a resolution of one second; the stamps
    here are within `period` (+ the write's flush) of the event.
    """

    def __init__(self, path: Path, max_seconds: float, period: float = 0.002) -> None:
        super().__init__(name=f"tail-{path.name}", daemon=True)
        self.path = path
        self.period = period
        self.max_seconds = max_seconds
        self.halt = threading.Event()
        self.lines: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def run(self) -> None:
        end = time.monotonic() + self.max_seconds
        pending = b""
        stream = None
        try:
            for _ in range(int(self.max_seconds / self.period) + 2):  # bounded in count and time
                if stream is None:
                    try:
                        stream = open(self.path, "rb")
                    except FileNotFoundError:
                        stream = None
                if stream is not None:
                    data = stream.read()
                    if not data and self._rotated(stream):
                        # twistd renamed the full log away (it rotates at 1 MB): on to the new file.
                        stream.close()
                        stream = None
                        continue
                    if data:
                        now = time.monotonic()
                        pending += data
                        *complete, pending = pending.split(b"\n")
                        with self.lock:
                            self.lines.extend((now, line.decode("utf-8", "replace")) for line in complete)
                if self.halt.is_set() or time.monotonic() > end:
                    break  # after one last read: what was written before stop() is in
                self.halt.wait(self.period)
        finally:
            if stream is not None:
                stream.close()

    def _rotated(self, stream: Any) -> bool:
        """Whether the file at `path` is no longer the one `stream` reads."""
        try:
            return os.stat(self.path).st_ino != os.fstat(stream.fileno()).st_ino
        except FileNotFoundError:
            return False

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=5)

    def matches(self, pattern: str) -> list[tuple[float, re.Match[str]]]:
        compiled = re.compile(pattern)
        with self.lock:
            lines = list(self.lines)
        found = []
        for t, line in lines:
            match = compiled.search(line)
            if match is not None:
                found.append((t, match))
        return found

    def wait_for(self, pattern: str, timeout: float, alive: Any = None) -> tuple[float, re.Match[str]]:
        """The first line matching `pattern` (polled every 10 ms for at most `timeout` s)."""
        for _ in range(int(timeout / 0.01) + 1):
            found = self.matches(pattern)
            if found:
                return found[0]
            if alive is not None and not alive():
                break
            time.sleep(0.01)
        raise TimeoutError(f"no log line matching {pattern!r} in {self.path.name} within {timeout:.0f} s")


# ---------------------------------------------------------------------------
# HTTP


class KeepAlive:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1:port (reconnects once on a dropped connection)."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port = port
        self.timeout = timeout
        self.connection: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def get(self, path: str) -> tuple[int, bytes]:
        for attempt in range(2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
                self.connection.connect()
                self.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self.connection.request("GET", path)
                response = self.connection.getresponse()
                body = response.read()
                if response.will_close:
                    self.close()
                return response.status, body
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def get_json(self, path: str) -> tuple[int, Any]:
        status, body = self.get(path)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {"raw": body[:200].decode("latin1")}


# ---------------------------------------------------------------------------
# The two daemons


@dataclass
class Cluster:
    """A coordinator and an aggregator under `twistd -n`, on OS-chosen loopback ports, in `directory`."""

    directory: Path
    federated_learning: dict[str, Any]
    aggregator_limits: dict[str, Any] = field(default_factory=dict)
    coordinator_extra: dict[str, Any] = field(default_factory=dict)
    api_extra: dict[str, Any] = field(default_factory=dict)  # the coordinator's `api` section
    participants_extra: dict[str, Any] = field(default_factory=dict)  # the coordinator's `participants` section
    log_level: str = "info"  # both daemons' `logging.level` (bench.timeline reads their debug lines)

    def __post_init__(self) -> None:
        from xaind.tools.daemons import Daemon  # noqa: F401 - fail early if the package is not installed

        self.coordinator: Any = None
        self.aggregator: Any = None
        self.coord_http = self.coord_pb = self.agg_http = 0

    def start(self) -> Cluster:
        from xaind.tools.daemons import Daemon, free_loopback_port, write_yaml

        self.directory.mkdir(parents=True, exist_ok=True)
        self._prepare()
        agg_port = free_loopback_port()
        coord_config = write_yaml(self.directory / "coordinator.yaml", {
            "development": True,
            "api": {"listen": self._listen(), **self.api_extra},
            "pb": {"listen": self._listen()},
            "federated_learning": self.federated_learning,
            "aggregator": {"url": self._aggregator_url(agg_port), "admit_timeout": 30, "aggregation_timeout": 600,
                           **self.coordinator_extra},
            "state_dir": str(self.directory / "coordinator-state"),
            "logging": {"level": self.log_level},
            **({"participants": dict(self.participants_extra)} if self.participants_extra else {}),
        })
        self.coordinator = Daemon(COORDINATOR, coord_config, self.directory / "coordinator", listeners=(COORD_HTTP, COORD_PB))
        self.coordinator.start()
        self.coord_http, self.coord_pb = self.coordinator.ports[COORD_HTTP], self.coordinator.ports[COORD_PB]
        agg_config = write_yaml(self.directory / "aggregator.yaml", {
            "development": True,
            "api": {"listen": self._listen(agg_port)},
            "coordinator": {"pb": f"tcp:{HOST}:{self.coord_pb}", "call_timeout": 60, **self._link_extra()},
            "aggregation": {"backend": "weighted_average"},
            "limits": self.aggregator_limits or {"max_upload_bytes": 2**30},
            "state_dir": str(self.directory / "aggregator-state"),
            "logging": {"level": self.log_level},
        })
        self.aggregator = Daemon(AGGREGATOR, agg_config, self.directory / "aggregator", listeners=(AGG_HTTP,))
        self.aggregator.start()
        self.agg_http = self.aggregator.ports[AGG_HTTP]
        if self.agg_http != agg_port:
            raise RuntimeError(f"the aggregator listens on {self.agg_http}, not on the reserved {agg_port}")
        self._wait_attached()
        return self

    # What a variant of the cluster (bench.tls.TLSCluster) changes; the rest of start() is shared.

    def _prepare(self) -> None:
        """Anything the configurations need before they are written (nothing here)."""

    def _listen(self, port: int = 0) -> str:
        """A loopback listen address, OS-chosen port by default."""
        return f"tcp:{port}:interface={HOST}"

    def _aggregator_url(self, port: int) -> str:
        return f"http://{HOST}:{port}"

    def _link_extra(self) -> dict[str, Any]:
        """More keys of the aggregator's `coordinator` section."""
        return {}

    def _wait_attached(self) -> None:
        status = KeepAlive(self.coord_http)
        try:
            self.coordinator.wait_for(lambda: status.get_json("/status")[1].get("aggregator_attached"),
                                      "the aggregator to attach", timeout=30)
        finally:
            status.close()

    def stop(self) -> None:
        for daemon in (self.aggregator, self.coordinator):
            if daemon is not None and daemon.process is not None:
                daemon.stop()

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info: object) -> None:
        with shielded():
            self.stop()

    def problems(self) -> list[str]:
        """Warning/error/traceback lines of both logs (the development-secret warning left out)."""
        found = []
        for daemon in (self.coordinator, self.aggregator):
            if daemon is None:
                continue
            for line in daemon.log_text.splitlines():
                if ("#warn]" in line and "development" not in line) or "#error]" in line or "#critical]" in line or "Traceback" in line:
                    found.append(f"{daemon.name}: {line}")
        return found


# ---------------------------------------------------------------------------
# The global model, checked against what was uploaded

#: Elements compared per step by `check_weighted_average`: its float64 scratch stays at 8 MB
#: whatever the model size, so a check of a 100 MB model does not disturb the memory figures.
CHECK_CHUNK_ELEMENTS = 2**20


def committed_model(state_dir: Path) -> tuple[int, Path]:
    """The aggregator's committed global model: (model_round, file), read from its commit point.

    `aggregator.json` is replaced atomically once an aggregation is durable
    (xaind/aggregator/store.py), so the file it names is the model the
    participants are served, not a temporary one.
    """
    record = json.loads((state_dir / "aggregator.json").read_text(encoding="utf-8"))
    if not record.get("model_file"):
        raise RuntimeError(f"the aggregator committed no global model: {record}")
    return int(record["model_round"]), state_dir / str(record["model_file"])


def file_crc32(path: Path, chunk_bytes: int = 4 * MB) -> tuple[int, int]:
    """(size, CRC-32) of a file, read in fixed chunks: what a correct download of it must give."""
    size = path.stat().st_size
    value = 0
    with open(path, "rb") as stream:
        for _ in range(size // chunk_bytes + 2):  # bounded by the size taken above
            data = stream.read(chunk_bytes)
            if not data:
                break
            value = zlib.crc32(data, value)
            del data
    return size, value


def check_weighted_average(model_path: Path, uploads: Sequence[tuple[int, np.ndarray]]) -> dict[str, Any]:
    """Compare a global model file with sum(n_i * x_i) / sum(n_i) over `uploads` [(n_i, x_i)], in float64.

    The x_i must be exactly the float32 weights that were uploaded (an
    array or a np.memmap of a result file), so that the expectation is
    independent of the aggregator's code: it is computed here chunk by
    chunk, in float64, and rounded once to float32. The aggregator folds in
    an order of its own, so its float64 sum may differ in the last bits:
    every element must be within 1 float32 ulp of the expectation
    (`not_bitwise_equal` counts those that are not bit for bit the same).

    Uploads that are one and the same array object (e.g. every participant
    of `xain-dummy-participants` returns one shared array) are summed as
    (sum of their n_i) * x: n_i * x and their sum are exact in float64 for
    float32 x and sample counts below 2**29, so this is the same value,
    computed once instead of once per participant.
    """
    result: dict[str, Any] = {"ok": False, "uploads": len(uploads), "max_abs_err": float("nan"),
                              "max_ulps": float("nan"), "not_bitwise_equal": -1, "error": ""}
    if not uploads:
        result["error"] = "no uploads to compare with"
        return result
    grouped: dict[int, list[Any]] = {}
    for samples, weights in uploads:
        entry = grouped.setdefault(id(weights), [0, weights])
        entry[0] += int(samples)
    total = float(sum(int(samples) for samples, _ in uploads))
    elements = int(uploads[0][1].shape[0])
    try:
        model = np.load(model_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        result["error"] = f"{model_path.name}: {type(error).__name__}: {error}"
        return result
    result["elements"] = elements
    if model.shape != (elements,) or model.dtype != np.dtype("<f4") or any(w.shape != (elements,) for _, w in grouped.values()):
        result["error"] = f"{model_path.name} has shape {model.shape} and dtype {model.dtype.str}, the uploads ({elements},) <f4"
        return result
    expected = np.empty(min(CHECK_CHUNK_ELEMENTS, elements), dtype=np.float64)
    worst_abs = worst_ulps = 0.0
    not_exact = 0
    for lo in range(0, elements, CHECK_CHUNK_ELEMENTS):  # bounded: elements / chunk steps
        hi = min(lo + CHECK_CHUNK_ELEMENTS, elements)
        acc = expected[: hi - lo]
        acc[...] = 0.0
        for samples, weights in grouped.values():
            acc += float(samples) * np.asarray(weights[lo:hi], dtype=np.float64)
        acc /= total
        got = np.asarray(model[lo:hi])
        rounded = acc.astype(np.float32)
        # A NaN in the model (never in the expectation) counts as infinitely far: max() would skip it.
        diff = np.nan_to_num(np.abs(got.astype(np.float64) - acc), nan=np.inf)
        ulps = diff / np.spacing(np.abs(rounded)).astype(np.float64)
        worst_abs = max(worst_abs, float(diff.max()))
        worst_ulps = max(worst_ulps, float(ulps.max()))
        not_exact += int(np.count_nonzero(got != rounded))
    del model
    result.update(max_abs_err=worst_abs, max_ulps=worst_ulps, not_bitwise_equal=not_exact, ok=worst_ulps <= 1.0)
    return result


# ---------------------------------------------------------------------------
# Statistics and results


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    array = np.asarray(values, dtype=float)
    return float(np.percentile(array, q)) if array.size else float("nan")


def fmt(value: Any, digits: int = 3) -> str:
    """A value for a `bench` line or the table: floats with `digits` significant digits."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            text = f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
            return text
        return f"{value:.{digits}g}"
    return str(value).replace(" ", "_")


@dataclass
class Row:
    measurement: str
    value: str
    floor: str
    ratio: str
    target: str
    ok: bool | None


class Results:
    """Prints one `bench <name> key=value ...` line per measurement, appends it to a JSONL file, keeps table rows."""

    def __init__(self, path: Path | None, quick: bool) -> None:
        self.path = path
        self.quick = quick
        self.run_id = _dt.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
        self.rows: list[Row] = []
        self.lines: list[str] = []
        self.failures: list[str] = []

    def emit(self, name: str, fields: dict[str, Any], row: Row | None = None) -> None:
        line = "bench " + name + " " + " ".join(f"{key}={fmt(value)}" for key, value in fields.items())
        print(line, flush=True)
        self.lines.append(line)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            record = {"bench": name, "run": self.run_id, "quick": self.quick, **{k: _jsonable(v) for k, v in fields.items()}}
            with open(self.path, "a", encoding="utf-8") as stream:
                stream.write(json.dumps(record) + "\n")
        if row is not None:
            self.rows.append(row)

    def failed(self, what: str, error: BaseException | str) -> None:
        message = f"{what}: {error if isinstance(error, str) else f'{type(error).__name__}: {error}'}"
        self.failures.append(message)
        self.emit("error", {"part": what, "message": json.dumps(message)[:400]})

    def report(self) -> int:
        """Print the table and each failure; the exit status of a part run on its own (1 if anything failed)."""
        print(self.table())
        for failure in self.failures:
            print(f"FAILED: {failure}")
        return 1 if self.failures else 0

    def table(self) -> str:
        headers = ("measurement", "value", "floor", "ratio", "target", "ok")
        cells = [headers] + [
            (r.measurement, r.value, r.floor, r.ratio, r.target, "-" if r.ok is None else ("yes" if r.ok else "NO"))
            for r in self.rows
        ]
        widths = [max(len(str(c[i])) for c in cells) for i in range(len(headers))]
        out = []
        for index, cell in enumerate(cells):
            out.append("  ".join(str(v).ljust(widths[i]) if i == 0 else str(v).rjust(widths[i]) for i, v in enumerate(cell)))
            if index == 0:
                out.append("  ".join("-" * w for w in widths))
        return "\n".join(out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def deadline_left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


class LineProcess:
    """A helper process driven by lines: commands on its stdin, one event per line on its stdout."""

    def __init__(self, processes: Processes, name: str, command: Sequence[str], stderr: IO[Any] | None = None) -> None:
        import queue

        self.name = name
        self.process = processes.start(name, command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, name=f"read-{name}", daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def expect(self, kind: str, timeout: float) -> dict[str, Any]:
        """The next line whose first word (or JSON "event") is `kind`, parsed; fails on a failure event."""
        import queue

        deadline = time.monotonic() + timeout
        for _ in range(100_000):  # bounded
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{self.name}: no {kind!r} within {timeout:.0f} s (last lines: {self.seen[-3:]})") from None
            if line is None:
                raise RuntimeError(f"{self.name} exited ({self.process.wait(5)}) before {kind!r} (last lines: {self.seen[-3:]})")
            self.seen.append(line)
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == kind:
                    return event
                if event.get("event") in ("failed", "stopped"):
                    raise RuntimeError(f"{self.name}: {event}")
            else:
                word, _, rest = line.partition(" ")
                if word == kind:
                    return json.loads(rest) if rest.startswith("{") else {"text": rest}
                if word == "error":
                    raise RuntimeError(f"{self.name}: {line}")
            if time.monotonic() > deadline:
                break
        raise TimeoutError(f"{self.name}: no {kind!r} within {timeout:.0f} s")
