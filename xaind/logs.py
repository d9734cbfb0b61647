"""Logging for xaind's own namespaces, with a level taken from configuration.

twistd owns the global log observers, so the configured level is applied by
routing xaind's loggers through one filtering observer instead of replacing
twistd's: Twisted's own start-up and shutdown lines stay as they are.
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

ROOT_NAMESPACE = "xaind"

_levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.debug)
_levels.setLogLevelForNamespace(ROOT_NAMESPACE, LogLevel.info)
_observer = FilteringLogObserver(lambda event: globalLogPublisher(event), [_levels])


def get_logger(namespace: str) -> Logger:
    """A logger under the `xaind` namespace whose events obey `set_level`."""
    if namespace != ROOT_NAMESPACE and not namespace.startswith(ROOT_NAMESPACE + "."):
        namespace = f"{ROOT_NAMESPACE}.{namespace}"
    return Logger(namespace=namespace, observer=_observer)


def set_level(level_name: str) -> None:
    """Set the lowest level logged by xaind (`debug`, `info`, `warn`, `error`, `critical`)."""
    _levels.setLogLevelForNamespace(ROOT_NAMESPACE, LogLevel.levelWithName(level_name))
