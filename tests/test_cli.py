"""`xaind checkconfig`: every problem of a configuration file, without starting a daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from xaind.cli import main

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name, kind", [("coordinator.yaml", "coordinator"), ("aggregator.yaml", "aggregator")])
def test_shipped_configurations_are_valid(name: str, kind: str, capsys) -> None:
    path = REPOSITORY / "etc" / "xain" / name
    assert main(["checkconfig", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: valid {kind} configuration"


def test_every_problem_is_reported_with_its_key(tmp_path: Path, capsys) -> None:
    config = tmp_path / "coordinator.yaml"
    config.write_text("development: true\nfederated_learning:\n  participants_ratio: 1.5\n  rounds: 0\n")
    assert main(["checkconfig", str(config)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "config error: federated_learning.rounds: must be at least 1, got 0",
        "config error: federated_learning.participants_ratio: must be in (0, 1], got 1.5",
    ]


def test_an_aggregator_without_a_secret_is_refused(tmp_path: Path, capsys) -> None:
    config = tmp_path / "aggregator.yaml"
    config.write_text("aggregation:\n  backend: weighted_average\n")
    assert main(["checkconfig", str(config)]) == 1
    assert "config error: coordinator.secret: required" in capsys.readouterr().err


def test_an_ambiguous_file_needs_a_kind(tmp_path: Path, capsys) -> None:
    config = tmp_path / "empty.yaml"
    config.write_text("development: true\n")
    assert main(["checkconfig", str(config)]) == 2
    assert "--kind" in capsys.readouterr().err
    assert main(["checkconfig", "--kind", "aggregator", str(config)]) == 0


def test_a_missing_file_is_one_line(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["checkconfig", str(missing)]) == 1
    assert capsys.readouterr().err.strip() == f"config error: {missing}: no such file"


def socket_activated_coordinator(tmp_path: Path) -> Path:
    config = tmp_path / "coordinator.yaml"
    config.write_text(
        "development: true\n"
        "api:\n  listen: systemd:domain=INET:index=0\n"
        "pb:\n  listen: systemd:domain=INET:index=1\n"
        "federated_learning:\n  rounds: 1\n"
    )
    return config


def test_socket_activated_listeners_are_checked_without_the_sockets(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    config = socket_activated_coordinator(tmp_path)
    assert main(["checkconfig", str(config)]) == 0
    assert capsys.readouterr().out.strip() == f"{config}: valid coordinator configuration"


def test_a_daemon_without_its_activated_sockets_names_the_listener(tmp_path: Path, monkeypatch) -> None:
    from xaind.config import ConfigError, load_yaml_file
    from xaind.coordinator.settings import CoordinatorSettings

    monkeypatch.delenv("LISTEN_FDS", raising=False)
    config = socket_activated_coordinator(tmp_path)
    with pytest.raises(ConfigError) as refused:
        CoordinatorSettings.from_mapping(load_yaml_file(str(config)), source=str(config))
    assert [path for path, _ in refused.value.problems] == ["api.listen", "pb.listen"]
    assert "no socket with that index was passed by systemd" in str(refused.value)
