"""The benchmarks' daemons over TLS: every listener on `ssl:`, every client verifying.

A throwaway CA (`trustme`) is made in the cluster's temporary directory; the
daemons' certificate is issued for "localhost", the name every client
connects to (participants and the aggregator's PB link verify it against
the CA, as in production with docs/tls.rst). The same cluster as
`bench.common.Cluster` otherwise, so a `tls=true` line differs from its
plain twin by TLS alone.
"""

from __future__ import annotations

import json
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import HOST, Cluster

#: The name in the daemons' certificate, and the one clients connect to.
TLS_HOSTNAME = "localhost"


@dataclass(frozen=True)
class Certificates:
    ca: Path
    certificate: Path
    key: Path

    def listen(self, port: int = 0) -> str:
        return f"ssl:{port}:interface={HOST}:privateKey={self.key}:certKey={self.certificate}"


def make_certificates(directory: Path) -> Certificates:
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    authority = trustme.CA()
    issued = authority.issue_cert(TLS_HOSTNAME, HOST)
    certificates = Certificates(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    authority.cert_pem.write_to_path(str(certificates.ca))
    issued.cert_chain_pems[0].write_to_path(str(certificates.certificate))
    issued.private_key_pem.write_to_path(str(certificates.key))
    return certificates


def get_json_tls(port: int, path: str, ca: Path, timeout: float = 5.0) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=str(ca))
    with urllib.request.urlopen(f"https://{TLS_HOSTNAME}:{port}{path}", timeout=timeout, context=context) as response:
        return json.loads(response.read())


class TLSCluster(Cluster):
    """`Cluster` with `ssl:` listeners, an https:// aggregator URL and a verifying PB link."""

    certificates: Certificates
    #: The host in the aggregator URL participants are given (the certificate names it and HOST).
    aggregator_host = TLS_HOSTNAME

    def _prepare(self) -> None:
        self.certificates = make_certificates(self.directory / "tls")

    def _listen(self, port: int = 0) -> str:
        return self.certificates.listen(port)

    def _aggregator_url(self, port: int) -> str:
        return f"https://{self.aggregator_host}:{port}"

    def _link_extra(self) -> dict[str, Any]:
        return {"ca_file": str(self.certificates.ca), "tls_hostname": TLS_HOSTNAME}

    def _wait_attached(self) -> None:
        self.coordinator.wait_for(lambda: self.status().get("aggregator_attached"), "the aggregator to attach over TLS", timeout=30)

    def status(self) -> dict[str, Any]:
        """The coordinator's /status over TLS ({} while it does not answer)."""
        try:
            return get_json_tls(self.coord_http, "/status", self.certificates.ca)
        except OSError:
            return {}

    def coordinator_url(self, transport: str) -> str:
        """What participants are given: https:// or pbs://, by the certificate's name."""
        if transport == "http":
            return f"https://{TLS_HOSTNAME}:{self.coord_http}"
        return f"pbs://{TLS_HOSTNAME}:{self.coord_pb}"


def run_participants_over_tls(argv: list[str]) -> int:
    """`bench.participants` with every connection it opens over TLS, verified against `--ca-file`.

    The scripted participants speak HTTP on raw sockets (`socket.create_connection`,
    also under http.client); here each new socket is wrapped in TLS for
    TLS_HOSTNAME before they use it, so their code and timing are otherwise
    those of the plain run.

        python -m bench.tls --ca-file CA.pem --port ... (the options of bench.participants)
    """
    import argparse
    import socket

    parser = argparse.ArgumentParser(prog="python -m bench.tls", add_help=False)
    parser.add_argument("--ca-file", required=True, type=Path)
    ours, theirs = parser.parse_known_args(argv)
    context = ssl.create_default_context(cafile=str(ours.ca_file))
    plain_connection = socket.create_connection

    def tls_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        return context.wrap_socket(plain_connection(address, *args, **kwargs), server_hostname=TLS_HOSTNAME)

    socket.create_connection = tls_connection  # type: ignore[assignment]
    from bench import participants

    return participants.main(theirs)


if __name__ == "__main__":
    import sys

    sys.exit(run_participants_over_tls(sys.argv[1:]))
