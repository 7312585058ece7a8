"""What each answer adds or removes, without installing anything."""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from ruamel.yaml import YAML

from extensions.context import DatabaseFacts
from harness.rendering import (
    REPO_ROOT,
    postgres_drivers,
    questions,
    render,
    variant_id,
    variants,
)

VARIANTS = list(variants())
PKG = "my_service"
TEMPLATE = REPO_ROOT / "template"
DRIVER_PACKAGES = {"asyncpg": "asyncpg", "psycopg": "psycopg[binary]", "aiosqlite": "aiosqlite"}


def context(data: dict[str, Any]) -> dict[str, Any]:
    """The context copier renders with: the defaults of copier.yml, `data`, and the facts
    extensions/context.py derives from them."""
    values = {name: q["default"] for name, q in questions().items()}
    values |= {"project_name": "My Service", "package_name": PKG, "db_name": PKG, **data}
    values["_copier_conf"] = {"answers_file": ".copier-answers.yml"}
    DatabaseFacts(jinja2.Environment()).hook(values)
    return values


def answered(data: dict[str, Any]) -> dict[str, Any]:
    """The variant's answers: copier.yml's defaults, then `data`."""
    return {name: q["default"] for name, q in questions().items()} | data


def postgres(a: dict[str, Any]) -> bool:
    return bool(a["db_driver"] != "aiosqlite")


def alembic(a: dict[str, Any]) -> bool:
    return bool(a["migrations"] == "alembic")


def replica(a: dict[str, Any]) -> bool:
    return postgres(a) and bool(a["read_replica"])


# Every file that only some variants have, and the answers that bring it: stated by hand
# from the questions alone, not read from the template's file names or extensions/, so a
# wrong condition in a file name fails test_files_follow_the_answers.
OPTIONAL_FILES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "docker-compose.yml": postgres,
    ".squawk.toml": lambda a: postgres(a) and alembic(a),
    "alembic.ini": alembic,
    "migrations/env.py": alembic,
    "migrations/script.py.mako": alembic,
    "migrations/versions/.gitkeep": alembic,
    "migrations/versions/20260101_0001_create_items.py": lambda a: alembic(a) and a["with_example"],
    "migrations/versions/20261129_0002_items_autoincrement.py": (
        lambda a: alembic(a) and a["with_example"] and not postgres(a)
    ),
    "migrations/versions/20261202_0003_items_version.py": lambda a: (
        alembic(a) and a["with_example"]
    ),
    "migrations/indexes.py": lambda a: alembic(a) and postgres(a),
    "migrations/runtime_role.sql": lambda a: alembic(a) and postgres(a),
    "migrations/replica_role.sql": lambda a: alembic(a) and replica(a),
    "docs/database/deploys.md": lambda a: postgres(a) and alembic(a),
    "docs/database/roles.md": lambda a: postgres(a) and alembic(a),
    "docs/database/migrations.md": alembic,
    "docs/database/prototype.md": lambda a: not alembic(a),
    "docs/database/replica.md": replica,
    "docs/database/sqlite.md": lambda a: not postgres(a),
    "docs/database/pgbouncer.md": lambda a: postgres(a) and a["db_pooler"] == "pgbouncer",
    f"src/{PKG}/api/items.py": lambda a: a["with_example"],
    f"src/{PKG}/models/item.py": lambda a: a["with_example"],
    f"src/{PKG}/schemas/item.py": lambda a: a["with_example"],
    f"src/{PKG}/db/replica.py": replica,
    f"src/{PKG}/db/prototype.py": lambda a: not alembic(a),
    f"src/{PKG}/db/tracing.py": lambda a: a["tracing"],
    f"src/{PKG}/metrics.py": lambda a: a["metrics"],
    "tests/test_statement_timeout.py": postgres,
    "tests/test_revisions_lint.py": lambda a: postgres(a) and alembic(a),
    "tests/test_roles.py": lambda a: postgres(a) and alembic(a),
    "tests/test_metrics.py": lambda a: a["metrics"],
    "tests/test_tracing.py": lambda a: a["tracing"],
    "tests/test_migrations.py": alembic,
    "tests/test_bad_input.py": lambda a: a["with_example"],
    "tests/test_items.py": lambda a: a["with_example"],
}
# Answer sets beyond the matrix of harness.rendering.variants(), for the answers it does not
# meet: the pooler, with and without Alembic, and a replica asked for on SQLite.
EXTRA_ANSWERS: list[dict[str, Any]] = [
    {
        "db_driver": "asyncpg",
        "migrations": "alembic",
        "with_example": True,
        "db_pooler": "pgbouncer",
    },
    {"db_driver": "psycopg", "migrations": "none", "with_example": True, "db_pooler": "pgbouncer"},
    {"db_driver": "aiosqlite", "migrations": "alembic", "with_example": True, "read_replica": True},
]


