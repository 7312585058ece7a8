"""The garbage collector's pauses in a rendered service under load: collections and time per
generation, with start-up's objects frozen (what main.py's lifespan does) or not.

Run in a rendered service with its environment, drive it with wrk, stop it with Ctrl-C:

    PYTHONPATH=<template>/bench uv run uvicorn --factory gc_pauses:create_app \
        --port 8021 --no-access-log
    wrk -t1 -c64 -d10s http://127.0.0.1:8021/items/1

`NO_FREEZE=1` makes the lifespan's `gc.freeze()` do nothing. On exit it prints, per
generation, the collections, their time in all and the longest.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import time
from pathlib import Path
from typing import Any

pauses: list[tuple[int, float]] = []
started = 0.0


def timed(phase: str, info: dict[str, Any]) -> None:
    global started
    if phase == "start":
        started = time.perf_counter()
    else:
        pauses.append((info["generation"], time.perf_counter() - started))


def report() -> None:
    for generation in range(3):
        times = [seconds for g, seconds in pauses if g == generation]
        if times:
            print(
                f"generation {generation}: {len(times)} collections, "
                f"{sum(times) * 1e3:.0f} ms in all, longest {max(times) * 1e3:.1f} ms"
            )


def create_app() -> Any:
    """The rendered service's app (the package under src/), its collections timed."""
    if os.environ.get("NO_FREEZE") == "1":
        gc.freeze = lambda: None
    package = next(Path("src").glob("*/main.py")).parent.name
    app = importlib.import_module(f"{package}.main").create_app()
    gc.callbacks.append(timed)
    atexit.register(report)
    return app
