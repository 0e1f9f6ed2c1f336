"""Storage that throttles, fails, drops connections and is slow, with real parts: the loopback
S3 server behind a fault-injecting proxy (tests/faults.py), a local Ray cluster, the output read
back with DuckDB straight from the server and compared with an undisturbed run's.

- A share of the reads and writes faulted: the job completes, and its rows are the
  undisturbed run's, every image once; the proxy shows that each kind of fault happened.
- An input image and an output part that always fail: their shards fail with a message that
  names the object and the reason, the other shards are committed, the failed ones left no
  part; a rerun without the faults finishes them, and the rows are again the undisturbed run's.
- A read or a write that fails past the storage client's own retries is retried by ours (a
  body cut short is read again, never decoded as a broken image); one that keeps failing
  raises a clear error and leaves no object.
- The retry helper's classification and backoff, without sleeping.
"""

import errno
import hashlib

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from s3fs.errors import translate_boto_error

from maskray.pipeline import retry as retry_module
from maskray.pipeline.errors import StorageWriteError
from maskray.pipeline.results.query import connect
from maskray.pipeline.retry import RetryPolicy, is_transient, retry_call
from maskray.pipeline.segment.job import run_segment
from maskray.pipeline.segment.plan import Plan
from maskray.pipeline.segment.settings import SegmentJob
from maskray.pipeline.segment.shardbook import MAX_SHARD_ATTEMPTS
from maskray.pipeline.storage import open_url, write_bytes_atomically
from maskray.pipeline.weights import Weights
from tests.faults import FaultProxy, FaultRule
from tests.services import s3_storage_options
from tests.test_segment import BROKEN, sample_files, sample_image, weights_path  # noqa: F401 - weights_path is a fixture
from tests.test_storage import without_waits

IMAGES = 21  # + the 3 broken files: 24 inputs, 12 shards of 2 (many writes: 36 PUTs)
SHARD_SIZE = 2
# The requests faulted here: the workers' reads of the input and writes of part files and
# done-markers, and the listing of done-markers. The driver's own requests (the listing of the
# input, the manifest, the plan) are retried by maskray as well (maskray.pipeline.retry), but the
# final totals, read by pyarrow outside the storage layer, and this test's read-back with DuckDB
# have only the storage client's retries (5 tries): at a quarter faulted, about one such request
# in 3,000 would fail the run (resumable), so the driver's requests are left alone here.
DATA_PATH = [(None, r"^/[^/?]+/in/"), ("PUT", r"/(instances|images|_done)/"), ("GET", r"prefix=[^&]*_done")]
# A quarter of those requests, in four kinds. The schedule is fixed by the seed and the request
# targets (tests/faults.py); with this seed every kind falls on reads and on writes. Should a
# change of libraries move the requests so that one no longer does, the assertion says so:
# take another seed.
SHARES = {"503": 0.07, "500": 0.06, "drop": 0.06, "slow": 0.06}
SEED = 20


def faulty_data_path(shares: dict[str, float] = SHARES) -> list[FaultRule]:
    return [FaultRule(kind, share, target, method) for method, target in DATA_PATH for kind, share in shares.items()]


def through(proxy: FaultProxy, **extra) -> dict:
    """Storage options that reach the server through ``proxy``."""
    options = s3_storage_options(proxy.endpoint)
    return {**options, **extra}


@pytest.fixture(scope="module")
def bucket(s3_server):
    """One bucket for the module: the input, the undisturbed run's output and each test's output,
    so that image URIs are the same in all of them."""
    import s3fs

    options = s3_storage_options(s3_server)
    # A fixed name (the server is the session's own): the proxy's fault schedule hashes the
    # request targets, so the same test meets the same faults every time.
    name = "maskray-storage-faults"
    fs = s3fs.S3FileSystem(**options)
    fs.call_s3("create_bucket", Bucket=name)
    for key, data in sample_files(IMAGES).items():
        fs.pipe(f"{name}/in/{key}", data)
    return name


@pytest.fixture(scope="module")
def reference(bucket, s3_server, weights_path):  # noqa: F811 - the imported fixture
    """An undisturbed run straight to the server: what every disturbed run must equal."""
    import ray

    if not ray.is_initialized():
        from tests.services import RAY_TEST_OPTIONS

        ray.init(address="local", **RAY_TEST_OPTIONS)
    output = f"s3://{bucket}/reference"
    summary = run_segment(job(bucket, "reference", s3_storage_options(s3_server), weights_path))
    assert summary.complete and summary.images == IMAGES + len(BROKEN)
    return rows(output, s3_storage_options(s3_server))


