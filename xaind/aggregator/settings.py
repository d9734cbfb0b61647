"""The aggregator's configuration: typed, immutable, checked before start-up."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from xaind.config import (
    LOG_FORMATS,
    read_metrics_listen,
    ConfigReader,
    ca_bundle_problem,
    client_certificate_problem,
    client_endpoint_problem,
    http_url_problem,
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


#: The rules `aggregation.strategy` names (docs/strategies.rst).
SERVER_OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")
ROBUST_RULES = ("median", "trimmed_mean", "krum", "multi_krum")
STRATEGIES = ("fedavg", *SERVER_OPTIMIZERS, *ROBUST_RULES)
ADAPTIVE_OPTIMIZERS = ("fedadam", "fedyogi", "fedadagrad")

#: Which strategies read each parameter: one given to any other is a mistake worth a line.
STRATEGY_PARAMETERS: dict[str, tuple[str, ...]] = {
    "server_learning_rate": ("fedavg", *SERVER_OPTIMIZERS),
    "server_momentum": ("fedavgm",),
    "beta_1": ADAPTIVE_OPTIMIZERS,
    "beta_2": ("fedadam", "fedyogi"),
    "tau": ADAPTIVE_OPTIMIZERS,
    "trim_fraction": ("trimmed_mean",),
    "byzantine": ("krum", "multi_krum"),
    "krum_selected": ("multi_krum",),
    "differential_privacy": ("fedavg", *SERVER_OPTIMIZERS),
}


@dataclass(frozen=True)
class PrivacySettings:
    """DP-FedAvg's server-side clipping and noise, and what the accountant needs (docs/strategies.rst)."""

    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    #: The accountant's q: the share of participants selected each round (the coordinator's participants_ratio).
    sampling_rate: float = 1.0


@dataclass(frozen=True)
class AggregationSettings:
    backend: str = "weighted_average"
    module: str | None = None
    class_name: str | None = None
    strategy: str = "fedavg"
    #: 1.0 for fedavg and fedavgm, 0.1 for the adaptive optimizers unless given.
    server_learning_rate: float | None = None
    server_momentum: float = 0.9
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    trim_fraction: float = 0.1
    byzantine: int = 1
    #: multi_krum's m; 0 stands for n - f of each round.
    krum_selected: int = 0
    update_norms: bool = True
    privacy: PrivacySettings | None = None

    @property
    def learning_rate(self) -> float:
        """The server learning rate in force (the given one, or the strategy's default)."""
        if self.server_learning_rate is not None:
            return self.server_learning_rate
        return 0.1 if self.strategy in ADAPTIVE_OPTIMIZERS else 1.0


def read_aggregation(section: ConfigReader) -> AggregationSettings:
    """The `aggregation` section; every problem recorded against its key."""
    defaults = AggregationSettings()
    backend = section.choice("backend", defaults.backend, BACKENDS)
    module = section.string("module", "") or None
    class_name = section.string("class", "") or None
    if backend == "python":
        if module is None:
            section.problem("module", "required when backend is python (the module to import)")
        if class_name is None:
            section.problem("class", "required when backend is python (the aggregator class in module)")
    elif module is not None or class_name is not None:
        section.problem("backend", "module and class are only used with backend: python")
    strategy = section.choice("strategy", defaults.strategy, STRATEGIES)
    for key, users in STRATEGY_PARAMETERS.items():
        if section.given(key) and strategy not in users:
            section.problem(key, f"not used by strategy {strategy} (only by {', '.join(users)})")
    learning_rate = section.number("server_learning_rate", 0.0, greater_than=0) if section.given("server_learning_rate") else None
    settings = AggregationSettings(
        backend=backend,
        module=module,
        class_name=class_name,
        strategy=strategy,
        server_learning_rate=learning_rate,
        server_momentum=section.number("server_momentum", defaults.server_momentum, at_least=0, interval="[0, 1)", **_BELOW_ONE),
        beta_1=section.number("beta_1", defaults.beta_1, at_least=0, interval="[0, 1)", **_BELOW_ONE),
        beta_2=section.number("beta_2", defaults.beta_2, at_least=0, interval="[0, 1)", **_BELOW_ONE),
        tau=section.number("tau", defaults.tau, greater_than=0),
        trim_fraction=section.number("trim_fraction", defaults.trim_fraction, at_least=0, interval="[0, 0.5)", at_most=_BELOW_HALF),
        byzantine=section.integer("byzantine", defaults.byzantine, minimum=0),
        krum_selected=section.integer("krum_selected", defaults.krum_selected, minimum=0),
        update_norms=section.boolean("update_norms", defaults.update_norms),
        privacy=_read_privacy(section),
    )
    if backend == "python" and (strategy != "fedavg" or learning_rate is not None or settings.privacy is not None):
        section.problem("strategy", "backend python aggregates with its own class: only strategy fedavg, without "
                                    "server_learning_rate or differential_privacy, goes with it")
    return settings


