"""`copier update` brings template changes into existing services without losing their work.

Every test builds its own template repository with its own tags (1.0.0, 2.0.0); none uses
this repository's tags.
"""

from __future__ import annotations

import difflib
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from copier.errors import UserMessageError

from harness.rendering import clean_env, render, variant_id
from harness.updates import (
    TemplateRepo,
    commit_all,
    copy_service,
    git,
    previous_release,
    releases,
    tree,
    unmerged,
    update_service,
)

PKG = "my_service"
BASE_PY = f"src/{PKG}/db/base.py"
OWN_FILES = {
    f"src/{PKG}/models/order.py": '"""Orders: the owner\'s own model."""\n',
    "migrations/versions/20260301_0002_add_orders.py": '"""Add orders: the owner\'s revision."""\n',
    f"src/{PKG}/api/orders.py": '"""Orders API: the owner\'s router."""\n',
}
OWNER_ENV = "DATABASE_URL=postgresql://app:local-only@db.internal:5432/app\n"
README_NOTES = "\n## Team notes\n\nOn call: the database team.\n"


def answers(service: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((service / ".copier-answers.yml").read_text())
    return data


def guard(service: Path) -> subprocess.CompletedProcess[str]:
    """Run the service's conflict guard as its CI does: a plain script, standard library only."""
    return subprocess.run(
        [sys.executable, "tests/test_no_update_conflicts.py"],
        cwd=service,
        env=clean_env(),
        capture_output=True,
        text=True,
    )


@dataclass
class Scenario:
    template: TemplateRepo
    service: Path
    fresh_v2: Path
    before: dict[str, bytes]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    """A service rendered from 1.0.0, worked on by its owner, then updated to 2.0.0."""
    root = tmp_path_factory.mktemp("update")
    template = TemplateRepo(root / "template")
    template.load_working_tree()
    template.release("1.0.0")
    service = copy_service(template.path, root / "service", "1.0.0")

    # The owner's work: an edit the template will not touch, an edit it will clash with,
    # new files of their own, and a local .env (git-ignored, so not committed).
    readme = service / "README.md"
    readme.write_text(readme.read_text() + README_NOTES)
    base = service / BASE_PY
    base.write_text(base.read_text().replace('"pk_%(table_name)s"', '"pk_%(table_name)s_owner"'))
    for name, text in OWN_FILES.items():
        (service / name).write_text(text)
    (service / ".env").write_text(OWNER_ENV)
    commit_all(service, "the owner's work")
    before = tree(service)

    # Template 2.0.0: a change to a file the owner never touched, a change to the line the
    # owner changed, and a change to .env.example.
    template.append("template/docs/database/README.md.jinja", "\n## Backups\n\nTake them.\n")
    template.edit(
        "template/src/{{ package_name }}/db/base.py",
        '"pk_%(table_name)s"',
        '"pkey_%(table_name)s"',
    )
    template.append("template/.env.example.jinja", "# Added in 2.0.0.\n")
    template.release("2.0.0")

    update_service(service)
    fresh_v2 = render(root / "fresh", src=template.path, vcs_ref="2.0.0")
    return Scenario(template, service, fresh_v2, before)


def test_update_records_the_new_version(scenario: Scenario) -> None:
    recorded = answers(scenario.service)
    assert recorded["_commit"] == "2.0.0"
    assert recorded["_src_path"] == str(scenario.template.path)


def test_change_to_an_untouched_file_arrives_unchanged(scenario: Scenario) -> None:
    doc = "docs/database/README.md"
    assert (scenario.service / doc).read_bytes() == (scenario.fresh_v2 / doc).read_bytes()
    assert "## Backups" in (scenario.service / doc).read_text()


def test_owner_edit_in_a_file_the_template_did_not_change_survives(scenario: Scenario) -> None:
    assert (scenario.service / "README.md").read_text().endswith(README_NOTES)


def test_clashing_edits_are_a_conflict_that_the_guard_reports(scenario: Scenario) -> None:
    text = (scenario.service / BASE_PY).read_text()
    assert "<<<<<<< before updating" in text
    assert ">>>>>>> after updating" in text
    assert "pk_%(table_name)s_owner" in text
    assert "pkey_%(table_name)s" in text
    assert unmerged(scenario.service) == [BASE_PY]
    result = guard(scenario.service)
    assert result.returncode == 1, result.stdout
    assert BASE_PY in result.stdout


def test_owner_files_survive_untouched(scenario: Scenario) -> None:
    for name, text in OWN_FILES.items():
        assert (scenario.service / name).read_text() == text


def test_env_is_never_overwritten(scenario: Scenario) -> None:
    assert (scenario.service / ".env").read_text() == OWNER_ENV
    assert (scenario.service / ".env.example").read_text().endswith("# Added in 2.0.0.\n")


def test_everything_else_matches_a_fresh_copy(scenario: Scenario) -> None:
    updated, fresh = tree(scenario.service), tree(scenario.fresh_v2)
    owner = {*OWN_FILES, ".env", "README.md", BASE_PY}
    assert set(updated) - owner == set(fresh) - owner
    for name in set(fresh) - owner:
        assert updated[name] == fresh[name], name


def test_rej_conflicts_are_reported_by_the_guard(tmp_path: Path, scenario: Scenario) -> None:
    service = copy_service(scenario.template.path, tmp_path / "service", "1.0.0")
    base = service / BASE_PY
    base.write_text(base.read_text().replace('"pk_%(table_name)s"', '"pk_%(table_name)s_x"'))
    commit_all(service, "owner edit")
    update_service(service, conflict="rej")
    assert (service / f"{BASE_PY}.rej").exists()
    result = guard(service)
    assert result.returncode == 1
    assert f"{BASE_PY}.rej" in result.stdout


def test_guard_passes_on_a_clean_service(scenario: Scenario) -> None:
    result = guard(scenario.fresh_v2)
    assert result.returncode == 0, result.stdout


def test_updating_an_up_to_date_service_changes_nothing(tmp_path: Path, scenario: Scenario) -> None:
    service = copy_service(scenario.template.path, tmp_path / "service", "2.0.0")
    before = tree(service)
    update_service(service)
    assert git(service, "status", "--porcelain") == ""
    assert tree(service) == before


def test_update_refuses_a_dirty_service(tmp_path: Path, scenario: Scenario) -> None:
    service = copy_service(scenario.template.path, tmp_path / "service", "1.0.0")
    (service / "README.md").write_text("uncommitted\n")
    with pytest.raises(UserMessageError, match=r"[Dd]irty"):
        update_service(service)
    assert (service / "README.md").read_text() == "uncommitted\n"
    assert answers(service)["_commit"] == "1.0.0"


# --- _migrations: a renamed question and a moved file -------------------------------------

MIGRATE = '["{{ _copier_python }}", "{{ _copier_conf.src_path }}/scripts/migrate.py"'
MIGRATIONS = f"""_migrations:
  - version: "2.0.0"
    when: "{{{{ _stage == 'before' }}}}"
    command: {MIGRATE}, "rename-answer", "db_echo", "db_log_sql"]
  - version: "2.0.0"
    command: {MIGRATE}, "move-file", "docs/database/naming.md", "docs/guide/naming.md"]
"""
RUNBOOK = "\n## Our runbook\n\nPage the on-call DBA.\n"


def rename_question(template: TemplateRepo, old: str, new: str) -> None:
    """Rename a question in copier.yml and every Jinja reference to it."""
    copier_yml = template.path / "copier.yml"
    copier_yml.write_text(re.sub(rf"\b{old}\b", new, copier_yml.read_text()))
    reference = re.compile(rf"(\{{\{{-?\s*|\{{%-?\s*(?:el)?if\s+(?:not\s+)?){old}\b")
    for path in (template.path / "template").rglob("*.jinja"):
        text = path.read_text()
        if reference.search(text):
            path.write_text(reference.sub(rf"\g<1>{new}", text))


@pytest.mark.parametrize("with_migrations", [True, False], ids=["migrations", "no-migrations"])
def test_migrations_keep_a_renamed_answer_and_a_moved_files_edits(
    tmp_path: Path, with_migrations: bool
) -> None:
    template = TemplateRepo(tmp_path / "template")
    template.load_working_tree()
    template.release("1.0.0")
    service = copy_service(template.path, tmp_path / "service", "1.0.0", db_echo=True)
    doc = service / "docs" / "database" / "naming.md"
    doc.write_text(doc.read_text() + RUNBOOK)
    commit_all(service, "our runbook")

    rename_question(template, "db_echo", "db_log_sql")
    moved = template.path / "template" / "docs" / "guide" / "naming.md.jinja"
    moved.parent.mkdir()
    (template.path / "template" / "docs" / "database" / "naming.md.jinja").rename(moved)
    if with_migrations:
        copier_yml = template.path / "copier.yml"
        text = re.sub(
            r"^_migrations:\n(?:[ #].*\n)*", MIGRATIONS, copier_yml.read_text(), flags=re.M
        )
        copier_yml.write_text(text)
    template.release("2.0.0")
    update_service(service)

    recorded = answers(service)
    assert "db_echo" not in recorded
    assert not doc.exists()
    new_doc = (service / "docs" / "guide" / "naming.md").read_text()
    config = (service / "src" / PKG / "config.py").read_text()
    if with_migrations:
        assert recorded["db_log_sql"] is True
        assert "    db_echo: bool = True\n" in config
        assert new_doc.endswith(RUNBOOK)
    else:
        # What the migrations prevent: the answer falls back to its default, the edits are gone.
        assert recorded["db_log_sql"] is False
        assert RUNBOOK not in new_doc
    assert unmerged(service) == []


# --- Switching answers, and the update from the previous release (slow) -------------------

OWNER_MODULE = f"src/{PKG}/clock.py"
OWNER_TEST = "tests/test_clock.py"
OWNER_CODE = {
    OWNER_MODULE: '''"""The owner's own code."""

from datetime import UTC, datetime


def now() -> datetime:
    return datetime.now(UTC)
''',
    OWNER_TEST: f"""from {PKG}.clock import now


def test_now_is_aware() -> None:
    assert now().tzinfo is not None
""",
}

SWITCHES = [
    ({"db_driver": "asyncpg"}, {"db_driver": "psycopg"}),
    ({"db_driver": "psycopg"}, {"db_driver": "aiosqlite"}),
    ({"migrations": "none"}, {"migrations": "alembic"}),
    ({"with_example": True}, {"with_example": False}),
    ({"db_pooler": "none"}, {"db_pooler": "pgbouncer"}),
    ({"read_replica": False}, {"read_replica": True}),
    ({"tracing": False}, {"tracing": True}),
]


def run_own_tests(service: Path, pg_admin_url: str, *paths: str) -> str:
    """`uv sync`, then the service's tests (those at `paths`, or all)."""
    env = clean_env(TEST_DATABASE_URL=pg_admin_url)
    for cmd in (
        ["uv", "sync", "--quiet"],
        ["uv", "run", "--no-sync", "pytest", "-q", "-p", "no:cacheprovider", *paths],
    ):
        result = subprocess.run(cmd, cwd=service, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary), summary
    assert "skipped" not in summary, summary
    return summary


@pytest.fixture(scope="module")
def current_template(tmp_path_factory: pytest.TempPathFactory) -> TemplateRepo:
    template = TemplateRepo(tmp_path_factory.mktemp("current") / "template")
    template.load_working_tree()
    template.release("1.0.0")
    return template


@pytest.mark.slow
@pytest.mark.parametrize(
    ("old", "new"), SWITCHES, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items())
)
def test_switching_answers_equals_a_fresh_copy(
    tmp_path: Path,
    current_template: TemplateRepo,
    pg_admin_url: str,
    old: dict[str, Any],
    new: dict[str, Any],
) -> None:
    service = copy_service(current_template.path, tmp_path / "service", "1.0.0", **old)
    for name, text in OWNER_CODE.items():
        (service / name).write_text(text)
    commit_all(service, "the owner's code")

    update_service(service, data=new)
    fresh = render(tmp_path / "fresh", src=current_template.path, vcs_ref="1.0.0", **new)
    assert unmerged(service) == []
    updated = tree(service)
    assert {k: v for k, v in updated.items() if k not in OWNER_CODE} == tree(fresh)
    for name, text in OWNER_CODE.items():
        assert updated[name] == text.encode()
    # The rest is a fresh copy's, whose tests the variants run (every answer meets every
    # other's); here the environment syncs and the owner's test passes in the new package.
    run_own_tests(service, pg_admin_url, OWNER_TEST)