def job(bucket: str, output: str, options: dict, weights) -> SegmentJob:
    return SegmentJob(f"s3://{bucket}/in", f"s3://{bucket}/{output}", str(weights), options, batch_size=2, shard_size=SHARD_SIZE,
                      progress=False)


def rows(output: str, options: dict) -> dict[str, list]:
    """Both tables' rows, sorted, read with DuckDB; and no image (or instance) twice."""
    con = connect(output, options)
    tables = {t: sorted(con.sql(f"SELECT * FROM {t}").fetchall(), key=repr) for t in ("instances", "images")}
    for table, key in (("images", "image_uri"), ("instances", "image_uri, instance")):
        twice = con.sql(f"SELECT count(*) FROM (SELECT {key} FROM {table} GROUP BY ALL HAVING count(*) > 1)").fetchall()
        assert twice == [(0,)], table
    return tables


def assert_same_rows(ours: dict[str, list], reference: dict[str, list]) -> None:
    assert len(ours["images"]) == IMAGES + len(BROKEN)
    assert len(ours["instances"]) > 0, "the model detected nothing: the comparison would be empty"
    for table in ("images", "instances"):
        assert ours[table] == reference[table], table


# The retry helper ---------------------------------------------------------------------------


def _client_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} happened"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


@pytest.mark.parametrize(
    "error, transient",
    [
        # As s3fs hands them on: botocore's ClientError turned into an OSError, the ClientError its cause.
        (translate_boto_error(_client_error(503, "SlowDown")), True),
        (translate_boto_error(_client_error(500, "InternalError")), True),
        (translate_boto_error(_client_error(502, "BadGateway")), True),
        (translate_boto_error(_client_error(429, "TooManyRequests")), True),
        (translate_boto_error(_client_error(408, "RequestTimeout")), True),
        (translate_boto_error(_client_error(404, "NoSuchKey")), False),
        (translate_boto_error(_client_error(403, "AccessDenied")), False),
        (translate_boto_error(_client_error(400, "InvalidArgument")), False),
        (translate_boto_error(_client_error(400, "SomeNewCode")), False),  # an unknown code of a 4xx: the request's fault
        (ConnectionClosedError(endpoint_url="http://127.0.0.1:1/b/k"), True),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), True),
        (TimeoutError("read timed out"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset by peer"), True),
        (OSError(errno.EIO, "input/output error"), True),
        (FileNotFoundError("b/k"), False),
        (PermissionError("Forbidden"), False),
        (NoCredentialsError(), False),
        (ValueError("bad range"), False),
        (KeyError("a bug in our code"), False),  # not storage: never retried
        (RuntimeError("a bug in our code"), False),
        (OSError(errno.EINVAL, "The specified bucket is not valid."), False),
        (OSError(errno.ENOSPC, "No space left on device"), False),
        # Local and network disks: a quota, a file too large, a rename across file systems, a loop of
        # links, too many links, a folder not empty, a closed file. Not one may pass.
        *[(OSError(getattr(errno, name), name), False)
          for name in ("EDQUOT", "EFBIG", "EXDEV", "ELOOP", "EMLINK", "ENOTEMPTY", "EBADF") if hasattr(errno, name)],
        (OSError(errno.ESTALE, "Stale file handle"), True),  # an NFS server that restarted: may pass
    ],
    ids=lambda v: v if isinstance(v, bool) else f"{type(v).__name__}-{v}"[:60],
)
def test_which_failures_are_retried(error, transient):
    assert is_transient(error) is transient


def test_retry_backs_off_with_jitter_and_gives_up():
    waits: list[float] = []
    policy = RetryPolicy(attempts=4, first_wait=0.5, max_wait=1.5)

    def failing(times: int, error: Exception):
        calls = []

        def operation():
            calls.append(1)
            if len(calls) <= times:
                raise error
            return len(calls)

        return operation, calls

    # Two passing failures, then success: two waits, each in [d/2, d] for d = 0.5, 1.
    operation, calls = failing(2, ConnectionResetError("reset"))
    draws = iter([0.0, 0.999])
    assert retry_call(operation, policy, sleep=waits.append, draw=lambda: next(draws)) == 3
    assert waits == [0.25, pytest.approx(0.9995)]
    # Failing every time: four attempts, three waits that grow up to the cap, the last error raised as it came.
    waits.clear()
    operation, calls = failing(10, OSError(errno.EBUSY, "Please reduce your request rate."))
    seen = []
    with pytest.raises(OSError, match="reduce your request rate"):
        retry_call(operation, policy, sleep=waits.append, draw=lambda: 1.0, on_retry=lambda n, e, w: seen.append((n, w)))
    assert len(calls) == 4 and waits == [0.5, 1.0, 1.5] and seen == [(0, 0.5), (1, 1.0), (2, 1.5)]
    # A failure that cannot pass: raised at once, no wait.
    waits.clear()
    operation, calls = failing(10, PermissionError("Access Denied"))
    with pytest.raises(PermissionError):
        retry_call(operation, policy, sleep=waits.append)
    assert len(calls) == 1 and waits == []
    # Waits spread out between d/2 and d, whatever the draw.
    assert [RetryPolicy(first_wait=2.0, max_wait=100.0).wait(3, d) for d in (0.0, 0.5, 0.99)] == [8.0, 12.0, pytest.approx(15.92)]
    with pytest.raises(ValueError, match="attempts must be at least 1"):
        RetryPolicy(attempts=0)


