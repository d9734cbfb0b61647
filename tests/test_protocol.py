"""The contracts in xaind.protocol have their implementations on the right side.

A PB name called with `callRemote` must be served as `perspective_<name>`
(by a perspective) or `remote_<name>` (by a referenceable) on the class
that receives the call; a rename on one side alone fails here rather than
as a runtime "no such method" between two daemons.
"""

from __future__ import annotations

import inspect

import pytest

from xaind.aggregator.coordinator_link import AggregatorMind
from xaind.coordinator.pb import AggregatorPerspective, ParticipantPerspective
from xaind.aggregator import settings as aggregator_settings
from xaind.coordinator import settings as coordinator_settings
from xaind.protocol import LOG_LEVELS, PBMethod
from xaind.sdk.coordinator_client import _PushReceiver

#: Which class serves each PB name, and with which prefix.
SERVED_BY: dict[str, tuple[type, str]] = {
    PBMethod.END_TRAINING: (AggregatorPerspective, "perspective_"),
    PBMethod.RENDEZ_VOUS: (ParticipantPerspective, "perspective_"),
    PBMethod.HEARTBEAT: (ParticipantPerspective, "perspective_"),
    PBMethod.START_TRAINING: (ParticipantPerspective, "perspective_"),
    PBMethod.PROTOCOL_VERSION: (ParticipantPerspective, "perspective_"),
    PBMethod.RESUME: (ParticipantPerspective, "perspective_"),
    PBMethod.ADMIT: (AggregatorMind, "remote_"),
    PBMethod.ADMIT_MANY: (AggregatorMind, "remote_"),
    PBMethod.SYNC: (AggregatorMind, "remote_"),
    PBMethod.AGGREGATE: (AggregatorMind, "remote_"),
    PBMethod.SHARD: (AggregatorMind, "remote_"),
    PBMethod.PARTIAL_SUM: (AggregatorMind, "remote_"),
    PBMethod.REDUCE: (AggregatorMind, "remote_"),
    PBMethod.INSTALL: (AggregatorMind, "remote_"),
    PBMethod.LEND_MODEL: (AggregatorMind, "remote_"),
    PBMethod.SELECTED: (_PushReceiver, "remote_"),
    PBMethod.FINISHED: (_PushReceiver, "remote_"),
}


def test_every_pb_method_has_a_known_server() -> None:
    assert sorted(SERVED_BY) == sorted(PBMethod.all())
    assert len(set(PBMethod.all())) == len(PBMethod.all())


@pytest.mark.parametrize("name", PBMethod.all())
def test_every_pb_method_is_implemented_where_it_is_called(name: str) -> None:
    server, prefix = SERVED_BY[name]
    method = getattr(server, prefix + name, None)
    assert method is not None and inspect.isfunction(method), f"{server.__name__} lacks {prefix}{name}"


def test_both_daemons_accept_the_same_log_levels() -> None:
    assert coordinator_settings.LOG_LEVELS is LOG_LEVELS
    assert aggregator_settings.LOG_LEVELS is LOG_LEVELS
