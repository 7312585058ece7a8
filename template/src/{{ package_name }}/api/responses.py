"""Answers that routes give besides their own (api/errors.py, the body limit), described for
the OpenAPI schema: spread them into a router's or a route's `responses`."""

from __future__ import annotations

from typing import Any

from ..schemas.common import ErrorMessage

# Bodies above this answer 413 before they are read (main.py); nginx in front refuses 1 MB.
MAX_BODY_BYTES = 1024 * 1024

Responses = dict[int | str, dict[str, Any]]

RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}
# Every route that uses the database.
DATABASE_ERRORS: Responses = {
    503: {"model": ErrorMessage, "description": "Database busy or down", "headers": RETRY_AFTER},
    504: {"model": ErrorMessage, "description": "Database query too slow"},
}
# Routes that write: a constraint refused the change, or a concurrent one won.
CONFLICT: Responses = {409: {"model": ErrorMessage, "description": "Conflicts with other data"}}
NOT_FOUND: Responses = {404: {"model": ErrorMessage, "description": "Not found"}}
# Routes that read a body: no JSON at all, or too large (in text when its Content-Length
# said so, and the body was never read).
BODY_ERRORS: Responses = {
    400: {"model": ErrorMessage, "description": "Body not readable as JSON"},
    413: {
        "model": ErrorMessage,
        "description": f"Body over {MAX_BODY_BYTES} bytes",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
}
