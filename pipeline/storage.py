"""Object storage through fsspec: opening URLs, failing fast, keeping credentials out of sight.

Every URL a user gives (``s3://bucket/prefix``, ``gs://...``, ``/local/dir``, ``file://...``)
goes through ``open_url``, which returns the fsspec filesystem and the path inside it. Storage
options (endpoint, credentials, ...) are passed through to fsspec and never stored or printed:
``redact`` removes their secret values from any text that may reach a log, a manifest or an
error row, ``public_url`` strips credentials written into a URL itself, and
``without_url_credentials`` those of URLs that an error's text repeats.

The reads, writes and listings that the jobs make themselves (segmentation, training,
evaluation, query, show) go through the functions at the end of this module: ``read_object`` /
``read_bytes``, ``write_bytes_atomically``, ``list_files`` / ``glob_files`` / ``path_type``, and
``check_reachable``. Each is tried again after a failure that may pass, by the one policy
``maskray.pipeline.retry.STORAGE_RETRY``, and one that does not pass raises a StorageError of one
line that names the object (never a credential). A missing object is not a failure of storage:
it is raised as a FileNotFoundError (``read_object``: naming the URL), for the caller to turn
into an error row, a default or its own message. What reads storage through fsspec without this
layer (streams that a whole read would not fit, Parquet read by pyarrow and DuckDB, Ray Train's
checkpoints) is listed in RELIABILITY.md.
"""

import os
import re
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec import AbstractFileSystem

from maskray.pipeline import retry
from maskray.pipeline.errors import OutputError, StorageError, StorageWriteError
from maskray.pipeline.retry import attempts_made, error_chain, http_status, is_transient, retry_call

T = TypeVar("T")

# Option names whose values are secrets, at any depth of the storage options (s3fs's
# key/secret/token, botocore's aws_secret_access_key, gcsfs's token, ...).
_SECRET_NAME = re.compile(r"(secret|token|password|passwd|key|credential|signature|sas)", re.IGNORECASE)
# Names that match the pattern above but are not secret.
_PUBLIC_NAMES = {"key_prefix", "sse_kms_key_id_public"}
# Query parameters of a URL whose values are secrets (pre-signed S3 and GCS URLs, Azure SAS).
_SECRET_QUERY_NAME = re.compile(r"(signature|credential|security-token|token|sig$|^sig|secret|key|password)", re.IGNORECASE)
# A query field (``?name=value``, ``&name=value``, and ``;name=`` of an XML body's ``&amp;``)
# anywhere in a text, such as a URL that an error message repeats (aiohttp's ``url='https://...'``).
_QUERY_FIELD_IN_TEXT = re.compile(r"([?&;])([^=&?#\s'\"]+)=([^&#\s'\"<>()\]]*)")
# The user name and password of a URL anywhere in a text (``scheme://user:secret@host``).
_USERINFO_IN_TEXT = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"]+@")
# Environment variables whose values are secrets, redacted wherever they appear.
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS",
               "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING")


def absolute_url(url: str) -> str:
    """``url`` as it reads from any folder: a local path (no protocol) made absolute against the
    folder it was typed in, ``~`` expanded, a trailing slash kept; a URL with a protocol as it is.

    The jobs resolve every path a user types on the driver, before anything reaches Ray: Ray's
    workers run in folders of their own, where ``data/train.json`` is another file or none."""
    if not isinstance(url, str) or not url.strip() or "://" in url or "::" in url:
        return url
    absolute = os.path.abspath(os.path.expanduser(url))
    return absolute + "/" if url.endswith("/") and not absolute.endswith("/") else absolute


