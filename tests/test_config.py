"""Configuration of the coordinator: CoordinatorSettings.from_mapping / from_file and xaind.config.

README.rst, "Configuration": bad configuration stops start-up with one clear line
naming the key and what was wrong; every problem is reported at once.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import yaml

import xaind.config
from xaind.config import ConfigError, ConfigReader, http_url_problem, load_yaml_file, server_endpoint_problem
from xaind.aggregator.settings import AggregatorDaemonSettings
from xaind.connection_limits import ConnectionLimits
from xaind.coordinator.settings import AggregatorSettings, CoordinatorSettings, FederatedLearningSettings, ParticipantLimits
from xaind.http_limits import HTTPLimits

SHIPPED_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "xain", "coordinator.yaml")

# A production configuration must name the PB link's shared secret (only a
# `development: true` one may omit it); the documents below carry one so that
# each test sees only the problems it is about.
SECRET = "test-shared-secret"
SECRET_YAML = 'pb:\n  secret: "test-shared-secret"\n'


def secured(document: dict) -> dict:
    """`document` with pb.secret added (unless it names a secret itself)."""
    document = dict(document)
    pb = document.get("pb")
    if pb is None or isinstance(pb, dict):
        pb = dict(pb or {})
        if "secret" not in pb and "secret_file" not in pb:
            pb["secret"] = SECRET
        document["pb"] = pb
    return document


def load(document: dict) -> CoordinatorSettings:
    return CoordinatorSettings.from_mapping(secured(document))


def problems_of(document) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(document)
    return caught.value


def assert_lines(error: ConfigError, expected: list[str]) -> None:
    """str(error) is exactly the expected lines, one per problem, in the same order."""
    text = str(error)
    assert text.split("\n") == expected
    assert len(error.problems) == len(expected)
    for line in text.split("\n"):
        assert line.startswith("config error: ")


# -- defaults ----------------------------------------------------------------


def test_empty_document_needs_only_the_pb_secret():
    with pytest.raises(ConfigError) as caught:
        CoordinatorSettings.from_mapping({})
    assert [path for path, _ in caught.value.problems] == ["pb.secret"]
    assert len(str(caught.value).split("\n")) == 1
    assert str(caught.value).startswith("config error: pb.secret: required")


def test_empty_development_document_gives_the_defaults():
    settings = CoordinatorSettings.from_mapping({"development": True})
    assert settings.development is True
    assert settings.pb_secret == xaind.config.DEVELOPMENT_SECRET
    assert dataclasses.replace(settings, development=False, pb_secret="") == CoordinatorSettings()


def test_document_with_only_a_secret_gives_the_documented_defaults():
    settings = load({})
    assert settings.api_listen == "tcp:8081:interface=127.0.0.1"
    assert settings.pb_listen == "tcp:5555:interface=127.0.0.1"
    assert settings.federated_learning == FederatedLearningSettings(
        rounds=10, participants_ratio=1.0, min_clients=1, heartbeat_timeout=15.0, training_timeout=3600.0
    )
    assert settings.aggregator == AggregatorSettings(
        url="http://localhost:8082", admit_timeout=10.0, aggregation_timeout=600.0
    )
    assert settings.state_dir == "/var/lib/xain/coordinator"
    assert settings.log_level == "info"
    assert settings.development is False
    assert settings.pb_secret == SECRET
    assert settings.source is None
    assert settings == dataclasses.replace(CoordinatorSettings(), pb_secret=SECRET)


def test_empty_sections_and_empty_file_give_defaults(tmp_path):
    # `api:` with every child commented out parses as null: same as absent.
    document = {"development": True, "api": None, "pb": None, "federated_learning": None, "aggregator": None, "logging": None}
    development_defaults = CoordinatorSettings.from_mapping({"development": True})
    assert CoordinatorSettings.from_mapping(document) == development_defaults

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing but a comment and a secret\n" + SECRET_YAML, encoding="utf-8")
    settings = CoordinatorSettings.from_file(str(empty))
    assert settings == dataclasses.replace(CoordinatorSettings(), pb_secret=SECRET, source=str(empty))
    assert settings.source == str(empty)


# -- every key, with its type -----------------------------------------------


def test_every_key_is_read_with_its_type(tmp_path):
    text = """
api:
  listen: "tcp:18081:interface=127.0.0.1"
