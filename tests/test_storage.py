"""maskray.pipeline.storage: URLs, fail-fast checks on a real (loopback) S3 server, credentials kept
out of every message, and the storage I/O every job goes through: retried while a failure may
pass, never when it cannot, atomic writes."""

import errno
import http.server
import os
import socket
import threading
import uuid

import pytest
from botocore.exceptions import ClientError
from fsspec.implementations.memory import MemoryFileSystem
from s3fs.errors import translate_boto_error

from maskray.pipeline import retry as retry_module
from maskray.pipeline.errors import StorageError, StorageWriteError
from maskray.pipeline.retry import RetryPolicy
from maskray.pipeline.storage import (
    NotAFileError,
    check_reachable,
    describe_storage_error,
    list_files,
    open_url,
    public_url,
    read_bytes,
    read_object,
    redact,
    remove_temporary_files,
    secret_values,
    write_bytes_atomically,
)


def test_secret_values_found_at_any_depth(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value")
    options = {
        "key": "AKIAEXAMPLE",
        "secret": "s3cr3t-value",
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "aws_session_token": "session-token-value"},
        "config_kwargs": {"retries": {"max_attempts": 3}},
    }
    secrets = secret_values(options)
    assert {"AKIAEXAMPLE", "s3cr3t-value", "session-token-value", "env-secret-value"} <= secrets
    assert "http://127.0.0.1:9000" not in secrets


def test_redact_replaces_every_occurrence():
    text = "failed with key=abcd1234 and secret abcd1234-long; abcd1234"
    assert redact(text, {"abcd1234", "abcd1234-long"}) == "failed with key=*** and secret ***; ***"


def test_public_url_strips_credentials():
    assert public_url("s3://AKIA:secret@bucket/prefix") == "s3://***@bucket/prefix"
    assert public_url("https://user:pw@example.com/x.jpg") == "https://***@example.com/x.jpg"
    assert public_url("s3://bucket/prefix") == "s3://bucket/prefix"
    assert public_url("/local/path") == "/local/path"
    # A pre-signed URL's signature and credential, an Azure SAS signature; harmless fields stay.
    presigned = ("https://b.s3.amazonaws.com/w.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAX%2F20261125"
                 "&X-Amz-Signature=0123abcd&X-Amz-Security-Token=tok3n&X-Amz-Expires=600")
    assert public_url(presigned) == ("https://b.s3.amazonaws.com/w.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
                                     "&X-Amz-Signature=***&X-Amz-Security-Token=***&X-Amz-Expires=600")
    assert public_url("https://a.blob.core.windows.net/c/w.pt?sv=2022&sig=s3cr3t") == "https://a.blob.core.windows.net/c/w.pt?sv=2022&sig=***"
    assert public_url("s3://bucket/w.pt?versionId=7") == "s3://bucket/w.pt?versionId=7"


def test_a_glob_input_is_checked_by_the_folder_it_starts_from(tmp_path, s3):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    url = str(tmp_path / "photos" / "**" / "*.jpg")
    check_reachable(url, *open_url(url), must_exist=True)
    absent = str(tmp_path / "absent" / "*.jpg")
    with pytest.raises(StorageError, match="no such file or prefix"):
        check_reachable(absent, *open_url(absent), must_exist=True)
    s3.filesystem().pipe(f"{s3.name}/photos/2026/a.jpg", b"x")
    url = s3.url("photos/*/*.jpg")
    check_reachable(url, *open_url(url, s3.storage_options), must_exist=True)


def test_open_url_local(tmp_path):
    fs, path = open_url(str(tmp_path) + "/")
    assert path == str(tmp_path)
    with pytest.raises(ValueError, match="non-empty string"):
        open_url("  ")


def test_check_reachable_on_s3(s3):
    s3.filesystem().pipe(f"{s3.name}/images/a.jpg", b"x")
    fs, path = open_url(s3.url("images"), s3.storage_options)
    check_reachable(s3.url("images"), fs, path, must_exist=True)
    fs, path = open_url(s3.url("new-output"), s3.storage_options)
    check_reachable(s3.url("new-output"), fs, path, must_exist=False)  # an output may be new
    with pytest.raises(StorageError, match="no such file or prefix"):
        check_reachable(s3.url("absent"), *open_url(s3.url("absent"), s3.storage_options), must_exist=True)
    for must_exist in (True, False):
        url = "s3://no-such-bucket-maskray/x"
        with pytest.raises(StorageError, match="the bucket 'no-such-bucket-maskray' does not exist"):
            check_reachable(url, *open_url(url, s3.storage_options), must_exist=must_exist)


