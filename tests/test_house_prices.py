"""The house-prices example (examples/house_prices/): its data split, and a real federated training.

The script is run as users run it, `python examples/house_prices/house_prices.py
<command> ...` in a subprocess. The federated training uses both real daemons
(tests/daemons.py) on loopback ports, in development mode, and three
participant processes: two poll the coordinator over HTTP, one is pushed its
selections over PB. A small compare-strategies runs fedavg and median with one
participant attacking, and checks that the median withstands it.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from xaind.tools.daemons import LOOPBACK_ANY_PORT, Daemon, free_loopback_port, get_json, wait_until, write_yaml

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "house_prices"
SCRIPT = EXAMPLE / "house_prices.py"

from xaind.protocol import AGGREGATOR_HTTP_LISTENER as AGGREGATOR_HTTP
from xaind.protocol import COORDINATOR_HTTP_LISTENER as COORDINATOR_HTTP
from xaind.protocol import COORDINATOR_PB_LISTENER as COORDINATOR_PB

ROUNDS = 5
PARTICIPANTS = 3
HEARTBEAT_PERIOD = 0.2
#: Slow local learning (3 epochs at learning rate 0.001), so that the rounds matter: on the
#: seed-0 synthetic data the global model's R² on the global test set goes about
#: 0.38, 0.58, 0.68, 0.73 in rounds 1 to 4 (round 0 starts from zeros), and the
#: final model (aggregated after round 4) scores about 0.75.
EPOCHS = 3
LEARNING_RATE = 0.001
#: Bound on the whole federated training (it takes a few seconds).
TRAINING_TIMEOUT = 40.0
COMMAND_TIMEOUT = 30.0

#: Kaggle's train.csv has 81 columns; these are the ones the fake input below carries.
KAGGLE_LIKE_COLUMNS = [
    "Id", "MSSubClass", "MSZoning", "LotFrontage", "LotArea", "Street", "Alley", "Neighborhood", "OverallQual",
    "OverallCond", "YearBuilt", "YearRemodAdd", "MasVnrArea", "TotalBsmtSF", "1stFlrSF", "2ndFlrSF", "GrLivArea",
    "FullBath", "HalfBath", "BedroomAbvGr", "TotRmsAbvGrd", "Fireplaces", "GarageYrBlt", "GarageCars", "GarageArea",
    "SaleCondition", "SalePrice",
]  # fmt: skip


def run_script(*arguments: str | os.PathLike[str], timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, arguments)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def split(directory: Path, participants: int, seed: int) -> subprocess.CompletedProcess[str]:
    result = run_script("split-data", "--data-directory", directory, "--number-of-participants", participants, "--seed", seed)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def ids(path: Path) -> list[str]:
    return [row["Id"] for row in read_rows(path)[1]]


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("house_prices_example", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def assert_partition(directory: Path, participants: int, all_ids: list[str]) -> None:
    """Global test set + every shard's train and test sets: disjoint, and together every row once."""
    parts = {"test.csv": ids(directory / "test.csv")}
    for index in range(participants):
        for name in ("train.csv", "test.csv"):
            parts[f"participant-{index}/{name}"] = ids(directory / f"participant-{index}" / name)
    assert sum(len(part) for part in parts.values()) == len(all_ids), {name: len(part) for name, part in parts.items()}
    assert sorted(sum(parts.values(), []), key=int) == sorted(all_ids, key=int)  # disjoint and complete
    assert abs(len(parts["test.csv"]) - 0.2 * len(all_ids)) <= 1
    shard_sizes = [len(parts[f"participant-{i}/train.csv"]) + len(parts[f"participant-{i}/test.csv"]) for i in range(participants)]
    assert max(shard_sizes) - min(shard_sizes) <= 1, shard_sizes
    for index, size in enumerate(shard_sizes):
        assert abs(len(parts[f"participant-{index}/test.csv"]) - 0.2 * size) <= 1


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*.csv"))}


# -- split-data ----------------------------------------------------------------------------------------


