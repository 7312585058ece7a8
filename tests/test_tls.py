"""TLS between the rendered service and PostgreSQL, against servers this module configures:
a throwaway cluster with ssl=on and a certificate signed by a CA made here, and one with
ssl=off. For each PostgreSQL driver a rendered service's own Database
(tests/programs/tls_probe.py) connects with its DB_SSL_MODE and DB_SSL_CA_FILE settings:

- `require` against the TLS server: the connection is encrypted (pg_stat_ssl); `disable`
  against it is not (the control: the check can fail);
- `require` against the server without TLS: the health check's ping fails with the driver's
  own error, never a silent fall back to plain text;
- `verify-full` with the CA's file: encrypted, for 127.0.0.1 and for localhost; with the
  file of another CA: the ping fails with the driver's certificate error.

The module's tests share the certificates, both servers and one probe run per driver
(module-scoped fixtures, one pytest-xdist worker).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from harness.pgserver import TlsFiles, make_tls_files
from harness.rendering import clean_env, postgres_drivers
from harness.services import (
    UV_RUN,
    copy_program,
    render_synced,
    run,
    throwaway_cluster,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tls")]

SQLALCHEMY_ERROR = "sqlalchemy.exc.OperationalError"
# What each driver raises under SQLAlchemy's OperationalError (the last exception of the
# __cause__ chain, and a part of the message): a server without TLS asked for it, and a
# certificate that does not chain to the CA file.
DRIVER_ERRORS: dict[str, dict[str, tuple[str, str]]] = {
    "asyncpg": {
        "no TLS": ("builtins.ConnectionError", "rejected SSL upgrade"),
        "another CA": ("ssl.SSLCertVerificationError", "certificate verify failed"),
    },
    "psycopg": {
        "no TLS": ("psycopg.OperationalError", "server does not support SSL, but SSL was required"),
        "another CA": ("psycopg.OperationalError", "certificate verify failed"),
    },
}


@dataclass
class Servers:
    with_tls: str  # URL
    without_tls: str  # URL
    files: TlsFiles  # the TLS server's CA and certificate
    other: TlsFiles  # another CA, which did not sign the server's certificate


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    certificates = tmp_path_factory.mktemp("tls")
    files = make_tls_files(certificates / "server")
    other = make_tls_files(certificates / "other", "another CA")
    with throwaway_cluster(tls=files) as with_tls, throwaway_cluster() as without_tls:
        yield Servers(with_tls.url, without_tls.url, files, other)


def cases(servers: Servers) -> dict[str, dict[str, str]]:
    """The probe's cases: name -> the service's settings."""
    verify = {"db_ssl_mode": "verify-full", "db_ssl_ca_file": str(servers.files.ca)}
    return {
        "require, TLS server": {"database_url": servers.with_tls, "db_ssl_mode": "require"},
        "disable, TLS server": {"database_url": servers.with_tls, "db_ssl_mode": "disable"},
        "require, no TLS": {"database_url": servers.without_tls, "db_ssl_mode": "require"},
        "verify-full, the CA": {"database_url": servers.with_tls, **verify},
        "verify-full, the CA, localhost": {
            "database_url": servers.with_tls.replace("@127.0.0.1:", "@localhost:"),
            **verify,
        },
        "verify-full, another CA": {
            "database_url": servers.with_tls,
            "db_ssl_mode": "verify-full",
            "db_ssl_ca_file": str(servers.other.ca),
        },
    }


@dataclass
class Outcomes:
    """What the probe found for each case, in a service rendered with `driver`."""

    driver: str
    by_case: dict[str, dict[str, Any]]

    def failed_with(self, case: str, error: str) -> None:
        """The case's ping failed with SQLAlchemy's OperationalError, raised from the
        driver's own error `error` (DRIVER_ERRORS)."""
        outcome = self.by_case[case]
        cause, message = DRIVER_ERRORS[self.driver][error]
        assert "errors" in outcome, f"{case}: connected: {outcome}"
        assert outcome["errors"][0] == SQLALCHEMY_ERROR, (case, outcome)
        assert outcome["errors"][-1] == cause, (case, outcome)
        assert message in outcome["message"], (case, outcome)


@pytest.fixture(scope="module", params=postgres_drivers())
def outcomes(
    request: pytest.FixtureRequest, servers: Servers, tmp_path_factory: pytest.TempPathFactory
) -> Outcomes:
    driver: str = request.param
    root = render_synced(tmp_path_factory.mktemp(f"tls-{driver}") / "service", db_driver=driver)
    probe = copy_program("tls_probe.py", root / "tls_probe.py")
    output = run([*UV_RUN, "python", str(probe), json.dumps(cases(servers))], root, clean_env())
    printed = output[output.index("RESULT ") + len("RESULT ") :].splitlines()[0]
    found: dict[str, dict[str, Any]] = json.loads(printed)
    assert set(found) == set(cases(servers)), found
    return Outcomes(driver, found)


def test_the_servers_are_what_the_cases_say(servers: Servers) -> None:
    """The TLS server presents the certificate the CA signed; the other has ssl off."""
    ca = str(servers.files.ca)
    with psycopg.connect(servers.with_tls, sslmode="verify-full", sslrootcert=ca) as conn:
        assert conn.execute("SHOW ssl").fetchone() == ("on",)
    with psycopg.connect(servers.without_tls, sslmode="disable") as conn:
        assert conn.execute("SHOW ssl").fetchone() == ("off",)


def test_require_encrypts_against_a_tls_server(outcomes: Outcomes) -> None:
    outcome = outcomes.by_case["require, TLS server"]
    assert outcome.get("ssl") is True, outcome
    assert str(outcome["version"]).startswith("TLSv1."), outcome


def test_disable_against_a_tls_server_is_plain_text(outcomes: Outcomes) -> None:
    outcome = outcomes.by_case["disable, TLS server"]
    assert outcome == {"ssl": False, "version": None}, outcome


def test_require_fails_against_a_server_without_tls(outcomes: Outcomes) -> None:
    # Never a silent fall back to plain text.
    outcomes.failed_with("require, no TLS", "no TLS")


def test_verify_full_with_the_ca_file_encrypts(outcomes: Outcomes) -> None:
    for case in ("verify-full, the CA", "verify-full, the CA, localhost"):
        outcome = outcomes.by_case[case]
        assert outcome.get("ssl") is True, (case, outcome)


def test_verify_full_with_another_ca_fails(outcomes: Outcomes) -> None:
    outcomes.failed_with("verify-full, another CA", "another CA")
