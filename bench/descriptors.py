"""What a process's open descriptors are, from /proc: so that a soak that sees them grow can say which ones.

A bare count of /proc/<pid>/fd says that something leaks; this splits it
into connections accepted on each of the process's listening ports, its
outgoing connections, listening sockets, other sockets, pipes, files and
the rest, by matching each `socket:[inode]` with /proc/net/tcp{,6}.
Linux only, read-only, no third-party package.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping

#: /proc/net/tcp's state of a listening socket.
_TCP_LISTEN = "0A"


def tcp_sockets() -> dict[str, tuple[int, str]]:
    """inode -> (local port, state) of every TCP socket of this network namespace."""
    sockets: dict[str, tuple[int, str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as stream:
                lines = stream.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            sockets[fields[9]] = (local_port, fields[3])
    return sockets


def descriptor_kinds(pid: int, listeners: Mapping[str, int]) -> dict[str, int]:
    """Counts of a process's descriptors by kind: `in_<listener>` (accepted on that port), `out`, `listen`,
    `other_socket`, `pipe`, `file`, `other`; {} once the process is gone.

    `listeners` names the process's listening ports (name -> port).
    """
    by_port = {port: name for name, port in listeners.items()}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {}
    sockets = tcp_sockets()
    kinds: Counter[str] = Counter()
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            found = sockets.get(target[len("socket:["):-1])
            if found is None:
                kinds["other_socket"] += 1
            elif found[1] == _TCP_LISTEN:
                kinds["listen"] += 1
            elif found[0] in by_port:
                kinds[f"in_{by_port[found[0]]}"] += 1
            else:
                kinds["out"] += 1
        elif target.startswith("pipe:"):
            kinds["pipe"] += 1
        elif target.startswith("/"):
            kinds["file"] += 1
        else:
            kinds["other"] += 1
    return dict(kinds)
