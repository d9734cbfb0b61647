"""The aggregator's configuration: typed, immutable, checked before start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from xaind.config import (
    ConfigReader,
    ca_bundle_problem,
    client_certificate_problem,
    client_endpoint_problem,
    tcp_endpoint_address,
    load_yaml_file,
    read_shared_secret,
    server_endpoint_problem,
)
from xaind.http_limits import HTTPLimits, read_http_limits
from xaind.protocol import LOG_LEVELS

DEFAULT_CONFIG_PATH = "/etc/xain/aggregator.yaml"
BACKENDS = ("weighted_average", "python")


@dataclass(frozen=True)
class CoordinatorLinkSettings:
    pb: str = "tcp:127.0.0.1:5555"
    secret: str = ""
    call_timeout: float = 30.0
    #: With a CA bundle (PEM), the link is TLS over `pb`, the coordinator verified against it.
    ca_file: str | None = None
    #: The name the coordinator's certificate must carry; by default the host of `pb`.
    tls_hostname: str | None = None
    #: The certificate the link shows if the coordinator's PB listener asks for one (PEM, with its key unless `client_key`).
    client_certificate: str | None = None
    client_key: str | None = None


@dataclass(frozen=True)
class AggregationSettings:
    backend: str = "weighted_average"
    module: str | None = None
    class_name: str | None = None


@dataclass(frozen=True)
class AggregatorDaemonSettings:
    api_listen: str = "tcp:8082:interface=127.0.0.1"
    #: Body size (uploads aside) and deadlines of HTTP requests (`api.max_body_bytes`, `api.header_timeout`, ...).
    http_limits: HTTPLimits = field(default_factory=HTTPLimits)
    coordinator: CoordinatorLinkSettings = field(default_factory=CoordinatorLinkSettings)
    aggregation: AggregationSettings = field(default_factory=AggregationSettings)
    max_upload_bytes: int = 2**30
    state_dir: str = "/var/lib/xain/aggregator"
    log_level: str = "info"
    development: bool = False
    source: str | None = None

    @classmethod
    def from_mapping(cls, document: Mapping[str, Any], source: str | None = None) -> AggregatorDaemonSettings:
        """Build settings from a parsed YAML document; raises `ConfigError` listing every problem."""
        defaults = cls()
        root = ConfigReader(document)
        development = root.boolean("development", False)
        api = root.section("api")
        api_listen = api.string("listen", defaults.api_listen, validate=server_endpoint_problem)
        http_limits = read_http_limits(api)

        link = root.section("coordinator")
        link_defaults = CoordinatorLinkSettings()
        pb = link.string("pb", link_defaults.pb, validate=client_endpoint_problem)
        ca_file = link.string("ca_file", "", validate=ca_bundle_problem) or None
        tls_hostname = link.string("tls_hostname", "") or None
        if ca_file is None and tls_hostname is not None:
            link.problem("tls_hostname", "only used with ca_file (the link is plain TCP without it)")
        if ca_file is not None:
            address = tcp_endpoint_address(pb)
            if address is None:
                link.problem("pb", f"with ca_file the link is TLS over TCP: give pb as tcp:HOST:PORT, got {pb!r}")
            elif tls_hostname is None:
                tls_hostname = address[0]
        client_certificate = link.string("client_certificate", "") or None
        client_key = link.string("client_key", "") or None
        if client_certificate is None and client_key is not None:
            link.problem("client_key", "only used with client_certificate")
        elif client_certificate is not None:
            if ca_file is None:
                link.problem("client_certificate", "only used with ca_file (the link is plain TCP without it)")
            problem = client_certificate_problem(client_certificate, client_key)
            if problem is not None:
                link.problem("client_certificate", problem)
        coordinator = CoordinatorLinkSettings(
            pb=pb,
            secret=read_shared_secret(link, development),
            call_timeout=link.number("call_timeout", link_defaults.call_timeout, greater_than=0),
            ca_file=ca_file,
            tls_hostname=tls_hostname,
            client_certificate=client_certificate,
            client_key=client_key,
        )

        section = root.section("aggregation")
        backend = section.choice("backend", "weighted_average", BACKENDS)
        module = section.string("module", "") or None
        class_name = section.string("class", "") or None
        if backend == "python":
            if module is None:
                section.problem("module", "required when backend is python (the module to import)")
            if class_name is None:
                section.problem("class", "required when backend is python (the aggregator class in module)")
        elif module is not None or class_name is not None:
            section.problem("backend", "module and class are only used with backend: python")
        aggregation = AggregationSettings(backend=backend, module=module, class_name=class_name)

        max_upload_bytes = root.section("limits").integer("max_upload_bytes", defaults.max_upload_bytes, minimum=64)
        state_dir = root.string("state_dir", defaults.state_dir)
        log_level = root.section("logging").choice("level", defaults.log_level, LOG_LEVELS)
        root.finish()
        return cls(
            api_listen=api_listen,
            http_limits=http_limits,
            coordinator=coordinator,
            aggregation=aggregation,
            max_upload_bytes=max_upload_bytes,
            state_dir=state_dir,
            log_level=log_level,
            development=development,
            source=source,
        )

    @classmethod
    def from_file(cls, path: str) -> AggregatorDaemonSettings:
        return cls.from_mapping(load_yaml_file(path), source=path)
