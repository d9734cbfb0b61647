"""A round counter that cannot be written, with the real daemons: the round waits, then goes on.

A real `twistd` coordinator and aggregator on loopback ports; one plain-HTTP
participant driven step by step by the test. The coordinator's
`coordinator.json` is made unwritable by putting a directory in its place:
renaming the new file onto it fails with EISDIR, also for root (the suite
runs as root, for whom a read-only mode bit changes nothing).
"""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from xaind.protocol import COORDINATOR_HTTP_LISTENER as COORDINATOR_HTTP
from xaind.testing.wire import encode_local_result
from xaind.tools.daemons import federation, get_json

PB_SECRET = "unwritable-round-counter-secret"
#: Bound on any one awaited step (an aggregation, a retry of the write).
STEP_TIMEOUT = 20.0
HTTP_TIMEOUT = 10.0


def post(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
        return response.status


def test_an_unwritable_round_counter_holds_the_next_round_until_it_can_be_written(tmp_path: Path) -> None:
    with federation(
        tmp_path,
        secret=PB_SECRET,
        rounds=2,
        min_clients=1,
        heartbeat_timeout=60.0,
        training_timeout=600.0,
        admit_timeout=5.0,
        heartbeat_hold=0.0,  # stand_by answered at once: the test asks, it does not wait for news
    ) as fed:
        coordinator, aggregator = fed.coordinator, fed.aggregator

        def call(path: str) -> Any:
            code, answer = get_json(coordinator.url(COORDINATOR_HTTP, path), timeout=HTTP_TIMEOUT)
            assert code == 200, (path, code, answer)
            return answer

        def status_when(condition: Any, what: str) -> dict[str, Any]:
            def check() -> dict[str, Any] | None:
                status = call("/status")
                return status if condition(status) else None

            return coordinator.wait_for(check, what, STEP_TIMEOUT)

        state_file = tmp_path / "coordinator" / "state" / "coordinator.json"
        state_file.mkdir()

        first = call("/rendez_vous")["id"]
        assert call(f"/heartbeat/{first}") == {"state": "round", "round": 0}
        training = call(f"/start_training/{first}")
        assert training["ok"] is True, training
        weights = np.full((3, 2), 1.5, dtype=np.float32)
        assert post(f"{training['url']}/{first}/{training['token']}", encode_local_result(10, weights)) == 200

        # Round 0 is aggregated, but its counter cannot be written: round 1 does not start.
        status = status_when(lambda status: status["state_write_failure"] is not None, "the failed write to show")
        failure = status["state_write_failure"]
        assert (failure["file"], failure["error"], failure["round"]) == (str(state_file), "Is a directory", 1)
        assert (status["round"], status["phase"]) == (0, "aggregating")
        assert "round counter" in status["waiting_for"]

        # It keeps serving meanwhile, retries, and says so once.
        second = call("/rendez_vous")
        assert second["ok"] is True
        assert call(f"/heartbeat/{first}") == {"state": "stand_by", "round": None}
        assert call(f"/heartbeat/{second['id']}") == {"state": "stand_by", "round": None}
        status_when(lambda status: (status["state_write_failure"] or {}).get("attempts", 0) >= 2, "a retry")
        assert call(f"/heartbeat/{first}") == {"state": "stand_by", "round": None}
        assert sum("cannot write the round counter" in line for line in coordinator.log_messages("xaind")) == 1

        # Once the place is free again the next retry writes, and round 1 starts as it would have.
        state_file.rmdir()
        status = status_when(lambda status: status["state_write_failure"] is None, "the retried write to succeed")
        assert (status["round"], status["phase"]) == (1, "training")
        assert json.loads(state_file.read_text(encoding="utf-8")) == {"round": 1}
        assert call(f"/heartbeat/{first}") == {"state": "round", "round": 1}
        assert call(f"/heartbeat/{second['id']}") == {"state": "round", "round": 1}
        messages = coordinator.log_messages("xaind.coordinator.service")
        assert sum("cannot write the round counter" in message for message in messages) == 1
        assert sum(message.startswith("round counter 1 written") for message in messages) == 1
        assert messages.count("selected 2 participant(s) for round 1") == 1

        for daemon in (coordinator, aggregator):
            assert daemon.stop() in (0, -signal.SIGTERM), daemon.output
            assert "Traceback" not in daemon.log_text + daemon.output
