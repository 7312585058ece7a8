"""Reference (d+), the equipped peer: reference (d) (`peer_template.py`, unchanged) plus what a
user of that template adds for what the rendered service gives out of the box, each the usual
package with its documented one-line setup:

- a request id: asgi-correlation-id's `CorrelationIdMiddleware`, the `X-Request-ID` header taken
  from the request or generated, and returned;
- request metrics at `GET /metrics`: prometheus-fastapi-instrumentator with its defaults,
  `Instrumentator().instrument(app).expose(app)`.

Neither package is a dependency of the rendered project: the bench installs both into the
environment the reference apps run in (`bench/service_load.py`, `REFERENCE_EXTRAS`).
"""

from __future__ import annotations

from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI
from peer_template import make_app
from prometheus_fastapi_instrumentator import Instrumentator


def equip(app: FastAPI) -> FastAPI:
    app.add_middleware(CorrelationIdMiddleware, header_name="X-Request-ID")
    Instrumentator().instrument(app).expose(app)
    return app


app = equip(make_app())
