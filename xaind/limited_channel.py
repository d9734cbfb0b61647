"""The HTTP channel of both daemons: twisted.web's, with what it lets a client get away with bounded.

- A `Content-Length` of thousands of digits made twisted.web's parser
  raise inside the reactor (`int()` refuses more than 4,300 digits) on
  the newest releases: the client got no answer and the log a traceback.
  Such a length is read as what it is, a body far above every limit, and
  refused by the request (413).

The channel is built on the one `xaind.pipelining` picks (Twisted's own,
or `InOrderHTTPChannel` on releases without the pipelining fix), so both
behaviours hold on every supported Twisted. It overrides only methods
twisted.web documents or calls by name on its channel; it reads none of
the channel's private attributes.
"""

from __future__ import annotations

import functools

from twisted.web import http

from xaind.pipelining import in_order_channel_class

#: Digits of a `Content-Length` above which it only means "larger than any limit".
_LENGTH_DIGITS = 18
#: What such a length is read as: far above any limit, and an int() takes it.
_TOO_LARGE_LENGTH = b"9" * (_LENGTH_DIGITS + 1)


def bounded_content_length(line: bytes) -> bytes:
    """A header line, with a `Content-Length` of more than 18 digits replaced by one of 19 nines."""
    name, colon, value = line.partition(b":")
    if not colon or name.strip().lower() != b"content-length":
        return line
    digits = value.strip(b" \t")
    if len(digits) <= _LENGTH_DIGITS or not digits.isdigit():
        return line
    significant = digits.lstrip(b"0") or b"0"
    return name + b": " + (significant if len(significant) <= _LENGTH_DIGITS else _TOO_LARGE_LENGTH)


class LimitedChannelMixin:
    """What both daemons' channels add to twisted.web's (see the module's docstring)."""

    def headerReceived(self, line: bytes) -> bool:
        return super().headerReceived(bounded_content_length(line))  # type: ignore[misc]


@functools.cache
def limited_channel_class() -> type[http.HTTPChannel]:
    """The channel class of both daemons' sites, on this Twisted release."""
    base = in_order_channel_class() or http.HTTPChannel
    return type("LimitedChannel", (LimitedChannelMixin, base), {"__doc__": LimitedChannelMixin.__doc__})
