"""Reading an HTTP request's JSON body within limits, before any work depends on it.

The body is read chunk by chunk and refused (413) the moment it passes the cap — a chunked body
has no content-length to check first, and reading it whole would hold all of it in memory. A
content-length that is not a number is the client's error (400), not ours. Integers are parsed
only up to MAX_INT_DIGITS digits: Python's int() is quadratic in the digits (and refuses more
than 4300), and no field of the API needs more than 20; a longer one is a 400 naming its field.
"""

from __future__ import annotations

import json
from typing import Any

MAX_BODY_BYTES = 8 << 20
MAX_INT_DIGITS = 40  # 2^64 has 20 digits; more room for a sign and zeros, far below int()'s costs


class BodyError(Exception):
    """A body the server refuses: (HTTP status, message, the field at fault or None)."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


class _HugeNumber:
    """Where the body had an integer of more than MAX_INT_DIGITS digits (never converted)."""

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _parse_int(text: str) -> int | _HugeNumber:
    return int(text) if len(text) <= MAX_INT_DIGITS else _HugeNumber(len(text))


async def read_json_body(request, max_bytes: int = MAX_BODY_BYTES) -> dict:
    """The body as a JSON object; BodyError (400 or 413) otherwise."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit() or len(declared.strip()) > 19:
            raise BodyError(400, f"content-length must be a number of bytes (got {declared[:40]!r})")
        if int(declared) > max_bytes:
            raise BodyError(413, f"the body is larger than {max_bytes} bytes")
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:  # stop reading now: the rest never reaches memory
            raise BodyError(413, f"the body is larger than {max_bytes} bytes")
        parts.append(chunk)
    try:
        body = json.loads(b"".join(parts), parse_int=_parse_int)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise BodyError(400, f"the body is not JSON ({type(e).__name__})") from None
    if not isinstance(body, dict):
        raise BodyError(400, "the body must be a JSON object")
    for field, value in body.items():
        huge = _find_huge(value)
        if huge is not None:
            raise BodyError(400, f"{field}: a number of {huge.digits} digits is out of range", field)
    return body


def _find_huge(value: Any, depth: int = 0) -> _HugeNumber | None:
    if isinstance(value, _HugeNumber):
        return value
    if depth > 64:  # json.loads' own recursion bound stops deeper bodies before this
        return None
    if isinstance(value, list):
        return next((h for h in (_find_huge(v, depth + 1) for v in value) if h is not None), None)
    if isinstance(value, dict):
        return next((h for h in (_find_huge(v, depth + 1) for v in value.values()) if h is not None), None)
    return None
