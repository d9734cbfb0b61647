"""Heartbeat load generator: P participants on P keep-alive connections, in one asyncio process.

Driven by the benchmark through stdin/stdout lines (one command at a time):

- at start: opens P connections to 127.0.0.1:PORT and has each participant
  rendez-vous over its own connection, then prints
  `registered {"participants": P, "seconds": s}`. Two variants:
  `--register-connections C` has the P participants rendez-vous over C
  shared connections instead (one rendez-vous at a time on each), and
  `--no-connections` then opens no connection per participant (a
  registration only: the coordinator's memory per known participant,
  without the connections'); `--ids-in FILE` (repeatable) takes
  participants registered earlier (ids one a line, as `--ids-out FILE`
  writes them) and only opens their connections;
- `closed SECONDS`: closed loop, every participant sends its next heartbeat
  as soon as the previous one is answered, for SECONDS; prints
  `closed {...}` with the count, rate and latency percentiles;
- `open RATE MAX_SECONDS`: open loop, participant i beats every P/RATE
  seconds, phase-shifted by i/RATE, so the coordinator is offered RATE
  heartbeats per second; a participant whose answer is late sends its next
  beat when the answer arrives (never two outstanding on one connection).
  Runs until `stop` or MAX_SECONDS, then saves the records (scheduled time,
  send time, answer time, ok) as a .npy array in OUT and prints `open {...}`;
- `quit` (or end of stdin, SIGTERM, SIGINT): closes everything and exits.

Times are `time.monotonic()` (CLOCK_MONOTONIC), comparable with the
driver's. The HTTP client is hand-written (one request line out, status +
Content-Length body in) so that the generator costs little CPU per request.

The process raises its soft open-file limit (up to the hard one) for its
connections.

    python -m bench.hbload --port 8081 --participants 1000 --out /tmp/records.npy
    python -m bench.hbload --port 8081 --participants 9000 --register-connections 8 --no-connections --ids-out /tmp/ids
    python -m bench.hbload --port 8081 --ids-in /tmp/ids --out /tmp/records.npy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import sys
import threading
import time
from typing import Any

import numpy as np

HOST = "127.0.0.1"
#: Longest any command may run, whatever it asks (s).
MAX_COMMAND_SECONDS = 900.0


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request outstanding."""

    def __init__(self, on_answer: Any) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.on_answer = on_answer  # (connection, status, body)
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        for _ in range(1000):  # bounded: one answer per turn
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buffer[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15 : head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None]) if at >= 0 else 0
            total = end + 4 + length
            if len(buffer) < total:
                break
            status = int(buffer[9:12])
            body = buffer[end + 4 : total]
            buffer = buffer[total:]
            self.on_answer(self, status, body)
        self.buffer = buffer

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self.on_answer(self, 0, b"")


class Participant:
    __slots__ = ("index", "connection", "request", "sched", "sent", "pending", "id", "timer")

    def __init__(self, index: int) -> None:
        self.index = index
        self.connection: Connection | None = None
        self.request = b""
        self.sched = 0.0
        self.sent = 0.0
        self.pending = False
        self.id = ""
        #: The next scheduled send of an open loop (cancelled when the loop ends, so that none fires in the next one).
        self.timer: asyncio.TimerHandle | None = None


