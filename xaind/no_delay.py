"""TCP_NODELAY on every connection of the daemons' listeners and of the PB clients.

Both daemons speak in small messages: a PB call and its answer, an HTTP
answer's headers written apart from its body, the last piece of an upload.
With Nagle's algorithm (the default), a small write waits until the peer
acknowledges the previous one, and the peer delays its acknowledgement by
up to 40 ms (Linux): in a round of 10 x 1 MB the aggregator's reports of
results reached the coordinator up to 20 ms late. Bulk transfers lose
nothing: their segments are full anyway.
"""

from __future__ import annotations

from typing import Any

from twisted.spread import pb


def set_no_delay(transport: Any) -> None:
    """Small writes on `transport` leave at once (TCP; TLS over TCP passes it on; nothing on other transports)."""
    setting = getattr(transport, "setTcpNoDelay", None)
    if setting is None:
        return
    try:
        setting(True)
    except OSError:
        pass  # not a TCP socket after all (e.g. a UNIX one)


class NoDelayBroker(pb.Broker):
    """A PB connection whose calls and answers are not held back by Nagle's algorithm."""

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        set_no_delay(self.transport)
        super().connectionMade()