# Earlier releases a service may be updated from: the previous one (against three variants)
# and the first (the default answers), both found in CHANGELOG.md.
PREVIOUS, FIRST = previous_release(), releases()[-1]
FROM_RELEASES = [
    (PREVIOUS, {"db_driver": "asyncpg", "migrations": "alembic", "with_example": True}),
    (PREVIOUS, {"db_driver": "psycopg", "migrations": "none", "with_example": False}),
    (PREVIOUS, {"db_driver": "aiosqlite", "migrations": "alembic", "with_example": True}),
    (FIRST, {"db_driver": "asyncpg", "migrations": "alembic", "with_example": True}),
]


@dataclass
class Releases:
    """An earlier release, tagged with its own version, and this working tree, tagged as the
    next minor version of the newest release: the `_migrations` between them run."""

    template: TemplateRepo
    old: str
    new: str


def next_minor(version: str) -> str:
    major, minor, _ = (int(part) for part in version.split("."))
    return f"{major}.{minor + 1}.0"


@pytest.fixture(scope="module")
def release_repo(tmp_path_factory: pytest.TempPathFactory) -> Callable[[tuple[str, str]], Releases]:
    """A template repository holding a given earlier release and this working tree, built once
    per release for the module."""
    built: dict[str, Releases] = {}

    def get(release: tuple[str, str]) -> Releases:
        version, commit = release
        if version not in built:
            template = TemplateRepo(tmp_path_factory.mktemp(f"release-{version}") / "template")
            template.load_commit(commit)
            template.release(version)
            template.load_working_tree()
            newest = next_minor(releases()[0][0])
            template.release(newest)
            built[version] = Releases(template, version, newest)
        return built[version]

    return get


