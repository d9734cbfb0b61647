"""Contracts shared by the two daemons, the SDK, the tools and the tests.

Everything one process says and another one reads is named here once: the
codes of refusals, the names of the listeners, the PB user the aggregator
logs in as. docs/ describes what they mean on the wire.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Why a request was refused: stable, machine-readable, sent as `code` beside `error`.

    Programs decide on these codes; the `error` text is for people and may change.
    """

    # Requests any HTTP route may refuse.
    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    INTERNAL_ERROR = "internal_error"
    BODY_TOO_LARGE = "body_too_large"
    HEADER_TIMEOUT = "header_timeout"
    BODY_TOO_SLOW = "body_too_slow"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    # Rendez-vous at the coordinator.
    NOT_AUTHENTICATED = "not_authenticated"
    TOO_MANY_PARTICIPANTS = "too_many_participants"
    RENDEZ_VOUS_RATE_LIMITED = "rendez_vous_rate_limited"
    # Uploads and downloads at the aggregator.
    UNKNOWN_TOKEN = "unknown_token"
    ALREADY_ACCEPTED = "already_accepted"
    UPLOAD_IN_PROGRESS = "upload_in_progress"
    ROUND_ENDED = "round_ended"
    NOT_EXPECTED = "not_expected"
    COORDINATOR_UNREACHABLE = "coordinator_unreachable"
    MALFORMED_UPLOAD = "malformed_upload"
    UPLOAD_TOO_LARGE = "upload_too_large"
    UNACCEPTABLE_WEIGHTS = "unacceptable_weights"
    RANGE_NOT_SATISFIABLE = "range_not_satisfiable"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    # What the coordinator asks of the aggregator over PB.
    WRONG_ROUND = "wrong_round"
    AGGREGATING = "aggregating"
    RESULTS_MISSING = "results_missing"
    AGGREGATION_FAILED = "aggregation_failed"


class Refusal(Exception):
    """A request the daemon's rules do not allow: a code for programs, a message for people.

    Raised by the domain code, which knows nothing of HTTP or PB; each edge
    maps it once (xaind/web.py to an HTTP status and a JSON body, the PB
    adapters to a PB error carrying the code).
    """

    code: ErrorCode = ErrorCode.BAD_REQUEST

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class RateLimited(Refusal):
    """A refusal that the same request may be repeated after `retry_after` seconds (HTTP: 429 with Retry-After)."""

    def __init__(self, message: str, code: ErrorCode, retry_after: float) -> None:
        super().__init__(message, code)
        self.retry_after = retry_after


#: The names under which xaind.listening reports each bound listener.
COORDINATOR_HTTP_LISTENER = "coordinator HTTP API"
COORDINATOR_PB_LISTENER = "coordinator PB"
AGGREGATOR_HTTP_LISTENER = "aggregator HTTP API"

#: The PB user the aggregator logs in to the coordinator as (participants log in anonymously).
AGGREGATOR_USER = b"aggregator"

#: The log levels a configuration may name (`logging.level`), lowest first.
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


#: The PB participant protocol (docs/pb-protocol.rst): its name, and its version, raised by a change a client
#: written for an earlier version would misread. Version 1: the calls, answers, errors and pushes documented,
#: and a rendez-vous answered before any push concerning its participant.
PARTICIPANT_PROTOCOL = "xaind-participant-pb"
PARTICIPANT_PROTOCOL_VERSION = 1


class PBMethod:
    """The names of the remote methods called over PB, with the side that implements each.

    The callee defines `perspective_<name>` or `remote_<name>`; the caller
    passes the name to `callRemote`. Naming them here keeps both ends in step
    (tests/test_protocol.py checks every name has its implementation).
    """

    # Served by the coordinator to the aggregator (xaind.coordinator.pb.AggregatorPerspective).
    END_TRAINING = "end_training"
    # Served by the coordinator to participants (xaind.coordinator.pb.ParticipantPerspective).
    RENDEZ_VOUS = "rendez_vous"
    HEARTBEAT = "heartbeat"
    START_TRAINING = "start_training"
    PROTOCOL_VERSION = "protocol_version"
    RESUME = "resume"
    # Served by the aggregator's mind (xaind.aggregator.coordinator_link.AggregatorMind).
    ADMIT = "admit"
    ADMIT_MANY = "admit_many"
    SYNC = "sync"
    AGGREGATE = "aggregate"
    # Served by a shard's mind as well (docs/scale.rst, Sharded aggregation).
    SHARD = "shard"
    PARTIAL_SUM = "partial_sum"
    REDUCE = "reduce"
    INSTALL = "install"
    LEND_MODEL = "lend_model"
    # Served by a PB participant's mind (xaind.sdk.coordinator_client._PushReceiver).
    SELECTED = "selected"
    FINISHED = "finished"

    @classmethod
    def all(cls) -> tuple[str, ...]:
        """Every method name, for checks that each one is implemented."""
        return tuple(value for name, value in vars(cls).items() if name.isupper())
