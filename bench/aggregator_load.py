#!/usr/bin/env python3
"""Load benchmark of the xaind aggregator: memory, heartbeat latency, round time.

Runs the real daemons (`twistd -n xain-coordinator` and `twistd -n
xain-aggregator`, through xaind.tools.daemons) on 127.0.0.1, with their
configuration and state in a temporary directory that is removed at the end,
and drives one round (--rounds R for more) of N participants over HTTP:

- each participant (one thread, plus one heartbeat thread of its own, each on
  a keep-alive `http.client` connection) rendez-vous, heartbeats until it is
  selected, starts training, downloads the global model, and uploads a float32
  model of M MiB with its own values and sample count (the same in every
  round), keeps heartbeating until told "finish". The upload body is
  produced chunk by chunk from one shared base array and streamed with a
  Content-Length, so the client never holds more than the base array plus one
  chunk per participant;
- a sampler thread reads the aggregator's /proc/<pid>/status (VmHWM, VmRSS)
  every ~50 ms; the peak is compared with the bound 4*M + 200 MiB;
- a probe *process* (this script with --probe-worker, so that the client's
  own threads cannot delay it through the GIL) sends participant 0's
  heartbeat to the coordinator every ~20 ms, times each one, and reads the
  coordinator's /status after each beat to tell which phase the round was in
  (an aggregation window runs from the first beat that saw phase
  "aggregating" to the first that saw another phase: "complete" after the
  last round); it also reads the aggregator's /status every ~100 ms;
- the aggregator's coordinator URL (aggregator.url) must be known before the
  aggregator starts, so its port is reserved (bound to 127.0.0.1:0, then
  released) and handed to both daemons; the coordinator's ports are chosen by
  the OS and learnt from its log;
- at the end the global model (state_dir/model-R.npy) is checked against the
  sample-weighted average computed with numpy in float64, chunk by chunk, from
  the very bytes that were uploaded (their CRC-32s, taken while sending, are
  checked again when the checker regenerates them). With --rounds 2 or more,
  every download after round 0 must equal that model file (CRC-32), since
  every round averages the same uploads.

Both daemons and the probe are stopped at the end, also on an error, Ctrl-C or
SIGTERM. Every wait and loop is bounded in count and in time (--timeout).

"MB" here means MiB (2**20 bytes).

    .venv/bin/python bench/aggregator_load.py --quick
    .venv/bin/python bench/aggregator_load.py                # 20 x 100 MiB
    .venv/bin/python bench/aggregator_load.py --participants 10 --model-mb 50
    .venv/bin/python bench/aggregator_load.py --rounds 2     # also 20 concurrent 100 MiB downloads

Exit status 0 when training completed, the model and downloads are right and
the peak RSS is within the bound; 1 otherwise (130 when interrupted).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import numpy as np

from xaind.protocol import AGGREGATOR_HTTP_LISTENER, COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER


MIB = 2**20
HOST = "127.0.0.1"

COORDINATOR = "xain-coordinator"
AGGREGATOR = "xain-aggregator"
COORD_HTTP = COORDINATOR_HTTP_LISTENER
COORD_PB = COORDINATOR_PB_LISTENER
AGG_HTTP = AGGREGATOR_HTTP_LISTENER

#: Float32 elements per generated/sent/checked chunk (4 MiB of weights).
CHUNK_ELEMENTS = MIB
#: Seconds a single ordinary request (heartbeat, status, start_training) may take.
REQUEST_TIMEOUT = 30.0
#: Seconds a model upload or download connection may stall.
TRANSFER_TIMEOUT = 300.0
#: Memory sampling period (s).
SAMPLE_PERIOD = 0.05


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# HTTP helpers (keep-alive, blocking)


class Client:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1:port; reconnects once on a dropped connection."""

    def __init__(self, port: int, timeout: float = REQUEST_TIMEOUT) -> None:
        self.port = port
        self.timeout = timeout
        self.connection: http.client.HTTPConnection | None = None
        self.reconnects = 0

    def _connect(self) -> http.client.HTTPConnection:
        if self.connection is None:
            self.connection = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
            self.connection.connect()
            self.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.connection

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def get(self, path: str) -> tuple[int, bytes]:
        for attempt in range(2):
            connection = self._connect()
            try:
                connection.request("GET", path)
                response = connection.getresponse()
                body = response.read()
                if response.will_close:
                    self.close()
                return response.status, body
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # A keep-alive connection the server closed meanwhile: one fresh try.
                self.close()
                self.reconnects += 1
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def get_json(self, path: str) -> tuple[int, Any]:
        status, body = self.get(path)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {"raw": body[:200].decode("latin1")}


def reserve_port() -> int:
    """A port the OS considers free on 127.0.0.1 now (for the aggregator, whose URL the coordinator must know)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------
# The uploaded models


@dataclass
class ModelPlan:
    """What every participant uploads: x_i = base * scale_i + offset_i (float32), with n_i samples."""

    elements: int
    participants: int
    seed: int = 20260101
    base: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.base = np.empty(self.elements, dtype=np.float32)
        for lo in range(0, self.elements, CHUNK_ELEMENTS):  # bounded: elements / chunk steps
            hi = min(lo + CHUNK_ELEMENTS, self.elements)
            self.base[lo:hi] = rng.standard_normal(hi - lo, dtype=np.float32)

    def samples(self, index: int) -> int:
        return 1000 + 137 * index

    def scale(self, index: int) -> np.float32:
        return np.float32(1.0 + index / 64.0)

    def offset(self, index: int) -> np.float32:
        return np.float32(0.25 * index - self.participants / 8.0)

    def values(self, index: int, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
        """Participant `index`'s weights [lo, hi) into `out` (float32), with the exact operations of every use."""
        view = out[: hi - lo]
        np.multiply(self.base[lo:hi], self.scale(index), out=view)
        np.add(view, self.offset(index), out=view)
        return view

    def npy_header(self) -> bytes:
        stream = io.BytesIO()
        np.lib.format.write_array_header_1_0(stream, {"descr": "<f4", "fortran_order": False, "shape": (self.elements,)})
        return stream.getvalue()

    def upload_bytes(self) -> int:
        return 4 + len(self.npy_header()) + 4 * self.elements

    def body(self, index: int, crc: list[int]) -> Iterator[memoryview | bytes]:
        """The upload body, chunk by chunk; crc[0] receives the CRC-32 of the weight bytes sent."""
        yield self.samples(index).to_bytes(4, "big") + self.npy_header()
        buffer = np.empty(CHUNK_ELEMENTS, dtype=np.float32)  # reused: sendall is done before the next chunk
        value = 0
        for lo in range(0, self.elements, CHUNK_ELEMENTS):
            chunk = self.values(index, lo, min(lo + CHUNK_ELEMENTS, self.elements), buffer)
            view = memoryview(chunk).cast("B")
            value = zlib.crc32(view, value)
            yield view
        crc[0] = value


