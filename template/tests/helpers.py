"""Helpers for tests of the API's resources."""

from __future__ import annotations

from typing import Any

from httpx import AsyncClient


async def create(client: AsyncClient, path: str, **fields: Any) -> dict[str, Any]:
    """POST `fields` as JSON to `path`; the created resource, after checking for a 201."""
    response = await client.post(path, json=fields)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body
