"""The timeline of small rounds: every step, in both daemons and the participants, on one clock.

Fresh daemons at log level debug and one `xain-dummy-participants -v`
process run a few rounds of N participants x M MB; every line the three
write is stamped with this process's monotonic clock as it arrives (twistd
stamps whole seconds only; the tails poll every 1 ms). For each measured
round, the lines from its "selected N participant(s)" to the next round's
are printed relative to the selection, the N alike lines of the
participants (their ids and names masked) folded into one with the first
and last time and their count. Gaps between one step and the next that
are longer than `--gap-ms` are marked: a wait that is not work is where
they come from.

    .venv/bin/python -m bench.timeline --transport http --participants 10 --model-mb 1
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.common import Cluster, LogTail, Processes, shielded

#: Masks what differs between the alike lines of different participants.
_MASKS = [
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<id>"),
    (re.compile(r"dummy-\d+"), "dummy-<n>"),
    (re.compile(r"[A-Za-z0-9_-]{32,}"), "<token>"),
    (re.compile(r"\b\d+(\.\d+)? ?(ms|s|MB|kB|bytes)\b"), "<n \\2>"),
    (re.compile(r":\d{4,5}\b"), ":<port>"),
]
_LINE = re.compile(r"^\S+ \[(?P<namespace>[^#\]]+)#(?P<level>\w+)\] (?P<text>.*)$")
_SELECTED = re.compile(r"selected (\d+) participant\(s\) for round (\d+)")


@dataclass
class Step:
    """Alike lines of one source in one round: the first and last time they came, and how many."""

    source: str
    text: str
    first: float
    last: float
    count: int = 1


def masked(text: str) -> str:
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return text


def round_steps(lines: list[tuple[float, str, str]], start: float, end: float) -> list[Step]:
    steps: dict[tuple[str, str], Step] = {}
    for stamp, source, line in lines:
        if not start <= stamp < end:
            continue
        match = _LINE.match(line)
        text = masked(match.group("text") if match else line)
        key = (source, text)
        if key in steps:
            steps[key].last = stamp
            steps[key].count += 1
        else:
            steps[key] = Step(source, text, stamp, stamp)
    return sorted(steps.values(), key=lambda step: step.first)


def print_round(round_number: int, steps: list[Step], start: float, gap_ms: float) -> float:
    """Prints the steps of a round; returns its length (to the next selection) in seconds."""
    print(f"\nround {round_number}")
    previous = start
    for step in steps:
        gap = (step.first - previous) * 1000
        marker = f"  <- {gap:.1f} ms idle?" if gap > gap_ms else ""
        span = f"..{(step.last - start) * 1000:7.1f}" if step.count > 1 else " " * 9
        count = f" x{step.count}" if step.count > 1 else ""
        print(f"  {(step.first - start) * 1000:7.1f}{span} ms  {step.source:<11} {step.text}{count}{marker}")
        previous = max(previous, step.last)
    return previous - start


def main(argv: list[str] | None = None) -> int:
    from xaind.tools.daemons import dummy_participants_command

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", choices=("http", "pb"), default="http")
    parser.add_argument("--participants", type=int, default=10)
    parser.add_argument("--model-mb", default="1MB", help="a --model-size of xain-dummy-participants (1MB, 100kB, ...)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds in all; round 0 (no model yet) and the last are not printed")
    parser.add_argument("--heartbeat-period", type=float, default=None, help="default: 0.2 s over HTTP, 1 s over PB (as bench.rounds)")
    parser.add_argument("--gap-ms", type=float, default=2.0)
    parser.add_argument("--load-processes", type=int, default=1, help="xain-dummy-participants processes the participants are split over")
    args = parser.parse_args(argv)
    period = args.heartbeat_period or (0.2 if args.transport == "http" else 1.0)
    directory = Path(tempfile.mkdtemp(prefix="xaind-timeline-"))
    processes = Processes()
    cluster = Cluster(
        directory,
        federated_learning={"rounds": args.rounds, "participants_ratio": 1.0, "min_clients": args.participants, "heartbeat_timeout": 60, "training_timeout": 600},
        log_level="debug",
    )
    timeout = 60.0
    tails: list[tuple[str, LogTail]] = []
    try:
        cluster.start()
        counts = [args.participants // args.load_processes + (index < args.participants % args.load_processes) for index in range(args.load_processes)]
        participants_logs = [directory / f"participants-{index}.log" for index in range(len(counts))]
        tails = [
            ("coordinator", LogTail(cluster.coordinator.log_path, timeout, period=0.001)),
            ("aggregator", LogTail(cluster.aggregator.log_path, timeout, period=0.001)),
            *[("participant", LogTail(path, timeout, period=0.001)) for path in participants_logs],
        ]
        for _, tail in tails:
            tail.start()
        url = f"http://127.0.0.1:{cluster.coord_http}" if args.transport == "http" else f"pb://127.0.0.1:{cluster.coord_pb}"
        loads = []
        for count, path in zip(counts, participants_logs):
            with open(path, "w", encoding="utf-8") as output:
                loads.append(processes.start("xain-dummy-participants", [
                    *dummy_participants_command(), "-v", "-n", str(count), "--heartbeat-period", str(period),
                    "--model-size", args.model_mb, "--coordinator-url", url, "--transport", args.transport,
                ], stdout=output, stderr=output))
        code: int | None = 0
        for load in loads:
            try:
                code = load.wait(timeout) or code
            except subprocess.TimeoutExpired:
                code = None
                break
        for _, tail in tails:
            tail.stop()
        if code != 0:
            print(f"xain-dummy-participants {'did not end within %g s' % timeout if code is None else 'exited %d' % code}; the last lines:")
            for source, tail in tails:
                for stamp, line in tail.lines[-15:]:
                    print(f"  {source:<11} {line}")
            return 1
        lines = sorted((stamp, source, line) for source, tail in tails for stamp, line in tail.lines)
        selections = [(stamp, int(match.group(2))) for stamp, source, line in lines if source == "coordinator" and (match := _SELECTED.search(line))]
        print(f"xaind timeline: {args.transport}, {args.participants} x {args.model_mb}, heartbeat period {period:g} s; "
              f"times in ms from the round's selection, as the lines arrived")
        lengths = []
        for (start, number), (end, _) in zip(selections[1:], selections[2:]):
            lengths.append(print_round(number, round_steps(lines, start, end), start, args.gap_ms))
        if lengths:
            print(f"\nselection to next selection: median {statistics.median(lengths) * 1000:.1f} ms over {len(lengths)} round(s)")
        return 0
    finally:
        with shielded():
            for _, tail in tails:
                tail.stop()
            processes.close()
            cluster.stop()
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