def recorded_answers(service: Path) -> dict[str, Any]:
    """The service's answers, without copier's own entries."""
    return {k: v for k, v in answers(service).items() if not k.startswith("_")}


def release_id(value: object) -> str:
    """A test id: the release's version, or the variant's."""
    if isinstance(value, tuple):
        return str(value[0])
    assert isinstance(value, dict)
    return variant_id(value)


@pytest.mark.slow
@pytest.mark.parametrize(("release", "data"), FROM_RELEASES, ids=release_id)
def test_update_from_an_earlier_release(
    tmp_path: Path,
    release_repo: Callable[[tuple[str, str]], Releases],
    pg_admin_url: str,
    release: tuple[str, str],
    data: dict[str, Any],
) -> None:
    releases = release_repo(release)
    service = copy_service(releases.template.path, tmp_path / "service", releases.old, **data)
    update_service(service)
    assert answers(service)["_commit"] == releases.new
    assert unmerged(service) == []
    # A fresh copy with the service's answers: answers keep the defaults they were given.
    fresh = render(
        tmp_path / "fresh",
        src=releases.template.path,
        vcs_ref=releases.new,
        **recorded_answers(service),
    )
    assert tree(service) == tree(fresh)
    made_before_bigint_ids = tuple(int(part) for part in release[0].split(".")) < (0, 4, 0)
    if data["with_example"] and data["db_driver"] != "aiosqlite" and made_before_bigint_ids:
        # The table the service's databases hold stays as it is: its ids stay integer.
        assert recorded_answers(service)["id_type"] == "integer"
        (first,) = (service / "migrations" / "versions").glob("*_0001_create_items.py")
        assert "sa.Integer()" in first.read_text()
        assert "BigInteger" not in first.read_text()
    run_own_tests(service, pg_admin_url)


