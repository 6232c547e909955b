"""An S3-compatible server on a loopback port, in this process (moto), for the S3 store's tests."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def s3_server(bucket: str) -> Iterator[dict[str, str]]:
    """Serve S3 with `bucket` created; yield the AWS_* variables that point a client at it."""
    pytest.importorskip("moto", reason="the S3 store tests need moto[server] (pip install -e '.[dev]')")
    import boto3
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    # one request at a time: moto checks If-None-Match and then writes, without a lock, where S3 itself is
    # atomic; served serially, the check and the write of one request cannot interleave with another's
    server = make_server(
        "127.0.0.1",
        0,
        DomainDispatcherApplication(create_backend_app),
        threaded=False,
        request_handler=MotoRequestHandler,
    )
    thread = threading.Thread(target=server.serve_forever, name="s3-server", daemon=True)
    thread.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_port}",
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
    }
    try:
        boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            region_name=env["AWS_REGION"],
            aws_access_key_id="test",
            aws_secret_access_key="test",
        ).create_bucket(Bucket=bucket)
        yield env
    finally:
        server.shutdown()
        thread.join()
