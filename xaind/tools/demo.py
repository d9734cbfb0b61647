"""`make demo`: both daemons and dummy participants through a whole training, on loopback.

Everything runs in a temporary directory with OS-chosen loopback ports, so
the demo never collides with daemons already running, and both daemons are
stopped at the end whatever happens. The coordinator's status page is at the
URL printed first; with `--hold` both daemons stay up after training, so that
a person can look at it, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from xaind.protocol import AGGREGATOR_HTTP_LISTENER, COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER
from xaind.tools.daemons import (
    Daemon,
    aggregator_document,
    coordinator_document,
    dummy_participants_command,
    free_loopback_port,
    get_json,
    write_yaml,
)
from xaind.tools.dummy_participants import MODEL_SIZES

COORDINATOR_LISTENERS = (COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER)
#: Seconds between two looks at the held daemons (`--hold`).
HOLD_LOOK_INTERVAL = 1.0


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="xaind-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model-size", choices=list(MODEL_SIZES), default="1MB")
    parser.add_argument("--transport", choices=("http", "pb"), default="http")
    parser.add_argument("--hold", action="store_true", help="keep both daemons up after training until Ctrl-C (to look at the status page)")
    return parser.parse_args(argv)


def run(arguments: argparse.Namespace, directory: Path) -> int:
    aggregator_port = free_loopback_port()
    coordinator_config = write_yaml(
        directory / "coordinator.yaml",
        coordinator_document(
            state_dir=directory / "coordinator-state",
            aggregator_port=aggregator_port,
            federated_learning={
                "rounds": arguments.rounds,
                "participants_ratio": 1.0,
                "min_clients": arguments.participants,
                "heartbeat_timeout": 10,
                "training_timeout": 300,
            },
        ),
    )
    with Daemon("xain-coordinator", coordinator_config, directory, listeners=COORDINATOR_LISTENERS) as coordinator:
        http_port, pb_port = (coordinator.ports[name] for name in COORDINATOR_LISTENERS)
        say(f"coordinator (pid {coordinator.pid}) on http://127.0.0.1:{http_port}, PB on 127.0.0.1:{pb_port}")
        say(f"status page: http://127.0.0.1:{http_port}/")
        aggregator_config = write_yaml(
            directory / "aggregator.yaml",
            aggregator_document(state_dir=directory / "aggregator-state", port=aggregator_port, coordinator_pb_port=pb_port),
        )
        with Daemon("xain-aggregator", aggregator_config, directory, listeners=(AGGREGATOR_HTTP_LISTENER,)) as aggregator:
            say(f"aggregator (pid {aggregator.pid}) on http://127.0.0.1:{aggregator_port}")
            coordinator.wait_for(
                lambda: get_json(f"http://127.0.0.1:{http_port}/status")[1]["aggregator_attached"],
                "the aggregator to log in to the coordinator",
            )
            url = f"http://127.0.0.1:{http_port}" if arguments.transport == "http" else f"pb://127.0.0.1:{pb_port}"
            say(f"{arguments.participants} dummy participants, {arguments.rounds} rounds, model {arguments.model_size}, over {arguments.transport}")
            started = time.monotonic()
            participants = subprocess.run(
                [
                    *dummy_participants_command(),
                    "--number-of-participants", str(arguments.participants),
                    "--heartbeat-period", "0.2",
                    "--model-size", arguments.model_size,
                    "--coordinator-url", url,
                ],
                stdin=subprocess.DEVNULL,
                timeout=600,
                check=False,
            )
            elapsed = time.monotonic() - started
            _, status = get_json(f"http://127.0.0.1:{http_port}/status")
            say(f"coordinator: round {status['round']} of {status['rounds']}, phase {status['phase']}")
            model_path = directory / "aggregator-state" / f"model-{arguments.rounds}.npy"
            if participants.returncode != 0 or status["phase"] != "complete" or not model_path.exists():
                say(f"training did not complete (participants exited with {participants.returncode})")
                return 1
            model = np.load(model_path, allow_pickle=False)
            expected = np.linspace(-1.0, 1.0, model.size, dtype=np.float32)
            say(
                f"final global model: {model.dtype} array of {model.size} values, "
                f"equal to the average of the participants' weights: {bool(np.allclose(model, expected))}"
            )
            say(f"training took {elapsed:.1f} s")
            say_aggregation_report(aggregator, aggregator_port, arguments.rounds - 1)
            if arguments.hold:
                hold((coordinator, aggregator), f"http://127.0.0.1:{http_port}/")
    say("both daemons stopped")
    return 0


def hold(running: tuple[Daemon, ...], page_url: str) -> None:
    """Keep the daemons up until Ctrl-C (or until one of them exits): a person is looking at the status page."""
    say(f"holding both daemons up (--hold): the status page is at {page_url}; Ctrl-C stops them")
    try:
        while True:
            for daemon in running:
                if not daemon.running:
                    say(f"{daemon.name} exited while held (exit code {daemon.process.returncode if daemon.process else None})")
                    return
            try:
                # Waits for a person, not for a condition: woken by Ctrl-C, or after a second to look again.
                running[0].process.wait(HOLD_LOOK_INTERVAL)  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:
        say("Ctrl-C: stopping both daemons")


def say_aggregation_report(aggregator: Daemon, port: int, last_round: int) -> None:
    """The aggregator's report of the last round (made just after its model): strategy, update norms, privacy."""

    def reported() -> dict | None:
        status = get_json(f"http://127.0.0.1:{port}/status")[1]
        report = status.get("last_aggregation")
        return status if report is not None and report["round"] == last_round else None

    status = aggregator.wait_for(reported, "the aggregator's report of the last round")
    report = status["last_aggregation"]
    say(
        f"aggregator: round {report['round']} aggregated with {report['strategy']} from {report['results']} result(s), "
        f"median update norm {report['median_update_norm']:.4g}, outliers: {len(report['outliers'])}"
    )
    if status["privacy"] is not None:
        privacy = status["privacy"]
        say(f"privacy spent: epsilon {privacy['epsilon']} at delta {privacy['delta']} after {privacy['rounds']} round(s)")


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    directory = Path(tempfile.mkdtemp(prefix="xaind-demo-"))
    try:
        return run(arguments, directory)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
