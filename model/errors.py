"""Errors that are the request's own fault, as opposed to the server's.

Only `InvalidRequest` may become a client-error status (gRPC INVALID_ARGUMENT, HTTP 400); every
other exception is the server's problem and is reported without its text's internals. It
subclasses ValueError so that code raising or catching ValueError keeps working.
"""

from __future__ import annotations


class InvalidRequest(ValueError):
    """The request cannot be served as asked; the message says what to change (and names the field)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class BackendUnavailable(RuntimeError):
    """The part of the model that runs elsewhere (the experts) cannot be reached. Every sequence of
    the step that needed it fails; retrying them one by one, as for other step errors, is pointless."""
