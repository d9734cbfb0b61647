"""How many connections a listener keeps open: in all, and from one source address.

Every open connection holds a file descriptor; a thousand slow sockets
used to lock every new participant out of a daemon with the common limit
of 1,024 descriptors (the header and body deadlines of
xaind/limited_channel.py end slow ones, this bounds how many there are
meanwhile). Each listener (both HTTP APIs, the coordinator's PB) counts its
connections; over a limit a new one is closed at once, an HTTP one after a
503 `too_many_connections` written without reading anything. The process
is given descriptors for its limits when it starts listening.

Why the defaults (`max_connections` 16,384, `max_connections_per_address`
12,288): a participant polling over HTTP holds a connection for most of
each period (its heartbeat is held up to `api.heartbeat_hold`), so 10,000
participants behind one NAT address hold up to 10,000 connections at once
and must all get in; the total leaves room for a few more such sites and
the aggregator's and operators' connections. Both are far above what an
attack needs to be noticed and far below what the kernel can hold.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import LogLevel
from twisted.spread import pb

from xaind.config import ConfigReader
from xaind.logs import RepeatedEventLog, get_logger
from xaind.no_delay import NoDelayBroker

log = get_logger("xaind.connection_limits")

#: Descriptors kept free beside the connections (state files, uploads, downloads' files, the log).
RESERVED_DESCRIPTORS = 1024
#: The most a limit may be set to: beyond, the process could not get the descriptors anyway.
MAX_CONNECTIONS_CEILING = 2**20


@dataclass(frozen=True)
class ConnectionLimits:
    #: Connections a listener keeps open at once; a new one beyond is closed at once.
    max_connections: int = 16384
    #: Connections one source address may hold open on a listener.
    max_connections_per_address: int = 12288


def read_connection_limits(section: ConfigReader) -> ConnectionLimits:
    """The limits from a listener's section (`api` or `pb`); problems are recorded on its keys."""
    defaults = ConnectionLimits()
    return ConnectionLimits(
        max_connections=section.integer("max_connections", defaults.max_connections, minimum=1, maximum=MAX_CONNECTIONS_CEILING),
        max_connections_per_address=section.integer(
            "max_connections_per_address", defaults.max_connections_per_address, minimum=1, maximum=MAX_CONNECTIONS_CEILING
        ),
    )


def address_key(address: IAddress | Any) -> str:
    """What connections are counted by: the host of an IP address, the whole address otherwise (UNIX sockets)."""
    host = getattr(address, "host", None)
    return host if isinstance(host, str) else "local"


_descriptors_wanted = RESERVED_DESCRIPTORS


def make_room_for(connections: int) -> None:
    """Raise this process's soft descriptor limit for `connections` more, up to the hard limit.

    Called once per listener when it starts; says (info: the daemon works, it
    is a capacity note) if the hard limit is lower, so an operator knows
    which limit binds first.
    """
    global _descriptors_wanted
    _descriptors_wanted += connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _descriptors_wanted if hard == resource.RLIM_INFINITY else min(_descriptors_wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as error:
            log.warn("cannot raise the open-file limit from {soft} to {wanted}: {error}", soft=soft, wanted=wanted, error=error)
            return
    if hard != resource.RLIM_INFINITY and hard < _descriptors_wanted:
        log.info(
            "the open-file limit ({hard}) is below the configured connections and {reserved} more: "
            "new connections fail once it is reached (raise LimitNOFILE, or lower max_connections)",
            hard=hard,
            reserved=RESERVED_DESCRIPTORS,
        )


class ConnectionCounter:
    """The open connections of one listener, by source address; refusals logged once per interval with a count."""

    def __init__(self, what: str, limits: ConnectionLimits, clock: IReactorTime) -> None:
        self.what = what
        self.limits = limits
        self.open = 0
        self.by_address: dict[str, int] = {}
        self.refusals = RepeatedEventLog(log, clock)

    def admit(self, address: str) -> bool:
        """Count a new connection from `address`, or refuse it (False) if a limit is reached."""
        held = self.by_address.get(address, 0)
        if self.open >= self.limits.max_connections:
            self.refusals.emit(
                "total",
                LogLevel.warn,
                "{what}: refused a connection from {address}: {limit} connections open (max_connections)",
                what=self.what,
                address=address,
                limit=self.open,
            )
            return False
        if held >= self.limits.max_connections_per_address:
            self.refusals.emit(
                "address",
                LogLevel.warn,
                "{what}: refused a connection from {address}: it holds {limit} (max_connections_per_address)",
                what=self.what,
                address=address,
                limit=held,
            )
            return False
        self.open += 1
        self.by_address[address] = held + 1
        return True

    def release(self, address: str) -> None:
        held = self.by_address.get(address, 0)
        if held <= 0:
            return
        self.open -= 1
        if held == 1:
            del self.by_address[address]
        else:
            self.by_address[address] = held - 1

    def stop(self) -> None:
        self.refusals.stop()


class LimitedPBServerFactory(pb.PBServerFactory):
    """A PB server factory that refuses connections beyond its `ConnectionLimits` (closed at once: PB has no cheap answer)."""

    protocol = NoDelayBroker

    def __init__(self, root: Any, limits: ConnectionLimits, clock: IReactorTime, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.connections = ConnectionCounter("PB", limits, clock)

    def startFactory(self) -> None:
        make_room_for(self.connections.limits.max_connections)
        super().startFactory()

    def stopFactory(self) -> None:
        self.connections.stop()
        super().stopFactory()

    def buildProtocol(self, addr: IAddress) -> pb.Broker | None:
        key = address_key(addr)
        if not self.connections.admit(key):
            return None
        broker: pb.Broker = super().buildProtocol(addr)
        broker.notifyOnDisconnect(lambda: self.connections.release(key))
        return broker
