"""PB participants at scale: memory per connection, push latency and heartbeats of 1,000 minds.

The issue's question: do the heartbeat over PB and the pushes hold when
1,000 participants each keep a PB connection with a mind? Over HTTP the
heartbeat part answers that (`bench.heartbeats`); over PB a connection costs
the coordinator a broker, a perspective and a push notifier, and a selection
is N pushes written in one go, so both need their own figures.

A real `twistd -n xain-coordinator` on loopback (no aggregator: nobody
trains, the round only has to start; JSON logs at level debug, whose
`timestamp` has microseconds) with min_clients N, participants_ratio 1.0
and heartbeat_timeout 10 s. N participants (quick: 200) are split over the
load processes `bench.rounds.load_counts` gives a round cell of N (at most
four: two cores, and the load's CPU share is reported beside the
coordinator's). Each load process (`--load`, this module) runs its
participants on one reactor with the SDK's own `PbCoordinatorClient`: one
connection per participant, an anonymous login with a mind, a rendez-vous,
then a heartbeat every second (each at its own phase). So the N-th
rendez-vous is the one that starts round 0, and the coordinator pushes
`selected(0)` to all N minds.

Measured (one `bench pb_participants` line):

- `kb_per_connection`: the coordinator's VmRSS (/proc/<pid>/status) once
  the N participants are connected, known, selected and heartbeating
  (after the steady window), minus its VmRSS before the first of them
  connected, over N;
- push latency: from the coordinator's "selected N participant(s) for round
  0" line (its JSON `timestamp`, written right after the selection queued
  the pushes) to each mind's `selected` arrival (`time.time()` in the load
  process: one machine, one clock): p50, p99, max over the N pushes;
  `last_answer_ms` is when the last rendez-vous answer (the one that
  started the round) arrived, on the same scale;
- heartbeats over PB in the steady state (a window of 10 s, quick 5 s,
  after every push arrived): round trip p50/p99/max as the participant
  sees it, heartbeats/s served, the coordinator's and the load's CPU share
  (CPU seconds per wall second; 1.0 is one core);
- the ordering guarantee, counted: every participant must get exactly one
  `selected` push, for round 0, and its rendez-vous answer before it
  (`pushes_before_answer=0`); anything else fails the part, as a refused
  or failed rendez-vous or heartbeat does.

Every wait is bounded; the load processes and the daemon are stopped and
the temporary directory removed whatever happens.

    .venv/bin/python -m bench.pb_participants [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    COORD_HTTP,
    COORD_PB,
    COORDINATOR,
    HOST,
    LineProcess,
    Processes,
    Results,
    Row,
    fmt,
    install_signal_handlers,
    log,
    percentile,
    process_cpu_seconds,
    python_module_command,
    read_status_kb,
    shielded,
)

#: Participants in a full and in a quick run.
FULL_PARTICIPANTS = 1000
QUICK_PARTICIPANTS = 200
#: The SDK's default heartbeat period; the coordinator's heartbeat_timeout is well above it.
HEARTBEAT_PERIOD = 1.0
HEARTBEAT_TIMEOUT = 10.0
#: Seconds of the steady-state heartbeat window (full, quick).
WINDOW_S = {False: 10.0, True: 5.0}
#: Rendez-vous under way at once per load process: a burst of 1,000 connects would overflow the
#: listener's accept queue, and the kernel's SYN retries (1 s, 3 s...) would be measured instead.
JOIN_CONCURRENCY = 50
#: Bounds of the waits (seconds).
JOIN_TIMEOUT = 120.0
PUSH_TIMEOUT = 60.0
REPLY_TIMEOUT = 60.0

_SELECTION = "selected {count} participant(s) for round 0"


# ---------------------------------------------------------------------------
# The load process: K PB participants on one reactor, driven by stdin lines


class Participant:
    """One PB participant (the SDK's client: its own connection and mind) and when its news arrived.

    It is the `Notifications` the client hands its pushes to, so a push that
    came before the rendez-vous answer is counted here, where the client
    sees it.
    """

    def __init__(self, reactor: Any, endpoint: str, on_news: Callable[[], None]) -> None:
        from xaind.sdk.coordinator_client import PbCoordinatorClient

        self.reactor = reactor
        self.on_news = on_news
        self.client = PbCoordinatorClient(reactor, endpoint)
        self.participant_id: str | None = None
        self.answered_at: float | None = None
        self.ok: bool | None = None
        #: (round, arrival time.time()) of every `selected` push.
        self.pushes: list[tuple[int, float]] = []
        self.pushes_before_answer = 0
        self.finished_pushes = 0
        self.outstanding = False

    # Notifications (called by the client's mind)

    def selected(self, round_number: int) -> None:
        self.pushes.append((round_number, time.time()))
        if self.answered_at is None:
            self.pushes_before_answer += 1
        self.on_news()

    def finished(self) -> None:
        self.finished_pushes += 1


class Load:
    """The participants of one load process and the figures the driver asks for."""

    def __init__(self, reactor: Any, port: int, count: int, period: float, emit: Callable[[str, dict[str, Any]], None]) -> None:
        self.reactor = reactor
        self.period = period
        self.emit = emit
        self.participants = [Participant(reactor, f"tcp:{HOST}:{port}", self._check_pushed) for _ in range(count)]
        self.join_failures: list[str] = []
        self.beat_failures: list[str] = []
        #: (sent at, round trip s, state) of every heartbeat answered.
        self.beats: list[tuple[float, float, str]] = []
        self.skipped = 0
        self.pushed_reported = False

    def join(self) -> None:
        from twisted.internet.defer import DeferredList, DeferredSemaphore

        semaphore = DeferredSemaphore(JOIN_CONCURRENCY)
        joining = [semaphore.run(self._join, participant) for participant in self.participants]
        DeferredList(joining, consumeErrors=True).addCallback(lambda _: self.emit("joined", {
            "answered": sum(p.answered_at is not None for p in self.participants),
            "not_ok": sum(p.ok is False for p in self.participants),
            "failed": len(self.join_failures), "failures": self.join_failures[:3],
        }))

    def _join(self, participant: Participant) -> Any:
        def answered(answer: Any) -> None:
            participant.answered_at = time.time()
            participant.participant_id = answer.participant_id
            participant.ok = answer.ok
            self._check_pushed()
            # Each at its own phase, as independent participants would be.
            self.reactor.callLater(random.uniform(0, self.period), self._beat, participant)

        def failed(failure: Any) -> None:
            self.join_failures.append(f"{failure.type.__name__}: {failure.getErrorMessage()}"[:200])

        return participant.client.rendez_vous(participant).addCallbacks(answered, failed)

    def _beat(self, participant: Participant) -> None:
        self.reactor.callLater(self.period, self._beat, participant)
        if participant.outstanding:
            self.skipped += 1  # its previous heartbeat is still unanswered: no pipelining
            return
        participant.outstanding = True
        sent = time.time()
        started = time.perf_counter()

        def answered(beat: Any) -> None:
            participant.outstanding = False
            self.beats.append((sent, time.perf_counter() - started, beat.state))

        def failed(failure: Any) -> None:
            participant.outstanding = False
            self.beat_failures.append(f"{failure.type.__name__}: {failure.getErrorMessage()}"[:200])

        assert participant.participant_id is not None
        participant.client.heartbeat(participant.participant_id).addCallbacks(answered, failed)

    def _check_pushed(self) -> None:
        """Say `pushed` once every participant has its answer and a push (checked on each arrival)."""
        if not self.pushed_reported and all(p.pushes and p.answered_at is not None for p in self.participants):
            self.pushed_reported = True
            self.emit("pushed", {"count": len(self.participants)})

    def window(self, seconds: float) -> None:
        """Heartbeat figures over `seconds`, from one period on: every participant beats once first.

        The window is asked for as the last push arrives, when the coordinator
        still reads the minds' answers to the N pushes; the first period is
        left out so that the figures are the steady state's.
        """
        start = time.time() + self.period
        skipped, failures = self.skipped, len(self.beat_failures)

        def done() -> None:
            end = time.time()
            inside = [(rtt, state) for sent, rtt, state in self.beats if start <= sent < end - self.period]
            self.emit("window", {
                "seconds": end - start - self.period,
                "rtt_ms": [round(rtt * 1000, 3) for rtt, _ in inside],
                "states": sorted({state for _, state in inside}),
                "skipped": self.skipped - skipped, "failed": len(self.beat_failures) - failures,
                "failures": self.beat_failures[failures:failures + 3],
            })

        # Beats sent in the last period may still be under way: the window's figures stop one period earlier.
        self.reactor.callLater(seconds + 2 * self.period, done)

    def report(self) -> None:
        self.emit("report", {
            "participants": [
                {"answered_at": p.answered_at, "ok": p.ok, "pushes": p.pushes,
                 "pushes_before_answer": p.pushes_before_answer, "finished": p.finished_pushes}
                for p in self.participants
            ],
            "beat_failures": len(self.beat_failures), "join_failures": len(self.join_failures),
        })

    def close(self) -> None:
        for participant in self.participants:
            participant.client.close()


def load_main(port: int, count: int, period: float, max_seconds: float) -> int:
    """`--load`: K participants; stdin takes `join`, `window <s>`, `report`, `quit`; one JSON event a stdout line."""
    from twisted.internet import reactor, stdio
    from twisted.protocols.basic import LineReceiver

    class Commands(LineReceiver):
        delimiter = b"\n"

        def connectionMade(self) -> None:
            emit("ready", {"count": count})

        def lineReceived(self, line: bytes) -> None:
            word, _, rest = line.decode("utf-8").strip().partition(" ")
            if word == "join":
                load.join()
            elif word == "window":
                load.window(float(rest))
            elif word == "report":
                load.report()
            elif word == "quit":
                stop()

        def connectionLost(self, reason: Any = None) -> None:
            stop()  # the driver went away

    def emit(kind: str, fields: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps({"event": kind, **fields}) + "\n")
        sys.stdout.flush()

    stopping: list[bool] = []

    def stop() -> None:
        # `quit`, then stdin's end, then the bound: the first one stops.
        if reactor.running and not stopping:
            stopping.append(True)
            load.close()
            reactor.callLater(0, reactor.stop)

    load = Load(reactor, port, count, period, emit)
    stdio.StandardIO(Commands(), stdout=sys.stderr.fileno())  # events go to sys.stdout, written directly
    reactor.callLater(max_seconds, stop)  # bounded whatever the driver does
    reactor.run()
    return 0


# ---------------------------------------------------------------------------
# The driver


def coordinator_config(directory: Path, participants: int) -> Path:
    """The coordinator alone: the round starts at the N-th rendez-vous; nobody asks to train, so no aggregator."""
    from xaind.tools.daemons import free_loopback_port, write_yaml

    listen = f"tcp:0:interface={HOST}"
    return write_yaml(directory / "coordinator.yaml", {
        "development": True,
        "api": {"listen": listen},
        "pb": {"listen": listen},
        "federated_learning": {"rounds": 1, "participants_ratio": 1.0, "min_clients": participants,
                               "heartbeat_timeout": HEARTBEAT_TIMEOUT, "training_timeout": 600},
        # Never called: only a start of training would reach the aggregator.
        "aggregator": {"url": f"http://{HOST}:{free_loopback_port()}"},
        "state_dir": str(directory / "coordinator-state"),
        "logging": {"level": "debug", "format": "json"},
    })


def log_events(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


def run(results: Results, quick: bool, tmp_parent: str | None = None) -> dict[str, Any]:
    from bench.rounds import Cell, load_counts
    from xaind.tools.daemons import Daemon

    participants = QUICK_PARTICIPANTS if quick else FULL_PARTICIPANTS
    window_s = WINDOW_S[quick]
    # The split of a round cell of as many participants (bench.rounds): at most four load processes.
    counts = load_counts(Cell("pb", participants, "100kB"))
    directory = Path(tempfile.mkdtemp(prefix=f"xaind-bench-pb-{participants}-", dir=tmp_parent))
    processes = Processes()
    coordinator: Daemon | None = None
    loads: list[LineProcess] = []
    log(f"PB participants: {participants} in {len(counts)} load processes, heartbeat every {HEARTBEAT_PERIOD:g} s")
    try:
        coordinator = Daemon(COORDINATOR, coordinator_config(directory, participants), directory / "coordinator",
                             listeners=(COORD_HTTP, COORD_PB)).start()
        pid = coordinator.pid
        rss_before_kb = read_status_kb(pid)["VmRSS"]
        max_seconds = JOIN_TIMEOUT + PUSH_TIMEOUT + window_s + 3 * REPLY_TIMEOUT
        for index, count in enumerate(counts):
            loads.append(LineProcess(processes, f"PB load #{index}", python_module_command(
                "pb_participants", "--load", "--port", str(coordinator.ports[COORD_PB]), "--count", str(count),
                "--period", str(HEARTBEAT_PERIOD), "--max-seconds", str(max_seconds))))
        for load in loads:
            load.expect("ready", REPLY_TIMEOUT)
        join_started = time.time()
        for load in loads:
            load.send("join")
        joined = [load.expect("joined", JOIN_TIMEOUT) for load in loads]
        join_s = time.time() - join_started
        problems = [f"{load.name}: {event}" for load, event in zip(loads, joined) if event["failed"] or event["not_ok"]]
        if problems:
            raise RuntimeError(f"rendez-vous refused or failed: {problems}")
        for load in loads:
            load.expect("pushed", PUSH_TIMEOUT)

        # The steady state: everybody known, selected and heartbeating.
        cpu_pids = {"coordinator": pid, **{f"load{i}": load.process.pid for i, load in enumerate(loads)}}
        cpu_before = {name: process_cpu_seconds(p) for name, p in cpu_pids.items()}
        wall_before = time.monotonic()
        for load in loads:
            load.send(f"window {window_s}")
        windows = [load.expect("window", window_s + 2 * HEARTBEAT_PERIOD + REPLY_TIMEOUT) for load in loads]
        wall = time.monotonic() - wall_before
        cpu = {name: (process_cpu_seconds(p) - cpu_before[name]) / wall for name, p in cpu_pids.items()}
        rss_after_kb = read_status_kb(pid)["VmRSS"]
        for load in loads:
            load.send("report")
        reports = [load.expect("report", REPLY_TIMEOUT) for load in loads]
        for load in loads:
            load.send("quit")
        for load in loads:
            try:
                load.process.wait(REPLY_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass  # stopped below with the others
        log_text = coordinator.log_text
    finally:
        with shielded():
            processes.close()
            if coordinator is not None and coordinator.process is not None:
                coordinator.stop()
            shutil.rmtree(directory, ignore_errors=True)

    events = log_events(log_text)
    selection = [e for e in events if e.get("text") == _SELECTION.format(count=participants)]
    if len(selection) != 1:
        raise RuntimeError(f"expected one line {_SELECTION.format(count=participants)!r} in the coordinator's log, found {len(selection)}")
    selected_at = float(selection[0]["timestamp"])
    # The selection is logged after its pushes were queued (xaind/coordinator/service.py, ParticipantsSelected):
    # the time from the last rendez-vous line to it is what selecting and queuing N pushes took.
    rendez_vous = [float(e["timestamp"]) for e in events if str(e.get("text", "")).startswith("rendez-vous of ")]
    if len(rendez_vous) != participants:
        raise RuntimeError(f"{len(rendez_vous)} rendez-vous lines in the coordinator's log for {participants} participants")
    odd = [f"{e.get('level')}: {e.get('text')}" for e in events
           if e.get("level") in ("warn", "error", "critical") and "development" not in str(e.get("text"))]

    everyone = [p for report in reports for p in report["participants"]]
    pushes_before_answer = sum(p["pushes_before_answer"] for p in everyone)
    not_once = sum(1 for p in everyone if [r for r, _ in p["pushes"]] != [0])
    latencies_ms = np.array([(t - selected_at) * 1000 for p in everyone for r, t in p["pushes"] if r == 0])
    last_answer_ms = (max(p["answered_at"] for p in everyone) - selected_at) * 1000
    answer_to_push_ms = np.array([(p["pushes"][0][1] - p["answered_at"]) * 1000 for p in everyone if p["pushes"]])
    rtts = np.array([rtt for window in windows for rtt in window["rtt_ms"]])
    seconds = statistics_seconds(windows)
    states = sorted({state for window in windows for state in window["states"]})
    beat_failures = sum(w["failed"] for w in windows) + sum(r["beat_failures"] for r in reports)
    with open("/proc/loadavg", encoding="ascii") as stream:
        loadavg = float(stream.read().split()[0])
    fields: dict[str, Any] = {
        "participants": participants,
        "load_processes": len(counts),
        "heartbeat_period_s": HEARTBEAT_PERIOD,
        "join_s": join_s,
        "rss_before_mb": rss_before_kb / 1024,
        "rss_after_mb": rss_after_kb / 1024,
        "kb_per_connection": (rss_after_kb - rss_before_kb) / participants,
        "push_reference": "selection_log_line",
        "push_p50_ms": percentile(latencies_ms, 50),
        "push_p99_ms": percentile(latencies_ms, 99),
        "push_max_ms": float(latencies_ms.max()) if latencies_ms.size else float("nan"),
        "push_min_ms": float(latencies_ms.min()) if latencies_ms.size else float("nan"),
        "last_answer_ms": last_answer_ms,
        "selection_line_after_last_rendez_vous_ms": (selected_at - max(rendez_vous)) * 1000,
        "pushes": int(latencies_ms.size),
        "pushes_before_answer": pushes_before_answer,
        "not_exactly_one_push": not_once,
        "min_answer_to_push_ms": float(answer_to_push_ms.min()) if answer_to_push_ms.size else float("nan"),
        "heartbeat_p50_ms": percentile(rtts, 50),
        "heartbeat_p99_ms": percentile(rtts, 99),
        "heartbeat_max_ms": float(rtts.max()) if rtts.size else float("nan"),
        "heartbeats_per_s": rtts.size / seconds if seconds > 0 else float("nan"),
        "heartbeats_offered_per_s": participants / HEARTBEAT_PERIOD,
        "heartbeat_states": "/".join(states),
        "heartbeats_skipped": sum(w["skipped"] for w in windows),
        "heartbeat_failures": beat_failures,
        "window_s": seconds,
        "cpu_coordinator": cpu["coordinator"],
        "load_cpu_share": sum(share for name, share in cpu.items() if name.startswith("load")),
        "coordinator_warnings": len(odd),
        # Two cores shared with whatever else runs: the figures move with it.
        "loadavg_1m": loadavg,
    }
    ordering_ok = pushes_before_answer == 0 and not_once == 0 and latencies_ms.size == participants
    results.emit("pb_participants", fields)
    label = f"PB participants {participants}"
    results.rows.append(Row(f"{label}: coordinator RSS per connection", f"{fmt(fields['kb_per_connection'])} kB", "-", "-", "-", None))
    results.rows.append(Row(f"{label}: selection -> push p99", f"{fmt(fields['push_p99_ms'])} ms",
                            "-", f"max {fmt(fields['push_max_ms'])} ms", "-", None))
    heartbeat_ok = bool(fields["heartbeat_p99_ms"] < 100.0) and beat_failures == 0
    results.rows.append(Row(f"{label}: heartbeat p99 at {fmt(HEARTBEAT_PERIOD)} s", f"{fmt(fields['heartbeat_p99_ms'])} ms",
                            "-", f"{fmt(fields['heartbeats_per_s'])}/s", "<100 ms", heartbeat_ok))
    results.rows.append(Row(f"{label}: one push each, after its answer", f"{pushes_before_answer} before answer",
                            "-", f"{not_once} not one", "0 and 0", ordering_ok))
    for line in odd[:5]:
        log(f"  coordinator: {line}")
    if not ordering_ok:
        raise RuntimeError(f"ordering guarantee broken: {pushes_before_answer} push(es) before the rendez-vous answer, "
                           f"{not_once} participant(s) without exactly one selected(0), {latencies_ms.size} pushes for {participants}")
    if beat_failures or states != ["round"]:
        raise RuntimeError(f"heartbeats: {beat_failures} failed, states {states} (expected round only)")
    return fields


def statistics_seconds(windows: list[dict[str, Any]]) -> float:
    """The window's length: the load processes' windows overlap; the shortest counts."""
    return min(float(window["seconds"]) for window in windows) if windows else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_PARTICIPANTS} participants, a {WINDOW_S[True]:g} s window")
    parser.add_argument("--tmp-dir", default=None)
    parser.add_argument("--load", action="store_true", help="(internal) run as a load process")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--period", type=float, default=HEARTBEAT_PERIOD)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.load:
        return load_main(args.port, args.count, args.period, args.max_seconds)
    install_signal_handlers()
    results = Results(None, args.quick)
    try:
        run(results, args.quick, args.tmp_dir)
    except Exception as error:  # noqa: BLE001 - reported
        results.failed("pb_participants", error)
    print(results.table())
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