def test_wrong_endpoint_fails_with_a_reason(s3, no_waits):
    # A port nothing listens on; few retries so that the test is quick.
    options = {**s3.storage_options, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    url = s3.url("images")
    with pytest.raises(StorageError, match="endpoint cannot be reached") as raised:
        check_reachable(url, *open_url(url, options), must_exist=True)
    assert options["secret"] not in str(raised.value)


@pytest.mark.parametrize(
    "error, reason",
    [
        (PermissionError("Forbidden"), "access was refused"),
        (OSError("An error occurred (InvalidAccessKeyId) when calling ListObjectsV2"), "access was refused"),
        (FileNotFoundError("x"), "does not exist"),
        (RuntimeError("NoCredentialsError: Unable to locate credentials"), "no credentials were found"),
        # The object's own name is not read as an error code.
        (OSError(5, "Please reduce your request rate: b/x-403-endpoint.jpg"), "the storage failed"),
    ],
)
def test_describe_storage_error(error, reason):
    assert reason in describe_storage_error("s3://b/x-403-endpoint.jpg", error)


PRESIGNED = ("https://b.s3.amazonaws.com/w.pt"
             "?X-Amz-Credential=AKIAX%2F20261125&X-Amz-Signature=5ecre7519&X-Amz-Expires=600")


def test_describe_storage_error_keeps_the_signature_out_of_the_errors_text():
    """aiohttp and fsspec repeat the URL in their errors, as given or re-encoded, and an XML
    error body may quote it: the signature and credential go in every form, harmless fields stay."""
    texts = [f"403, message='Forbidden', url='{PRESIGNED}'",
             "403, message='Forbidden', url=URL('https://b.s3.amazonaws.com/w.pt?X-Amz-Credential=AKIAX/20261125"
             "&X-Amz-Signature=5ecre7519&X-Amz-Expires=600')",
             "<Error><Request>/w.pt?X-Amz-Credential=AKIAX%2F20261125&amp;X-Amz-Signature=5ecre7519</Request></Error>",
             "cannot connect to https://user:pa55word@b.s3.amazonaws.com/w.pt"]
    for text in texts:
        described = describe_storage_error(PRESIGNED, PermissionError(text))
        assert "5ecre7519" not in described and "AKIAX" not in described and "pa55word" not in described, described
        assert described.startswith("https://b.s3.amazonaws.com/w.pt?X-Amz-Credential=***&X-Amz-Signature=***")
        assert "access was refused" in described
    assert "X-Amz-Signature=***&X-Amz-Expires=600'" in describe_storage_error(PRESIGNED, PermissionError(texts[0]))
    # Harmless query fields and plain keys stay as they are.
    assert describe_storage_error("s3://b/k.jpg?versionId=7", OSError("b/k.jpg?versionId=7 failed")).endswith(
        "(OSError: b/k.jpg?versionId=7 failed)")


@pytest.fixture
def refusing_http_server():
    """An HTTP server on 127.0.0.1 that answers every request 403 (as S3 answers a pre-signed URL
    that expired); yields its address."""

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_read_objects_error_for_a_presigned_url_has_no_signature(refusing_http_server, no_waits):
    query = "?X-Amz-Credential=AKIAX%2F20261125&X-Amz-Signature=5ecre7519&X-Amz-Expires=600"
    with socket.socket() as closed:  # a port nothing listens on once this is closed
        closed.bind(("127.0.0.1", 0))
        closed_port = closed.getsockname()[1]
    for address, reason in ((refusing_http_server, "access was refused"),
                            (f"127.0.0.1:{closed_port}", "cannot be reached")):
        with pytest.raises(StorageError, match=reason) as raised:
            read_object(f"http://{address}/w.pt{query}")
        message = str(raised.value)
        assert "5ecre7519" not in message and "AKIAX" not in message, message
        assert message.startswith(f"http://{address}/w.pt?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=600: ")


# Reading, writing, listing: the retries ------------------------------------------------------------


def _throttled() -> OSError:
    """A 503 SlowDown as s3fs hands it on (botocore's ClientError turned into an OSError)."""
    answer = {"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
              "ResponseMetadata": {"HTTPStatusCode": 503}}
    return translate_boto_error(ClientError(answer, "GetObject"))


def without_waits(monkeypatch) -> int:
    """maskray's storage retries in this process (not in Ray's actors and workers, processes of
    their own) as many as ever, without their waits; returns the tries."""
    attempts = retry_module.STORAGE_RETRY.attempts
    monkeypatch.setattr(retry_module, "STORAGE_RETRY", RetryPolicy(attempts, first_wait=0.0))
    return attempts


@pytest.fixture
def no_waits(monkeypatch) -> int:
    return without_waits(monkeypatch)


@pytest.fixture
def memory() -> tuple[MemoryFileSystem, str]:
    """An object store in memory (not a local disk: writes are one put) and a fresh folder on it."""
    return MemoryFileSystem(skip_instance_cache=True), f"/storage-{uuid.uuid4().hex[:8]}"


def failing_first(monkeypatch, fs, method: str, failures: list[BaseException]) -> list[int]:
    """``fs.method`` raising ``failures`` one by one on its first calls, then doing its work;
    returns the list its calls are counted in."""
    original, calls = getattr(fs, method), []

    def call(*args, **kwargs):
        calls.append(1)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return original(*args, **kwargs)

    monkeypatch.setattr(fs, method, call)
    return calls


# (what the call is, the filesystem method it makes, the call, what it returns once it passes)
IO_CALLS = {
    "read": ("cat_file", lambda fs, folder: read_bytes(fs, f"{folder}/a.bin"), b"abc"),
    "write": ("pipe_file", lambda fs, folder: write_bytes_atomically(fs, f"{folder}/b.bin", b"new"), None),
    "list": ("ls", lambda fs, folder: sorted(p.rsplit("/", 1)[1] for p in list_files(fs, folder)), ["a.bin"]),
}


@pytest.mark.parametrize("action", IO_CALLS)
def test_a_failure_that_may_pass_is_retried(action, memory, no_waits, monkeypatch):
    fs, folder = memory
    fs.pipe_file(f"{folder}/a.bin", b"abc")
    method, call, passed = IO_CALLS[action]
    calls = failing_first(monkeypatch, fs, method, [_throttled(), ConnectionResetError(errno.ECONNRESET, "reset")])
    assert call(fs, folder) == passed
    assert len(calls) == 3  # two failures, then the call that passed
    if action == "write":
        assert fs.cat_file(f"{folder}/b.bin") == b"new"


@pytest.mark.parametrize("action", IO_CALLS)
def test_a_failure_that_cannot_pass_is_not_retried(action, memory, no_waits, monkeypatch):
    fs, folder = memory
    fs.pipe_file(f"{folder}/a.bin", b"abc")
    method, call, _ = IO_CALLS[action]
    calls = failing_first(monkeypatch, fs, method, [PermissionError(errno.EACCES, "Access Denied")] * no_waits)
    with pytest.raises(StorageError, match=rf"^cannot {action} memory:/*{folder.lstrip('/')}\S*: access was refused: .*"
                                           r"\(not retried: it would fail again\)$") as raised:
        call(fs, folder)
    assert len(calls) == 1
    assert not isinstance(raised.value, StorageWriteError)  # a rerun would fail the same way


@pytest.mark.parametrize("action", IO_CALLS)
def test_a_failure_that_keeps_passing_gives_up_after_every_try(action, memory, no_waits, monkeypatch):
    fs, folder = memory
    fs.pipe_file(f"{folder}/a.bin", b"abc")
    method, call, _ = IO_CALLS[action]
    calls = failing_first(monkeypatch, fs, method, [_throttled()] * (no_waits + 1))
    expected = StorageWriteError if action == "write" else StorageError
    message = rf"^cannot {action} memory:/*{folder.lstrip('/')}\S*: the storage kept answering HTTP 503 SlowDown.*"
    with pytest.raises(expected, match=message + rf"\({no_waits} attempts\)$"):
        call(fs, folder)
    assert len(calls) == no_waits
    if action == "write":
        assert not fs.exists(f"{folder}/b.bin")


def test_a_missing_object_is_the_callers_to_handle(memory, no_waits, monkeypatch, tmp_path):
    fs, folder = memory
    calls = failing_first(monkeypatch, fs, "cat_file", [])
    with pytest.raises(FileNotFoundError):
        read_bytes(fs, f"{folder}/absent.bin")
    assert len(calls) == 1  # never retried
    assert list_files(fs, f"{folder}/absent") == [] and list_files(fs, f"{folder}/absent", recursive=True) == []
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path}/absent.json: no such file$"):
        read_object(str(tmp_path / "absent.json"))
    (tmp_path / "x.json").write_bytes(b"{}")
    assert read_object(str(tmp_path / "x.json")) == b"{}"