# Writes past the storage client's own retries -----------------------------------------------------


def test_a_write_is_retried_past_the_clients_retries(s3, monkeypatch):
    """With botocore told not to retry (``total_max_attempts: 1``), a 500 reaches our retry (s3fs
    retries only throttling and dropped connections itself): a PUT answered 500, then dropped,
    lands on the third try; one answered 500 every time raises StorageWriteError naming the
    object, the reason and the tries, and leaves no object."""
    without_waits(monkeypatch)
    with FaultProxy(s3.endpoint) as proxy:
        options = through(proxy, config_kwargs={"retries": {"total_max_attempts": 1}})
        fs, root = open_url(s3.url("out"), options)
        proxy.set_rules([FaultRule("500", method="PUT", target="part-1", limit=1),
                         FaultRule("drop", method="PUT", target="part-1", limit=1)])
        write_bytes_atomically(fs, f"{root}/part-1", b"first")
        assert proxy.counts("PUT") == {"500": 1, "drop": 1}
        proxy.set_rules([FaultRule("500", method="PUT", target="part-2")])
        with pytest.raises(StorageWriteError, match=r"cannot write s3://.*/out/part-2: the storage kept answering HTTP 500 "
                                                    r"InternalError.*\(4 attempts\)") as raised:
            write_bytes_atomically(fs, f"{root}/part-2", b"second")
        assert s3.storage_options["secret"] not in str(raised.value)
        assert proxy.counts("PUT", "part-2") == {"500": 4}
    direct = s3.filesystem()
    assert direct.cat_file(f"{s3.name}/out/part-1") == b"first"
    assert not direct.exists(f"{s3.name}/out/part-2")


# Reads past the storage client's own retries ----------------------------------------------------


@pytest.mark.slow
def test_a_read_is_retried_and_a_passing_fault_never_becomes_the_images_error(s3, weights_path, monkeypatch):  # noqa: F811
    """Each kind of fault, twice in a row, on an image's GET: the worker still reads the image
    whole (a body cut short is noticed and read again, never kept as a broken image); a
    fault that never passes fails the shard (ShardReadError), while an image that is gone is
    that image's error row."""
    from maskray.pipeline.segment import worker as worker_module

    without_waits(monkeypatch)
    data = sample_image(1)
    s3.filesystem().pipe(f"{s3.name}/in/a.png", data)
    raw = weights_path.read_bytes()
    with FaultProxy(s3.endpoint) as proxy:
        options = through(proxy, config_kwargs={"retries": {"total_max_attempts": 1}})
        worker = worker_module.ShardWorker(Weights("w", hashlib.sha256(raw).hexdigest(), raw), s3.url("out"), options)
        try:
            for kind in ("503", "500", "drop", "cut", "slow"):
                proxy.set_rules([FaultRule(kind, method="GET", target="/in/a.png", limit=2)])
                loaded = worker.load(s3.url("in", "a.png"), 0)
                # The whole file, byte for byte (on a CPU it is decoded with its batch, on the inference thread).
                assert loaded.error is None and loaded.data == data, (kind, loaded.error)
            assert proxy.counts("GET") == {"503": 2, "500": 2, "drop": 2, "cut": 2, "slow": 1}  # a slow answer is an answer

            proxy.set_rules([FaultRule("500", method="GET", target="/in/a.png")])
            message = r"cannot read s3://.*/in/a.png: the storage kept answering HTTP 500 InternalError.*\(4 attempts\)"
            with pytest.raises(worker_module.ShardReadError, match=message) as raised:
                worker.load(s3.url("in", "a.png"), 0)
            assert s3.storage_options["secret"] not in str(raised.value)
            gone = worker.load(s3.url("in", "gone.png"), 1)
            assert gone.image is None and "gone.png: it does not exist" in gone.error
        finally:
            worker.close()


