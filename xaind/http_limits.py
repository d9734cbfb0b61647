"""What a client of either daemon's HTTP API may ask of it: body size and how slowly it may send.

On the open internet a client may send a body nobody asked for, or send
its request a byte at a time to keep a connection (and a file descriptor)
for as long as it likes; twisted.web bounds neither, its idle timeout
restarts with every byte. These limits bound both, the same way for the
coordinator and the aggregator (the `api` section of each daemon's
configuration; uploads to the aggregator have their own size limit,
`limits.max_upload_bytes`).

Why the defaults:

- `max_body_bytes` 4 KiB: no route but the aggregator's upload takes a
  body (the legacy participant never sends one elsewhere), so a body is
  only tolerated, never used; 4 KiB leaves room for clients that send a
  small one anyway.
- `header_timeout` 30 s from a request's first byte to its last header
  line: a request head is a few hundred bytes, one or two TCP segments;
  30 s covers the retransmissions of a lossy link (1 + 2 + 4 + 8 s of
  backoff) several times over and keeps a byte-a-second client from
  holding a connection past half a minute.
- `body_min_rate` 1 KiB/s averaged over `body_rate_window` 30 s: 8 kbit/s
  is a fifth of a GPRS link (about 40 kbit/s), so a participant on the
  poorest mobile link still gets through, and the 30 s window lets it
  stall for 20 s (a handover, a dead spot) as long as it catches up. A
  client under that rate would need over a day for a 100 MB model anyway.
- `max_connections` and `max_connections_per_address`: see
  xaind/connection_limits.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from xaind.config import ConfigReader
from xaind.connection_limits import ConnectionLimits, read_connection_limits

#: Largest `api.max_body_bytes` allowed: a tolerated body is read into memory.
MAX_BODY_BYTES_CEILING = 2**20


@dataclass(frozen=True)
class HTTPLimits:
    #: Bytes of body any request but an upload may carry; a larger one is refused with 413 before it is read.
    max_body_bytes: int = 4096
    #: Seconds from a request's first byte until its headers must be complete (408 after).
    header_timeout: float = 30.0
    #: Bytes per second a body (an upload included) must average over each `body_rate_window` (408 below).
    body_min_rate: float = 1024.0
    #: Seconds over which the body rate is measured.
    body_rate_window: float = 30.0
    #: Connections the HTTP listener keeps open at once (a new one beyond: 503 and closed).
    max_connections: int = ConnectionLimits.max_connections
    #: Connections one source address may hold open on the HTTP listener.
    max_connections_per_address: int = ConnectionLimits.max_connections_per_address

    @property
    def connections(self) -> ConnectionLimits:
        return ConnectionLimits(self.max_connections, self.max_connections_per_address)


def read_http_limits(api: ConfigReader) -> HTTPLimits:
    """The limits from a daemon's `api` section; problems are recorded on `api`'s keys."""
    defaults = HTTPLimits()
    return HTTPLimits(
        max_body_bytes=api.integer("max_body_bytes", defaults.max_body_bytes, minimum=0, maximum=MAX_BODY_BYTES_CEILING),
        header_timeout=api.number("header_timeout", defaults.header_timeout, greater_than=0),
        body_min_rate=api.number("body_min_rate", defaults.body_min_rate, at_least=0),
        body_rate_window=api.number("body_rate_window", defaults.body_rate_window, greater_than=0),
        **dataclasses.asdict(read_connection_limits(api)),
    )