def open_url(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem of ``url`` and the path inside it (no protocol, no trailing slash)."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"a storage URL must be a non-empty string, not {url!r}")
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, path.rstrip("/") or path


def open_object_url(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem and path of one object's URL as the listing wrote it (``protocol://path``).

    Unlike ``open_url``, ``::`` is never read as a chain of filesystems: it is part of the key
    (S3 keys and file names may hold it: times, IPv6 addresses), and ``photo::1.jpg`` must be
    read as itself, not as ``photo``."""
    protocol, _ = fsspec.core.split_protocol(url)
    cls = fsspec.get_filesystem_class(protocol or "file")
    fs = cls(**{**cls._get_kwargs_from_urls(url), **dict(storage_options or {})})
    return fs, fs._strip_protocol(url)


def full_url(fs: AbstractFileSystem, path: str) -> str:
    """The URL of ``path`` on ``fs``, with its protocol: what the output stores as image_uri."""
    return fs.unstrip_protocol(path)


def is_local(fs: AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def has_buckets(fs: AbstractFileSystem) -> bool:
    """Whether the first part of a path on ``fs`` is a bucket (object stores; not local files or HTTP)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return not is_local(fs) and not {"http", "https", "memory"} & set(protocols)


GLOB_CHARS = ("*", "?", "[")


def is_glob(path: str) -> bool:
    return any(c in path for c in GLOB_CHARS)


def glob_base(path: str) -> str:
    """The folder a glob starts from (``bucket/photos`` for ``bucket/photos/**/*.jpg``); a
    path without glob characters is its own base."""
    if not is_glob(path):
        return path
    head = path[: min(path.index(c) for c in GLOB_CHARS if c in path)]
    return head.rsplit("/", 1)[0] if "/" in head else head


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
    """``url`` without the credentials that can be written into it: a user name or password
    (``s3://key:secret@bucket``) and secret query parameters (a pre-signed URL's
    ``X-Amz-Signature``, ``X-Amz-Credential``, an Azure SAS ``sig``, a ``token``)."""
    parts = urlsplit(url)
    if not parts.scheme:
        return url
    if "@" in parts.netloc:
        parts = parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1])
    if parts.query:
        fields = [f.split("=", 1) for f in parts.query.split("&")]
        parts = parts._replace(query="&".join(
            f"{f[0]}=***" if len(f) == 2 and _SECRET_QUERY_NAME.search(f[0]) else "=".join(f) for f in fields))
    return urlunsplit(parts)


def without_url_credentials(text: str, url: str | None = None) -> str:
    """``text`` with ``url`` written as ``public_url`` writes it, and with the credentials of any
    other URL in it (a user name and password, secret query fields) replaced by ``***``: storage
    clients repeat the URL they were given, pre-signed signature and all, in their errors."""
    if url:
        text = text.replace(url, public_url(url))
    text = _USERINFO_IN_TEXT.sub(r"\1***@", text)
    return _QUERY_FIELD_IN_TEXT.sub(lambda m: f"{m[1]}{m[2]}=***" if _SECRET_QUERY_NAME.search(m[2]) else m[0], text)


def describe_storage_error(url: str, error: BaseException) -> str:
    """A one-line explanation of why ``url`` could not be reached, from fsspec/botocore's error;
    without the credentials that ``url`` or the error's text may hold (``without_url_credentials``)."""
    text = f"{type(error).__name__}: {error}"
    # Matched without the URL itself: a key such as img-4031.jpg must not read as a 403.
    path = url.split("://", 1)[-1]
    lowered = text.replace(url, "").replace(path, "").lower()
    status = http_status(error)
    if "nocredentialserror" in lowered or "unable to locate credentials" in lowered:
        reason = "no credentials were found: give them in --storage-options or the usual environment variables"
    elif "nosuchbucket" in lowered or "bucket does not exist" in lowered:
        reason = "the bucket does not exist"
    elif status == 403 or isinstance(error, PermissionError) or \
            any(s in lowered for s in ("invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied", "forbidden", "403")):
        reason = "access was refused: check the credentials and their permissions"
    elif status is not None and (status >= 500 or status == 429):
        # Throttling (503 SlowDown, 429) or a server error, past every retry of the client's and ours.
        reason = f"the storage kept answering HTTP {status}{_error_code(error)}: it is failing or throttling"
    elif any(s in lowered for s in ("connection was closed", "server disconnected", "connection reset", "broken pipe")):
        reason = "the storage kept dropping the connection"
    elif any(s in lowered for s in ("could not connect", "cannot connect", "endpoint", "connection refused",
                                    "name or service not known", "timed out")):
        reason = "the storage endpoint cannot be reached: check endpoint_url and the network"
    elif isinstance(error, FileNotFoundError):
        reason = "it does not exist"
    else:
        reason = "the storage failed"
    return f"{public_url(url)}: {reason} ({without_url_credentials(text, url)})"


def _error_code(error: BaseException) -> str:
    """`` SlowDown`` when the server named its error (botocore's ClientError, under s3fs's OSError)."""
    for candidate in error_chain(error):
        response = getattr(candidate, "response", None)
        code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
        if code and not str(code).isdigit():  # an answer without a body (to a HEAD) has only the status as its code
            return f" {code}"
    return ""


