"""Why a request to the API failed, as a bounded `reason` label, and how long to wait before the next try.

The live poller (poller.py) and backfill (backfill.py) both name failures and back off by these
rules, so a failure reads the same in skillable_api_request_failures_total, in the logs and in
backfill's error line.
"""

from __future__ import annotations


from . import client
from .client import ApiError
from .model import KEY_ERROR, DecodeError, NotJsonError, UpstreamError

# Failure reasons besides the client's transport ones (client.py): see docs/failure-modes.md.
NOT_JSON = "not_json"
INVALID_RESPONSE = client.INVALID_RESPONSE
API_ERROR = "api_error"
UNAUTHORIZED = client.UNAUTHORIZED
INTERNAL_ERROR = "internal_error"
# Every reason a failure can be counted under, so each series exists at 0 from the start.
FAILURE_REASONS: tuple[str, ...] = (
    client.CONNECT_TIMEOUT, client.CONNECT_ERROR, client.TIMEOUT, client.CONNECTION_RESET, UNAUTHORIZED,
    client.RATE_LIMITED, client.HTTP_ERROR, client.TOO_LARGE, NOT_JSON, INVALID_RESPONSE, API_ERROR,
    INTERNAL_ERROR,
)

BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 300.0
MAX_RETRY_AFTER_SECONDS = 3600.0  # a longer Retry-After is cut to this, so one bad header never stops polling


def failure_reason(exc: Exception) -> str:
    """The bounded `reason` label for a failed request."""
    if isinstance(exc, ApiError):
        return exc.reason
    if isinstance(exc, UpstreamError):
        return UNAUTHORIZED if KEY_ERROR.search(str(exc)) else API_ERROR
    if isinstance(exc, NotJsonError):
        return NOT_JSON
    if isinstance(exc, DecodeError):
        return INVALID_RESPONSE
    return INTERNAL_ERROR


def retry_after(exc: Exception) -> float | None:
    """The seconds an answer's Retry-After header asked for (a 429 or 503), if it sent one."""
    value = getattr(exc, "retry_after", None)
    return value if isinstance(value, (int, float)) else None


def backoff_seconds(failures_in_row: int, asked: float | None, jitter: float = 1.0,
                    most: float = BACKOFF_MAX_SECONDS, most_asked: float = MAX_RETRY_AFTER_SECONDS) -> float:
    """How long to wait after the `failures_in_row`-th failure in a row.

    The rule: BACKOFF_BASE_SECONDS doubled for each failure after the first, at most `most`,
    times `jitter` (the poller draws it from 0.5..1, so an HA pair does not retry in step); a
    Retry-After the API sent (`asked`) wins when it is longer, cut to `most_asked`, so one
    bad header never stops the work.
    """
    delay = min(most, BACKOFF_BASE_SECONDS * 2 ** (failures_in_row - 1)) * jitter
    if asked is not None:
        delay = max(delay, min(asked, most_asked))
    return delay
