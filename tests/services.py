"""Real services for the tests, on loopback only: an S3-API server (moto in server mode, as
s3fs tests itself) and a local Ray cluster.

conftest.py imports the fixtures; a test asks for ``s3`` (a bucket on the server and the
storage options that reach it) or ``ray_local`` (Ray started for this test session).
"""

import os
import uuid
from dataclasses import dataclass

import pytest

# Ray must bind to 127.0.0.1, never the machine's other addresses: this covers a test that calls
# ray.init itself before ray is imported; the fixtures below make sure of it either way.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket on the loopback S3 server."""

    name: str
    endpoint: str
    storage_options: dict

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.name}", *parts])

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)


@pytest.fixture(scope="session")
def s3_server() -> str:
    """The endpoint URL of a moto S3 server on 127.0.0.1, for the whole session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_storage_options(endpoint: str) -> dict:
    # moto accepts any credentials; these are deliberately recognisable, so that tests can
    # grep outputs for them.
    return {
        "key": "AKIAMASKRAYTESTKEY01",
        "secret": "maskray-test-secret-do-not-log",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "skip_instance_cache": True,
    }


@pytest.fixture
def s3(s3_server) -> S3Bucket:
    """A new, empty bucket on the loopback server (a unique name per test)."""
    import s3fs

    options = s3_storage_options(s3_server)
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).call_s3("create_bucket", Bucket=name)  # s3fs's mkdir wants a region moto refuses
    return S3Bucket(name, s3_server, options)


RAY_TEST_OPTIONS = dict(
    _node_ip_address="127.0.0.1",
    include_dashboard=False,
    num_cpus=4,  # more CPU slots than cores: actors and tasks of a test fit at once
    object_store_memory=256 * 1024**2,
    log_to_driver=False,
)


@pytest.fixture
def ray_local():
    """Ray on 127.0.0.1, started on first use and kept for the following tests (a fresh
    cluster, never a leftover one). A test that needs a multi-node cluster shuts it down
    (``ray_cluster``) and the next user of this fixture starts it again."""
    import ray

    from maskray.pipeline.cluster import loopback_only

    if not ray.is_initialized():
        loopback_only()  # Ray must bind to 127.0.0.1, never the machine's other addresses
        ray.init(address="local", **RAY_TEST_OPTIONS)
    yield ray


@pytest.fixture
def ray_cluster():
    """A multi-node cluster on 127.0.0.1 (ray.cluster_utils.Cluster): a head with no CPUs, so
    that work lands on the nodes a test adds with ``cluster.add_node(num_cpus=...)``; the
    driver is connected to it."""
    import ray
    from ray.cluster_utils import Cluster

    from maskray.pipeline.cluster import loopback_only

    ray.shutdown()
    loopback_only()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
                        "object_store_memory": 128 * 1024**2},
    )
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