def test_read_object_of_a_folder_or_below_a_file_names_the_url(tmp_path):
    """Not a bare "[Errno 21] Is a directory": the URL and what is wrong, as a FileNotFoundError
    (what callers catch for a missing file); the same for a training run's COCO JSON."""
    from maskray.pipeline.train.coco import CocoDataError, read_coco_json

    with pytest.raises(NotAFileError, match=f"^{tmp_path}: is a folder, not a file$") as raised:
        read_object(str(tmp_path))
    assert isinstance(raised.value, FileNotFoundError) and isinstance(raised.value, IsADirectoryError)
    (tmp_path / "x.json").write_bytes(b"{}")
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path}/x.json/inner.json: no such file$"):
        read_object(str(tmp_path / "x.json" / "inner.json"))  # NotADirectoryError from the disk
    with pytest.raises(CocoDataError, match=f"^{tmp_path}: is a folder, not a file$"):
        read_coco_json(str(tmp_path))
    with pytest.raises(CocoDataError, match=f"^{tmp_path}/x.json/a.json: no such file$"):
        read_coco_json(str(tmp_path / "x.json" / "a.json"))


def test_a_local_write_is_atomic_and_retried(tmp_path, no_waits, monkeypatch):
    """On a local disk: a temporary file renamed into place, tried again when the disk fails in a
    way that may pass (EIO: a network file system), not when it cannot (a full disk); the old
    file stays whole, and no temporary file is left either way."""
    fs, root = open_url(str(tmp_path))
    target = f"{root}/deep/dir/file.bin"
    write_bytes_atomically(fs, target, b"old")
    renames = []

    def rename(source, destination, failures):
        renames.append(1)
        if len(renames) <= len(failures):
            raise failures[len(renames) - 1]
        return os.rename(source, destination)

    monkeypatch.setattr(os, "replace", lambda a, b: rename(a, b, [OSError(errno.EIO, "Input/output error")]))
    write_bytes_atomically(fs, target, b"new")
    assert len(renames) == 2 and (tmp_path / "deep/dir/file.bin").read_bytes() == b"new"
    renames.clear()
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", lambda a, b: rename(a, b, [disk_full] * 9))
    with pytest.raises(StorageError, match=f"^cannot write {target}: the storage failed .*No space left.*not retried"):
        write_bytes_atomically(fs, target, b"newer")
    assert len(renames) == 1 and (tmp_path / "deep/dir/file.bin").read_bytes() == b"new"
    assert [p.name for p in (tmp_path / "deep/dir").iterdir()] == ["file.bin"]


