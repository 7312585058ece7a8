"""Programs from the operating system that the suite runs: found where Debian puts them, and
installed from Debian's packages when missing and the suite runs as root.

Several pytest-xdist workers may ask for the same program at once: installs are serialised
by a lock file, and a worker that waited finds the program in place.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

# Where Debian installs administrative programs; not on a non-login root PATH everywhere.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
LOCK_PATH = Path("/tmp/template-suite-apt.lock")
APT_TIMEOUT_SECONDS = 900


class MissingProgramError(RuntimeError):
    pass


def find_program(name: str) -> str | None:
    """`name` on PATH or in the sbin directories, or None."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN_DIRS))


def _apt_install(packages: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    update = subprocess.run(
        ["apt-get", "update", "-qq"],
        capture_output=True,
        text=True,
        env=env,
        timeout=APT_TIMEOUT_SECONDS,
    )
    if update.returncode != 0:
        return update
    return subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
        capture_output=True,
        text=True,
        env=env,
        timeout=APT_TIMEOUT_SECONDS,
    )


def require_program(name: str, *packages: str) -> str:
    """The path of `name`; installs `packages` (default: a package called `name`) from
    Debian's archive first when it is missing and the suite runs as root. Raises
    MissingProgramError with the command to run otherwise."""
    found = find_program(name)
    if found:
        return found
    packages = packages or (name,)
    how = f"{name} is not installed (Debian: apt-get install {' '.join(packages)})"
    if os.geteuid() != 0 or find_program("apt-get") is None:
        raise MissingProgramError(how + "; the suite installs it itself only when run as root.")
    with LOCK_PATH.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = find_program(name)
        if found:
            return found
        result = _apt_install(packages)
        found = find_program(name)
    if result.returncode != 0 or found is None:
        raise MissingProgramError(
            f"{how}; installing it failed:\n{(result.stdout + result.stderr)[-3000:]}"
        )
    return found
