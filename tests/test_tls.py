"""TLS by configuration: `ssl:` listeners on both daemons, verifying clients.

A throwaway certificate authority is made in each test with `trustme`; the
daemons are the real ones (`twistd -n` subprocesses on 127.0.0.1, OS-chosen
ports), their certificates issued for "localhost" (the name every client
verifies).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor

from xaind.config import server_endpoint_problem
from xaind.protocol import AGGREGATOR_HTTP_LISTENER as AGGREGATOR_HTTP
from xaind.protocol import COORDINATOR_HTTP_LISTENER as COORDINATOR_HTTP
from xaind.protocol import COORDINATOR_PB_LISTENER as COORDINATOR_PB
from xaind.sdk import Participant, start_participant
from xaind.sdk.runner import RetryPolicy
from xaind.sdk.tls import PeerNotTrusted
from xaind.tools.daemons import (
    LOOPBACK_ANY_PORT,
    Daemon,
    dummy_participants_command,
    free_loopback_port,
    run_to_exit,
    write_yaml,
)

PB_SECRET = "tls-test-secret"
HOSTNAME = "localhost"
#: Bound on one awaited step (a training, a refusal).
STEP_TIMEOUT = 60.0
FAST_RETRY = RetryPolicy(initial_delay=0.1, max_delay=0.5, retry_timeout=30.0)
SHAPE = (5, 7)


@dataclass(frozen=True)
class Certificates:
    """PEM files of one throwaway CA and a server certificate it issued."""

    ca: Path
    certificate: Path
    key: Path

    def listen(self, port: int = 0) -> str:
        return f"ssl:{port}:interface=127.0.0.1:privateKey={self.key}:certKey={self.certificate}"


def make_certificates(directory: Path, *hostnames: str) -> Certificates:
    directory.mkdir(parents=True, exist_ok=True)
    authority = trustme.CA()
    issued = authority.issue_cert(*(hostnames or (HOSTNAME,)))
    certificates = Certificates(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    authority.cert_pem.write_to_path(str(certificates.ca))
    issued.cert_chain_pems[0].write_to_path(str(certificates.certificate))
    issued.private_key_pem.write_to_path(str(certificates.key))
    return certificates


# -- start-up refuses unusable certificates and keys ---------------------------------------------


def unusable_key_files(certificates: Certificates, directory: Path) -> dict[str, tuple[str, str]]:
    """(privateKey, certKey) pairs that cannot serve TLS, by what is wrong with them."""
    junk = directory / "junk.pem"
    junk.write_text("not a PEM file\n", encoding="utf-8")
    return {
        "missing-key": (str(directory / "missing.key"), str(certificates.certificate)),
        "key-is-a-directory": (str(directory), str(certificates.certificate)),
        "key-file-holds-no-key": (str(certificates.certificate), str(certificates.certificate)),
        "certificate-file-holds-no-certificate": (str(certificates.key), str(junk)),
    }


@pytest.mark.parametrize("case", ["missing-key", "key-is-a-directory", "key-file-holds-no-key", "certificate-file-holds-no-certificate"])
def test_unusable_certificate_or_key_is_a_problem_of_the_endpoint(tmp_path: Path, case: str) -> None:
    certificates = make_certificates(tmp_path / "tls")
    key, certificate = unusable_key_files(certificates, tmp_path)[case]
    description = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={certificate}"
    problem = server_endpoint_problem(description)
    assert problem is not None and problem.startswith("not a valid endpoint ("), problem
    assert problem.endswith(f"got {description!r}")
    assert "\n" not in problem


@pytest.mark.parametrize(
    ("plugin", "section"),
    [("xain-coordinator", "api"), ("xain-coordinator", "pb"), ("xain-aggregator", "api")],
    ids=["coordinator-http", "coordinator-pb", "aggregator-http"],
)
def test_daemon_with_an_unusable_key_refuses_to_start_with_one_line(tmp_path: Path, plugin: str, section: str) -> None:
    certificates = make_certificates(tmp_path / "tls")
    key, certificate = unusable_key_files(certificates, tmp_path)["key-file-holds-no-key"]
    listen = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={certificate}"
    if plugin == "xain-coordinator":
        document: dict[str, Any] = {
            "api": {"listen": LOOPBACK_ANY_PORT},
            "pb": {"listen": LOOPBACK_ANY_PORT, "secret": PB_SECRET},
            "aggregator": {"url": "https://localhost:8082"},
            "state_dir": str(tmp_path / "state"),
        }
    else:
        document = {
            "api": {"listen": LOOPBACK_ANY_PORT},
            "coordinator": {"pb": "tcp:127.0.0.1:5555", "secret": PB_SECRET},
            "state_dir": str(tmp_path / "state"),
        }
    document[section]["listen"] = listen
    config = write_yaml(tmp_path / "daemon.yaml", document)
    result = run_to_exit(plugin, config, tmp_path / "daemon.log", cwd=tmp_path)
    assert result.returncode > 0, result.stdout
    assert "Traceback" not in result.stdout
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith(f"config error: {section}.listen: not a valid endpoint ("), lines[0]
    assert lines[0].endswith(f"got {listen!r}")
