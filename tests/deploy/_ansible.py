"""Helpers for the deployment tests: find Ansible, render the role's templates.

The unit files in ``systemd/`` are the role's templates rendered with the
role's defaults. Regenerate them after changing a template:

    python -m tests.deploy._ansible            # writes systemd/*.service, *.timer
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = ROOT / "ansible"
ROLE_DIR = ANSIBLE_DIR / "roles" / "mtasidecar"
SYSTEMD_DIR = ROOT / "systemd"
UNITS = (
    "mtasidecar-ingest.service",
    "mtasidecar-api.service",
    "mtasidecar-policy.service",
    "mtasidecar-webhooks.service",
    "mtasidecar-sweep.service",
    "mtasidecar-sweep.timer",
)


def tool(name: str) -> str | None:
    """An Ansible program: next to this Python first (the venv), then PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def ansible_env(**extra: str) -> dict[str, str]:
    # With connection: local the modules inherit this environment, and
    # mtasidecar refuses unknown MTASIDECAR_* variables (MTASIDECAR_DEPLOY_TESTS).
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTASIDECAR_")}
    # The interpreter Ansible runs modules with on the target (discovery can
    # pick a broken shim) and no colour codes in captured output.
    env.update(ANSIBLE_PYTHON_INTERPRETER="/usr/bin/python3", ANSIBLE_NOCOLOR="1",
               ANSIBLE_FORCE_COLOR="0", ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"))
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "/usr/bin:/bin")
    env.update(extra)
    return env


def render_templates(names: tuple[str, ...], dest: Path, extra_vars: dict | None = None) -> None:
    """Render role templates with the role's defaults (plus extra_vars) into dest."""
    playbook = tool("ansible-playbook")
    if playbook is None:
        raise RuntimeError("ansible-playbook not found (pip install ansible-core)")
    dest = Path(dest).absolute()
    with tempfile.TemporaryDirectory() as tmp:
        play = Path(tmp, "render.yml")
        play.write_text(json.dumps([{
            "name": "Render role templates",
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "vars_files": [str(ROLE_DIR / "defaults" / "main.yml"), str(ROLE_DIR / "vars" / "main.yml")],
            "tasks": [{
                "name": "Render",
                "ansible.builtin.template": {"src": str(ROLE_DIR / "templates") + "/{{ item }}.j2",
                                             "dest": str(dest) + "/{{ item }}", "mode": "0644"},
                "loop": list(names),
            }],
        }]))
        extra = Path(tmp, "extra.json")
        extra.write_text(json.dumps({"role_path": str(ROLE_DIR), **(extra_vars or {})}))
        result = subprocess.run([playbook, "-i", "localhost,", str(play), "-e", f"@{extra}"],
                                capture_output=True, text=True, env=ansible_env(), timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"rendering failed:\n{result.stdout}\n{result.stderr}")


if __name__ == "__main__":
    render_templates(UNITS, Path(sys.argv[1]) if len(sys.argv) > 1 else SYSTEMD_DIR)
    print(f"rendered {', '.join(UNITS)}")
