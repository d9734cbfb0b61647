"""Floors measured in the same run: loopback TCP throughput, and numpy summing N arrays.

- Loopback: a raw TCP socket pair on 127.0.0.1 between this process (the
  receiver, `recv_into` a reused 4 MiB buffer) and a sender *process*
  (`sendall` of a reused 4 MiB buffer), as between a daemon and its client;
  the best of a few transfers, timed from the first byte to the end of
  stream. Nothing is cheaper for moving bytes between two processes here.
- Aggregation: numpy adding N float32 arrays of M bytes into a float64
  accumulator (`np.add(acc, x, out=acc)`, the first one copied in), distinct
  arrays up to ~1 GB and cycled beyond; the best of a few repetitions.

    .venv/bin/python -m bench.floors [--quick]
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from dataclasses import dataclass

import numpy as np

from bench.common import HOST, MB, Processes, fmt, log

_SENDER = r"""
import socket, sys
port, total, repeats = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
buffer = memoryview(bytearray(4 << 20))
for _ in range(repeats):
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        left = total
        while left > 0:
            n = min(left, len(buffer))
            sock.sendall(buffer[:n])
            left -= n
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # the receiver's go-ahead for the next transfer
"""


@dataclass
class Loopback:
    bytes_per_transfer: int
    seconds: list[float]

    @property
    def best_gbps(self) -> float:
        return self.bytes_per_transfer / min(self.seconds) / 1e9

    @property
    def median_gbps(self) -> float:
        return self.bytes_per_transfer / float(np.median(self.seconds)) / 1e9

    def time_for(self, nbytes: float) -> float:
        """Seconds to move `nbytes` at the best measured throughput."""
        return nbytes / (self.best_gbps * 1e9)


def loopback(total_bytes: int = 2_000_000_000, repeats: int = 3, timeout: float = 120.0) -> Loopback:
    processes = Processes()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((HOST, 0))
        listener.listen(1)
        listener.settimeout(timeout)
        port = listener.getsockname()[1]
        sender = processes.start("loopback sender", [sys.executable, "-c", _SENDER, str(port), str(total_bytes), str(repeats)])
        buffer = memoryview(bytearray(4 << 20))
        seconds = []
        for _ in range(repeats):
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(timeout)
                received = connection.recv_into(buffer)
                started = time.perf_counter()
                for _ in range(total_bytes // 4096 + 2):  # bounded: each recv returns >= 1 byte until EOF
                    got = connection.recv_into(buffer)
                    if not got:
                        break
                    received += got
                elapsed = time.perf_counter() - started
                connection.sendall(b"k")
            if received != total_bytes:
                raise RuntimeError(f"loopback: received {received} of {total_bytes} bytes")
            seconds.append(elapsed)
        sender.wait(10)
        return Loopback(total_bytes, seconds)
    finally:
        listener.close()
        processes.close()


def numpy_sum_seconds(participants: int, model_bytes: int, repeats: int = 3, distinct_bytes: int = 1_000_000_000) -> float:
    """Best time for numpy to sum `participants` float32 arrays of `model_bytes` into a float64 sum."""
    elements = max(1, model_bytes // 4)
    distinct = max(1, min(participants, distinct_bytes // max(model_bytes, 1)))
    arrays = [np.full(elements, 1.0 + i / 7.0, dtype=np.float32) for i in range(distinct)]
    total = np.empty(elements, dtype=np.float64)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        total[...] = arrays[0]
        for k in range(1, participants):
            np.add(total, arrays[k % distinct], out=total)
        best = min(best, time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    lb = loopback(1_000_000_000 if args.quick else 2_000_000_000)
    print(f"loopback best {fmt(lb.best_gbps)} GB/s, median {fmt(lb.median_gbps)} GB/s ({[fmt(s) for s in lb.seconds]} s)")
    for n in (10, 50):
        for m in (1, 10, 100):
            log(f"numpy sum {n} x {m} MB: {fmt(numpy_sum_seconds(n, m * MB) * 1000)} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
