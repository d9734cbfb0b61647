"""Background threads: CPU-heavy work that must not slow down the control plane.

Folding and aggregating can keep every core busy for seconds. The reactor
threads of the daemons (heartbeats, uploads, downloads) must stay
responsive meanwhile, so the threads doing that work run at a lower CPU
priority: they take what the others leave, and all of it when the others
are idle. Linux sets a nice value per thread; elsewhere nothing changes
(setpriority there would renice the whole process).
"""

from __future__ import annotations

import os
import sys
import threading

#: The nice value added to background threads (CFS weight about 1/10 of a normal thread's).
BACKGROUND_NICE = 10

_lowered = threading.local()


def run_in_background() -> None:
    """Lower the calling thread's CPU priority, once per thread."""
    if getattr(_lowered, "done", False):
        return
    _lowered.done = True
    if sys.platform != "linux":
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except OSError:
        pass  # not allowed here: the thread keeps its priority
