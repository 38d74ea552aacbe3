"""Debian packages a benchmark needs (its peers, its load tools), installed with apt-get when missing."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable

#: Seconds apt-get waits for the dpkg lock another apt run (unattended-upgrades) holds.
LOCK_TIMEOUT = 300


def install_missing(packages: Iterable[str], install: bool) -> None:
    """Install `packages` (the missing ones, found by the caller); without `install` or root, print the
    command and exit 2, as when apt-get fails."""
    missing = sorted(set(packages))
    if not missing:
        return
    command = f"apt-get update && apt-get install -y --no-install-recommends {' '.join(missing)}"
    apt = ["apt-get", "-o", f"DPkg::Lock::Timeout={LOCK_TIMEOUT}"]  # wait for another apt run, do not fail
    if not install or os.geteuid() != 0:
        print(f"missing packages; run:\n  {command}", file=sys.stderr)
        sys.exit(2)
    print(f"installing: {' '.join(missing)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        [*apt, "update", "-qq"],
        [*apt, "install", "-y", "-qq", "--no-install-recommends", *missing],
    ):
        if subprocess.run(argv, env=env, timeout=600 + LOCK_TIMEOUT, check=False).returncode != 0:
            print(f"apt failed; run:\n  {command}", file=sys.stderr)
            sys.exit(2)
