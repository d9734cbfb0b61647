"""Flood a coordinator with rendez-vous from one address, as an attacker would: `python -m xaind.tools.rendez_vous_flood PORT COUNT SECONDS`.

Pipelines `BATCH` `GET /rendez_vous` at a time on `CONNECTIONS` keep-alive
connections to 127.0.0.1:PORT until COUNT were answered or SECONDS passed,
never heartbeating (the fakes expire), and prints one JSON line: answers
by status and the seconds taken. Used by tests/test_rendez_vous_flood.py
and bench/flood.py, in a process of its own so that it competes with the
coordinator for the CPU, not with the measuring client for a GIL.
"""

from __future__ import annotations

import json
import re
import selectors
import socket
import sys
import time
from collections import Counter

BATCH = 50
CONNECTIONS = 4
REQUEST = b"GET /rendez_vous HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")


def flood(port: int, count: int, seconds: float) -> dict[str, object]:
    statuses: Counter[str] = Counter()
    started = time.monotonic()
    deadline = started + seconds
    selector = selectors.DefaultSelector()
    outstanding: dict[socket.socket, int] = {}
    pending: dict[socket.socket, bytes] = {}
    asked = 0
    for _ in range(CONNECTIONS):
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.setblocking(False)
        selector.register(client, selectors.EVENT_READ)
        outstanding[client] = 0
        pending[client] = b""
    answered = 0
    closed = 0
    try:
        while answered < count and time.monotonic() < deadline and len(outstanding) > closed:
            for client, waiting in list(outstanding.items()):
                if waiting == 0 and asked < count:
                    batch = min(BATCH, count - asked)
                    client.sendall(REQUEST * batch)
                    outstanding[client] = batch
                    asked += batch
            for key, _ in selector.select(timeout=1.0):
                client = key.fileobj  # type: ignore[assignment]
                try:
                    data = client.recv(1 << 20)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                if not data:
                    selector.unregister(client)
                    closed += 1
                    statuses["closed"] += 1
                    continue
                text = pending[client] + data
                found = list(STATUS.finditer(text))
                # Keep what follows the last status line: another may be split between reads.
                last_end = found[-1].end() if found else 0
                pending[client] = text[max(last_end, len(text) - 16) :]
                for match in found:
                    statuses[match.group(1).decode()] += 1
                answered += len(found)
                outstanding[client] = max(0, outstanding[client] - len(found))
    finally:
        for client in outstanding:
            client.close()
    return {"answered": answered, "statuses": dict(statuses), "seconds": round(time.monotonic() - started, 3)}


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    port, count, seconds = int(arguments[0]), int(arguments[1]), float(arguments[2])
    print(json.dumps(flood(port, count, seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
