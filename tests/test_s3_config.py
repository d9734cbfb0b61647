"""`storage.s3` in the aggregator's configuration: off by default, every bad value one line naming its key.

Runs without boto3 and SeaweedFS (only the check that boto3 is there
pretends it is missing), so Debian's test run covers it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from xaind.aggregator.settings import AggregatorDaemonSettings, S3Settings, read_credentials_file
from xaind.config import ConfigError
from xaind.tools.daemons import aggregator_document, free_loopback_port, run_to_exit, write_yaml


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    path = tmp_path / "s3-credentials"
    path.write_text("# the bucket's key\naccess_key=AKIA-TEST\n\nsecret_key = s3cr3t=with=equals\n", encoding="utf-8")
    return path


@pytest.fixture
def boto3_present(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check finds boto3 (as if installed): these tests are about the values, not the library."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: object() if name == "boto3" else real(name, *rest))


def settings(storage: Any) -> AggregatorDaemonSettings:
    return AggregatorDaemonSettings.from_mapping({"development": True, "storage": storage})


def problems(storage: Any) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as raised:
        settings(storage)
    assert all("\n" not in f"{path}: {message}" for path, message in raised.value.problems)
    return raised.value.problems


def test_without_storage_s3_nothing_changes() -> None:
    assert AggregatorDaemonSettings.from_mapping({"development": True}).s3 is None
    assert settings({}).s3 is None
    assert settings(None).s3 is None


def test_a_complete_section_is_read_with_its_defaults(credentials: Path, boto3_present: None) -> None:
    s3 = settings({"s3": {"endpoint": "https://s3.example.org:9000/", "bucket": "xain-models", "credentials_file": str(credentials)}}).s3
    assert s3 == S3Settings("https://s3.example.org:9000", "xain-models", "AKIA-TEST", "s3cr3t=with=equals")
    assert (s3.region, s3.url_lifetime, s3.prefix, s3.upload_wait) == ("us-east-1", 300, "", 60.0)
    assert "s3cr3t" not in repr(s3) and "AKIA" not in repr(s3)
    given = settings({"s3": {"endpoint": "http://127.0.0.1:8333", "bucket": "b-1.models", "credentials_file": str(credentials),
                             "region": "eu-central-1", "url_lifetime": 60, "prefix": "training-1/", "upload_wait": 0}}).s3
    assert (given.region, given.url_lifetime, given.prefix, given.upload_wait) == ("eu-central-1", 60, "training-1/", 0.0)


def test_every_bad_value_is_one_line_naming_its_key(tmp_path: Path, boto3_present: None) -> None:
    assert problems({"s3": {}}) == [
        ("storage.s3.endpoint", "required with storage.s3"),
        ("storage.s3.bucket", "required with storage.s3"),
        ("storage.s3.credentials_file", "required with storage.s3"),
    ]
    found = dict(problems({"s3": {"endpoint": "ftp://host", "bucket": "Models_1", "credentials_file": str(tmp_path / "none"),
                                  "url_lifetime": 5, "prefix": "/models", "upload_wait": -1, "acl": "public"}}))
    assert found == {
        "storage.s3.endpoint": "must be an http:// or https:// URL with a host, got 'ftp://host'",
        "storage.s3.bucket": "not an S3 bucket name (3-63 lower-case letters, digits, '.' and '-'), got 'Models_1'",
        "storage.s3.url_lifetime": "must be at least 10, got 5",
        "storage.s3.prefix": "must not start with '/' (object keys are relative to the bucket), got '/models'",
        "storage.s3.upload_wait": "must be at least 0, got -1",
        "storage.s3.credentials_file": f"cannot be read (No such file or directory): {tmp_path / 'none'}",
        "storage.s3.acl": "unknown key",
    }
    assert problems({"s3": "http://host"})[0] == ("storage.s3", "must be a mapping, got a string ('http://host')")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("access_key=a\n", "has no secret_key line"),
        ("", "has no access_key and no secret_key line"),
        ("access_key=a\nsecret_key=b\naccess_key=c\n", "line 3 is not access_key=... or secret_key=... (each once)"),
        ("AKIA\nsecret\n", "line 1 is not access_key=... or secret_key=... (each once)"),
        ("access_key=\nsecret_key=b\n", "line 1 is not access_key=... or secret_key=... (each once)"),
    ],
)
def test_a_malformed_credentials_file_is_named(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "credentials"
    path.write_text(text, encoding="utf-8")
    assert read_credentials_file(str(path)) == f"{problem}: {path}"


def test_without_boto3_storage_s3_is_refused(monkeypatch: pytest.MonkeyPatch, credentials: Path) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # as if not installed
    assert problems({"s3": {"endpoint": "http://127.0.0.1:1", "bucket": "models", "credentials_file": str(credentials)}}) == [
        ("storage.s3", "needs boto3, which is not installed (pip install 'xaind[s3]', or Debian's python3-boto3)")
    ]


def test_the_daemon_refuses_a_bad_section_in_one_line(tmp_path: Path) -> None:
    document = aggregator_document(state_dir=tmp_path / "state", port=free_loopback_port(), coordinator_pb_port=free_loopback_port())
    document["storage"] = {"s3": {"endpoint": "http://127.0.0.1:1", "bucket": "models", "credentials_file": str(tmp_path / "missing")}}
    config = write_yaml(tmp_path / "aggregator.yaml", document)
    result = run_to_exit("xain-aggregator", config, tmp_path / "aggregator.log", cwd=tmp_path)
    assert result.returncode > 0, result.stdout
    lines = result.stdout.splitlines()
    assert f"config error: storage.s3.credentials_file: cannot be read (No such file or directory): {tmp_path / 'missing'}" in lines
    assert all(line.startswith("config error: storage.s3") for line in lines), result.stdout