def tree_names() -> tuple[set[str], set[str]]:
    """The template tree's files as rendered names, read from the text of their paths (every
    `{% if ... %}` and `{% endif %}` dropped, the package named): those in every variant, and
    those that carry a condition."""
    always: set[str] = set()
    optional: set[str] = set()
    for path in TEMPLATE.rglob("*"):
        if path.is_file():
            relative = path.relative_to(TEMPLATE).as_posix()
            name = re.sub(r"\{%.*?%\}", "", relative).removesuffix(".jinja")
            name = name.replace("{{ package_name }}", PKG)
            name = name.replace("{{ _copier_conf.answers_file }}", ".copier-answers.yml")
            (optional if "{%" in relative else always).add(name)
    return always, optional


def test_every_optional_file_is_stated() -> None:
    _, optional = tree_names()
    assert optional == set(OPTIONAL_FILES)


@pytest.fixture(scope="module", params=VARIANTS + EXTRA_ANSWERS, ids=variant_id)
def rendered(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], Path]:
    data: dict[str, Any] = request.param
    return data, render(tmp_path_factory.mktemp(variant_id(data)), **data)


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_files_follow_the_answers(rendered: tuple[dict[str, Any], Path]) -> None:
    data, root = rendered
    answers = answered(data)
    always, _ = tree_names()
    expected = always | {name for name, brought in OPTIONAL_FILES.items() if brought(answers)}
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
    assert answers["_src_path"] == str(REPO_ROOT)
    assert answers["_commit"]
    values = context(data)
    for name, question in questions().items():
        asked = jinja2.Environment().from_string(str(question.get("when", "true")))
        if asked.render(values).strip().lower() == "false":
            assert name not in answers  # a question not asked, as read_replica on SQLite
        elif name in data:
            assert answers[name] == data[name]
        else:
            assert answers[name] == question["default"] or "{{" in str(question["default"])


def test_dependencies_are_exactly_what_the_variant_needs(
    rendered: tuple[dict[str, Any], Path],
) -> None:
    data, root = rendered
    data = answered(data)
    project = tomllib.loads((root / "pyproject.toml").read_text())
    names = {
        re.split(r"[<>=!~ ]", dep, maxsplit=1)[0] for dep in project["project"]["dependencies"]
    }
    expected = {
        "fastapi",
        "uvicorn[standard]",
        "pydantic",
        "pydantic-settings",
        "sqlalchemy[asyncio]",
    }
    expected |= {"python-json-logger"}
    expected.add(DRIVER_PACKAGES[data["db_driver"]])
    if data["migrations"] == "alembic":
        expected.add("alembic")
    if data["metrics"]:
        expected.add("prometheus-client")
    if data["tracing"]:
        expected |= {
            "opentelemetry-sdk",
            "opentelemetry-exporter-otlp-proto-http",
            "opentelemetry-instrumentation",
            "opentelemetry-instrumentation-sqlalchemy",
        }
    assert names == expected
    dev = {re.split(r"[<>=!~ ]", dep, maxsplit=1)[0] for dep in project["dependency-groups"]["dev"]}
    linted = data["db_driver"] != "aiosqlite" and data["migrations"] == "alembic"
    assert ("squawk-cli" in dev) == linted  # the revisions' linter
    assert project["project"]["requires-python"] == ">=3.11"
    assert project["tool"]["mypy"]["strict"] is True
    assert project["tool"]["ruff"]["lint"]["select"]