MAIN_PY = f"src/{PKG}/main.py"
SESSION_PY = f"src/{PKG}/db/session.py"
OWNER_ROUTER = f"src/{PKG}/api/orders.py"
OWNER_ROUTER_CODE = '''"""Orders: the owner's router, written against an earlier release."""

from fastapi import APIRouter

from ..db import SessionDep
from ..schemas import ItemRead

router = APIRouter(prefix="/orders")


@router.get("")
async def list_orders(session: SessionDep) -> list[ItemRead]:
    return []
'''
# Lines of the owner's own in files the template rewrites.
OWNER_MAIN_LINE = "    app.include_router(orders.router)  # the owner's router\n"
OWNER_SESSION_LINE = '        session.info["tenant"] = "acme"  # the owner\'s edit\n'


# Releases from before 0.3.0, whose services import the names that 0.3.0 moved.
BEFORE_THE_MOVES = [r for r in releases() if tuple(map(int, r[0].split("."))) < (0, 3, 0)]


@pytest.mark.parametrize("release", BEFORE_THE_MOVES, ids=lambda r: r[0])
def test_update_from_an_earlier_release_with_owner_edits_reports_conflicts(
    tmp_path: Path,
    release_repo: Callable[[tuple[str, str]], Releases],
    release: tuple[str, str],
) -> None:
    """The owner edited main.py and db/session.py, which this release rewrites, and has a
    router importing SessionDep from db/ and ItemRead from schemas: the update must keep every
    owner line, leave conflicts the guard reports where the two changes meet, and move the
    router's imports."""
    releases = release_repo(release)
    service = copy_service(releases.template.path, tmp_path / "service", releases.old)
    main = service / MAIN_PY
    text = main.read_text()
    text = text.replace(
        "from .api import health, items\n", "from .api import health, items, orders\n"
    )
    text = text.replace(
        "    app.include_router(items.router)\n",
        "    app.include_router(items.router)\n" + OWNER_MAIN_LINE,
    )
    main.write_text(text)
    session = service / SESSION_PY
    text = session.read_text()
    anchor = "    async with session_scope(sessionmaker) as session:\n        yield session\n"
    assert anchor in text, "the earlier release's get_db"
    session.write_text(
        text.replace(
            anchor, anchor.replace("        yield", OWNER_SESSION_LINE + "        yield"), 1
        )
    )
    (service / OWNER_ROUTER).write_text(OWNER_ROUTER_CODE)
    commit_all(service, "the owner's edits")

    update_service(service)

    assert answers(service)["_commit"] == releases.new
    assert set(unmerged(service)) == {MAIN_PY, SESSION_PY}
    for name, line in ((MAIN_PY, OWNER_MAIN_LINE), (SESSION_PY, OWNER_SESSION_LINE)):
        text = (service / name).read_text()
        assert line in text, f"the owner's line in {name} was lost"
        assert "<<<<<<< before updating" in text
    result = guard(service)
    assert result.returncode == 1, result.stdout
    assert MAIN_PY in result.stdout
    assert SESSION_PY in result.stdout
    # The _migrations steps moved the router's imports, sorted as ruff sorts them; the rest
    # of the file is as it was.
    assert (service / OWNER_ROUTER).read_text() == OWNER_ROUTER_CODE.replace(
        "from ..db import SessionDep\nfrom ..schemas import ItemRead\n",
        "from ..schemas.item import ItemRead\nfrom .deps import SessionDep\n",
    )
    ruff = [sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "I", OWNER_ROUTER]
    result = subprocess.run(ruff, cwd=service, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


OWNER_MARK = "  # the owner's edit"


def first_changed_line(old: str, new: str) -> int | None:
    """The index of the first line of `old` that the template changed or removed; None when
    it only added lines (where git places an insertion beside an edit is its diff's choice,
    so an owner's edit there may merge cleanly)."""
    lines = old.splitlines()
    for tag, i1, _, _, _ in difflib.SequenceMatcher(None, lines, new.splitlines()).get_opcodes():
        if tag in ("replace", "delete"):
            return i1
    return None


def test_update_from_the_previous_release_with_owner_edits(
    tmp_path: Path, release_repo: Callable[[tuple[str, str]], Releases]
) -> None:
    """The owner edited each Python line this working tree changes or removes first in a
    file since the previous release; and added a line to a file it did not change. The
    update keeps both, and each clash is a conflict the guard reports."""
    releases = release_repo(PREVIOUS)
    service = copy_service(releases.template.path, tmp_path / "service", releases.old)
    # What the update makes of the service without the owner's edits (its `_migrations` may
    # answer new questions, so a fresh copy with the old answers could differ).
    pristine = copy_service(releases.template.path, tmp_path / "pristine", releases.old)
    update_service(pristine)
    old, new = tree(service), tree(pristine)
    python = sorted(name for name in old.keys() & new.keys() if name.endswith(".py"))
    clashes = {
        name: index
        for name in python
        if (index := first_changed_line(old[name].decode(), new[name].decode())) is not None
    }
    changed = sorted(clashes)
    assert changed, f"no Python line changed since {releases.old}: this test would check nothing"
    unchanged = next(name for name in python if old[name] == new[name])
    edited: dict[str, str] = {}
    for name, index in clashes.items():
        lines = old[name].decode().splitlines(keepends=True)
        lines[index] = lines[index].rstrip("\n") + OWNER_MARK + "\n"
        edited[name] = lines[index]
        (service / name).write_text("".join(lines))
    with (service / unchanged).open("a") as file:
        file.write(f"#{OWNER_MARK}\n")
    commit_all(service, "the owner's edits")

    update_service(service)

    assert answers(service)["_commit"] == releases.new
    assert (service / unchanged).read_text() == old[unchanged].decode() + f"#{OWNER_MARK}\n"
    assert unmerged(service) == changed
    for name, line in edited.items():
        text = (service / name).read_text()
        assert line in text, f"the owner's line in {name} was lost"
        assert "<<<<<<< before updating" in text
    result = guard(service)
    assert result.returncode == 1, result.stdout
    assert all(name in result.stdout for name in changed)