class Load:
    def __init__(self, port: int, participants: int) -> None:
        self.port = port
        self.loop = asyncio.get_running_loop()
        self.participants = [Participant(i) for i in range(participants)]
        self.by_connection: dict[Connection, Participant] = {}
        self.mode = "idle"
        self.records: list[tuple[float, float, float, int]] = []
        self.errors = 0
        self.period = 1.0
        self.end = 0.0
        self.finished: asyncio.Future[None] | None = None
        self.rendezvous_waiters: dict[Participant, asyncio.Future[bytes]] = {}

    # -- answers ------------------------------------------------------------

    def answer(self, connection: Connection, status: int, body: bytes) -> None:
        participant = self.by_connection.get(connection)
        if participant is None:
            return
        waiter = self.rendezvous_waiters.pop(participant, None)
        if waiter is not None:
            if status == 200:
                waiter.set_result(body)
            else:
                waiter.set_exception(RuntimeError(f"rendez-vous answered {status}: {body[:200]!r}"))
            return
        if not participant.pending:
            return
        participant.pending = False
        now = time.monotonic()
        ok = 1 if status == 200 and body.startswith(b'{"state"') else 0
        if not ok:
            self.errors += 1
        self.records.append((participant.sched, participant.sent, now, ok))
        if status == 0:
            self.check_done()
            return  # connection lost: this participant stops
        if self.mode == "closed":
            if now < self.end:
                participant.sched = now
                self.send(participant)
            else:
                self.check_done()
        elif self.mode == "open":
            participant.sched += self.period
            if participant.sched >= self.end:
                self.check_done()
            elif participant.sched <= now:
                self.send(participant)
            else:
                participant.timer = self.loop.call_at(participant.sched, self.send, participant)
        else:
            self.check_done()

    def send(self, participant: Participant) -> None:
        if self.mode not in ("open", "closed") or participant.pending:
            return
        if self.mode == "open" and participant.sched >= self.end:
            self.check_done()
            return
        connection = participant.connection
        if connection is None or connection.transport is None or connection.transport.is_closing():
            return
        participant.pending = True
        participant.sent = time.monotonic()
        connection.transport.write(participant.request)

    def check_done(self) -> None:
        if self.finished is not None and not self.finished.done() and not any(p.pending for p in self.participants):
            self.finished.set_result(None)

    # -- phases -----------------------------------------------------------------

    async def connect(self) -> None:
        """One keep-alive connection per participant."""
        for participant in self.participants:  # bounded by the participant count
            _, connection = await self.loop.create_connection(lambda: Connection(self.answer), HOST, self.port)
            participant.connection = connection
            self.by_connection[connection] = participant

    def identify(self, participant: Participant, participant_id: str) -> None:
        participant.id = participant_id
        participant.request = f"GET /heartbeat/{participant_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()

    async def register(self, register_connections: int = 0, connect: bool = True) -> dict[str, Any]:
        """Rendez-vous of every participant: over its own connection, or over `register_connections` shared ones."""
        started = time.monotonic()
        if register_connections <= 0:
            await self.connect()

            async def rendez_vous(participant: Participant) -> None:
                waiter = self.loop.create_future()
                self.rendezvous_waiters[participant] = waiter
                participant.connection.transport.write(b"GET /rendez_vous HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                body = await asyncio.wait_for(waiter, 60)
                self.identify(participant, json.loads(body)["id"])

            for start in range(0, len(self.participants), 50):  # 50 at a time
                await asyncio.gather(*(rendez_vous(p) for p in self.participants[start : start + 50]))
        else:
            await asyncio.gather(*(self.register_over_one(self.participants[k::register_connections])
                                   for k in range(min(register_connections, len(self.participants)))))
            if connect:
                await self.connect()
        return {"participants": len(self.participants), "seconds": time.monotonic() - started}

    async def register_over_one(self, participants: list[Participant]) -> None:
        """Rendez-vous of `participants` one after the other over one connection of their own, closed afterwards."""
        answers: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        _, connection = await self.loop.create_connection(
            lambda: Connection(lambda _c, status, body: answers.put_nowait((status, body))), HOST, self.port)
        try:
            for participant in participants:  # bounded by the list
                connection.transport.write(b"GET /rendez_vous HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                status, body = await asyncio.wait_for(answers.get(), 60)
                if status != 200:
                    raise RuntimeError(f"rendez-vous answered {status}: {body[:200]!r}")
                self.identify(participant, json.loads(body)["id"])
        finally:
            connection.transport.close()

    async def reuse(self, ids: list[str]) -> dict[str, Any]:
        """Participants registered earlier (by another run of this generator): only their connections are opened."""
        started = time.monotonic()
        for participant, participant_id in zip(self.participants, ids):
            self.identify(participant, participant_id)
        await self.connect()
        return {"participants": len(self.participants), "seconds": time.monotonic() - started, "reused": True}

    async def closed(self, seconds: float) -> dict[str, Any]:
        self.records = []
        self.errors = 0
        self.mode = "closed"
        started = time.monotonic()
        cpu = time.process_time()
        self.end = started + min(seconds, MAX_COMMAND_SECONDS)
        self.finished = self.loop.create_future()
        for participant in self.participants:
            participant.sched = started
            self.send(participant)
        await asyncio.wait_for(self.finished, min(seconds, MAX_COMMAND_SECONDS) + 60)
        elapsed = time.monotonic() - started
        self.mode = "idle"
        records = np.asarray(self.records, dtype=float).reshape(-1, 4)
        in_window = records[records[:, 2] <= self.end] if records.size else records
        latency = (in_window[:, 2] - in_window[:, 1]) * 1000 if in_window.size else np.array([])
        return {
            "answered": int(len(in_window)),
            "seconds": self.end - started,
            "per_s": len(in_window) / (self.end - started),
            "p50_ms": float(np.percentile(latency, 50)) if latency.size else None,
            "p99_ms": float(np.percentile(latency, 99)) if latency.size else None,
            "errors": self.errors,
            "generator_cpu_share": (time.process_time() - cpu) / elapsed,
        }

    async def open(self, rate: float, max_seconds: float, stop: asyncio.Event, out: str) -> dict[str, Any]:
        self.records = []
        self.errors = 0
        self.mode = "open"
        count = len(self.participants)
        self.period = count / rate
        started = time.monotonic()
        cpu = time.process_time()
        self.end = started + min(max_seconds, MAX_COMMAND_SECONDS)
        self.finished = self.loop.create_future()
        for participant in self.participants:
            participant.sched = started + participant.index / rate
            participant.timer = self.loop.call_at(participant.sched, self.send, participant)
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([stopping, self.finished], timeout=min(max_seconds, MAX_COMMAND_SECONDS) + 60,
                           return_when=asyncio.FIRST_COMPLETED)
        stopped_at = time.monotonic()
        self.end = min(self.end, stopped_at)  # no new beats from now on
        self.check_done()
        if not self.finished.done():
            try:
                await asyncio.wait_for(self.finished, 60)  # the beats in flight
            except asyncio.TimeoutError:
                pass
        stopping.cancel()
        for participant in self.participants:
            if participant.timer is not None:
                participant.timer.cancel()
                participant.timer = None
        self.mode = "idle"
        elapsed = time.monotonic() - started
        records = np.asarray(self.records, dtype=float).reshape(-1, 4)
        np.save(out, records)
        return {"answered": int(len(records)), "seconds": stopped_at - started, "errors": self.errors,
                "generator_cpu_share": (time.process_time() - cpu) / elapsed, "out": out}

    def abort(self) -> None:
        """End the running phase now: no new beats; it ends when those in flight are answered."""
        self.end = min(self.end, time.monotonic())
        self.check_done()

    def close(self) -> None:
        for participant in self.participants:
            if participant.connection is not None and participant.connection.transport is not None:
                participant.connection.transport.close()


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()
    stop_open = asyncio.Event()

    def reader() -> None:
        for line in sys.stdin:  # ends with stdin
            loop.call_soon_threadsafe(commands.put_nowait, line.strip())
        loop.call_soon_threadsafe(commands.put_nowait, "quit")

    threading.Thread(target=reader, name="stdin", daemon=True).start()
    def say(kind: str, payload: dict[str, Any]) -> None:
        print(f"{kind} {json.dumps(payload)}", flush=True)

    ids: list[str] = []
    for path in args.ids_in or []:
        with open(path, encoding="ascii") as stream:
            ids.extend(line.strip() for line in stream if line.strip())
    load = Load(args.port, len(ids) if ids else args.participants)

    def on_signal() -> None:
        commands.put_nowait("quit")
        stop_open.set()
        load.abort()
        loop.call_later(3.0, os._exit, 1)  # whatever is still waiting (a rendez-vous, say) does not hold the exit

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        if ids:
            say("registered", await load.reuse(ids))
        else:
            registered = await load.register(args.register_connections, connect=not args.no_connections)
            if args.ids_out:
                with open(args.ids_out, "w", encoding="ascii") as stream:
                    stream.write("".join(f"{p.id}\n" for p in load.participants))
            say("registered", registered)
        running: asyncio.Task[Any] | None = None
        for _ in range(10_000):  # bounded number of commands
            command = (await commands.get()).split()
            if not command:
                continue
            if command[0] == "quit":
                stop_open.set()
                if running is not None:
                    await running
                break
            if command[0] == "stop":
                stop_open.set()
                if running is not None:
                    say("open", await running)
                    running = None
            elif command[0] == "closed":
                say("closed", await load.closed(float(command[1])))
            elif command[0] == "open":
                stop_open.clear()
                running = asyncio.ensure_future(load.open(float(command[1]), float(command[2]), stop_open, args.out))
                say("opened", {"rate": float(command[1]), "t": time.monotonic()})
            else:
                say("error", {"unknown command": command})
    finally:
        load.close()
    return 0


def raise_open_file_limit(wanted: int) -> None:
    """This process's soft descriptor limit raised to `wanted`, at most to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--participants", type=int, default=1000)
    parser.add_argument("--out", default=os.devnull + ".npy")
    parser.add_argument("--register-connections", type=int, default=0,
                        help="rendez-vous over this many shared connections (default: each over its own)")
    parser.add_argument("--no-connections", action="store_true",
                        help="with --register-connections: open no connection per participant afterwards")
    parser.add_argument("--ids-out", default=None, help="write the registered participants' ids here, one a line")
    parser.add_argument("--ids-in", action="append", default=None,
                        help="participants registered earlier (ids one a line; repeatable): no rendez-vous")
    args = parser.parse_args(argv)
    raise_open_file_limit(args.participants + 256 if not args.ids_in else 1_000_000)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