def test_split_data_generates_a_synthetic_data_set_and_shards_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = split(data, PARTICIPANTS, seed=7)
    assert "generated a synthetic one" in result.stdout, result.stdout

    columns, rows = read_rows(data / "train.csv")
    assert len(rows) == 1460
    assert len(columns) == 81
    used = ["Id", "LotArea", "OverallQual", "OverallCond", "YearBuilt", "GrLivArea", "TotalBsmtSF", "GarageCars", "FullBath"]
    assert set(used + ["BedroomAbvGr", "Neighborhood", "SalePrice"]) <= set(columns)
    prices = sorted(int(row["SalePrice"]) for row in rows)
    assert 120_000 < prices[len(prices) // 2] < 220_000, "median price"
    assert 30_000 <= prices[0] and prices[-1] <= 800_000
    assert len({row["Neighborhood"] for row in rows}) >= 20
    assert any(row["LotFrontage"] == "NA" for row in rows), "Kaggle's missing values are there too"
    assert all(1872 <= int(row["YearBuilt"]) <= int(row["YrSold"]) <= 2010 for row in rows)

    assert_partition(data, PARTICIPANTS, [row["Id"] for row in rows])
    for index in range(PARTICIPANTS):
        assert read_rows(data / f"participant-{index}" / "train.csv")[0] == columns

    # The same seed gives the same files; another seed other data.
    again = tmp_path / "again"
    split(again, PARTICIPANTS, seed=7)
    assert files_of(again) == files_of(data)
    other = tmp_path / "other"
    split(other, PARTICIPANTS, seed=8)
    assert (other / "train.csv").read_bytes() != (data / "train.csv").read_bytes()
    assert ids(other / "test.csv") != ids(data / "test.csv")


def test_split_data_shards_kaggle_input_instead_of_generating(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    neighbourhoods = ["NAmes", "CollgCr", "OldTown", "Edwards", "NoSuchPlace"]
    rows = []
    for i in range(1, 43):
        row = {
            "Id": str(i), "MSSubClass": "60", "MSZoning": "RL", "LotFrontage": "NA" if i % 4 == 0 else str(60 + i),
            "LotArea": str(8000 + 100 * i), "Street": "Pave", "Alley": "NA", "Neighborhood": neighbourhoods[i % 5],
            "OverallQual": str(4 + i % 6), "OverallCond": "5", "YearBuilt": str(1950 + i), "YearRemodAdd": str(1960 + i),
            "MasVnrArea": "NA" if i % 7 == 0 else "0", "TotalBsmtSF": "" if i % 9 == 0 else str(800 + 10 * i),
            "1stFlrSF": str(900 + 10 * i), "2ndFlrSF": "0", "GrLivArea": str(900 + 10 * i), "FullBath": "2",
            "HalfBath": "0", "BedroomAbvGr": "3", "TotRmsAbvGrd": "6", "Fireplaces": "1",
            "GarageYrBlt": "NA" if i % 5 == 0 else str(1950 + i), "GarageCars": "NA" if i % 11 == 0 else "2",
            "GarageArea": "480", "SaleCondition": "Normal", "SalePrice": str(100_000 + 2_000 * i),
        }  # fmt: skip
        rows.append(row)
    rows[-1]["SalePrice"] = "NA"  # unusable: skipped
    source = data / "train.csv"
    with open(source, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=KAGGLE_LIKE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    original = source.read_bytes()

    result = split(data, 2, seed=1)
    assert "sharding" in result.stdout and "synthetic" not in result.stdout, result.stdout
    assert "skipped 1 row(s) without a usable SalePrice" in result.stdout
    assert source.read_bytes() == original
    assert_partition(data, 2, [row["Id"] for row in rows[:-1]])
    # Rows are copied as they are, missing values included.
    columns, shard = read_rows(data / "participant-0" / "train.csv")
    assert columns == KAGGLE_LIKE_COLUMNS
    by_id = {row["Id"]: row for row in rows}
    assert all(row == by_id[row["Id"]] for row in shard)

    # The model reads them: missing values take fixed fill values, an unknown neighbourhood no one-hot.
    example = load_example()
    features, targets = example.load_data_set(data / "participant-0" / "train.csv")
    assert features.shape == (len(shard), len(example.FEATURE_NAMES))
    assert targets.shape == (len(shard),)
    assert (abs(features) <= example.CLIP).all() and abs(targets).max() < 10


def test_split_data_into_fewer_participants_removes_the_extra_directories(tmp_path: Path) -> None:
    data = tmp_path / "data"
    split(data, 4, seed=0)
    (data / "participant-1" / "metrics.csv").write_text("round\n0\n", encoding="utf-8")
    split(data, 2, seed=0)
    assert sorted(path.name for path in data.glob("participant-*")) == ["participant-0", "participant-1"]
    assert not (data / "participant-1" / "metrics.csv").exists()
    assert_partition(data, 2, ids(data / "train.csv"))


# -- a federated training with the real daemons ------------------------------------------------------------


@contextlib.contextmanager
def federation(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    """A coordinator and an aggregator wired together (as in test_end_to_end.py), in development mode."""
    aggregator_port = free_loopback_port()
    coordinator_dir, aggregator_dir = tmp_path / "coordinator", tmp_path / "aggregator"
    coordinator_dir.mkdir()
    aggregator_dir.mkdir()
    coordinator_config = write_yaml(
        coordinator_dir / "coordinator.yaml",
        {
            "development": True,
            "api": {"listen": LOOPBACK_ANY_PORT},
            "pb": {"listen": LOOPBACK_ANY_PORT},
            "federated_learning": {
                "rounds": ROUNDS,
                "participants_ratio": 1.0,
                "min_clients": PARTICIPANTS,
                "heartbeat_timeout": 5.0,
                "training_timeout": 30.0,
            },
            "aggregator": {"url": f"http://127.0.0.1:{aggregator_port}", "admit_timeout": 5.0, "aggregation_timeout": 30.0},
            "state_dir": str(coordinator_dir / "state"),
        },
    )
    with Daemon("xain-coordinator", coordinator_config, coordinator_dir, listeners=(COORDINATOR_HTTP, COORDINATOR_PB)) as coordinator:
        aggregator_config = write_yaml(
            aggregator_dir / "aggregator.yaml",
            {
                "development": True,
                "api": {"listen": f"tcp:{aggregator_port}:interface=127.0.0.1"},
                "coordinator": {"pb": f"tcp:127.0.0.1:{coordinator.ports[COORDINATOR_PB]}"},
                "state_dir": str(aggregator_dir / "state"),
            },
        )
        with Daemon("xain-aggregator", aggregator_config, aggregator_dir, listeners=(AGGREGATOR_HTTP,)) as aggregator:
            coordinator.wait_for(
                lambda: get_json(coordinator.url(COORDINATOR_HTTP, "/status"))[1]["aggregator_attached"],
                "the aggregator to attach",
            )
            yield coordinator, aggregator


@contextlib.contextmanager
def participant_processes(commands: list[list[str]], directory: Path) -> Iterator[list[tuple[subprocess.Popen[bytes], Path]]]:
    """Start each command with its stdout and stderr in a file; stop whatever still runs at exit."""
    started: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for index, command in enumerate(commands):
            output = directory / f"participant-{index}.out"
            with open(output, "wb") as stream:
                started.append((subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stream, stderr=subprocess.STDOUT), output))
        yield started
    finally:
        for process, _ in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in started:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def metrics_of(path: Path) -> list[dict[str, str]]:
    return read_rows(path)[1]


def test_federated_training_improves_the_global_model(tmp_path: Path) -> None:
    data = tmp_path / "data"
    split(data, PARTICIPANTS, seed=0)
    with federation(tmp_path) as (coordinator, aggregator):
        urls = [
            coordinator.url(COORDINATOR_HTTP, ""),
            coordinator.url(COORDINATOR_HTTP, ""),
            f"pb://127.0.0.1:{coordinator.ports[COORDINATOR_PB]}",
        ]
        commands = [
            [
                sys.executable, str(SCRIPT), "run-participant",
                "--data-directory", str(data / f"participant-{index}"),
                "--coordinator-url", url,
                "--heartbeat-period", str(HEARTBEAT_PERIOD),
                "--epochs", str(EPOCHS),
                "--learning-rate", str(LEARNING_RATE),
                "--global-test", str(data / "test.csv"),
                "--seed", str(index),
            ]  # fmt: skip
            for index, url in enumerate(urls)
        ]
        started = time.monotonic()
        with participant_processes(commands, tmp_path) as processes:

            def outputs() -> str:
                texts = [
                    f"--- participant {i} (exit {process.poll()}) ---\n{output.read_text(errors='replace')}"
                    for i, (process, output) in enumerate(processes)
                ]
                return "\n".join(texts) + f"\n--- coordinator ---\n{coordinator.log_text}\n--- aggregator ---\n{aggregator.log_text}"

            def ended() -> bool:
                codes = [process.poll() for process, _ in processes]
                return all(code is not None for code in codes) or any(code not in (None, 0) for code in codes)

            try:
                wait_until(ended, TRAINING_TIMEOUT, "the participants to finish", interval=0.05)
            except AssertionError as error:
                raise AssertionError(f"{error}\n{outputs()}") from None
            assert [process.returncode for process, _ in processes] == [0] * PARTICIPANTS, outputs()
            elapsed = time.monotonic() - started

        status = get_json(coordinator.url(COORDINATOR_HTTP, "/status"))[1]
        assert (status["round"], status["phase"]) == (ROUNDS, "complete"), status

    metrics = [metrics_of(data / f"participant-{index}" / "metrics.csv") for index in range(PARTICIPANTS)]
    for rows in metrics:
        assert [int(row["round"]) for row in rows] == list(range(ROUNDS))
        # Round 0 starts from zeros: there is no global model to evaluate yet.
        assert rows[0]["global_model_test_r2"] == rows[0]["global_model_global_test_r2"] == ""
        assert all(float(row["local_model_global_test_r2"]) > 0 for row in rows)
    # Every participant evaluates the same global model on the same global test set.
    global_r2 = [float(row["global_model_global_test_r2"]) for row in metrics[0][1:]]
    for rows in metrics[1:]:
        assert [float(row["global_model_global_test_r2"]) for row in rows[1:]] == pytest.approx(global_r2, abs=1e-5)

    first, last = global_r2[0], global_r2[-1]
    summary = f"global model R² by round {[round(r2, 3) for r2 in global_r2]} (rounds 1..{ROUNDS - 1}), {elapsed:.1f} s"
    print(summary)
    assert last > 0.6, summary
    assert last > first + 0.2, summary
    assert all(later >= earlier - 0.01 for earlier, later in zip(global_r2, global_r2[1:])), summary
    # Each participant's own held-out set agrees that the model got better.
    for rows in metrics:
        assert float(rows[-1]["global_model_test_r2"]) > float(rows[1]["global_model_test_r2"]) + 0.1, rows

    # The final global model (aggregated after the last round, kept by the aggregator) is better still.
    state = tmp_path / "aggregator" / "state"
    model_file = json.loads((state / "aggregator.json").read_text(encoding="utf-8"))["model_file"]
    result = run_script("evaluate", "--weights", state / model_file, "--data", data / "test.csv")
    assert result.returncode == 0, result.stdout + result.stderr
    final = float(re.search(r"R² (-?[0-9.]+)$", result.stdout.strip())[1])  # type: ignore[index]
    print(f"final global model R² {final:.3f}")
    assert final > last, f"{summary}; final model R² {final}"


# -- plot-metrics ----------------------------------------------------------------------------------------------


def write_metrics(path: Path, rounds: int, offset: float) -> None:
    example = load_example()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=example.METRICS_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for r in range(rounds):
            loss = 1.0 / (r + 1) + offset
            writer.writerow(
                {
                    "round": r,
                    "training_rows": 300,
                    "global_model_test_loss": "" if r == 0 else loss * 1.1,
                    "global_model_test_r2": "" if r == 0 else 1 - loss * 1.1,
                    "global_model_global_test_loss": "" if r == 0 else loss * 1.05,
                    "global_model_global_test_r2": "" if r == 0 else 1 - loss * 1.05,
                    "local_model_test_loss": loss,
                    "local_model_test_r2": 1 - loss,
                    "local_model_global_test_loss": loss,
                    "local_model_global_test_r2": 1 - loss,
                    "seconds": 0.01,
                }
            )


def test_plot_metrics_writes_a_png(tmp_path: Path) -> None:
    # No importorskip: matplotlib is a test requirement (setup.py's test extra, python3-matplotlib in Debian).
    data = tmp_path / "data"
    for index in range(PARTICIPANTS):
        write_metrics(data / f"participant-{index}" / "metrics.csv", rounds=5, offset=0.05 * index)
    output = tmp_path / "plots" / "metrics.png"
    result = run_script("plot-metrics", "--data-directory", data, "--output", output)
    assert result.returncode == 0, result.stdout + result.stderr
    assert output.stat().st_size > 10_000
    assert output.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_plot_metrics_without_metrics_says_so(tmp_path: Path) -> None:
    result = run_script("plot-metrics", "--data-directory", tmp_path, "--output", tmp_path / "metrics.png")
    assert result.returncode == 1
    assert "no metrics found" in result.stderr
    assert not (tmp_path / "metrics.png").exists()


def test_plot_metrics_without_matplotlib_names_the_extra(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_metrics(data / "participant-0" / "metrics.csv", rounds=2, offset=0.0)
    # Run the script as __main__ with matplotlib made unimportable.
    hide = "import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    result = subprocess.run(
        [sys.executable, "-c", hide, str(SCRIPT), "plot-metrics", "--data-directory", str(data), "--output", str(tmp_path / "m.png")],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pip install 'xaind[examples]'" in result.stderr
    assert not (tmp_path / "m.png").exists()


# -- a poisoned participant, and the strategies that withstand it ------------------------------------------------


def test_an_attacking_participant_uploads_its_update_reversed_and_scaled(tmp_path: Path) -> None:
    example = load_example()
    data = tmp_path / "data"
    split(data, 2, seed=0)
    directory = data / "participant-0"

    def participant(attack_scale: float | None, name: str) -> object:
        return example.HousePriceParticipant(
            directory, None, 1, 0.02, 32, seed=5, attack_scale=attack_scale, metrics_path=tmp_path / f"{name}.csv"
        )

    honest, attacker = participant(None, "honest"), participant(7.0, "attacker")
    global_model = np.linspace(-0.5, 0.5, example.NUMBER_OF_WEIGHTS).astype(np.float32)
    for weights in (None, global_model):  # the first round (no global model: from zeros), then a later one
        honest_weights, honest_rows = honest.train_round(weights)
        poisoned, rows = attacker.train_round(weights)
        start = np.zeros(example.NUMBER_OF_WEIGHTS) if weights is None else global_model.astype(np.float64)
        assert rows == honest_rows == len(honest.train_y)  # the sample count stays the honest one
        assert poisoned.dtype == np.float32
        update = honest_weights.astype(np.float64) - start
        assert np.linalg.norm(update) > 0.01
        np.testing.assert_allclose(poisoned, start - 7.0 * update, rtol=1e-5, atol=1e-5)
    # The attacker's metrics are those of its honest model: the same as the honest participant's.
    honest_rows_csv, attacker_rows_csv = metrics_of(tmp_path / "honest.csv"), metrics_of(tmp_path / "attacker.csv")
    drop_seconds = [{key: value for key, value in row.items() if key != "seconds"} for row in honest_rows_csv]
    assert drop_seconds == [{key: value for key, value in row.items() if key != "seconds"} for row in attacker_rows_csv]


def final_r2(run_directory: Path) -> tuple[list[int], list[float]]:
    rows = metrics_of(run_directory / "global-model.csv")
    return [int(row["round"]) for row in rows], [float(row["global_test_r2"]) for row in rows]


def test_median_keeps_the_model_useful_where_fedavg_is_poisoned(tmp_path: Path) -> None:
    """compare-strategies as a user runs it, small: 5 participants (the last attacks), 4 rounds, fedavg and median."""
    data, output = tmp_path / "data", tmp_path / "strategies.png"
    rounds = 4
    result = run_script(
        "compare-strategies", "--data-directory", data, "--participants", 5, "--attackers", 1, "--rounds", rounds,
        "--strategies", "fedavg,median", "--no-baseline", "--output", output,
        timeout=120.0,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    work = data / "strategies"
    fedavg_rounds, fedavg = final_r2(work / "fedavg")
    median_rounds, median = final_r2(work / "median")
    summary = f"fedavg R² by round {fedavg}, median {median}\n{result.stdout}"
    assert fedavg_rounds == median_rounds == list(range(1, rounds + 1)), summary
    # The median ignores the one reversed, amplified update and learns as if it were not there;
    # the weighted average follows it away from the fit, further every round.
    assert all(r2 > 0.7 for r2 in median), summary
    assert fedavg[-1] < 0 and fedavg[-1] < fedavg[0], summary
    assert all(later < earlier for earlier, later in zip(fedavg, fedavg[1:])), summary
    # The table quotes each final R² (the final model, evaluated by the command).
    quoted = re.finditer(r"^(\w+), 1 attacker +(-?[0-9.]+(?:e[+-]?[0-9]+)?) ", result.stdout, re.MULTILINE)
    table = {match[1]: float(match[2]) for match in quoted}
    assert table == pytest.approx({"fedavg": fedavg[-1], "median": median[-1]}, rel=1e-3, abs=1e-3), summary
    # The aggregator ran the configured rule; the last participant attacked and the others did not.
    assert json.loads((work / "fedavg" / "run.json").read_text(encoding="utf-8"))["aggregation"] is None  # the default section
    assert json.loads((work / "median" / "run.json").read_text(encoding="utf-8"))["aggregation"] == {"strategy": "median"}
    outputs = [(work / "median" / f"participant-{index}.out").read_text(encoding="utf-8") for index in range(5)]
    assert ["ATTACKING" in text for text in outputs] == [False] * 4 + [True], outputs
    assert output.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and output.stat().st_size > 10_000


def test_compare_strategies_reports_what_the_aggregator_refuses(tmp_path: Path) -> None:
    """An unknown rule is refused at start-up; krum with f 2 cannot aggregate 3 results: the round fails at once."""
    data = tmp_path / "data"
    result = run_script(
        "compare-strategies", "--data-directory", data, "--participants", 3, "--rounds", 1, "--byzantine", 2,
        "--strategies", "no_such_rule,krum", "--no-baseline", "--output", tmp_path / "strategies.png",
        timeout=60.0,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    lines = {line.split(",")[0]: line for line in result.stdout.splitlines() if ", 1 attacker " in line}
    assert re.search(r"failed .*aggregation\.strategy", lines["no_such_rule"]), result.stdout
    assert re.search(r"failed +aggregation of round 0 failed: .*krum.*byzantine", lines["krum (f 2)"]), result.stdout
    assert not (tmp_path / "strategies.png").exists()


def test_compare_strategies_needs_an_honest_participant(tmp_path: Path) -> None:
    result = run_script("compare-strategies", "--data-directory", tmp_path, "--participants", 2, "--attackers", 2)
    assert result.returncode == 2
    assert "--attackers must be fewer than --participants (2), got 2" in result.stderr


def test_plot_metrics_compares_runs_on_one_chart(tmp_path: Path) -> None:
    runs = []
    for name, offset in (("fedavg", 5.0), ("median", 0.05)):
        run = tmp_path / "strategies" / name
        for index in range(2):
            write_metrics(run / f"participant-{index}" / "metrics.csv", rounds=5, offset=offset)
        runs.append(run)
    example = load_example()
    curve = example.global_model_curve(runs[1])
    assert curve.label == "median" and curve.rounds == [1, 2, 3, 4]
    assert curve.r2 == pytest.approx([1 - (1.0 / (r + 1) + 0.05) * 1.05 for r in range(1, 5)])
    output = tmp_path / "strategies.png"
    result = run_script("plot-metrics", "--compare", *runs, "--output", output)
    assert result.returncode == 0, result.stdout + result.stderr
    assert output.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and output.stat().st_size > 10_000

    empty = tmp_path / "strategies" / "krum"
    empty.mkdir()
    result = run_script("plot-metrics", "--compare", runs[0], empty, "--output", tmp_path / "other.png")
    assert result.returncode == 1
    assert f"no global-model metrics in {empty}" in result.stderr
    assert not (tmp_path / "other.png").exists()