pb:
  listen: "tcp:15555:interface=0.0.0.0"
  secret_file: "SECRET_FILE"
federated_learning:
  rounds: 3
  participants_ratio: 0.5
  min_clients: 4
  heartbeat_timeout: 2
  training_timeout: 7.5
aggregator:
  url: "https://aggregator.example:8443/base"
  admit_timeout: 1
  aggregation_timeout: 30.25
state_dir: "/srv/xain/state"
logging:
  level: debug
"""
    secret_file = tmp_path / "pb-secret"
    secret_file.write_text("  from-a-file\n", encoding="utf-8")
    path = tmp_path / "coordinator.yaml"
    path.write_text(text.replace("SECRET_FILE", str(secret_file)), encoding="utf-8")
    settings = CoordinatorSettings.from_file(str(path))

    assert settings.pb_secret == "from-a-file"
    assert settings.development is False
    assert settings.api_listen == "tcp:18081:interface=127.0.0.1"
    assert settings.pb_listen == "tcp:15555:interface=0.0.0.0"
    fl = settings.federated_learning
    assert (fl.rounds, fl.participants_ratio, fl.min_clients) == (3, 0.5, 4)
    assert (fl.heartbeat_timeout, fl.training_timeout) == (2.0, 7.5)
    assert type(fl.rounds) is int and type(fl.min_clients) is int
    # Seconds written as whole numbers still come out as floats.
    for value in (fl.participants_ratio, fl.heartbeat_timeout, fl.training_timeout):
        assert type(value) is float
    agg = settings.aggregator
    assert agg.url == "https://aggregator.example:8443/base"
    assert (agg.admit_timeout, agg.aggregation_timeout) == (1.0, 30.25)
    assert type(agg.admit_timeout) is float and type(agg.aggregation_timeout) is float
    assert settings.state_dir == "/srv/xain/state"
    assert settings.log_level == "debug"
    assert settings.source == str(path)
    # The rules the state machine gets come from the same values.
    assert fl.round_rules.rounds == 3
    assert fl.round_rules.minimum_participants == math.ceil(0.5 * 4)


def test_settings_are_immutable():
    settings = load({"federated_learning": {"rounds": 2}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.federated_learning.rounds = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.state_dir = "/tmp"  # type: ignore[misc]


@pytest.mark.parametrize("level", ["debug", "info", "warn", "error", "critical"])
def test_every_log_level_is_accepted(level):
    assert load({"logging": {"level": level}}).log_level == level


# -- error format ---------------------------------------------------------------


def test_error_is_one_line_naming_the_dotted_key():
    error = problems_of({"federated_learning": {"participants_ratio": 1.5}})
    assert str(error) == "config error: federated_learning.participants_ratio: must be in (0, 1], got 1.5"
    assert error.problems == [("federated_learning.participants_ratio", "must be in (0, 1], got 1.5")]
    assert error.args == (str(error),)


def test_config_error_formats_each_problem_on_its_own_line():
    error = ConfigError([("a.b", "first"), ("c", "second")])
    assert str(error) == "config error: a.b: first\nconfig error: c: second"
    assert error.problems == [("a.b", "first"), ("c", "second")]


# -- unknown keys ------------------------------------------------------------


def test_unknown_keys_top_level_and_nested_are_errors():
    error = problems_of(
        {
            "federated_learning": {"rounds": 2, "round": 3},
            "aggregator": {"urls": "http://x"},
            "logging": {"lvl": "info"},
            "api": {"listen": "tcp:8081", "backlog": 5},
            "stat_dir": "/tmp",
        }
    )
    assert sorted(str(error).split("\n")) == sorted(
        [
            "config error: federated_learning.round: unknown key",
            "config error: aggregator.urls: unknown key",
            "config error: logging.lvl: unknown key",
            "config error: api.backlog: unknown key",
            "config error: stat_dir: unknown key",
        ]
    )


def test_non_string_unknown_key_is_named():
    assert_lines(problems_of({1: "x"}), ["config error: 1: unknown key"])


def test_unknown_key_with_a_newline_still_gives_one_line():
    # Regression: the key used to be printed raw, splitting its problem over two lines.
    error = problems_of({"federated_learning": {"rounds\nx": 1}})
    assert "rounds\\nx" in str(error)  # named, escaped
    assert len(error.problems) == 1
    assert len(str(error).split("\n")) == 1
    assert str(error).startswith("config error: federated_learning.")
    assert str(error).endswith(": unknown key")


# -- wrong types --------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "line"),
    [
        (
            {"federated_learning": {"rounds": "10"}},
            "config error: federated_learning.rounds: must be a whole number, got a string ('10')",
        ),
        (
            {"federated_learning": {"participants_ratio": "0.5"}},
            "config error: federated_learning.participants_ratio: must be a number, got a string ('0.5')",
        ),
        (
            {"federated_learning": {"min_clients": True}},
            "config error: federated_learning.min_clients: must be a whole number, got a boolean (true)",
        ),
        (
            {"federated_learning": {"rounds": 10.0}},
            "config error: federated_learning.rounds: must be a whole number, got a number (10.0)",
        ),
        (
            {"federated_learning": {"heartbeat_timeout": False}},
            "config error: federated_learning.heartbeat_timeout: must be a number, got a boolean (false)",
        ),
        (
            {"aggregator": {"admit_timeout": None}},
            "config error: aggregator.admit_timeout: must be a number, got nothing (null)",
        ),
        (
            {"aggregator": {"url": 8082}},
            "config error: aggregator.url: must be a string, got a number (8082)",
        ),
        (
            {"api": {"listen": ["tcp:8081"]}},
            "config error: api.listen: must be a string, got a list",
        ),
        (
            {"federated_learning": [{"rounds": 3}]},
            "config error: federated_learning: must be a mapping, got a list",
        ),
        (
            {"aggregator": "http://localhost:8082"},
            "config error: aggregator: must be a mapping, got a string ('http://localhost:8082')",
        ),
        (
            {"logging": {"level": "verbose"}},
            "config error: logging.level: must be one of debug, info, warn, error, critical, got a string ('verbose')",
        ),
        (
            {"state_dir": 5},
            "config error: state_dir: must be a string, got a number (5)",
        ),
        (
            {"state_dir": "   "},
            "config error: state_dir: must not be empty",
        ),
    ],
)
def test_wrong_type_is_one_line_naming_the_key(document, line):
    assert_lines(problems_of(document), [line])


def test_wrong_type_from_yaml_text(tmp_path):
    # The YAML scalars an author actually writes: quoted number, yes/no, 1.0 for an integer.
    path = tmp_path / "c.yaml"
    path.write_text(
        SECRET_YAML + 'federated_learning:\n  rounds: "3"\n  min_clients: yes\n  participants_ratio: 1.0\n', encoding="utf-8"
    )
    with pytest.raises(ConfigError) as caught:
        CoordinatorSettings.from_file(str(path))
    assert_lines(
        caught.value,
        [
            "config error: federated_learning.rounds: must be a whole number, got a string ('3')",
            "config error: federated_learning.min_clients: must be a whole number, got a boolean (true)",
        ],
    )


# -- out of range -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "line"),
    [
        (
            {"federated_learning": {"participants_ratio": 0}},
            "config error: federated_learning.participants_ratio: must be in (0, 1], got 0",
        ),
        (
            {"federated_learning": {"participants_ratio": 1.5}},
            "config error: federated_learning.participants_ratio: must be in (0, 1], got 1.5",
        ),
        (
            {"federated_learning": {"participants_ratio": -0.25}},
            "config error: federated_learning.participants_ratio: must be in (0, 1], got -0.25",
        ),
        (
            {"federated_learning": {"rounds": 0}},
            "config error: federated_learning.rounds: must be at least 1, got 0",
        ),
        (
            {"federated_learning": {"min_clients": -3}},
            "config error: federated_learning.min_clients: must be at least 1, got -3",
        ),
        (
            {"federated_learning": {"heartbeat_timeout": -1}},
            "config error: federated_learning.heartbeat_timeout: must be greater than 0, got -1",
        ),
        (
            {"federated_learning": {"training_timeout": 0}},
            "config error: federated_learning.training_timeout: must be greater than 0, got 0",
        ),
        (
            {"aggregator": {"admit_timeout": 0.0}},
            "config error: aggregator.admit_timeout: must be greater than 0, got 0.0",
        ),
        (
            {"aggregator": {"aggregation_timeout": -600}},
            "config error: aggregator.aggregation_timeout: must be greater than 0, got -600",
        ),
        (
            {"federated_learning": {"heartbeat_timeout": float("nan")}},
            "config error: federated_learning.heartbeat_timeout: must be a finite number, got nan",
        ),
        (
            {"federated_learning": {"participants_ratio": float("nan")}},
            "config error: federated_learning.participants_ratio: must be a finite number, got nan",
        ),
        (
            {"aggregator": {"admit_timeout": float("inf")}},
            "config error: aggregator.admit_timeout: must be a finite number, got inf",
        ),
    ],
)
def test_out_of_range_is_one_line_naming_the_key(document, line):
    assert_lines(problems_of(document), [line])


def test_yaml_nan_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(SECRET_YAML + "aggregator:\n  admit_timeout: .nan\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        CoordinatorSettings.from_file(str(path))
    assert str(caught.value) == "config error: aggregator.admit_timeout: must be a finite number, got nan"


def test_boundaries_are_accepted():
    settings = load(
        {
            "federated_learning": {
                "rounds": 1,
                "participants_ratio": 1,
                "min_clients": 1,
                "heartbeat_timeout": 0.001,
                "training_timeout": 1e-9,
            },
        }
    )
    fl = settings.federated_learning
    assert (fl.rounds, fl.participants_ratio, fl.min_clients) == (1, 1.0, 1)
    assert (fl.heartbeat_timeout, fl.training_timeout) == (0.001, 1e-9)
    tiny = load({"federated_learning": {"participants_ratio": 1e-6}})
    assert tiny.federated_learning.participants_ratio == 1e-6


def test_huge_integer_for_a_number_is_a_config_error():
    # Regression: math.isfinite raised OverflowError out of from_mapping.
    error = problems_of({"federated_learning": {"heartbeat_timeout": 10**400}})
    assert [path for path, _ in error.problems] == ["federated_learning.heartbeat_timeout"]
    assert len(str(error).split("\n")) == 1


# -- several problems at once ----------------------------------------------------


def test_all_problems_are_reported_together():
    error = problems_of(
        {
            "api": {"listen": "bogus:1"},
            "federated_learning": {
                "rounds": 0,
                "participants_ratio": 1.5,
                "min_clients": 2.0,
                "heartbeat_timeout": "15",
                "training_timeout": float("nan"),
                "typo": 1,
            },
            "aggregator": {"url": "ftp://x", "admit_timeout": -1},
            "logging": [],
            "extra": True,
        }
    )
    paths = [path for path, _ in error.problems]
    assert sorted(paths) == sorted(
        [
            "api.listen",
            "federated_learning.rounds",
            "federated_learning.participants_ratio",
            "federated_learning.min_clients",
            "federated_learning.heartbeat_timeout",
            "federated_learning.training_timeout",
            "federated_learning.typo",
            "aggregator.url",
            "aggregator.admit_timeout",
            "logging",
            "extra",
        ]
    )
    lines = str(error).split("\n")
    assert len(lines) == len(paths) == 11
    for (path, message), line in zip(error.problems, lines):
        assert line == f"config error: {path}: {message}"
    assert "config error: federated_learning.rounds: must be at least 1, got 0" in lines
    assert "config error: federated_learning.participants_ratio: must be in (0, 1], got 1.5" in lines
    assert "config error: federated_learning.typo: unknown key" in lines
    assert "config error: logging: must be a mapping, got a list" in lines
    assert "config error: extra: unknown key" in lines


# -- endpoints and URLs ---------------------------------------------------------


@pytest.mark.parametrize("key", ["api", "pb"])
@pytest.mark.parametrize(
    ("listen", "reason"),
    [
        ("tcp:notaport", "invalid literal for int() with base 10: 'notaport'"),
        ("bogus:1", "Unknown endpoint type: 'bogus'"),
    ],
)
def test_bad_endpoint_string(key, listen, reason):
    error = problems_of({key: {"listen": listen}})
    assert_lines(error, [f"config error: {key}.listen: not a valid endpoint ({reason}), got {listen!r}"])


def test_good_endpoint_strings_are_accepted():
    for listen in ("tcp:0", "tcp:8081:interface=127.0.0.1", "tcp6:8081:interface=\\:\\:1", "unix:/run/xain/api.sock"):
        assert server_endpoint_problem(listen) is None
        assert load({"api": {"listen": listen}}).api_listen == listen


def test_ssl_endpoint_with_missing_key_file_is_a_config_error(tmp_path):
    # Regression: without pyOpenSSL (not a declared dependency) this raised
    # ModuleNotFoundError; with it, the missing key file is the problem. Either
    # way start-up must stop with one line on api.listen.
    missing = tmp_path / "missing.pem"
    error = problems_of({"api": {"listen": f"ssl:8443:privateKey={missing}:certKey={missing}"}})
    assert [path for path, _ in error.problems] == ["api.listen"]
    assert str(error).startswith("config error: api.listen: ")
    assert len(str(error).split("\n")) == 1


@pytest.mark.parametrize(
    ("url", "line"),
    [
        ("ftp://x", "config error: aggregator.url: must be an http:// or https:// URL with a host, got 'ftp://x'"),
        (
            "localhost:8082",
            "config error: aggregator.url: must be an http:// or https:// URL with a host, got 'localhost:8082'",
        ),
        ("http://", "config error: aggregator.url: must be an http:// or https:// URL with a host, got 'http://'"),
        (
            "http://x:notaport",
            "config error: aggregator.url: not a valid URL "
            "(Port could not be cast to integer value as 'notaport'), got 'http://x:notaport'",
        ),
        ("", "config error: aggregator.url: must not be empty"),
    ],
)
def test_bad_aggregator_url(url, line):
    assert_lines(problems_of({"aggregator": {"url": url}}), [line])


def test_good_urls():
    for url in ("http://localhost:8082", "https://agg.example.org", "http://[::1]:8082/x"):
        assert http_url_problem(url) is None
        assert load({"aggregator": {"url": url}}).aggregator.url == url


# -- files ----------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as caught:
        CoordinatorSettings.from_file(path)
    assert str(caught.value) == f"config error: {path}: no such file"
    assert caught.value.problems == [(path, "no such file")]


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_yaml_file(str(tmp_path))
    assert str(caught.value) == f"config error: {tmp_path}: cannot be read: Is a directory"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [1, 2\n", "not valid YAML (line 2, column 1): expected ',' or ']', but got '<stream end>'"),
        ("key: value: other\n", "not valid YAML (line 1, column 11): mapping values are not allowed here"),
        ("\tfederated_learning: 1\n", "not valid YAML (line 1, column 1): found character '\\t' that cannot start any token"),
    ],
)
def test_file_that_is_not_yaml(tmp_path, text, message):
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        CoordinatorSettings.from_file(str(path))
    assert str(caught.value) == f"config error: {path}: {message}"
    assert len(caught.value.problems) == 1


def test_python_tags_are_not_constructed(tmp_path):
    path = tmp_path / "tagged.yaml"
    path.write_text("state_dir: !!python/object/apply:os.getcwd []\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        CoordinatorSettings.from_file(str(path))
    (line,) = str(caught.value).split("\n")
    assert line.startswith(f"config error: {path}: not valid YAML (line 1, column 12): could not determine a constructor")


def test_file_that_is_not_utf8(tmp_path):
    # Regression: a Latin-1 file raised UnicodeDecodeError out of load_yaml_file.
    path = tmp_path / "latin1.yaml"
    path.write_bytes("state_dir: /srv/caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        CoordinatorSettings.from_file(str(path))
    (line,) = str(caught.value).split("\n")
    assert line.startswith(f"config error: {path}: ")


@pytest.mark.parametrize(
    ("text", "kind"),
    [("- rounds: 3\n- min_clients: 2\n", "a list"), ("just a string\n", "a string ('just a string')"), ("42\n", "a number (42)")],
)
def test_top_level_that_is_not_a_mapping(tmp_path, text, kind):
    path = tmp_path / "list.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        CoordinatorSettings.from_file(str(path))
    assert str(caught.value) == f"config error: {path}: must be a mapping of keys to values, got {kind}"


def test_file_errors_name_the_key_paths_of_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(SECRET_YAML + "federated_learning:\n  participants_ratio: 1.5\n  rounds: 0\nextra: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        CoordinatorSettings.from_file(str(path))
    assert_lines(
        caught.value,
        [
            "config error: federated_learning.rounds: must be at least 1, got 0",
            "config error: federated_learning.participants_ratio: must be in (0, 1], got 1.5",
            "config error: extra: unknown key",
        ],
    )


# -- the shipped file ----------------------------------------------------------------


def test_shipped_config_loads_and_equals_the_defaults_except_state_dir():
    settings = CoordinatorSettings.from_file(SHIPPED_CONFIG)
    assert settings.source == SHIPPED_CONFIG
    assert settings.state_dir == "var/coordinator"
    assert settings.state_dir != CoordinatorSettings().state_dir
    # The shipped file is a development configuration (it runs as it is, with
    # no secret to set up); apart from that and state_dir, it is the defaults.
    assert settings.development is True
    defaults = CoordinatorSettings.from_mapping({"development": True})
    assert dataclasses.replace(settings, state_dir=defaults.state_dir, source=None) == defaults


def test_shipped_config_names_every_key():
    # Every setting is shown (commented defaults), so the file documents them all.
    with open(SHIPPED_CONFIG, encoding="utf-8") as stream:
        document = yaml.safe_load(stream)
    assert set(document) >= {"api", "pb", "federated_learning", "aggregator", "state_dir", "logging"}
    assert set(document["federated_learning"]) == {
        f.name for f in dataclasses.fields(FederatedLearningSettings)
    }
    assert set(document["aggregator"]) == {f.name for f in dataclasses.fields(AggregatorSettings)}
    assert set(document["api"]) == {"listen", *(f.name for f in dataclasses.fields(HTTPLimits))}
    assert {"listen", "max_connections", "max_connections_per_address"} <= set(document["pb"])
    # enrolment_tokens_file is shown commented out: it names a file that must exist.
    assert set(document["participants"]) == {f.name for f in dataclasses.fields(ParticipantLimits)} | {"authentication"}
    assert set(document["logging"]) == {"level", "repeat_interval", "format"}
    # metrics.listen is shown commented out: the listener is off unless asked for.
    assert document["metrics"] is None


# -- the PB secret and development -------------------------------------------------


def test_secret_problems(tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text("s", encoding="utf-8")
    both = problems_of({"pb": {"secret": "a", "secret_file": str(secret_file)}})
    assert str(both) == "config error: pb.secret_file: give either secret or secret_file, not both"

    missing = tmp_path / "missing"
    unreadable = problems_of({"pb": {"secret_file": str(missing)}})
    assert str(unreadable) == f"config error: pb.secret_file: cannot be read (No such file or directory): {missing}"

    blank = tmp_path / "blank"
    blank.write_text("\n  \n", encoding="utf-8")
    assert str(problems_of({"pb": {"secret_file": str(blank)}})) == f"config error: pb.secret_file: is empty: {blank}"

    assert str(problems_of({"pb": {"secret": 42}})).split("\n")[0] == (
        "config error: pb.secret: must be a string, got a number (42)"
    )


@pytest.mark.parametrize("value", ["yes", 1, None, "true"])
def test_development_must_be_a_boolean(value):
    error = problems_of({"development": value})
    assert [path for path, _ in error.problems] == ["development"]
    assert str(error).startswith("config error: development: must be true or false, got ")


def test_a_secret_wins_over_development():
    settings = load({"development": True, "pb": {"secret": "mine"}})
    assert (settings.development, settings.pb_secret) == (True, "mine")


# -- the reader on its own ---------------------------------------------------------


def test_reader_returns_defaults_for_absent_or_wrong_values_and_raises_at_finish():
    root = ConfigReader({"n": "x", "s": {"i": 4}})
    assert root.integer("n", 7) == 7
    section = root.section("s")
    assert section.integer("i", 1, maximum=3) == 1
    assert section.number("absent", 2.5) == 2.5
    with pytest.raises(ConfigError) as caught:
        root.finish()
    assert_lines(
        caught.value,
        [
            "config error: n: must be a whole number, got a string ('x')",
            "config error: s.i: must be at most 3, got 4",
        ],
    )


def test_reader_finish_without_problems_returns_quietly():
    root = ConfigReader({"a": 1, "b": {"c": 0.5}})
    assert root.integer("a", 0) == 1
    assert root.section("b").number("c", 0.0, greater_than=0, at_most=1) == 0.5
    assert root.finish() is None


def test_heartbeat_hold_defaults_to_a_quarter_of_the_heartbeat_timeout_and_is_bounded():
    assert load({}).heartbeat_hold == 3.75
    assert load({"federated_learning": {"heartbeat_timeout": 2}}).heartbeat_hold == 0.5
    assert load({"federated_learning": {"heartbeat_timeout": 60}}).heartbeat_hold == 5.0
    assert load({"api": {"heartbeat_hold": 0}}).heartbeat_hold == 0.0
    assert load({"api": {"heartbeat_hold": 7.4}}).heartbeat_hold == 7.4
    with pytest.raises(ConfigError) as negative:
        load({"api": {"heartbeat_hold": -1}})
    assert str(negative.value) == "config error: api.heartbeat_hold: must be at least 0, got -1"
    with pytest.raises(ConfigError) as too_long:
        load({"api": {"heartbeat_hold": 7.5}})
    assert str(too_long.value) == (
        "config error: api.heartbeat_hold: must be below half of federated_learning.heartbeat_timeout (15), got 7.5"
    )


# -- HTTP limits (api section of both daemons) --------------------------------------------

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_FILES = {name: os.path.join(CHECKOUT, "etc", "xain", f"{name}.yaml") for name in ("coordinator", "aggregator")}
DEBIAN_FILES = {name: os.path.join(CHECKOUT, "debian", "conf", f"{name}.yaml") for name in ("coordinator", "aggregator")}


def load_daemon(daemon: str, document: dict):
    document = {"development": True, **document}
    settings_class = CoordinatorSettings if daemon == "coordinator" else AggregatorDaemonSettings
    return settings_class.from_mapping(document)


@pytest.mark.parametrize("daemon", ["coordinator", "aggregator"])
def test_http_limits_are_read_from_the_api_section(daemon):
    assert load_daemon(daemon, {}).http_limits == HTTPLimits()
    api = {"max_body_bytes": 0, "header_timeout": 2.5, "body_min_rate": 0, "body_rate_window": 7}
    limits = load_daemon(daemon, {"api": api}).http_limits
    assert limits == HTTPLimits(max_body_bytes=0, header_timeout=2.5, body_min_rate=0.0, body_rate_window=7.0)
    assert type(limits.body_rate_window) is float and type(limits.max_body_bytes) is int


@pytest.mark.parametrize("daemon", ["coordinator", "aggregator"])
@pytest.mark.parametrize(
    ("api", "line"),
    [
        ({"max_body_bytes": -1}, "config error: api.max_body_bytes: must be at least 0, got -1"),
        ({"max_body_bytes": 2**20 + 1}, "config error: api.max_body_bytes: must be at most 1048576, got 1048577"),
        ({"max_body_bytes": "4k"}, "config error: api.max_body_bytes: must be a whole number, got a string ('4k')"),
        ({"header_timeout": 0}, "config error: api.header_timeout: must be greater than 0, got 0"),
        ({"header_timeout": float("inf")}, "config error: api.header_timeout: must be a finite number, got inf"),
        ({"body_min_rate": -5}, "config error: api.body_min_rate: must be at least 0, got -5"),
        ({"body_rate_window": 0}, "config error: api.body_rate_window: must be greater than 0, got 0"),
        ({"body_rate_window": None}, "config error: api.body_rate_window: must be a number, got nothing (null)"),
    ],
)
def test_a_bad_http_limit_is_one_line_naming_the_key(daemon, api, line):
    with pytest.raises(ConfigError) as caught:
        load_daemon(daemon, {"api": api})
    assert_lines(caught.value, [line])


@pytest.mark.parametrize("files", [SHIPPED_FILES, DEBIAN_FILES], ids=["etc", "debian"])
@pytest.mark.parametrize("daemon", ["coordinator", "aggregator"])
def test_shipped_configs_document_every_http_limit_with_its_default(files, daemon):
    if not os.path.exists(files[daemon]):
        pytest.skip("debian/ is not copied beside the tests in the Debian build")
    with open(files[daemon], encoding="utf-8") as stream:
        document = yaml.safe_load(stream)
    assert {key: document["api"][key] for key in document["api"] if key in HTTPLimits.__dataclass_fields__} == dataclasses.asdict(HTTPLimits())
    assert load_daemon(daemon, {"api": document["api"]}).http_limits == HTTPLimits()


# -- who may join, connections, floods of log lines ----------------------------------


def test_participant_pb_and_log_limits_are_read():
    settings = load_daemon(
        "coordinator",
        {
            "participants": {"max_known": 10, "rendez_vous_per_address_per_minute": 0},
            "pb": {"max_connections": 7, "max_connections_per_address": 3},
            "api": {"max_connections": 9, "max_connections_per_address": 4},
            "logging": {"repeat_interval": 2.5},
        },
    )
    assert settings.participant_limits == ParticipantLimits(max_known=10, rendez_vous_per_address_per_minute=0)
    assert settings.pb_connections == ConnectionLimits(max_connections=7, max_connections_per_address=3)
    assert settings.http_limits.connections == ConnectionLimits(max_connections=9, max_connections_per_address=4)
    assert settings.log_repeat_interval == 2.5
    defaults = load_daemon("coordinator", {})
    assert defaults.participant_limits == ParticipantLimits(max_known=50_000, rendez_vous_per_address_per_minute=20_000)
    assert defaults.pb_connections == ConnectionLimits(max_connections=16384, max_connections_per_address=12288)


@pytest.mark.parametrize(
    ("document", "line"),
    [
        ({"participants": {"max_known": 0}}, "config error: participants.max_known: must be at least 1, got 0"),
        ({"participants": {"max_known": "many"}}, "config error: participants.max_known: must be a whole number, got a string ('many')"),
        (
            {"participants": {"rendez_vous_per_address_per_minute": -1}},
            "config error: participants.rendez_vous_per_address_per_minute: must be at least 0, got -1",
        ),
        ({"pb": {"max_connections": 0}}, "config error: pb.max_connections: must be at least 1, got 0"),
        ({"api": {"max_connections_per_address": 0}}, "config error: api.max_connections_per_address: must be at least 1, got 0"),
        ({"logging": {"repeat_interval": 0}}, "config error: logging.repeat_interval: must be greater than 0, got 0"),
    ],
)
def test_a_bad_limit_is_one_line_naming_the_key(document, line):
    with pytest.raises(ConfigError) as caught:
        load_daemon("coordinator", document)
    assert_lines(caught.value, [line])


@pytest.mark.parametrize("path", [SHIPPED_FILES["coordinator"], DEBIAN_FILES["coordinator"]], ids=["etc", "debian"])
def test_shipped_coordinator_configs_document_the_limits_with_their_defaults(path):
    if not os.path.exists(path):
        pytest.skip("debian/ is not copied beside the tests in the Debian build")
    with open(path, encoding="utf-8") as stream:
        document = yaml.safe_load(stream)
    assert document["participants"] == {**dataclasses.asdict(ParticipantLimits()), "authentication": "none"}
    assert {key: document["pb"][key] for key in ("max_connections", "max_connections_per_address")} == dataclasses.asdict(ConnectionLimits())
    assert document["logging"]["repeat_interval"] == 10


@pytest.mark.parametrize("daemon", ["coordinator", "aggregator"])
@pytest.mark.parametrize(
    ("api", "line"),
    [
        ({"max_connections": 0}, "config error: api.max_connections: must be at least 1, got 0"),
        ({"max_connections_per_address": 2**20 + 1}, "config error: api.max_connections_per_address: must be at most 1048576, got 1048577"),
        ({"max_connections": "lots"}, "config error: api.max_connections: must be a whole number, got a string ('lots')"),
    ],
)
def test_a_bad_connection_limit_is_one_line_naming_the_key(daemon, api, line):
    with pytest.raises(ConfigError) as caught:
        load_daemon(daemon, {"api": api})
    assert_lines(caught.value, [line])


@pytest.mark.parametrize("daemon", ["coordinator", "aggregator"])
def test_metrics_listen_and_log_format_are_read_and_checked(daemon):
    assert (load_daemon(daemon, {}).metrics_listen, load_daemon(daemon, {}).log_format) == (None, "text")
    settings = load_daemon(daemon, {"metrics": {"listen": "tcp:0:interface=127.0.0.1"}, "logging": {"format": "json"}})
    assert (settings.metrics_listen, settings.log_format) == ("tcp:0:interface=127.0.0.1", "json")
    with pytest.raises(ConfigError) as bad_listen:
        load_daemon(daemon, {"metrics": {"listen": "nope:1"}})
    assert str(bad_listen.value) == "config error: metrics.listen: not a valid endpoint (Unknown endpoint type: 'nope'), got 'nope:1'"
    with pytest.raises(ConfigError) as bad_format:
        load_daemon(daemon, {"logging": {"format": "xml"}})
    assert str(bad_format.value) == "config error: logging.format: must be one of text, json, got a string ('xml')"
