"""The aggregator started by `twistd -n xain-aggregator` on a corrupt state directory.

Each unusable state file must stop start-up with exactly one line naming
the file and what is wrong, and a non-zero exit (docs/aggregator-consistency.rst),
as the coordinator does for its own state file (tests/test_twistd_coordinator.py).
Listeners are on OS-chosen loopback ports; the coordinator is never reached,
as start-up ends before the reactor runs.
"""

from __future__ import annotations

import base64
import io
import json
import re
import signal
from pathlib import Path

import numpy as np
import pytest

from xaind.protocol import AGGREGATOR_HTTP_LISTENER
from xaind.tools.daemons import Daemon, aggregator_document, free_loopback_port, run_to_exit, write_yaml

PLUGIN = "xain-aggregator"
#: Bound on a start-up that must fail: one that runs on instead is killed, and fails the test.
EXIT_TIMEOUT = 30.0


def npy_bytes(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array, allow_pickle=False)
    return stream.getvalue()


def config(tmp_path: Path) -> Path:
    document = aggregator_document(
        state_dir=tmp_path / "state", port=0, coordinator_pb_port=free_loopback_port(), secret="state-test-secret"
    )
    return write_yaml(tmp_path / "aggregator.yaml", document)


def state_with_model(tmp_path: Path, content: bytes, model_file: str = "model-2.npy") -> Path:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    path = state_dir / model_file
    path.write_bytes(content)
    document = {"model_round": 2, "model_file": model_file, "etag": '"m2-abc"'}
    (state_dir / "aggregator.json").write_text(json.dumps(document), encoding="utf-8")
    return path


GOOD = np.arange(12, dtype=np.float32).reshape(3, 4)


def assert_refused_with_one_line(tmp_path: Path, expected: str) -> None:
    result = run_to_exit(PLUGIN, config(tmp_path), tmp_path / "aggregator.log", cwd=tmp_path, timeout=EXIT_TIMEOUT)
    assert result.returncode > 0, f"exit status {result.returncode}: {result.stdout}"
    assert "Traceback" not in result.stdout
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert re.fullmatch(expected, lines[0]), lines[0]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"model weights, but as text\n", r"not a \.npy model \(.+\)"),
        (npy_bytes(GOOD)[:30], r"not a \.npy model \(.+\)"),
        (npy_bytes(GOOD)[:-8], r"\d+ bytes, its \.npy header announces \d+"),
        (npy_bytes(np.array([0.5, np.nan], dtype=np.float32)), re.escape("non-finite weight nan at element 1")),
    ],
    ids=["not-npy", "truncated-header", "truncated-data", "nan"],
)
def test_an_unusable_model_stops_startup_with_one_line(tmp_path: Path, content: bytes, problem: str) -> None:
    path = state_with_model(tmp_path, content)
    assert_refused_with_one_line(tmp_path, rf"state error: {re.escape(str(path))}: {problem}")
    assert path.read_bytes() == content


def test_a_result_name_that_is_not_base64_stops_startup_with_one_line(tmp_path: Path) -> None:
    state_with_model(tmp_path, npy_bytes(GOOD))
    round_dir = tmp_path / "state" / "round-2"
    round_dir.mkdir()
    good = round_dir / (base64.urlsafe_b64encode(b"participant-a").decode() + ".result")
    good.write_bytes(b"kept")
    bad = round_dir / "not base64!.result"
    bad.write_bytes(b"kept")
    assert_refused_with_one_line(
        tmp_path,
        re.escape(f"state error: {bad}: not a result of this store (the name must be a participant id in URL-safe base64)"),
    )
    assert bad.read_bytes() == good.read_bytes() == b"kept"


def test_a_valid_state_directory_starts_and_stops_cleanly(tmp_path: Path) -> None:
    state_with_model(tmp_path, npy_bytes(GOOD))
    with Daemon(PLUGIN, config(tmp_path), tmp_path, listeners=(AGGREGATOR_HTTP_LISTENER,)) as daemon:
        assert any(message.startswith("aggregator ready: global model of round 2") for message in daemon.log_messages("xaind"))
        code = daemon.stop()
        assert not daemon.killed
        assert code in (0, -signal.SIGTERM), daemon.output
        assert "Traceback" not in daemon.log_text + daemon.output
