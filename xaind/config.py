"""Reading YAML configuration into typed, immutable settings.

A daemon that starts with a typo in its configuration fails later in a way
nobody connects to the typo. So every value is checked before anything
listens, every error names the dotted path of its key, unknown keys are
errors, and all problems are reported together instead of one per restart.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

__all__ = ["ConfigError", "ConfigReader", "load_yaml_file"]


class ConfigError(Exception):
    """One or more configuration problems, each tied to a key path."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(f"config error: {path}: {message}" for path, message in self.problems)


def load_yaml_file(path: str) -> Mapping[str, Any]:
    """Load a YAML mapping, turning every failure into a `ConfigError` on `path`."""
    try:
        with open(path, encoding="utf-8") as stream:
            document = yaml.safe_load(stream)
    except FileNotFoundError:
        raise ConfigError([(path, "no such file")]) from None
    except OSError as error:
        raise ConfigError([(path, f"cannot be read: {error.strerror}")]) from None
    except UnicodeDecodeError as error:
        raise ConfigError([(path, f"is not UTF-8 text (byte {error.start})")]) from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        position = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError([(path, f"not valid YAML{position}: {problem}")]) from None
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        raise ConfigError([(path, f"must be a mapping of keys to values, got {_kind(document)}")])
    return document


def _kind(value: object) -> str:
    """Name a YAML value's type the way a configuration author thinks of it."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


class ConfigReader:
    """Takes typed values out of one mapping, recording problems instead of raising.

    Readers for nested sections share the root's problem list; `finish()` on
    the root adds the unknown keys of every section and raises if anything
    was wrong.
    """

    def __init__(
        self,
        mapping: Mapping[str, Any],
        prefix: str = "",
        problems: list[tuple[str, str]] | None = None,
        readers: list[ConfigReader] | None = None,
    ) -> None:
        self._mapping = mapping
        self._prefix = prefix
        self._problems: list[tuple[str, str]] = [] if problems is None else problems
        self._readers: list[ConfigReader] = [] if readers is None else readers
        self._readers.append(self)
        self._seen: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self._prefix}{key}"

    def given(self, key: str) -> bool:
        """Whether the mapping sets `key` (to tell a default from a value written out)."""
        return key in self._mapping

    def problem(self, key: str, message: str) -> None:
        self._problems.append((self.path(key), message))

    def section(self, key: str) -> ConfigReader:
        self._seen.add(key)
        value = self._mapping.get(key, {})
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            self.problem(key, f"must be a mapping, got {_kind(value)}")
            value = {}
        return ConfigReader(value, f"{self.path(key)}.", self._problems, self._readers)

    def _take(self, key: str, default: T, check: Callable[[Any], str | None], convert: Callable[[Any], T]) -> T:
        """Return the converted value of `key`, or `default` when absent or wrong."""
        self._seen.add(key)
        if key not in self._mapping:
            return default
        value = self._mapping[key]
        message = check(value)
        if message is not None:
            self.problem(key, message)
            return default
        return convert(value)

    def integer(self, key: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
        def check(value: Any) -> str | None:
            if isinstance(value, bool) or not isinstance(value, int):
                return f"must be a whole number, got {_kind(value)}"
            if minimum is not None and value < minimum:
                return f"must be at least {minimum}, got {value}"
            if maximum is not None and value > maximum:
                return f"must be at most {maximum}, got {value}"
            return None

        return self._take(key, default, check, int)

    def number(
        self,
        key: str,
        default: float,
        *,
        greater_than: float | None = None,
        at_least: float | None = None,
        at_most: float | None = None,
        interval: str | None = None,
    ) -> float:
        """A finite real number, optionally bounded as `greater_than < value <= at_most` (or `at_least <=`).

        `interval` is how the bound reads in an error (e.g. "(0, 1]").
        """

        def check(value: Any) -> str | None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"must be a number, got {_kind(value)}"
            try:
                finite = math.isfinite(value)
            except OverflowError:
                return f"must be a finite number, got one with {len(str(value))} digits"
            if not finite:
                return f"must be a finite number, got {value}"
            too_low = (greater_than is not None and value <= greater_than) or (at_least is not None and value < at_least)
            too_high = at_most is not None and value > at_most
            if too_low or too_high:
                if interval is not None:
                    return f"must be in {interval}, got {value}"
                if too_low and at_least is not None:
                    return f"must be at least {at_least:g}, got {value}"
                if too_low:
                    return f"must be greater than {greater_than:g}, got {value}"
                return f"must be at most {at_most:g}, got {value}"
            return None

        return self._take(key, default, check, float)

    def string(self, key: str, default: str, *, validate: Callable[[str], str | None] | None = None) -> str:
        def check(value: Any) -> str | None:
            if not isinstance(value, str):
                return f"must be a string, got {_kind(value)}"
            if not value.strip():
                return "must not be empty"
            return validate(value) if validate is not None else None

        return self._take(key, default, check, str)

    def boolean(self, key: str, default: bool) -> bool:
        def check(value: Any) -> str | None:
            return None if isinstance(value, bool) else f"must be true or false, got {_kind(value)}"

        return self._take(key, default, check, bool)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        def check(value: Any) -> str | None:
            if value not in choices:
                return f"must be one of {', '.join(choices)}, got {_kind(value)}"
            return None

        return self._take(key, default, check, str)

    def choices(self, key: str, default: tuple[str, ...], choices: tuple[str, ...]) -> tuple[str, ...]:
        """One of `choices`, or a list of distinct ones (in the order given)."""

        def check(value: Any) -> str | None:
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not values or any(item not in choices for item in values):
                return f"must be one of {', '.join(choices)} or a list of them, got {_kind(value)}"
            if len(set(values)) != len(values):
                return f"lists a choice twice: {', '.join(values)}"
            return None

        return self._take(key, default, check, lambda value: (value,) if isinstance(value, str) else tuple(value))

    def finish(self) -> None:
        """Report unknown keys in every section read, then raise if anything was wrong."""
        for reader in self._readers:
            for key in reader._mapping:
                if key not in reader._seen:
                    name = str(key)
                    reader.problem(name if name.isprintable() else repr(name), "unknown key")
        if self._problems:
            raise ConfigError(self._problems)


_SOCKETS_INHERITED = contextvars.ContextVar("sockets_inherited", default=True)


@contextlib.contextmanager
def without_inherited_sockets() -> Iterator[None]:
    """Check `systemd:` listeners without the sockets systemd passes to the daemon it starts.

    A daemon needs the descriptor a `systemd:` listener names; a check of
    the file by hand (`xaind checkconfig`) runs outside the service, where
    there is none to find.
    """
    token = _SOCKETS_INHERITED.set(False)
    try:
        yield
    finally:
        _SOCKETS_INHERITED.reset(token)


def _endpoint_problem(description: str, kind: str, parse: Callable[[Any, str], object]) -> str | None:
    """Why `description` is not a usable Twisted endpoint string, or None.

    Parsing builds the endpoint object without listening or connecting, so
    a misspelt endpoint type or a missing TLS key file is caught at start-up.
    """
    from twisted.internet import reactor

    try:
        parse(reactor, description)
    except _openssl_errors() as error:
        return f"not a valid {kind} (a TLS certificate or key file holds none: {_openssl_reasons(error)}), got {description!r}"
    except ImportError as error:
        return f"needs a module that is not installed ({error.name}), got {description!r}"
    except IndexError:
        # Only `systemd:` endpoints index a list: the descriptors systemd passed.
        if not _SOCKETS_INHERITED.get():
            return None
        return (
            f"no socket with that index was passed by systemd (start the daemon through its .socket unit, "
            f"or listen with tcp:), got {description!r}"
        )
    except (ValueError, TypeError, KeyError, OSError) as error:
        return f"not a valid {kind} ({error}), got {description!r}"
    return None


def _openssl_errors() -> tuple[type[Exception], ...]:
    """What pyOpenSSL raises for a file that is no PEM certificate or key (none without pyOpenSSL)."""
    try:
        from OpenSSL import SSL, crypto
    except ImportError:
        return ()
    return (crypto.Error, SSL.Error)


def _openssl_reasons(error: Exception) -> str:
    """OpenSSL's error queue in one line, e.g. "PEM routines: no start line"."""
    entries = error.args[0] if error.args and isinstance(error.args[0], list) else []
    reasons = [": ".join(part for part in (entry[0], entry[-1]) if part) for entry in entries if isinstance(entry, tuple) and entry]
    return "; ".join(reasons) or str(error) or type(error).__name__


