"""`xaind top`: frames rendered from status documents, and the command against real daemons.

The rendering is checked on a fixed document; then a real coordinator and
aggregator (`xaind.tools.daemons.federation`) run a whole training with
dummy participants, and `xaind top --once` must show the round and the
participant counts that ``/status`` gives, before and after. The live view
runs as the operator runs it (the `xaind` command in a subprocess): it
redraws in place until SIGINT (Ctrl-C), then exits 0. A URL that does not
answer is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from xaind.cli import main
from xaind.protocol import AGGREGATOR_HTTP_LISTENER
from xaind.top import ERASE_BELOW, HOME, SHOW_CURSOR, progress_bar, render, status_url
from xaind.tools import daemons

RUN_TIMEOUT = 60.0

STATUS: dict[str, Any] = {
    "round": 3,
    "rounds": 10,
    "phase": "training",
    "minimum_participants": 2,
    "participants": {"waiting": 4, "selected": 2, "done": 1, "done_inactive": 0, "ignored": 1},
    "waiting_for": "1 more result(s) of round 3",
    "aggregator_attached": True,
    "seconds_since_last_aggregation": 12.5,
    "state_write_failure": None,
    "finished_rounds": [
        {"round": 1, "duration_s": 3.25, "participants": 3, "outcome": "aggregated", "ended_at": 1_700_000_000.0},
        {"round": 2, "duration_s": 150.0, "participants": 2, "outcome": "repeated", "ended_at": 1_700_000_150.0},
    ],
    "recent_problems": [{"time": 1_700_000_100.0, "level": "warn", "source": "xaind.coordinator.service", "text": "ab12cd34… left the round"}],
}


def test_a_frame_shows_progress_participants_rounds_and_problems() -> None:
    lines = render(STATUS, url="http://127.0.0.1:8081/status", now=1_700_000_200.0)
    assert lines[0] == "xaind top  http://127.0.0.1:8081/status  22:16:40 UTC"
    assert lines[2] == f"Rounds        3 of 10 done  {progress_bar(3, 10)}  30%   current round 3"
    assert progress_bar(3, 10) == "[" + "#" * 9 + "-" * 21 + "]"
    assert "Phase         training" in lines
    assert "Waiting for   1 more result(s) of round 3" in lines
    assert "Participants  waiting 4  selected 2  done 1  done inactive 0  ignored 1   (at least 2 a round)" in lines
    assert "Aggregator    attached   last aggregation 12.5 s ago" in lines
    table = lines[lines.index("Finished rounds (last 5)") + 1 :]
    assert table[1].split() == ["2", "2m30s", "2", "repeated", "22:15:50"]  # newest first
    assert table[2].split() == ["1", "3.25", "s", "3", "aggregated", "22:13:20"]
    assert lines[-1] == "  22:15:00 warn     xaind.coordinator.service: ab12cd34… left the round"


def test_a_frame_of_a_complete_training_and_of_an_aggregator() -> None:
    complete = {**STATUS, "round": 10, "phase": "complete", "finished_rounds": [], "recent_problems": [], "seconds_since_last_aggregation": None}
    aggregator = {"model_round": 10, "model_bytes": 208, "admitted": 0, "uploading": 0, "accepted": 0, "aggregating": False, "coordinator_attached": True,
                  "last_aggregation": {"round": 9, "strategy": "weighted_average", "results": 3, "median_update_norm": 0.51234, "outliers": []}}  # fmt: skip
    lines = render(complete, aggregator)
    assert lines[2].startswith("Rounds        10 of 10 done  [" + "#" * 30 + "] 100%   training complete")
    assert "Aggregator    attached   last aggregation none yet" in lines
    assert lines[-5:] == [
        "  none",
        "",
        "Aggregator    global model of round 10 (208 bytes)   linked to the coordinator",
        "Uploads       admitted 0  uploading 0  accepted 0",
        "Last round    9 (weighted_average): 3 result(s), median update norm 0.5123",
    ]


@pytest.mark.parametrize(
    "given, url",
    [
        ("http://127.0.0.1:8081", "http://127.0.0.1:8081/status"),
        ("http://127.0.0.1:8081/", "http://127.0.0.1:8081/status"),
        ("https://coordinator.example/status", "https://coordinator.example/status"),
        ("127.0.0.1:8082", "http://127.0.0.1:8082/status"),
    ],
)
def test_the_status_path_is_added(given: str, url: str) -> None:
    assert status_url(given) == url


def test_a_url_that_does_not_answer_is_one_line_and_a_failure(capsys: pytest.CaptureFixture[str]) -> None:
    port = daemons.free_loopback_port()
    assert main(["top", f"http://127.0.0.1:{port}", "--once", "--timeout", "2"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"xaind top: http://127.0.0.1:{port}/status: ")


def frame_of(fed: daemons.Federation, capsys: pytest.CaptureFixture[str]) -> tuple[list[str], dict[str, Any]]:
    """`xaind top --once` of both daemons, and the coordinator's /status read just after."""
    aggregator_url = f"http://127.0.0.1:{fed.aggregator.ports[AGGREGATOR_HTTP_LISTENER]}"
    assert main(["top", fed.http_url, aggregator_url, "--once"]) == 0
    captured = capsys.readouterr()
    assert "\x1b" not in captured.out  # --once: no escape sequences for scripts
    return captured.out.splitlines(), fed.status()


