"""`xain-dummy-participants` and `make demo`'s module, end to end against real daemons.

The console script is the one installed next to `sys.executable` (the
virtual environment's, or /usr/bin's from the Debian package), else
`python -m xaind.tools.dummy_participants` (a source tree on PYTHONPATH, as in
a package build, has no console scripts); the daemons are real `twistd -n`
processes on loopback (wired as `xaind.tools.demo` does), with their state
under `tmp_path`.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xaind.tools import daemons
from xaind.tools.daemons import Federation, dummy_participants_command
from xaind.tools.dummy_participants import MODEL_SIZES

PB_SECRET = "dummy-participants-test-secret"

#: Bound on one run of a tool (it takes a few seconds).
RUN_TIMEOUT = 60.0

SUMMARY = re.compile(r"^summary: (?P<finished>\d+) participant\(s\) finished, (?P<failed>\d+) failed; (?P<rounds>\d+) round\(s\);", re.MULTILINE)
ROUND_LINE = re.compile(r"^round (?P<round>\d+): (?P<results>\d+) result\(s\) uploaded, ", re.MULTILINE)


#: Both daemons, as `make demo` wires them, with short timeouts; `participants` is the coordinator's section.
federation = functools.partial(daemons.federation, secret=PB_SECRET, heartbeat_timeout=2.0, admit_timeout=3.0, call_timeout=None)


def dummy_participants(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*dummy_participants_command(), *arguments],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def check_run(run: subprocess.CompletedProcess[str], *, participants: int, rounds: int) -> None:
    described = f"exit {run.returncode}\n--- stdout ---\n{run.stdout}\n--- stderr ---\n{run.stderr}"
    assert run.returncode == 0, described
    round_lines = ROUND_LINE.findall(run.stdout)
    assert [int(number) for number, _ in round_lines] == list(range(rounds)), described
    assert all(int(results) == participants for _, results in round_lines), described
    summaries = SUMMARY.findall(run.stdout)
    assert summaries == [(str(participants), "0", str(rounds))], described
    assert run.stdout.rstrip().splitlines()[-1].startswith("summary: "), described
    assert "Traceback" not in run.stdout + run.stderr, described


def check_model(fed: Federation, model_size: str, rounds: int) -> None:
    """Every dummy participant uploads linspace(-1, 1): so is their average."""
    model = np.load(fed.aggregator_state / f"model-{rounds}.npy", allow_pickle=False)
    elements = max(1, MODEL_SIZES[model_size] // 4)
    np.testing.assert_allclose(model, np.linspace(-1.0, 1.0, elements, dtype=np.float32), rtol=1e-6, atol=1e-7)
    status = fed.status()
    assert (status["round"], status["phase"]) == (rounds, "complete")


@pytest.mark.parametrize("model_size", ["100B", "1kB", "1MB"])
def test_five_http_participants_two_rounds(tmp_path: Path, model_size: str) -> None:
    with federation(tmp_path, rounds=2, min_clients=5) as fed:
        run = dummy_participants(
            "--number-of-participants", "5",
            "--heartbeat-period", "0.2",
            "--model-size", model_size,
            "--coordinator-url", fed.http_url,
        )  # fmt: skip
        assert run.stdout.splitlines()[0] == f"5 dummy participant(s), model {model_size}, coordinator {fed.http_url}"
        check_run(run, participants=5, rounds=2)
        check_model(fed, model_size, 2)


def test_five_pb_participants_two_rounds(tmp_path: Path) -> None:
    with federation(tmp_path, rounds=2, min_clients=5) as fed:
        run = dummy_participants(
            "--number-of-participants", "5",
            "--heartbeat-period", "0.2",
            "--model-size", "1kB",
            "--coordinator-url", fed.pb_url,
        )  # fmt: skip
        check_run(run, participants=5, rounds=2)
        check_model(fed, "1kB", 2)
        # They spoke PB: the pushed selections reached them (all 10 start-training requests came).
        assert fed.status()["selection_to_start_training"]["count"] == 10


ENROLMENT_TOKENS = ["6c1f0e2d3b4a59687a6b5c4d3e2f1a0b", "7d2e1f0a3b4c5d6e7f8091a2b3c4d5e6", "8e3f2a1b0c4d5e6f708192a3b4c5d6e7"]


@pytest.mark.parametrize("transport", ["http", "pb"])
def test_participants_show_one_enrolment_token_each(tmp_path: Path, transport: str) -> None:
    tokens_file = tmp_path / "enrolment-tokens"
    tokens_file.write_text("# coordinator's list\n" + "\n".join(ENROLMENT_TOKENS) + "\n")
    with federation(
        tmp_path, rounds=2, min_clients=3, participants={"authentication": "enrolment_tokens", "enrolment_tokens_file": str(tokens_file)}
    ) as fed:
        url = fed.http_url if transport == "http" else fed.pb_url
        refused = dummy_participants("--number-of-participants", "1", "--heartbeat-period", "0.2", "--coordinator-url", url)
        assert refused.returncode != 0 and "not_authenticated" in refused.stdout + refused.stderr, refused
        # Each participant its own token, from the same file the coordinator reads.
        run = dummy_participants(
            "--number-of-participants", "3",
            "--heartbeat-period", "0.2",
            "--coordinator-url", url,
            "--enrolment-token-file", str(tokens_file),
        )  # fmt: skip
        check_run(run, participants=3, rounds=2)
        check_model(fed, "1kB", 2)
        for token in ENROLMENT_TOKENS:
            assert token not in run.stdout + run.stderr + fed.coordinator.log_text + fed.aggregator.log_text


def test_a_single_enrolment_token_serves_every_participant_and_too_few_is_an_argument_error(tmp_path: Path) -> None:
    single = tmp_path / "single"
    single.write_text(ENROLMENT_TOKENS[0] + "  # all of them\n")
    with federation(
        tmp_path / "federation", rounds=1, min_clients=2, participants={"authentication": "enrolment_tokens", "enrolment_tokens_file": str(single)}
    ) as fed:
        run = dummy_participants(
            "--number-of-participants", "2", "--heartbeat-period", "0.2", "--coordinator-url", fed.http_url, "--enrolment-token-file", str(single)
        )  # fmt: skip
        check_run(run, participants=2, rounds=1)
    two = tmp_path / "two"
    two.write_text("\n".join(ENROLMENT_TOKENS[:2]) + "\n")
    too_few = dummy_participants("--number-of-participants", "3", "--enrolment-token-file", str(two))
    assert too_few.returncode == 2
    assert too_few.stderr.strip().splitlines()[-1] == (
        f"xain-dummy-participants: error: --enrolment-token-file: {two} has 2 token(s), fewer than the 3 participant(s) "
        "(give one each, or a single one for all)"
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--number-of-participants", "0"], "--number-of-participants must be at least 1"),
        (["--coordinator-url", "ftp://127.0.0.1:8081"], "--coordinator-url must start with http://, https://, pb:// or pbs://"),
        (["--coordinator-url", "pb://127.0.0.1:5555", "--transport", "http"], "--transport http needs an http:// or https:// coordinator URL"),
    ],
    ids=["no-participants", "bad-url-scheme", "http-transport-with-pb-url"],
)
def test_argument_errors_exit_2_with_usage(arguments: list[str], message: str) -> None:
    run = dummy_participants(*arguments)
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert run.stderr.startswith("usage: xain-dummy-participants"), run.stderr
    assert message in run.stderr, run.stderr
    assert run.stdout == "" and "Traceback" not in run.stderr


def test_demo_runs_a_whole_training_and_stops_both_daemons(tmp_path: Path) -> None:
    """`make demo`'s module: both daemons and 3 dummy participants through 2 rounds; nothing left running."""
    run = subprocess.run(
        [sys.executable, "-m", "xaind.tools.demo", "--participants", "3", "--rounds", "2", "--model-size", "1kB"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    described = f"exit {run.returncode}\n--- stdout ---\n{run.stdout}\n--- stderr ---\n{run.stderr}"
    assert run.returncode == 0, described
    lines = run.stdout.splitlines()
    assert lines[-1] == "[demo] both daemons stopped", described
    assert "[demo] coordinator: round 2 of 2, phase complete" in lines, described
    assert any(line.startswith("[demo] final global model:") and line.endswith(": True") for line in lines), described
    # Every dummy participant sends the same weights every round: each update after the first is 0.
    assert "[demo] aggregator: round 1 aggregated with fedavg from 3 result(s), median update norm 0, outliers: 0" in lines, described
    check_run(subprocess.CompletedProcess(run.args, 0, "\n".join(line for line in lines if not line.startswith("[demo]")), ""), participants=3, rounds=2)
    pids = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", run.stdout)]
    assert len(pids) == 2, described  # the coordinator's and the aggregator's
    for pid in pids:
        assert not process_is_twistd(pid), f"twistd (pid {pid}) still running after the demo"


def process_is_twistd(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) process running twistd (a reused pid runs something else)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            command = cmdline.read().replace(b"\0", b" ")
    except FileNotFoundError:
        return False
    return state != "Z" and b"twistd" in command