def server_endpoint_problem(description: str) -> str | None:
    from twisted.internet import endpoints

    return _endpoint_problem(description, "endpoint", endpoints.serverFromString)


def http_url_problem(url: str) -> str | None:
    """Why `url` cannot be handed to participants as a base URL, or None."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as error:
        return f"not a valid URL ({error}), got {url!r}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http:// or https:// URL with a host, got {url!r}"
    return None


def client_endpoint_problem(description: str) -> str | None:
    from twisted.internet import endpoints

    return _endpoint_problem(description, "client endpoint", endpoints.clientFromString)


def client_certificate_problem(certificate_path: str, key_path: str | None) -> str | None:
    """Why the PEM files do not hold a certificate with its private key, or None."""
    from xaind.tls import ClientCertificateError, load_client_certificate

    try:
        load_client_certificate(certificate_path, key_path)
    except ClientCertificateError as error:
        return str(error)
    return None


def ca_bundle_problem(path: str) -> str | None:
    """Why `path` is not a PEM bundle of CA certificates to verify a server with, or None."""
    from xaind.tls import CABundleError, load_trust_root

    try:
        load_trust_root(path)
    except CABundleError as error:
        return str(error)
    return None


def endpoint_arguments(description: str) -> tuple[str, list[str], dict[str, str]]:
    """An endpoint string's kind (lower case), positional and named arguments (`\\:` is a colon inside one)."""
    kind, _, rest = description.partition(":")
    arguments = [argument.replace("\\:", ":") for argument in re.split(r"(?<!\\):", rest)] if rest else []
    named = dict(argument.split("=", 1) for argument in arguments if "=" in argument)
    positional = [argument for argument in arguments if "=" not in argument]
    return kind.lower(), positional, named


