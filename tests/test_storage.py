"""maskray.pipeline.storage: URLs, fail-fast checks on a real (loopback) S3 server, and credentials kept
out of every message."""

import pytest

from maskray.pipeline.storage import (
    StorageError,
    check_reachable,
    describe_storage_error,
    open_url,
    public_url,
    redact,
    secret_values,
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


def test_wrong_endpoint_fails_with_a_reason(s3):
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