# Whole jobs ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_job_completes_through_throttling_errors_drops_and_slowness(ray_local, bucket, s3_server, reference,
                                                                    weights_path):  # noqa: F811
    with FaultProxy(s3_server, faulty_data_path(), seed=SEED, slow_seconds=0.3) as proxy:
        summary = run_segment(job(bucket, "out-faulty", through(proxy), weights_path))
    assert summary.complete and summary.shards_run == summary.shards == 12
    assert_same_rows(rows(f"s3://{bucket}/out-faulty", s3_storage_options(s3_server)), reference)

    # The faults did happen: every kind, and each kind of failure on reads and on writes.
    everything, reads, writes = proxy.counts(), proxy.counts(target=r"/in/"), proxy.counts("PUT")
    assert all(everything[kind] >= 1 for kind in SHARES), everything
    assert all(reads[kind] >= 1 and writes[kind] >= 1 for kind in ("503", "500", "drop")), (reads, writes)
    data_requests = sum(proxy.requests(method, target) for method, target in DATA_PATH)
    assert 0.15 <= len(proxy.injected) / data_requests <= 0.35, (len(proxy.injected), data_requests)  # about a quarter


@pytest.mark.slow
def test_keys_that_keep_failing_fail_their_shards_and_a_rerun_finishes_them(ray_local, bucket, s3_server, reference,
                                                                             weights_path):  # noqa: F811
    """An input image whose every read fails and an output part whose every write fails: their
    two shards fail, each with a message naming the object and the reason, after every retry
    (the client's, ours, the job's); the other shards are committed; the failed ones left no
    part and no done-marker. With the faults gone, a rerun finishes those two shards alone."""
    bad_image, bad_part_shard = "img/005.png", 9
    output = f"s3://{bucket}/out-bad-keys"
    bad_part = f"{output}/instances/part-{bad_part_shard:06d}.parquet"
    direct = s3_storage_options(s3_server)
    rules = [FaultRule("500", target=f"/in/{bad_image}$"),
             FaultRule("500", method="PUT", target=f"/instances/part-{bad_part_shard:06d}")]
    with FaultProxy(s3_server, rules) as proxy:
        # Few client-side retries, so that the test is quick: our retries and the job's shard retries remain.
        options = through(proxy, config_kwargs={"retries": {"total_max_attempts": 2}})
        summary = run_segment(job(bucket, "out-bad-keys", options, weights_path))

        fs, root = open_url(output, direct)
        [bad_read_shard] = [s.index for s in Plan(fs, root).shards() if f"s3://{bucket}/in/{bad_image}" in s.uris]
        assert bad_read_shard != bad_part_shard
        assert not summary.complete and set(summary.failed_shards) == {bad_read_shard, bad_part_shard}
        why_read, why_write = summary.failed_shards[bad_read_shard], summary.failed_shards[bad_part_shard]
        assert why_read.startswith(f"cannot read s3://{bucket}/in/{bad_image}: the storage kept answering HTTP 500 InternalError")
        assert why_write.startswith(f"cannot write {bad_part}: the storage kept answering HTTP 500 InternalError"), why_write
        attempts = retry_module.STORAGE_RETRY.attempts  # the actors' policy: they run in processes of their own
        assert why_read.endswith(f"({attempts} attempts)") and why_write.endswith(f"({attempts} attempts)")
        report = summary.describe()
        assert f"shard {bad_read_shard} FAILED: cannot read s3://{bucket}/in/{bad_image}" in report
        assert f"shard {bad_part_shard} FAILED: cannot write {bad_part}" in report
        assert direct["secret"] not in report and direct["key"] not in report
        # Each of the job's tries of a shard made STORAGE_RETRY.attempts reads (or writes), each two
        # requests (the client's one retry).
        assert proxy.counts(target=bad_image) == {"500": MAX_SHARD_ATTEMPTS * attempts * 2}
        assert proxy.counts("PUT") == {"500": MAX_SHARD_ATTEMPTS * attempts * 2}
        # The other shards are committed; the failed ones left nothing, not even a part file.
        fs.invalidate_cache()
        done = {p.rsplit("/", 1)[1] for p in fs.ls(f"{root}/_done")}
        assert done == {f"shard-{i:06d}.json" for i in range(summary.shards) if i not in (bad_read_shard, bad_part_shard)}
        for shard in (bad_read_shard, bad_part_shard):
            for table in ("instances", "images"):
                assert not fs.exists(f"{root}/{table}/part-{shard:06d}.parquet")

        # The faults pass; the same job again finishes those two shards alone.
        proxy.set_rules([])
        again = run_segment(job(bucket, "out-bad-keys", options, weights_path))
    assert again.complete and again.shards_run == 2 and again.images == IMAGES + len(BROKEN)
    assert_same_rows(rows(output, direct), reference)
