"""Soak: a long training with misbehaving participants, checking that neither daemon's RSS nor descriptors grow.

`make soak` (not part of `make test`) runs one training of 200 rounds on
fresh daemons (`twistd -n`, 127.0.0.1, OS-chosen ports, a temporary state
directory) with a 1 MB model and 20 honest participants over both
transports, all `xain-dummy-participants` processes:

* 8 over HTTP and 8 over PB, running throughout;
* 2 over HTTP and 2 over PB in two processes that are killed (SIGKILL) and
  started again in turn every `--restart-period` s (10; restart: their old ids
  fall silent mid-round, possibly mid-upload, and come back as new ones);

and, from `bench/soak_agents.py` (one process, one thread each):

* `dropout`: when selected, takes its token, breaks off its download and
  stops heartbeating; it comes back under a new id 4 s later;
* `garbage`: when selected, uploads a malformed result (random bytes, wrong
  shape, NaN, integer dtype, truncated; in turn), which must be refused with
  a 4xx and a JSON code, then a valid one with the same token.

Round settings, chosen so that rounds keep moving despite them:
`participants_ratio` 0.5 and `min_clients` 10 (a round selects half of the
known participants, at least 5, so a misbehaving agent is in about every
other round and the killed processes are not needed for a round to start);
`heartbeat_timeout` 3 s (a silent participant is dropped, and another one
selected in its place, within 3 s; HTTP participants heartbeat every 0.2 s
with the default hold of 0.75 s, PB ones every 0.5 s); `training_timeout`
10 s (an honest 1 MB upload takes milliseconds; only a participant that
took its token and then neither delivers nor falls silent waits that out).

Sampling: after `--warmup` rounds (20; the allocator, caches and pools
settle), every `--sample-every` rounds (5) the VmRSS and the number of
entries of /proc/<pid>/fd of both daemons are read, with both daemons'
/status counters, the file count of their state directories and their
descriptors by kind (`bench/descriptors.py`), to tell what grows, should
something grow (`bench soak_fds`, `bench soak_status`; every sample in
samples.jsonl of the directory kept by `--keep`). Verdict (exit 1 when one fails):

* RSS: the least-squares slope of VmRSS over the round number, per 100
  rounds, at most `--rss-tolerance` MiB (4) for each daemon; a slope, not
  last minus first, because the allocator moves RSS up and down by a few
  MiB from sample to sample (1 MB buffers come and go);
* descriptors: the median of the last 5 samples at most `--fd-tolerance`
  (12) above the median of the first 5: connections in flight come and go,
  and the HTTP participants' connection pools (up to 2 connections per
  participant) fill up over the first hundred rounds, which showed as +6 of
  the coordinator's HTTP connections after 200 and after 400 rounds alike;
  a leak of one descriptor per restart, dropout or refused upload would be
  20 to 100 over the run, one per round 180;
* state files: likewise, at most 4 more files in either state directory;
* all rounds aggregated, the final global model a float32 array of the
  dummy participants' shape with finite values (and, since every accepted
  upload is the same array, within 1 ulp of it);
* the misbehaviour happened: dropouts, restarts and garbage refused with a
  4xx each (`garbage_unexpected` 0), and every valid upload after garbage
  accepted; no traceback or critical line in either log.

It prints `bench soak ...` lines (bench/common.py's Results), appended to
bench/results/<date>.jsonl unless `--no-save`. A full run takes about
3 minutes on a 2-core machine (5 under load; 161 s measured); `--quick`
(30 rounds, warm-up 5, a sample every round, RSS tolerance 8 MiB per 100
rounds since the allocator still settles) under a minute. Every loop is bounded, the whole run by
`--time-limit` (900 s); every process is stopped on exit, errors, Ctrl-C and
SIGTERM.

    .venv/bin/python -m bench.soak --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from bench.common import (
    MB,
    RESULTS_DIR,
    Cluster,
    Interrupted,
    KeepAlive,
    LineProcess,
    Processes,
    Results,
    Row,
    check_weighted_average,
    committed_model,
    fmt,
    install_signal_handlers,
    log,
    python_module_command,
    read_status_kb,
    shielded,
)
from bench.descriptors import descriptor_kinds

HEARTBEAT_PERIOD = {"http": 0.2, "pb": 0.5}
FEDERATED_LEARNING = {"participants_ratio": 0.5, "min_clients": 10, "heartbeat_timeout": 3, "training_timeout": 10}
#: Participants per process: (transport, count, restarted).
LAYOUT = (("http", 8, False), ("pb", 8, False), ("http", 2, True), ("pb", 2, True))
#: Samples at either end compared for descriptors and state files.
ENDS = 5
STATUS_POLL = 0.25
#: Seconds a dropped-out agent stays away before its next rendez-vous.
DROPOUT_PAUSE = 4.0


@dataclass
class Sample:
    round: int
    seconds: float
    rss_kb: dict[str, int]
    fds: dict[str, int]
    fd_kinds: dict[str, dict[str, int]]
    state_files: dict[str, int]
    log_bytes: dict[str, int]
    coordinator_status: dict[str, Any]
    aggregator_status: dict[str, Any]


@dataclass
class Honest:
    """One `xain-dummy-participants` process of the soak, started again after each kill."""

    transport: str
    count: int
    restarted: bool
    index: int
    process: subprocess.Popen[Any] | None = None
    outputs: list[IO[str]] = field(default_factory=list)
    kills: int = 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return -1


def count_files(directory: Path) -> int:
    try:
        return sum(len(files) for _, _, files in os.walk(directory))
    except OSError:
        return -1


def status_of(client: KeepAlive) -> dict[str, Any]:
    status, body = client.get_json("/status")
    if status != 200:
        raise RuntimeError(f"/status answered {status}: {body}")
    return body if isinstance(body, dict) else {}


def slope_per_100(rounds: Sequence[float], values: Sequence[float]) -> float:
    """The least-squares slope of `values` over `rounds`, times 100 (nan with fewer than 3 samples)."""
    if len(rounds) < 3 or len(set(rounds)) < 2:
        return float("nan")
    return float(np.polyfit(np.asarray(rounds, dtype=float), np.asarray(values, dtype=float), 1)[0] * 100)


def end_growth(values: Sequence[float], ends: int = ENDS) -> float:
    """Median of the last `ends` values minus the median of the first `ends`."""
    if not values:
        return float("nan")
    k = max(1, min(ends, len(values) // 2))
    return float(np.median(values[-k:]) - np.median(values[:k]))


class Soak:
    def __init__(self, args: argparse.Namespace, results: Results) -> None:
        self.args = args
        self.results = results
        self.processes = Processes()
        self.directory = Path(tempfile.mkdtemp(prefix="xaind-soak-", dir=args.tmp_dir))
        self.cluster = Cluster(
            self.directory,
            federated_learning={"rounds": args.rounds, **FEDERATED_LEARNING},
            aggregator_limits={"max_upload_bytes": int(args.model_mb * MB) + MB},
        )
        self.honest = [Honest(t, n, r, i) for i, (t, n, r) in enumerate(LAYOUT)]
        self.agents: LineProcess | None = None
        self.samples: list[Sample] = []
        self.restarts = 0

    @property
    def model_size(self) -> str:
        return f"{self.args.model_mb}MB"

    @property
    def elements(self) -> int:
        from xaind.tools.dummy_participants import MODEL_SIZES

        return max(1, MODEL_SIZES[self.model_size] // 4)

    def start_honest(self, honest: Honest) -> None:
        from xaind.tools.daemons import dummy_participants_command

        port = self.cluster.coord_http if honest.transport == "http" else self.cluster.coord_pb
        url = f"{honest.transport}://127.0.0.1:{port}"
        output = open(self.directory / f"dummy-{honest.index}-{len(honest.outputs)}.out", "w+", encoding="utf-8")
        honest.outputs.append(output)
        honest.process = self.processes.start(f"xain-dummy-participants #{honest.index}", [
            *dummy_participants_command(),
            "--number-of-participants", str(honest.count),
            "--heartbeat-period", str(HEARTBEAT_PERIOD[honest.transport]),
            "--model-size", self.model_size,
            "--coordinator-url", url,
            "--transport", honest.transport,
        ], stdout=output, stderr=output)

    def restart_next(self) -> None:
        candidates = [h for h in self.honest if h.restarted]
        honest = candidates[self.restarts % len(candidates)]
        self.restarts += 1
        assert honest.process is not None
        if honest.process.poll() is None:
            honest.process.send_signal(signal.SIGKILL)
            honest.process.wait(10)
            honest.kills += 1
        self.start_honest(honest)

    def sample(self, round_number: int, coordinator: KeepAlive, aggregator: KeepAlive, started: float) -> Sample:
        daemons = {"coordinator": self.cluster.coordinator, "aggregator": self.cluster.aggregator}
        sample = Sample(
            round=round_number,
            seconds=time.monotonic() - started,
            rss_kb={name: read_status_kb(d.pid).get("VmRSS", 0) for name, d in daemons.items()},
            fds={name: open_fds(d.pid) for name, d in daemons.items()},
            fd_kinds={name: descriptor_kinds(d.pid, self.listeners(name)) for name, d in daemons.items()},
            state_files={name: count_files(self.directory / f"{name}-state") for name in daemons},
            log_bytes={name: d.log_path.stat().st_size if d.log_path.exists() else 0 for name, d in daemons.items()},
            coordinator_status=status_of(coordinator),
            aggregator_status=status_of(aggregator),
        )
        self.samples.append(sample)
        with open(self.directory / "samples.jsonl", "a", encoding="utf-8") as stream:
            stream.write(json.dumps(dataclasses.asdict(sample)) + "\n")
        return sample

    def listeners(self, daemon: str) -> dict[str, int]:
        if daemon == "coordinator":
            return {"http": self.cluster.coord_http, "pb": self.cluster.coord_pb}
        return {"http": self.cluster.agg_http}

    def run(self) -> bool:
        args = self.args
        started = time.monotonic()
        deadline = started + args.time_limit
        self.cluster.start()
        log(f"soak: daemons up (coordinator pid {self.cluster.coordinator.pid}, aggregator pid {self.cluster.aggregator.pid}), "
            f"{args.rounds} rounds, {sum(n for _, n, _ in LAYOUT)} honest participants, model {self.model_size}")
        for honest in self.honest:
            self.start_honest(honest)
        self.agents = LineProcess(self.processes, "soak agents", python_module_command(
            "soak_agents", "--port", str(self.cluster.coord_http), "--elements", str(self.elements),
            "--max-seconds", str(args.time_limit), "--dropout-pause", str(DROPOUT_PAUSE)))
        coordinator = KeepAlive(self.cluster.coord_http, timeout=10)
        aggregator = KeepAlive(self.cluster.agg_http, timeout=10)
        next_restart = time.monotonic() + args.restart_period
        last_round = -1
        next_sample = args.warmup
        status: dict[str, Any] = {}
        try:
            for _ in range(int(args.time_limit / STATUS_POLL) + 1):  # bounded in count and by the deadline
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the training did not complete within {args.time_limit:.0f} s "
                                       f"(round {last_round} of {args.rounds}): {status}")
                for daemon in (self.cluster.coordinator, self.cluster.aggregator):
                    if daemon.process.poll() is not None:
                        raise RuntimeError(f"{daemon.name} exited with {daemon.process.returncode}: "
                                           f"{daemon.log_text.splitlines()[-5:]}")
                status = status_of(coordinator)
                round_number = int(status.get("round", 0))
                if status.get("phase") == "complete":
                    break
                self.check_honest_running()
                if round_number != last_round:
                    if round_number // 20 != last_round // 20:
                        log(f"soak: round {round_number} after {time.monotonic() - started:.0f} s ({status.get('participants')})")
                    if round_number >= next_sample:  # rounds may pass between two polls: the first one seen
                        self.sample(round_number, coordinator, aggregator, started)
                        while next_sample <= round_number:  # bounded: round_number / sample_every steps at most
                            next_sample += args.sample_every
                    last_round = round_number
                if time.monotonic() >= next_restart and round_number < args.rounds - 3:
                    self.restart_next()
                    next_restart = time.monotonic() + args.restart_period
                time.sleep(STATUS_POLL)
            else:
                raise TimeoutError(f"the training did not complete within {args.time_limit:.0f} s")
            training_s = time.monotonic() - started
            log(f"soak: training complete after {training_s:.0f} s")
            self.agents.send("stop")
            counts = self.agents.expect("counts", timeout=60)  # each agent thread joined within 25 s
            exits = self.wait_honest(min(60.0, max(5.0, deadline - time.monotonic())))
            after = self.sample(args.rounds, coordinator, aggregator, started)
            self.samples.pop()  # idle after training: reported, not part of the slopes
            return self.report(training_s, counts, exits, after, status)
        finally:
            coordinator.close()
            aggregator.close()

    def check_honest_running(self) -> None:
        """Raise if a participant process ended before the training did (it cannot have been told `finish`)."""
        for honest in self.honest:
            if honest.process is not None and honest.process.poll() is not None:
                output = honest.outputs[-1]
                output.flush()
                tail = (self.directory / Path(output.name).name).read_text(encoding="utf-8", errors="replace")
                raise RuntimeError(f"xain-dummy-participants #{honest.index} exited with {honest.process.returncode} "
                                   f"before the training completed: {tail.strip().splitlines()[-3:]}")

    def wait_honest(self, timeout: float) -> dict[int, int | None]:
        end = time.monotonic() + timeout
        for _ in range(int(timeout / 0.1) + 1):  # bounded
            if all(h.process is None or h.process.poll() is not None for h in self.honest) or time.monotonic() > end:
                break
            time.sleep(0.1)
        return {h.index: (h.process.poll() if h.process is not None else None) for h in self.honest}

    def report(self, training_s: float, counts: dict[str, Any], exits: dict[int, int | None], after: Sample,
               status: dict[str, Any]) -> bool:
        args = self.args
        failures: list[str] = []
        samples = self.samples
        if len(samples) < 3:
            failures.append(f"only {len(samples)} samples after the warm-up")
        rounds = [s.round for s in samples]
        ok = True
        for name in ("coordinator", "aggregator"):
            rss_mib = [s.rss_kb[name] / 1024 for s in samples]
            fds = [s.fds[name] for s in samples]
            files = [s.state_files[name] for s in samples]
            rss_slope = slope_per_100(rounds, rss_mib)
            fd_slope = slope_per_100(rounds, fds)
            fd_growth = end_growth(fds)
            file_growth = end_growth(files)
            rss_ok = not rss_slope > args.rss_tolerance and rss_slope == rss_slope
            fd_ok = not fd_growth > args.fd_tolerance and fd_growth == fd_growth
            files_ok = not file_growth > 4 and file_growth == file_growth
            first, last = (samples[0], samples[-1]) if samples else (after, after)
            self.results.emit("soak", {
                "daemon": name,
                "rounds": args.rounds,
                "samples": len(samples),
                "from_round": first.round,
                "to_round": last.round,
                "rss_warm_mib": first.rss_kb[name] / 1024,
                "rss_end_mib": last.rss_kb[name] / 1024,
                "rss_min_mib": min(rss_mib, default=float("nan")),
                "rss_max_mib": max(rss_mib, default=float("nan")),
                "rss_slope_mib_per_100_rounds": rss_slope,
                "rss_tolerance_mib": args.rss_tolerance,
                "fds_warm": first.fds[name],
                "fds_end": last.fds[name],
                "fds_min": min(fds, default=-1),
                "fds_max": max(fds, default=-1),
                "fds_growth": fd_growth,
                "fds_slope_per_100_rounds": fd_slope,
                "fds_tolerance": args.fd_tolerance,
                "state_files_warm": first.state_files[name],
                "state_files_end": last.state_files[name],
                "log_mb_per_100_rounds": slope_per_100(rounds, [s.log_bytes[name] / MB for s in samples]),
                "rss_after_training_mib": after.rss_kb[name] / 1024,
                "fds_after_training": after.fds[name],
                "ok": rss_ok and fd_ok and files_ok,
            }, Row(f"soak {name} RSS / fds per 100 rounds", f"{fmt(rss_slope)} MiB / {fmt(fd_slope)} fds",
                   f"{fmt(first.rss_kb[name] / 1024)} MiB, {first.fds[name]} fds at round {first.round}", "-",
                   f"<={args.rss_tolerance} MiB, fds +{args.fd_tolerance}", rss_ok and fd_ok and files_ok))
            kinds = sorted({k for s in samples for k in s.fd_kinds[name]})
            kind_growth = {k: end_growth([s.fd_kinds[name].get(k, 0) for s in samples]) for k in kinds}
            self.results.emit("soak_fds", {
                "daemon": name,
                **{f"{k}_warm": first.fd_kinds[name].get(k, 0) for k in kinds},
                **{f"{k}_end": last.fd_kinds[name].get(k, 0) for k in kinds},
                **{f"{k}_growth": kind_growth[k] for k in kinds},
            })
            if not rss_ok:
                failures.append(f"{name} RSS grows {fmt(rss_slope)} MiB per 100 rounds (tolerance {args.rss_tolerance})")
            if not fd_ok:
                failures.append(f"{name} descriptors grow by {fmt(fd_growth)} ({first.fds[name]} -> {last.fds[name]}; "
                                f"tolerance {args.fd_tolerance}; by kind: {kind_growth})")
            if not files_ok:
                failures.append(f"{name} state directory grows by {fmt(file_growth)} files")
        first_status = samples[0] if samples else after
        self.results.emit("soak_status", {
            "coordinator_warm": first_status.coordinator_status.get("participants"),
            "coordinator_end": samples[-1].coordinator_status.get("participants") if samples else None,
            "aggregator_warm": {k: first_status.aggregator_status.get(k) for k in ("admitted", "uploading", "accepted")},
            "aggregator_end": {k: samples[-1].aggregator_status.get(k) for k in ("admitted", "uploading", "accepted")}
            if samples else None,
        })
        model = self.check_model()
        if not model["ok"]:
            failures.append(f"final global model: {model}")
        garbage_refused = int(counts.get("garbage_refused", 0))
        garbage_unexpected = int(counts.get("garbage_unexpected", 0))
        dropouts = int(counts.get("dropout_silent", 0))
        valid_after = int(counts.get("garbage_then_valid_accepted", 0))
        valid_other = sum(int(v) for k, v in counts.items() if k.startswith("garbage_then_valid_") and k != "garbage_then_valid_accepted")
        kills = sum(h.kills for h in self.honest)
        honest_exits = {h.index: exits.get(h.index) for h in self.honest}
        problems = [line for line in self.cluster.problems() if "Traceback" in line or "#critical]" in line]
        self.results.emit("soak_misbehaviour", {
            "training_s": training_s,
            "s_per_round": training_s / args.rounds,
            "final_round": status.get("round"),
            "restarts": kills,
            "dropouts": dropouts,
            "garbage_refused_4xx": garbage_refused,
            "garbage_unexpected": garbage_unexpected,
            "valid_after_garbage_accepted": valid_after,
            "valid_after_garbage_other": valid_other,
            "agent_errors": len(counts.get("errors", [])),
            "honest_exit_codes": ",".join(f"{k}:{v}" for k, v in honest_exits.items()),
            "tracebacks_or_critical": len(problems),
            "counts": ",".join(f"{k}:{v}" for k, v in sorted(counts.items()) if k != "errors"),
        })
        if dropouts == 0 or garbage_refused == 0 or (kills == 0 and args.rounds >= 30):
            failures.append(f"the misbehaviour did not happen: {dropouts} dropouts, {garbage_refused} garbage refusals, {kills} restarts")
        if garbage_unexpected or valid_other or counts.get("errors"):
            failures.append(f"misbehaving agents saw unexpected answers: {counts}")
        if any(code != 0 for code in honest_exits.values()):
            failures.append(f"honest participant processes exited with {honest_exits}")
        if problems:
            failures.append(f"{len(problems)} traceback/critical line(s) in the daemons' logs, e.g. {problems[:3]}")
        for failure in failures:
            self.results.failed("soak", failure)
        return not failures

    def check_model(self) -> dict[str, Any]:
        weights = np.linspace(-1.0, 1.0, self.elements, dtype=np.float32)
        model_round, path = committed_model(self.directory / "aggregator-state")
        model = np.load(path, allow_pickle=False)
        finite = bool(np.isfinite(model).all()) if model.dtype.kind == "f" else False
        close = check_weighted_average(path, [(1, weights)])
        ok = (model_round == self.args.rounds and model.dtype.kind == "f" and model.shape == weights.shape and finite
              and bool(close["ok"]))
        fields = {"model_round": model_round, "dtype": model.dtype.str, "shape": "x".join(map(str, model.shape)),
                  "finite": finite, "max_ulps_from_upload": close["max_ulps"], "ok": ok}
        self.results.emit("soak_model", fields, Row("soak final global model", f"{model.dtype.str} {model.shape}",
                                                   "the uploaded weights", "-", "finite, <=1 ulp", ok))
        return fields

    def close(self) -> None:
        with shielded():
            if self.agents is not None:
                self.agents.send("stop")
            self.processes.close()
            self.cluster.stop()
            for honest in self.honest:
                for output in honest.outputs:
                    output.close()
            if self.args.keep:
                log(f"soak: kept {self.directory}")
            else:
                shutil.rmtree(self.directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 rounds, warm-up 5, a sample every round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the training (default 200)")
    parser.add_argument("--model-mb", type=int, choices=(1, 5, 10), default=1, help="model size in MB (default 1)")
    parser.add_argument("--warmup", type=int, default=None, help="rounds before the first sample (default 20)")
    parser.add_argument("--sample-every", type=int, default=None, help="rounds between samples (default 5)")
    parser.add_argument("--rss-tolerance", type=float, default=None,
                        help="MiB per 100 rounds (least-squares slope; default 4, with --quick 8)")
    parser.add_argument("--fd-tolerance", type=int, default=12, help="descriptors more at the end than after the warm-up")
    parser.add_argument("--restart-period", type=float, default=10.0, help="seconds between kills of a participant process")
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds the training may take")
    parser.add_argument("--no-save", action="store_true", help="do not append to bench/results/<date>.jsonl")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, state)")
    parser.add_argument("--tmp-dir", default=None, help="parent of the temporary directory (default: $TMPDIR or /tmp)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (30 if args.quick else 200)
    args.warmup = args.warmup if args.warmup is not None else (5 if args.quick else min(20, args.rounds // 4))
    args.sample_every = args.sample_every or (1 if args.quick else max(1, min(5, (args.rounds - args.warmup) // 20)))
    if args.rounds < 20 or not 0 <= args.warmup <= args.rounds - 10 * args.sample_every:
        parser.error("--rounds must be >= 20 and leave room for 10 samples after --warmup")
    for option, value in (("--rss-tolerance", args.rss_tolerance), ("--fd-tolerance", args.fd_tolerance)):
        if value is not None and value < 0:
            parser.error(f"{option} must be >= 0, not {value}")
    for option, value in (("--restart-period", args.restart_period), ("--time-limit", args.time_limit)):
        if not value > 0:
            parser.error(f"{option} must be > 0, not {value}")
    if args.rss_tolerance is None:
        # 25 rounds after a warm-up of 5 still see the allocator settle: a coarser verdict.
        args.rss_tolerance = 8.0 if args.quick else 4.0
    if args.quick:
        args.restart_period = min(args.restart_period, 8.0)
    install_signal_handlers()
    path = None if args.no_save else RESULTS_DIR / f"{time.strftime('%Y-%m-%d')}.jsonl"
    results = Results(path, args.quick)
    soak = Soak(args, results)
    ok = False
    try:
        ok = soak.run()
    except KeyboardInterrupt as interrupt:
        log(f"soak interrupted ({'signal' if isinstance(interrupt, Interrupted) else 'Ctrl-C'}): everything started is stopped")
        return 130
    except Exception as error:  # noqa: BLE001 - reported, then exit 1
        results.failed("soak", error)
    finally:
        soak.close()
    print(results.table())
    for failure in results.failures:
        print(f"FAILED: {failure}")
    return 0 if ok and not results.failures else 1


if __name__ == "__main__":
    sys.exit(main())