def tcp_endpoint_address(description: str) -> tuple[str, int] | None:
    """The host and port a `tcp:` client endpoint string connects to, or None (another kind, e.g. `unix:`)."""
    kind, positional, named = endpoint_arguments(description)
    if kind != "tcp" or not (positional or named):
        return None
    host = named.get("host", positional[0] if positional else "")
    port = named.get("port", positional[1 if "host" not in named else 0] if len(positional) > (1 if "host" not in named else 0) else "")
    if not host or not port.isdigit():
        return None
    return host, int(port)


DEVELOPMENT_SECRET = "xaind-development-only-secret"


def read_shared_secret(section: ConfigReader, development: bool) -> str:
    """The PB link's shared secret, from `secret` or from the file named by `secret_file`.

    There is no default: a link anyone can join is worse than a daemon that
    refuses to start. Only a configuration marked `development: true` falls
    back to a well-known secret, and says so in the log.
    """
    inline = section.string("secret", "")
    path = section.string("secret_file", "")
    if inline and path:
        section.problem("secret_file", "give either secret or secret_file, not both")
        return inline
    if path:
        try:
            with open(path, encoding="utf-8") as stream:
                secret = stream.read().strip()
        except OSError as error:
            section.problem("secret_file", f"cannot be read ({error.strerror}): {path}")
            return ""
        if not secret:
            section.problem("secret_file", f"is empty: {path}")
        return secret
    if inline:
        return inline
    if development:
        return DEVELOPMENT_SECRET
    section.problem("secret", "required (or secret_file); only a development: true configuration may omit it")
    return ""


#: `logging.format` of both daemons.
LOG_FORMATS = ("text", "json")


def read_metrics_listen(root: ConfigReader) -> str | None:
    """`metrics.listen`: the endpoint of the Prometheus listener, or None (the default: no listener)."""
    metrics = root.section("metrics")
    listen = metrics.string("listen", "", validate=server_endpoint_problem)
    return listen or None
