"""Rendering the template: answers, variants, and a clean environment for rendered projects."""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import copier
import yaml

from extensions.context import DRIVERS

REPO_ROOT = Path(__file__).resolve().parent.parent
COPIER_YML = REPO_ROOT / "copier.yml"

# Answers that span the variants; everything else keeps its default.
MATRIX_QUESTIONS = ("db_driver", "migrations", "with_example")


def questions() -> dict[str, dict[str, Any]]:
    """The questions of copier.yml, in prompt order (settings excluded)."""
    data = yaml.safe_load(COPIER_YML.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def answer_values(name: str) -> list[Any]:
    """Every value a matrix question can take, read from copier.yml."""
    question = questions()[name]
    if "choices" in question:
        return list(question["choices"].values())
    if isinstance(question["default"], bool):
        return [True, False]
    raise ValueError(f"{name} has no finite set of answers")


def postgres_drivers() -> list[str]:
    """The db_driver answers that mean PostgreSQL, as extensions/context.py tells them."""
    return [driver for driver in answer_values("db_driver") if DRIVERS[driver]["is_postgres"]]


def variants() -> Iterator[dict[str, Any]]:
    """driver x migrations x with_example, derived from copier.yml, with `metrics`,
    `read_replica` (PostgreSQL only) and `tracing` on in half of them, chosen so that each of
    their values meets every value of every other question (pairwise coverage) without
    doubling the matrix: `metrics` where alembic and the example go together (both or
    neither), `read_replica` where asyncpg and alembic do not, `tracing` where asyncpg and
    the example do not (so the default answers are a variant)."""
    for combo in itertools.product(*(answer_values(q) for q in MATRIX_QUESTIONS)):
        data = dict(zip(MATRIX_QUESTIONS, combo, strict=True))
        data["metrics"] = (data["migrations"] == "alembic") == data["with_example"]
        if data["db_driver"] != "aiosqlite":
            alembic = data["migrations"] == "alembic"
            data["read_replica"] = (data["db_driver"] == "asyncpg") != alembic
        data["tracing"] = (data["db_driver"] == "asyncpg") != data["with_example"]
        yield data


def variant_id(data: dict[str, Any]) -> str:
    example = "example" if data["with_example"] else "bare"
    metrics = "-metrics" if data.get("metrics", True) else ""
    replica = "-replica" if data.get("read_replica", False) else ""
    tracing = "-tracing" if data.get("tracing", False) else ""
    pooler = "-pgbouncer" if data.get("db_pooler") == "pgbouncer" else ""
    return f"{data['db_driver']}-{data['migrations']}-{example}{metrics}{replica}{tracing}{pooler}"


def render(
    dst: Path, src: str | Path = REPO_ROOT, vcs_ref: str | None = "HEAD", **data: Any
) -> Path:
    """Render the template with default answers except `data`; return the destination.

    `vcs_ref="HEAD"` renders the working tree, uncommitted changes included.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copier.run_copy(
            str(src),
            str(dst),
            data=data,
            defaults=True,
            unsafe=True,
            vcs_ref=vcs_ref,
            quiet=True,
        )
    return dst


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a rendered project's tools: none of this suite's own
    virtualenv, database or DB_* settings leak in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"VIRTUAL_ENV", "PYTHONPATH", "DATABASE_URL", "UV_PROJECT_ENVIRONMENT"}
        and not k.startswith("DB_")
        and not k.startswith("PYTEST_")
    }
    env.update(extra)
    return env
