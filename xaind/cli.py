"""`xaind`: operator commands that need no running daemon."""

from __future__ import annotations

import argparse
import sys

from xaind.aggregator.settings import AggregatorDaemonSettings
from xaind.config import ConfigError, load_yaml_file, without_inherited_sockets
from xaind.coordinator.settings import CoordinatorSettings

KINDS = {"coordinator": CoordinatorSettings, "aggregator": AggregatorDaemonSettings}
COORDINATOR_KEYS = {"federated_learning", "pb", "aggregator"}
AGGREGATOR_KEYS = {"coordinator", "aggregation", "limits"}


def guess_kind(document: object) -> str | None:
    keys = set(document) if isinstance(document, dict) else set()
    if keys & COORDINATOR_KEYS and not keys & AGGREGATOR_KEYS:
        return "coordinator"
    if keys & AGGREGATOR_KEYS and not keys & COORDINATOR_KEYS:
        return "aggregator"
    return None


def checkconfig(path: str, kind: str | None) -> int:
    try:
        document = load_yaml_file(path)
        kind = kind or guess_kind(document)
        if kind is None:
            print(f"{path}: cannot tell a coordinator from an aggregator configuration; pass --kind", file=sys.stderr)
            return 2
        with without_inherited_sockets():
            KINDS[kind].from_mapping(document, source=path)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"{path}: valid {kind} configuration")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xaind", description="xaind operator commands.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("checkconfig", help="check a daemon configuration file and report every problem")
    check.add_argument("path", metavar="FILE")
    check.add_argument("--kind", choices=sorted(KINDS), help="the daemon the file configures (guessed from its keys if omitted)")
    arguments = parser.parse_args(argv)
    return checkconfig(arguments.path, arguments.kind)


if __name__ == "__main__":
    sys.exit(main())
