"""What both twistd plugins share: the `--config` option, the start-up checks and the log format.

A bad configuration or state directory ends start-up with one line per
problem and a non-zero status, before twistd daemonizes, instead of a usage
dump or a traceback.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from twisted.logger import Logger
from twisted.python import usage

from xaind.config import DEVELOPMENT_SECRET, ConfigError
from xaind.json_log import write_json_lines_from_twistd
from xaind.logs import set_level
from xaind.ready_file import ready_file_problem
from xaind.state import StateFileError


class DaemonOptions(usage.Options):
    """`--config PATH` and `--ready-file PATH`; subclasses name the default path and how to read the file."""

    default_config: ClassVar[str]
    read_settings: ClassVar[Callable[[str], Any]]
    settings: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # usage.Options reads optParameters from the class, not the instance.
        cls.optParameters = [
            ["config", "c", cls.default_config, "Path to the daemon's YAML configuration."],
            ["ready-file", None, None, "Write the bound listeners as JSON to this path once all are listening (see xaind/ready_file.py)."],
        ]

    def postOptions(self) -> None:
        if self["ready-file"] is not None:
            problem = ready_file_problem(self["ready-file"])
            if problem is not None:
                raise SystemExit(problem)
        try:
            self.settings = type(self).read_settings(self["config"])
        except ConfigError as error:
            raise SystemExit(str(error)) from None
        # twistd makes its logger after parsing its command line, from its options: this is
        # the one moment the configuration can choose the format of every line, Twisted's too.
        twistd_options = getattr(self, "parent", None)
        if self.settings.log_format == "json" and twistd_options is not None:
            write_json_lines_from_twistd(twistd_options)


def begin(settings: Any, log: Logger, secret: str, reactor: Any) -> Any:
    """Apply the log level, say which configuration was loaded, and return the reactor to use."""
    set_level(settings.log_level)
    log.info("configuration loaded from {path}", path=os.path.abspath(settings.source))
    if settings.development and secret == DEVELOPMENT_SECRET:
        log.warn("development configuration: the PB link uses the well-known development secret")
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    # What exists once the daemon runs (modules, classes, configuration, services) lives as
    # long as it does: out of the collector's reach, each full collection scans only what came
    # since. With 10,000 connections a full collection had paused the reactor for 60-130 ms.
    reactor.callWhenRunning(gc.freeze)
    return reactor


@contextmanager
def state_dir_checks(state_dir: str) -> Iterator[None]:
    """Turn an unusable or corrupt state directory into one line and a non-zero exit."""
    try:
        os.makedirs(state_dir, exist_ok=True)
        yield
    except OSError as error:
        raise SystemExit(f"config error: state_dir: cannot be used ({error.strerror}): {state_dir}") from None
    except StateFileError as error:
        raise SystemExit(f"state error: {error}") from None
