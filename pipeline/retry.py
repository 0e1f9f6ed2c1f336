"""Retrying storage calls that may pass: which failures are worth another try, and how long to wait.

Object stores throttle (503 SlowDown), fail now and then (500 InternalError), drop connections
and time out; the same request a moment later succeeds. Their clients retry inside one call
already (botocore up to 5 attempts by default, or what ``config_kwargs={"retries": ...}`` in the
storage options says; s3fs retries SlowDown and dropped connections on top). maskray leaves
that configuration as the user gave it: it never overrides an explicit setting, and more tries
inside each call would multiply the time a call that will not pass takes to give up. What gets
through (a burst longer than the client's budget, a backend whose client retries less) meets
this layer: a few more tries of the whole call, after waits that grow exponentially and are
jittered, so that the readers of many actors do not knock again in step.

A failure that cannot pass (the object is gone, access is refused, the request is malformed)
is never retried: waiting would only delay the answer.
"""

import errno
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# Failures that another try cannot change.
_PERMANENT_TYPES = (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, PermissionError,
                    ValueError, TypeError, AttributeError, NotImplementedError)
# OSError numbers that s3fs (and the local disk) use for a request that is wrong, not unlucky:
# a bad argument, a name too long, an object too large, an operation not allowed, a redirect
# to another region, a full disk or quota, a file too large, a rename across file systems, a
# loop of links, too many links, a folder not empty, a closed file. By name: not every
# platform has each.
_PERMANENT_ERRNOS = {getattr(errno, name) for name in (
    "EINVAL", "ENAMETOOLONG", "EMSGSIZE", "ENOSYS", "EPERM", "EACCES", "ENOENT", "ENOSPC", "EROFS", "EREMCHG",
    "EDQUOT", "EFBIG", "EXDEV", "ELOOP", "EMLINK", "ENOTEMPTY", "EBADF") if hasattr(errno, name)}
# Client-side errors that mean "no answer came" (botocore, aiohttp, fsspec, http.client), by
# name, so that this module imports none of the storage backends.
_TRANSIENT_NAMES = {"ConnectionClosedError", "EndpointConnectionError", "ReadTimeoutError", "ConnectTimeoutError",
                    "HTTPClientError", "ResponseStreamingError", "IncompleteReadError", "ResponseParserError",
                    "ClientPayloadError", "ServerDisconnectedError", "ClientConnectionError", "ClientOSError",
                    "FSTimeoutError", "IncompleteRead", "RemoteDisconnected"}
# Credentials that are missing or malformed stay so.
_PERMANENT_NAMES = {"NoCredentialsError", "PartialCredentialsError", "ParamValidationError", "InvalidRegionError"}
# HTTP statuses that ask to try again later; every other 4xx is the request's own fault.
_TRANSIENT_STATUSES = {408, 425, 429}


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; before try n+1 a wait of about ``first_wait * 2**n`` seconds
    (at most ``max_wait``), of which a random half: between d/2 and d ("equal jitter"), so
    that waits grow for sure and yet spread out."""

    attempts: int = 4
    first_wait: float = 0.5
    max_wait: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.first_wait < 0 or self.max_wait < 0:
            raise ValueError(f"waits must not be negative, got {self.first_wait} and {self.max_wait}")

    def wait(self, retry: int, draw: float) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first), ``draw`` in [0, 1)."""
        ceiling = min(self.max_wait, self.first_wait * 2.0**retry)
        return ceiling * (0.5 + 0.5 * draw)


# The one retry policy of every storage call maskray makes (reads, writes, listings), on top of
# the storage client's own retries: 4 tries, waiting 0.25-0.5, 0.5-1 and 1-2 s between them.
# Tests shorten the waits by replacing it (it is read at each call, never copied at import).
STORAGE_RETRY = RetryPolicy()


def http_status(error: BaseException) -> int | None:
    """The HTTP status the server answered with, if the error (or what caused it) carries one:
    botocore's ClientError, aiohttp's ClientResponseError, gcsfs's HttpError."""
    for candidate in error_chain(error):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(status, int):
                return status
        for name in ("status", "code"):
            status = getattr(candidate, name, None)
            if isinstance(status, int) and 100 <= status < 600:
                return status
    return None


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` may pass if the same call is made again a little later.

    No: a missing object, refused access, a malformed request, missing credentials, a 4xx
    answer. Yes: throttling and server errors (429, 5xx, SlowDown), connections refused, dropped
    or timed out, and, since a wasted retry costs only time, any storage error (an OSError)
    not known to be permanent. Any other exception is a bug or a bad argument, never retried.
    """
    chain = error_chain(error)
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    if names & _PERMANENT_NAMES:
        return False
    # No answer came (the status an HTTP client error may carry inside is its parser's, not the server's).
    if {cls.__name__ for cls in type(error).__mro__} & _TRANSIENT_NAMES or isinstance(error, (TimeoutError, ConnectionError)):
        return True
    status = http_status(error)
    if status is not None:
        return status >= 500 or status in _TRANSIENT_STATUSES
    if names & _TRANSIENT_NAMES:
        return True
    if isinstance(error, _PERMANENT_TYPES):
        return False
    if isinstance(error, OSError):
        return error.errno not in _PERMANENT_ERRNOS
    return False


def retry_call(
    operation: Callable[[], T],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], None] = time.sleep,
    draw: Callable[[], float] = random.random,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """``operation()``, tried again after a transient failure, up to ``policy.attempts`` times.
    Raises a permanent failure at once and a transient one after the last try, as it came.
    ``on_retry(retry, error, wait)`` is told of each retry before its wait."""
    for retry in range(policy.attempts):
        try:
            return operation()
        except Exception as error:  # noqa: BLE001 - storage clients raise many kinds; is_transient sorts them
            if retry + 1 == policy.attempts or not is_transient(error):
                raise
            wait = policy.wait(retry, draw())
            if on_retry is not None:
                on_retry(retry, error, wait)
            sleep(wait)
    raise AssertionError("unreachable: the last attempt returns or raises")


def attempts_made(error: BaseException, policy: RetryPolicy) -> str:
    """For a message: how often a call that ended in ``error`` was tried."""
    return f"{policy.attempts} attempts" if is_transient(error) else "not retried: it would fail again"


def error_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors that caused it (s3fs turns botocore's ClientError into an OSError)."""
    chain: list[BaseException] = []
    while error is not None and error not in chain and len(chain) < 8:
        chain.append(error)
        # An error raised while handling another names it as its context, unless told not to.
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return chain
