"""A local S3 endpoint (moto's server on 127.0.0.1) for tests that read ``s3://`` inputs.

A plugin registered by tests/conftest.py (``pytest_plugins``), not a conftest itself: other tests do
``from conftest import ...``, which a second conftest module would shadow. Everything is explicit: the
endpoint, dummy credentials and region travel in an ``S3Settings`` and a boto3 client built from them;
no ``AWS_*`` variable is read or set, so no test can reach AWS or depend on real credentials.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import pytest

from raylens.storage import S3Settings

REGION = "us-east-1"
DUMMY_KEY = "raylens-test-key"
DUMMY_SECRET = "raylens-test-secret"


@dataclass
class LocalS3:
    """What a test needs: the endpoint URL, the settings raylens takes, and a boto3 client to arrange
    buckets and objects. ``new_bucket`` gives each test its own bucket (the server lives all session)."""

    endpoint: str
    settings: S3Settings
    client: Any
    _names: Any = field(default_factory=itertools.count, repr=False)

    def filesystem(self):
        return self.settings.filesystem()

    def new_bucket(self, prefix: str = "test") -> str:
        name = f"{prefix.lower().replace('_', '-')[:40]}-{next(self._names)}"
        self.client.create_bucket(Bucket=name)
        return name

    def put(self, bucket: str, key: str, body: bytes | str) -> str:
        self.client.put_object(Bucket=bucket, Key=key, Body=body.encode() if isinstance(body, str) else body)
        return f"s3://{bucket}/{key}"


@pytest.fixture(scope="session")
def local_s3():
    """One moto S3 server for the session, on 127.0.0.1 and a free port; stopped at the end."""
    moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (pip install -e '.[test]')")
    import boto3

    werkzeug_log = logging.getLogger("werkzeug")
    level = werkzeug_log.level
    werkzeug_log.setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        settings = S3Settings(endpoint=endpoint, region=REGION, access_key=DUMMY_KEY, secret_key=DUMMY_SECRET)
        session = boto3.session.Session(aws_access_key_id=DUMMY_KEY, aws_secret_access_key=DUMMY_SECRET,
                                        region_name=REGION)
        client = session.client("s3", endpoint_url=endpoint)
        yield LocalS3(endpoint=endpoint, settings=settings, client=client)
    finally:
        server.stop()
        werkzeug_log.setLevel(level)
