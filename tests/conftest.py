"""Shared fixtures. Each fixture here is self-contained; append new ones below."""
from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

# Ray clusters the tests start (local ones, Cluster nodes, job drivers in subprocesses) inherit
# these. Ray's defaults declare a node dead when its raylet misses 5 health checks 3 s apart
# (10 s timeout each): a 2-core CI machine under load can stall a raylet that long, and the
# node's actors (Ray Train's controller, then its workers: the placement-group cleaner removes
# them) die with it. Here a node has about 5 minutes to answer. What the tests kill is seen
# without these timeouts: a node removed by Cluster.remove_node unregisters itself, and a killed
# worker process is noticed by its raylet at once. Not retries: a test that fails still fails.
# Ray Train's controller waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S for a worker group's
# placement group (the resources only, not the workers' start-up) before it tries again, without
# counting a failure: after a node is lost it may ask once for resources that went with it
# (test_ray_train's elastic run), and Ray's 60 s wait for them was most of that test's time.
# Its controller polls the workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s): each run waits
# that long to be seen finished or failed, for tiny runs a good part of their time. A poll that
# takes longer is no failure (a worker is declared hung after 10 minutes).
for _name, _value in {
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_health_check_period_ms": "10000",
    "RAY_health_check_timeout_ms": "60000",
    "RAY_health_check_failure_threshold": "30",
    "RAY_worker_register_timeout_seconds": "300",
    "RAY_gcs_rpc_server_reconnect_timeout_s": "300",
}.items():
    os.environ.setdefault(_name, _value)


# --------------------------------------------------------------------------- s3 (moto server)


@dataclass(frozen=True)
class MotoS3:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str

    def url(self, prefix: str | None = None) -> str:
        """``s3://bucket/<prefix>``, a fresh unique prefix when none is given."""
        return f"s3://{self.bucket}/{prefix or 'test-' + uuid.uuid4().hex[:10]}"


_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key-s3cr3t-VALUE",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_S3_UNSET = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION", "AWS_ENDPOINT_URL_S3")


def free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1: every socket stays bound until all are chosen."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="session")
def s3() -> Iterator[MotoS3]:
    """A moto S3 server on 127.0.0.1 for the session, the AWS_* environment pointing at it
    (dummy keys, AWS_ENDPOINT_URL) and one bucket; the environment is restored afterwards."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (*_S3_ENV, *_S3_UNSET, "AWS_ENDPOINT_URL")}
    os.environ.update(_S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    for key in _S3_UNSET:
        os.environ.pop(key, None)
    try:
        import boto3

        bucket = "rsk-test-bucket"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield MotoS3(endpoint, bucket, _S3_ENV["AWS_ACCESS_KEY_ID"], _S3_ENV["AWS_SECRET_ACCESS_KEY"])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
