"""`xaind`: operator commands: `checkconfig` (no daemon needed) and `top` (a running coordinator's status)."""

from __future__ import annotations

import argparse
import sys

from xaind.aggregator.settings import AggregatorDaemonSettings
from xaind.config import ConfigError, load_yaml_file, without_inherited_sockets
from xaind.coordinator.settings import CoordinatorSettings
from xaind.top import DEFAULT_INTERVAL, DEFAULT_TIMEOUT, run

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
    top = commands.add_parser(
        "top", help="show a coordinator's /status (and its aggregator's) in the terminal, refreshed until Ctrl-C"
    )
    top.add_argument("url", metavar="URL", help="the coordinator's HTTP API, e.g. http://127.0.0.1:8081")
    top.add_argument("aggregator_url", metavar="AGGREGATOR_URL", nargs="?", help="the aggregator's HTTP API, shown too")
    top.add_argument("--once", action="store_true", help="print one frame and exit (for scripts)")
    top.add_argument("--interval", type=positive_seconds, default=DEFAULT_INTERVAL, help="seconds between frames (default %(default)s)")
    top.add_argument("--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT, help="seconds one request may take (default %(default)s)")
    top.add_argument("--ca-file", help="the CA to verify https:// URLs with (default: the system's)")
    arguments = parser.parse_args(argv)
    if arguments.command == "top":
        urls = [arguments.url] + ([arguments.aggregator_url] if arguments.aggregator_url else [])
        return run(urls, once=arguments.once, interval=arguments.interval, timeout=arguments.timeout, ca_file=arguments.ca_file)
    return checkconfig(arguments.path, arguments.kind)


def positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return seconds


if __name__ == "__main__":
    sys.exit(main())
