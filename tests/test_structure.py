"""What each answer adds or removes, without installing anything."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.rendering import REPO_ROOT, answer_values, questions, render, variant_id, variants

VARIANTS = list(variants())
PKG = "my_service"

ALWAYS = [
    ".copier-answers.yml",
    ".env.example",
    ".gitignore",
    ".pre-commit-config.yaml",
    ".dockerignore",
    "Dockerfile",
    ".github/workflows/ci.yml",
    "README.md",
    "docs/database/README.md",
    "docs/database/configuration.md",
    "docs/database/errors.md",
    "docs/database/health.md",
    "docs/database/naming.md",
    "docs/database/observability.md",
    "docs/database/performance.md",
    "docs/database/pool.md",
    "docs/database/sessions.md",
    "docs/database/transactions.md",
    "docs/database/troubleshooting.md",
    "pyproject.toml",
    f"src/{PKG}/__init__.py",
    f"src/{PKG}/py.typed",
    f"src/{PKG}/config.py",
    f"src/{PKG}/logs.py",
    f"src/{PKG}/urls.py",
    f"src/{PKG}/main.py",
    f"src/{PKG}/db/__init__.py",
    f"src/{PKG}/db/base.py",
    f"src/{PKG}/db/database.py",
    f"src/{PKG}/db/driver.py",
    f"src/{PKG}/db/engine.py",
    f"src/{PKG}/db/errors.py",
    f"src/{PKG}/db/listeners.py",
    f"src/{PKG}/db/pool.py",
    f"src/{PKG}/db/retry.py",
    f"src/{PKG}/db/session.py",
    f"src/{PKG}/db/startup.py",
    f"src/{PKG}/api/__init__.py",
    f"src/{PKG}/api/deps.py",
    f"src/{PKG}/api/errors.py",
    f"src/{PKG}/api/health.py",
    f"src/{PKG}/models/__init__.py",
    "tests/__init__.py",
    "tests/conftest.py",
    "tests/support.py",
    "tests/test_database.py",
    "tests/test_driver.py",
    "tests/test_errors.py",
    "tests/test_health.py",
    "tests/test_listeners.py",
    "tests/test_logs.py",
    "tests/test_naming.py",
    "tests/test_no_update_conflicts.py",
    "tests/test_pool.py",
    "tests/test_read_sessions.py",
    "tests/test_retry.py",
    "tests/test_session.py",
    "tests/test_settings.py",
    "tests/test_startup.py",
]
POSTGRES_ONLY = [
    "docker-compose.yml",
    "tests/test_statement_timeout.py",
]
SQLITE_ONLY = ["docs/database/sqlite.md"]
ALEMBIC_ONLY = [
    "alembic.ini",
    "docs/database/migrations.md",
    "migrations/env.py",
    "migrations/script.py.mako",
    "migrations/versions/.gitkeep",
    "tests/test_migrations.py",
]
EXAMPLE_ONLY = [
    f"src/{PKG}/models/item.py",
    f"src/{PKG}/schemas.py",
    f"src/{PKG}/api/items.py",
    "tests/test_bad_input.py",
    "tests/test_items.py",
]
PROTOTYPE_ONLY = ["docs/database/prototype.md", f"src/{PKG}/db/prototype.py"]
POSTGRES_AND_ALEMBIC = [
    "docs/database/roles.md",
    "migrations/runtime_role.sql",
    "tests/test_roles.py",
]
METRICS_ONLY = [f"src/{PKG}/metrics.py", "tests/test_metrics.py"]
ALEMBIC_AND_EXAMPLE = ["migrations/versions/20260101_0001_create_items.py"]
# SQLite gives out the ids of deleted rows again without AUTOINCREMENT: 0002 adds it.
ALEMBIC_AND_EXAMPLE_ON_SQLITE = ["migrations/versions/20261129_0002_items_autoincrement.py"]

DRIVER_PACKAGES = {"asyncpg": "asyncpg", "psycopg": "psycopg[binary]", "aiosqlite": "aiosqlite"}


@pytest.fixture(scope="module", params=VARIANTS, ids=variant_id)
def rendered(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], Path]:
    data: dict[str, Any] = request.param
    return data, render(tmp_path_factory.mktemp(variant_id(data)), **data)


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_files_follow_the_answers(rendered: tuple[dict[str, Any], Path]) -> None:
    data, root = rendered
    is_postgres = data["db_driver"] != "aiosqlite"
    alembic = data["migrations"] == "alembic"
    example = data["with_example"]
    expected = set(ALWAYS)
    groups = [
        (POSTGRES_ONLY, is_postgres),
        (SQLITE_ONLY, not is_postgres),
        (ALEMBIC_ONLY, alembic),
        (PROTOTYPE_ONLY, not alembic),
        (METRICS_ONLY, data["metrics"]),
        (POSTGRES_AND_ALEMBIC, is_postgres and alembic),
        (EXAMPLE_ONLY, example),
        (ALEMBIC_AND_EXAMPLE, alembic and example),
        (ALEMBIC_AND_EXAMPLE_ON_SQLITE, alembic and example and not is_postgres),
    ]
    for group, present in groups:
        if present:
            expected |= set(group)
    assert files(root) == expected


def test_no_jinja_left_over(rendered: tuple[dict[str, Any], Path]) -> None:
    _, root = rendered
    for path in root.rglob("*"):
        if path.is_file():
            text = path.read_text()
            for marker in ("{{", "{%", "{#", "%}"):
                assert marker not in text, f"{path.relative_to(root)} contains {marker!r}"


def test_answers_file_records_the_answers(rendered: tuple[dict[str, Any], Path]) -> None:
    data, root = rendered
    answers = yaml.safe_load((root / ".copier-answers.yml").read_text())
    for name, value in data.items():
        assert answers[name] == value
    assert answers["_src_path"] == str(REPO_ROOT)
    assert answers["_commit"]
    for name, question in questions().items():
        if name in {"db_statement_timeout", "db_pooler"} and data["db_driver"] == "aiosqlite":
            assert name not in answers
        elif name not in data:
            assert answers[name] == question["default"] or "{{" in str(question["default"])


def test_dependencies_are_exactly_what_the_variant_needs(
    rendered: tuple[dict[str, Any], Path],
) -> None:
    data, root = rendered
    project = tomllib.loads((root / "pyproject.toml").read_text())
    names = {
        re.split(r"[<>=!~ ]", dep, maxsplit=1)[0] for dep in project["project"]["dependencies"]
    }
    expected = {"fastapi", "uvicorn[standard]", "pydantic-settings", "sqlalchemy[asyncio]"}
    expected |= {"asgi-correlation-id", "python-json-logger"}
    expected.add(DRIVER_PACKAGES[data["db_driver"]])
    if data["migrations"] == "alembic":
        expected.add("alembic")
    if data["metrics"]:
        expected.add("prometheus-client")
    assert names == expected
    assert project["project"]["requires-python"] == ">=3.11"
    assert project["tool"]["mypy"]["strict"] is True
    assert project["tool"]["ruff"]["lint"]["select"]


def test_env_example_lists_every_setting(rendered: tuple[dict[str, Any], Path]) -> None:
    data, root = rendered
    config = (root / "src" / PKG / "config.py").read_text()
    fields = set(re.findall(r"^    (database_\w*url|db_\w+|log_\w+): ", config, re.M))
    # Optional settings are listed commented out.
    keys = set(re.findall(r"^(?:# )?([A-Z_]+)=", (root / ".env.example").read_text(), re.M))
    assert {f.upper() for f in fields} <= keys
    assert ("DB_STATEMENT_TIMEOUT" in keys) == (data["db_driver"] != "aiosqlite")


def test_compose_has_a_healthy_postgres(rendered: tuple[dict[str, Any], Path]) -> None:
    data, root = rendered
    if data["db_driver"] == "aiosqlite":
        assert not (root / "docker-compose.yml").exists()
        return
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    db = compose["services"]["db"]
    assert db["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    check_compose_services(root, {**data, "db_pooler": "none"})


@pytest.mark.parametrize("migrations", answer_values("migrations"))
@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_compose_with_pgbouncer(tmp_path: Path, driver: str, migrations: str) -> None:
    data = {"db_driver": driver, "migrations": migrations, "db_pooler": "pgbouncer"}
    check_compose_services(render(tmp_path / "s", **data), data)


def check_compose_services(root: Path, data: dict[str, Any]) -> None:
    """docker-compose.yml is valid against the compose specification's schema; app and
    migrate are built from the service's Dockerfile; migrate runs once before app, past
    PgBouncer when there is one."""
    path = root / "docker-compose.yml"
    schema = ["--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", *schema, str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    services = yaml.safe_load(path.read_text())["services"]
    pooled = data["db_pooler"] == "pgbouncer"
    alembic = data["migrations"] == "alembic"
    expected = {"db", "app"} | ({"pgbouncer"} if pooled else set())
    assert set(services) == expected | ({"migrate"} if alembic else set())
    app = services["app"]
    assert app["build"] == "."
    assert app["ports"] == ["127.0.0.1:8000:8000"]
    host = "pgbouncer:6432" if pooled else "db:5432"
    assert f"@{host}/" in app["environment"]["DATABASE_URL"]
    if alembic:
        migrate = services["migrate"]
        assert migrate["build"] == "."
        assert migrate["command"] == ["alembic", "upgrade", "head"]
        url = migrate["environment"]["DATABASE_MIGRATION_URL" if pooled else "DATABASE_URL"]
        assert "@db:5432/" in url
        assert migrate["depends_on"] == {"db": {"condition": "service_healthy"}}
        assert app["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    else:
        assert app["depends_on"]["db"] == {"condition": "service_healthy"}


def test_ci_workflow_is_a_valid_github_workflow(rendered: tuple[dict[str, Any], Path]) -> None:
    data, root = rendered
    workflow = root / ".github" / "workflows" / "ci.yml"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.github-workflows",
            str(workflow),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    steps = " ".join(
        s.get("run", "") for s in yaml.safe_load(workflow.read_text())["jobs"]["test"]["steps"]
    )
    for command in (
        "tests/test_no_update_conflicts.py",
        "ruff check",
        "ruff format --check",
        "mypy",
        "pytest",
    ):
        assert command in steps
    has_service = "services" in yaml.safe_load(workflow.read_text())["jobs"]["test"]
    assert has_service == (data["db_driver"] != "aiosqlite")


def test_template_paths_have_no_double_quotes() -> None:
    for path in (REPO_ROOT / "template").rglob("*"):
        assert '"' not in path.name, path


def test_rendered_code_is_small_and_untangled(rendered: tuple[dict[str, Any], Path]) -> None:
    """db/ holds no web framework, nothing casts, app.state is not used, modules stay small."""
    _, root = rendered
    package = root / "src" / PKG
    for path in package.rglob("*.py"):
        text = path.read_text()
        name = path.relative_to(root)
        assert len(text.splitlines()) <= 200, f"{name} has more than 200 lines"
        assert "cast(" not in text, name
        assert "app.state" not in text, name
        if "db" in path.relative_to(package).parts:
            assert not re.search(r"^\s*(from|import) (fastapi|starlette)\b", text, re.M), name


def test_jinja_stays_out_of_python_lines() -> None:
    """Conditions in Python templates are blocks on lines of their own, never inside an
    import or an expression."""
    sources = [
        *(REPO_ROOT / "template").rglob("*.py.jinja"),
        *(REPO_ROOT / "includes").rglob("*.jinja"),
    ]
    assert sources
    for path in sources:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if "{%" in line:
                assert stripped.startswith("{%"), f"{path}:{number}"
                assert stripped.endswith("%}"), f"{path}:{number}"
            assert not re.search(r"\{\{[^}]*\b(if|else)\b", line), f"{path}:{number}"


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_pgbouncer_mode_renders_what_a_pooler_needs(tmp_path: Path, driver: str) -> None:
    root = render(tmp_path / "s", db_driver=driver, db_pooler="pgbouncer")
    db = root / "src" / PKG / "db"
    driver_py = (db / "driver.py").read_text()
    if driver == "asyncpg":
        assert '"statement_cache_size": 0' in driver_py
        assert '"prepared_statement_cache_size": 0' in driver_py
    else:
        assert 'args["prepare_threshold"] = None' in driver_py
    assert "SET LOCAL statement_timeout" in (db / "listeners.py").read_text()
    # A startup parameter PgBouncer refuses.
    assert "default_transaction_read_only" not in driver_py
    assert "database_migration_url" in (root / "migrations" / "env.py").read_text()
    env = (root / ".env.example").read_text()
    assert "\nDATABASE_URL=postgresql://postgres@localhost:6432/" in env
    # Migrations bypass the pooler: the setting is on, not a commented-out example.
    assert "\nDATABASE_MIGRATION_URL=postgresql://postgres@localhost:5432/" in env
    for path in root.rglob("*"):
        if path.is_file():
            assert not {"{{", "{%", "{#"} & {m for m in ("{{", "{%", "{#") if m in path.read_text()}
    pgbouncer = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]["pgbouncer"]
    assert pgbouncer["environment"]["POOL_MODE"] == "transaction"
    assert pgbouncer["depends_on"]["db"]["condition"] == "service_healthy"


def test_direct_mode_has_no_pooler_parts(tmp_path: Path) -> None:
    root = render(tmp_path / "s")
    assert "statement_cache_size" not in (root / "src" / PKG / "db" / "driver.py").read_text()
    assert "pgbouncer" not in yaml.safe_load((root / "docker-compose.yml").read_text())["services"]
    env = (root / ".env.example").read_text()
    assert "\nDATABASE_URL=postgresql://postgres@localhost:5432/" in env
    assert "\nDATABASE_MIGRATION_URL=" not in env


DOCS_MAX_LINES = 250
# An inline Markdown link or image: [text](target) or [text](target "title").
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_links(markdown: str) -> list[str]:
    """Targets of the inline links outside code, leaving out URLs and in-page anchors."""
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    targets = MARKDOWN_LINK.findall(prose)
    return [t for t in targets if not t.startswith("#") and not re.match(r"[a-z][\w+.-]*:", t)]


def docs_problems(root: Path) -> list[str]:
    """Pages under docs/ longer than DOCS_MAX_LINES, and relative links in docs/ and README.md
    that point at no file of this rendering."""
    pages = sorted((root / "docs").rglob("*.md"))
    assert pages, "no Markdown pages under docs/"
    problems = []
    for page in pages:
        lines = len(page.read_text().splitlines())
        if lines > DOCS_MAX_LINES:
            problems.append(f"{page.relative_to(root)}: {lines} lines")
    for page in [root / "README.md", *pages]:
        for target in relative_links(page.read_text()):
            if not (page.parent / target.split("#", 1)[0]).exists():
                problems.append(f"{page.relative_to(root)}: link to a missing file: {target}")
    return problems


def test_docs_are_short_pages_with_working_links(rendered: tuple[dict[str, Any], Path]) -> None:
    _, root = rendered
    assert docs_problems(root) == []


@pytest.mark.parametrize(("driver", "migrations"), [("asyncpg", "alembic"), ("psycopg", "none")])
def test_docs_behind_pgbouncer(tmp_path: Path, driver: str, migrations: str) -> None:
    root = render(tmp_path / "s", db_driver=driver, db_pooler="pgbouncer", migrations=migrations)
    assert (root / "docs" / "database" / "pgbouncer.md").is_file()
    assert docs_problems(root) == []
