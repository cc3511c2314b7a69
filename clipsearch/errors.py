"""Domain errors shared by every service.

Services raise these; the gateway maps each class to one gRPC status code (see
`gateway/errors.py`). Messages are shown to callers, so they say what to fix and never carry
paths, stack traces or exception class names.
"""

from __future__ import annotations


class ClipsearchError(Exception):
    """Base class of errors whose message is safe to show to a caller."""


class InvalidArgument(ClipsearchError):
    """The request is malformed or over a limit; retrying it unchanged fails again."""


class NotFound(ClipsearchError):
    """A requested document id is not stored."""


class Unavailable(ClipsearchError):
    """A downstream service (encoder, shard) cannot be reached right now."""


class DeadlineExceeded(ClipsearchError):
    """The caller's deadline passed before the work finished."""


class ResourceExhausted(ClipsearchError):
    """The server is over a capacity limit; retry later with backoff."""
