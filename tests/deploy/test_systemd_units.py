"""The unit files in systemd/: what the role installs, and valid for systemd.

``systemd-analyze verify`` wants the ExecStart binary to exist and the units
they refer to (sysinit.target, postfix.service, ...) to be found, so the
units are checked inside a scratch root: the system's own unit directory
copied in, a stub /opt/mtasidecar/venv/bin/mtasidecar, our units in
/etc/systemd/system. It needs no running systemd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy._ansible import SYSTEMD_DIR, UNITS, render_templates, tool

pytestmark = pytest.mark.deploy

SYSTEM_UNITS = Path("/usr/lib/systemd/system")
EXEC = "/opt/mtasidecar/venv/bin/mtasidecar"
LONG_RUNNING = ("mtasidecar-ingest.service", "mtasidecar-api.service", "mtasidecar-policy.service",
                "mtasidecar-webhooks.service")


def test_units_are_the_role_templates_with_defaults(tmp_path):
    """systemd/ holds exactly what the role installs with its defaults.

    After changing a template: python -m tests.deploy._ansible
    """
    if tool("ansible-playbook") is None:
        pytest.skip("ansible-playbook is not installed")
    render_templates(UNITS, tmp_path)
    for unit in UNITS:
        assert (tmp_path / unit).read_text() == (SYSTEMD_DIR / unit).read_text(), \
            f"systemd/{unit} differs from the role's template: run python -m tests.deploy._ansible"
    assert sorted(p.name for p in SYSTEMD_DIR.iterdir()) == sorted(UNITS)


@pytest.fixture
def unit_root(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    if not SYSTEM_UNITS.is_dir():
        pytest.skip(f"{SYSTEM_UNITS} is missing")
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    stub = root / EXEC.lstrip("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(SYSTEMD_DIR / unit, etc / unit)
    return root


def _analyze(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="notice", SYSTEMD_PAGER="cat")
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60, env=env)


def test_systemd_analyze_verify(unit_root):
    result = _analyze("verify", f"--root={unit_root}", *UNITS)
    assert result.returncode == 0, result.stdout + result.stderr
    # verify also prints warnings (unknown keys, bad values) with status 0.
    assert not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_verify_catches_a_missing_binary(unit_root):
    """The check above is real: without the program, verify fails."""
    (unit_root / EXEC.lstrip("/")).unlink()
    result = _analyze("verify", f"--root={unit_root}", "mtasidecar-ingest.service")
    assert result.returncode != 0
    assert "is not executable" in result.stdout + result.stderr


@pytest.mark.parametrize("unit", LONG_RUNNING)
def test_sandboxing_exposure_is_low(unit_root, unit):
    """systemd-analyze security rates the sandbox; 10 is wide open, ours < 2.5."""
    result = _analyze("security", "--offline=yes", f"--root={unit_root}", "--threshold=25", "--no-pager", unit)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Overall exposure level" in result.stdout