def test_temporary_files_of_killed_writers_are_removed(tmp_path):
    """Only the names write_bytes_atomically makes: the folder may be the user's own (--output .)."""
    (tmp_path / f".part-000001.parquet.{uuid.uuid4().hex}.tmp").write_bytes(b"half")
    (tmp_path / "part-000001.parquet").write_bytes(b"whole")
    theirs = [".hidden", ".notes.tmp", ".draft.0123abcd.tmp", f".draft.{uuid.uuid4().hex.upper()}.tmp",
              f"notes.{uuid.uuid4().hex}.tmp", f".draft.{uuid.uuid4().hex}.tmp.bak"]
    for name in theirs:
        (tmp_path / name).write_bytes(b"the user's")
    remove_temporary_files(*open_url(str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*theirs, "part-000001.parquet"])
    remove_temporary_files(*open_url(str(tmp_path / "absent")))  # nothing to do


def test_the_fail_fast_checks_are_retried(s3, no_waits, monkeypatch):
    """A 503 on the bucket's HEAD or on the input's own fails nothing at once and never reads as
    "no such bucket" or "no such file or prefix"; one that keeps coming says so, with the tries."""
    s3.filesystem().pipe(f"{s3.name}/images/a.jpg", b"x")
    url = s3.url("images")
    fs, path = open_url(url, s3.storage_options)
    info = fs.info
    calls = failing_first(monkeypatch, fs, "info", [_throttled()] * 3)
    check_reachable(url, fs, path, must_exist=True)
    assert len(calls) == 5  # the bucket: three failures, then a pass; the prefix: a pass
    monkeypatch.setattr(fs, "info", info)
    calls = failing_first(monkeypatch, fs, "info", [_throttled()] * 99)
    kept_throttling = rf"^{url}: the storage kept answering HTTP 503 SlowDown.*\({no_waits} attempts\)$"
    with pytest.raises(StorageError, match=kept_throttling):
        check_reachable(url, fs, path, must_exist=False)
    assert len(calls) == no_waits

    def throttled_below_the_bucket(target, **kwargs):
        if target.strip("/") == s3.name:
            return info(target, **kwargs)
        raise _throttled()

    monkeypatch.setattr(fs, "info", throttled_below_the_bucket)
    with pytest.raises(StorageError, match=rf"^{url}: the storage kept answering HTTP 503") as raised:
        check_reachable(url, fs, path, must_exist=True)
    assert "no such file" not in str(raised.value)
