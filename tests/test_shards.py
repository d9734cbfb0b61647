"""Sharded aggregation end to end: a coordinator with `aggregator.shards: 3` and three real shards.

Each selected participant is told one shard's URL; each shard folds its own
participants; at the round's end the shards' partial sums are reduced by
the first shard and every shard installs the model. With integer-valued
weights and sample counts every partial sum is exact, so every shard's
model equals one aggregator's bit for bit (docs/scale.rst states the
tolerance otherwise). A shard SIGKILLed mid-round makes the round run
again on the others, counting nothing twice; restarted, it catches up.
"""

from __future__ import annotations

import collections
import contextlib
from pathlib import Path

import numpy as np
import pytest

from xaind.tools import daemons
from xaind.tools.sharded_federation import ShardedFederation, shard_name, sharded_federation

import test_end_to_end as e2e

SHARDS = 3


def sharded(tmp_path: Path, *, rounds: int, min_clients: int, **options: object) -> contextlib.AbstractContextManager[ShardedFederation]:
    return sharded_federation(
        tmp_path,
        shards=SHARDS,
        secret=e2e.PB_SECRET,
        federated_learning={"rounds": rounds, "participants_ratio": 1.0, "min_clients": min_clients,
                            "heartbeat_timeout": e2e.HEARTBEAT_TIMEOUT, "training_timeout": 60.0},
        admit_timeout=e2e.ADMIT_TIMEOUT,
        **options,  # type: ignore[arg-type]
    )


def integer_weights(rng: np.random.Generator) -> np.ndarray:
    """Whole numbers in float32: every sum the shards and the reduce make is exact."""
    return rng.integers(-50, 50, e2e.SHAPE).astype(np.float32)


def shard_urls(fed: ShardedFederation) -> dict[str, str]:
    return {f"http://127.0.0.1:{port}": shard_name(index) for index, port in enumerate(fed.shard_ports)}


def train_round(fed: ShardedFederation, participants: list[e2e.HttpParticipant], round_number: int, rng: np.random.Generator,
                expected: np.ndarray | None, marks: list[int]) -> tuple[list[tuple[int, np.ndarray]], collections.Counter[str]]:
    """Every participant selected for `round_number` downloads `expected` from its shard and uploads integer weights."""
    urls = shard_urls(fed)
    for participant, mark in zip(participants, marks):
        participant.wait_for_round(round_number, since=mark)
    uploads: list[tuple[int, np.ndarray]] = []
    per_shard: collections.Counter[str] = collections.Counter()
    for index, participant in enumerate(participants):
        answer = participant.start_training()
        assert answer["ok"] is True, answer
        assert answer["url"] in urls, (answer["url"], urls)
        per_shard[urls[answer["url"]]] += 1
        e2e.assert_download(participant.download(answer["url"], answer["token"]), expected, f"{participant.name} round {round_number}")
        weights, samples = integer_weights(rng), 1 + index
        code, reply = participant.upload(answer["url"], answer["token"], samples, weights)
        assert code == 200, reply
        uploads.append((samples, weights))
    return uploads, per_shard


def assert_every_shard_has(fed: ShardedFederation, round_number: int, expected: np.ndarray, shards: range = range(SHARDS)) -> None:
    for index in shards:
        daemons.wait_until(lambda: (fed.shard_state(index) / f"model-{round_number}.npy").exists(),
                           e2e.STEP_TIMEOUT, f"{shard_name(index)}'s model of round {round_number}")
        model = fed.shard_model(index, round_number)
        assert model.dtype == np.float32 and model.tobytes() == expected.tobytes(), f"{shard_name(index)} round {round_number}"


def test_three_shards_train_to_the_model_of_one_aggregator_bit_for_bit(tmp_path: Path) -> None:
    """6 participants, 3 rounds: 2 per shard each round, and every shard's every model is the exact average."""
    rounds = 3
    rng = np.random.default_rng(1515)
    with sharded(tmp_path, rounds=rounds, min_clients=6) as fed, e2e.http_participants(fed, 6) as participants:
        marks = [participant.mark() for participant in participants]
        for participant in participants:
            participant.rendez_vous()
        expected: np.ndarray | None = None
        for round_number in range(rounds):
            uploads, per_shard = train_round(fed, participants, round_number, rng, expected, marks)
            assert sorted(per_shard.values()) == [2, 2, 2], per_shard
            marks = [participant.mark() for participant in participants]
            expected = e2e.weighted_average(uploads)
            fed.wait_for_status(lambda status: status["round"] >= round_number + 1, f"round {round_number} aggregated")
            assert_every_shard_has(fed, round_number + 1, expected)
        for participant in participants:
            participant.wait_for_finish()
        status = fed.status()
        assert [shard["model_round"] for shard in status["aggregator_shards"]] == [rounds] * SHARDS
        reducer_log = fed.shards[0].log_text
        assert f"round {rounds - 1} reduced from" in reducer_log, fed.describe()
        for shard in fed.shards:
            assert "Traceback" not in shard.log_text, fed.describe()