def check_reachable(url: str, fs: AbstractFileSystem, path: str, *, must_exist: bool) -> None:
    """Fail fast, before any work, when the storage behind ``url`` cannot be used.

    On an object store the bucket must exist and answer with these credentials (one HEAD
    request); for an input (``must_exist``) the path itself must exist too. An output path may
    be new. Raises StorageError with a one-line reason, past the retries of ``retry.STORAGE_RETRY``
    for a failure that may pass.
    """
    # Retried like every other call: one 503 must neither fail the job nor read as "not there".
    if has_buckets(fs):
        bucket = path.split("/", 1)[0]
        try:
            retried(lambda: fs.info(bucket), url, None)  # s3fs and gcsfs: a HEAD of the bucket
        except MISSING:
            raise StorageError(f"{public_url(url)}: the bucket {bucket!r} does not exist") from None
    # A glob need not exist as a path: the folder it starts from must.
    if must_exist:
        try:
            retried(lambda: fs.info(glob_base(path)), url, None)
        except MISSING:
            raise StorageError(f"{public_url(url)}: no such file or prefix") from None


def check_output_is_ours(url: str, fs: AbstractFileSystem, path: str, what: str, marker: str,
                         own_names: Collection[str], before_marker: Collection[str] = ()) -> None:
    """An output is maskray's or empty: the folder or prefix ``path`` may hold at its top only
    the names ``own_names``, and only once it holds ``marker``, the file its job writes before
    its parts (``before_marker``: the names it may write before that one); the temporary files
    of atomic writes aside. A folder of the user's that happens to hold ``images/`` is not an
    output. Else OutputError, naming a few of the others, before any work: a job never mixes
    its files with a user's. ``what`` (``a segmentation output``) names the kind of output."""
    kind = path_type(fs, path)
    if kind is None:
        return
    if kind == "file":
        raise OutputError(f"{public_url(url)}: a file, where {what} goes in a folder or prefix; choose another")
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in list_files(fs, path)} - {""}
    allowed = set(own_names) if marker in names else set(before_marker)
    foreign = sorted(n for n in names - allowed if not _TEMPORARY_NAME.fullmatch(n))
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise OutputError(f"{public_url(url)} holds files that are not {what}'s ({shown}); an output is maskray's "
                          "or empty: choose a new folder or prefix")


# Reading, writing, listing ----------------------------------------------------------------------

# What a call raises when the object is not there: the caller's to handle, never retried or wrapped.
MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
# The names of ``write_bytes_atomically``'s temporary files on a local disk: hidden, and never
# a name a job reads (part files, markers and JSON files do not start with a dot). Matched
# exactly when they are cleaned up: the folder may be the user's own (``--output .``), with
# ``.tmp`` files of its own.
_TEMPORARY_NAME = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")


class NotAFileError(FileNotFoundError, IsADirectoryError):
    """``read_object`` of a folder: there is no file at the URL. Caught as FileNotFoundError (as
    a missing file is) and as IsADirectoryError."""


def _temporary_name(name: str) -> str:
    return f".{name}.{uuid.uuid4().hex}.tmp"


def location(fs: AbstractFileSystem, path: str) -> str:
    """How messages name ``path``: as it is on a local disk, as a URL with its protocol elsewhere."""
    return path if is_local(fs) else full_url(fs, path)


def retried(operation: Callable[[], T], url: str, action: str | None,
            passes: tuple[type[BaseException], ...] = MISSING) -> T:
    """``operation()`` under ``retry.STORAGE_RETRY``. ``passes``: raised as they came; any other
    failure becomes StorageError "cannot ACTION URL: reason (tries)" (StorageWriteError for a
    write that kept failing for reasons that may pass). For the storage calls that the functions
    below do not make (the shard plan's reads of one row group at a time)."""
    policy = retry.STORAGE_RETRY  # read at each call, so that tests can shorten the waits
    try:
        return retry_call(operation, policy)
    except passes:
        raise
    except Exception as error:  # noqa: BLE001 - botocore, aiohttp and fsspec raise many kinds
        kind = StorageWriteError if action == "write" and is_transient(error) else StorageError
        verb = f"cannot {action} " if action else ""
        raise kind(f"{verb}{describe_storage_error(url, error)} ({attempts_made(error, policy)})") from None


