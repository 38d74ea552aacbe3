"""scripts/setup finds a Python >= 3.12 (not only 3.12), and says exactly how to get one when there is none.

The script runs from a copy of the repository's skeleton with a PATH of chosen tools, so which Pythons it
can see is up to the test; a found Python is shown by the `-m venv` it is asked to run (stopped there).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("bash", "dirname", "dpkg-query", "grep", "id", "find", "sort", "cut", "sha256sum", "rm", "touch", "cat")
REAL_PYTHON = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"


def _fake_python(path: Path, *, venv: bool = True) -> Path:
    """A Python that is the real one, except that `-m venv` only reports itself (and ensurepip may be absent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    no_ensurepip = "" if venv else "*ensurepip*) exit 1 ;;"
    path.write_text(
        "#!/bin/bash\n"
        f'case "$*" in {no_ensurepip} "-m venv .venv") echo "venv by $0" >&2; exit 3 ;; esac\n'
        f'exec {REAL_PYTHON} "$@"\n'
    )
    path.chmod(0o755)
    return path


def run_setup(tmp_path: Path, pythons: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    tree = tmp_path / "repo"
    (tree / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup", tree / "scripts" / "setup")
    shutil.copy(REPO / "pyproject.toml", tree / "pyproject.toml")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    for name, target in pythons.items():
        (bin_dir / name).symlink_to(target)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path / "home"), "LANG": "C.UTF-8"}
    return subprocess.run(
        [str(bin_dir / "bash"), str(tree / "scripts" / "setup")],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _needs_debian_packages() -> None:
    # Without them the script would install them first (apt-get); that is not what this tests.
    for package in ("nftables", "iproute2", "procps", "openssl", "ca-certificates"):
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
        if "install ok installed" not in status.stdout:
            pytest.skip(f"{package} is not installed")
    if not REAL_PYTHON.exists():
        pytest.skip(f"{REAL_PYTHON} missing")


def test_no_python_new_enough_says_exactly_how_to_get_one(tmp_path: Path) -> None:
    old = shutil.which("python3.11") or "/usr/bin/python3.11"
    if not Path(old).exists():
        pytest.skip("no Python 3.11 to stand for a too-old python3")
    result = run_setup(tmp_path, {"python3": Path(old)})
    assert result.returncode == 1
    assert "no Python 3.12 or newer found" in result.stderr
    assert "sudo apt-get install python3 python3-venv" in result.stderr
    assert "pyenv install 3.12" in result.stderr


def test_a_newer_python_on_path_is_accepted(tmp_path: Path) -> None:
    fake = _fake_python(tmp_path / "pythons" / "python3.13")
    result = run_setup(tmp_path, {"python3.13": fake})
    assert f"setup: creating .venv with {tmp_path / 'bin' / 'python3.13'}" in result.stdout, result.stderr
    assert "venv by" in result.stderr


def test_pyenv_versions_are_found_and_3_12_is_preferred(tmp_path: Path) -> None:
    versions = tmp_path / "home" / ".pyenv" / "versions"
    for version in ("3.11.7", "3.13.0", "3.12.9"):
        _fake_python(versions / version / "bin" / "python3")
    (versions / "3.11.7" / "bin" / "python3").write_text("#!/bin/bash\nexit 1\n")  # too old: refuses the check
    result = run_setup(tmp_path, {})
    assert f"setup: creating .venv with {versions / '3.12.9' / 'bin' / 'python3'}" in result.stdout, result.stderr


def test_a_python_without_its_venv_module_gets_the_package_named(tmp_path: Path) -> None:
    fake = _fake_python(tmp_path / "pythons" / "python3.12", venv=False)
    result = run_setup(tmp_path, {"python3.12": fake})
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert result.returncode == 1
    assert "cannot create virtual environments" in result.stderr
    assert f"sudo apt-get install python{version}-venv" in result.stderr


def test_every_apt_get_waits_for_the_dpkg_lock() -> None:
    """A fresh machine runs unattended-upgrades at boot: apt-get must wait for its lock, not fail."""
    setup = (REPO / "scripts" / "setup").read_text()
    assert "apt=(apt-get -o DPkg::Lock::Timeout=300)" in setup
    calls = [line for line in setup.splitlines() if "apt-get" in line and not line.lstrip().startswith(("#", "echo"))]
    assert calls == ["  apt=(apt-get -o DPkg::Lock::Timeout=300)"], calls
    bench = (REPO / "bench" / "aptget.py").read_text()
    assert 'apt = ["apt-get", "-o", f"DPkg::Lock::Timeout={LOCK_TIMEOUT}"]' in bench
    assert '["apt-get", "update"' not in bench and '["apt-get", "install"' not in bench