#: The largest float below 1 and below 0.5: `number` bounds are inclusive at the top.
_BELOW_ONE = {"at_most": float.fromhex("0x1.fffffffffffffp-1")}
_BELOW_HALF = float.fromhex("0x1.fffffffffffffp-2")


def _read_privacy(section: ConfigReader) -> PrivacySettings | None:
    privacy = section.section("differential_privacy")
    enabled = privacy.boolean("enabled", False)
    defaults = PrivacySettings()
    settings = PrivacySettings(
        clip_norm=privacy.number("clip_norm", defaults.clip_norm, greater_than=0),
        noise_multiplier=privacy.number("noise_multiplier", defaults.noise_multiplier, at_least=0),
        delta=privacy.number("delta", defaults.delta, greater_than=0, interval="(0, 1)", **_BELOW_ONE),
        sampling_rate=privacy.number("sampling_rate", defaults.sampling_rate, greater_than=0, at_most=1, interval="(0, 1]"),
    )
    return settings if enabled else None


#: Bounds of `storage.s3.url_lifetime` (seconds): long enough for a slow download to start, short enough that a
#: leaked URL soon stops working (presigned URLs cannot be revoked; SigV4 allows at most 7 days).
URL_LIFETIME_BOUNDS = (10, 3600)


@dataclass(frozen=True)
class S3Settings:
    """`storage.s3`: the S3-compatible bucket the global model is served from (docs/scale.rst)."""

    endpoint: str
    bucket: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str = "us-east-1"
    #: Seconds a presigned download URL stays valid.
    url_lifetime: int = 300
    #: Prepended to every object key (e.g. "training-1/").
    prefix: str = ""
    #: Seconds an aggregation waits for its model's upload before the coordinator hears it is done (and
    #: starts the next round, whose downloads are then all redirected); 0: it does not wait.
    upload_wait: float = 60.0


def read_credentials_file(path: str) -> tuple[str, str] | str:
    """The (access key, secret key) of an S3 credentials file, or why it is not usable.

    The format is two `key=value` lines, `access_key=...` and `secret_key=...`
    (blank lines and lines starting with `#` are ignored): simple to write by
    hand or from a secret store, and no value is ever mistaken for another.
    """
    try:
        with open(path, encoding="utf-8") as stream:
            lines = stream.read().splitlines()
    except OSError as error:
        return f"cannot be read ({error.strerror}): {path}"
    except UnicodeDecodeError:
        return f"is not UTF-8 text: {path}"
    values: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, equals, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not equals or name not in ("access_key", "secret_key") or not value or name in values:
            return f"line {number} is not access_key=... or secret_key=... (each once): {path}"
        values[name] = value
    missing = [name for name in ("access_key", "secret_key") if name not in values]
    if missing:
        return f"has no {' and no '.join(missing)} line: {path}"
    return values["access_key"], values["secret_key"]


