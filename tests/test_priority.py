"""Background threads (xaind.priority): lower CPU priority for folding and aggregating."""

from __future__ import annotations

import os
import threading

import pytest_twisted
from twisted.internet import reactor

from xaind.priority import BACKGROUND_NICE, run_in_background


def test_a_background_thread_runs_at_a_lower_priority_and_the_others_do_not():
    before = os.getpriority(os.PRIO_PROCESS, 0)
    seen: list[int] = []

    def background() -> None:
        run_in_background()
        run_in_background()  # once per thread: not lowered twice
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=background)
    thread.start()
    thread.join(10)
    assert seen == [min(before + BACKGROUND_NICE, 19)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


@pytest_twisted.ensureDeferred
async def test_the_aggregators_worker_folds_at_a_lower_priority_and_its_disk_threads_do_not():
    from xaind.aggregator.threads import DiskThreads, SerialWorker

    def own_priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    normal = os.getpriority(os.PRIO_PROCESS, 0)
    worker, disk = SerialWorker(reactor, "test-worker"), DiskThreads(reactor, "test-disk")
    worker.start()
    disk.start()
    try:
        assert await worker.run(own_priority).addTimeout(10, reactor) == min(normal + BACKGROUND_NICE, 19)
        assert await disk.run(own_priority).addTimeout(10, reactor) == normal
    finally:
        worker.stop()
        disk.stop()