def read_object(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The whole object at ``url`` (a path or fsspec URL), of any size (s3fs fetches a large one
    in parallel ranges). A missing object raises FileNotFoundError "URL: no such file", a folder
    NotAFileError (a FileNotFoundError) "URL: is a folder, not a file" (or "URL: the bucket 'B'
    does not exist"); any other failure,
    StorageError "URL: reason (tries)", for the caller to say what the object was for."""
    fs, path = open_url(url, storage_options)
    try:
        return retried(lambda: fs.cat_file(path), url, None)
    except IsADirectoryError:
        raise NotAFileError(f"{public_url(url)}: is a folder, not a file") from None
    except MISSING:  # NotADirectoryError: a part of the path is a file, so no such file either
        # Files are read one at a time (a JSON, weights): one more request to say which mistake it is.
        bucket = path.split("/", 1)[0]
        if has_buckets(fs) and path_type(fs, bucket) is None:
            raise FileNotFoundError(f"{public_url(url)}: the bucket {bucket!r} does not exist") from None
        raise FileNotFoundError(f"{public_url(url)}: no such file") from None


def read_bytes(fs: AbstractFileSystem, path: str, url: str | None = None) -> bytes:
    """The whole object at ``path`` on ``fs`` in as few requests as the filesystem allows: one
    GET on S3 (s3fs otherwise asks for the size first, a HEAD per object, to split objects of
    over 50 MB that images and JSON files rarely are; under throttling every request counts).
    A missing object raises as it came (MISSING); any other failure, StorageError "cannot read
    URL: reason (tries)". ``url`` names the object in messages (default: its location)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    options = {"max_concurrency": 1} if "s3" in protocols else {}
    return retried(lambda: fs.cat_file(path, **options), url or location(fs, path), "read")


def write_bytes_atomically(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """``data`` at ``path``, never visible half-written, tried again while failing for reasons that
    may pass. On a local disk: a temporary file, fsynced, renamed over ``path``, and the folder
    fsynced (a crash leaves the old file or the new one); on an object store one PUT (or a
    completed multipart upload), all or nothing, so that a retry after a failure, even one
    where the object did land, writes the same object again. Raises StorageWriteError after the
    last try of a failure that may pass, StorageError for one that cannot (refused access, a full disk)."""
    local = is_local(fs)
    operation = (lambda: _replace_local_file(fs, path, data)) if local else (lambda: fs.pipe_file(path, data))
    retried(operation, location(fs, path), "write", passes=())


def _replace_local_file(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    parent, name = path.rsplit("/", 1)
    fs.makedirs(parent, exist_ok=True)
    temporary = join(parent, _temporary_name(name))
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name is: a crash leaves no empty file
        os.replace(temporary, path)  # atomic within a file system
        _fsync_directory(parent)  # and the rename itself survives a crash
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _fsync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_temporary_files(fs: AbstractFileSystem, folder: str) -> None:
    """Deletes the temporary files that ``write_bytes_atomically`` left in ``folder`` when its
    writer was killed between writing and renaming (only local disks have them): the names it
    makes (``.NAME.<32 hex digits>.tmp``) and no other, since ``folder`` may be the user's.
    Readers never see them, but they are litter. Call it only when no writer is at work in ``folder``."""
    if not is_local(fs) or not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if _TEMPORARY_NAME.fullmatch(name):
            try:
                os.remove(join(folder, name))
            except FileNotFoundError:  # its writer renamed it after all
                pass


def list_files(fs: AbstractFileSystem, path: str, recursive: bool = False) -> list[str]:
    """The paths in the folder or prefix ``path`` (with ``recursive``, every file below it, listed
    in pages: a million keys are a thousand list calls on S3), as they are now: listings that
    the filesystem cached (s3fs does) are dropped first. A folder that does not exist is empty."""
    def listing() -> list[str]:
        fs.invalidate_cache(path)  # a resumed job must see the files of now, not of its last listing
        return fs.find(path) if recursive else fs.ls(path, detail=False)

    try:
        return retried(listing, location(fs, path), "list")
    except FileNotFoundError:
        return []


def glob_files(fs: AbstractFileSystem, pattern: str) -> list[str]:
    """The paths of the files (not folders) that the glob ``pattern`` matches."""
    # With their types: no request per match.
    matched = retried(lambda: fs.glob(pattern, detail=True), location(fs, pattern), "list")
    return [p for p, info in matched.items() if info.get("type") == "file"]


def path_type(fs: AbstractFileSystem, path: str) -> str | None:
    """``"file"``, ``"directory"`` (a folder or a prefix with objects below it) or None when
    ``path`` is neither. Unlike fsspec's isfile and isdir, a failure of storage is retried and
    raised, never taken for "not there"."""
    try:
        return retried(lambda: fs.info(path), location(fs, path), "read").get("type")
    except MISSING:
        return None