def _s3_client_problem() -> str | None:
    """Why the S3 client library cannot be used, or None (found, not imported: it is only loaded when used)."""
    import importlib.util

    if importlib.util.find_spec("boto3") is None:
        return "needs boto3, which is not installed (pip install 'xaind[s3]', or Debian's python3-boto3)"
    return None


def read_storage(root: ConfigReader) -> S3Settings | None:
    """The `storage` section: None (the model served by the aggregator alone) unless `storage.s3` is given."""
    storage = root.section("storage")
    if not storage.given("s3"):
        storage.section("s3")  # nothing to read, but known
        return None
    s3 = storage.section("s3")
    problem = _s3_client_problem()
    if problem is not None:
        storage.problem("s3", problem)
    endpoint = s3.string("endpoint", "", validate=http_url_problem)
    bucket = s3.string("bucket", "", validate=_bucket_problem)
    credentials_path = s3.string("credentials_file", "")
    for key, value in (("endpoint", endpoint), ("bucket", bucket), ("credentials_file", credentials_path)):
        if not value and not s3.given(key):
            s3.problem(key, "required with storage.s3")
    defaults = S3Settings("", "", "", "")
    region = s3.string("region", defaults.region)
    low, high = URL_LIFETIME_BOUNDS
    url_lifetime = s3.integer("url_lifetime", defaults.url_lifetime, minimum=low, maximum=high)
    prefix = s3.string("prefix", "") if s3.given("prefix") else ""
    if prefix.startswith("/"):
        s3.problem("prefix", f"must not start with '/' (object keys are relative to the bucket), got {prefix!r}")
    access_key = secret_key = ""
    if credentials_path:
        credentials = read_credentials_file(credentials_path)
        if isinstance(credentials, str):
            s3.problem("credentials_file", credentials)
        else:
            access_key, secret_key = credentials
    upload_wait = s3.number("upload_wait", defaults.upload_wait, at_least=0, at_most=3600)
    return S3Settings(endpoint.rstrip("/"), bucket, access_key, secret_key, region, url_lifetime, prefix, upload_wait)


_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _bucket_problem(name: str) -> str | None:
    if _BUCKET_NAME.fullmatch(name) is None:
        return f"not an S3 bucket name (3-63 lower-case letters, digits, '.' and '-'), got {name!r}"
    return None


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
    #: `logging.format`: "text" (twistd's lines) or "json" (one JSON object per line, for machines).
    log_format: str = "text"
    #: `metrics.listen`: where Prometheus scrapes /metrics (a Twisted endpoint string); None: no metrics listener.
    metrics_listen: str | None = None
    #: `storage.s3`: downloads redirected to the model in an S3-compatible bucket; None: served by the aggregator.
    s3: S3Settings | None = None
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

        aggregation = read_aggregation(root.section("aggregation"))

        max_upload_bytes = root.section("limits").integer("max_upload_bytes", defaults.max_upload_bytes, minimum=64)
        state_dir = root.string("state_dir", defaults.state_dir)
        logging_section = root.section("logging")
        log_level = logging_section.choice("level", defaults.log_level, LOG_LEVELS)
        log_format = logging_section.choice("format", defaults.log_format, LOG_FORMATS)
        metrics_listen = read_metrics_listen(root)
        s3 = read_storage(root)
        root.finish()
        return cls(
            api_listen=api_listen,
            http_limits=http_limits,
            coordinator=coordinator,
            aggregation=aggregation,
            max_upload_bytes=max_upload_bytes,
            state_dir=state_dir,
            log_level=log_level,
            log_format=log_format,
            metrics_listen=metrics_listen,
            s3=s3,
            development=development,
            source=source,
        )

    @classmethod
    def from_file(cls, path: str) -> AggregatorDaemonSettings:
        return cls.from_mapping(load_yaml_file(path), source=path)