def participants_line(status: dict[str, Any]) -> str:
    counts = "  ".join(f"{name.replace('_', ' ')} {count}" for name, count in status["participants"].items())
    return f"Participants  {counts}   (at least {status['minimum_participants']} a round)"


def test_top_once_shows_the_round_and_counts_of_a_real_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with daemons.federation(tmp_path, secret=None, rounds=2, min_clients=3, heartbeat_timeout=2.0, admit_timeout=3.0) as fed:
        lines, status = frame_of(fed, capsys)
        assert status["round"] == 0
        assert lines[2].startswith("Rounds        0 of 2 done  [")
        assert participants_line(status) in lines
        assert "Global model" not in lines and "Aggregator    global model of round 0 (0 bytes)   linked to the coordinator" in lines

        run = subprocess.run(
            [*daemons.dummy_participants_command(), "-n", "3", "--heartbeat-period", "0.2", "--coordinator-url", fed.http_url],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        fed.wait_for_status(lambda status: status["phase"] == "complete", "the training to complete")
        lines, status = frame_of(fed, capsys)
        assert lines[2] == f"Rounds        2 of 2 done  {progress_bar(2, 2)} 100%   training complete"
        assert participants_line(status) in lines
        assert sum(status["participants"].values()) == 3
        table = lines[lines.index("Finished rounds (last 5)") + 2 :]
        assert [row.split()[0] for row in table[:2]] == ["1", "0"]
        assert all(row.split()[-3:-1] == ["3", "aggregated"] for row in table[:2]), table
        assert "Aggregator    global model of round 2" in "\n".join(lines)


def test_the_live_view_redraws_until_ctrl_c(tmp_path: Path) -> None:
    with daemons.federation(tmp_path, secret=None, rounds=1, min_clients=3, heartbeat_timeout=2.0, admit_timeout=3.0) as fed:
        output_path = tmp_path / "top.out"
        with open(output_path, "w", encoding="utf-8") as output:
            process = subprocess.Popen(
                [*daemons.xaind_command(), "top", fed.http_url, "--interval", "0.1"], stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
            )
        try:
            daemons.wait_until(lambda: output_path.read_text(encoding="utf-8").count(HOME) >= 3, daemons.START_TIMEOUT, "three frames")
            process.send_signal(signal.SIGINT)
            assert process.wait(daemons.STOP_TIMEOUT) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    shown = output_path.read_text(encoding="utf-8")
    assert "Traceback" not in shown
    last_frame = shown.rsplit(HOME, 1)[1]
    assert "Rounds        0 of 1 done" in last_frame and ERASE_BELOW in last_frame
    assert shown.endswith(SHOW_CURSOR + "\n")
