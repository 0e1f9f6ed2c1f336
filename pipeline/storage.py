"""Object storage through fsspec: opening URLs, failing fast, keeping credentials out of sight.

Every URL a user gives (``s3://bucket/prefix``, ``gs://...``, ``/local/dir``, ``file://...``)
goes through ``open_url``, which returns the fsspec filesystem and the path inside it. Storage
options (endpoint, credentials, ...) are passed through to fsspec and never stored or printed:
``redact`` removes their secret values from any text that may reach a log, a manifest or an
error row, and ``public_url`` strips credentials written into a URL itself.
"""

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec import AbstractFileSystem

# Option names whose values are secrets, at any depth of the storage options (s3fs's
# key/secret/token, botocore's aws_secret_access_key, gcsfs's token, ...).
_SECRET_NAME = re.compile(r"(secret|token|password|passwd|key|credential|signature|sas)", re.IGNORECASE)
# Names that match the pattern above but are not secret.
_PUBLIC_NAMES = {"key_prefix", "sse_kms_key_id_public"}
# Environment variables whose values are secrets, redacted wherever they appear.
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS",
               "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING")


class StorageError(RuntimeError):
    """Storage that cannot be used as asked: a missing bucket, a wrong endpoint, refused credentials."""


def open_url(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem of ``url`` and the path inside it (no protocol, no trailing slash)."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"a storage URL must be a non-empty string, not {url!r}")
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, path.rstrip("/") or path


def full_url(fs: AbstractFileSystem, path: str) -> str:
    """The URL of ``path`` on ``fs``, with its protocol: what the output stores as image_uri."""
    return fs.unstrip_protocol(path)


def is_local(fs: AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a path inside one filesystem (always '/', also for local paths)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def secret_values(storage_options: Mapping[str, Any] | None = None) -> set[str]:
    """Every secret value in the storage options (searched at any depth) and the environment."""
    found: set[str] = set()

    def visit(value: Any, secret: bool) -> None:
        if isinstance(value, Mapping):
            for name, item in value.items():
                visit(item, secret or (bool(_SECRET_NAME.search(str(name))) and name not in _PUBLIC_NAMES))
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item, secret)
        elif secret and isinstance(value, str) and len(value) >= 4:
            found.add(value)

    visit(dict(storage_options or {}), False)
    found.update(v for name in _SECRET_ENV if len(v := os.environ.get(name, "")) >= 4)
    return found


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret value replaced by ``***`` (longest first, so no part survives)."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def public_url(url: str) -> str:
    """``url`` without a user name or password written into it (``s3://key:secret@bucket``)."""
    parts = urlsplit(url)
    if parts.scheme and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))
    return url


def describe_storage_error(url: str, error: BaseException) -> str:
    """A one-line explanation of why ``url`` could not be reached, from fsspec/botocore's error."""
    text = f"{type(error).__name__}: {error}"
    lowered = text.lower()
    if "nocredentialserror" in lowered or "unable to locate credentials" in lowered:
        reason = "no credentials were found: give them in --storage-options or the usual environment variables"
    elif "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        reason = "the bucket does not exist"
    elif any(s in lowered for s in ("invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied", "forbidden", "403")):
        reason = "access was refused: check the credentials and their permissions"
    elif isinstance(error, PermissionError):
        reason = "access was refused: check the credentials and their permissions"
    elif any(s in lowered for s in ("could not connect", "endpoint", "connection refused", "name or service not known", "timed out")):
        reason = "the storage endpoint cannot be reached: check endpoint_url and the network"
    elif isinstance(error, FileNotFoundError):
        reason = "it does not exist"
    else:
        reason = "it cannot be read"
    return f"{public_url(url)}: {reason} ({text})"


def check_reachable(url: str, fs: AbstractFileSystem, path: str, *, must_exist: bool) -> None:
    """Fail fast, before any work, when the storage behind ``url`` cannot be used.

    On an object store the bucket must exist and answer with these credentials (one HEAD
    request); for an input (``must_exist``) the path itself must exist too. An output path may
    be new. Raises StorageError with a one-line reason.
    """
    try:
        if not is_local(fs):
            bucket = path.split("/", 1)[0]
            try:
                fs.info(bucket)  # s3fs and gcsfs: a HEAD of the bucket
            except FileNotFoundError:
                raise StorageError(f"{public_url(url)}: the bucket {bucket!r} does not exist") from None
        if must_exist and not fs.exists(path):
            raise StorageError(f"{public_url(url)}: no such file or prefix")
    except StorageError:
        raise
    except Exception as error:  # noqa: BLE001 - botocore, aiohttp and fsspec raise many kinds
        raise StorageError(describe_storage_error(url, error)) from None