# ---------------------------------------------------------------------------
# Participants


class Stop(Exception):
    """The run is being abandoned (another participant failed, the deadline passed, Ctrl-C)."""


@dataclass
class RoundRecord:
    """One participant's round: when it was selected, started, downloaded and uploaded."""

    round: int
    selected_at: float = 0.0
    started_at: float = 0.0
    downloaded_bytes: int = 0
    download_crc: int = 0
    download_done_at: float = 0.0
    upload_started_at: float = 0.0
    upload_sent_at: float = 0.0
    upload_answered_at: float = 0.0
    upload_status: int = 0
    upload_answer: str = ""
    upload_crc: list[int] = field(default_factory=lambda: [0])


@dataclass
class Participant:
    index: int
    id: str = ""
    rendez_vous_at: float = 0.0
    finished_at: float = 0.0
    heartbeats: int = 0
    heartbeat_worst: float = 0.0
    error: str = ""
    #: The last round a heartbeat said `round` for (set by the heartbeat thread); -1 before.
    selected_round: int = -1
    rounds: list[RoundRecord] = field(default_factory=list)
    news: threading.Event = field(default_factory=threading.Event)  # set on a new selection or finish
    finished: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


class Run:
    def __init__(self, args: argparse.Namespace, plan: ModelPlan, coord_port: int, agg_port: int, deadline: float) -> None:
        self.args = args
        self.plan = plan
        self.coord_port = coord_port
        self.agg_port = agg_port
        self.deadline = deadline
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.participants = [Participant(index) for index in range(args.participants)]
        self.threads: list[threading.Thread] = []

    def fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)
        self.stop.set()

    def check(self) -> None:
        if self.stop.is_set():
            raise Stop("stopped")
        if time.monotonic() > self.deadline:
            raise Stop("deadline passed")

    def records(self, round_number: int | None = None) -> list[RoundRecord]:
        return [r for p in self.participants for r in p.rounds if round_number is None or r.round == round_number]

    # -- one participant --------------------------------------------------------

    def start(self) -> None:
        for participant in self.participants:
            thread = threading.Thread(target=self._participant, args=(participant,), name=f"participant-{participant.index}", daemon=True)
            self.threads.append(thread)
            thread.start()

    def _participant(self, p: Participant) -> None:
        try:
            self._protocol(p)
        except Stop as stop:
            p.error = p.error or f"stopped: {stop}"
        except Exception as error:  # noqa: BLE001 - reported
            p.error = f"{type(error).__name__}: {error}"
            self.fail(f"participant {p.index}: {p.error}\n{traceback.format_exc()}")
        finally:
            p.done.set()

    def _protocol(self, p: Participant) -> None:
        coordinator = Client(self.coord_port)
        try:
            status, answer = coordinator.get_json("/rendez_vous")
            if status != 200 or not answer.get("ok"):
                raise RuntimeError(f"rendez_vous answered {status} {answer}")
            p.id = answer["id"]
            p.rendez_vous_at = time.monotonic()
            beating = threading.Thread(target=self._heartbeats, args=(p,), name=f"heartbeat-{p.index}", daemon=True)
            beating.start()
            last_round = -1
            for _ in range(self.args.rounds + 1):  # bounded: one pass per round, then finish
                # Wait for a selection for a round not delivered yet, or for finish.
                for _ in range(int((self.deadline - time.monotonic()) / 0.05) + 2):
                    if p.finished.is_set() or p.selected_round > last_round:
                        break
                    self.check()
                    p.news.wait(0.05)
                    p.news.clear()
                else:
                    raise Stop("deadline passed waiting for a selection")
                if p.finished.is_set():
                    break
                record = RoundRecord(round=p.selected_round, selected_at=time.monotonic())
                p.rounds.append(record)
                last_round = record.round
                self._train(p, coordinator, record)
        finally:
            coordinator.close()
        if not p.finished.is_set():
            raise RuntimeError(f"never told finish (delivered rounds {[r.round for r in p.rounds]})")

    def _train(self, p: Participant, coordinator: Client, record: RoundRecord) -> None:
        status, answer = coordinator.get_json(f"/start_training/{p.id}")
        if status != 200 or not answer.get("ok"):
            raise RuntimeError(f"start_training for round {record.round} answered {status} {answer}")
        record.started_at = time.monotonic()
        token, url = answer["token"], answer["url"]
        target = urlsplit(url)
        if target.hostname != HOST or target.port != self.agg_port:
            raise RuntimeError(f"start_training handed out {url}, the aggregator listens on {HOST}:{self.agg_port}")
        path = f"{target.path.rstrip('/')}/{p.id}/{token}"
        self.check()
        # Download and upload on one keep-alive connection to the aggregator.
        aggregator = http.client.HTTPConnection(HOST, self.agg_port, timeout=TRANSFER_TIMEOUT)
        try:
            aggregator.request("GET", path)
            response = aggregator.getresponse()
            if response.status != 200:
                raise RuntimeError(f"download answered {response.status} {response.read(500)!r}")
            for _ in range(self.plan.upload_bytes() // MIB + 2):  # bounded by the model size
                data = response.read(MIB)
                if not data:
                    break
                record.downloaded_bytes += len(data)
                record.download_crc = zlib.crc32(data, record.download_crc)
            else:
                raise RuntimeError("download longer than any model of this run")
            record.download_done_at = time.monotonic()
            self.check()
            record.upload_started_at = time.monotonic()
            aggregator.request(
                "POST",
                path,
                body=self.plan.body(p.index, record.upload_crc),
                headers={"Content-Length": str(self.plan.upload_bytes()), "Content-Type": "application/octet-stream"},
            )
            record.upload_sent_at = time.monotonic()
            response = aggregator.getresponse()
            record.upload_status = response.status
            record.upload_answer = response.read(2000).decode("utf-8", "replace")
            record.upload_answered_at = time.monotonic()
            if response.status != 200:
                raise RuntimeError(f"upload for round {record.round} answered {response.status} {record.upload_answer}")
        finally:
            aggregator.close()

    def _heartbeats(self, p: Participant) -> None:
        """Heartbeat every --heartbeat-period until finish: beside the training, as a real participant does."""
        client = Client(self.coord_port)
        period = self.args.heartbeat_period
        limit = int((self.deadline - time.monotonic()) / period) + 2
        try:
            for _ in range(limit):  # bounded in count; the deadline bounds it in time too
                if self.stop.is_set() or time.monotonic() > self.deadline:
                    return
                began = time.monotonic()
                status, answer = client.get_json(f"/heartbeat/{p.id}")
                elapsed = time.monotonic() - began
                p.heartbeats += 1
                p.heartbeat_worst = max(p.heartbeat_worst, elapsed)
                if status != 200:
                    raise RuntimeError(f"heartbeat answered {status} {answer}")
                state = answer.get("state")
                if state == "round":
                    if int(answer["round"]) > p.selected_round:
                        p.selected_round = int(answer["round"])
                        p.news.set()
                elif state == "finish":
                    p.finished_at = time.monotonic()
                    p.finished.set()
                    p.news.set()
                    return
                elif state == "reject":
                    raise RuntimeError("heartbeat answered reject")
                self.stop.wait(max(0.0, period - (time.monotonic() - began)))
        except Exception as error:  # noqa: BLE001 - reported
            p.error = p.error or f"heartbeat: {type(error).__name__}: {error}"
            self.fail(f"participant {p.index} heartbeat: {type(error).__name__}: {error}")
        finally:
            client.close()


# ---------------------------------------------------------------------------
# Memory sampling


def read_status_kb(pid: int) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as stream:
            for line in stream:
                if line.startswith(("VmHWM:", "VmRSS:", "RssAnon:", "RssFile:", "VmSwap:", "Threads:")):
                    name, rest = line.split(":", 1)
                    values[name] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return values


def thread_stats(pid: int) -> dict[int, tuple[str, float]]:
    """Per thread of `pid`: (state letter, user+system CPU seconds so far)."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii", errors="replace") as stream:
                fields = stream.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        found[int(tid)] = (fields[0], (int(fields[11]) + int(fields[12])) / ticks)
    return found


class MemorySampler(threading.Thread):
    """VmHWM/VmRSS of the aggregator every SAMPLE_PERIOD, and the state of its reactor (main) thread."""

    def __init__(self, pid: int, deadline: float) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.pid = pid
        self.deadline = deadline
        self.halt = threading.Event()
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.reactor_states: list[tuple[float, str]] = []

    def run(self) -> None:
        limit = int((self.deadline - time.monotonic()) / SAMPLE_PERIOD) + 2
        for _ in range(max(limit, 1)):  # bounded in count and by the deadline
            values = read_status_kb(self.pid)
            if values:
                self.samples.append((time.monotonic(), values))
            state = thread_stats(self.pid).get(self.pid)
            if state is not None:
                self.reactor_states.append((time.monotonic(), state[0]))
            if self.halt.wait(SAMPLE_PERIOD) or time.monotonic() > self.deadline:
                break

    def max_in(self, key: str, start: float = -math.inf, end: float = math.inf) -> int:
        values = [s[key] for t, s in self.samples if start <= t <= end and key in s]
        return max(values) if values else 0


# ---------------------------------------------------------------------------
# The heartbeat probe (a separate process)


def probe_worker(argv: list[str]) -> int:
    """--probe-worker COORD_PORT AGG_PORT ID_FILE INTERVAL MAX_SECONDS OUT_FILE

    Started before the participants (so that its own start-up is not lost);
    waits for ID_FILE to name the participant whose heartbeat it sends.
    Every INTERVAL s: time one heartbeat of that participant, then read the
    coordinator's /status (its phase); every 5th tick also the aggregator's.
    One JSON line per tick in OUT_FILE. Stops 0.5 s after phase "complete",
    after MAX_SECONDS, or on SIGTERM.
    """
    coord_port, agg_port, id_file, interval, max_seconds, out_file = (
        int(argv[0]), int(argv[1]), Path(argv[2]), float(argv[3]), float(argv[4]), argv[5]
    )

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    Path(out_file + ".ready").touch()  # imported and set up: the participants may start
    participant_id = ""
    for _ in range(int(max_seconds / 0.005) + 1):  # bounded: wait for the id
        if id_file.exists():
            participant_id = id_file.read_text(encoding="utf-8").strip()
            break
        time.sleep(0.005)
    if not participant_id:
        return 1
    heartbeat = Client(coord_port, timeout=10.0)
    status = Client(coord_port, timeout=10.0)
    aggregator = Client(agg_port, timeout=10.0)
    end = time.monotonic() + max_seconds
    complete_at: float | None = None
    with open(out_file, "w", buffering=1, encoding="utf-8") as out:
        next_tick = time.monotonic()
        for tick in range(int(max_seconds / interval) + 1):  # bounded in count and time
            now = time.monotonic()
            if now > end or (complete_at is not None and now > complete_at + 0.5):
                break
            if now < next_tick:
                time.sleep(next_tick - now)
            record: dict[str, Any] = {"tick": tick}
            began = time.monotonic()
            record["t"] = began
            try:
                code, answer = heartbeat.get_json(f"/heartbeat/{participant_id}")
                record["hb_ms"] = (time.monotonic() - began) * 1000
                record["hb"] = answer.get("state") if code == 200 else f"HTTP {code}"
            except Exception as error:  # noqa: BLE001 - recorded
                record["hb_ms"] = (time.monotonic() - began) * 1000
                record["hb_error"] = f"{type(error).__name__}: {error}"
                heartbeat.close()
            try:
                t = time.monotonic()
                code, answer = status.get_json("/status")
                record["status_ms"] = (time.monotonic() - t) * 1000
                record["phase"] = answer.get("phase")
                record["round"] = answer.get("round")
            except Exception as error:  # noqa: BLE001 - recorded
                record["status_error"] = f"{type(error).__name__}: {error}"
                status.close()
            if tick % 5 == 0:
                try:
                    t = time.monotonic()
                    code, answer = aggregator.get_json("/status")
                    record["agg_ms"] = (time.monotonic() - t) * 1000
                    record["agg"] = answer
                except Exception as error:  # noqa: BLE001 - recorded
                    record["agg_error"] = f"{type(error).__name__}: {error}"
                    aggregator.close()
            out.write(json.dumps(record) + "\n")
            if record.get("phase") == "complete" and complete_at is None:
                complete_at = time.monotonic()
            next_tick = max(began + interval, time.monotonic())
    return 0


# ---------------------------------------------------------------------------
# Checking the global model


def check_model(path: Path, plan: ModelPlan, participants: list[Participant]) -> dict[str, Any]:
    """Compare the stored global model with sum(n_i x_i) / sum(n_i), chunk by chunk in float64."""
    result: dict[str, Any] = {"ok": False}
    weights = [float(plan.samples(p.index)) for p in participants]
    total = sum(weights)
    crcs = [0] * len(participants)
    buffer = np.empty(CHUNK_ELEMENTS, dtype=np.float32)
    expected = np.empty(CHUNK_ELEMENTS, dtype=np.float64)
    got_raw = np.empty(CHUNK_ELEMENTS * 4, dtype=np.uint8)
    worst_abs = 0.0
    worst_ulps = 0.0
    not_exact = 0
    over_one_ulp = 0
    with open(path, "rb", buffering=0) as stream:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream)
        result.update(shape=list(shape), dtype=dtype.str)
        if shape != (plan.elements,) or dtype != np.dtype("<f4"):
            result["error"] = f"model has shape {shape} and dtype {dtype.str}, expected ({plan.elements},) <f4"
            return result
        for lo in range(0, plan.elements, CHUNK_ELEMENTS):  # bounded
            hi = min(lo + CHUNK_ELEMENTS, plan.elements)
            count = hi - lo
            acc = expected[:count]
            acc[...] = 0.0
            for k, p in enumerate(participants):
                values = plan.values(p.index, lo, hi, buffer)
                crcs[k] = zlib.crc32(memoryview(values).cast("B"), crcs[k])
                acc += weights[k] * values.astype(np.float64)
            acc /= total
            raw = got_raw[: count * 4]
            filled = 0
            for _ in range(count * 4 + 1):  # bounded: each read returns at least one byte or ends
                if filled == len(raw):
                    break
                got = stream.readinto(memoryview(raw)[filled:])
                if not got:
                    result["error"] = f"model file ends early at element {lo + filled // 4}"
                    return result
                filled += got
            got32 = raw.view("<f4")
            diff = np.abs(got32.astype(np.float64) - acc)
            worst_abs = max(worst_abs, float(diff.max()))
            ulp = np.spacing(np.abs(acc.astype(np.float32))).astype(np.float64)
            ulps = diff / ulp
            worst_ulps = max(worst_ulps, float(ulps.max()))
            not_exact += int(np.count_nonzero(got32 != acc.astype(np.float32)))
            over_one_ulp += int(np.count_nonzero(ulps > 1.0))
        if stream.read(1):
            result["error"] = "model file has trailing bytes"
            return result
    with open(path, "rb") as stream:  # the whole file's CRC-32, to check later rounds' downloads
        file_crc = 0
        for _ in range(os.fstat(stream.fileno()).st_size // MIB + 2):  # bounded
            data = stream.read(MIB)
            if not data:
                break
            file_crc = zlib.crc32(data, file_crc)
    result["file_crc"] = file_crc
    result["file_bytes"] = path.stat().st_size
    # Every round's upload of a participant is the same bytes: each must match the regenerated CRC.
    crc_mismatches = sorted({p.index for k, p in enumerate(participants) for r in p.rounds if crcs[k] != r.upload_crc[0]})
    result.update(
        max_abs_err=worst_abs,
        max_ulps=worst_ulps,
        not_bitwise_equal=not_exact,
        over_one_ulp=over_one_ulp,
        crc_mismatches=crc_mismatches,
        total_samples=int(total),
    )
    result["ok"] = over_one_ulp == 0 and not crc_mismatches
    return result


# ---------------------------------------------------------------------------
# Reporting


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def stats(values: list[float]) -> dict[str, float]:
    return {
        "samples": len(values),
        "worst_ms": max(values) if values else float("nan"),
        "p50_ms": percentile(values, 50),
        "p99_ms": percentile(values, 99),
    }


def fmt(value: float, digits: int = 1) -> str:
    return "nan" if value != value else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------
# Main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--participants", type=int, default=20, help="participants (and min_clients) (default 20)")
    parser.add_argument("--model-mb", type=float, default=100.0, help="model size in MiB of float32 (default 100)")
    parser.add_argument("--quick", action="store_true", help="5 participants x 10 MiB")
    parser.add_argument("--rounds", type=int, default=1,
                        help="federated_learning.rounds (default 1; from 2 on, every round after the first "
                             "also downloads the global model of M MiB, all participants at once)")
    parser.add_argument("--heartbeat-period", type=float, default=0.5, help="participants' heartbeat period, s (default 0.5)")
    parser.add_argument("--probe-interval", type=float, default=0.02, help="probe heartbeat interval, s (default 0.02)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="whole run's time limit, s (default 1200)")
    parser.add_argument("--tmp-dir", default=None, help="where to create the temporary directory (default: $TMPDIR or /tmp)")
    args = parser.parse_args(argv)
    if args.quick:
        args.participants, args.model_mb = 5, 10.0
    if args.participants < 1 or args.model_mb <= 0 or args.rounds < 1:
        parser.error("--participants and --rounds must be >= 1 and --model-mb > 0")
    return args


def mem_available_mib() -> float:
    with open("/proc/meminfo", encoding="ascii") as stream:
        for line in stream:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--probe-worker"]:
        return probe_worker(argv[1:])
    args = parse_args(argv)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)

    from xaind.tools.daemons import Daemon, write_yaml

    n = args.participants
    elements = max(1, int(args.model_mb * MIB) // 4)
    model_mib = elements * 4 / MIB
    bound_mib = 4 * model_mib + 200
    started = time.monotonic()
    deadline = started + args.timeout

    # Resources first: the client holds the base model (+ small chunks), the
    # aggregator up to the bound, the disk N results and two models.
    available = mem_available_mib()
    need_mem = model_mib + bound_mib + 300
    tmp_parent = args.tmp_dir or tempfile.gettempdir()
    need_disk = (n + 3) * model_mib + 100
    free_disk = shutil.disk_usage(tmp_parent).free / MIB
    log(f"{n} participants x {model_mib:.1f} MiB; MemAvailable {available:.0f} MiB (need ~{need_mem:.0f}); "
        f"free disk in {tmp_parent} {free_disk:.0f} MiB (need ~{need_disk:.0f})")
    if available < need_mem:
        print(f"not enough memory: {available:.0f} MiB available, ~{need_mem:.0f} MiB needed", file=sys.stderr)
        return 1
    if free_disk < need_disk:
        print(f"not enough disk in {tmp_parent}: {free_disk:.0f} MiB free, ~{need_disk:.0f} MiB needed", file=sys.stderr)
        return 1

    tmp = Path(tempfile.mkdtemp(prefix="xaind-bench-", dir=tmp_parent))
    daemons: list[Daemon] = []
    probe: subprocess.Popen[bytes] | None = None
    sampler: MemorySampler | None = None
    run: Run | None = None
    exit_code = 1
    try:
        plan = ModelPlan(elements=elements, participants=n)
        upload_bytes = plan.upload_bytes()

        agg_port = reserve_port()
        coord_state, agg_state = tmp / "coordinator-state", tmp / "aggregator-state"
        coord_config = write_yaml(tmp / "coordinator.yaml", {
            "development": True,
            "api": {"listen": f"tcp:0:interface={HOST}"},
            "pb": {"listen": f"tcp:0:interface={HOST}"},
            "federated_learning": {
                "rounds": args.rounds,
                "participants_ratio": 1.0,
                "min_clients": n,
                "heartbeat_timeout": 60,
                "training_timeout": 3600,
            },
            "aggregator": {"url": f"http://{HOST}:{agg_port}", "admit_timeout": 10, "aggregation_timeout": 600},
            "state_dir": str(coord_state),
            "logging": {"level": "info"},
        })
        coordinator = Daemon(COORDINATOR, coord_config, tmp / "coordinator", listeners=(COORD_HTTP, COORD_PB))
        daemons.append(coordinator)
        coordinator.start()
        coord_port, pb_port = coordinator.ports[COORD_HTTP], coordinator.ports[COORD_PB]
        agg_config = write_yaml(tmp / "aggregator.yaml", {
            "development": True,
            "api": {"listen": f"tcp:{agg_port}:interface={HOST}"},
            "coordinator": {"pb": f"tcp:{HOST}:{pb_port}", "call_timeout": 30},
            "aggregation": {"backend": "weighted_average"},
            "limits": {"max_upload_bytes": upload_bytes + MIB},
            "state_dir": str(agg_state),
            "logging": {"level": "info"},
        })
        aggregator = Daemon(AGGREGATOR, agg_config, tmp / "aggregator", listeners=(AGG_HTTP,))
        daemons.append(aggregator)
        aggregator.start()
        if aggregator.ports[AGG_HTTP] != agg_port:
            raise RuntimeError(f"aggregator listens on {aggregator.ports[AGG_HTTP]}, not the reserved {agg_port}")
        status_client = Client(coord_port)
        coordinator.wait_for(lambda: status_client.get_json("/status")[1].get("aggregator_attached"), "the aggregator to attach")
        log(f"coordinator pid {coordinator.pid} http {coord_port} pb {pb_port}; aggregator pid {aggregator.pid} http {agg_port}")

        sampler = MemorySampler(aggregator.pid, deadline)
        sampler.start()
        coordinator_hwm_start = read_status_kb(coordinator.pid).get("VmHWM", 0)
        aggregator_idle_rss = read_status_kb(aggregator.pid).get("VmRSS", 0)

        # The probe process starts first and is handed participant 0's id when it has one.
        probe_file, id_file = tmp / "probe.jsonl", tmp / "probe-id"
        probe = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--probe-worker", str(coord_port), str(agg_port), str(id_file),
             str(args.probe_interval), str(max(1.0, deadline - time.monotonic())), str(probe_file)],
            stdin=subprocess.DEVNULL,
        )
        ready = Path(str(probe_file) + ".ready")
        for _ in range(int(20 / 0.01)):  # bounded: its imports take a fraction of a second
            if ready.exists() or probe.poll() is not None:
                break
            time.sleep(0.01)
        if not ready.exists():
            raise RuntimeError(f"the heartbeat probe did not start (exit code {probe.poll()})")
        run = Run(args, plan, coord_port, agg_port, deadline)
        run.start()
        first = run.participants[0]
        for _ in range(int(args.timeout / 0.005) + 1):  # participant 0's id, for the probe
            if first.id or first.done.is_set() or run.stop.is_set() or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        if not first.id:
            raise RuntimeError(f"participant 0 got no id: {first.error or run.failures}")
        (tmp / "probe-id.tmp").write_text(first.id + "\n", encoding="utf-8")
        os.replace(tmp / "probe-id.tmp", id_file)

        # Wait for every participant to finish (or a failure / the deadline), in short steps.
        last_report = time.monotonic()
        for _ in range(int(args.timeout / 0.1) + 1):
            if all(p.done.is_set() for p in run.participants) or run.stop.is_set() or time.monotonic() > deadline:
                break
            time.sleep(0.1)
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                current = [p.rounds[-1] for p in run.participants if p.rounds]
                counts = {
                    "rendezvous": sum(bool(p.id) for p in run.participants),
                    "round": max((r.round for r in current), default=None),
                    "downloading": sum(bool(r.started_at) and not r.download_done_at for r in current),
                    "uploading": sum(bool(r.upload_started_at) and not r.upload_answered_at for r in current),
                    "uploaded": sum(bool(r.upload_answered_at) for r in current),
                    "finished": sum(p.finished.is_set() for p in run.participants),
                }
                rss = read_status_kb(aggregator.pid)
                log(f"progress {counts}; aggregator VmRSS {rss.get('VmRSS', 0) / 1024:.0f} MiB VmHWM {rss.get('VmHWM', 0) / 1024:.0f} MiB")
        if run.failures:
            raise RuntimeError("participant failure(s):\n" + "\n".join(run.failures[:5]))
        if not all(p.done.is_set() for p in run.participants):
            run.stop.set()
            raise RuntimeError(f"timed out after {args.timeout} s with participants unfinished")
        complete_seen = time.monotonic()
        # Let the probe see "complete" and finish by itself (it stops 0.5 s after).
        try:
            probe.wait(timeout=max(1.0, min(15.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            probe.terminate()
            probe.wait(timeout=10)
        final_agg = read_status_kb(aggregator.pid)
        agg_threads = thread_stats(aggregator.pid)
        final_coord = read_status_kb(coordinator.pid)
        sampler.halt.set()
        sampler.join(timeout=5)
        agg_client = Client(agg_port)
        agg_status = agg_client.get_json("/status")[1]
        agg_client.close()
        coord_status = status_client.get_json("/status")[1]
        status_client.close()

        # -- the probe's records: heartbeat latencies, and the phase seen right after each beat
        records = []
        with open(probe_file, encoding="utf-8") as stream:
            for line in stream:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass  # a last line cut by a termination
        records.sort(key=lambda r: r["t"])
        # Aggregation windows: each run of ticks that saw phase "aggregating", up to the next tick that did not.
        windows: list[tuple[float, float, Any]] = []
        begin: dict[str, Any] | None = None
        for record in records:
            if record.get("phase") == "aggregating":
                if begin is None:
                    begin = record
            elif begin is not None and "phase" in record:
                windows.append((begin["t"], record["t"], begin.get("round")))
                begin = None
        if begin is not None:
            windows.append((begin["t"], complete_seen, begin.get("round")))

        def in_windows(t: float, spans: list[tuple[float, float]]) -> bool:
            return any(start <= t <= end for start, end in spans)

        hb_all = [r["hb_ms"] for r in records if "hb_ms" in r]
        hb_errors = [r for r in records if "hb_error" in r or str(r.get("hb", "")).startswith("HTTP")]
        hb_aggregating = [r["hb_ms"] for r in records if r.get("phase") == "aggregating" and "hb_ms" in r]
        status_all = [r["status_ms"] for r in records if "status_ms" in r]
        agg_status_all = [r["agg_ms"] for r in records if "agg_ms" in r]
        agg_busy = [r["t"] for r in records if isinstance(r.get("agg"), dict) and r["agg"].get("aggregating")]

        # -- rounds (numbered as the coordinator does, from 0)
        first_start = max(p.rendez_vous_at for p in run.participants)  # the last rendez-vous started round 0
        rounds_seen = sorted({r.round for r in run.records()})
        per_round = []
        start = first_start
        for index, number in enumerate(rounds_seen):
            recs = run.records(number)
            window = next((w for w in windows if w[2] == number), None)
            end = window[1] if window else (complete_seen if index == len(rounds_seen) - 1 else float("nan"))
            uploads = [r for r in recs if r.upload_answered_at]
            info = {
                "round": number,
                "start": start,
                "end": end,
                "time": end - start,
                "upload_start": min((r.upload_started_at for r in recs if r.upload_started_at), default=float("nan")),
                "upload_end": max((r.upload_answered_at for r in uploads), default=float("nan")),
                "upload_durations": [r.upload_answered_at - r.upload_started_at for r in uploads],
                "download_start": min((r.started_at for r in recs if r.started_at), default=float("nan")),
                "download_end": max((r.download_done_at for r in recs if r.download_done_at), default=float("nan")),
                "downloaded": sum(r.downloaded_bytes for r in recs),
                "aggregation": (window[1] - window[0]) if window else float("nan"),
                "window": window,
            }
            per_round.append(info)
            start = end
        upload_spans = [(i["upload_start"], i["upload_end"]) for i in per_round]
        download_spans = [(i["download_start"], i["download_end"]) for i in per_round if i["downloaded"]]
        agg_spans = [(w[0], w[1]) for w in windows]
        hb_uploading = [r["hb_ms"] for r in records if "hb_ms" in r and in_windows(r["t"], upload_spans)]
        total_time = (windows[-1][1] if windows else complete_seen) - first_start

        # -- the model
        model_path = agg_state / f"model-{args.rounds}.npy"
        if not model_path.exists():
            raise RuntimeError(f"no global model at {model_path}: aggregator status {agg_status}")
        check_started = time.monotonic()
        check = check_model(model_path, plan, run.participants)
        check_seconds = time.monotonic() - check_started
        # Every round's uploads are the same, so every global model is the same file: later rounds' downloads must equal it.
        later = [r for r in run.records() if r.round > 0]
        download_mismatches = [r for r in later if r.downloaded_bytes != check.get("file_bytes") or r.download_crc != check.get("file_crc")]
        first_round_downloads = [r.downloaded_bytes for r in run.records(0)]
        downloads_ok = not download_mismatches and all(b == 0 for b in first_round_downloads)

        # -- memory
        peak_kb = max(final_agg.get("VmHWM", 0), sampler.max_in("VmHWM"))
        peak_mib = peak_kb / 1024
        mem_ok = peak_mib <= bound_mib

        def max_rss_in(spans: list[tuple[float, float]]) -> float:
            values = [s.get("VmRSS", 0) for t, s in sampler.samples if in_windows(t, spans)]
            return max(values) / 1024 if values else float("nan")

        sampled_rss_peak = sampler.max_in("VmRSS") / 1024
        rss_anon_peak = sampler.max_in("RssAnon") / 1024
        peak_at = max(sampler.samples, key=lambda s: s[1].get("VmRSS", 0))[0] if sampler.samples else None

        stats_all, stats_agg, stats_up = stats(hb_all), stats(hb_aggregating), stats(hb_uploading)
        reactor_cpu = agg_threads.get(aggregator.pid, ("?", 0.0))[1]
        other_cpu = sorted((cpu for tid, (_, cpu) in agg_threads.items() if tid != aggregator.pid), reverse=True)
        upload_states = [state for t, state in sampler.reactor_states if in_windows(t, upload_spans)]
        state_share = {letter: upload_states.count(letter) for letter in sorted(set(upload_states))}
        client_peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        agg_total = sum(i["aggregation"] for i in per_round if i["aggregation"] == i["aggregation"])

        # -- the report
        print()
        print(f"xaind aggregator load benchmark: {n} participants x {model_mib:.1f} MiB float32, {args.rounds} round(s) "
              f"({upload_bytes} bytes per upload, {n * upload_bytes / MIB:.0f} MiB uploaded per round)")
        print(f"{'figure':<60} {'value':>20}")
        print("-" * 81)
        rows = [
            ("aggregator peak RSS (VmHWM), MiB", fmt(peak_mib)),
            ("bound 4*M + 200, MiB", fmt(bound_mib)),
            ("  within bound", str(mem_ok).lower()),
            ("aggregator RSS idle at start, MiB", fmt(aggregator_idle_rss / 1024)),
            ("aggregator max sampled VmRSS / RssAnon, MiB", f"{fmt(sampled_rss_peak)} / {fmt(rss_anon_peak)}"),
            ("aggregator max sampled VmRSS while uploading, MiB", fmt(max_rss_in(upload_spans))),
            ("aggregator max sampled VmRSS while downloading, MiB", fmt(max_rss_in(download_spans))),
            ("aggregator max sampled VmRSS while aggregating, MiB", fmt(max_rss_in(agg_spans))),
            ("aggregator VmRSS at the end, MiB", fmt(final_agg.get("VmRSS", 0) / 1024)),
            ("peak sampled VmRSS at, s after the last rendez-vous", fmt(peak_at - first_start, 2) if peak_at else "n/a"),
            ("memory samples", str(len(sampler.samples))),
            ("aggregator CPU s: reactor thread / busiest other thread", f"{fmt(reactor_cpu, 2)} / {fmt(other_cpu[0] if other_cpu else 0.0, 2)}"),
            ("aggregator reactor thread state while uploading (R/S/D)", " ".join(f"{k}:{v}" for k, v in state_share.items()) or "n/a"),
            ("coordinator VmHWM start / end, MiB", f"{fmt(coordinator_hwm_start / 1024)} / {fmt(final_coord.get('VmHWM', 0) / 1024)}"),
            ("client (this script) peak RSS, MiB", fmt(client_peak_mib)),
            ("all rounds (last rendez-vous -> phase complete), s", fmt(total_time, 2)),
        ]
        for info in per_round:
            durations = info["upload_durations"]
            rows += [
                (f"round {info['round']}: time (start -> aggregated), s", fmt(info["time"], 2)),
                ("  download: bytes / window, s", f"{info['downloaded']} / {fmt(info['download_end'] - info['download_start'], 2)}"),
                ("  selection -> first upload byte, s", fmt(info["upload_start"] - info["start"], 2)),
                ("  upload window (first upload byte -> last 200), s", fmt(info["upload_end"] - info["upload_start"], 2)),
                ("  per upload min / median / max, s",
                 " / ".join(fmt(v, 2) for v in (min(durations), float(np.median(durations)), max(durations))) if durations else "n/a"),
                ("  upload throughput (all bytes / upload window), MiB/s",
                 fmt(len(durations) * upload_bytes / MIB / (info["upload_end"] - info["upload_start"]))),
                ("  aggregation window (phase aggregating -> not), s", fmt(info["aggregation"], 3)),
            ]
        rows += [
            ("aggregator /status said aggregating=true, looks (every ~0.1 s)", str(len(agg_busy))),
            ("heartbeat probe, whole run: samples", str(stats_all["samples"])),
            ("  worst / p50 / p99, ms", f"{fmt(stats_all['worst_ms'])} / {fmt(stats_all['p50_ms'])} / {fmt(stats_all['p99_ms'])}"),
            ("heartbeat probe while uploading: samples", str(stats_up["samples"])),
            ("  worst / p50 / p99, ms", f"{fmt(stats_up['worst_ms'])} / {fmt(stats_up['p50_ms'])} / {fmt(stats_up['p99_ms'])}"),
            ("heartbeat probe during aggregation: samples", str(stats_agg["samples"])),
            ("  worst / p50 / p99, ms", f"{fmt(stats_agg['worst_ms'])} / {fmt(stats_agg['p50_ms'])} / {fmt(stats_agg['p99_ms'])}"),
            ("heartbeat probe errors", str(len(hb_errors))),
            ("coordinator /status worst / p99, ms", f"{fmt(max(status_all) if status_all else float('nan'))} / {fmt(percentile(status_all, 99))}"),
            ("aggregator /status worst / p99, ms (every 5th tick)", f"{fmt(max(agg_status_all) if agg_status_all else float('nan'))} / {fmt(percentile(agg_status_all, 99))}"),
            ("participants' own heartbeats: count / worst, ms", f"{sum(p.heartbeats for p in run.participants)} / {fmt(max(p.heartbeat_worst for p in run.participants) * 1000)}"),
            ("model check: max |got - expected| / max ulps", f"{check.get('max_abs_err', float('nan')):.3g} / {check.get('max_ulps', float('nan')):.3g}"),
            ("model check: elements not bitwise = float32(expected)", str(check.get("not_bitwise_equal", "n/a"))),
            ("model check: participants with upload CRC mismatches", str(check.get("crc_mismatches", "n/a"))),
            ("model check ok (<= 1 ulp everywhere, CRCs equal)", str(check["ok"]).lower()),
            ("downloads ok (round 0 empty; later = the model file)", f"{str(downloads_ok).lower()} ({len(later)} checked)"),
            ("model check time, s", fmt(check_seconds, 1)),
            ("final coordinator phase / round", f"{coord_status.get('phase')} / {coord_status.get('round')}"),
            ("final aggregator model_round / model_bytes", f"{agg_status.get('model_round')} / {agg_status.get('model_bytes')}"),
        ]
        for name, value in rows:
            print(f"{name:<60} {value:>20}")
        if check.get("error"):
            print(f"model check error: {check['error']}")
        print()
        print(f"bench aggregator_memory participants={n} model_mb={model_mib:g} peak_rss_mb={peak_mib:.1f} "
              f"bound_mb={bound_mib:.1f} ok={str(mem_ok).lower()}")
        print(f"bench heartbeat_during_aggregation worst_ms={fmt(stats_agg['worst_ms'], 2)} p50_ms={fmt(stats_agg['p50_ms'], 2)} "
              f"p99_ms={fmt(stats_agg['p99_ms'], 2)} samples={stats_agg['samples']} window_s={fmt(agg_total, 3)}")
        print(f"bench heartbeat_whole_run worst_ms={fmt(stats_all['worst_ms'], 2)} p50_ms={fmt(stats_all['p50_ms'], 2)} "
              f"p99_ms={fmt(stats_all['p99_ms'], 2)} samples={stats_all['samples']} errors={len(hb_errors)}")
        print(f"bench heartbeat_during_uploads worst_ms={fmt(stats_up['worst_ms'], 2)} p50_ms={fmt(stats_up['p50_ms'], 2)} "
              f"p99_ms={fmt(stats_up['p99_ms'], 2)} samples={stats_up['samples']}")
        for info in per_round:
            print(f"bench round participants={n} model_mb={model_mib:g} round={info['round']} round_s={fmt(info['time'], 2)} "
                  f"upload_window_s={fmt(info['upload_end'] - info['upload_start'], 2)} aggregation_s={fmt(info['aggregation'], 3)}")
        if args.rounds > 1:
            print(f"bench rounds participants={n} model_mb={model_mib:g} rounds={args.rounds} total_s={total_time:.2f}")
        print(f"bench model_check ok={str(check['ok']).lower()} max_abs_err={check.get('max_abs_err', float('nan')):.3g} "
              f"max_ulps={check.get('max_ulps', float('nan')):.3g} crc_mismatches={len(check.get('crc_mismatches', []))} "
              f"downloads_ok={str(downloads_ok).lower()}")
        for daemon in daemons:
            noteworthy = [line for line in daemon.log_text.splitlines()
                          if ("#warn]" in line and "development configuration" not in line)
                          or "#error]" in line or "#critical]" in line or "Traceback" in line]
            if noteworthy:
                print(f"{daemon.name}: {len(noteworthy)} warning/error log line(s):")
                for line in noteworthy[:10]:
                    print(f"  {line}")
        exit_code = 0 if (mem_ok and check["ok"] and downloads_ok and coord_status.get("phase") == "complete") else 1
    except KeyboardInterrupt as interrupt:
        print(f"interrupted ({str(interrupt) or 'Ctrl-C'}): stopping the daemons", file=sys.stderr)
        exit_code = 130
    except Exception as error:  # noqa: BLE001 - reported, then everything is stopped
        print(f"benchmark failed: {type(error).__name__}: {error}", file=sys.stderr)
        for daemon in daemons:
            if daemon.process is not None:
                print(f"--- {daemon.name} log (last 30 lines) ---", file=sys.stderr)
                print("\n".join(daemon.log_text.splitlines()[-30:]), file=sys.stderr)
        exit_code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if run is not None:
            run.stop.set()
        if sampler is not None:
            sampler.halt.set()
        if probe is not None and probe.poll() is None:
            probe.terminate()
            try:
                probe.wait(timeout=10)
            except subprocess.TimeoutExpired:
                probe.kill()
                probe.wait(timeout=10)
        for daemon in reversed(daemons):
            if daemon.process is not None:
                code = daemon.stop()
                log(f"{daemon.name} (pid {daemon.pid}) stopped with exit code {code}{' after SIGKILL' if daemon.killed else ''}")
        if run is not None:
            for thread in run.threads:
                thread.join(timeout=2)
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"removed {tmp}; total {time.monotonic() - started:.1f} s")
    return exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

