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


_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: The largest relative capacity a shard may claim against another (`shard.weight`).
MAX_SHARD_WEIGHT = 1000


@dataclass(frozen=True)
class ShardSettings:
    """`shard`: this aggregator is one of several shards of a training (docs/scale.rst, Sharded aggregation)."""

    #: Unique among the training's shards; the reduce adds the shards' partial sums in the order of their names.
    name: str
    #: Where participants and the other shards reach this aggregator's HTTP API (handed out by the coordinator).
    url: str
    #: Relative capacity: a shard of weight 2 receives twice the participants of one of weight 1.
    weight: int = 1


def read_shard(root: ConfigReader, aggregation: AggregationSettings) -> ShardSettings | None:
    """The `shard` section: None (the training's only aggregator) unless `shard.name` is given.

    A shard's running sum is added to the others' by the reduce, which is
    exact only for the weighted average: every other rule (and the Python
    backend, and server-side noise, which each shard would add again) is
    refused here rather than silently computing another model.
    """
    section = root.section("shard")
    name = section.string("name", "")
    url = section.string("url", "", validate=lambda value: http_url_problem(value) if value else None)
    weight = section.integer("weight", 1, minimum=1, maximum=MAX_SHARD_WEIGHT)
    if not name:
        for key in ("url", "weight"):
            if section.given(key):
                section.problem(key, "only used with shard.name (this aggregator is then one of several shards)")
        return None
    if _SHARD_NAME.fullmatch(name) is None:
        section.problem("name", f"1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, got {name!r}")
    if not url:
        section.problem("url", "required with shard.name (where participants and the other shards reach this aggregator)")
    sharding_problem = _sharding_problem(aggregation)
    if sharding_problem is not None:
        key, message = sharding_problem
        section.problem("name", f"a shard's partial sum can only be reduced exactly for the weighted average: {key} {message}")
    return ShardSettings(name=name, url=url.rstrip("/"), weight=weight)


def _sharding_problem(aggregation: AggregationSettings) -> tuple[str, str] | None:
    """What in `aggregation` cannot be computed by shards exactly: (its key, why), or None."""
    if aggregation.backend != "weighted_average":
        return "aggregation.backend", f"is {aggregation.backend} (use weighted_average)"
    if aggregation.strategy != "fedavg":
        return "aggregation.strategy", f"is {aggregation.strategy} (use fedavg with shards)"
    if aggregation.server_learning_rate is not None:
        return "aggregation.server_learning_rate", "is set (a server step after the reduce is not supported with shards)"
    if aggregation.privacy is not None:
        return "aggregation.differential_privacy", "is enabled (each shard would add its own noise)"
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
    #: `shard`: one of several aggregators of the training; None: the only one.
    shard: ShardSettings | None = None
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
        shard = read_shard(root, aggregation)
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
            shard=shard,
            development=development,
            source=source,
        )

    @classmethod
    def from_file(cls, path: str) -> AggregatorDaemonSettings:
        return cls.from_mapping(load_yaml_file(path), source=path)
