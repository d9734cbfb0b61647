"""A coordinator and several aggregator shards on loopback, wired together (tests and `make scale-demo`).

The counterpart of `xaind.tools.daemons.federation` for `aggregator.shards`
above 1: every shard is its own `twistd xain-aggregator` with a `shard`
section, on a port reserved beforehand (the coordinator hands it out), in
a directory of its own. Nothing here needs a reactor: every wait blocks,
polling, bounded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from xaind.protocol import AGGREGATOR_HTTP_LISTENER, COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER
from xaind.tools.daemons import (
    LOOPBACK_ANY_PORT,
    START_TIMEOUT,
    Daemon,
    Federation,
    aggregator_document,
    coordinator_document,
    free_loopback_port,
    write_yaml,
)


def shard_name(index: int) -> str:
    """Shards are named in the order the reduce adds them: shard-0, shard-1, ..."""
    return f"shard-{index}"


@dataclass
class ShardedFederation(Federation):
    """A coordinator and its shards; `aggregator` and `aggregator_port` are shard 0's."""

    shards: list[Daemon] = field(default_factory=list)
    shard_ports: list[int] = field(default_factory=list)

    @property
    def aggregator_state(self) -> Path:
        return self.shard_state(0)

    def shard_state(self, index: int) -> Path:
        return self.directory / shard_name(index) / "state"

    def shard_model(self, index: int, round_number: int) -> np.ndarray:
        """The global model shard `index` installed after `round_number` rounds."""
        return np.load(self.shard_state(index) / f"model-{round_number}.npy", allow_pickle=False)

    def wait_until_shards_attached(self, count: int, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        return self.wait_for_status(
            lambda status: len(status["aggregator_shards"]) == count,
            f"the coordinator's /status to list {count} attached shard(s)",
            timeout,
        )

    def restart_shard(self, index: int) -> Daemon:
        """Start shard `index` again on its configuration (port, state directory); stopped by `stack`."""
        previous = self.shards[index]
        self.aggregator_starts += 1
        again = Daemon(previous.plugin, previous.config, previous.directory, listeners=previous.listeners,
                       name=f"{shard_name(index)}-{self.aggregator_starts}")
        self.shards[index] = self.stack.enter_context(again)
        if index == 0:
            self.aggregator = self.shards[0]
        return self.shards[index]

    def describe(self) -> str:
        parts = [f"--- coordinator log ---\n{self.coordinator.log_text}{self.coordinator.output}"]
        for index, shard in enumerate(self.shards):
            parts.append(f"--- {shard_name(index)} log ---\n{shard.log_text}{shard.output}")
        return "\n".join(parts)


ShardedT = TypeVar("ShardedT", bound=ShardedFederation)


@contextlib.contextmanager
def sharded_federation(
    directory: str | os.PathLike[str],
    *,
    shards: int,
    secret: str,
    federated_learning: Mapping[str, Any],
    admit_timeout: float,
    aggregation_timeout: float = 30.0,
    call_timeout: float = 10.0,
    heartbeat_hold: float | None = None,
    shard_sections: Mapping[str, Any] | None = None,
    shard_listeners: tuple[str, ...] = (AGGREGATOR_HTTP_LISTENER,),
    api_listen: str = LOOPBACK_ANY_PORT,
    pb_listen: str = LOOPBACK_ANY_PORT,
    kind: Callable[..., ShardedT] = ShardedFederation,  # type: ignore[assignment]
) -> Iterator[ShardedT]:
    """A coordinator with `aggregator.shards: shards` and that many shards, all attached; all stopped at exit.

    `shard_sections` adds top-level sections to every shard's configuration
    (`storage`, `metrics`, ...), whose listeners `shard_listeners` names.
    When the body raises, every log is printed.
    """
    directory = Path(directory)
    ports = [free_loopback_port() for _ in range(shards)]
    with contextlib.ExitStack() as stack:
        coordinator_dir = directory / "coordinator"
        coordinator_dir.mkdir(parents=True)
        document = coordinator_document(
            state_dir=coordinator_dir / "state",
            aggregator_port=ports[0],
            secret=secret,
            api_listen=api_listen,
            pb_listen=pb_listen,
            federated_learning=federated_learning,
            aggregator={"admit_timeout": admit_timeout, "aggregation_timeout": aggregation_timeout, "shards": shards},
            heartbeat_hold=heartbeat_hold,
        )
        coordinator = stack.enter_context(
            Daemon("xain-coordinator", write_yaml(coordinator_dir / "coordinator.yaml", document), coordinator_dir,
                   listeners=(COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER))
        )
        started: list[Daemon] = []
        for index, port in enumerate(ports):
            shard_dir = directory / shard_name(index)
            shard_dir.mkdir(parents=True)
            shard_document = aggregator_document(
                state_dir=shard_dir / "state",
                port=port,
                coordinator_pb_port=coordinator.ports[COORDINATOR_PB_LISTENER],
                secret=secret,
                call_timeout=call_timeout,
            )
            shard_document["shard"] = {"name": shard_name(index), "url": f"http://127.0.0.1:{port}"}
            shard_document.update(shard_sections or {})
            config = write_yaml(shard_dir / "aggregator.yaml", shard_document)
            started.append(stack.enter_context(Daemon("xain-aggregator", config, shard_dir, listeners=shard_listeners,
                                                      name=shard_name(index))))
        fed = kind(directory=directory, stack=stack, coordinator=coordinator, aggregator=started[0], aggregator_port=ports[0],
                   shards=started, shard_ports=ports)
        try:
            fed.wait_until_shards_attached(shards)
            yield fed
        except BaseException:
            print(fed.describe())
            raise