def test_compose_has_a_healthy_postgres(rendered: tuple[dict[str, Any], Path]) -> None:
    data, root = rendered
    if data["db_driver"] == "aiosqlite":
        assert not (root / "docker-compose.yml").exists()
        return
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    db = compose["services"]["db"]
    assert db["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    check_compose_services(root, answered(data))


@functools.cache
def builtin_validator(name: str) -> Validator:
    """A validator of check-jsonschema's vendored schema `name`, made once: in this process,
    where the check-jsonschema command starts a Python and loads the schema for each file."""
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendored.joinpath(f"{name}.json").read_text())
    cls = validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def schema_errors(name: str, path: Path) -> list[str]:
    """What check-jsonschema --builtin-schema vendor.`name` reports on the YAML at `path`."""
    document = YAML(typ="safe").load(path.read_text())
    errors = builtin_validator(name).iter_errors(document)
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in errors]


def check_compose_services(root: Path, data: dict[str, Any]) -> None:
    """docker-compose.yml is valid against the compose specification's schema; app and
    migrate are built from the service's Dockerfile; migrate runs once before app, past
    PgBouncer when there is one."""
    path = root / "docker-compose.yml"
    assert schema_errors("compose-spec", path) == []
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
    assert schema_errors("github-workflows", workflow) == []
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
    linted = data["db_driver"] != "aiosqlite" and data["migrations"] == "alembic"
    assert ("tests/test_revisions_lint.py" in steps) == linted
    has_service = "services" in yaml.safe_load(workflow.read_text())["jobs"]["test"]
    assert has_service == (data["db_driver"] != "aiosqlite")


def test_template_paths_have_no_double_quotes() -> None:
    for path in (REPO_ROOT / "template").rglob("*"):
        assert '"' not in path.name, path


MAX_MODULE_LINES = 150


def test_rendered_code_is_small_and_untangled(rendered: tuple[dict[str, Any], Path]) -> None:
    """db/ holds no web framework, nothing casts, app.state is not used, modules stay small,
    and nothing happens at import: no module-level application."""
    _, root = rendered
    package = root / "src" / PKG
    for path in package.rglob("*.py"):
        text = path.read_text()
        name = path.relative_to(root)
        assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{name} has more lines than allowed"
        assert "cast(" not in text, name
        assert "app.state" not in text, name
        assert not re.search(r"^app = ", text, re.M), name
        if "db" in path.relative_to(package).parts:
            assert not re.search(r"^\s*(from|import) (fastapi|starlette)\b", text, re.M), name


def lines(paths: list[Path]) -> int:
    return sum(len(path.read_text().splitlines()) for path in paths)


def test_the_default_service_stays_within_its_budget(tmp_path: Path) -> None:
    """What the owner of a default service maintains: src/ at most 1,370 lines (1,799 before
    0.3.0, 1,400 in 0.3.0), db/ 550."""
    package = render(tmp_path / "s") / "src" / PKG
    assert lines(list(package.rglob("*.py"))) <= 1370
    assert lines(list((package / "db").rglob("*.py"))) <= 550


# Words that name a driver or database; a variant's tree speaks only of its own.
DRIVER_WORDS = {
    "asyncpg": r"asyncpg",
    "psycopg": r"psycopg",
    "aiosqlite": r"sqlite",
    "postgres": r"postgres|pgbouncer|pg_\w+",
}


def foreign_words(data: dict[str, Any]) -> re.Pattern[str]:
    """The words a variant must not use: the other drivers and the other database."""
    own = {data["db_driver"], "postgres" if data["db_driver"] != "aiosqlite" else "aiosqlite"}
    return re.compile("|".join(w for k, w in DRIVER_WORDS.items() if k not in own), re.I)


def without_updating_section(readme: str) -> str:
    """The README without its section on updating from the template (which names the
    answers one can switch to)."""
    return re.sub(r"^## Updating from the template\n.*?(?=^## |\Z)", "", readme, flags=re.M | re.S)


def test_no_other_driver_or_database_is_mentioned(rendered: tuple[dict[str, Any], Path]) -> None:
    data, root = rendered
    foreign = foreign_words(data)
    found = []
    for name in sorted(files(root)):
        text = (root / name).read_text()
        if name == "README.md":
            text = without_updating_section(text)
        found += [f"{name}: {m.group(0)}" for m in foreign.finditer(text)]
    assert found == []


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


@pytest.mark.parametrize("driver", postgres_drivers())
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