def test_a_shard_killed_mid_round_makes_the_round_run_again_without_it_and_it_catches_up(tmp_path: Path) -> None:
    """Shard 1 dies holding an accepted result: the round runs again on shards 0 and 2, and that result never counts.

    Restarted, shard 1 installs the model it missed from another shard and takes participants again.
    """
    rng = np.random.default_rng(1516)
    with sharded(tmp_path, rounds=2, min_clients=4) as fed, e2e.http_participants(fed, 4) as participants:
        marks = [participant.mark() for participant in participants]
        for participant in participants:
            participant.rendez_vous()
        for participant, mark in zip(participants, marks):
            participant.wait_for_round(0, since=mark)
        urls = shard_urls(fed)
        answers = {participant.name: participant.start_training() for participant in participants}
        victims = [participant for participant in participants if urls[answers[participant.name]["url"]] == shard_name(1)]
        assert victims, answers
        first = victims[0]
        code, reply = first.upload(answers[first.name]["url"], answers[first.name]["token"], 1000, integer_weights(rng))
        assert code == 200, reply
        marks = [participant.mark() for participant in participants]
        fed.shards[1].kill()
        fed.wait_for_status(lambda status: len(status["aggregator_shards"]) == SHARDS - 1, "shard 1 detached")
        fed.coordinator.wait_for_log(r"aggregator shard shard-1 was lost mid-round: round 0 runs again")

        uploads, per_shard = train_round(fed, participants, 0, rng, None, marks)
        assert set(per_shard) == {shard_name(0), shard_name(2)} and sum(per_shard.values()) == 4, per_shard
        expected = e2e.weighted_average(uploads)  # without the 1000-sample result shard 1 held
        fed.wait_for_status(lambda status: status["round"] == 1, "round 0 aggregated")
        assert_every_shard_has(fed, 1, expected, range(0, SHARDS, 2))

        marks = [participant.mark() for participant in participants]
        fed.restart_shard(1)
        fed.wait_until_shards_attached(SHARDS)
        assert_every_shard_has(fed, 1, expected, range(1, 2))
        uploads, per_shard = train_round(fed, participants, 1, rng, expected, marks)
        assert per_shard[shard_name(1)] >= 1, per_shard
        for participant in participants:
            participant.wait_for_finish()
        assert_every_shard_has(fed, 2, e2e.weighted_average(uploads))


def start_up_lines(tmp_path: Path, plugin: str, document: dict[str, object]) -> list[str]:
    """What the daemon printed when it refused to start on `document` (it must have refused)."""
    config = daemons.write_yaml(tmp_path / f"{plugin}.yaml", {"development": True, "state_dir": str(tmp_path / "state"), **document})
    result = daemons.run_to_exit(plugin, config, tmp_path / f"{plugin}.log", cwd=tmp_path)
    assert result.returncode > 0, result.stdout
    return [line for line in result.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("aggregation", "message"),
    [
        ({"strategy": "median"}, "aggregation.strategy is median (use fedavg with shards)"),
        ({"strategy": "krum", "byzantine": 0}, "aggregation.strategy is krum (use fedavg with shards)"),
        ({"server_learning_rate": 0.5}, "aggregation.server_learning_rate is set"),
    ],
    ids=["median", "krum", "server-step"],
)
def test_a_shard_with_a_rule_that_cannot_be_reduced_exactly_stops_at_start_up_in_one_line(
    tmp_path: Path, aggregation: dict[str, object], message: str
) -> None:
    (line,) = start_up_lines(tmp_path, "xain-aggregator", {"aggregation": aggregation, "shard": {"name": "shard-0", "url": "http://127.0.0.1:8082"}})
    assert line.startswith("config error: shard.name: a shard's partial sum can only be reduced exactly for the weighted average: "), line
    assert message in line, line


@pytest.mark.parametrize(
    ("shard", "message"),
    [
        ({"name": "shard-0"}, "config error: shard.url: required with shard.name"),
        ({"url": "http://127.0.0.1:8082"}, "config error: shard.url: only used with shard.name"),
        ({"name": "../up", "url": "http://127.0.0.1:8082"}, "config error: shard.name: 1-64 letters"),
        ({"name": "a", "url": "http://127.0.0.1:8082", "weight": 0}, "config error: shard.weight:"),
    ],
    ids=["no-url", "url-alone", "bad-name", "weight-0"],
)
def test_a_bad_shard_section_is_one_line(tmp_path: Path, shard: dict[str, object], message: str) -> None:
    (line,) = start_up_lines(tmp_path, "xain-aggregator", {"shard": shard})
    assert line.startswith(message), line


def test_aggregator_shards_below_one_is_one_line(tmp_path: Path) -> None:
    (line,) = start_up_lines(tmp_path, "xain-coordinator", {"aggregator": {"shards": 0}})
    assert line.startswith("config error: aggregator.shards:"), line
